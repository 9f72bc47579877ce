"""The prior-preservation loss of DreamBooth (Ruiz et al. 2023, eq. 2), in ε-prediction form."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prior_preservation_loss(eps_pred_inst: torch.Tensor, eps_inst: torch.Tensor, eps_pred_prior: torch.Tensor | None,
                            eps_prior: torch.Tensor | None, weight: float = 1.0):
    """L = ‖ε − ε̂(x_inst, c_inst)‖² + λ‖ε′ − ε̂(x_prior, c_class)‖²  (DreamBooth eq. 2, mean squared errors).

    Eq. 2 is written for x̂₀; with ε-prediction and DDPM's unweighted "simple" loss each term is the MSE of the
    predicted noise. The first term fits the subject, the second keeps "a [class]" producing the frozen
    model's own class images (against language drift). Returns ``(total, instance term, prior term)``;
    without prior tensors (or with λ = 0) the prior term is 0.
    """
    inst = F.mse_loss(eps_pred_inst.float(), eps_inst.float())
    if eps_pred_prior is None or eps_prior is None or weight == 0:
        prior = inst.new_zeros(())
    else:
        prior = F.mse_loss(eps_pred_prior.float(), eps_prior.float())
    return inst + weight * prior, inst, prior
