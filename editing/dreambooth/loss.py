"""The prior-preservation loss of DreamBooth (Ruiz et al. 2023, eq. 2) and what the UNet is trained to predict
(ε, or v on a v-prediction model such as SD-2.x 768-v)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def training_target(noise: torch.Tensor, z0: torch.Tensor, a: torch.Tensor, prediction_type: str = "epsilon"):
    """The UNet's regression target for x_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε (DDPM eq. 4).

    - ``epsilon``: ε itself (the same tensor, so the ε path is untouched).
    - ``v_prediction`` (Salimans & Ho 2022, §4): v = √ᾱ_t·ε − √(1−ᾱ_t)·z₀ — the output the model was trained
      for, so the LoRA keeps the base model's parameterisation (``editing.sampling.to_eps`` reads it back as ε).
    ``a``: ᾱ_t broadcastable to ``z0`` (B, 1, 1, 1)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a.sqrt() * noise.float() - (1 - a).sqrt() * z0.float()
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def prior_preservation_loss(eps_pred_inst: torch.Tensor, eps_inst: torch.Tensor, eps_pred_prior: torch.Tensor | None,
                            eps_prior: torch.Tensor | None, weight: float = 1.0):
    """L = ‖ε − ε̂(x_inst, c_inst)‖² + λ‖ε′ − ε̂(x_prior, c_class)‖²  (DreamBooth eq. 2, mean squared errors).

    Eq. 2 is written for x̂₀; with ε-prediction and DDPM's unweighted "simple" loss each term is the MSE of the
    predicted noise (on a v-prediction model the "ε" arguments are v and its target, ``training_target``). The first term fits the subject, the second keeps "a [class]" producing the frozen
    model's own class images (against language drift). Returns ``(total, instance term, prior term)``;
    without prior tensors (or with λ = 0) the prior term is 0.
    """
    inst = F.mse_loss(eps_pred_inst.float(), eps_inst.float())
    if eps_pred_prior is None or eps_prior is None or weight == 0:
        prior = inst.new_zeros(())
    else:
        prior = F.mse_loss(eps_pred_prior.float(), eps_prior.float())
    return inst + weight * prior, inst, prior
