"""DDIM sampling and inversion as small pure functions over the scheduler's ᾱ table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from editing.requests import EditCancelled


@dataclass(frozen=True)
class Schedule:
    """The DDIM timesteps of an ``n_steps`` schedule and the ᾱ lookup (from diffusers' scheduler)."""

    timesteps: tuple[int, ...]  # descending, e.g. (981, 961, …, 1) for SD-1.5 at 50 steps
    alphas_cumprod: torch.Tensor  # (1000,)
    final_alpha: float  # ᾱ used "below" t=0 (alphas_cumprod[0] when set_alpha_to_one=False)
    stride: int

    @classmethod
    def from_scheduler(cls, scheduler, n_steps: int) -> "Schedule":
        from diffusers import DDIMScheduler

        s = DDIMScheduler.from_config(scheduler.config)  # a copy: the shared scheduler is never mutated
        s.set_timesteps(n_steps)
        final = 1.0 if s.config.set_alpha_to_one else float(s.alphas_cumprod[0])
        stride = s.config.num_train_timesteps // n_steps
        return cls(tuple(int(t) for t in s.timesteps), s.alphas_cumprod.float(), final, stride)

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


def add_noise(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t · x₀ + √(1−ᾱ_t) · ε  (DDPM forward process, eq. 4); ``a`` broadcastable."""
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def unet_eps(unet, x: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
    """One noise prediction; the latent is cast to the UNet's dtype and the result back to fp32."""
    dtype = next(unet.parameters()).dtype
    return unet(x.to(dtype), t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1).to(dtype)).sample.float()


def noise_predictor(unet, cond: torch.Tensor, shape: tuple, device, use_graphs: bool | None = None):
    """``eps(x, t)`` for a fixed batch shape and prompt; replayed as a CUDA graph on the GPU."""
    from editing import cuda_graphs

    dtype = next(unet.parameters()).dtype
    cond = cond.expand(shape[0], -1, -1).to(dtype)

    def fn(x, t):
        return unet(x.to(dtype), t, encoder_hidden_states=cond).sample.float()

    use = cuda_graphs.enabled(torch.device(device)) if use_graphs is None else use_graphs
    sample = (torch.zeros(shape, device=device), torch.zeros((), dtype=torch.long, device=device))
    g = cuda_graphs.graphed(fn, sample, unet=unet, batch=shape[0], use=use)
    return lambda x, t: g(x, torch.as_tensor(t, dtype=torch.long, device=device))


@dataclass
class Inversion:
    """z₀ and every latent on the way up: ``latents[k]`` sits at ``timesteps[len - k]`` (k ≥ 1)."""

    latents: list[torch.Tensor]
    schedule: Schedule
    start: int  # index into schedule.timesteps of the last (noisiest) latent

    @property
    def z_t(self) -> torch.Tensor:
        return self.latents[-1]


@torch.no_grad()
def invert(
    unet,
    z0: torch.Tensor,
    cond: torch.Tensor,
    schedule: Schedule,
    start: int,
    progress: Callable[[float], None] | None = None,
    cancel=None,
) -> Inversion:
    """DDIM inversion from z₀ up to ``timesteps[start]`` (no CFG, as for real images).

    Each step predicts ε at the next (noisier) timestep from the current latent and applies
    ``ddim_step`` in reverse — the usual approximation ε(x_t, t) ≈ ε(x_{t+1}, t+1).
    """
    latents = [z0.float()]
    ts = list(reversed(schedule.timesteps[start:]))  # 1, 21, …, t_start
    x = latents[0]
    eps_fn = noise_predictor(unet, cond, tuple(x.shape), x.device)
    for i, t in enumerate(ts):
        if cancel is not None and cancel.is_set():
            raise EditCancelled("Cancelled during inversion.")
        eps = eps_fn(x, t)
        x = ddim_step(x, eps, schedule.alpha(t - schedule.stride), schedule.alpha(t))
        latents.append(x)
        if progress:
            progress((i + 1) / len(ts))
    return Inversion(latents, schedule, start)
