"""Training-free guided editing: DragonDiffusion (Mou et al., ICLR 2024) and DiffEditor (Mou et al., CVPR 2024).

One UNet does everything (the official code keeps a second copy for features):

1. **Inversion with a memory bank.** DDIM inversion of the image (text only, no CFG) keeps every latent
   z_0…z_T and, through attention processors, the input of every decoder self-attention layer at every
   step. K = W_k·h and V = W_v·h, so keeping h is the same information as keeping K and V at half the
   memory; the stock SDPA processor recomputes K/V from it.
2. **Visual cross-attention.** While sampling, the decoder's self-attention reads the bank: *replace*
   (move), *concatenate* (drag), or *splice* the base image's background with the reference object's
   tokens (appearance, paste).
3. **Gradient guidance.** At guided steps, a forward pass of the edited latent and of the inverted latent
   at the same step (stopped after ``up_blocks[2]``, no bank) gives ``up_blocks[1]``/``[2]`` features on a
   grid of 2 cells per latent cell (¼ of the image for SD-1.5); energies of the form w / (1 + 4·sim)
   compare them. Their gradients — the edit term's inside the edit region, the content term's outside — are added to the noise prediction used for x̂₀.
4. **DiffEditor extras.** Guidance at i < 10 and every even i < 30; regional SDE (η inside the edit region,
   0 outside) for 10 < i < 20; time travel (each of i = 22, 24, 26, 28 runs three times, re-noised by one
   DDIM inversion step in between); an optional IP-Adapter image prompt for 10 ≤ i < 20.

Step indices are those of the published 50-step schedule; other step counts map onto it proportionally.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from editing.attention import attn_processors, self_attn_names
from editing.features import FeatureCapture, _Captured
from editing.geometry import mask_centre, place, points_to_grid, resize_mask
from editing.images import image_hash, pil_to_tensor, tensor_to_pil
from editing.inversion import Schedule, ddim_step, predict_x0
from editing.requests import (AppearanceRequest, EditError, GuidedDragRequest, GuidedParams, MoveRequest, PasteRequest)
from editing.runtime import EditResult, Run, Task, decode_image, decode_mask, register

log = logging.getLogger(__name__)

FEATURE_BLOCKS = (1, 2)  # up_blocks whose outputs carry the guidance features
GRID_PER_LATENT = 2  # features are compared on a grid of 2 cells per latent cell: the published 1/4 of the
# image for SD-1.5's 8x VAE; kept per latent cell so the 3x3-cell windows mean the same on a 4x VAE (toy)
REGION_WEIGHT = {"move": 8e-2, "drag": 4e-2, "appearance": 4e-2, "paste": 4e-2}  # gradient scale per task
ENERGY_UNIT = 1e3  # the published UIs multiply "energy scale" by 1000


# ---- schedules ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidedSchedule:
    """Which sampling steps are guided, run the regional SDE, or time-travel (indices of a 50-step run)."""

    method: str  # "diffeditor" | "dragondiffusion"
    n_steps: int

    def _i50(self, i: int) -> int:
        return round(i * 50 / self.n_steps)

    def guided(self, i: int) -> bool:
        k = self._i50(i)
        return k < 30 and (self.method == "dragondiffusion" or k < 10 or k % 2 == 0)

    def sde(self, i: int) -> bool:
        return self.method == "diffeditor" and 10 < self._i50(i) < 20

    def repeats(self, i: int) -> int:
        k = self._i50(i)
        return 3 if self.method == "diffeditor" and 20 < k < 30 and k % 2 == 0 else 1

    def image_prompt(self, i: int) -> bool:
        return self.method == "diffeditor" and 10 <= self._i50(i) < 20

    def bank_active(self, task: str, i: int) -> bool:
        k = self._i50(i)
        return k <= 35 if task in ("appearance", "paste") else k >= 5


# ---- memory bank and visual cross-attention ----------------------------------------------------------
class MemoryBank:
    """Decoder self-attention inputs per (layer, timestep), batch = the inverted images (base[, reference])."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.store: dict[tuple[str, int], torch.Tensor] = {}

    def put(self, name: str, t: int, h: torch.Tensor) -> None:
        self.store[(name, t)] = h.detach().to(self.device, copy=True)

    def get(self, name: str, t: int, device) -> torch.Tensor:
        return self.store[(name, t)].to(device, non_blocking=True)

    @property
    def layers(self) -> set[str]:
        return {n for n, _ in self.store}

    @property
    def timesteps(self) -> set[int]:
        return {t for _, t in self.store}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.store.values())


class BankControl:
    """What the bank processors do right now: ``record``, ``off``, or read the bank in ``mode``."""

    def __init__(self, bank: MemoryBank, mode: str = "off", fg: np.ndarray | None = None, bg: np.ndarray | None = None):
        self.bank, self.state, self.mode, self.t = bank, "off", mode, 0
        self._fg, self._bg = fg, bg  # splice: reference-object mask, base-edit mask (working-image pixels)
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.aspect = 1.0  # h / w of the latent

    def tokens(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices (reference object, base background) at a layer with ``n`` tokens."""
        if n not in self._tokens:
            w = round((n / self.aspect) ** 0.5)
            h = n // w
            fg = resize_mask(self._fg, (h, w)).flatten() > 0.5
            bg = resize_mask(self._bg, (h, w)).flatten() < 0.5
            self._tokens[n] = (fg.nonzero().flatten().to(device), bg.nonzero().flatten().to(device))
        return self._tokens[n]

    def context(self, name: str, h: torch.Tensor) -> torch.Tensor | None:
        """The K/V source for a self-attention layer whose queries come from ``h`` (B, N, C)."""
        if self.state == "record":
            self.bank.put(name, self.t, h)
            return None
        if self.state != "read":
            return None
        mem = self.bank.get(name, self.t, h.device).to(h.dtype)
        b = h.shape[0]
        if self.mode == "replace":
            return mem[:1].expand(b, -1, -1)
        if self.mode == "concat":
            return torch.cat([h, mem[:1].expand(b, -1, -1)], dim=1)
        if self.mode == "splice":
            fg, bg = self.tokens(h.shape[1], h.device)
            spliced = torch.cat([mem[:1, bg], mem[1:2, fg]], dim=1)
            return spliced.expand(b, -1, -1)
        raise ValueError(self.mode)


class BankAttnProcessor(AttnProcessor2_0):
    """Stock SDPA self-attention whose K/V source may come from the memory bank (see ``BankControl``)."""

    def __init__(self, name: str, control: BankControl):
        super().__init__()
        self.name, self.control = name, control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None and hidden_states.ndim == 3:
            encoder_hidden_states = self.control.context(self.name, hidden_states)
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def bank_layers(unet) -> list[str]:
    """Every decoder self-attention layer (``up_blocks[1..3]`` attn1 in SD-1.5)."""
    return self_attn_names(unet, ("up_blocks",))


@contextlib.contextmanager
def memory_bank_attention(unet, control: BankControl):
    """Install bank processors on the decoder's self-attention; the previous processors come back on exit."""
    procs = {n: BankAttnProcessor(n, control) for n in bank_layers(unet)}
    with attn_processors(unet, procs):
        yield


# ---- energies (pure functions) ------------------------------------------------------------------------
def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over channels: (…, C, H, W) or (N, C) pairs -> (…, H, W) or (N,)."""
    dim = 1 if a.ndim >= 2 else 0
    return F.cosine_similarity(a, b, dim=dim)


def energy(sim: torch.Tensor, w: float) -> torch.Tensor:
    """E = w / (1 + 4·mean(sim))  (DragonDiffusion eq. 4-6): low when the features agree."""
    return w / (1 + 4 * sim.mean())


def half_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 in [0, 1], the similarity the drag, appearance and paste energies use."""
    return (cos_sim(a, b) + 1) / 2


def cells(f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) features at flat cell indices -> (N, C)."""
    return f.flatten(2)[0, :, idx].T


def drag_energies(cur, ref, handle_cells, target_cells, outside, w_edit, w_content, w_inpaint):
    """DragonDiffusion drag: per point, E_edit = w_edit / (1 + 4·s(F_cur[target], F_orig[handle])) plus
    w_inpaint · s(F_cur, F_orig) on the handle cells the target does not cover (they should change);
    E_content = w_content / (1 + 4·s(F_cur, F_orig)) outside the mask. s = (cos + 1)/2, averaged over levels
    and points."""
    e_edit, e_con = 0.0, 0.0
    for fc, fr in zip(cur, ref):
        for hc, tc in zip(handle_cells, target_cells):
            e_edit = e_edit + energy(half_cos(cells(fc, tc), cells(fr, hc)), w_edit)
            vacated = hc[~torch.isin(hc, tc)]
            if len(vacated) and w_inpaint:
                e_edit = e_edit + w_inpaint * half_cos(cells(fc, vacated), cells(fr, vacated)).mean()
        if outside.any():
            e_con = e_con + energy(half_cos(fc, fr)[0][outside], w_content)
    n = len(cur)
    return e_edit / n / len(handle_cells), e_con / n


def move_energies(cur, ref, placed_ref, new, old, other, hole_ref, w_edit, w_content, w_contrast, w_inpaint):
    """DragonDiffusion move (levels weighted ½ each):
    E_edit = w_edit / (1 + 4·cos(F_cur, F_placed)) inside the new location;
    E_content = w_content / (1 + 4·cos(F_cur, F_orig)) outside old ∪ new
              + w_contrast · s(F_cur, F_orig) on the vacated area (it must stop looking like the object)
              + w_inpaint / (1 + 4·s(mean F_cur[vacated], mean F_orig[hole reference])) (fill like the background)."""
    vacated = old & ~new
    e_edit, e_con = 0.0, 0.0
    for fc, fr, fp in zip(cur, ref, placed_ref):
        e_edit = e_edit + 0.5 * energy(cos_sim(fc, fp)[0][new], w_edit)
        if other.any():
            e_con = e_con + 0.5 * energy(cos_sim(fc, fr)[0][other], w_content)
        if vacated.any():
            e_con = e_con + 0.5 * w_contrast * half_cos(fc, fr)[0][vacated].mean()
            if hole_ref.any():
                filled = fc[0][:, vacated].mean(1)
                background = fr[0][:, hole_ref].mean(1)
                e_con = e_con + energy(half_cos(filled, background), w_inpaint)
    return e_edit, e_con


def appearance_energies(cur, base, refimg, base_mask, ref_mask, w_edit, w_content):
    """DiffEditor appearance: E_edit = w_edit / (1 + 4·s(mean F_cur[base mask], mean F_ref[ref mask]))
    (a global match of the object's look); E_content = w_content / (1 + 4·s(F_cur, F_base)) outside."""
    e_edit, e_con = 0.0, 0.0
    for fc, fb, fr in zip(cur, base, refimg):
        e_con = e_con + energy(half_cos(fc, fb)[0][~base_mask], w_content)
        e_edit = e_edit + energy(half_cos(fc[0][:, base_mask].mean(1), fr[0][:, ref_mask].mean(1)), w_edit)
    return e_edit, e_con


def paste_energies(cur, base, placed, mask, w_edit, w_content):
    """DiffEditor paste: E_edit = w_edit / (1 + 4·s(F_cur, F_placed-reference)) cell by cell inside the pasted
    region; E_content = w_content / (1 + 4·s(F_cur, F_base)) outside it."""
    e_edit, e_con = 0.0, 0.0
    for fc, fb, fp in zip(cur, base, placed):
        e_con = e_con + energy(half_cos(fc, fb)[0][~mask], w_content)
        e_edit = e_edit + energy(half_cos(fc, fp)[0][mask], w_edit)
    return e_edit, e_con


# ---- features ---------------------------------------------------------------------------------------
def guidance_features(unet, x: torch.Tensor, t: int, cond: torch.Tensor, grid_hw, **unet_kwargs) -> list[torch.Tensor]:
    """``up_blocks[1]`` and ``[2]`` outputs for a batch, bilinearly resized to ``grid_hw`` (fp32).
    The forward stops right after ``up_blocks[2]``."""
    dtype = next(unet.parameters()).dtype
    with FeatureCapture(unet, FEATURE_BLOCKS, stop_early=True) as fc:
        try:
            unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype), **unet_kwargs)
        except _Captured:
            pass
    return [F.interpolate(fc.features[b].float(), size=grid_hw, mode="bilinear", align_corners=False)
            for b in FEATURE_BLOCKS]


# ---- inversion with the bank --------------------------------------------------------------------------
@dataclass
class GuidedInversion:
    latents: list[torch.Tensor]  # z_0 … z_T, batch = the inverted images
    bank: MemoryBank
    schedule: Schedule

    def at(self, i: int) -> torch.Tensor:
        """The inverted latent at sampling step ``i`` (timestep ``schedule.timesteps[i]``)."""
        return self.latents[len(self.schedule.timesteps) - i]


@torch.no_grad()
def invert_with_bank(unet, z0: torch.Tensor, cond: torch.Tensor, schedule: Schedule, bank: MemoryBank,
                     progress: Callable[[float], None] | None = None) -> GuidedInversion:
    """DDIM inversion z_0 → z_T (text-only, no CFG), recording the decoder self-attention inputs per step."""
    control = BankControl(bank)
    control.state = "record"
    dtype = next(unet.parameters()).dtype
    latents, x = [z0.float()], z0.float()
    ts = list(reversed(schedule.timesteps))
    with memory_bank_attention(unet, control):
        for i, t in enumerate(ts):
            control.t = t
            eps = unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()
            x = ddim_step(x, eps, schedule.alpha(t - schedule.stride), schedule.alpha(t))
            latents.append(x)
            if progress:
                progress((i + 1) / len(ts))
    return GuidedInversion(latents, bank, schedule)


# ---- the guided sampler ----------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything task-specific the sampler needs."""

    task: str
    z_T: torch.Tensor  # (1, c, h, w) initial latent
    energies: Callable  # (cur feats, ref feats) -> (E_edit, E_content)
    edit_region: torch.Tensor  # (1, 1, h, w) in {0, 1}: where the edit gradient (and the SDE) applies
    sde_region: torch.Tensor  # (1, 1, h, w)
    attention: str  # replace | concat | splice
    splice_masks: tuple[np.ndarray, np.ndarray] | None = None  # (reference object, base region) for splice


def _text(b, prompt: str) -> torch.Tensor:
    return b.encode_prompt(prompt)


def guided_sample(unet, inv: GuidedInversion, plan: Plan, gsched: GuidedSchedule, cond: torch.Tensor,
                  uncond: torch.Tensor, guidance_scale: float, energy_scale: float, sde_strength: float,
                  grid_hw, seed: int, run: Run, image_prompt: ImagePrompt | None = None) -> torch.Tensor:
    """Denoise ``plan.z_T`` with memory-bank attention, regional gradient guidance, regional SDE and time
    travel. Returns z_0. ``image_prompt`` (DiffEditor) is switched on only at its steps."""
    ip = image_prompt or ImagePrompt(None, None, 0.0)
    sched = inv.schedule
    dtype = next(unet.parameters()).dtype
    device = plan.z_T.device
    control = BankControl(inv.bank, plan.attention, *(plan.splice_masks or (None, None)))
    control.aspect = plan.z_T.shape[-2] / plan.z_T.shape[-1]
    gen = torch.Generator("cpu").manual_seed(seed)
    ctx_cfg = torch.cat([uncond, cond]).to(dtype)
    n_ref = inv.latents[0].shape[0]
    ctx_feat = cond.expand(1 + n_ref, -1, -1)
    scale = energy_scale * ENERGY_UNIT * REGION_WEIGHT[plan.task]
    edit_mask = plan.edit_region.to(device)
    x = plan.z_T.float()
    n = len(sched.timesteps)
    with memory_bank_attention(unet, control):
        for i, t in enumerate(sched.timesteps):
            a_t, a_prev = sched.alpha(t), sched.alpha(t - sched.stride)
            repeats = gsched.repeats(i) if energy_scale > 0 else 1
            for r in range(repeats):
                run.report(i / n, f"step {i + 1}/{n}" + (f" (time travel {r + 1}/{repeats})" if repeats > 1 else ""))
                control.t = t
                control.state = "read" if gsched.bank_active(plan.task, i) else "off"
                ip.switch(gsched.image_prompt(i))
                with torch.no_grad():
                    e_u, e_c = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=ctx_cfg,
                                    **ip.kwargs(2, cfg=True)).sample.float().chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
                eps_x0 = eps
                if energy_scale > 0 and gsched.guided(i):
                    control.state = "off"  # features come from the plain UNet, as the targets do
                    ip.switch(False)
                    g_edit, g_con = _energy_gradients(unet, x, inv.at(i).to(device), t, ctx_feat, grid_hw,
                                                      plan.energies, **ip.kwargs(1 + n_ref))
                    eps_x0 = eps + scale * (g_edit * edit_mask + g_con * (1 - edit_mask))
                # DDIM step: x̂₀ from the guided ε, the direction from the unguided one (DiffEditor's sampler);
                # σ > 0 only inside the SDE region at the SDE steps.
                x0 = predict_x0(x, eps_x0, a_t)
                sde = gsched.sde(i) and sde_strength > 0
                eta = sde_strength * plan.sde_region.to(device) if sde else torch.zeros((), device=device)
                sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
                x_prev = a_prev**0.5 * x0 + (1 - a_prev - sigma**2).clamp(min=0) ** 0.5 * eps
                if sde:
                    x_prev = x_prev + sigma * torch.randn(x.shape, generator=gen).to(device)
                if r < repeats - 1:  # time travel: back to t with one DDIM inversion step, then redo step i
                    control.state = "off"
                    ip.switch(False)
                    with torch.no_grad():
                        e = unet(x_prev.to(dtype), t - sched.stride, encoder_hidden_states=cond.to(dtype),
                                 **ip.kwargs(1)).sample.float()
                    x = ddim_step(x_prev, e, a_prev, a_t)
            x = x_prev
    run.report(1.0, "")
    return x


def _energy_gradients(unet, x, ref_t, t, ctx, grid_hw, energies, **unet_kwargs):
    """∂E_edit/∂x and ∂E_content/∂x from one feature pass over [edited latent, inverted latent(s) at t]."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        feats = guidance_features(unet, torch.cat([xg, ref_t.to(x.dtype)]), t, ctx, grid_hw, **unet_kwargs)
        cur = [f[:1] for f in feats]
        ref = [f[1:].detach() for f in feats]
        e_edit, e_con = energies(cur, ref)
        zero = torch.zeros_like(x)
        g_edit = torch.autograd.grad(e_edit, xg, retain_graph=True, allow_unused=True)[0] if torch.is_tensor(e_edit) else None
        g_con = torch.autograd.grad(e_con, xg, allow_unused=True)[0] if torch.is_tensor(e_con) else None
    unet.zero_grad(set_to_none=True)
    return (zero if g_edit is None else g_edit.detach()), (zero if g_con is None else g_con.detach())


# ---- tasks -------------------------------------------------------------------------------------------------
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

    def __init__(self, editor, image: Image.Image):
        self.editor = editor
        self.work, (self.image, _, _), self.notices = editor.fit(image)
        self.scale = (self.work.width / image.width, self.work.height / image.height)  # request px -> working px
        b = editor.bundle
        f = b.vae_scale_factor
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


def _inversion(editor, run: Run, images: list[Image.Image], prompts: list[str], n_steps: int) -> GuidedInversion:
    """Cached (per picture set, prompts, steps) inversion + memory bank."""
    b = editor.bundle
    key = (tuple(image_hash(im) for im in images), images[0].size, tuple(prompts), n_steps, editor.lora_key())
    cache = editor.cache("guided_inversion", 2)

    def make():
        with run.step("encode"), torch.no_grad():
            z0 = torch.cat([editor.posterior(im)[0] for im in images]).to(b.device)
        with run.step("inversion"):
            cond = torch.cat([_text(b, p) for p in prompts])
            bank_device = b.device if b.device.type == "cuda" and not editor.bank_on_cpu else "cpu"
            return invert_with_bank(b.unet, z0, cond, Schedule.from_scheduler(b.scheduler, n_steps),
                                    MemoryBank(bank_device), progress=run.report)

    return cache.get_or(key, make)[0]


def _finish(editor, run: Run, req: GuidedParams, prep: _Prepared, inv: GuidedInversion, plan: Plan,
            notices: list[str], recipe_images: dict, recipe_masks: dict, extra: dict | None = None,
            image_prompt=None) -> EditResult:
    b = editor.bundle
    gsched = GuidedSchedule(req.method, req.n_inference_steps)
    cond, uncond = _text(b, req.prompt), _text(b, "")
    with run.step("edit"):
        z0 = guided_sample(b.unet, inv, plan, gsched, cond, uncond, req.guidance_scale, req.energy_scale,
                           req.sde_strength if req.method == "diffeditor" else 0.0, prep.grid_hw, req.seed, run,
                           image_prompt=image_prompt)
    with run.step("decode"), torch.no_grad():
        x = b.vae.decode((z0 / b.vae.config.scaling_factor).to(b.dtype)).sample
        out = tensor_to_pil(x).resize(prep.image.size, Image.LANCZOS)
    recipe = editor.recipe(plan.task if plan.task != "drag" else "guided_drag", _jsonable(req.params()),
                           images=recipe_images, masks=recipe_masks)
    info = {"memory_bank_mb": round(inv.bank.nbytes / 2**20, 2), "bank_layers": len(inv.bank.layers),
            "bank_steps": len(inv.bank.timesteps), "method": req.method} | (extra or {})
    return EditResult(out, recipe, run.timings, run.nfe, notices, [], extra=info)


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        out[k] = [list(p) if isinstance(p, tuple) else p for p in v] if isinstance(v, tuple) else v
    return out


def run_guided_drag(editor, req: GuidedDragRequest, run: Run) -> EditResult:
    b = editor.bundle
    prep = _Prepared(editor, req.image)
    notices = list(req.notices) + prep.notices
    points = [(prep.px(h), prep.px(t)) for h, t in req.points]
    mask = prep.mask(req.mask)
    if mask is None:
        mask, note = _default_drag_mask(prep.work.size, points)
        notices.append(note)
    inv = _inversion(editor, run, [prep.work], [req.prompt], req.n_inference_steps)
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
    ip = _image_prompt(editor, req, [prep.work], notices)
    with ip as image_prompt:
        res = _finish(editor, run, req, prep, inv, plan, notices, {"image": req.image}, {"mask": req.mask},
                      image_prompt=image_prompt)
    res.recipe["params"]["points"] = [[list(h), list(t)] for h, t in req.points]
    return res


def run_move(editor, req: MoveRequest, run: Run) -> EditResult:
    b = editor.bundle
    prep = _Prepared(editor, req.image)
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
    inv = _inversion(editor, run, [prep.work], [req.prompt], req.n_inference_steps)
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
    with _image_prompt(editor, req, [prep.work], notices) as image_prompt:
        return _finish(editor, run, req, prep, inv, plan, notices, {"image": req.image},
                       {"mask": req.mask, "hole_mask": req.hole_mask}, image_prompt=image_prompt)


def run_appearance(editor, req: AppearanceRequest, run: Run) -> EditResult:
    b = editor.bundle
    prep = _Prepared(editor, req.image)
    notices = list(req.notices) + prep.notices
    base_px, ref_px = prep.mask(req.mask), prep.mask(req.reference_mask)
    ref_work = prep.image_of(req.reference)
    inv = _inversion(editor, run, [prep.work, ref_work], [req.prompt, req.reference_prompt or req.prompt],
                     req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    base_m, ref_m = _grid_mask(base_px, g_hw).to(b.device), _grid_mask(ref_px, g_hw).to(b.device)
    region = resize_mask(base_px, l_hw).to(b.device)

    def energies(cur, ref):
        return appearance_energies(cur, [f[:1] for f in ref], [f[1:2] for f in ref], base_m, ref_m,
                                   req.w_edit, req.w_content)

    plan = Plan("appearance", inv.latents[-1][:1].to(b.device), energies, region, region, "splice",
                splice_masks=(ref_px, base_px))
    with _image_prompt(editor, req, [prep.work, ref_work], notices) as image_prompt:
        return _finish(editor, run, req, prep, inv, plan, notices, {"image": req.image, "reference": req.reference},
                       {"mask": req.mask, "reference_mask": req.reference_mask}, image_prompt=image_prompt)


def run_paste(editor, req: PasteRequest, run: Run) -> EditResult:
    b = editor.bundle
    prep = _Prepared(editor, req.image)
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
    inv = _inversion(editor, run, [prep.work, placed_ref], [req.prompt, req.reference_prompt or req.prompt],
                     req.n_inference_steps)
    g_hw, l_hw = prep.grid_hw, prep.lat_hw
    m = _grid_mask(paste_px, g_hw).to(b.device)
    region = resize_mask(paste_px, l_hw).to(b.device)
    z_T = inv.latents[-1][:1].to(b.device) * (1 - region) + inv.latents[-1][1:2].to(b.device) * region

    def energies(cur, ref):
        return paste_energies(cur, [f[:1] for f in ref], [f[1:2] for f in ref], m, req.w_edit, req.w_content)

    plan = Plan("paste", z_T, energies, region, region, "splice", splice_masks=(paste_px, paste_px))
    with _image_prompt(editor, req, [prep.work, ref_work], notices) as image_prompt:
        return _finish(editor, run, req, prep, inv, plan, notices, {"image": req.image, "reference": req.reference},
                       {"reference_mask": req.reference_mask}, image_prompt=image_prompt)


# ---- image prompt (DiffEditor) ------------------------------------------------------------------------------
@dataclass
class ImagePrompt:
    """An installed IP-Adapter (models/adapters.py) with the edit's image embeddings; inert when ``handle`` is None."""

    handle: object | None
    embeds: torch.Tensor | None  # (1, n_images, D)
    scale: float

    def switch(self, active: bool) -> None:
        if self.handle is not None:
            self.handle.set_scale(self.scale if active else 0.0)

    def kwargs(self, batch: int, cfg: bool = False) -> dict:
        """UNet kwargs for a batch: with CFG the unconditional half gets zero image embeddings."""
        if self.handle is None:
            return {}
        if cfg:
            e = self.embeds.expand(batch // 2, -1, -1)
            return {"added_cond_kwargs": {"image_embeds": [torch.cat([torch.zeros_like(e), e])]}}
        return {"added_cond_kwargs": self.handle.added_cond_kwargs(self.embeds, batch)}


@contextlib.contextmanager
def _image_prompt(editor, req: GuidedParams, images: list[Image.Image], notices: list[str]):
    """DiffEditor's image prompt: the pictures (base, and the reference for appearance/paste) through an
    IP-Adapter. Yields an ``ImagePrompt``, or None when not asked for or not available (with a notice)."""
    if req.method != "diffeditor" or not req.ip_adapter or req.ip_scale <= 0:
        yield None
        return
    from models.adapters import ip_adapter

    try:
        cm = ip_adapter(editor.bundle, req.ip_adapter, allow_pickle=editor.allow_pickle, scale=0.0)
        handle = cm.__enter__()
    except EditError as e:
        notices.append(f"Image prompt skipped (the edit ran without it): {e}")
        yield None
        return
    try:
        square = [im.resize((256, 256), Image.LANCZOS) for im in images]  # the published 256² image prompt
        yield ImagePrompt(handle, handle.embed(square), req.ip_scale)
    finally:
        cm.__exit__(None, None, None)


# ---- registration -------------------------------------------------------------------------------------------
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
