"""DDIM math, the one denoise loop and the one inversion loop every method runs on.

Each loop is a short numbered script; methods attach ``Hook`` objects at its named points instead of
writing their own loop (the InvokeAI shape):

    denoise, per step i (timestep t → t_prev), per repeat r (time travel):
      1. ``before_unet(s)``   attention / memory-bank state, adapter scales, ``s.unet_kwargs``
      2. noise prediction     ``s.eps`` (classifier-free guidance lives in ``NoisePredictor``)
      3. ``after_eps(s)``     guidance gradients: set ``s.eps_x0``, the ε that x̂₀ is taken from
      4. ``step_noise(s)``    the step's σ and noise (regional SDE): set ``s.sigma`` / ``s.noise``
      5. the DDIM step        ``s.x_next``
      6. repeats              ``repeats(s)`` > 1: re-noise x_next back to t (``s.stage = "renoise"``,
                              ``before_unet`` runs again) and redo the step
      7. ``after_step(s)``    record the trajectory, previews

    invert, per step up the schedule: ``before_unet(s)`` (e.g. record the memory bank), prediction,
    the reverse DDIM step, ``after_step(s)``.

Progress and cancel go only through ``Run.report`` (it raises ``EditCancelled``).

The loops work in ε: a v-prediction model's output (SD-2.x 768-v) is converted once, in ``to_eps``, by
``NoisePredictor`` / ``unet_eps``, so x̂₀, inversion, guidance and every hook see ε whatever the model predicts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from editing import cuda_graphs
from models import families


# ---- the schedule and the DDIM math ------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """The DDIM timesteps of an ``n_steps`` schedule and the ᾱ lookup (from diffusers' scheduler)."""

    timesteps: tuple[int, ...]  # descending, e.g. (981, 961, …, 1) for SD-1.5 at 50 steps
    alphas_cumprod: torch.Tensor  # (1000,)
    final_alpha: float  # ᾱ used "below" t=0 (alphas_cumprod[0] when set_alpha_to_one=False)
    stride: int
    prediction_type: str = "epsilon"  # what the model predicts: "epsilon" | "v_prediction" (see ``to_eps``)

    @classmethod
    def from_scheduler(cls, scheduler, n_steps: int) -> Schedule:
        from diffusers import DDIMScheduler

        s = DDIMScheduler.from_config(scheduler.config)  # a copy: the shared scheduler is never mutated
        s.set_timesteps(n_steps)
        final = 1.0 if s.config.set_alpha_to_one else float(s.alphas_cumprod[0])
        stride = s.config.num_train_timesteps // n_steps
        pred = getattr(s.config, "prediction_type", "epsilon") or "epsilon"
        return cls(tuple(int(t) for t in s.timesteps), s.alphas_cumprod.float(), final, stride, pred)

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha

    def start_index(self, strength: float) -> int:
        """Index into ``timesteps`` where editing starts: strength 0.7 of 50 steps -> 15 (t = 681)."""
        n = len(self.timesteps)
        return n - max(1, min(n, round(strength * n)))


def predict_x0(x: torch.Tensor, eps: torch.Tensor, a: float) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t  (DDPM eq. 4 solved for x₀)."""
    return (x - (1 - a) ** 0.5 * eps) / a**0.5


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """Deterministic DDIM move between noise levels (Song et al. 2021, eq. 12 with σ = 0).

    x_to = √ᾱ_to · x̂₀ + √(1−ᾱ_to) · ε. With ᾱ_to > ᾱ_from it denoises; swapped, it inverts.
    """
    return a_to**0.5 * predict_x0(x, eps, a_from) + (1 - a_to) ** 0.5 * eps


def ddim_step_sigma(x: torch.Tensor, eps_x0: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float,
                    sigma: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """DDIM with noise (Song et al. 2021, eq. 12): x_to = √ᾱ_to·x̂₀(ε_x0) + √(1−ᾱ_to−σ²)·ε + σ·z.

    x̂₀ may come from a guided ε (DiffEditor's sampler) while the direction uses the unguided one.
    """
    x_to = a_to**0.5 * predict_x0(x, eps_x0, a_from) + (1 - a_to - sigma**2).clamp(min=0) ** 0.5 * eps
    return x_to if noise is None else x_to + sigma * noise


def ddim_sigma(eta: torch.Tensor | float, a_from: float, a_to: float) -> torch.Tensor | float:
    """σ_t = η · √((1−ᾱ_to)/(1−ᾱ_from) · (1 − ᾱ_from/ᾱ_to))  (Song et al. 2021, eq. 16)."""
    return eta * ((1 - a_to) / (1 - a_from) * (1 - a_from / a_to)) ** 0.5


def add_noise(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t · x₀ + √(1−ᾱ_t) · ε  (DDPM forward process, eq. 4); ``a`` broadcastable."""
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# ---- noise prediction ---------------------------------------------------------------------------------
def to_eps(model_out: torch.Tensor, x_t: torch.Tensor, a_t, prediction_type: str) -> torch.Tensor:
    """The model's output as the noise ε of x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε.

    - ``epsilon``: the output is ε (returned as is, the same tensor).
    - ``v_prediction`` (Salimans & Ho 2022, §4): v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀. Substituting
      x₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t gives ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t (and x̂₀ = √ᾱ_t·x_t − √(1−ᾱ_t)·v).
    - ``sample``: the output is x̂₀, so ε = (x_t − √ᾱ_t·x̂₀)/√(1−ᾱ_t).
    ``a_t``: ᾱ_t as a float or a tensor broadcastable to x_t. Linear in the output, so classifier-free
    guidance gives the same ε whether it combines v or ε.
    """
    if prediction_type == "epsilon":
        return model_out
    a = a_t if torch.is_tensor(a_t) else torch.tensor(float(a_t), dtype=model_out.dtype, device=model_out.device)
    if prediction_type == "v_prediction":
        return a.sqrt() * model_out + (1 - a).sqrt() * x_t.to(model_out.dtype)
    if prediction_type == "sample":
        return (x_t.to(model_out.dtype) - a.sqrt() * model_out) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def prediction(unet, schedule: Schedule | None = None) -> tuple[str, torch.Tensor | None]:
    """``(prediction_type, alphas_cumprod)`` for ``unet``: the schedule's when given, else what the loader
    recorded for this UNet (``models.families.register_prediction``), else ε."""
    if schedule is not None:
        return schedule.prediction_type, schedule.alphas_cumprod
    known = families.prediction_of(unet)
    return known if known is not None else ("epsilon", None)


def alpha_at(alphas_cumprod: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for an int or tensor timestep, shaped to broadcast over ``like`` (B, C, H, W)."""
    tt = torch.as_tensor(t, device=alphas_cumprod.device).long().flatten()
    a = alphas_cumprod[tt].to(like.device, like.dtype)
    return a.view(-1, *([1] * (like.ndim - 1))) if a.numel() > 1 else a.reshape(())


def unet_dtype(unet) -> torch.dtype:
    """The UNet's compute dtype (of its own weights: an fp32 LoRA on an fp16 UNet does not count)."""
    return next(p for n, p in unet.named_parameters() if ".lora_" not in n).dtype


def unet_eps(unet, x: torch.Tensor, t: int, cond: torch.Tensor, *, schedule: Schedule | None = None,
             **unet_kwargs) -> torch.Tensor:
    """One noise prediction ε (``to_eps`` of the model's output); the latent is cast to the UNet's dtype and the
    result back to fp32. ``schedule`` gives the prediction type (default: what the loader recorded)."""
    dtype = unet_dtype(unet)
    out = unet(x.to(dtype), t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1).to(dtype),
               **unet_kwargs).sample.float()
    pred, alphas = prediction(unet, schedule)
    return out if pred == "epsilon" else to_eps(out, x.float(), alpha_at(alphas, t, out), pred)


class NoisePredictor:
    """``eps(x, t, **unet_kwargs)`` for a fixed latent batch and prompt, with classifier-free guidance.

    With ``uncond`` the batch runs as ``[x, x]`` against ``[uncond…, cond…]`` and
    ε = ε_u + s·(ε_c − ε_u) (Ho & Salimans 2022, eq. 6). Calls without extra UNet kwargs are replayed as
    a CUDA graph on the GPU (``graphs=False`` where processors read per-step Python state).
    It always returns ε: a v-prediction model's output goes through ``to_eps`` (prediction type and ᾱ from
    ``schedule`` when given, else from what the loader recorded for the UNet; ε models are untouched).
    """

    def __init__(self, unet, cond: torch.Tensor, batch: int, *, uncond: torch.Tensor | None = None,
                 guidance_scale: float = 1.0, device=None, graphs: bool | None = None,
                 schedule: Schedule | None = None):
        self.unet, self.scale, self.cfg = unet, guidance_scale, uncond is not None
        self.prediction_type, self._alphas = prediction(unet, schedule)
        self.dtype = unet_dtype(unet)
        if self.cfg:
            cond = torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])
        self.cond = cond.expand(batch * (2 if self.cfg else 1), -1, -1).to(self.dtype)
        self.device = torch.device(device) if device is not None else self.cond.device
        self._use_graphs = cuda_graphs.enabled(self.device) if graphs is None else graphs
        self._graphed = None

    def _plain(self, x, t):
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=self.cond).sample.float()

    def _replay(self, x, t):
        if self._graphed is None:  # captured on first use, when the latent size is known
            sample = (torch.zeros_like(x, dtype=torch.float32), torch.zeros((), dtype=torch.long, device=self.device))
            self._graphed = cuda_graphs.graphed(self._plain, sample, unet=self.unet, batch=x.shape[0], use=True)
        return self._graphed(x, torch.as_tensor(t, dtype=torch.long, device=self.device))

    def __call__(self, x: torch.Tensor, t: int, **unet_kwargs) -> torch.Tensor:
        inp = torch.cat([x, x]) if self.cfg else x
        if unet_kwargs:
            out = self.unet(inp.to(self.dtype), t, encoder_hidden_states=self.cond, **unet_kwargs).sample.float()
        elif self._use_graphs:
            out = self._replay(inp, t)
        else:
            out = self._plain(inp, torch.as_tensor(t, dtype=torch.long, device=self.device))
        if self.cfg:
            e_u, e_c = out.chunk(2)
            out = e_u + self.scale * (e_c - e_u)
        if self.prediction_type == "epsilon":
            return out
        return to_eps(out, x.float(), alpha_at(self._alphas, t, out), self.prediction_type)


# ---- the loops --------------------------------------------------------------------------------------------
@dataclass
class StepState:
    """What changes along a loop; hooks read and set it."""

    n: int  # steps in this loop
    i: int = 0  # step of this loop (0 = first)
    index: int = 0  # index into schedule.timesteps of this step's t
    t: int = 0
    a_t: float = 0.0  # ᾱ at t
    a_next: float = 0.0  # ᾱ at the level this step moves to
    x: torch.Tensor | None = None  # the current latent (fp32)
    eps: torch.Tensor | None = None
    eps_x0: torch.Tensor | None = None  # ε used for x̂₀ (guidance may change it)
    sigma: torch.Tensor | None = None  # None: the deterministic step
    noise: torch.Tensor | None = None
    x_next: torch.Tensor | None = None
    repeat: int = 0
    repeats: int = 1
    stage: str = "step"  # "step" | "renoise" (the UNet call that takes x_next back to t for a repeat)
    unet_kwargs: dict[str, Any] = field(default_factory=dict)


class Hook:
    """A method's additions to a loop; every point is a no-op unless overridden."""

    def repeats(self, s: StepState) -> int:
        return 1

    def before_unet(self, s: StepState) -> None:
        pass

    def after_eps(self, s: StepState) -> None:
        pass

    def step_noise(self, s: StepState) -> None:
        pass

    def after_step(self, s: StepState) -> None:
        pass


class Trajectory(Hook):
    """Keeps every latent of a loop: ``latents[0]`` the start, then one per step."""

    def __init__(self, x: torch.Tensor):
        self.latents = [x]

    def after_step(self, s: StepState) -> None:
        self.latents.append(s.x)


def _report(run, frac: float, msg: str = "") -> None:
    if run is not None:
        run.report(frac, msg)


@torch.no_grad()
def denoise(predict, x: torch.Tensor, schedule: Schedule, start: int = 0, *, hooks=(), run=None,
            renoise=None) -> torch.Tensor:
    """DDIM sampling from ``timesteps[start]`` down to z₀; returns z₀ (fp32).

    ``predict(x, t, **kw) -> ε`` (a ``NoisePredictor``); ``renoise`` predicts the ε of the one-step
    inversion that time travel uses (conditional only), needed only when a hook asks for repeats.
    """
    ts = schedule.timesteps[start:]
    s = StepState(n=len(ts), x=x.float())
    for i, t in enumerate(ts):
        s.i, s.index, s.t = i, start + i, t
        s.a_t, s.a_next = schedule.alpha(t), schedule.alpha(t - schedule.stride)
        s.repeats = max([h.repeats(s) for h in hooks], default=1)
        for r in range(s.repeats):
            s.repeat, s.stage, s.unet_kwargs = r, "step", {}
            _report(run, i / s.n, f"step {i + 1}/{s.n}" + (f" (time travel {r + 1}/{s.repeats})" if s.repeats > 1 else ""))
            for h in hooks:  # 1
                h.before_unet(s)
            s.eps = predict(s.x, t, **s.unet_kwargs)  # 2
            s.eps_x0, s.sigma, s.noise = s.eps, None, None
            for h in hooks:  # 3
                h.after_eps(s)
            for h in hooks:  # 4
                h.step_noise(s)
            if s.sigma is None and s.eps_x0 is s.eps:  # 5
                s.x_next = ddim_step(s.x, s.eps, s.a_t, s.a_next)
            else:
                sigma = s.sigma if s.sigma is not None else torch.zeros((), device=s.x.device)
                s.x_next = ddim_step_sigma(s.x, s.eps_x0, s.eps, s.a_t, s.a_next, sigma, s.noise)
            if r < s.repeats - 1:  # 6: time travel, back to t with one DDIM inversion step
                s.stage, s.unet_kwargs = "renoise", {}
                for h in hooks:
                    h.before_unet(s)
                e = renoise(s.x_next, t - schedule.stride, **s.unet_kwargs)
                s.x = ddim_step(s.x_next, e, s.a_next, s.a_t)
        s.x = s.x_next
        for h in hooks:  # 7
            h.after_step(s)
    _report(run, 1.0)
    return s.x


@dataclass
class Inversion:
    """z₀ and every latent on the way up: ``latents[k]`` sits at ``timesteps[len - k]`` (k ≥ 1)."""

    latents: list[torch.Tensor]
    schedule: Schedule
    start: int  # index into schedule.timesteps of the last (noisiest) latent
    bank: Any = None  # the attention memory bank recorded on the way (guided editing), if any

    @property
    def z_t(self) -> torch.Tensor:
        return self.latents[-1]

    def at(self, i: int) -> torch.Tensor:
        """The inverted latent at sampling step ``i`` (timestep ``schedule.timesteps[i]``)."""
        return self.latents[len(self.schedule.timesteps) - i]


@torch.no_grad()
def invert(predict, z0: torch.Tensor, schedule: Schedule, start: int = 0, *, hooks=(), run=None) -> Inversion:
    """DDIM inversion from z₀ up to ``timesteps[start]`` (no CFG, as for real images).

    Each step predicts ε at the next (noisier) timestep from the current latent and applies
    ``ddim_step`` in reverse — the usual approximation ε(x_t, t) ≈ ε(x_{t+1}, t+1).
    """
    latents = [z0.float()]
    ts = list(reversed(schedule.timesteps[start:]))  # 1, 21, …, t_start
    s = StepState(n=len(ts), x=latents[0])
    for i, t in enumerate(ts):
        s.i, s.index, s.t, s.unet_kwargs = i, len(schedule.timesteps) - 1 - i, t, {}
        s.a_t, s.a_next = schedule.alpha(t - schedule.stride), schedule.alpha(t)
        _report(run, i / len(ts), f"inversion step {i + 1}/{len(ts)}")
        for h in hooks:
            h.before_unet(s)
        s.eps = predict(s.x, t, **s.unet_kwargs)
        s.x = ddim_step(s.x, s.eps, s.a_t, s.a_next)
        latents.append(s.x)
        for h in hooks:
            h.after_step(s)
    _report(run, 1.0)
    return Inversion(latents, schedule, start)
