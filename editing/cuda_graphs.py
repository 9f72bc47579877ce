"""CUDA-graph replay of the UNet passes that repeat with fixed shapes (drag steps, LoRA steps, sampling).

At batch 1-4 and 512² an SD-1.5 UNet pass on a modern GPU is bound by kernel-launch overhead
(measured on an H100: ~37 ms per eager batch-1 forward, a few ms of math). A loop that calls the
same UNet with the same shapes tens of times is recorded once and replayed, forward and backward,
through ``torch.cuda.make_graphed_callables``. Everything else stays eager. Off the GPU, or when
capture fails, the plain callable is returned, so results never depend on this module.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import torch

from editing.runtime import Run

log = logging.getLogger(__name__)
stats = {"captured": 0, "failed": 0}  # per process; tests check that capture really happens


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("DRAGCANVAS_CUDA_GRAPHS", "1") != "0"


def graphed(fn: Callable, sample_args: tuple, *, unet=None, batch: int = 1, use: bool = True) -> Callable:
    """``fn(*tensors) -> tensor or tuple of tensors``, replayed as a CUDA graph when possible.

    ``fn`` may be an ``nn.Module`` (its trainable parameters get gradients) or a function (only the
    tensor arguments do). Arguments must keep the shapes, dtypes and ``requires_grad`` of ``sample_args``.
    """
    if not use or not sample_args or not sample_args[0].is_cuda:
        return fn
    run = Run.counting(unet) if unet is not None else None
    # Warm-up and capture passes are not evaluations of the method: keep them out of the NFE count.
    with run.paused() if run is not None else contextlib.nullcontext():
        try:
            g = torch.cuda.make_graphed_callables(fn, sample_args, num_warmup_iters=2)
        except Exception as e:  # capture is an optimisation (any failure of it): eager is always correct
            stats["failed"] += 1
            log.warning("CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, str(e)[:200])
            torch.cuda.synchronize()
            return fn
    stats["captured"] += 1
    if unet is None:
        return g

    def replay(*args):
        counter = Run.counting(unet)  # replays bypass Module.__call__ and its counting hook
        if counter is not None:
            counter.count_replay(batch)
        return g(*args)

    return replay
