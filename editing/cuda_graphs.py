"""CUDA-graph replay of the UNet passes that repeat with fixed shapes (drag steps, LoRA steps, sampling).

At batch 1-4 and 512² an SD-1.5 UNet pass on a modern GPU is bound by kernel-launch overhead
(measured on an H100: ~37 ms per eager batch-1 forward, a few ms of math). A loop that calls the
same UNet with the same shapes tens of times is recorded once and replayed, forward and backward,
through ``torch.cuda.make_graphed_callables``. Everything else stays eager. Off the GPU, or when
capture fails, the plain callable is returned, so results never depend on this module.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)
stats = {"captured": 0, "failed": 0}  # per process; tests check that capture really happens


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("DRAGCANVAS_CUDA_GRAPHS", "1") != "0"


def count_replay(unet, batch: int) -> None:
    """Replays bypass ``Module.__call__``; tell the NFE counters (hooks marked ``_counts_nfe``)."""
    for hook in list(unet._forward_pre_hooks.values()):
        if getattr(hook, "_counts_nfe", False):
            hook(unet, (torch.empty(batch, 0),), {}, replay=True)


def graphed(fn: Callable, sample_args: tuple, *, unet=None, batch: int = 1, use: bool = True) -> Callable:
    """``fn(*tensors) -> tensor or tuple of tensors``, replayed as a CUDA graph when possible.

    ``fn`` may be an ``nn.Module`` (its trainable parameters get gradients) or a function (only the
    tensor arguments do). Arguments must keep the shapes, dtypes and ``requires_grad`` of ``sample_args``.
    """
    if not use or not sample_args or not sample_args[0].is_cuda:
        return fn
    # Warm-up and capture passes are not evaluations of the method: keep them out of the NFE count.
    counters = [h for h in unet._forward_pre_hooks.values() if getattr(h, "_counts_nfe", False)] if unet is not None else []
    for h in counters:
        h.paused = True
    try:
        g = torch.cuda.make_graphed_callables(fn, sample_args, num_warmup_iters=2)
    except Exception as e:  # noqa: BLE001 - capture is an optimisation; eager is always correct
        stats["failed"] += 1
        log.warning("CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, str(e)[:200])
        torch.cuda.synchronize()
        return fn
    finally:
        for h in counters:
            h.paused = False
    stats["captured"] += 1
    if unet is None:
        return g

    def replay(*args):
        count_replay(unet, batch)
        return g(*args)

    return replay
