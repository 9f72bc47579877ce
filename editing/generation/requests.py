"""Sketch and text-to-image requests and their ControlNet / T2I-Adapter / IP-Adapter units, validated on
construction; each numeric field is declared once (``checks.num``) and the tables are derived."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from PIL import Image

from editing import conditions
from editing.checks import check_fields, check_text, field_table, num
from models.errors import EditError

MAX_BATCH = 8
MAX_UNITS = 4
MAX_SIDE = 2048

_STEPS = "DDIM steps (50 = the drag's default, so results are drag-ready)"
_CFG = "classifier-free guidance: how closely the prompt is followed"
_SEED = "random seed of the first image (image i uses seed + i)"


def _check_fields(obj, table: dict) -> None:
    check_fields(obj, table)


def _check_image(img, what: str) -> Image.Image:
    if img is None:
        raise EditError(f"{what} is missing.")
    if not isinstance(img, Image.Image):
        raise EditError(f"{what} must be a picture, got {type(img).__name__}.")
    if min(img.size) < 8:
        raise EditError(f"{what} is {img.width}×{img.height}; it must be at least 8 px on each side.")
    return img


def _check_spec(spec, what: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise EditError(f"No {what} model given: use 'tiny', a local folder or a Hub id.")
    return spec.strip()


# ---- units -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet: the model, its condition picture (preprocessed by ``preprocessor``) and when/how much it steers."""

    image: Image.Image
    model: str = "tiny"
    preprocessor: str = "none"
    options: Mapping = field(default_factory=dict)  # preprocessor options (editing/conditions.OPTIONS)
    scale: float = num(1.0, 0.0, 2.0, "how strongly this ControlNet steers (residuals × scale; 0 = off)")
    start: float = num(0.0, 0.0, 1.0, "fraction of the steps at which this unit starts steering")
    end: float = num(1.0, 0.0, 1.0, "fraction of the steps at which this unit stops steering")
    guess_mode: bool = False

    def __post_init__(self):
        object.__setattr__(self, "image", _check_image(self.image, "A ControlNet condition image").convert("RGB"))
        object.__setattr__(self, "model", _check_spec(self.model, "ControlNet"))
        object.__setattr__(self, "options", conditions.check_options(self.preprocessor, self.options))
        _check_fields(self, CONTROLNET_FIELDS)
        if self.start >= self.end:
            raise EditError(f"ControlNet guidance start ({self.start:g}) must be before its end ({self.end:g}).")
        object.__setattr__(self, "guess_mode", bool(self.guess_mode))

    def params(self) -> dict:
        return {"model": self.model, "preprocessor": self.preprocessor, "options": dict(self.options),
                "scale": self.scale, "start": self.start, "end": self.end, "guess_mode": self.guess_mode}



CONTROLNET_FIELDS = field_table(ControlNetUnit)

@dataclass(frozen=True)
class AdapterUnit:
    """One T2I-Adapter: the model, its condition picture and preprocessor, weight and conditioning factor."""

    image: Image.Image
    model: str = "tiny"
    preprocessor: str = "none"
    options: Mapping = field(default_factory=dict)
    weight: float = num(1.0, 0.0, 2.0, "how strongly this T2I-Adapter steers (features × weight; 0 = off)")
    conditioning_factor: float = num(1.0, 0.0, 1.0, "fraction of the (early, noisy) steps on which the adapter is applied")

    def __post_init__(self):
        object.__setattr__(self, "image", _check_image(self.image, "A T2I-Adapter condition image").convert("RGB"))
        object.__setattr__(self, "model", _check_spec(self.model, "T2I-Adapter"))
        object.__setattr__(self, "options", conditions.check_options(self.preprocessor, self.options))
        _check_fields(self, ADAPTER_FIELDS)

    def params(self) -> dict:
        return {"model": self.model, "preprocessor": self.preprocessor, "options": dict(self.options),
                "weight": self.weight, "conditioning_factor": self.conditioning_factor}



ADAPTER_FIELDS = field_table(AdapterUnit)

@dataclass(frozen=True)
class IPAdapterUnit:
    """An image prompt: one or more reference pictures (averaged into one prompt by the adapter) and a scale."""

    images: tuple[Image.Image, ...]
    model: str = "tiny"
    scale: float = num(0.6, 0.0, 2.0, "how strongly the reference image steers (0 = ignored)")

    def __post_init__(self):
        imgs = (self.images,) if isinstance(self.images, Image.Image) else tuple(self.images or ())
        if not imgs:
            raise EditError("The IP-Adapter needs a reference image.")
        if len(imgs) > MAX_UNITS:
            raise EditError(f"{len(imgs)} IP-Adapter reference images; at most {MAX_UNITS} are supported.")
        object.__setattr__(self, "images", tuple(_check_image(i, "An IP-Adapter reference image").convert("RGB") for i in imgs))
        object.__setattr__(self, "model", _check_spec(self.model, "IP-Adapter"))
        _check_fields(self, IP_FIELDS)

    def params(self) -> dict:
        return {"model": self.model, "scale": self.scale, "n_images": len(self.images)}



IP_FIELDS = field_table(IPAdapterUnit)

# ---- requests ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SketchRequest:
    """SDEdit: a sketch (RGB drawing, or an RGBA strokes layer over ``image`` / white) becomes a picture.

    ``scribble_controlnet`` (a ControlNet spec, e.g. ``tiny`` or a scribble ControlNet) additionally
    steers with the strokes, so low-strength results keep the lines."""

    sketch: Image.Image
    image: Image.Image | None = None  # the photo drawn over (None = a blank canvas)
    prompt: str = ""
    negative_prompt: str = ""
    strength: float = num(0.75, 0.0, 1.0, "SDEdit t0: low keeps your sketch (faithful), high lets the model redraw (realistic)")
    n_inference_steps: int = num(50, 2, 200, _STEPS)
    guidance_scale: float = num(7.5, 1.0, 30.0, _CFG)
    seed: int = num(42, 0, 2**31 - 1, _SEED)
    batch: int = num(1, 1, MAX_BATCH, "images per run")
    scribble_controlnet: str | None = None
    scribble_scale: float = num(1.0, 0.0, 2.0, "strength of the optional ControlNet-scribble assist")
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        def set_(k, v):
            object.__setattr__(self, k, v)

        sketch = _check_image(self.sketch, "The sketch")
        notices = list(self.notices)
        base = None if self.image is None else _check_image(self.image, "The photo under the sketch").convert("RGB")
        if base is not None and base.size != sketch.size:
            notices.append(f"The photo was {base.width}×{base.height}; it was resized to the sketch's "
                           f"{sketch.width}×{sketch.height}.")
            base = base.resize(sketch.size, Image.LANCZOS)
        if sketch.mode in ("RGBA", "LA"):  # a strokes layer: alpha = where someone drew
            sketch = sketch.convert("RGBA")
            strokes = conditions.strokes_mask(sketch)
            paper = (base or Image.new("RGB", sketch.size, (255, 255, 255))).convert("RGBA")
            composite = Image.alpha_composite(paper, sketch).convert("RGB")
        else:
            composite = sketch.convert("RGB")
            strokes = conditions.strokes_mask(composite, background=base)
        if not strokes.any():
            raise EditError("The sketch is blank: draw some strokes first (or raise nothing and upload a drawing).")
        set_("sketch", composite)
        set_("image", base)
        set_("prompt", check_text(self.prompt, "prompt"))
        set_("negative_prompt", check_text(self.negative_prompt, "negative prompt"))
        _check_fields(self, SKETCH_FIELDS)
        if self.scribble_controlnet is not None and not str(self.scribble_controlnet).strip():
            set_("scribble_controlnet", None)
        if self.scribble_controlnet is not None:
            set_("scribble_controlnet", _check_spec(self.scribble_controlnet, "scribble ControlNet"))
        set_("notices", tuple(notices))

    @property
    def strokes(self) -> Image.Image:
        """The drawn strokes as a white-on-black scribble (the ControlNet-scribble assist's condition)."""
        return conditions.scribble(self.sketch, background=self.image)

    def params(self) -> dict:
        return {k: getattr(self, k) for k in ("prompt", "negative_prompt", *SKETCH_FIELDS, "scribble_controlnet")}



SKETCH_FIELDS = field_table(SketchRequest)  # the Sketch tab's sliders and the CLI flags
SketchRequest.FIELDS_UI = SKETCH_FIELDS

@dataclass(frozen=True)
class GenerateRequest:
    """Text-to-image, optionally steered by ControlNet units, T2I-Adapter units and an IP-Adapter."""

    prompt: str
    negative_prompt: str = ""
    width: int = num(0, 0, MAX_SIDE, "image width in px (0 = the model's native size)")
    height: int = num(0, 0, MAX_SIDE, "image height in px (0 = the model's native size)")
    n_inference_steps: int = num(50, 2, 200, _STEPS)
    guidance_scale: float = num(7.5, 1.0, 30.0, _CFG)
    seed: int = num(42, 0, 2**31 - 1, _SEED)
    batch: int = num(1, 1, MAX_BATCH, "images per run")
    controlnets: tuple[ControlNetUnit, ...] = ()
    adapters: tuple[AdapterUnit, ...] = ()
    ip_adapter: IPAdapterUnit | None = None
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        def set_(k, v):
            object.__setattr__(self, k, v)

        set_("prompt", check_text(self.prompt, "prompt"))
        set_("negative_prompt", check_text(self.negative_prompt, "negative prompt"))
        _check_fields(self, GENERATE_FIELDS)
        for name, kind, what in (("controlnets", ControlNetUnit, "ControlNet"), ("adapters", AdapterUnit, "T2I-Adapter")):
            units = tuple(getattr(self, name) or ())
            if len(units) > MAX_UNITS:
                raise EditError(f"{len(units)} {what} units; at most {MAX_UNITS} can be combined.")
            if not all(isinstance(u, kind) for u in units):
                raise EditError(f"{name} must be {kind.__name__} values.")
            set_(name, units)
        if self.ip_adapter is not None and not isinstance(self.ip_adapter, IPAdapterUnit):
            raise EditError("ip_adapter must be an IPAdapterUnit.")

    def params(self) -> dict:
        return {**{k: getattr(self, k) for k in ("prompt", "negative_prompt", *GENERATE_FIELDS)},
                "controlnets": [u.params() for u in self.controlnets],
                "adapters": [u.params() for u in self.adapters],
                "ip_adapter": self.ip_adapter.params() if self.ip_adapter else None}

    def pictures(self) -> dict[str, Image.Image]:
        """The request's pictures by recipe name."""
        out = {f"controlnet{i}": u.image for i, u in enumerate(self.controlnets)}
        out.update({f"adapter{i}": u.image for i, u in enumerate(self.adapters)})
        if self.ip_adapter:
            out.update({f"ip{j}": im for j, im in enumerate(self.ip_adapter.images)})
        return out



GENERATE_FIELDS = field_table(GenerateRequest)
GenerateRequest.FIELDS_UI = GENERATE_FIELDS

