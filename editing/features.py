"""UNet feature capture with forward hooks (removed on exit); optional early stop."""
from __future__ import annotations

import torch

from editing.sampling import alpha_at, prediction, to_eps, unet_dtype


class _Captured(Exception):
    """Raised from a hook to end the UNet forward once every wanted feature is in hand."""


class FeatureCapture:
    """``with FeatureCapture(unet, (2,)) as fc: unet(...)`` -> ``fc.features[2]`` is up_blocks[2]'s output.

    With ``stop_early=True`` the forward is cut right after the deepest wanted up-block (callers use
    ``run_for_features``), so the later, most expensive high-resolution blocks never run.
    """

    def __init__(self, unet, blocks=(2,), stop_early: bool = False):
        self.unet, self.blocks, self.stop_early = unet, tuple(blocks), stop_early
        self.features: dict[int, torch.Tensor] = {}
        self._handles = []

    def _hook(self, idx: int):
        def fn(module, args, output):
            self.features[idx] = output
            if self.stop_early and len(self.features) == len(self.blocks):
                raise _Captured

        return fn

    def __enter__(self):
        self.features = {}
        self._handles = [self.unet.up_blocks[i].register_forward_hook(self._hook(i)) for i in self.blocks]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


def run_for_features(unet, x, t, cond, blocks=(2,), need_output: bool = False, schedule=None, **unet_kwargs):
    """One UNet pass returning ``(eps or None, {block: features})``; stops early if eps is not needed.
    ``unet_kwargs`` go to the UNet as they are (an IP-Adapter's image embeddings, SDXL's added conditions).

    The output is ε whatever the model predicts (``sampling.to_eps``; prediction type from ``schedule`` or
    what the loader recorded for the UNet), so DragDiffusion's one-step x̂₀ is right on v-prediction models."""
    dtype = unet_dtype(unet)
    with FeatureCapture(unet, blocks, stop_early=not need_output) as fc:
        try:
            out = unet(x.to(dtype), t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1).to(dtype),
                       **unet_kwargs).sample
        except _Captured:
            out = None
    if out is not None:
        pred, alphas = prediction(unet, schedule)
        if pred != "epsilon":
            out = to_eps(out, x, alpha_at(alphas, t, out), pred)
    return out, fc.features
