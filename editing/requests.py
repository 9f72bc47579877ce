"""Typed, validated requests: the only thing that crosses from the UI/CLI into the engine.

Coordinates are ``(x, y)`` pixels of the image the user gave, origin top-left. Masks are ``H×W``
bool arrays of that image's size, ``True`` = may change.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from editing.checks import (check_fields, check_image, check_number, check_point, check_text,  # noqa: F401
                            field_table, normalize_mask, num, required_mask)
from models.errors import EditCancelled, EditError  # noqa: F401 - re-exported: the engine's error types

Point = tuple[float, float]
PointPair = tuple[Point, Point]  # (handle, target)


MAX_POINT_PAIRS = 16


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


@dataclass(frozen=True)
class DragRequest:
    """One drag edit. Validates on construction; raises EditError with an actionable message."""

    image: Image.Image
    points: tuple[PointPair, ...]
    mask: np.ndarray | None = None
    prompt: str = ""
    lora_steps: int = num(80, 0, 400, "identity-LoRA fine-tuning steps (0 = skip); keeps the object's identity")
    lora_rank: int = num(16, 1, 128, "rank of the identity LoRA")
    lora_lr: float = num(5e-4, 1e-5, 1e-2, "identity-LoRA learning rate (AdamW)")
    inversion_strength: float = num(0.7, 0.05, 1.0, "how far back the image is inverted; 0.7 -> edit at t=681 of 50 DDIM steps")
    n_inference_steps: int = num(50, 2, 200, "DDIM steps of the full schedule")
    latent_lr: float = num(0.01, 1e-4, 0.1, "Adam learning rate of the latent optimisation")
    max_steps: int = num(80, 1, 400, "maximum motion-supervision steps per drag timestep (stops early when handles arrive)")
    r_m: int = num(1, 1, 8, "motion-supervision patch radius (feature cells)")
    r_p: int = num(3, 1, 16, "point-tracking search radius (feature cells)")
    lam: float = num(0.1, 0.0, 10.0, "weight of the keep-unmasked-area term")
    guidance_scale: float = num(1.0, 1.0, 20.0, "classifier-free guidance while denoising (1 = none, as for real images)")
    seed: int = num(42, 0, 2**31 - 1, "random seed (LoRA crops/noise)")
    # GoodDrag (Zhang et al., ICLR 2025); the defaults are DragDiffusion's, GOODDRAG holds the published values.
    drag_timesteps: int = num(1, 1, 50, "timesteps the drag is spread over, one denoising step between them "
                                        "(GoodDrag's alternating drag and denoising); 1 = all at one timestep")
    steps_per_track: int = num(1, 1, 20, "motion-supervision steps between point-tracking updates")
    drag_step: float = num(1.0, 0.5, 8.0, "how far (supervision-grid cells) one motion-supervision step pulls a "
                                          "handle: min(this, distance left) along the handle→target direction")
    preserve_handle: int = num(0, 0, 1, "1 = information-preserving supervision: pull toward the ORIGINAL "
                                        "handle's features, so content does not drift (GoodDrag)")
    patience: int = num(0, 0, 50, "stop dragging after this many point-tracking updates in a row move no "
                                  "handle (0 = never)")
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.image is None:
            raise EditError("No image: upload or generate an image first.")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        img = check_image(self.image, "image")
        set_("image", img)
        check_fields(self, DRAG_FIELDS)
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


DRAG_FIELDS = field_table(DragRequest)  # name -> (min, max, default, why): the UI sliders and CLI flags
DragRequest.FIELDS_UI = DRAG_FIELDS
# GoodDrag's published defaults as DragRequest overrides (method "gooddrag" in the CLI/UI/benchmarks). Source: the
# official code (zewei-Zhang/GoodDrag, bench_gooddrag.py, the script behind the paper's numbers): inversion 0.75 of
# 50 DDIM steps, LoRA 70 steps (lr 5e-4, rank 16 as ours), latent lr 0.02, λ 0.1, r1 = 4, r2 = 12, d = 4,
# drag_end_step 7 timesteps × track_per_step 10 × max_drag_per_track 3 = 30 supervision steps per timestep,
# max_track_no_change 5. Radii and d are in supervision-grid cells, which are 4 per latent cell as in the official
# half-resolution grid for SD-1.5; our 50-step schedule is theirs, so the timestep counts carry over unchanged.
GOODDRAG = dict(inversion_strength=0.75, lora_steps=70, latent_lr=0.02, lam=0.1, r_m=4, r_p=12, drag_step=4.0,
                drag_timesteps=7, steps_per_track=3, max_steps=30, patience=5, preserve_handle=1)
LORA_FIELDS = ("lora_steps", "lora_rank", "lora_lr", "seed")


@dataclass(frozen=True)
class IdentityLoraRequest:
    """Train a drag's identity LoRA ahead of the drag; the fields mean what they mean in ``DragRequest``
    (``None`` = its default)."""

    image: Image.Image
    prompt: str = ""
    lora_steps: int | None = None
    lora_rank: int | None = None
    lora_lr: float | None = None
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "image", check_image(self.image, "image"))
        object.__setattr__(self, "prompt", check_text(self.prompt, "prompt"))
        table = {k: DRAG_FIELDS[k] for k in LORA_FIELDS}
        check_fields(self, table, {k: spec.default for k, spec in table.items()})


# ---- training-free guided editing (DragonDiffusion / DiffEditor; editing/guidance/) ------------------
GUIDED_METHODS = ("diffeditor", "dragondiffusion")
# Published defaults per task (DragonDiffusion/DiffEditor demos): energy weights, CFG, energy scale.
GUIDED_DEFAULTS = {
    "drag": dict(w_edit=4.0, w_content=6.0, w_contrast=0.0, w_inpaint=0.2, guidance_scale=4.0, energy_scale=2.0),
    "move": dict(w_edit=4.0, w_content=6.0, w_contrast=0.2, w_inpaint=0.8, guidance_scale=4.0, energy_scale=0.5),
    "appearance": dict(w_edit=3.5, w_content=5.0, w_contrast=0.0, w_inpaint=0.0, guidance_scale=5.0, energy_scale=2.0),
    "paste": dict(w_edit=4.0, w_content=6.0, w_contrast=0.0, w_inpaint=0.0, guidance_scale=4.0, energy_scale=1.5),
}
@dataclass(frozen=True, kw_only=True)
class GuidedParams:
    """Fields every guided task shares; subclasses set ``TASK``. ``None`` = the task's published default."""

    prompt: str = ""
    method: str = "diffeditor"
    n_inference_steps: int = num(50, 4, 200, "DDIM steps; the schedules are defined on 50 and scale with this")
    # None = the task's published value (GUIDED_DEFAULTS)
    guidance_scale: float | None = num(None, 1.0, 20.0, "classifier-free guidance of the sampling")
    energy_scale: float | None = num(None, 0.0, 20.0, "strength of the gradient guidance (×1000 internally, as published)")
    w_edit: float | None = num(None, 0.0, 20.0, "weight of the edit energy (content goes where asked)")
    w_content: float | None = num(None, 0.0, 20.0, "weight of the content energy (the rest stays)")
    w_contrast: float | None = num(None, 0.0, 5.0, "move: push the vacated area away from the old object")
    w_inpaint: float | None = num(None, 0.0, 5.0, "fill the vacated area like the background")
    sde_strength: float = num(0.4, 0.0, 1.0, "DiffEditor regional SDE η inside the edit region (steps 11–19)")
    ip_adapter: str | None = None  # IP-Adapter spec for DiffEditor's image prompt (None = off)
    ip_scale: float = num(0.1, 0.0, 1.0, "DiffEditor image prompt (IP-Adapter) scale, steps 10–19; 0 = off")
    seed: int = num(42, 0, 2**31 - 1, "random seed (regional SDE noise)")
    notices: tuple[str, ...] = field(default=(), compare=False)

    TASK = ""

    def _set(self, k, v):
        object.__setattr__(self, k, v)

    def _validate_common(self):
        if not isinstance(self.prompt, str):
            raise EditError("The prompt must be text.")
        method = str(self.method or "").strip().lower()  # "DiffEditor", " diffeditor" and "diffeditor" are one method
        if method not in GUIDED_METHODS:
            raise EditError(f"Unknown method {self.method!r}: choose one of {', '.join(GUIDED_METHODS)}.")
        self._set("method", method)
        check_fields(self, GUIDED_FIELDS, GUIDED_DEFAULTS[self.TASK])
        if self.ip_adapter is not None and not isinstance(self.ip_adapter, str):
            raise EditError("ip_adapter must be a model spec (text) or None.")

    def _image(self, name: str, img) -> Image.Image:
        return check_image(img, name)

    def _required_mask(self, name: str, mask, size) -> np.ndarray:
        m, notices = required_mask(mask, size, name)
        self._set("notices", self.notices + tuple(notices))
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


GUIDED_FIELDS = field_table(GuidedParams)  # None default = the task's published value (GUIDED_DEFAULTS)


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
        s = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise EditError(f"The scale must be a positive number from 0.2 to 4, got {value!r}.") from None
    if isinstance(value, bool) or not math.isfinite(s) or s <= 0:
        raise EditError(f"The scale must be a positive number from 0.2 to 4, got {value!r}.")
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
