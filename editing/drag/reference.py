"""DragDiffusion's reference branch (§3.4), denoised once per image and kept.

The original z_t is denoised with plain self-attention while a K/V bank (``editing.kv_bank``, strategy ``Record``)
keeps each mutual layer's input (``reference_branch``); the edited branch then reads those inputs as its
keys/values (``denoise_with_reference``, strategy ``Replace``) — exactly what mutual self-attention gives when both
branches run in one batch. Since the reference depends only on z_t, the prompt, CFG and the LoRAs, never on
the points, ``editing.drag.dragdiffusion`` caches it and a repeat drag runs only the edited branch. Both branches
run as separate UNet calls, so the pixels are the same whether or not the cache held them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.kv_bank import AtStep, BankControl, MemoryBank, Record, Replace, bank_attention, mutual_layers
from editing.sampling import NoisePredictor, Schedule, Trajectory, ddim_step, denoise


@dataclass
class Reference:
    """The original branch denoised from z_t: its latent at every step (``latents[0]`` = z_t) and the bank of
    its mutual-layer self-attention inputs per (layer, timestep)."""

    latents: list[torch.Tensor]
    bank: MemoryBank


def reference_branch(unet, z_t: torch.Tensor, cond: torch.Tensor, schedule: Schedule, start: int, *,
                     uncond: torch.Tensor | None, guidance_scale: float, bank_device, run=None) -> Reference:
    """Denoise the original z_t from ``timesteps[start]`` (its own plain self-attention: in mutual attention the
    reference branch reads only itself), recording the bank. CFG only when ``guidance_scale`` > 1."""
    cfg = guidance_scale > 1.0 and uncond is not None
    control = BankControl(MemoryBank(bank_device), Record())
    traj = Trajectory(z_t.float())
    with bank_attention(unet, control, mutual_layers(unet)):
        predict = NoisePredictor(unet, cond, 1, uncond=uncond if cfg else None, guidance_scale=guidance_scale,
                                 device=z_t.device, graphs=False)
        denoise(predict, z_t.float(), schedule, start, hooks=[AtStep(control), traj], run=run)
    return Reference([z.detach().cpu() for z in traj.latents], control.bank)


def denoise_with_reference(unet, ref: Reference, z_edit: torch.Tensor, cond: torch.Tensor, schedule: Schedule,
                           start: int, *, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                           run=None, hooks=()) -> torch.Tensor:
    """Denoise the edited latent from ``timesteps[start]``; its self-attention in up_blocks[2..3] reads the
    reference branch's keys/values from ``ref.bank`` (§3.4). CFG only when ``guidance_scale`` > 1. Returns z₀."""
    cfg = guidance_scale > 1.0 and uncond is not None
    control = BankControl(ref.bank, Replace(same_batch=True))  # the recorded batch: its CFG halves are ours
    with bank_attention(unet, control, mutual_layers(unet)):
        predict = NoisePredictor(unet, cond, 1, uncond=uncond if cfg else None, guidance_scale=guidance_scale,
                                 device=z_edit.device, graphs=False)
        return denoise(predict, z_edit.float(), schedule, start, hooks=[AtStep(control), *hooks], run=run)


def denoise_one_step(unet, z: torch.Tensor, cond: torch.Tensor, schedule: Schedule, index: int, *,
                     uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """One plain DDIM step of the edited latent from ``timesteps[index]`` (AlDD's denoising between drags;
    GoodDrag runs it without mutual attention)."""
    cfg = guidance_scale > 1.0 and uncond is not None
    predict = NoisePredictor(unet, cond, 1, uncond=uncond if cfg else None, guidance_scale=guidance_scale,
                             device=z.device, graphs=False)
    t = schedule.timesteps[index]
    with torch.no_grad():
        return ddim_step(z.float(), predict(z.float(), t), schedule.alpha(t), schedule.alpha(t - schedule.stride))
