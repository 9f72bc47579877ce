"""DragDiffusion (Shi et al., CVPR 2024): optimise one diffusion latent so handle content moves to targets;
with GoodDrag's practices (Zhang et al., ICLR 2025) as options.

The math lives in small pure functions (patch sampling, drag direction, motion supervision, point tracking,
mask term, the drag timesteps); ``optimize_latent`` is the loop of §3.3 at one timestep; ``editing.drag.reference``
holds ``reference_branch`` (the original branch denoised once, its latents and its mutual-attention K/V source
kept in a memory bank) and ``denoise_with_reference`` (the final sampling of the edited branch reading that
bank, §3.4); ``run_drag`` is the task: identity LoRA (§3.2) → DDIM inversion → reference
branch → optimisation → denoise → decode. A generated image's own trajectory replaces the LoRA and the
inversion.

GoodDrag (request fields; ``GOODDRAG`` holds the published values, the ``gooddrag`` method's preset): alternating drag and
denoising — the optimisation is spread over ``drag_timesteps`` timesteps with one denoising step of the
edited latent between two, each timestep's supervision against the reference branch's latent there — and
information-preserving motion supervision (``preserve_handle``: the target of each patch is the ORIGINAL
handle's features, not the current ones), with GoodDrag's step length ``drag_step``, tracking every
``steps_per_track`` steps and the early stop ``patience``. The defaults are plain DragDiffusion.

Repeat drags: the reference branch depends only on z_t, the prompt, CFG and the LoRAs, never on the points,
so it is cached (``ctx.caches.task("drag_reference")``) and a repeat runs only the optimisation and the
edited branch. Both branches always run as separate UNet calls, so the pixels are the same whether or not
the cache held them (a batch of two is not bit-identical to two batches of one on CPU or GPU).

Positions are ``(x, y)`` floats on the supervision grid (``supervision_grid``: half the working image
resolution for SD-1.5), as produced by ``editing.geometry.points_to_grid``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from editing import cuda_graphs
from editing.checks import check_fields, check_image, check_text, field_table, num
from editing.context import EditContext
from editing.drag.common import PointPair, check_drag, check_prompt, points_from_json, points_json
from editing.drag.reference import Reference, denoise_one_step, denoise_with_reference, reference_branch
from editing.features import run_for_features
from editing.geometry import grid_to_points, points_to_grid, resize_mask
from editing.images import image_hash, tensor_to_pil
from editing.lora import lora_adapter, train_identity_lora
from editing.previews import sample_previews
from editing.runtime import EditResult, Task, decode_image, decode_mask, register
from editing.sampling import NoisePredictor, Schedule, ddim_step, invert, unet_dtype
from models import families
from models.errors import EditError

log = logging.getLogger(__name__)


# ---- the request ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DragRequest:
    """One drag edit. Validates on construction; raises EditError with an actionable message."""

    image: Image.Image
    points: tuple[PointPair, ...]
    mask: np.ndarray | None = None
    prompt: str = ""
    lora_steps: int = num(80, 0, 400, "identity-LoRA fine-tuning steps (0 = skip); keeps the object's identity")
    lora_rank: int = num(16, 1, 128, "rank of the identity LoRA")
    lora_lr: float = num(5e-4, 1e-5, 1e-2, "identity-LoRA learning rate (AdamW)")
    inversion_strength: float = num(0.7, 0.05, 1.0, "how far back the image is inverted; 0.7 -> edit at t=681 of 50 DDIM steps")
    n_inference_steps: int = num(50, 2, 200, "DDIM steps of the full schedule")
    latent_lr: float = num(0.01, 1e-4, 0.1, "Adam learning rate of the latent optimisation")
    max_steps: int = num(80, 1, 400, "maximum motion-supervision steps per drag timestep (stops early when handles arrive)")
    r_m: int = num(1, 1, 8, "motion-supervision patch radius (feature cells)")
    r_p: int = num(3, 1, 16, "point-tracking search radius (feature cells)")
    lam: float = num(0.1, 0.0, 10.0, "weight of the keep-unmasked-area term")
    guidance_scale: float = num(1.0, 1.0, 20.0, "classifier-free guidance while denoising (1 = none, as for real images)")
    seed: int = num(42, 0, 2**31 - 1, "random seed (LoRA crops/noise)")
    # GoodDrag (Zhang et al., ICLR 2025); the defaults are DragDiffusion's, GOODDRAG holds the published values.
    drag_timesteps: int = num(1, 1, 50, "timesteps the drag is spread over, one denoising step between them "
                                        "(GoodDrag's alternating drag and denoising); 1 = all at one timestep")
    steps_per_track: int = num(1, 1, 20, "motion-supervision steps between point-tracking updates")
    drag_step: float = num(1.0, 0.5, 8.0, "how far (supervision-grid cells) one motion-supervision step pulls a "
                                          "handle: min(this, distance left) along the handle→target direction")
    preserve_handle: int = num(0, 0, 1, "1 = information-preserving supervision: pull toward the ORIGINAL "
                                        "handle's features, so content does not drift (GoodDrag)")
    patience: int = num(0, 0, 50, "stop dragging after this many point-tracking updates in a row move no "
                                  "handle (0 = never)")
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        img, points, mask, notices = check_drag(self.image, self.points, self.mask)
        check_fields(self, DRAG_FIELDS)
        if round(self.inversion_strength * self.n_inference_steps) < 1:
            raise EditError("inversion_strength × n_inference_steps must be at least 1 step.")
        check_prompt(self.prompt)
        for k, v in (("image", img), ("points", points), ("mask", mask), ("notices", tuple(self.notices) + notices)):
            object.__setattr__(self, k, v)

    def replace(self, **changes) -> DragRequest:
        return dataclasses.replace(self, notices=(), **changes)

    def params(self) -> dict:
        """The JSON-serialisable part (everything but pixels)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image", "mask", "notices")}
        out["points"] = points_json(self.points)
        return out


DRAG_FIELDS = field_table(DragRequest)  # name -> (min, max, default, why): the UI sliders and CLI flags
# GoodDrag's published defaults as DragRequest overrides (method "gooddrag" in the CLI/UI/benchmarks). Source: the
# official code (zewei-Zhang/GoodDrag, bench_gooddrag.py, the script behind the paper's numbers): inversion 0.75 of
# 50 DDIM steps, LoRA 70 steps (lr 5e-4, rank 16 as ours), latent lr 0.02, λ 0.1, r1 = 4, r2 = 12, d = 4,
# drag_end_step 7 timesteps × track_per_step 10 × max_drag_per_track 3 = 30 supervision steps per timestep,
# max_track_no_change 5. Radii and d are in supervision-grid cells, which are 4 per latent cell as in the official
# half-resolution grid for SD-1.5; our 50-step schedule is theirs, so the timestep counts carry over unchanged.
GOODDRAG = dict(inversion_strength=0.75, lora_steps=70, latent_lr=0.02, lam=0.1, r_m=4, r_p=12, drag_step=4.0,
                drag_timesteps=7, steps_per_track=3, max_steps=30, patience=5, preserve_handle=1)
LORA_FIELDS = ("lora_steps", "lora_rank", "lora_lr", "seed")


@dataclass(frozen=True)
class IdentityLoraRequest:
    """Train a drag's identity LoRA ahead of the drag; the fields mean what they mean in ``DragRequest``
    (``None`` = its default)."""

    image: Image.Image
    prompt: str = ""
    lora_steps: int | None = None
    lora_rank: int | None = None
    lora_lr: float | None = None
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "image", check_image(self.image, "image"))
        object.__setattr__(self, "prompt", check_text(self.prompt, "prompt"))
        table = {k: DRAG_FIELDS[k] for k in LORA_FIELDS}
        check_fields(self, table, {k: spec.default for k, spec in table.items()})



ARRIVED_CELLS = 2.0  # a handle closer than this (supervision-grid cells) to its target has arrived
SUPERVISION_CELLS_PER_LATENT = 4  # supervision-grid cells per latent cell: 256² for SD-1.5's 64² latents (half of 512²)


def supervision_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the grid the features are resized to and the points live on: 4 cells per latent cell.

    The paper states it as half the image resolution, which for SD-1.5's 8× VAE is 4 cells per latent
    (= feature) cell. What the optimisation depends on is that ratio — one step moves a handle by one
    cell, and r_m, r_p and the arrival distance are in cells — so it is kept for any VAE factor: on a
    4× VAE (the toy model) the grid is the full image resolution, not half of it.
    """
    return latent_hw[0] * SUPERVISION_CELLS_PER_LATENT, latent_hw[1] * SUPERVISION_CELLS_PER_LATENT


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


def drag_direction(h: torch.Tensor, g: torch.Tensor, step: float) -> torch.Tensor:
    """d_i = (g_i − h_i) / ‖g_i − h_i‖₂ · min(β, ‖g_i − h_i‖₂): how far one supervision step pulls handle i.

    DragDiffusion eq. 3 uses the unit direction (β = 1: a handle that is supervised is ≥ ``ARRIVED_CELLS`` away,
    so the min is 1); GoodDrag's official code uses β = d = 4 cells, never overshooting the target.
    """
    dist = torch.linalg.norm(g - h)
    return (g - h) / dist * min(float(step), float(dist))


def motion_supervision_loss(feat: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, r_m: int, *,
                            step: float = 1.0, feat0: torch.Tensor | None = None,
                            handles0: torch.Tensor | None = None) -> torch.Tensor:
    """Motion supervision on the features ``feat`` of the latent being optimised.

    DragDiffusion eq. 3 (``feat0`` None): Σ_i Σ_{q∈Ω(h_i, r_m)} ‖sg(F_q(ẑ_t)) − F_{q+d_i}(ẑ_t)‖₁ — each patch is
    pulled toward the *current* features at the tracked handle, so whatever the patch has become drifts along.

    GoodDrag's information-preserving motion supervision (``feat0`` = F(z_t), the ORIGINAL image's features at
    this timestep, ``handles0`` = h_i⁰ the original handles): Σ_i Σ_{q∈Ω(h_i⁰, r_m)} ‖F_q(z_t) − F_{q+(h_i−h_i⁰)+d_i}(ẑ_t)‖₁
    — the patch ahead of the tracked handle is pulled toward what the handle looked like in the original, so the
    content keeps its identity however many steps it takes. d_i is ``drag_direction(h_i, g_i, step)``.

    Each patch term is the channel-mean L1 times the patch size, as in the official code. Handles that have
    arrived contribute nothing.
    """
    offs = _offsets(r_m, feat.device)
    loss = feat.new_zeros(())
    for i, (h, g) in enumerate(zip(handles, targets)):
        if torch.linalg.norm(g - h) < ARRIVED_CELLS:
            continue
        d = drag_direction(h, g, step)
        ref = sample_at(feat, h + offs).detach() if feat0 is None else sample_at(feat0, handles0[i] + offs).detach()
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


def drag_timestep_indices(start: int, n_steps: int, drag_timesteps: int) -> list[int]:
    """Schedule indices the drag runs at: GoodDrag's alternating drag and denoising (AlDD) spreads it over the
    first ``drag_timesteps`` timesteps of the edit, t_start, t_start−1, … (a denoising step between two), instead
    of all at t_start (DragDiffusion: ``drag_timesteps`` = 1). Never past the last step of the schedule."""
    return list(range(start, min(start + drag_timesteps, n_steps)))


@dataclass
class DragOutcome:
    latent: torch.Tensor  # optimised z_t, (1, 4, h, w) fp32
    handles: torch.Tensor  # tracked handles on the supervision grid, (N, 2)
    steps: int  # optimisation steps taken
    arrived: bool
    losses: list[float] = field(default_factory=list)
    unchanged: int = 0  # point-tracking updates in a row that moved no handle (GoodDrag's early stop)
    stalled: bool = False  # stopped because ``unchanged`` reached the patience


def _features(unet, z, t, cond, grid_hw, need_output):
    block = families.unet_blocks(unet).drag_block  # SD-1.x/2.x: up_blocks[2] (FEATURE_BLOCK); SDXL: up_blocks[1]
    eps, feats = run_for_features(unet, z, t, cond, (block,), need_output=need_output)
    feat = F.interpolate(feats[block].float(), size=grid_hw, mode="bilinear", align_corners=False)
    return eps, feat


@dataclass(frozen=True)
class DragOptions:
    """The latent optimisation's settings, as the request gives them (``DragOptions.of``)."""

    lr: float  # Adam learning rate
    max_steps: int  # motion-supervision steps at one timestep
    r_m: int  # motion-supervision patch radius (cells)
    r_p: int  # point-tracking search radius (cells)
    lam: float  # weight of the mask term
    step: float  # how far one supervision step pulls a handle (``drag_direction``'s β)
    preserve: bool  # information-preserving supervision (GoodDrag)
    steps_per_track: int  # supervision steps between two point-tracking updates
    patience: int  # tracking updates in a row that moved no handle before giving up (0 = never)

    @classmethod
    def of(cls, req: DragRequest) -> DragOptions:
        return cls(req.latent_lr, req.max_steps, req.r_m, req.r_p, req.lam, req.drag_step, bool(req.preserve_handle),
                   req.steps_per_track, req.patience)


def optimize_latent(
    unet,
    z_t: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    schedule: Schedule,
    handles: torch.Tensor,
    targets: torch.Tensor,
    grid_hw: tuple[int, int],
    opts: DragOptions,
    *,
    keep: torch.Tensor | None,
    z_ref: torch.Tensor | None = None,
    handles0: torch.Tensor | None = None,
    track_first: bool = False,
    unchanged: int = 0,
    report: Callable[[float, str], None] | None = None,
    trail: Callable[[torch.Tensor], None] | None = None,
    use_graphs: bool | None = None,
) -> DragOutcome:
    """Motion supervision + point tracking on z_t (§3.3); stops as soon as every handle has arrived.

    ``keep`` is (1, 1, h, w) on the latent grid, 1 where the image must stay (outside the user's mask).
    Without a mask the UNet pass stops after ``up_blocks[2]``: the last block never runs.
    ``report(frac, msg)`` is the run's progress (it raises ``EditCancelled`` on Cancel); ``trail(handles)``
    receives the tracked handles (grid cells) after every tracking update.

    One timestep of GoodDrag's alternating drag and denoising: ``z_t`` is the edited latent at ``t``, ``z_ref``
    the original branch's latent there (the features and the mask term's reference come from it; default
    ``z_t``, DragDiffusion), ``handles`` the handles tracked so far, ``handles0`` the original ones (default
    ``handles``). Points are tracked every ``opts.steps_per_track`` steps (and on entry when ``track_first``: the
    denoising step in between moved the content); ``opts.patience`` > 0 stops after that many updates in a row
    that moved no handle, counting on from ``unchanged``. ``opts.step`` and ``opts.preserve`` choose the
    supervision (``motion_supervision_loss``).
    """
    device = z_t.device
    amp_dtype = unet_dtype(unet)
    use_amp = device.type == "cuda" and amp_dtype != torch.float32
    a_t, a_prev = schedule.alpha(t), schedule.alpha(t - schedule.stride)
    need_output = keep is not None
    handles0 = (handles if handles0 is None else handles0).clone().to(device)
    handles, targets = handles.clone().to(device), targets.to(device)
    z_ref = z_t if z_ref is None else z_ref.to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
        eps0, feat0 = _features(unet, z_ref, t, cond, grid_hw, need_output)
        x_prev_ref = ddim_step(z_ref, eps0.float(), a_t, a_prev) if need_output else None
    z = z_t.detach().clone().float().requires_grad_(True)

    t_dev = torch.tensor(t, device=device)  # a device tensor: graph capture cannot copy a Python int in

    def forward(z):  # (1, 4, h, w) -> features (and ε when the mask term needs it)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp, cache_enabled=False):
            eps, feat = _features(unet, z, t_dev, cond, grid_hw, need_output)
        return (feat, eps.float()) if need_output else (feat,)

    if use_graphs is None:
        use_graphs = cuda_graphs.enabled(device)
    forward = cuda_graphs.graphed(forward, (z.detach().clone().requires_grad_(True),), unet=unet, use=use_graphs)
    opt = torch.optim.Adam([z], lr=opts.lr)
    max_steps, steps_per_track, patience = opts.max_steps, opts.steps_per_track, opts.patience
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    losses: list[float] = []
    stalled = False
    step_i = 0
    for step_i in range(max_steps):
        if report:
            report(step_i / max_steps, f"step {step_i + 1}/{max_steps}")
        feat, *rest = forward(z)
        eps = rest[0] if rest else None
        if (step_i > 0 and step_i % steps_per_track == 0) or (step_i == 0 and track_first):
            new = track_points(feat0, feat, handles0, handles, opts.r_p)
            if step_i > 0:  # the entry update follows the denoising step, not the optimisation: not counted
                unchanged = unchanged + 1 if torch.equal(new, handles) else 0
            handles = new
            if trail:
                trail(handles)
        if all_arrived(handles, targets):
            break
        if patience and unchanged >= patience:
            stalled = True
            break
        loss = motion_supervision_loss(feat, handles, targets, opts.r_m, step=opts.step,
                                       feat0=feat0 if opts.preserve else None, handles0=handles0)
        if need_output:
            loss = loss + mask_term(ddim_step(z, eps.float(), a_t, a_prev), x_prev_ref, keep, opts.lam)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach().item())
        if report:
            dist = torch.linalg.norm(handles - targets, dim=1).max().item()
            report((step_i + 1) / max_steps, f"step {step_i + 1}: loss {losses[-1]:.3f}, farthest handle {dist:.1f} cells away")
    else:
        step_i = max_steps
    arrived = all_arrived(handles, targets)
    log.info("drag optimisation at t=%d: %d steps, arrived=%s", t, step_i, arrived)
    return DragOutcome(z.detach(), handles.detach().cpu(), step_i, arrived, losses, unchanged, stalled)


# ---- the task ------------------------------------------------------------------------------------------
def identity_lora(ctx: EditContext, work_img: Image.Image, prompt: str, req: DragRequest):
    """The identity LoRA of a working-size image (§3.2), trained once per (image, prompt, LoRA settings,
    active LoRAs) and cached on the CPU. Returns ``(state or None, cache key or None)``."""
    if req.lora_steps <= 0:
        return None, None
    key = ((image_hash(work_img), work_img.size), prompt, req.lora_steps, req.lora_rank, req.lora_lr, req.seed,
           ctx.lora_key)

    def make():
        b = ctx.bundle
        with ctx.run.step("lora"):
            return train_identity_lora(b.unet, ctx.posterior(work_img), b.encode_prompt(prompt),
                                       b.scheduler.alphas_cumprod, steps=req.lora_steps, rank=req.lora_rank,
                                       lr=req.lora_lr, seed=req.seed, report=ctx.run.report,
                                       grad_checkpointing=ctx.options.lora_checkpointing)

    return ctx.caches.loras.get_or(key, make)[0], key


def _reusable_generation(ctx: EditContext, req: DragRequest, schedule: Schedule, start: int, notices: list):
    """The generation this image came from, if its trajectory can stand in for inversion + LoRA."""
    gen = ctx.caches.generation_of(req.image)
    if gen is not None and len(gen.inversion.schedule.timesteps) != req.n_inference_steps:
        notices.append("This image was generated with another step count, so it is inverted like a photo.")
        return None
    if gen is not None and start < gen.inversion.start:
        notices.append("This image's generation started below the drag's inversion strength, so it is inverted "
                       "like a photo (lower the inversion strength to reuse its latents).")
        return None
    return gen


def _inverted_latent(ctx: EditContext, req: DragRequest, work_img, prompt, cond, schedule, start, lora_key):
    """z_t of the photo: cached DDIM inversion (under the identity LoRA, if any) to ``timesteps[start]``."""
    b = ctx.bundle
    with ctx.run.step("encode"):
        z0 = ctx.posterior(work_img)[0]

    def make():
        with ctx.run.step("inversion"):
            return invert(NoisePredictor(b.unet, cond, z0.shape[0], device=z0.device), z0, schedule, start, run=ctx.run)

    img_key = (image_hash(work_img), work_img.size)
    key = (img_key, prompt, lora_key, ctx.lora_key, req.inversion_strength, req.n_inference_steps)
    return ctx.caches.inversions.get_or(key, make)[0].z_t


def _reference(ctx: EditContext, unet, z_t, cond, uncond, schedule, start, guidance, prompt, lora_key) -> Reference:
    """The reference branch of this z_t, cached: a repeat drag of the same image (same inversion, prompt, LoRAs,
    CFG) reuses its latents and attention bank and runs only the edited branch. Keyed by z_t's content, so a
    generated image's trajectory and a photo's inversion share the rule."""
    z_key = hashlib.sha1(z_t.detach().float().cpu().numpy().tobytes()).hexdigest()
    key = (z_key, tuple(z_t.shape), prompt, guidance, len(schedule.timesteps), start, lora_key, ctx.lora_key)
    bank_device = z_t.device if z_t.device.type == "cuda" and not ctx.options.bank_on_cpu else "cpu"

    def make():
        return reference_branch(unet, z_t, cond, schedule, start, uncond=uncond, guidance_scale=guidance,
                                bank_device=bank_device, run=ctx.run)

    return ctx.caches.task("drag_reference", 2).get_or(key, make)[0]


def run_drag(ctx: EditContext, req: DragRequest) -> EditResult:
    """DragDiffusion edit: (identity LoRA) → DDIM inversion → reference branch (cached) → latent optimisation
    (at one timestep, or spread over several with denoising between: GoodDrag) → denoise → decode."""
    b, run = ctx.bundle, ctx.run
    work_img, (image, mask, points), notices = ctx.fit(req.image, req.mask, req.points)
    notices = list(req.notices) + notices
    schedule = Schedule.from_scheduler(b.scheduler, req.n_inference_steps)
    start = schedule.start_index(req.inversion_strength)
    gen = _reusable_generation(ctx, req, schedule, start, notices)
    prompt = req.prompt or (gen.prompt if gen else "")
    guidance = gen.guidance_scale if gen is not None and req.guidance_scale == 1.0 else req.guidance_scale
    cond, uncond = b.encode_prompt(prompt), b.encode_prompt("")
    lora_state, lora_key = (None, None) if gen is not None else identity_lora(ctx, work_img, prompt, req)
    with lora_adapter(b.unet, lora_state, req.lora_rank):
        if gen is not None:
            z_t = gen.inversion.latents[len(schedule.timesteps) - start]
        else:
            z_t = _inverted_latent(ctx, req, work_img, prompt, cond, schedule, start, lora_key)
        z_t = z_t.to(b.device)
        lat_hw = tuple(z_t.shape[-2:])
        grid_hw = supervision_grid(lat_hw)
        pts_h = points_to_grid([h for h, _ in points], image.size, grid_hw)
        pts_t = points_to_grid([g for _, g in points], image.size, grid_hw)
        keep = None if mask is None else (1.0 - resize_mask(mask, lat_hw)).to(b.device)
        with run.step("denoise"):
            ref = _reference(ctx, b.unet, z_t, cond, uncond, schedule, start, guidance, prompt, lora_key)
        indices = drag_timestep_indices(start, len(schedule.timesteps), req.drag_timesteps)
        if len(indices) < req.drag_timesteps:
            notices.append(f"The drag was spread over {len(indices)} timesteps, all the edit has "
                           f"({req.drag_timesteps} asked): raise the inversion strength for more.")
        trail = (lambda hs: run.trail(grid_to_points(hs, grid_hw, image.size))) if run.wants_trail else None
        if trail:
            trail(pts_h)
        z, handles, steps, unchanged, out = z_t, pts_h, 0, 0, None
        opts = DragOptions.of(req)
        with run.step("drag"):
            for j, index in enumerate(indices):
                if j > 0:  # AlDD: one denoising step of the edited latent between two drags
                    z = denoise_one_step(b.unet, z, cond, schedule, index - 1, uncond=uncond, guidance_scale=guidance)
                span = (j / len(indices), 1 / len(indices))
                label = f"timestep {j + 1}/{len(indices)}, " if len(indices) > 1 else ""
                out = optimize_latent(
                    b.unet, z, schedule.timesteps[index], cond, schedule, handles, pts_t, grid_hw, opts, keep=keep,
                    z_ref=ref.latents[index - start].to(b.device), handles0=pts_h, track_first=j > 0,
                    unchanged=unchanged, report=lambda f, m, span=span, label=label: run.report(span[0] + f * span[1], label + m),
                    trail=trail)
                z, handles, unchanged, steps = out.latent, out.handles, out.unchanged, steps + out.steps
                if out.arrived or out.stalled:
                    break
        if not out.arrived:
            notices.append(f"Stopped after {steps} steps before every handle reached its target"
                           + (" (the handles stopped moving)" if out.stalled else "")
                           + "; raise 'max steps' or run again from this result.")
        with run.step("denoise"):
            # mutual self-attention from the last drag timestep on, reading the kept reference branch
            z0 = denoise_with_reference(b.unet, ref, z, cond, schedule, index, uncond=uncond, guidance_scale=guidance,
                                        run=run, hooks=sample_previews(ctx))
    result = tensor_to_pil(ctx.decode(z0)).resize(image.size, Image.LANCZOS)
    recipe = ctx.recipe("dragdiffusion", req.params(), images={"image": req.image}, masks={"mask": req.mask},
                        extra={"steps_run": steps, "arrived": out.arrived, "generated": gen.recipe if gen else None})
    return EditResult(result, recipe, run.timings, run.nfe, notices, grid_to_points(handles, grid_hw, image.size),
                      extra={"drag_timesteps": j + 1})


def drag_from_recipe(recipe: dict) -> DragRequest:
    params = dict(recipe["params"])
    points = points_from_json(params.pop("points"))
    known = {f.name for f in dataclasses.fields(DragRequest)} - {"image", "mask", "points", "notices"}
    return DragRequest(decode_image(recipe["image_png"]), points, decode_mask(recipe.get("mask_png")),
                       **{k: v for k, v in params.items() if k in known})


# "drag" is what recipes called this task before the drag methods became one package
register(Task("dragdiffusion", DragRequest, run=run_drag, from_recipe=drag_from_recipe, aliases=("drag",)))
