"""How training talks to the task's ``Run`` (editing/runtime.py): phases, progress, cancel, previews.

The trainer takes a Run-shaped object: ``run.step(phase)`` (a context manager timing a phase and
attributing UNet calls to it), ``run.report(frac, msg)`` (progress; raises ``EditCancelled`` once
Cancel was pressed) and ``run.cancel`` (the Event, polled only where a checkpoint must be saved before
stopping). ``CallbackRun`` builds one from the older keyword arguments; ``Span`` narrows one to a part
of a phase's progress bar; ``preview_sink`` finds where preview images go.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from editing.requests import EditCancelled


class CallbackRun:
    """A Run from ``progress(phase, frac, msg)``, a ``cancel`` Event and ``unet_calls(phase)`` (e.g. ``Run.step``)."""

    def __init__(self, progress: Callable[[str, float, str], None] | None = None, cancel=None,
                 unet_calls: Callable[[str], Any] | None = None):
        self.progress, self.cancel, self._unet_calls = progress, cancel, unet_calls
        self.phase = "setup"

    @contextlib.contextmanager
    def step(self, name: str):
        self.phase = name
        with self._unet_calls(name) if self._unet_calls else contextlib.nullcontext():
            yield

    def report(self, frac: float, msg: str = "") -> None:
        if cancel_requested(self):
            raise EditCancelled("Cancelled.")
        if self.progress:
            self.progress(self.phase, float(frac), msg)


class Span:
    """A run as one sampling call sees it: the call's progress 0..1 fills ``[lo, hi]`` of the phase's bar."""

    def __init__(self, run, lo: float, hi: float, label: str):
        self.run, self.lo, self.hi, self.label = run, lo, hi, label

    def report(self, frac: float, msg: str = "") -> None:
        self.run.report(self.lo + (self.hi - self.lo) * frac, f"{self.label}, {msg}" if msg else self.label)


def cancel_requested(run) -> bool:
    """Whether Cancel was pressed (without raising: the trainer saves a checkpoint first)."""
    cancel = getattr(run, "cancel", None)
    return cancel is not None and cancel.is_set()


def preview_sink(run) -> Callable[[int, Any], None] | None:
    """Where training previews go: ``run.preview(step, image)`` where the Run has it, else the progress
    callback's own ``preview(step, image)`` (ui/personalize_tab.py passes such a callback); None if neither."""
    show = getattr(run, "preview", None)
    return show if show is not None else getattr(getattr(run, "progress", None), "preview", None)
