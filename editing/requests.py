"""The guided edits' requests (DragonDiffusion / DiffEditor move, paste and appearance) and the fields every guided
task shares (``GuidedParams``, also the guided drag's: ``editing.drag.guided``). Each request is typed and
validated on construction, the only thing that crosses from the UI/CLI into the engine.

Coordinates are ``(x, y)`` pixels of the image the user gave, origin top-left. Masks are ``H×W``
bool arrays of that image's size, ``True`` = may change.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from editing.checks import check_fields, check_image, field_table, normalize_mask, num, required_mask
from models.errors import EditError

# ---- training-free guided editing (DragonDiffusion / DiffEditor; editing/guidance/) ------------------
GUIDED_METHODS = ("diffeditor", "dragondiffusion")
# Published defaults per task (DragonDiffusion/DiffEditor demos): energy weights, CFG, energy scale.
GUIDED_DEFAULTS = {
    "guided_drag": dict(w_edit=4.0, w_content=6.0, w_contrast=0.0, w_inpaint=0.2, guidance_scale=4.0, energy_scale=2.0),
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
class MoveRequest(GuidedParams):
    """Move (and resize) the object under ``mask`` by ``offset`` pixels; the hole is filled like the
    background, or like ``hole_mask``'s region when given. With ``inpaint_hole`` (and no ``hole_mask``), an
    inpainting model, when there is one (the loaded model, ``--inpaint-model``, ``toy-inpaint`` beside ``toy``),
    then repaints the area the object left as background (``editing.fill``)."""

    image: Image.Image
    mask: np.ndarray
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    hole_mask: np.ndarray | None = None
    inpaint_hole: bool = True

    TASK = "move"

    def __post_init__(self):
        img = self._image("image", self.image)
        self._set("image", img)
        self._set("mask", self._required_mask("object mask", self.mask, img.size))
        self._set("offset", _offset(self.offset))
        self._set("scale", _scale(self.scale))
        if abs(self.offset[0]) < 1 and abs(self.offset[1]) < 1 and abs(self.scale - 1) < 1e-3:
            raise EditError("Nothing to do: give an offset or a scale other than 1.")
        if not isinstance(self.inpaint_hole, (bool, np.bool_)):
            raise EditError(f"inpaint_hole must be true or false, not {self.inpaint_hole!r}.")
        self._set("inpaint_hole", bool(self.inpaint_hole))
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
