"""Typed, validated requests: the only thing that crosses from the UI/CLI into the engine.

Coordinates are ``(x, y)`` pixels of the image the user gave, origin top-left. Masks are ``H×W``
bool arrays of that image's size, ``True`` = may change.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

Point = tuple[float, float]
PointPair = tuple[Point, Point]  # (handle, target)


class EditError(Exception):
    """A problem the user can act on. ``str(e)`` is one line, shown as is in the UI and CLI."""


class EditCancelled(EditError):
    """The user pressed Cancel; nothing was changed."""


# name -> (min, max, default, one-line why). The UI builds its sliders from this table.
DRAG_FIELDS: dict[str, tuple[float, float, float, str]] = {
    "lora_steps": (0, 400, 80, "identity-LoRA fine-tuning steps (0 = skip); keeps the object's identity"),
    "lora_rank": (1, 128, 16, "rank of the identity LoRA"),
    "lora_lr": (1e-5, 1e-2, 5e-4, "identity-LoRA learning rate (AdamW)"),
    "inversion_strength": (0.05, 1.0, 0.7, "how far back the image is inverted; 0.7 -> edit at t=681 of 50 DDIM steps"),
    "n_inference_steps": (2, 200, 50, "DDIM steps of the full schedule"),
    "latent_lr": (1e-4, 0.1, 0.01, "Adam learning rate of the latent optimisation"),
    "max_steps": (1, 400, 80, "maximum motion-supervision steps (stops early when handles arrive)"),
    "r_m": (1, 8, 1, "motion-supervision patch radius (feature cells)"),
    "r_p": (1, 16, 3, "point-tracking search radius (feature cells)"),
    "lam": (0.0, 10.0, 0.1, "weight of the keep-unmasked-area term"),
    "guidance_scale": (1.0, 20.0, 1.0, "classifier-free guidance while denoising (1 = none, as for real images)"),
    "seed": (0, 2**31 - 1, 42, "random seed (LoRA crops/noise)"),
}
MAX_POINT_PAIRS = 16


def check_number(name: str, value: Any, table: dict) -> float | int:
    """Validate ``value`` against ``table[name] = (min, max, default, why)``; whole numbers when the default is an int."""
    lo, hi, default, why = table[name]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise EditError(f"{name} must be a number, got {value!r} ({why}).") from None
    if not math.isfinite(v):
        raise EditError(f"{name} must be a finite number, got {value!r} ({why}).")
    if not lo <= v <= hi:
        raise EditError(f"{name}={value} is outside [{lo}, {hi}] ({why}).")
    if isinstance(default, int) and not isinstance(default, bool):
        if v != int(v):
            raise EditError(f"{name} must be a whole number, got {value!r}.")
        return int(v)
    return v


def check_point(p: Any, size: tuple[int, int], what: str) -> Point:
    w, h = size
    try:
        x, y = (float(c) for c in p)
    except (TypeError, ValueError):
        raise EditError(f"{what} must be two numbers (x, y), got {p!r}.") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise EditError(f"{what} ({x}, {y}) is not a finite position.")
    if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
        raise EditError(f"{what} ({x:g}, {y:g}) is outside the {w}×{h} image.")
    return (x, y)


def pair_points(clicks: list[Point] | tuple[Point, ...]) -> tuple[PointPair, ...]:
    """Clicked points alternate handle, target, handle, target … -> pairs."""
    clicks = list(clicks or [])
    if not clicks:
        raise EditError("No points: click a handle point, then where it should go (target).")
    if len(clicks) % 2:
        raise EditError(f"{len(clicks)} points: every handle needs a target — add one more point or undo the last.")
    return tuple((tuple(clicks[i]), tuple(clicks[i + 1])) for i in range(0, len(clicks), 2))


_PAIR_RE = re.compile(r"^\s*([-\d.eE+]+)\s*,\s*([-\d.eE+]+)\s*>\s*([-\d.eE+]+)\s*,\s*([-\d.eE+]+)\s*$")


def parse_points(text: str) -> tuple[PointPair, ...]:
    """Parse ``"x,y>x,y;x,y>x,y"`` (handle>target pairs separated by ';')."""
    pairs = []
    for chunk in filter(None, (c.strip() for c in (text or "").split(";"))):
        m = _PAIR_RE.match(chunk)
        if not m:
            raise EditError(f"Cannot read point pair {chunk!r}: write handle>target as 'x,y>x,y'.")
        hx, hy, tx, ty = (float(g) for g in m.groups())
        pairs.append(((hx, hy), (tx, ty)))
    if not pairs:
        raise EditError("No points: give at least one pair as 'x,y>x,y'.")
    return tuple(pairs)


def normalize_mask(mask: Any, size: tuple[int, int]) -> tuple[np.ndarray | None, list[str]]:
    """Any mask-like (bool/uint8 array, PIL image) -> (H×W bool or None, notices)."""
    if mask is None:
        return None, []
    notices = []
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.ndim != 2:
        raise EditError(f"The mask must be a 2-D image, got shape {m.shape}.")
    if m.dtype != bool:
        m = np.nan_to_num(m.astype(np.float32)) > (127 if m.max(initial=0) > 1 else 0.5)
    w, h = size
    if m.shape != (h, w):
        notices.append(f"The mask was {m.shape[1]}×{m.shape[0]}; it was resized to the image's {w}×{h}.")
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    if not m.any():
        notices.append("The mask is empty, so it was ignored: the whole image may change.")
        return None, notices
    return m, notices


@dataclass(frozen=True)
class DragRequest:
    """One drag edit. Validates on construction; raises EditError with an actionable message."""

    image: Image.Image
    points: tuple[PointPair, ...]
    mask: np.ndarray | None = None
    prompt: str = ""
    seed: int = 42
    lora_steps: int = 80
    lora_rank: int = 16
    lora_lr: float = 5e-4
    inversion_strength: float = 0.7
    n_inference_steps: int = 50
    latent_lr: float = 0.01
    max_steps: int = 80
    r_m: int = 1
    r_p: int = 3
    lam: float = 0.1
    guidance_scale: float = 1.0
    notices: tuple[str, ...] = field(default=(), compare=False)

    FIELDS_UI = DRAG_FIELDS

    def __post_init__(self):
        if self.image is None:
            raise EditError("No image: upload or generate an image first.")
        if not isinstance(self.image, Image.Image):
            raise EditError(f"The image must be a PIL image, got {type(self.image).__name__}.")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        img = self.image if self.image.mode == "RGB" else self.image.convert("RGB")
        set_("image", img)
        if min(img.size) < 8:
            raise EditError(f"The image is {img.width}×{img.height}; it must be at least 8 px on each side.")
        for name in DRAG_FIELDS:
            set_(name, check_number(name, getattr(self, name), DRAG_FIELDS))
        if round(self.inversion_strength * self.n_inference_steps) < 1:
            raise EditError("inversion_strength × n_inference_steps must be at least 1 step.")
        if not isinstance(self.prompt, str):
            raise EditError("The prompt must be text.")
        pairs = tuple(self.points) if self.points is not None else ()
        if not pairs:
            raise EditError("No points: click a handle point, then where it should go (target).")
        if len(pairs) > MAX_POINT_PAIRS:
            raise EditError(f"{len(pairs)} point pairs; at most {MAX_POINT_PAIRS} are supported.")
        checked = []
        for i, pair in enumerate(pairs, 1):
            if len(pair) != 2:
                raise EditError(f"Point pair {i} must be (handle, target).")
            h = check_point(pair[0], img.size, f"Handle {i}")
            t = check_point(pair[1], img.size, f"Target {i}")
            if math.dist(h, t) < 1.0:
                raise EditError(f"Handle {i} and its target are the same point: move the target away.")
            checked.append((h, t))
        set_("points", tuple(checked))
        mask, notices = normalize_mask(self.mask, img.size)
        set_("mask", mask)
        set_("notices", tuple(self.notices) + tuple(notices))

    def replace(self, **changes) -> "DragRequest":
        return dataclasses.replace(self, notices=(), **changes)

    def params(self) -> dict:
        """The JSON-serialisable part (everything but pixels)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image", "mask", "notices")}
