"""The checks every request does, and the one place a request field's default, range and reason live.

A numeric request field is declared once::

    lora_steps: int = num(80, 0, 400, "identity-LoRA fine-tuning steps (0 = skip)")

``field_table(Request)`` turns those declarations into ``{name: FieldSpec(min, max, default, why)}``; the
request validates against it, and the UI sliders, CLI flags and ``--help`` are built from it.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from models.errors import EditError


class FieldSpec(NamedTuple):
    lo: float
    hi: float
    default: Any  # None: another table supplies it (e.g. a guided task's published default)
    why: str


def num(default, lo: float, hi: float, why: str):
    """A numeric dataclass field with its range and a one-line reason (read back by ``field_table``)."""
    return dataclasses.field(default=default, metadata={"spec": FieldSpec(lo, hi, default, why)})


def field_table(cls) -> dict[str, FieldSpec]:
    """``{name: FieldSpec}`` of every field of ``cls`` declared with ``num``, in declaration order."""
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls) if "spec" in f.metadata}


def _shown(value: Any) -> str:
    """What was sent, short: numbers as ``%g`` (1e+12, nan, inf), text quoted and cut at 40 characters."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    if isinstance(value, (int, np.integer)):
        return str(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bound(x: float, whole: bool) -> str:
    return str(int(x)) if whole else f"{x:g}"


def check_number(name: str, value: Any, table: dict) -> float | int:
    """Validate ``value`` against ``table[name] = (min, max, default, why)``; whole numbers when the default is
    an int. Text holding a number (``'12'``, what an HTTP client sends) is read; anything else that is not a
    finite number in range (``'abc'``, NaN, ±inf, ``True``, 2.5 for a whole-number field, 1e12 for a seed)
    raises one line naming the field, its range and what was sent, e.g. ``seed=1e+12 is outside
    [0, 2147483647] (a whole number); random seed …`` or ``n_inference_steps must be a whole number from 2 to
    200 (got 2.5); …``."""
    lo, hi, default, why = table[name]
    whole = isinstance(default, int) and not isinstance(default, bool)  # None default (published value): a float
    kind = "a whole number" if whole else "a number"
    span = f"from {_bound(lo, whole)} to {_bound(hi, whole)}"
    if isinstance(value, (bool, np.bool_)):
        raise EditError(f"{name} must be a number ({kind} {span}), got {_shown(value)}; {why}.")
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise EditError(f"{name} must be a number ({kind} {span}), got {_shown(value)}; {why}.") from None
    if not math.isfinite(v):
        raise EditError(f"{name} must be a finite number {span} (got {_shown(value)}); {why}.")
    if not lo <= v <= hi:
        raise EditError(f"{name}={_shown(value)} is outside [{_bound(lo, whole)}, {_bound(hi, whole)}] ({kind}); {why}.")
    if whole:
        if v != int(v):
            raise EditError(f"{name} must be a whole number {span} (got {_shown(value)}); {why}.")
        return int(v)
    return v


def check_fields(obj, table: dict, defaults: dict | None = None) -> None:
    """Validate (and normalise in place, on a frozen dataclass) every field of ``table``; a ``None`` value
    takes ``defaults[name]``."""
    for name in table:
        value = getattr(obj, name)
        if value is None and defaults is not None:
            value = defaults[name]
        object.__setattr__(obj, name, check_number(name, value, table))


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "")


def check_flag(name: str, value: Any) -> bool:
    """A switch: a bool, 0/1, or the text an HTTP client sends ("true"/"false", "yes"/"no", "on"/"off").
    Anything else raises (``bool("false")`` would silently be True)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise EditError(f"{name} must be true or false (got {_shown(value)}).")


def check_text(value, what: str) -> str:
    """Text or None (-> ""), else a clear error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EditError(f"The {what} must be text.")
    return value


def check_image(img, what: str) -> Image.Image:
    """A picture (PIL image, or a path / bytes / array, read by ``editing.images``) within the size policy
    (``images.MAX_PIXELS``, checked on the declared size before any decoding; at least 8 px a side), as RGB
    with the mode conversions of ``images.to_rgb`` (transparency on white, 16-bit rescaled, EXIF turned)."""
    from editing import images

    if img is None:
        raise EditError(f"No {what}: upload one first.")
    if not isinstance(img, (Image.Image, str, Path, bytes, bytearray, np.ndarray)):
        raise EditError(f"The {what} must be a picture, got {type(img).__name__}.")
    return images.load_image(img, what)


def check_point(p: Any, size: tuple[int, int], what: str) -> tuple[float, float]:
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


def required_mask(mask, size, what: str) -> tuple[np.ndarray, list[str]]:
    """A mask that must be painted: (H×W bool, notices other than emptiness)."""
    if mask is None:
        raise EditError(f"No {what}: paint the object first.")
    m, notices = normalize_mask(mask, size)
    if m is None:
        raise EditError(f"The {what} is empty: paint the object first.")
    return m, [n for n in notices if "empty" not in n]
