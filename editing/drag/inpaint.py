"""Inpainting drag (Inpaint4Drag, Lu & Han, ICCV 2025): warp the object in pixels, inpaint what it uncovered.

1. **Bidirectional pixel warp** (``editing.drag.warp.bidirectional_warp``) of the masked object by the handle →
   target pairs: forward to place it, backward so no pixel of its new footprint is a hole; one pair translates,
   two or more scale and turn it, a pin (handle = target) makes the deformation axial about it. The object keeps
   its own pixels (resampled); nothing generative touches it.
2. **The fill mask**: what the object uncovered, widened by a ``seam`` band (pixels at a 512 px long side, scaled
   with the picture) and rounded out to whole latent cells — so the model's mask channel and the pixels it
   replaces agree — minus the object's new footprint.
3. **The fill**, in ``n_steps`` DDIM steps from noise (``strength`` 1), with an inpainting model: the loaded model
   when it is one, else ``--inpaint-model``, else the built-in companion of a built-in base (``toy`` →
   ``toy-inpaint``). Without one, the training-free fallback: blended latent diffusion (Avrahami et al., 2023) with
   the base model — after every step the latents outside the fill are the warped image's, re-noised to the level
   just reached: x ← m ⊙ x + (1 − m) ⊙ (√ᾱ · z_known + √(1 − ᾱ) · ε).
4. Outside the fill mask the result *is* the warped picture, pixel for pixel.

Inpaint4Drag's settings (official code): the empty prompt, guidance 1, 8 steps with the LCM LoRA, TAESD decoding.
Here the prompt is the request's (empty by default), an LCM LoRA comes from the LoRA library, and with
``fast_decode`` the TAESD given by ``--preview-decoder`` decodes. The live preview (``preview``) is step 1 with the
fill area hatched: what Run will keep, and where it will paint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from editing.checks import check_fields, field_table, num
from editing.context import EditContext
from editing.drag import warp as drag_warp
from editing.drag.common import PointPair, check_drag, check_prompt, points_from_json, points_json
from editing.images import pil_to_tensor, tensor_to_pil
from editing.runtime import EditResult, Task, decode_image, decode_mask, register
from editing.sampling import Hook, NoisePredictor, Schedule, StepState, add_noise, denoise
from models.errors import EditError

SEAM_AT = 512  # the seam is given in pixels at this long side and scaled with the picture
HATCH_PX = 6  # the preview's hatching period, pixels


@dataclass(frozen=True)
class InpaintDragRequest:
    """One inpainting drag. Validates on construction; raises EditError with an actionable message."""

    image: Image.Image
    points: tuple[PointPair, ...]
    mask: np.ndarray | None = None  # H×W bool, True = the object to move (must contain every handle)
    prompt: str = ""  # Inpaint4Drag fills with the empty prompt
    n_steps: int = num(8, 1, 100, "denoising steps of the fill (Inpaint4Drag: 8 with an LCM LoRA)")
    strength: float = num(1.0, 0.1, 1.0, "how much of the schedule the fill starts from (1 = pure noise)")
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


def warp_for_fill(image: Image.Image, mask: np.ndarray | None, points, seam: int) -> Warped:
    """Step 1 and 2 in pixels: the warped picture, the object's new footprint and the area to fill."""
    rgb = np.asarray(image.convert("RGB"))
    region = drag_warp.edit_region(image.size, mask, points)
    warped, obj, hole = drag_warp.bidirectional_warp(rgb, region, [h for h, _ in points], [t for _, t in points])
    if not obj.any():
        raise EditError("The drag moves the whole object out of the picture: keep its targets inside the image.")
    r = round(seam * max(image.size) / SEAM_AT)
    if r > 0 and hole.any():
        hole = cv2.dilate(hole.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)) > 0
    return Warped(warped, obj, hole & ~obj)


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
        mask = None if mask is None else _resized(np.asarray(mask, bool), size)
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


# ---- the fill --------------------------------------------------------------------------------------------------
class BlendKnown(Hook):
    """Blended latent diffusion: after each step, latents outside ``fill`` (1, 1, h, w) are the known image's
    re-noised to the level just reached (the last step: the known latents themselves)."""

    def __init__(self, known: torch.Tensor, noise: torch.Tensor, fill: torch.Tensor):
        self.known, self.noise, self.fill = known, noise, fill

    def after_step(self, s: StepState) -> None:
        ref = add_noise(self.known, self.noise, torch.tensor(s.a_next, dtype=self.known.dtype))
        s.x = torch.where(self.fill > 0.5, s.x, ref)


def _decoder(ctx: EditContext, bundle, fast: bool):
    """(decode(z) -> image in [-1, 1], name): the bundle's VAE, or the TAESD of --preview-decoder."""
    if fast and ctx.options.preview_decoder:
        from editing.previews import preview_decoder

        tiny = preview_decoder(ctx).tiny
        return (lambda z: tiny.decode((z / tiny.config.scaling_factor).to(bundle.device, bundle.dtype)).sample), "taesd"
    return (lambda z: bundle.vae.decode((z / bundle.vae.config.scaling_factor).to(bundle.device, bundle.dtype)).sample,
            "vae")


def _resized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An H×W bool mask at ``size`` = (w, h), nearest neighbour."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def run_inpaint(ctx: EditContext, req: InpaintDragRequest) -> EditResult:
    """Pixel warp → fill mask on whole latent cells → inpainting model (or blended latents) → composite."""
    from models.loader import inpainting_companion

    b, run = ctx.bundle, ctx.run
    work, (image, mask, points), notices = ctx.fit(req.image, req.mask, req.points)
    notices = list(req.notices) + notices
    if mask is not None and mask.all():
        notices.append("The mask covers the whole picture, so all of it moves and only the edge it uncovers is "
                       "filled: paint just the object to move it alone.")
    with run.step("warp"):
        w = warp_for_fill(image, mask, points, req.seam)
    if not w.fill.any():
        notices.append("The drag uncovered nothing, so nothing was filled: the result is the warped picture.")
        recipe = ctx.recipe("inpaint", req.params(), images={"image": req.image}, masks={"mask": req.mask})
        return EditResult(Image.fromarray(w.image), recipe, run.timings, run.nfe, notices,
                          [tuple(t) for _, t in req.points], extra={"filled_px": 0, "fill": "none"})
    with run.step("load"):
        ib = inpainting_companion(b, ctx.options.inpaint_model) or b
    run.count_unet(ib.unet)
    filler = ib.name if ib.family.inpainting else f"blended latents with {b.name}"
    if not ib.family.inpainting:
        notices.append(f"No inpainting model for {b.name!r}: the uncovered area is filled by blending latents with "
                       "the base model (start the app with --inpaint-model for a better fill).")
    wsize, f = work.size, ib.vae_scale_factor
    warped_work = Image.fromarray(w.image).resize(wsize, Image.LANCZOS)
    fill_px = torch.from_numpy(_resized(w.fill, wsize))[None, None].float()
    obj_work = _resized(w.obj, wsize)
    cells = F.max_pool2d(fill_px, f)  # (1, 1, h, w): a latent cell is filled if any of its pixels is
    paint = (F.interpolate(cells, scale_factor=f, mode="nearest")[0, 0].numpy() > 0.5) & ~obj_work
    x = pil_to_tensor(warped_work).to(ib.device, ib.dtype)
    s = ib.vae.config.scaling_factor
    with run.step("encode"), torch.no_grad():
        known = ib.vae.encode(x).latent_dist.mean.float() * s
        paint_t = torch.from_numpy(paint)[None, None].to(ib.device, ib.dtype)
        masked = ib.vae.encode(x * (1 - paint_t)).latent_dist.mean.float() * s  # the hole blanked (mid-gray)
    schedule = Schedule.from_scheduler(ib.scheduler, req.n_steps)
    start = schedule.start_index(req.strength)
    gen = torch.Generator().manual_seed(req.seed)
    noise = torch.randn(known.shape, generator=gen).to(ib.device)
    # strength < 1 starts from the picture with the hole blanked: under the hole lie the object's old pixels
    x_t = noise if req.strength >= 1.0 else add_noise(masked, noise, torch.tensor(schedule.alpha(
        int(schedule.timesteps[start]))))
    cells = cells.to(ib.device)
    cfg = req.guidance_scale > 1.0
    predict = NoisePredictor(ib.unet, ib.encode_prompt(req.prompt), 1, uncond=ib.encode_prompt("") if cfg else None,
                             guidance_scale=req.guidance_scale, device=ib.device, graphs=False)
    with run.step("fill"), torch.no_grad():
        if ib.family.inpainting:
            from models.families import inpainting_conditioning

            with inpainting_conditioning(ib.unet, cells.to(ib.dtype), masked):
                z0 = denoise(predict, x_t, schedule, start, run=run)
        else:
            z0 = denoise(predict, x_t, schedule, start, hooks=[BlendKnown(known, noise, cells)], run=run)
    decode, decoder = _decoder(ctx, ib, bool(req.fast_decode))
    with run.step("decode"), torch.no_grad():
        filled = tensor_to_pil(decode(z0).float()).resize(image.size, Image.LANCZOS)
    # the model repainted whole cells; only the fill (hole + seam) is taken from it, the rest of those cells keeps
    # the warped picture's pixels (measured on the tune split: see the method's note)
    paint_full = w.fill
    result = np.where(paint_full[..., None], np.asarray(filled), w.image)
    recipe = ctx.recipe("inpaint", req.params(), images={"image": req.image}, masks={"mask": req.mask})
    extra = {"fill": filler, "filled_px": int(paint_full.sum()), "object_px": int(w.obj.sum()), "decoder": decoder}
    return EditResult(Image.fromarray(result), recipe, run.timings, run.nfe, notices,
                      [tuple(t) for _, t in req.points], extra=extra)


def inpaint_from_recipe(recipe: dict) -> InpaintDragRequest:
    params = dict(recipe["params"])
    points = points_from_json(params.pop("points"))
    known = {f.name for f in dataclasses.fields(InpaintDragRequest)} - {"image", "mask", "points", "notices"}
    return InpaintDragRequest(decode_image(recipe["image_png"]), points, decode_mask(recipe.get("mask_png")),
                              **{k: v for k, v in params.items() if k in known})


register(Task("inpaint", InpaintDragRequest, run=run_inpaint, from_recipe=inpaint_from_recipe,
              uses_inpainting_unet=True))
