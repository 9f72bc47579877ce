"""How training talks to the task's ``Run`` (editing/runtime.py) beyond ``step`` / ``report`` / ``preview``:
``Span`` narrows it to a part of a phase's progress bar, ``cancel_requested`` polls Cancel without raising
(where a checkpoint must be saved before stopping).
"""
from __future__ import annotations


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
