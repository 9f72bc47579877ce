"""Region drag (RegionDrag, Lu et al., ECCV 2024): handle regions are copied onto target regions in latent space.

1. Regions: painted handle/target region pairs, or discs of ``radius`` around handle/target points (radius 0 with
   a mask: the mask is split between the handles, each pixel to its nearest handle, and each part moves by its
   handle's drag; without a mask: discs of 1/8 of the short side).
2. Dense correspondences on the latent grid (``correspondences``): every target-region cell takes the handle-region
   cell at the same relative position of the handle region's bounding box (the target region scaled onto it); for
   regions made from points, the cell the drag came from (a translation, which the frame may clip but never squash).
3. DDIM inversion to ``start_t`` of an ``n_steps`` schedule, caching every latent and the self-attention inputs of
   every layer and step (K = W_k·h, V = W_v·h); cached per image and settings, shared with nothing else.
4. Denoising from the inverted z_t, the vacated handle cells refilled by BNNI and noised (``noise_scale``): before each step, while the
   step's timestep t ≥ ``end_t`` × 1000, the cached handle latents at t are copied into the target cells; outside
   the edit mask the cached latents at t are used; the cached K/V are pasted into every self-attention layer at
   every step, the handle tokens' K/V also at the target tokens (bank mode ``remap``). The original pixels are
   kept outside the mask (as the official post-processing does).

No gradients, no LoRA: ``2 × start_t × n_steps`` UNet passes for a new picture (20 by default), half for a repeat.
Differences from the official code: deterministic DDIM inversion instead of its cycle-SDE; ``end_t`` compares the
timestep with ``end_t × 1000`` (the official compares it with ``end_t × steps``, so it copies at every step).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image

from editing.attention import self_attn_names
from editing.checks import check_fields, check_image, field_table, normalize_mask, num
from editing.context import EditContext
from editing.drag import warp as drag_warp
from editing.drag.common import (
    MAX_POINT_PAIRS,
    PointPair,
    check_drag,
    check_prompt,
    latent_region,
    paste_outside,
    points_from_json,
    points_json,
)
from editing.geometry import mask_at
from editing.images import tensor_to_pil
from editing.kv_bank import AtStep, BankControl, Remap, bank_attention, invert_and_record, while_recorded
from editing.runtime import EditResult, Task, decode_image, decode_mask, register
from editing.sampling import Hook, Inversion, NoisePredictor, StepState, denoise
from models.errors import EditError

KV_PREFIXES = ("down_blocks", "mid_block", "up_blocks")  # the official pastes K/V in every attn1 layer
DEFAULT_DISC_FRACTION = 1 / 8  # no mask, radius 0: discs of this × the short side
MASK_DILATION_FRACTION = 1 / 32  # no mask: the edit area is the regions dilated by this × the short side
TRAIN_STEPS = 1000  # end_t is a fraction of the training timesteps


@dataclass(frozen=True)
class RegionDragRequest:
    """One region drag: ``handle_regions[k]`` moves onto ``target_regions[k]`` (H×W bool masks), or, with
    ``points``, discs of ``radius`` around each handle move onto discs around its target."""

    image: Image.Image
    handle_regions: tuple = ()
    target_regions: tuple = ()
    points: tuple[PointPair, ...] = ()
    mask: np.ndarray | None = None  # H×W bool, True = may change (None: the regions, dilated)
    prompt: str = ""
    radius: float = num(0.0, 0.0, 4096.0, "disc radius (pixels) around each point; 0 = the mask split between the "
                        "handles, or 1/8 of the short side without a mask")
    n_steps: int = num(20, 2, 200, "DDIM steps of the schedule (RegionDrag: 20)")
    start_t: float = num(0.5, 0.05, 1.0, "share of the schedule that is inverted (0.5 of 20 = 10 steps up, 10 down)")
    end_t: float = num(0.2, 0.0, 1.0, "handle latents are copied into the targets while t ≥ end_t × 1000")
    noise_scale: float = num(1.0, 0.0, 1.0, "noise mixed into the vacated handle cells (1 = pure noise)")
    guidance_scale: float = num(1.0, 1.0, 20.0, "classifier-free guidance while denoising (1 = none, as RegionDrag)")
    seed: int = num(42, 0, 2**31 - 1, "random seed (the handle cells' noise)")
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        def set_(k, v):
            object.__setattr__(self, k, v)

        check_prompt(self.prompt)
        hr, tr = tuple(self.handle_regions or ()), tuple(self.target_regions or ())
        pts = tuple(self.points or ())
        if pts and (hr or tr):
            raise EditError("Give either handle/target regions or points, not both.")
        if not pts and not hr and not tr:
            raise EditError("No regions: paint a handle region and its target region, or give points with a radius.")
        if pts:  # the drag checks: pairs, pins, outside the image, too many, the mask
            img, points, mask, notices = check_drag(self.image, pts, self.mask)
            set_("points", points)
        else:
            img = check_image(self.image, "image")
            mask, notices = normalize_mask(self.mask, img.size)
            if len(hr) != len(tr):
                raise EditError(f"{len(hr)} handle regions but {len(tr)} target regions: every handle region needs "
                                "exactly one target region.")
            if len(hr) > MAX_POINT_PAIRS:
                raise EditError(f"{len(hr)} region pairs; at most {MAX_POINT_PAIRS} are supported.")
            set_("handle_regions", tuple(_region(m, img.size, f"Handle region {i}") for i, m in enumerate(hr, 1)))
            set_("target_regions", tuple(_region(m, img.size, f"Target region {i}") for i, m in enumerate(tr, 1)))
            set_("points", ())
        set_("image", img)
        set_("mask", mask)
        set_("notices", tuple(self.notices) + tuple(notices))
        check_fields(self, REGION_FIELDS)
        if round(self.start_t * self.n_steps) < 1:
            raise EditError("start_t × n_steps must be at least 1 step.")
        if self.end_t >= self.start_t:
            raise EditError(f"end_t ({self.end_t:g}) must be below start_t ({self.start_t:g}): the copy runs from "
                            "start_t down to end_t.")
        if self.mask is not None:
            filled = drag_warp.fill_holes(self.mask)
            if self.points:
                drag_warp.check_handles_in_mask(self.mask, self.points)
            for i, h in enumerate(self.handle_regions, 1):
                if not (h & filled).any():
                    raise EditError(f"Handle region {i} lies outside the mask: paint the mask over it, or clear the mask.")

    def pairs(self) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float] | None]]:
        """(handle region, target region, offset) in image pixels: painted regions (offset None: the target is
        scaled onto the handle's box), or regions from the points with their drag (dx, dy): a translation."""
        if self.handle_regions:
            return [(h, t, None) for h, t in zip(self.handle_regions, self.target_regions)]
        return [(h, t, (bx - ax, by - ay)) for (h, t), ((ax, ay), (bx, by))
                in zip(point_regions(self.image.size, self.points, self.radius, self.mask), self.points)]

    def replace(self, **changes) -> RegionDragRequest:
        return dataclasses.replace(self, notices=(), **changes)

    def params(self) -> dict:
        skip = {"image", "mask", "handle_regions", "target_regions", "notices"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["points"] = points_json(self.points)
        out["n_regions"] = len(self.handle_regions)
        return out


REGION_FIELDS = field_table(RegionDragRequest)  # name -> (min, max, default, why): UI sliders and CLI flags


def _region(m, size, what: str) -> np.ndarray:
    if m is None:
        raise EditError(f"{what} is missing: paint it.")
    out, _ = normalize_mask(m, size)
    if out is None:
        raise EditError(f"{what} is empty: paint it, or remove the pair.")
    return out


# ---- regions and correspondences ------------------------------------------------------------------------------
def disc(size: tuple[int, int], centre, r: float) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= r * r


def shift_mask(m: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``m`` translated by (dx, dy) pixels (rounded); what leaves the frame is dropped."""
    h, w = m.shape
    ix, iy = int(round(dx)), int(round(dy))
    out = np.zeros_like(m)
    ys, xs = np.nonzero(m)
    ok = (xs + ix >= 0) & (xs + ix < w) & (ys + iy >= 0) & (ys + iy < h)
    out[ys[ok] + iy, xs[ok] + ix] = True
    return out


def point_regions(size, points, radius: float, mask: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Handle/target regions from points: discs of ``radius``; radius 0 with a mask: the mask (holes filled) split
    between the handles by nearest handle, each part and its copy shifted by the handle's drag; radius 0 without
    a mask: discs of 1/8 of the short side."""
    w, h = size
    if radius <= 0 and mask is not None:
        filled = drag_warp.fill_holes(mask)
        yy, xx = np.mgrid[0:h, 0:w]
        d = np.stack([(xx - hx) ** 2 + (yy - hy) ** 2 for (hx, hy), _ in points])
        owner = d.argmin(axis=0)
        out = []
        for k, ((hx, hy), (tx, ty)) in enumerate(points):
            part = filled & (owner == k)
            out.append((part, shift_mask(part, tx - hx, ty - hy)))
        return out
    r = radius if radius > 0 else min(w, h) * DEFAULT_DISC_FRACTION
    return [(disc(size, a, r), disc(size, b, r)) for a, b in points]


def _bbox(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(cells)
    return np.array([xs.min(), ys.min()], np.float64), np.array([xs.max() + 1, ys.max() + 1], np.float64)


def correspondences(handle: np.ndarray, target: np.ndarray,
                    offset: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense cell pairs (source, destination), each (M, 2) integer (x, y), for bool grids ``handle`` and ``target``:
    a target cell at relative position u = (p + ½ − t₀)/(t₁ − t₀) of the target's bounding box [t₀, t₁) takes the
    handle cell at h₀ + u·(h₁ − h₀) − ½ (rounded, clipped to the grid) — the target scaled onto the handle's box.

    With ``offset`` (dx, dy) in cells (regions made from points: the target is the handle moved by the drag), a
    target cell p takes the handle cell p − offset (rounded), where that lies in the handle region: a translation.
    Scaling the boxes there would squash the content wherever the frame clips the moved region."""
    if not handle.any() or not target.any():
        return np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64)
    if offset is not None:
        ys, xs = np.nonzero(target)
        dst = np.stack([xs, ys], axis=1).astype(np.int64)
        src = dst - np.rint(np.asarray(offset, np.float64)).astype(np.int64)
        h, w = handle.shape
        ok = (src[:, 0] >= 0) & (src[:, 0] < w) & (src[:, 1] >= 0) & (src[:, 1] < h)
        src, dst = src[ok], dst[ok]
        ok = handle[src[:, 1], src[:, 0]]
        return src[ok], dst[ok]
    h0, h1 = _bbox(handle)
    t0, t1 = _bbox(target)
    ys, xs = np.nonzero(target)
    dst = np.stack([xs, ys], axis=1)
    u = (dst + 0.5 - t0) / (t1 - t0)
    src = np.rint(h0 + u * (h1 - h0) - 0.5).astype(np.int64)
    src[:, 0] = np.clip(src[:, 0], 0, handle.shape[1] - 1)
    src[:, 1] = np.clip(src[:, 1], 0, handle.shape[0] - 1)
    return src, dst.astype(np.int64)


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    if r <= 0:
        return mask
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0


def vacate(z: torch.Tensor, src: np.ndarray, dst: np.ndarray, noise_scale: float, seed: int) -> torch.Tensor:
    """The handle cells that no target covers, refilled before denoising: first by bilateral nearest-neighbour
    interpolation from the cells around them (``drag_warp.bnni_fill``: what lies around the moved content is the
    best guess of what was behind it), then mixed with noise, x ← √(1 − s²)·x + s·ε (RegionDrag's "blur")."""
    h, w = z.shape[-2:]
    vac = np.zeros((h, w), bool)
    vac[src[:, 1], src[:, 0]] = True
    vac[dst[:, 1], dst[:, 0]] = False
    if not vac.any():
        return z.clone()
    arr = z[0].float().cpu().numpy().transpose(1, 2, 0)
    filled = torch.from_numpy(drag_warp.bnni_fill(arr, ~vac).transpose(2, 0, 1).copy())[None].to(z.device)
    if noise_scale > 0:
        gen = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(z.shape, generator=gen).to(z.device)
        filled = filled * math.sqrt(max(0.0, 1 - noise_scale**2)) + noise * noise_scale
    m = torch.from_numpy(vac)[None, None].to(z.device)
    return torch.where(m, filled, z.float())


# ---- hooks ------------------------------------------------------------------------------------------------------
class CopyRegions(Hook):
    """Before each step: while t ≥ ``t_end`` the cached handle latents at t go into the target cells; outside the
    edit mask the cached latents at t replace the current ones (RegionDrag's backward pass)."""

    def __init__(self, inv: Inversion, src: np.ndarray, dst: np.ndarray, edit: torch.Tensor, t_end: float):
        self.inv, self.edit, self.t_end = inv, edit, t_end
        self.src = (torch.from_numpy(src[:, 1]), torch.from_numpy(src[:, 0]))
        self.dst = (torch.from_numpy(dst[:, 1]), torch.from_numpy(dst[:, 0]))

    def before_unet(self, s: StepState) -> None:
        if s.stage != "step":
            return
        ref = self.inv.at(s.index).to(s.x.device)
        x = s.x.clone()
        if s.t >= self.t_end and self.src[0].numel():
            x[:, :, self.dst[0], self.dst[1]] = ref[:, :, self.src[0], self.src[1]]
        s.x = torch.where(self.edit > 0.5, x, ref)


# ---- the task ---------------------------------------------------------------------------------------------------
def run_region(ctx: EditContext, req: RegionDragRequest) -> EditResult:
    """Region drag: cached inversion + K/V of every layer → handle latents copied to targets → denoise → decode."""
    b, run = ctx.bundle, ctx.run
    work, (image, mask, _), notices = ctx.fit(req.image, req.mask, req.points)
    notices = list(req.notices) + notices
    sx, sy = image.width / req.image.width, image.height / req.image.height
    pairs = [(mask_at(hm, image.size), mask_at(tm, image.size), None if off is None else (off[0] * sx, off[1] * sy))
             for hm, tm, off in req.pairs()]
    if mask is None:
        union = np.zeros((image.height, image.width), bool)
        for hm, tm, _ in pairs:
            union |= hm | tm
        edit_px = dilate(union, max(1, round(min(image.size) * MASK_DILATION_FRACTION)))
        notices.append("No mask was painted, so the regions (slightly enlarged) are what may change.")
    else:
        edit_px = drag_warp.fill_holes(mask)
    layers = self_attn_names(b.unet, KV_PREFIXES)
    inv = invert_and_record(ctx, [work], [req.prompt], req.n_steps, strength=req.start_t, layers=layers, cache="region")
    z_t = inv.z_t.to(b.device)
    lat_hw = tuple(z_t.shape[-2:])
    edit = latent_region(edit_px, lat_hw)
    srcs, dsts = [], []
    for hm, tm, off in pairs:
        cells = None if off is None else (off[0] * lat_hw[1] / image.width, off[1] * lat_hw[0] / image.height)
        s, d = correspondences(latent_region(hm, lat_hw), latent_region(tm, lat_hw), cells)
        inside = edit[d[:, 1], d[:, 0]]  # targets outside the mask are dropped, after the scaling (not before)
        srcs.append(s[inside])
        dsts.append(d[inside])
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    if dst.size == 0:
        raise EditError("Every target region lies outside the mask: paint the mask over where the content should go.")
    _, first = np.unique(dst[:, 1] * lat_hw[1] + dst[:, 0], return_index=True)  # one source per target cell
    src, dst = src[first], dst[first]
    x = vacate(z_t, src, dst, req.noise_scale, req.seed)
    edit_t = torch.from_numpy(edit.astype(np.float32))[None, None].to(b.device)
    # the inversion's K/V in every layer, the handle tokens' also at the target tokens
    control = BankControl(inv.bank, Remap(src, dst, lat_hw))
    hooks = [AtStep(control, while_recorded(control)), CopyRegions(inv, src, dst, edit_t, req.end_t * TRAIN_STEPS)]
    cfg = req.guidance_scale > 1.0
    with run.step("denoise"), bank_attention(b.unet, control, layers):
        predict = NoisePredictor(b.unet, b.encode_prompt(req.prompt), 1, uncond=b.encode_prompt("") if cfg else None,
                                 guidance_scale=req.guidance_scale, device=b.device, graphs=False)
        z0 = denoise(predict, x, inv.schedule, inv.start, hooks=hooks, run=run)
    result = tensor_to_pil(ctx.decode(z0)).resize(image.size, Image.LANCZOS)
    result = paste_outside(result, image, edit_px)
    masks = {"mask": req.mask}
    for i, (hm, tm) in enumerate(zip(req.handle_regions, req.target_regions)):
        masks[f"handle_region_{i}"], masks[f"target_region_{i}"] = hm, tm
    recipe = ctx.recipe("region", req.params(), images={"image": req.image}, masks=masks)
    extra = {"memory_bank_mb": round(inv.bank.nbytes / 2**20, 2), "copied_cells": int(len(dst)),
             "inversion_steps": len(inv.schedule.timesteps) - inv.start}
    final = [tuple(t) for _, t in req.points]
    return EditResult(result, recipe, run.timings, run.nfe, notices, final, extra=extra)


def region_from_recipe(recipe: dict) -> RegionDragRequest:
    params = dict(recipe["params"])
    points = points_from_json(params.pop("points", []))
    n = int(params.pop("n_regions", 0))
    hr = tuple(decode_mask(recipe[f"handle_region_{i}_png"]) for i in range(n))
    tr = tuple(decode_mask(recipe[f"target_region_{i}_png"]) for i in range(n))
    known = {f.name for f in dataclasses.fields(RegionDragRequest)} - {"image", "mask", "points", "handle_regions",
                                                                      "target_regions", "notices"}
    return RegionDragRequest(decode_image(recipe["image_png"]), hr, tr, points, decode_mask(recipe.get("mask_png")),
                             **{k: v for k, v in params.items() if k in known})


register(Task("region", RegionDragRequest, run=run_region, from_recipe=region_from_recipe))
