"""The drag methods every benchmark knows, in one table (``bench.toy_drag``, ``bench.dragbench``, ``bench.perf``).

    from bench.methods import METHODS, run_method
    image, unet_calls, seconds = run_method("instant", editor, image, points, mask, prompt, settings)

Each entry builds the method's own request from the same inputs — the image, ``((handle, target), …)``
in image pixels, the H×W bool mask (``True`` = may change), the prompt — plus ``settings`` (that
request's numeric fields, e.g. ``{"n_inference_steps": 10}``) and runs it through ``editor.edit``.
The request modules of the newer methods are imported only when the method runs (or its fields are
asked for), so the table is complete even where one of them is not installed: ``available(name)``
says why a method cannot run.

Settings on a command line (``parse_settings``): ``FIELD=VALUE`` goes to every chosen method whose
request has that field; ``METHOD.FIELD=VALUE`` to that method only. A field no chosen method has is
an error, so a typo never silently benchmarks the defaults.
"""
from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from editing.checks import check_number
from editing.requests import EditError

Builder = Callable[..., Any]  # (image, points, mask, prompt, settings) -> a request editor.edit takes


@dataclass(frozen=True)
class Outcome:
    """What one method run gave: unpacks as ``image, unet_calls, seconds``; ``result`` keeps the engine's
    notices, recipe and timings (None for ``noop``)."""

    image: Any
    unet_calls: int
    seconds: float
    result: Any = None

    def __iter__(self):
        return iter((self.image, self.unet_calls, self.seconds))


@dataclass(frozen=True)
class Method:
    name: str
    about: str  # one line: what it does and what it costs
    build: Builder | None  # None: the baseline, no request at all
    fields: Callable[[], dict]  # {field: FieldSpec} of the settings its request takes
    needs: tuple[str, str | None] | None = None  # (module, attribute) that must exist to run it


# ---- request builders (imports are lazy: the newer methods' modules may not be installed) ---------
def _fields_of(module: str, attr: str) -> Callable[[], dict]:
    return lambda: dict(getattr(importlib.import_module(module), attr))


def _drag(image, points, mask, prompt, settings):
    from editing.requests import DragRequest

    return DragRequest(image, tuple(points), mask, prompt=prompt, **settings)


def _gooddrag(image, points, mask, prompt, settings):
    """DragDiffusion with GoodDrag's published options (AlDD, information-preserving supervision)."""
    from editing.requests import GOODDRAG, DragRequest

    return DragRequest(image, tuple(points), mask, prompt=prompt, **{**GOODDRAG, **settings})


def _guided(method: str) -> Builder:
    def build(image, points, mask, prompt, settings):
        from editing.requests import GuidedDragRequest

        return GuidedDragRequest(image=image, points=tuple(points), mask=mask, prompt=prompt, method=method, **settings)

    return build


def _instant(image, points, mask, prompt, settings):
    from editing.instant_drag import InstantDragRequest

    return InstantDragRequest(image=image, points=tuple(points), mask=mask, prompt=prompt, **settings)


def _region(image, points, mask, prompt, settings):
    """Regions from the points (a disc of the request's radius around each handle and target)."""
    from editing.region_drag import RegionDragRequest

    return RegionDragRequest(image=image, points=tuple(points), mask=mask, prompt=prompt, **settings)


def _move(image, points, mask, prompt, settings):
    """The Move tool: ``mask`` is the object (not the editable area), moved by the first pair's offset."""
    from editing.requests import MoveRequest

    (hx, hy), (tx, ty) = tuple(points)[0]
    return MoveRequest(image=image, mask=mask, offset=(tx - hx, ty - hy), prompt=prompt, **settings)


_DRAG_FIELDS = _fields_of("editing.requests", "DRAG_FIELDS")
_GUIDED_FIELDS = _fields_of("editing.requests", "GUIDED_FIELDS")

METHODS: dict[str, Method] = {m.name: m for m in (
    # noop checks a drag request's settings and ignores them, so one command line serves every method
    Method("noop", "the input unchanged: the baseline (MD = the drag distance); 0 UNet calls", None, _DRAG_FIELDS),
    Method("dragdiffusion", "DragDiffusion: identity LoRA, DDIM inversion, latent optimisation at one t; "
           "the slowest (LoRA + up to 80 gradient steps)", _drag, _DRAG_FIELDS),
    Method("gooddrag", "GoodDrag options of DragDiffusion: drag and denoise alternate, supervision toward the "
           "original handle features; LoRA + gradient steps", _gooddrag, _DRAG_FIELDS, ("editing.requests", "GOODDRAG")),
    Method("diffeditor", "DiffEditor: inversion + memory bank, gradient guidance and regional SDE; no LoRA",
           _guided("diffeditor"), _GUIDED_FIELDS),
    Method("dragondiffusion", "DragonDiffusion: inversion + memory bank, gradient guidance; no LoRA",
           _guided("dragondiffusion"), _GUIDED_FIELDS),
    Method("instant", "FastDrag-style: short inversion, one-step latent warp, K/V injection; no gradients",
           _instant, _fields_of("editing.instant_drag", "INSTANT_FIELDS"), ("editing.instant_drag", "InstantDragRequest")),
    Method("region", "RegionDrag-style: regions from the points, cached latents copied handle -> target, "
           "K/V pasted; ~20 UNet passes, no gradients",
           _region, _fields_of("editing.region_drag", "REGION_FIELDS"), ("editing.region_drag", "RegionDragRequest")),
)}
# The Move tool takes the object's own mask, which only the toy benchmark knows (DragBench's mask is the
# editable area): bench.toy_drag offers it, bench.dragbench does not.
EXTRA: dict[str, Method] = {
    "move": Method("move", "DiffEditor move of the object's own mask by the handle->target offset", _move, _GUIDED_FIELDS),
}


def lookup(name: str, table: dict[str, Method] | None = None) -> Method:
    table = METHODS if table is None else table
    if name not in table:
        raise EditError(f"Unknown method {name!r}: choose from {', '.join(table)}.")
    return table[name]


def available(name: str, table: dict[str, Method] | None = None) -> str | None:
    """None when ``name`` can run here, else why not (its module or attribute is missing)."""
    m = lookup(name, table)
    if m.needs is None:
        return None
    module, attr = m.needs
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return f"method {name!r} needs {module}, which is not installed"
    if attr and not hasattr(importlib.import_module(module), attr):
        return f"method {name!r} needs {module}.{attr}, which does not exist"
    return None


def fields(name: str, table: dict[str, Method] | None = None) -> dict:
    """{field: FieldSpec} of the numeric settings ``name``'s request takes (noop: a drag's, ignored)."""
    return lookup(name, table).fields()


def build_request(name: str, image, points, mask, prompt: str, settings: dict | None = None,
                  table: dict[str, Method] | None = None):
    """The request ``name`` would run (EditError on a bad input; None for noop)."""
    m = lookup(name, table)
    return None if m.build is None else m.build(image, points, mask, prompt, dict(settings or {}))


def run_method(name: str, editor, image, points, mask, prompt: str, settings: dict | None = None,
               table: dict[str, Method] | None = None, progress=None) -> Outcome:
    """Run one method on one input: the edited image, UNet calls (batch elements) and wall seconds."""
    m = lookup(name, table)
    if m.build is None:
        return Outcome(image, 0, 0.0)
    why = available(name, table)
    if why:
        raise EditError(why + ".")
    t0 = time.perf_counter()
    req = m.build(image, points, mask, prompt, dict(settings or {}))
    result = editor.edit(req, progress=progress)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the time covers the work, not its queueing
    return Outcome(result.image, int(sum(result.unet_calls.values())), time.perf_counter() - t0, result)


# ---- settings from the command line -------------------------------------------------------------
def parse_value(name: str, text: str, spec) -> float | int:
    """``text`` as the field's type (int when its default is an int), validated against its range."""
    return check_number(name, text, {name: spec})


def parse_settings(items: list[str] | None, names: list[str], table: dict[str, Method] | None = None) -> dict[str, dict]:
    """``["max_steps=40", "instant.n_inference_steps=8"]`` -> ``{method: {field: value}}`` for each of ``names``.

    A bare FIELD goes to every method in ``names`` whose request has it; ``METHOD.FIELD`` to that one.
    Raises EditError for a malformed item, a method not in ``names``, or a field no target method has.
    """
    out: dict[str, dict] = {n: {} for n in names}
    tables: dict[str, dict] = {}

    def table_of(n: str) -> dict:
        if n not in tables:
            why = available(n, table)
            tables[n] = {} if why else fields(n, table)
        return tables[n]

    for item in items or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise EditError(f"--set {item!r}: write FIELD=VALUE or METHOD.FIELD=VALUE.")
        method, dot, field_name = key.rpartition(".")
        targets = [method] if dot else list(names)
        if dot and method not in names:
            raise EditError(f"--set {item!r}: {method!r} is not among the chosen methods ({', '.join(names)}).")
        hit = [n for n in targets if field_name in table_of(n)]
        if not hit:
            known = sorted({f for n in targets for f in table_of(n)})
            raise EditError(f"--set {item!r}: no chosen method has a field {field_name!r}; "
                            f"fields: {', '.join(known) or '(none)'}.")
        for n in hit:
            out[n][field_name] = parse_value(field_name, value, table_of(n)[field_name])
    return out
