"""The guided tasks move, appearance and paste, each a ``Plan`` (initial latent, energies, regions, attention
strategy) for the guided sampler; what they share with the guided drag (``editing.drag.guided``): the working-size
pictures (``Prepared``), the cached inversion with its memory bank and the sampling + decoding (``finish``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from editing.context import EditContext
from editing.fill import FillSettings, fill_hole, widen
from editing.geometry import mask_at, mask_centre, place, resize_mask
from editing.guidance import sampler
from editing.guidance.energies import appearance_energies, move_energies, paste_energies
from editing.guidance.image_prompt import open_image_prompt
from editing.guidance.sampler import Plan
from editing.guidance.schedule import GuidedSchedule
from editing.images import pil_to_tensor, tensor_to_pil
from editing.kv_bank import Replace, Splice, invert_and_record
from editing.previews import sample_previews
from editing.requests import AppearanceRequest, GuidedParams, MoveRequest, PasteRequest
from editing.runtime import EditResult, Task, decode_image, decode_mask, register
from editing.sampling import Inversion
from models.errors import EditError

MOVE_SEAM = 5  # the repainted hole reaches this many pixels (at a 512 px side) past what the object left
GUIDANCE_CELLS_PER_LATENT = 2  # features are compared on a grid of 2 cells per latent cell: the published 1/4 of
# the image for SD-1.5's 8x VAE; kept per latent cell so the 3x3-cell windows mean the same on a 4x VAE (toy)


def grid_mask(mask: np.ndarray, hw) -> torch.Tensor:
    """Pixel mask -> bool (H, W) grid (a cell is in if any pixel is)."""
    return resize_mask(mask, hw)[0, 0] > 0.5


class Prepared:
    """Working-size pictures and their grids for one guided request."""

    def __init__(self, ctx, image: Image.Image):
        self.work, (self.image, _, _), self.notices = ctx.fit(image)
        self.scale = (self.work.width / image.width, self.work.height / image.height)  # request px -> working px
        f = ctx.bundle.vae_scale_factor
        self.lat_hw = (self.work.height // f, self.work.width // f)
        self.grid_hw = (max(3, self.lat_hw[0] * GUIDANCE_CELLS_PER_LATENT), max(3, self.lat_hw[1] * GUIDANCE_CELLS_PER_LATENT))

    def mask(self, m: np.ndarray | None) -> np.ndarray | None:
        if m is None:
            return None
        return mask_at(m, self.work.size)

    def px(self, p) -> tuple[float, float]:
        return (p[0] * self.scale[0], p[1] * self.scale[1])

    def image_of(self, img: Image.Image) -> Image.Image:
        return img if img.size == self.work.size else img.resize(self.work.size, Image.LANCZOS)


def inversion(ctx: EditContext, images: list[Image.Image], prompts: list[str], n_steps: int) -> Inversion:
    """The full DDIM inversion of the working-size pictures with the decoder's memory bank (cached)."""
    return invert_and_record(ctx, images, prompts, n_steps, cache="guided_inversion")


def finish(ctx: EditContext, req: GuidedParams, prep: Prepared, inv: Inversion, plan: Plan,
            notices: list[str], recipe_images: dict, recipe_masks: dict, extra: dict | None = None,
            image_prompt=None) -> EditResult:
    b, run = ctx.bundle, ctx.run
    gsched = GuidedSchedule(req.method, req.n_inference_steps)
    cond, uncond = b.encode_prompt(req.prompt), b.encode_prompt("")
    with run.step("edit"):
        z0 = sampler.guided_sample(b.unet, inv, plan, gsched, cond, uncond, req.guidance_scale, req.energy_scale,
                           req.sde_strength if req.method == "diffeditor" else 0.0, prep.grid_hw, req.seed, run,
                           image_prompt=image_prompt, extra_hooks=sample_previews(ctx))
    out = tensor_to_pil(ctx.decode(z0)).resize(prep.image.size, Image.LANCZOS)
    recipe = ctx.recipe(plan.task, jsonable(req.params()), images=recipe_images, masks=recipe_masks)
    info = {"memory_bank_mb": round(inv.bank.nbytes / 2**20, 2), "bank_layers": len(inv.bank.layers),
            "bank_steps": len(inv.bank.timesteps), "method": req.method} | (extra or {})
    return EditResult(out, recipe, run.timings, run.nfe, notices, [], extra=info)


def jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        out[k] = [list(p) if isinstance(p, tuple) else p for p in v] if isinstance(v, tuple) else v
    return out


def run_move(ctx: EditContext, req: MoveRequest) -> EditResult:
    b = ctx.bundle
    prep = Prepared(ctx, req.image)
    notices = list(req.notices) + prep.notices
    old_px = prep.mask(req.mask)
    centre = mask_centre(old_px)
    offset = prep.px(req.offset)
    size = prep.work.size

    def moved(t: torch.Tensor, mode="nearest") -> torch.Tensor:
        return place(t, centre, req.scale, offset, size, mode=mode)

    old_t = torch.from_numpy(old_px.astype(np.float32))[None, None]
    new_px = moved(old_t)[0, 0].numpy() > 0.5
    if not new_px.any():
        raise EditError("The object would leave the image entirely: use a smaller offset.")
    kept = new_px.sum() / max(1, (old_px.sum() * req.scale**2))
    if kept < 0.98:
        notices.append(f"Part of the object ({100 * (1 - kept):.0f}%) would leave the image; that part is clipped.")
    inv = inversion(ctx, [prep.work], [req.prompt], req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    old, new = grid_mask(old_px, g_hw).to(b.device), grid_mask(new_px, g_hw).to(b.device)
    other = ~(old | new)
    hole = prep.mask(req.hole_mask)
    hole_ref = grid_mask(hole, g_hw).to(b.device) if hole is not None else other
    # z_T: the object's inverted noise, shifted (and resized) into its new place.
    z_inv = inv.latents[-1][:1].to(b.device)
    new_lat = resize_mask(new_px, l_hw).to(b.device)
    z_T = z_inv * (1 - new_lat) + moved(z_inv) * new_lat
    edit_region = new_lat
    sde_region = ((new_lat + resize_mask(old_px, l_hw).to(b.device)) > 0).float()

    def energies(cur, ref):
        placed = [moved(f, mode="bilinear") for f in ref]
        return move_energies(cur, ref, placed, new, old, other, hole_ref, req.w_edit, req.w_content,
                             req.w_contrast, req.w_inpaint)

    plan = Plan("move", z_T, energies, edit_region, sde_region, Replace())
    with open_image_prompt(ctx, req, [prep.work], notices) as image_prompt:
        result = finish(ctx, req, prep, inv, plan, notices, {"image": req.image},
                        {"mask": req.mask, "hole_mask": req.hole_mask}, image_prompt=image_prompt)
    if req.inpaint_hole and hole is None:
        result = _inpaint_hole(ctx, req, prep, result, old_px & ~new_px, new_px)
    return result


def _inpaint_hole(ctx: EditContext, req: MoveRequest, prep: Prepared, result: EditResult, vacated: np.ndarray,
                  placed: np.ndarray) -> EditResult:
    """The area the object left (``vacated``, working-size pixels, widened by a seam) repainted as background by
    an inpainting model, when there is one; the rest of ``result`` as it was."""
    size = result.image.size
    vacated, placed = mask_at(vacated, size), mask_at(placed, size)
    if not vacated.any():
        return result
    hole = widen(vacated, MOVE_SEAM) & ~placed
    filled = fill_hole(ctx, np.asarray(result.image.convert("RGB")), hole, placed, prep.work.size,
                       FillSettings(prompt=req.prompt, seed=req.seed), blend_fallback=False)
    if filled is None:
        return result
    return dataclasses.replace(result, image=Image.fromarray(filled.image),
                               extra={**result.extra, "hole": filled.filler, "hole_px": int(hole.sum())})


def run_appearance(ctx: EditContext, req: AppearanceRequest) -> EditResult:
    b = ctx.bundle
    prep = Prepared(ctx, req.image)
    notices = list(req.notices) + prep.notices
    base_px, ref_px = prep.mask(req.mask), prep.mask(req.reference_mask)
    ref_work = prep.image_of(req.reference)
    inv = inversion(ctx, [prep.work, ref_work], [req.prompt, req.reference_prompt or req.prompt],
                     req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    base_m, ref_m = grid_mask(base_px, g_hw).to(b.device), grid_mask(ref_px, g_hw).to(b.device)
    region = resize_mask(base_px, l_hw).to(b.device)

    def energies(cur, ref):
        return appearance_energies(cur, [f[:1] for f in ref], [f[1:2] for f in ref], base_m, ref_m,
                                   req.w_edit, req.w_content)

    plan = Plan("appearance", inv.latents[-1][:1].to(b.device), energies, region, region,
                Splice(ref_px, base_px, l_hw[0] / l_hw[1]))
    with open_image_prompt(ctx, req, [prep.work, ref_work], notices) as image_prompt:
        return finish(ctx, req, prep, inv, plan, notices, {"image": req.image, "reference": req.reference},
                       {"mask": req.mask, "reference_mask": req.reference_mask}, image_prompt=image_prompt)


def run_paste(ctx: EditContext, req: PasteRequest) -> EditResult:
    b = ctx.bundle
    prep = Prepared(ctx, req.image)
    notices = list(req.notices) + prep.notices
    ref_px = prep.mask(req.reference_mask)
    ref_work = prep.image_of(req.reference)
    size = prep.work.size
    centre, offset = mask_centre(ref_px), prep.px(req.offset)
    # The reference, scaled about its object and moved into place on a canvas of the base's size: after this
    # the pasted object's features sit exactly where the paste mask is, so the edit term compares cell to cell.
    ref_t = pil_to_tensor(ref_work)
    placed_img = place(ref_t, centre, req.scale, offset, size, mode="bilinear")
    mask_t = torch.from_numpy(ref_px.astype(np.float32))[None, None]
    paste_px = place(mask_t, centre, req.scale, offset, size)[0, 0].numpy() > 0.5
    if not paste_px.any():
        raise EditError("The pasted object would land outside the image: use a smaller offset.")
    kept = paste_px.sum() / max(1, ref_px.sum() * req.scale**2)
    if kept < 0.98:
        notices.append(f"Part of the pasted object ({100 * (1 - kept):.0f}%) falls outside the image; it is clipped.")
    base_t = pil_to_tensor(prep.work)
    composite = base_t * (1 - torch.from_numpy(paste_px.astype(np.float32))) + placed_img * torch.from_numpy(paste_px.astype(np.float32))
    placed_ref = tensor_to_pil(composite)  # reference object on the base background
    inv = inversion(ctx, [prep.work, placed_ref], [req.prompt, req.reference_prompt or req.prompt],
                     req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    m = grid_mask(paste_px, g_hw).to(b.device)
    region = resize_mask(paste_px, l_hw).to(b.device)
    z_T = inv.latents[-1][:1].to(b.device) * (1 - region) + inv.latents[-1][1:2].to(b.device) * region

    def energies(cur, ref):
        return paste_energies(cur, [f[:1] for f in ref], [f[1:2] for f in ref], m, req.w_edit, req.w_content)

    plan = Plan("paste", z_T, energies, region, region, Splice(paste_px, paste_px, l_hw[0] / l_hw[1]))
    with open_image_prompt(ctx, req, [prep.work, ref_work], notices) as image_prompt:
        return finish(ctx, req, prep, inv, plan, notices, {"image": req.image, "reference": req.reference},
                       {"reference_mask": req.reference_mask}, image_prompt=image_prompt)


def recipe_params(recipe: dict, cls) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    p = {k: v for k, v in recipe["params"].items() if k in known and k not in ("points",)}
    for k in ("offset",):
        if k in p:
            p[k] = tuple(p[k])
    return p


def _move_from_recipe(r: dict) -> MoveRequest:
    return MoveRequest(image=decode_image(r["image_png"]), mask=decode_mask(r["mask_png"]),
                       hole_mask=decode_mask(r.get("hole_mask_png")), **recipe_params(r, MoveRequest))


def _appearance_from_recipe(r: dict) -> AppearanceRequest:
    return AppearanceRequest(image=decode_image(r["image_png"]), mask=decode_mask(r["mask_png"]),
                             reference=decode_image(r["reference_png"]),
                             reference_mask=decode_mask(r["reference_mask_png"]), **recipe_params(r, AppearanceRequest))


def _paste_from_recipe(r: dict) -> PasteRequest:
    return PasteRequest(image=decode_image(r["image_png"]), reference=decode_image(r["reference_png"]),
                        reference_mask=decode_mask(r["reference_mask_png"]), **recipe_params(r, PasteRequest))


register(Task("move", MoveRequest, run_move, _move_from_recipe))
register(Task("appearance", AppearanceRequest, run_appearance, _appearance_from_recipe))
register(Task("paste", PasteRequest, run_paste, _paste_from_recipe))
