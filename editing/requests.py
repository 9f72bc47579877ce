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

from models.errors import EditCancelled, EditError  # noqa: F401 - re-exported: the engine's error types

Point = tuple[float, float]
PointPair = tuple[Point, Point]  # (handle, target)


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


# ---- training-free guided editing (DragonDiffusion / DiffEditor; editing/guidance.py) ---------------
GUIDED_METHODS = ("diffeditor", "dragondiffusion")
# Published defaults per task (DragonDiffusion/DiffEditor demos): energy weights, CFG, energy scale.
GUIDED_DEFAULTS = {
    "drag": dict(w_edit=4.0, w_content=6.0, w_contrast=0.0, w_inpaint=0.2, guidance_scale=4.0, energy_scale=2.0),
    "move": dict(w_edit=4.0, w_content=6.0, w_contrast=0.2, w_inpaint=0.8, guidance_scale=4.0, energy_scale=0.5),
    "appearance": dict(w_edit=3.5, w_content=5.0, w_contrast=0.0, w_inpaint=0.0, guidance_scale=5.0, energy_scale=2.0),
    "paste": dict(w_edit=4.0, w_content=6.0, w_contrast=0.0, w_inpaint=0.0, guidance_scale=4.0, energy_scale=1.5),
}
GUIDED_FIELDS: dict[str, tuple[float, float, float | None, str]] = {  # None default = the task's published value
    "n_inference_steps": (4, 200, 50, "DDIM steps; the schedules are defined on 50 and scale with this"),
    "guidance_scale": (1.0, 20.0, None, "classifier-free guidance of the sampling"),
    "energy_scale": (0.0, 20.0, None, "strength of the gradient guidance (×1000 internally, as published)"),
    "w_edit": (0.0, 20.0, None, "weight of the edit energy (content goes where asked)"),
    "w_content": (0.0, 20.0, None, "weight of the content energy (the rest stays)"),
    "w_contrast": (0.0, 5.0, None, "move: push the vacated area away from the old object"),
    "w_inpaint": (0.0, 5.0, None, "fill the vacated area like the background"),
    "sde_strength": (0.0, 1.0, 0.4, "DiffEditor regional SDE η inside the edit region (steps 11–19)"),
    "ip_scale": (0.0, 1.0, 0.1, "DiffEditor image prompt (IP-Adapter) scale, steps 10–19; 0 = off"),
    "seed": (0, 2**31 - 1, 42, "random seed (regional SDE noise)"),
}


@dataclass(frozen=True, kw_only=True)
class GuidedParams:
    """Fields every guided task shares; subclasses set ``TASK``. ``None`` = the task's published default."""

    prompt: str = ""
    method: str = "diffeditor"
    n_inference_steps: int = 50
    guidance_scale: float | None = None
    energy_scale: float | None = None
    w_edit: float | None = None
    w_content: float | None = None
    w_contrast: float | None = None
    w_inpaint: float | None = None
    sde_strength: float = 0.4
    ip_adapter: str | None = None  # IP-Adapter spec for DiffEditor's image prompt (None = off)
    ip_scale: float = 0.1
    seed: int = 42
    notices: tuple[str, ...] = field(default=(), compare=False)

    TASK = ""

    def _set(self, k, v):
        object.__setattr__(self, k, v)

    def _validate_common(self):
        if not isinstance(self.prompt, str):
            raise EditError("The prompt must be text.")
        method = str(self.method or "").lower()
        if method not in GUIDED_METHODS:
            raise EditError(f"Unknown method {self.method!r}: choose one of {', '.join(GUIDED_METHODS)}.")
        self._set("method", method)
        defaults = GUIDED_DEFAULTS[self.TASK]
        for name in GUIDED_FIELDS:
            value = getattr(self, name)
            if value is None:
                value = defaults[name]
            self._set(name, check_number(name, value, GUIDED_FIELDS))
        if self.ip_adapter is not None and not isinstance(self.ip_adapter, str):
            raise EditError("ip_adapter must be a model spec (text) or None.")

    def _image(self, name: str, img) -> Image.Image:
        if img is None:
            raise EditError(f"No {name}: upload one first.")
        if not isinstance(img, Image.Image):
            raise EditError(f"The {name} must be a PIL image, got {type(img).__name__}.")
        img = img if img.mode == "RGB" else img.convert("RGB")
        if min(img.size) < 8:
            raise EditError(f"The {name} is {img.width}×{img.height}; it must be at least 8 px on each side.")
        return img

    def _required_mask(self, name: str, mask, size) -> np.ndarray:
        if mask is None:
            raise EditError(f"No {name}: paint the object first.")
        m, notices = normalize_mask(mask, size)
        if m is None:
            raise EditError(f"The {name} is empty: paint the object first.")
        self._set("notices", self.notices + tuple(n for n in notices if "empty" not in n))
        return m

    def _reference(self, size, what: str) -> None:
        """Validate ``reference`` + ``reference_mask``; a reference of another size is resized (said so)."""
        ref = self._image("reference image", self.reference)
        if ref.size != size:
            self._set("notices", self.notices + (f"The reference was {ref.width}×{ref.height}; it was resized to "
                                                 f"the image's {size[0]}×{size[1]}.",))
            ref = ref.resize(size, Image.LANCZOS)
        self._set("reference", ref)
        if self.reference_mask is None:
            raise EditError(f"The reference image needs a mask: {what}.")
        self._set("reference_mask", self._required_mask("reference mask", self.reference_mask, ref.size))

    def params(self) -> dict:
        skip = {"image", "mask", "reference", "reference_mask", "hole_mask", "notices"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def replace(self, **changes):
        return dataclasses.replace(self, notices=(), **changes)


def _offset(value, what="offset") -> tuple[float, float]:
    try:
        dx, dy = (float(v) for v in value)
    except (TypeError, ValueError):
        raise EditError(f"The {what} must be two numbers (dx, dy), got {value!r}.") from None
    if not (math.isfinite(dx) and math.isfinite(dy)):
        raise EditError(f"The {what} ({dx}, {dy}) is not finite.")
    return dx, dy


def _scale(value) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise EditError(f"The scale must be a number, got {value!r}.") from None
    if not math.isfinite(s) or s <= 0:
        raise EditError(f"The scale must be a positive number, got {value!r}.")
    if not 0.2 <= s <= 4.0:
        raise EditError(f"Scale {s:g} is outside [0.2, 4]: resize in smaller steps.")
    return s


@dataclass(frozen=True)
class GuidedDragRequest(GuidedParams):
    """Drag with DiffEditor / DragonDiffusion: no LoRA; feature-correspondence gradient guidance."""

    image: Image.Image
    points: tuple[PointPair, ...]
    mask: np.ndarray | None = None

    TASK = "drag"

    def __post_init__(self):
        base = DragRequest(self.image, self.points, self.mask, prompt=self.prompt if isinstance(self.prompt, str) else "")
        self._set("image", base.image)
        self._set("points", base.points)
        self._set("mask", base.mask)
        self._set("notices", tuple(self.notices) + base.notices)
        self._validate_common()


@dataclass(frozen=True)
class MoveRequest(GuidedParams):
    """Move (and resize) the object under ``mask`` by ``offset`` pixels; the hole is filled like the
    background, or like ``hole_mask``'s region when given."""

    image: Image.Image
    mask: np.ndarray
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    hole_mask: np.ndarray | None = None

    TASK = "move"

    def __post_init__(self):
        img = self._image("image", self.image)
        self._set("image", img)
        self._set("mask", self._required_mask("object mask", self.mask, img.size))
        self._set("offset", _offset(self.offset))
        self._set("scale", _scale(self.scale))
        if abs(self.offset[0]) < 1 and abs(self.offset[1]) < 1 and abs(self.scale - 1) < 1e-3:
            raise EditError("Nothing to do: give an offset or a scale other than 1.")
        if self.hole_mask is not None:
            hole, notices = normalize_mask(self.hole_mask, img.size)
            self._set("hole_mask", hole)
            self._set("notices", self.notices + tuple(n for n in notices if "empty" not in n))
        self._validate_common()


@dataclass(frozen=True)
class PasteRequest(GuidedParams):
    """Cut the object under ``reference_mask`` from ``reference`` and paste it into ``image``: its centre moves
    by ``offset`` from where it sits in the reference (resized to the image's size), scaled by ``scale``."""

    image: Image.Image
    reference: Image.Image
    reference_mask: np.ndarray
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    reference_prompt: str = ""

    TASK = "paste"

    def __post_init__(self):
        img = self._image("image", self.image)
        self._set("image", img)
        self._reference(img.size, "paint the object to paste")
        self._set("offset", _offset(self.offset))
        self._set("scale", _scale(self.scale))
        if not isinstance(self.reference_prompt, str):
            raise EditError("The reference prompt must be text.")
        self._validate_common()


@dataclass(frozen=True)
class AppearanceRequest(GuidedParams):
    """Give the object under ``mask`` in ``image`` the look of the object under ``reference_mask`` in ``reference``."""

    image: Image.Image
    mask: np.ndarray
    reference: Image.Image
    reference_mask: np.ndarray
    reference_prompt: str = ""

    TASK = "appearance"

    def __post_init__(self):
        img = self._image("image", self.image)
        self._set("image", img)
        self._set("mask", self._required_mask("object mask", self.mask, img.size))
        self._reference(img.size, "paint the object whose look to take")
        if not isinstance(self.reference_prompt, str):
            raise EditError("The reference prompt must be text.")
        self._validate_common()
