"""DragDiffusion's reference branch (§3.4), denoised once per image and kept.

The original z_t is denoised with plain self-attention while ``ReferenceAttnProcessor`` records each mutual
layer's input (``reference_branch``); the edited branch then reads those inputs as its keys/values
(``denoise_with_reference``). Since the reference depends only on z_t, the prompt, CFG and the LoRAs, never on
the points, ``editing.drag_diffusion`` caches it and a repeat drag runs only the edited branch. Both branches
run as separate UNet calls, so the pixels are the same whether or not the cache held them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from editing.attention import attn_processors, self_attn_names
from editing.guidance.bank import MemoryBank
from editing.sampling import Hook, NoisePredictor, Schedule, StepState, Trajectory, ddim_step, denoise
from models import families


# The mutual self-attention layers come from the model family (`families.unet_blocks(unet).mutual_layers`:
# up_blocks.2 and up_blocks.3 on SD-1.5, DragDiffusion's layers 10–15 of 16).


class ReferenceControl:
    """What the reference processors do right now: ``record`` the reference branch's self-attention inputs
    into the bank at timestep ``t``, ``read`` them as the edited branch's key/value source, or stay ``off``."""

    def __init__(self, bank: MemoryBank, state: str = "off"):
        self.bank, self.state, self.t = bank, state, 0


class ReferenceAttnProcessor(AttnProcessor2_0):
    """Mutual self-attention (MasaCtrl, DragDiffusion §3.4) with the reference branch run once and kept.

    Recording, the layer's input h of the reference branch is stored per timestep (K = W_k·h, V = W_v·h: the
    same information as its K/V); reading, the edited branch's queries attend to keys/values computed from the
    stored h — exactly what ``MutualSelfAttnProcessor`` gives when both branches run in one batch, so a repeat
    drag of the same image needs no reference pass. The batch layout (CFG halves) is the reference's.
    """

    def __init__(self, name: str, control: ReferenceControl):
        super().__init__()
        self.name, self.control = name, control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        c = self.control
        if encoder_hidden_states is None and hidden_states.ndim == 3:
            if c.state == "record":
                c.bank.put(self.name, c.t, hidden_states)
            elif c.state == "read":
                encoder_hidden_states = c.bank.get(self.name, c.t, hidden_states.device).to(hidden_states.dtype)
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def reference_attention(unet, control: ReferenceControl):
    """Install ``ReferenceAttnProcessor`` on the mutual self-attention layers (restored on exit)."""
    return attn_processors(unet, {n: ReferenceAttnProcessor(n, control) for n in self_attn_names(unet, families.unet_blocks(unet).mutual_layers)})


class AtTimestep(Hook):
    """Tells the reference processors the timestep of each UNet call."""

    def __init__(self, control: ReferenceControl, state: str):
        self.control, self.state = control, state

    def before_unet(self, s: StepState) -> None:
        self.control.t, self.control.state = s.t, self.state


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
    control = ReferenceControl(MemoryBank(bank_device))
    traj = Trajectory(z_t.float())
    with reference_attention(unet, control):
        predict = NoisePredictor(unet, cond, 1, uncond=uncond if cfg else None, guidance_scale=guidance_scale,
                                 device=z_t.device, graphs=False)
        denoise(predict, z_t.float(), schedule, start, hooks=[AtTimestep(control, "record"), traj], run=run)
    return Reference([z.detach().cpu() for z in traj.latents], control.bank)


def denoise_with_reference(unet, ref: Reference, z_edit: torch.Tensor, cond: torch.Tensor, schedule: Schedule,
                           start: int, *, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                           run=None, hooks=()) -> torch.Tensor:
    """Denoise the edited latent from ``timesteps[start]``; its self-attention in up_blocks[2..3] reads the
    reference branch's keys/values from ``ref.bank`` (§3.4). CFG only when ``guidance_scale`` > 1. Returns z₀."""
    cfg = guidance_scale > 1.0 and uncond is not None
    control = ReferenceControl(ref.bank)
    with reference_attention(unet, control):
        predict = NoisePredictor(unet, cond, 1, uncond=uncond if cfg else None, guidance_scale=guidance_scale,
                                 device=z_edit.device, graphs=False)
        return denoise(predict, z_edit.float(), schedule, start, hooks=[AtTimestep(control, "read"), *hooks], run=run)


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
