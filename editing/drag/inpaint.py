"""Inpainting drag (Inpaint4Drag, Lu & Han, ICCV 2025): warp the object in pixels, inpaint what it uncovered.

1. **Bidirectional pixel warp** (``editing.drag.warp.bidirectional_warp``) of the masked object by the handle →
   target pairs: forward to place it, backward so no pixel of its new footprint is a hole; one pair translates,
   two or more scale and turn it, a pin (handle = target) makes the deformation axial about it. The object keeps
   its own pixels (resampled); nothing generative touches it.
2. **The fill mask**: what the object uncovered, widened by a ``seam`` band (pixels at a 512 px long side, scaled
   with the picture), minus the object's new footprint.
3. **The fill** (``editing.fill.fill_hole``): the hole repainted as background by the inpainting model — the
   loaded model when it is one, else ``--inpaint-model``, else the built-in companion of a built-in base (``toy``
   → ``toy-inpaint``) — in ``n_steps`` DDIM steps from a classical background estimate noised to ``strength``,
   with the object left out of what the model sees; without an inpainting model, blended latent diffusion with
   the base model.
4. Outside the fill mask the result *is* the warped picture, pixel for pixel.

The mask is the object (Inpaint4Drag's convention; its DragBench evaluation redraws DragBench's editable-area masks
around the objects): every masked pixel moves, so a loose mask drags background along. A click on the object gives
it (``editing.segment``).

Two departures from Inpaint4Drag, each measured on the toy tune split with the toy inpainting model (vacated error:
mean RGB error, 0–255, where the shape was and is no more). Shown the object beside the thin ring a shrinking shape
leaves, the model grows it back into the ring (scale: 60–70 % success, vacated error 44–47), so the model sees the
picture with the object taken out (``editing.fill``): scale 100 %, error 28. And it starts from the classical
background estimate at ``strength`` 0.5 rather than from noise (n = 20 per family, move/scale/stretch/rotate:
success 85/100/85/95 % → 95/95/100/100 %, vacated error 37/28/56/40 → 11/13/8/7, 4 UNet calls instead of 8).
Lower strengths scored about the same on toy scenes, whose backgrounds are smooth enough for the estimate alone;
0.5 leaves the model the texture a photo's background needs.

Inpaint4Drag's settings (official code): the empty prompt, guidance 1, 8 steps with the LCM LoRA, TAESD decoding.
Here the prompt is the request's (empty by default), an LCM LoRA comes from the LoRA library, and with
``fast_decode`` the TAESD given by ``--preview-decoder`` decodes. The live preview (``preview``) is step 1 with the
fill area hatched: what Run will keep, and where it will paint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from editing.checks import check_fields, field_table, num
from editing.context import EditContext
from editing.drag import warp as drag_warp
from editing.drag.common import PointPair, check_drag, check_prompt, points_from_json, points_json
from editing.fill import SEAM_AT, FillSettings, fill_hole, widen
from editing.geometry import mask_at
from editing.runtime import EditResult, Task, decode_image, decode_mask, register
from models.errors import EditError

HATCH_PX = 6  # the preview's hatching period, pixels


@dataclass(frozen=True)
class InpaintDragRequest:
    """One inpainting drag. Validates on construction; raises EditError with an actionable message."""

    image: Image.Image
    points: tuple[PointPair, ...]
    mask: np.ndarray | None = None  # H×W bool, True = the object to move (every handle on it or within edge_px)
    prompt: str = ""  # Inpaint4Drag fills with the empty prompt
    n_steps: int = num(8, 1, 100, "denoising steps of the fill (Inpaint4Drag: 8 with an LCM LoRA)")
    strength: float = num(0.5, 0.1, 1.0, "how much of the schedule the fill repaints from the background estimate "
                                         "(1 = from pure noise, Inpaint4Drag's)")
    seam: int = num(5, 0, 64, "pixels (at a 512 px long side) the fill reaches past the uncovered area")
    guidance_scale: float = num(1.0, 1.0, 20.0, "classifier-free guidance of the fill (Inpaint4Drag: 1 = none)")
    fast_decode: int = num(0, 0, 1, "1: decode with the TAESD of --preview-decoder (faster, softer) when given")
    seed: int = num(42, 0, 2**31 - 1, "random seed of the fill's noise")
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        img, points, mask, notices = check_drag(self.image, self.points, self.mask)
        check_prompt(self.prompt)
        for k, v in (("image", img), ("points", points), ("mask", mask), ("notices", tuple(self.notices) + notices)):
            object.__setattr__(self, k, v)
        check_fields(self, INPAINT_FIELDS)
        drag_warp.check_handles_in_mask(self.mask, self.points)

    def replace(self, **changes) -> InpaintDragRequest:
        return dataclasses.replace(self, notices=(), **changes)

    def params(self) -> dict:
        """The JSON-serialisable part (everything but pixels)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image", "mask", "notices")}
        out["points"] = points_json(self.points)
        return out


INPAINT_FIELDS = field_table(InpaintDragRequest)


# ---- the pixel part: shared by the task and the live preview --------------------------------------------------
@dataclass(frozen=True)
class Warped:
    image: np.ndarray  # H×W×3 uint8, the object moved
    obj: np.ndarray  # H×W bool, where the object now is
    fill: np.ndarray  # H×W bool, what the inpainting paints (before rounding to latent cells)


def warp_for_fill(image: Image.Image, mask: np.ndarray | None, points, seam: int, cell: float | None = None
                  ) -> Warped:
    """Step 1 and 2 in pixels: the warped picture, the object's new footprint and the area to fill. With ``cell``
    (one latent cell, in the picture's pixels), a deformation squeezing the object narrower than that is refused."""
    rgb = np.asarray(image.convert("RGB"))
    region = drag_warp.edit_region(image.size, mask, points)
    handles, targets = [h for h, _ in points], [t for _, t in points]
    if cell is not None:
        drag_warp.check_not_squeezed(region, handles, targets, cell)
    warped, obj, hole = drag_warp.bidirectional_warp(rgb, region, handles, targets)
    if not obj.any():
        raise EditError("The drag moves the whole object out of the picture: keep its targets inside the image.")
    return Warped(warped, obj, widen(hole, seam) & ~obj)


def preview(image: Image.Image, mask: np.ndarray | None, points, seam: int = INPAINT_FIELDS["seam"][2]
            ) -> Image.Image:
    """The live preview: the warped picture with the area Run will fill hatched (≤ 0.2 s at 512² on one core)."""
    img = image.convert("RGB")
    pairs = [((float(a[0]), float(a[1])), (float(b[0]), float(b[1]))) for a, b in (points or ())]
    if not pairs:
        return img
    if mask is not None and not np.asarray(mask).any():
        mask = None
    work, scale = img, min(1.0, drag_warp.PREVIEW_SIDE / max(img.size))
    if scale < 1.0:  # a big picture is previewed at PREVIEW_SIDE and resized back, as Instant's preview
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        work = img.resize(size, Image.BILINEAR)
        mask = None if mask is None else mask_at(np.asarray(mask, bool), size)
        pairs = [tuple(((p[0] + 0.5) * size[0] / img.width - 0.5, (p[1] + 0.5) * size[1] / img.height - 0.5)
                       for p in pair) for pair in pairs]
    w = warp_for_fill(work, None if mask is None else np.asarray(mask, bool), pairs, seam)
    yy, xx = np.mgrid[0:work.height, 0:work.width]
    stripe = ((xx + yy) // max(1, HATCH_PX * max(work.size) // SEAM_AT)) % 2 == 0
    out = w.image.copy()
    out[w.fill] = np.where(stripe[w.fill, None], 255, 160).astype(np.uint8)
    if work.size != img.size:
        return Image.fromarray(out).resize(img.size, Image.BILINEAR)
    return Image.fromarray(out)


# ---- the fill (editing.fill) and the task -----------------------------------------------------------------------
def run_inpaint(ctx: EditContext, req: InpaintDragRequest) -> EditResult:
    """Pixel warp → fill mask → the hole repainted as background (``editing.fill``) → composite."""
    run = ctx.run
    work, (image, mask, points), notices = ctx.fit(req.image, req.mask, req.points)
    notices = list(req.notices) + notices
    if mask is not None and mask.all():
        notices.append("The mask covers the whole picture, so all of it moves and only the edge it uncovers is "
                       "filled: paint just the object to move it alone.")
    with run.step("warp"):
        cell = ctx.bundle.vae_scale_factor * image.width / work.width  # one latent cell, in the picture's pixels
        w = warp_for_fill(image, mask, points, req.seam, cell)
    recipe = ctx.recipe("inpaint", req.params(), images={"image": req.image}, masks={"mask": req.mask})
    targets = [tuple(t) for _, t in req.points]
    if not w.fill.any():
        notices.append("The drag uncovered nothing, so nothing was filled: the result is the warped picture.")
        return EditResult(Image.fromarray(w.image), recipe, run.timings, run.nfe, notices, targets,
                          extra={"filled_px": 0, "fill": "none"})
    settings = FillSettings(req.prompt, req.n_steps, req.strength, req.guidance_scale, req.seed, bool(req.fast_decode))
    filled = fill_hole(ctx, w.image, w.fill, w.obj, work.size, settings)
    if filled.filler.startswith("blended"):
        notices.append(f"No inpainting model for {ctx.bundle.name!r}: the uncovered area is filled by blending "
                       "latents with the base model (start the app with --inpaint-model for a better fill).")
    extra = {"fill": filled.filler, "filled_px": int(w.fill.sum()), "object_px": int(w.obj.sum()),
             "decoder": filled.decoder}
    return EditResult(Image.fromarray(filled.image), recipe, run.timings, run.nfe, notices, targets, extra=extra)


def inpaint_from_recipe(recipe: dict) -> InpaintDragRequest:
    params = dict(recipe["params"])
    points = points_from_json(params.pop("points"))
    known = {f.name for f in dataclasses.fields(InpaintDragRequest)} - {"image", "mask", "points", "notices"}
    return InpaintDragRequest(decode_image(recipe["image_png"]), points, decode_mask(recipe.get("mask_png")),
                              **{k: v for k, v in params.items() if k in known})


register(Task("inpaint", InpaintDragRequest, run=run_inpaint, from_recipe=inpaint_from_recipe,
              uses_inpainting_unet=True))
