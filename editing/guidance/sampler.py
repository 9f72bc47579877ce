"""Guided sampling (DragonDiffusion / DiffEditor) as hooks on the shared loops of editing/sampling.py.

- inversion: ``editing.kv_bank.invert_and_record`` keeps the decoder self-attention inputs of every step (the
  memory bank);
- sampling: the bank read at the published steps (visual cross-attention, ``editing.kv_bank.AtStep``),
  ``ImagePromptSwitch`` (DiffEditor's image prompt),
  ``EnergyGuidance`` (feature-correspondence gradients on x̂₀'s ε), ``RegionalSDE`` (σ > 0 only inside
  the edit region) and ``TimeTravel`` (repeat a step, re-noised by one inversion step).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.features import run_for_features
from editing.guidance.image_prompt import ImagePrompt
from editing.guidance.schedule import GuidedSchedule
from editing.kv_bank import AtStep, BankControl, Strategy, bank_attention
from editing.sampling import Hook, Inversion, NoisePredictor, StepState, ddim_sigma, denoise
from models import families

# gradient scale per task
REGION_WEIGHT = {"move": 8e-2, "guided_drag": 4e-2, "appearance": 4e-2, "paste": 4e-2}
ENERGY_UNIT = 1e3  # the published UIs multiply "energy scale" by 1000


# ---- features and gradients --------------------------------------------------------------------------------
def guidance_features(unet, x: torch.Tensor, t: int, cond: torch.Tensor, grid_hw, **unet_kwargs) -> list[torch.Tensor]:
    """The guidance up-blocks' outputs for a batch, bilinearly resized to ``grid_hw`` (fp32): the two up-blocks
    ending at 1/2 and full latent resolution — ``up_blocks[1]``, ``[2]`` on SD-1.x/2.x (``FEATURE_BLOCKS``),
    ``[0]``, ``[1]`` on SDXL (``models.families.unet_blocks``). The forward stops right after the last one."""
    blocks = families.unet_blocks(unet).guidance_blocks
    _, feats = run_for_features(unet, x, t, cond, blocks, **unet_kwargs)
    return [F.interpolate(feats[b].float(), size=grid_hw, mode="bilinear", align_corners=False) for b in blocks]


def energy_gradients(unet, x, ref_t, t, ctx, grid_hw, energies, **unet_kwargs):
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


# ---- the guided sampler --------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything task-specific the sampler needs."""

    task: str
    z_T: torch.Tensor  # (1, c, h, w) initial latent
    energies: Callable  # (cur feats, ref feats) -> (E_edit, E_content)
    edit_region: torch.Tensor  # (1, 1, h, w) in {0, 1}: where the edit gradient (and the SDE) applies
    sde_region: torch.Tensor  # (1, 1, h, w)
    attention: Strategy  # visual cross-attention: kv_bank.Replace (move), Concat (drag) or Splice


class ImagePromptSwitch(Hook):
    """DiffEditor's image prompt: on (scale) at its steps, off elsewhere; its embeddings go to every call."""

    def __init__(self, ip: ImagePrompt, gsched: GuidedSchedule):
        self.ip, self.gsched = ip, gsched

    def before_unet(self, s: StepState) -> None:
        step = s.stage == "step"
        self.ip.switch(step and self.gsched.image_prompt(s.i))
        s.unet_kwargs.update(self.ip.kwargs(2, cfg=True) if step else self.ip.kwargs(1))


class EnergyGuidance(Hook):
    """ε_x0 = ε + η·(∇E_edit ⊙ m + ∇E_content ⊙ (1 − m)) at the guided steps (DragonDiffusion eq. 7)."""

    def __init__(self, unet, inv: Inversion, plan: Plan, gsched: GuidedSchedule, cond, grid_hw, scale: float,
                 control: BankControl, ip: ImagePrompt):
        self.unet, self.inv, self.plan, self.gsched = unet, inv, plan, gsched
        self.grid_hw, self.scale, self.control, self.ip = grid_hw, scale, control, ip
        self.n_ref = inv.latents[0].shape[0]
        self.ctx = cond.expand(1 + self.n_ref, -1, -1)
        self.edit_mask = plan.edit_region.to(plan.z_T.device)

    def after_eps(self, s: StepState) -> None:
        if not self.gsched.guided(s.i):
            return
        self.control.on = False  # features come from the plain UNet, as the targets do
        self.ip.switch(False)
        g_edit, g_con = energy_gradients(self.unet, s.x, self.inv.at(s.i).to(s.x.device), s.t, self.ctx, self.grid_hw,
                                         self.plan.energies, **self.ip.kwargs(1 + self.n_ref))
        s.eps_x0 = s.eps + self.scale * (g_edit * self.edit_mask + g_con * (1 - self.edit_mask))


class RegionalSDE(Hook):
    """DiffEditor's regional SDE: η inside the SDE region at its steps, 0 elsewhere (σ from DDIM eq. 16)."""

    def __init__(self, region: torch.Tensor, gsched: GuidedSchedule, strength: float, seed: int):
        self.region, self.gsched, self.strength = region, gsched, strength
        self.gen = torch.Generator("cpu").manual_seed(seed)

    def step_noise(self, s: StepState) -> None:
        device = s.x.device
        sde = self.gsched.sde(s.i) and self.strength > 0
        eta = self.strength * self.region.to(device) if sde else torch.zeros((), device=device)
        s.sigma = ddim_sigma(eta, s.a_t, s.a_next)
        s.noise = torch.randn(s.x.shape, generator=self.gen).to(device) if sde else None


class TimeTravel(Hook):
    """DiffEditor's time travel: the published steps run ``travel_repeats`` times."""

    def __init__(self, gsched: GuidedSchedule):
        self.gsched = gsched

    def repeats(self, s: StepState) -> int:
        return self.gsched.repeats(s.i)


def guided_sample(unet, inv: Inversion, plan: Plan, gsched: GuidedSchedule, cond: torch.Tensor,
                  uncond: torch.Tensor, guidance_scale: float, energy_scale: float, sde_strength: float,
                  grid_hw, seed: int, run=None, image_prompt: ImagePrompt | None = None,
                  extra_hooks=()) -> torch.Tensor:
    """Denoise ``plan.z_T`` with memory-bank attention, regional gradient guidance, regional SDE and time
    travel (the hooks above on ``sampling.denoise``), then ``extra_hooks`` (e.g. previews). Returns z_0."""
    ip = image_prompt or ImagePrompt(None, None, 0.0)
    control = BankControl(inv.bank, plan.attention)
    device = plan.z_T.device
    read = AtStep(control, lambda s: s.stage == "step" and gsched.bank_active(plan.task, s.i))
    hooks = [read, ImagePromptSwitch(ip, gsched)]
    if energy_scale > 0:
        scale = energy_scale * ENERGY_UNIT * REGION_WEIGHT[plan.task]
        hooks += [EnergyGuidance(unet, inv, plan, gsched, cond, grid_hw, scale, control, ip), TimeTravel(gsched)]
    hooks.append(RegionalSDE(plan.sde_region, gsched, sde_strength, seed))
    hooks += list(extra_hooks)
    with bank_attention(unet, control):
        predict = NoisePredictor(unet, cond, 1, uncond=uncond, guidance_scale=guidance_scale, device=device, graphs=False)
        renoise = NoisePredictor(unet, cond, 1, device=device, graphs=False)
        return denoise(predict, plan.z_T.float(), inv.schedule, hooks=hooks, run=run, renoise=renoise)
