"""DragDiffusion (Shi et al., CVPR 2024): optimise one diffusion latent so handle content moves to targets.

The math lives in small pure functions (patch sampling, motion supervision, point tracking, mask
term); ``optimize_latent`` is the loop of §3.3, ``denoise_with_reference`` the final sampling with
the original branch as attention reference (§3.4).

Positions are ``(x, y)`` floats on the supervision grid (``supervision_grid``: half the working image
resolution for SD-1.5), as
produced by ``editing.geometry.points_to_grid``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from editing import cuda_graphs
from editing.attention import mutual_self_attention
from editing.features import run_for_features
from editing.inversion import Schedule, ddim_step, noise_predictor
from editing.requests import EditCancelled

log = logging.getLogger(__name__)

FEATURE_BLOCK = 2  # up_blocks[2] output: 640 channels at latent resolution for SD-1.5
ARRIVED_CELLS = 2.0  # a handle closer than this (supervision-grid cells) to its target has arrived
GRID_PER_LATENT = 4  # supervision-grid cells per latent cell: 256² for SD-1.5's 64² latents (half of 512²)


def supervision_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the grid the features are resized to and the points live on: 4 cells per latent cell.

    The paper states it as half the image resolution, which for SD-1.5's 8× VAE is 4 cells per latent
    (= feature) cell. What the optimisation depends on is that ratio — one step moves a handle by one
    cell, and r_m, r_p and the arrival distance are in cells — so it is kept for any VAE factor: on a
    4× VAE (the toy model) the grid is the full image resolution, not half of it.
    """
    return latent_hw[0] * GRID_PER_LATENT, latent_hw[1] * GRID_PER_LATENT


def _offsets(r: int, device) -> torch.Tensor:
    """(P, 2) integer (dx, dy) offsets of a (2r+1)² window, row-major."""
    d = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    return torch.stack([dx.flatten(), dy.flatten()], dim=1)


def sample_at(feat: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``feat`` (1, C, H, W) at positions ``xy`` (P, 2) in cell units -> (C, P)."""
    _, _, h, w = feat.shape
    gx = xy[:, 0] / max(w - 1, 1) * 2 - 1
    gy = xy[:, 1] / max(h - 1, 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).view(1, 1, -1, 2).to(feat.dtype)
    return F.grid_sample(feat, grid, mode="bilinear", align_corners=True)[0, :, 0]


def motion_supervision_loss(feat: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, r_m: int) -> torch.Tensor:
    """DragDiffusion eq. 3: Σ_i Σ_{q∈Ω(h_i, r_m)} ‖sg(F_q(ẑ_t)) − F_{q+d_i}(ẑ_t)‖₁, d_i = (g_i − h_i)/‖g_i − h_i‖₂.

    Each patch term is the channel-mean L1 times the patch size, as in the official code.
    Handles that have arrived contribute nothing.
    """
    offs = _offsets(r_m, feat.device)
    loss = feat.new_zeros(())
    for h, g in zip(handles, targets):
        dist = torch.linalg.norm(g - h)
        if dist < ARRIVED_CELLS:
            continue
        d = (g - h) / dist
        ref = sample_at(feat, h + offs).detach()
        moved = sample_at(feat, h + d + offs)
        loss = loss + offs.shape[0] * F.l1_loss(moved.float(), ref.float())
    return loss


@torch.no_grad()
def track_points(feat0: torch.Tensor, feat: torch.Tensor, handles0: torch.Tensor, handles: torch.Tensor, r_p: int) -> torch.Tensor:
    """DragDiffusion eq. 5: h_i ← argmin_{q ∈ Ω(h_i, r_p)} ‖F_q(ẑ_t) − F_{h_i⁰}(z_t)‖₁ (integer cells)."""
    _, _, h, w = feat.shape
    new = handles.clone()
    offs = _offsets(r_p, feat.device)
    for i in range(len(handles)):
        f0 = sample_at(feat0, handles0[i : i + 1])  # (C, 1): the ORIGINAL handle's feature
        cand = handles[i].round() + offs
        cand = cand[(cand[:, 0] >= 0) & (cand[:, 0] <= w - 1) & (cand[:, 1] >= 0) & (cand[:, 1] <= h - 1)]
        cells = feat[0, :, cand[:, 1].long(), cand[:, 0].long()]  # (C, P)
        new[i] = cand[(cells.float() - f0.float()).abs().sum(0).argmin()]
    return new


def mask_term(x_prev: torch.Tensor, x_prev_ref: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """λ · Σ |(ẑ_{t−1} − z_{t−1}) ⊙ (1 − M)|  (DragDiffusion eq. 4); ``keep`` = 1 − M on the latent grid."""
    return lam * ((x_prev - x_prev_ref) * keep).abs().sum()


def all_arrived(handles: torch.Tensor, targets: torch.Tensor) -> bool:
    return bool((torch.linalg.norm(handles - targets, dim=1) < ARRIVED_CELLS).all())


@dataclass
class DragOutcome:
    latent: torch.Tensor  # optimised z_t, (1, 4, h, w) fp32
    handles: torch.Tensor  # tracked handles on the supervision grid, (N, 2)
    steps: int  # optimisation steps taken
    arrived: bool
    losses: list[float] = field(default_factory=list)


def _features(unet, z, t, cond, grid_hw, need_output):
    eps, feats = run_for_features(unet, z, t, cond, (FEATURE_BLOCK,), need_output=need_output)
    feat = F.interpolate(feats[FEATURE_BLOCK].float(), size=grid_hw, mode="bilinear", align_corners=False)
    return eps, feat


def optimize_latent(
    unet,
    z_t: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    schedule: Schedule,
    handles: torch.Tensor,
    targets: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    keep: torch.Tensor | None = None,
    lr: float = 0.01,
    max_steps: int = 80,
    r_m: int = 1,
    r_p: int = 3,
    lam: float = 0.1,
    progress: Callable[[float, str], None] | None = None,
    cancel=None,
    use_graphs: bool | None = None,
) -> DragOutcome:
    """Motion supervision + point tracking on z_t (§3.3); stops as soon as every handle has arrived.

    ``keep`` is (1, 1, h, w) on the latent grid, 1 where the image must stay (outside the user's mask).
    Without a mask the UNet pass stops after ``up_blocks[2]``: the last block never runs.
    """
    device = z_t.device
    use_amp = device.type == "cuda" and next(unet.parameters()).dtype != torch.float32
    amp_dtype = next(unet.parameters()).dtype
    a_t, a_prev = schedule.alpha(t), schedule.alpha(t - schedule.stride)
    need_output = keep is not None
    handles0 = handles.clone().to(device)
    handles, targets = handles.clone().to(device), targets.to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
        eps0, feat0 = _features(unet, z_t, t, cond, grid_hw, need_output)
        x_prev_ref = ddim_step(z_t, eps0.float(), a_t, a_prev) if need_output else None
    z = z_t.detach().clone().float().requires_grad_(True)

    t_dev = torch.tensor(t, device=device)  # a device tensor: graph capture cannot copy a Python int in

    def forward(z):  # (1, 4, h, w) -> features (and ε when the mask term needs it)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp, cache_enabled=False):
            eps, feat = _features(unet, z, t_dev, cond, grid_hw, need_output)
        return (feat, eps.float()) if need_output else (feat,)

    if use_graphs is None:
        use_graphs = cuda_graphs.enabled(device)
    forward = cuda_graphs.graphed(forward, (z.detach().clone().requires_grad_(True),), unet=unet, use=use_graphs)
    opt = torch.optim.Adam([z], lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    losses: list[float] = []
    step = 0
    for step in range(max_steps):
        if cancel is not None and cancel.is_set():
            raise EditCancelled("Cancelled during drag optimisation.")
        feat, *rest = forward(z)
        eps = rest[0] if rest else None
        if step > 0:
            handles = track_points(feat0, feat, handles0, handles, r_p)
        if all_arrived(handles, targets):
            break
        loss = motion_supervision_loss(feat, handles, targets, r_m)
        if need_output:
            loss = loss + mask_term(ddim_step(z, eps.float(), a_t, a_prev), x_prev_ref, keep, lam)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach().item())
        if progress:
            dist = torch.linalg.norm(handles - targets, dim=1).max().item()
            progress((step + 1) / max_steps, f"step {step + 1}: loss {losses[-1]:.3f}, farthest handle {dist:.1f} cells away")
    else:
        step = max_steps
    arrived = all_arrived(handles, targets)
    log.info("drag optimisation: %d steps, arrived=%s", step, arrived)
    return DragOutcome(z.detach(), handles.detach().cpu(), step, arrived, losses)


@torch.no_grad()
def denoise_with_reference(
    unet,
    z_orig: torch.Tensor,
    z_edit: torch.Tensor,
    cond: torch.Tensor,
    schedule: Schedule,
    start: int,
    *,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    progress: Callable[[float], None] | None = None,
    cancel=None,
) -> torch.Tensor:
    """Denoise ``[original, edited]`` together; the edited branch's self-attention in up_blocks[2..3]
    reads the original branch's keys/values (§3.4). Returns the edited z₀ (1, 4, h, w)."""
    cfg = guidance_scale > 1.0 and uncond is not None
    x = torch.cat([z_orig, z_edit]).float()
    conds = torch.cat([uncond.expand(2, -1, -1), cond.expand(2, -1, -1)]) if cfg else cond.expand(2, -1, -1)
    ts = schedule.timesteps[start:]
    with mutual_self_attention(unet):
        eps_fn = noise_predictor(unet, conds, (conds.shape[0], *x.shape[1:]), x.device)
        for i, t in enumerate(ts):
            if cancel is not None and cancel.is_set():
                raise EditCancelled("Cancelled while denoising.")
            inp = torch.cat([x, x]) if cfg else x  # groups of [orig, edit] per CFG branch
            eps = eps_fn(inp, t)
            if cfg:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            x = ddim_step(x, eps, schedule.alpha(t), schedule.alpha(t - schedule.stride))
            if progress:
                progress((i + 1) / len(ts))
    return x[1:2]
