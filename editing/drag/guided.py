"""Drag with DiffEditor (Mou et al., CVPR 2024) or DragonDiffusion (Mou et al., ICLR 2024): no LoRA, no
optimisation of the latent; the drag is gradient guidance while sampling (editing/guidance/).

The inverted z_T gets each handle's 3×3 latent patch copied to its target; the memory bank is read by
concatenation (visual cross-attention); the edit energy pulls the features at the targets toward the original
features at the handles and the content energy keeps the rest (``editing.guidance.energies.drag_energies``), on a
grid of 2 cells per latent cell. ``method`` picks the published schedule of either paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from editing.context import EditContext
from editing.drag.common import PointPair, check_drag, points_from_json, points_json
from editing.geometry import points_to_grid, resize_mask
from editing.guidance.energies import drag_energies
from editing.guidance.image_prompt import open_image_prompt
from editing.guidance.sampler import Plan
from editing.guidance.tasks import Prepared, finish, grid_mask, inversion, recipe_params
from editing.kv_bank import Concat
from editing.requests import GuidedParams
from editing.runtime import EditResult, Task, decode_image, decode_mask, register


@dataclass(frozen=True)
class GuidedDragRequest(GuidedParams):
    """Drag with DiffEditor / DragonDiffusion: no LoRA; feature-correspondence gradient guidance."""

    image: Image.Image
    points: tuple[PointPair, ...]
    mask: np.ndarray | None = None

    TASK = "guided_drag"

    def __post_init__(self):
        img, points, mask, notices = check_drag(self.image, self.points, self.mask)
        for k, v in (("image", img), ("points", points), ("mask", mask), ("notices", tuple(self.notices) + notices)):
            self._set(k, v)
        self._validate_common()


def cells_around(p: torch.Tensor, hw) -> torch.Tensor:
    """Flat indices of the 3×3 cells around grid point ``p`` = (x, y), clipped inside the grid."""
    h, w = hw
    cx = int(np.clip(round(float(p[0])), 1, w - 2))
    cy = int(np.clip(round(float(p[1])), 1, h - 2))
    ys, xs = torch.meshgrid(torch.arange(cy - 1, cy + 2), torch.arange(cx - 1, cx + 2), indexing="ij")
    return (ys * w + xs).flatten()


def default_drag_mask(size, points) -> tuple[np.ndarray, str]:
    """Without a painted mask: discs around each handle, target and their midpoint may change."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    for (hx, hy), (tx, ty) in points:
        r = max(0.12 * max(w, h), 0.6 * np.hypot(tx - hx, ty - hy))
        for cx, cy in ((hx, hy), (tx, ty), ((hx + tx) / 2, (hy + ty) / 2)):
            mask |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    return mask, "No mask was painted, so the area around the points may change."


def run_guided_drag(ctx: EditContext, req: GuidedDragRequest) -> EditResult:
    b = ctx.bundle
    prep = Prepared(ctx, req.image)
    notices = list(req.notices) + prep.notices
    points = [(prep.px(h), prep.px(t)) for h, t in req.points]
    mask = prep.mask(req.mask)
    if mask is None:
        mask, note = default_drag_mask(prep.work.size, points)
        notices.append(note)
    inv = inversion(ctx, [prep.work], [req.prompt], req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    gh = points_to_grid([h for h, _ in points], prep.work.size, g_hw)
    gt = points_to_grid([t for _, t in points], prep.work.size, g_hw)
    handle_cells = [cells_around(p, g_hw) for p in gh]
    target_cells = [cells_around(p, g_hw) for p in gt]
    outside = ~grid_mask(mask, g_hw).to(b.device)
    # z_T: the latent patch at each handle is copied to its target (3×3 latent cells).
    z_T = inv.latents[-1][:1].clone().to(b.device)
    lh = points_to_grid([h for h, _ in points], prep.work.size, l_hw)
    lt = points_to_grid([t for _, t in points], prep.work.size, l_hw)
    for ph, pt in zip(lh, lt):
        src, dst = cells_around(ph, l_hw), cells_around(pt, l_hw)
        flat = z_T.flatten(2)
        flat[:, :, dst] = flat[:, :, src].clone()
    region = resize_mask(mask, l_hw).to(b.device)

    def energies(cur, ref):
        return drag_energies(cur, ref, [c.to(b.device) for c in handle_cells], [c.to(b.device) for c in target_cells],
                             outside, req.w_edit, req.w_content, req.w_inpaint)

    plan = Plan("guided_drag", z_T, energies, region, region, Concat())
    ip = open_image_prompt(ctx, req, [prep.work], notices)
    with ip as image_prompt:
        res = finish(ctx, req, prep, inv, plan, notices, {"image": req.image}, {"mask": req.mask},
                      image_prompt=image_prompt)
    res.recipe["params"]["points"] = points_json(req.points)
    return res


def guided_drag_from_recipe(r: dict) -> GuidedDragRequest:
    return GuidedDragRequest(image=decode_image(r["image_png"]), points=points_from_json(r["params"]["points"]),
                             mask=decode_mask(r.get("mask_png")), **recipe_params(r, GuidedDragRequest))


register(Task("guided_drag", GuidedDragRequest, run_guided_drag, guided_drag_from_recipe))
