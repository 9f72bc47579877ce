"""The drag methods, in one table: what the UI's method switch, the CLI's ``--method``, the API's ``method`` and the
benchmarks all read. Adding a method is one module in ``editing/drag/`` and one row here.

    from editing.drag.methods import lookup
    m = lookup("GoodDrag")                      # any case, or an alias ("fastdrag")
    request = m.request(image, points, mask, prompt, {"max_steps": 40})

A row names the method, its aliases, what it costs in one line, its request type and field table, its preset and
whether it trains. The one merge rule (``DragMethod.settings``): the request gets the preset's values, then every
setting the caller gave; a front end passes only what its person set (the CLI: the flags given; the bench:
``--set``; the UI cannot tell an untouched slider from one set to its default, so it passes the sliders that differ
from their field's default — see ``ui/drag_methods.py``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from editing.drag import inpaint, warp
from editing.drag.dragdiffusion import DRAG_FIELDS, GOODDRAG, DragRequest
from editing.drag.guided import GuidedDragRequest
from editing.drag.inpaint import INPAINT_FIELDS, InpaintDragRequest
from editing.drag.instant import INSTANT_FIELDS, InstantDragRequest
from editing.drag.region import REGION_FIELDS, RegionDragRequest
from editing.requests import GUIDED_FIELDS
from models.errors import EditError


@dataclass(frozen=True)
class DragMethod:
    name: str  # the API / CLI / bench name
    label: str  # the UI's
    cost: str  # what it costs, one line (measured on the toy model, 2 CPU cores)
    request_type: type
    fields: dict  # {field: FieldSpec} of its numeric settings
    preset: dict = field(default_factory=dict)  # values the method stands for, over the request's defaults
    trains: bool = False  # trains an identity LoRA first
    aliases: tuple[str, ...] = ()
    fixed: dict = field(default_factory=dict)  # request arguments that make the method (the guided ``method``)
    inputs: tuple[str, ...] = ()  # other inputs its request takes besides image, points, mask and prompt
    # the live preview, (image, mask, pairs) -> image in ≤ 0.2 s: what the method starts from (None: Instant's warp)
    preview: Callable | None = None
    # what its mask means: "area" (True = may change; DragDiffusion's and DragBench's) or "object" (True = the thing
    # that moves, Inpaint4Drag's: the warp carries every masked pixel, so a loose mask drags background along)
    mask: str = "area"

    def settings(self, given: dict | None = None) -> dict:
        """The one merge rule: the preset, then what the caller gave."""
        return {**self.preset, **(given or {})}

    def request(self, image, points, mask, prompt: str = "", given: dict | None = None, **inputs: Any):
        """This method's request for a drag of ``points`` on ``image`` (``mask``: True = may change / what moves);
        ``inputs``: other request arguments (the region method's painted regions, an IP-Adapter spec)."""
        return self.request_type(image=image, points=tuple(points or ()), mask=mask, prompt=prompt, **inputs,
                                 **self.fixed, **self.settings(given))


METHODS: dict[str, DragMethod] = {m.name: m for m in (
    DragMethod("instant", "Instant", "~0.3 s on toy, no training: one warp of the inverted latent, then denoising "
               "(FastDrag)", InstantDragRequest, INSTANT_FIELDS, aliases=("fastdrag",),
               preview=partial(warp.preview, rigid=bool(INSTANT_FIELDS["rigid"].default))),
    DragMethod("inpaint", "Inpaint", "~0.2 s on toy, no training: the object warped in pixels, an inpainting model "
               "repaints what it uncovered (Inpaint4Drag; mask the object itself)", InpaintDragRequest, INPAINT_FIELDS,
               aliases=("inpaint4drag",), preview=inpaint.preview, mask="object"),
    DragMethod("region", "Region", "~0.3 s on toy, no training: the masked content (or discs of `radius`) copied "
               "along the drag (RegionDrag)", RegionDragRequest, REGION_FIELDS, aliases=("regiondrag",),
               inputs=("handle_regions", "target_regions")),
    DragMethod("dragdiffusion", "DragDiffusion", "slowest (20 s idle, minutes busy): an identity LoRA, then latent "
               "optimisation", DragRequest, DRAG_FIELDS, trains=True),
    DragMethod("gooddrag", "GoodDrag", "DragDiffusion's cost or more: the drag spread over several timesteps, keeps "
               "content", DragRequest, DRAG_FIELDS, preset=GOODDRAG, trains=True),
    DragMethod("diffeditor", "DiffEditor", "~6–25 s, no training: gradient guidance while sampling",
               GuidedDragRequest, GUIDED_FIELDS, fixed={"method": "diffeditor"}, inputs=("ip_adapter",)),
    DragMethod("dragondiffusion", "DragonDiffusion", "~6–25 s, no training: gradient guidance, no inpainting term",
               GuidedDragRequest, GUIDED_FIELDS, fixed={"method": "dragondiffusion"}, inputs=("ip_adapter",)),
)}
# The Drag tab starts on Inpaint: on the toy deformation benchmark (bench/results/toy_drag_families.json, n = 50
# per family, one run) it is the one method at ≥ 90 % success on every family (move 100, scale 100, stretch 100,
# rotate 96 %; Instant 94 / 28 / 20 / 48 %), keeps every colour and class, changes no pixel outside the edit area
# but the seam, in 0.1–0.2 s; its live preview is the warp itself. API clients that name no method keep getting
# DragDiffusion, as before there was a switch.
DEFAULT_METHOD = "inpaint"
API_DEFAULT_METHOD = "dragdiffusion"


def lookup(name: str | None, default: str = API_DEFAULT_METHOD) -> DragMethod:
    """A method by name, label or alias, any case ("GoodDrag", "gooddrag", "FastDrag"); none given -> ``default``;
    ``"default"`` -> the method the Drag tab starts on."""
    key = str(name or default).strip().lower()
    if key == "default":
        key = DEFAULT_METHOD
    for m in METHODS.values():
        if key in (m.name, m.label.lower(), *m.aliases):
            return m
    raise EditError(f"Unknown method {name!r}: use one of {', '.join(m.label for m in METHODS.values())}.")


def live_preview(name: str | None):
    """(the preview function of method ``name``, the method whose preview it is): Instant's warp for the methods
    that have none of their own."""
    m = lookup(name, DEFAULT_METHOD)
    return (m.preview, m) if m.preview is not None else (METHODS["instant"].preview, METHODS["instant"])


def methods_with(field_name: str) -> list[str]:
    """The methods whose requests have a setting ``field_name``."""
    return [m.name for m in METHODS.values() if field_name in m.fields]


