"""The four guided tasks: drag, move, appearance and paste, each a ``Plan`` (initial latent, energies,
regions, attention mode) for the guided sampler."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from editing.context import EditContext
from editing.geometry import mask_centre, place, points_to_grid, resize_mask
from editing.guidance.image_prompt import open_image_prompt
from editing.guidance import sampler
from editing.guidance.bank import MemoryBank
from editing.guidance.energies import appearance_energies, drag_energies, move_energies, paste_energies
from editing.guidance.sampler import Plan
from editing.guidance.schedule import GuidedSchedule
from editing.images import image_hash, pil_to_tensor, tensor_to_pil
from editing.previews import sample_previews
from editing.requests import AppearanceRequest, EditError, GuidedDragRequest, GuidedParams, MoveRequest, PasteRequest
from editing.runtime import EditResult, Task, decode_image, decode_mask, register
from editing.sampling import Inversion, Schedule

GRID_PER_LATENT = 2  # features are compared on a grid of 2 cells per latent cell: the published 1/4 of the
# image for SD-1.5's 8x VAE; kept per latent cell so the 3x3-cell windows mean the same on a 4x VAE (toy)


def _grid_mask(mask: np.ndarray, hw) -> torch.Tensor:
    """Pixel mask -> bool (H, W) grid (a cell is in if any pixel is)."""
    return resize_mask(mask, hw)[0, 0] > 0.5


def _cells_around(p: torch.Tensor, hw) -> torch.Tensor:
    """Flat indices of the 3×3 cells around grid point ``p`` = (x, y), clipped inside the grid."""
    h, w = hw
    cx = int(np.clip(round(float(p[0])), 1, w - 2))
    cy = int(np.clip(round(float(p[1])), 1, h - 2))
    ys, xs = torch.meshgrid(torch.arange(cy - 1, cy + 2), torch.arange(cx - 1, cx + 2), indexing="ij")
    return (ys * w + xs).flatten()


def _default_drag_mask(size, points) -> tuple[np.ndarray, str]:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    for (hx, hy), (tx, ty) in points:
        r = max(0.12 * max(w, h), 0.6 * np.hypot(tx - hx, ty - hy))
        for cx, cy in ((hx, hy), (tx, ty), ((hx + tx) / 2, (hy + ty) / 2)):
            mask |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    return mask, "No mask was painted, so the area around the points may change."


class _Prepared:
    """Working-size pictures and their grids for one guided request."""

    def __init__(self, ctx, image: Image.Image):
        self.work, (self.image, _, _), self.notices = ctx.fit(image)
        self.scale = (self.work.width / image.width, self.work.height / image.height)  # request px -> working px
        f = ctx.bundle.vae_scale_factor
        self.lat_hw = (self.work.height // f, self.work.width // f)
        self.grid_hw = (max(3, self.lat_hw[0] * GRID_PER_LATENT), max(3, self.lat_hw[1] * GRID_PER_LATENT))

    def mask(self, m: np.ndarray | None) -> np.ndarray | None:
        if m is None:
            return None
        if m.shape != (self.work.height, self.work.width):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(self.work.size, Image.NEAREST)) > 127
        return m

    def px(self, p) -> tuple[float, float]:
        return (p[0] * self.scale[0], p[1] * self.scale[1])

    def image_of(self, img: Image.Image) -> Image.Image:
        return img if img.size == self.work.size else img.resize(self.work.size, Image.LANCZOS)


def _inversion(ctx: EditContext, images: list[Image.Image], prompts: list[str], n_steps: int) -> Inversion:
    """Cached (per picture set, prompts, steps) inversion + memory bank."""
    b, run = ctx.bundle, ctx.run
    key = (tuple(image_hash(im) for im in images), images[0].size, tuple(prompts), n_steps, ctx.lora_key)
    cache = ctx.caches.task("guided_inversion", 2)

    def make():
        with run.step("encode"), torch.no_grad():
            z0 = torch.cat([ctx.posterior(im)[0] for im in images]).to(b.device)
        with run.step("inversion"):
            cond = torch.cat([b.encode_prompt(p) for p in prompts])
            bank_device = b.device if b.device.type == "cuda" and not ctx.options.bank_on_cpu else "cpu"
            return sampler.invert_with_bank(b.unet, z0, cond, Schedule.from_scheduler(b.scheduler, n_steps),
                                            MemoryBank(bank_device), run=run)

    return cache.get_or(key, make)[0]


def _finish(ctx: EditContext, req: GuidedParams, prep: _Prepared, inv: Inversion, plan: Plan,
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
    recipe = ctx.recipe(plan.task if plan.task != "drag" else "guided_drag", _jsonable(req.params()),
                           images=recipe_images, masks=recipe_masks)
    info = {"memory_bank_mb": round(inv.bank.nbytes / 2**20, 2), "bank_layers": len(inv.bank.layers),
            "bank_steps": len(inv.bank.timesteps), "method": req.method} | (extra or {})
    return EditResult(out, recipe, run.timings, run.nfe, notices, [], extra=info)


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        out[k] = [list(p) if isinstance(p, tuple) else p for p in v] if isinstance(v, tuple) else v
    return out


def run_guided_drag(ctx: EditContext, req: GuidedDragRequest) -> EditResult:
    b = ctx.bundle
    prep = _Prepared(ctx, req.image)
    notices = list(req.notices) + prep.notices
    points = [(prep.px(h), prep.px(t)) for h, t in req.points]
    mask = prep.mask(req.mask)
    if mask is None:
        mask, note = _default_drag_mask(prep.work.size, points)
        notices.append(note)
    inv = _inversion(ctx, [prep.work], [req.prompt], req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    gh = points_to_grid([h for h, _ in points], prep.work.size, g_hw)
    gt = points_to_grid([t for _, t in points], prep.work.size, g_hw)
    handle_cells = [_cells_around(p, g_hw) for p in gh]
    target_cells = [_cells_around(p, g_hw) for p in gt]
    outside = ~_grid_mask(mask, g_hw).to(b.device)
    # z_T: the latent patch at each handle is copied to its target (3×3 latent cells).
    z_T = inv.latents[-1][:1].clone().to(b.device)
    lh = points_to_grid([h for h, _ in points], prep.work.size, l_hw)
    lt = points_to_grid([t for _, t in points], prep.work.size, l_hw)
    for ph, pt in zip(lh, lt):
        src, dst = _cells_around(ph, l_hw), _cells_around(pt, l_hw)
        flat = z_T.flatten(2)
        flat[:, :, dst] = flat[:, :, src].clone()
    region = resize_mask(mask, l_hw).to(b.device)

    def energies(cur, ref):
        return drag_energies(cur, ref, [c.to(b.device) for c in handle_cells], [c.to(b.device) for c in target_cells],
                             outside, req.w_edit, req.w_content, req.w_inpaint)

    plan = Plan("drag", z_T, energies, region, region, "concat")
    ip = open_image_prompt(ctx, req, [prep.work], notices)
    with ip as image_prompt:
        res = _finish(ctx, req, prep, inv, plan, notices, {"image": req.image}, {"mask": req.mask},
                      image_prompt=image_prompt)
    res.recipe["params"]["points"] = [[list(h), list(t)] for h, t in req.points]
    return res


def run_move(ctx: EditContext, req: MoveRequest) -> EditResult:
    b = ctx.bundle
    prep = _Prepared(ctx, req.image)
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
    inv = _inversion(ctx, [prep.work], [req.prompt], req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    old, new = _grid_mask(old_px, g_hw).to(b.device), _grid_mask(new_px, g_hw).to(b.device)
    other = ~(old | new)
    hole = prep.mask(req.hole_mask)
    hole_ref = _grid_mask(hole, g_hw).to(b.device) if hole is not None else other
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

    plan = Plan("move", z_T, energies, edit_region, sde_region, "replace")
    with open_image_prompt(ctx, req, [prep.work], notices) as image_prompt:
        return _finish(ctx, req, prep, inv, plan, notices, {"image": req.image},
                       {"mask": req.mask, "hole_mask": req.hole_mask}, image_prompt=image_prompt)


def run_appearance(ctx: EditContext, req: AppearanceRequest) -> EditResult:
    b = ctx.bundle
    prep = _Prepared(ctx, req.image)
    notices = list(req.notices) + prep.notices
    base_px, ref_px = prep.mask(req.mask), prep.mask(req.reference_mask)
    ref_work = prep.image_of(req.reference)
    inv = _inversion(ctx, [prep.work, ref_work], [req.prompt, req.reference_prompt or req.prompt],
                     req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    base_m, ref_m = _grid_mask(base_px, g_hw).to(b.device), _grid_mask(ref_px, g_hw).to(b.device)
    region = resize_mask(base_px, l_hw).to(b.device)

    def energies(cur, ref):
        return appearance_energies(cur, [f[:1] for f in ref], [f[1:2] for f in ref], base_m, ref_m,
                                   req.w_edit, req.w_content)

    plan = Plan("appearance", inv.latents[-1][:1].to(b.device), energies, region, region, "splice",
                splice_masks=(ref_px, base_px))
    with open_image_prompt(ctx, req, [prep.work, ref_work], notices) as image_prompt:
        return _finish(ctx, req, prep, inv, plan, notices, {"image": req.image, "reference": req.reference},
                       {"mask": req.mask, "reference_mask": req.reference_mask}, image_prompt=image_prompt)


def run_paste(ctx: EditContext, req: PasteRequest) -> EditResult:
    b = ctx.bundle
    prep = _Prepared(ctx, req.image)
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
    inv = _inversion(ctx, [prep.work, placed_ref], [req.prompt, req.reference_prompt or req.prompt],
                     req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    m = _grid_mask(paste_px, g_hw).to(b.device)
    region = resize_mask(paste_px, l_hw).to(b.device)
    z_T = inv.latents[-1][:1].to(b.device) * (1 - region) + inv.latents[-1][1:2].to(b.device) * region

    def energies(cur, ref):
        return paste_energies(cur, [f[:1] for f in ref], [f[1:2] for f in ref], m, req.w_edit, req.w_content)

    plan = Plan("paste", z_T, energies, region, region, "splice", splice_masks=(paste_px, paste_px))
    with open_image_prompt(ctx, req, [prep.work, ref_work], notices) as image_prompt:
        return _finish(ctx, req, prep, inv, plan, notices, {"image": req.image, "reference": req.reference},
                       {"reference_mask": req.reference_mask}, image_prompt=image_prompt)


def _params(recipe: dict, cls) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    p = {k: v for k, v in recipe["params"].items() if k in known and k not in ("points",)}
    for k in ("offset",):
        if k in p:
            p[k] = tuple(p[k])
    return p


def _drag_from_recipe(r: dict) -> GuidedDragRequest:
    points = tuple((tuple(h), tuple(t)) for h, t in r["params"]["points"])
    return GuidedDragRequest(image=decode_image(r["image_png"]), points=points, mask=decode_mask(r.get("mask_png")),
                             **_params(r, GuidedDragRequest))


def _move_from_recipe(r: dict) -> MoveRequest:
    return MoveRequest(image=decode_image(r["image_png"]), mask=decode_mask(r["mask_png"]),
                       hole_mask=decode_mask(r.get("hole_mask_png")), **_params(r, MoveRequest))


def _appearance_from_recipe(r: dict) -> AppearanceRequest:
    return AppearanceRequest(image=decode_image(r["image_png"]), mask=decode_mask(r["mask_png"]),
                             reference=decode_image(r["reference_png"]),
                             reference_mask=decode_mask(r["reference_mask_png"]), **_params(r, AppearanceRequest))


def _paste_from_recipe(r: dict) -> PasteRequest:
    return PasteRequest(image=decode_image(r["image_png"]), reference=decode_image(r["reference_png"]),
                        reference_mask=decode_mask(r["reference_mask_png"]), **_params(r, PasteRequest))


register(Task("guided_drag", GuidedDragRequest, run_guided_drag, _drag_from_recipe))
register(Task("move", MoveRequest, run_move, _move_from_recipe))
register(Task("appearance", AppearanceRequest, run_appearance, _appearance_from_recipe))
register(Task("paste", PasteRequest, run_paste, _paste_from_recipe))
