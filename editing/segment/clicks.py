"""Clicks and what a segmenter returns: the types every segmenter and caller share (no OpenCV, no torch)."""
from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from models.errors import EditError

CLICK_MODES = ("add", "add-part", "remove")
Point = tuple[float, float]


@dataclass(frozen=True)
class Click:
    """One click at ``(x, y)`` in pixels of the picture (origin top-left) and what it does (``CLICK_MODES``)."""

    x: float
    y: float
    mode: str = "add"

    def __post_init__(self):
        if self.mode not in CLICK_MODES:
            raise EditError(f"click mode {self.mode!r} is not one of {', '.join(CLICK_MODES)}.")
        if not all(isinstance(v, numbers.Real) and np.isfinite(v) for v in (self.x, self.y)):  # numpy scalars too
            raise EditError(f"a click needs two finite numbers x, y; got ({self.x!r}, {self.y!r}).")


@dataclass(frozen=True)
class SegmentResult:
    """The mask of the clicked object(s), which segmenter answered, and a one-line notice for the UI / CLI."""

    mask: np.ndarray = field(repr=False)  # (H, W) bool, True = object
    segmenter: str
    notice: str


@dataclass(frozen=True)
class ClickGroup:
    """The points of one object: the ``add`` click that began it, its ``add-part`` clicks, its ``remove`` clicks."""

    positive: tuple[Point, ...]
    negative: tuple[Point, ...] = ()


class Segmenter(Protocol):
    """What ``mask_from_clicks`` needs: a name for the notice and one object's mask from its points.

    ``object_mask(image, group)``: ``image`` (H, W, 3) uint8 RGB, ``group`` points inside the picture; returns an
    (H, W) bool mask, raising ``EditError`` (one line) when there is no object under the positive points."""

    name: str

    def object_mask(self, image: np.ndarray, group: ClickGroup) -> np.ndarray: ...


_CLICK_TEXT = re.compile(r"^\s*([+-]?)\s*(-?[\d.]+(?:e-?\d+)?)\s*,\s*(-?[\d.]+(?:e-?\d+)?)\s*$", re.IGNORECASE)


def parse_click(text: str) -> Click:
    """``"X,Y"`` -> an ``add`` click, ``"+X,Y"`` -> ``add-part``, ``"-X,Y"`` -> ``remove`` (pixels, origin top-left)."""
    m = _CLICK_TEXT.match(text or "")
    if not m:
        raise EditError(f"a click must be 'X,Y' (a new object), '+X,Y' (add a part) or '-X,Y' (remove a part) "
                        f"in pixels; got {text!r}.")
    sign, x, y = m.groups()
    try:
        return Click(float(x), float(y), {"": "add", "+": "add-part", "-": "remove"}[sign])
    except ValueError:
        raise EditError(f"a click must be two numbers 'X,Y'; got {text!r}.") from None


def group_clicks(clicks: Sequence[Click], size: tuple[int, int]) -> list[ClickGroup]:
    """Clicks in order -> one ``ClickGroup`` per object; every click checked against the picture's ``size`` (W, H).

    An ``add`` click begins a group; ``add-part`` and ``remove`` join the latest one (an ``add-part`` with no group
    yet begins one, a ``remove`` with none is an error: there is nothing to remove from)."""
    w, h = size
    groups: list[tuple[list[Point], list[Point]]] = []
    for c in clicks:
        if not (0 <= c.x < w and 0 <= c.y < h):
            raise EditError(f"the click at ({c.x:g}, {c.y:g}) is outside the picture ({w}×{h} px): click on the object.")
        if c.mode == "add" or (c.mode == "add-part" and not groups):
            groups.append(([], []))
        elif c.mode == "remove" and not groups:
            raise EditError(f"the click at ({c.x:g}, {c.y:g}) removes a part, but no object is selected yet: "
                            "begin with a plain click on the object.")
        groups[-1][0 if c.mode != "remove" else 1].append((float(c.x), float(c.y)))
    return [ClickGroup(tuple(p), tuple(n)) for p, n in groups]


