"""The drag methods every benchmark knows (``bench.toy_drag``, ``bench.dragbench``, ``bench.perf``): the engine's one
method table (``editing.drag.methods``) and the benchmarks' own rows, ``noop`` (the baseline) and ``move``.

    from bench.methods import METHODS, run_method
    image, unet_calls, seconds = run_method("instant", editor, image, points, mask, prompt, settings)

Each row builds the method's own request from the same inputs — the image, ``((handle, target), …)`` in image
pixels, the H×W bool mask (``True`` = may change), the prompt — plus ``settings`` (that request's numeric fields,
e.g. ``{"n_inference_steps": 10}``, merged over the method's preset by the table's one rule) and runs it through
``editor.edit``. The name ``default`` is the method the Drag tab starts on.

Settings on a command line (``parse_settings``): ``FIELD=VALUE`` goes to every chosen method whose
request has that field; ``METHOD.FIELD=VALUE`` to that method only. A field no chosen method has is
an error, so a typo never silently benchmarks the defaults.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from editing.checks import check_number
from editing.drag.methods import DEFAULT_METHOD, DragMethod
from editing.drag.methods import METHODS as TABLE
from editing.requests import GUIDED_FIELDS, MoveRequest
from models.errors import EditError

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
    mask: str = "area"  # what its mask is: the editable "area" or the "object" that moves (DragMethod.mask)


def _row(m: DragMethod) -> Method:
    def build(image, points, mask, prompt, settings):
        return m.request(image, points, mask, prompt, settings)

    return Method(m.name, m.cost, build, lambda: dict(m.fields), m.mask)


def _move(image, points, mask, prompt, settings):
    """The Move tool: ``mask`` is the object (not the editable area), moved by the first pair's offset."""
    (hx, hy), (tx, ty) = tuple(points)[0]
    return MoveRequest(image=image, mask=mask, offset=(tx - hx, ty - hy), prompt=prompt, **settings)


METHODS: dict[str, Method] = {
    # noop checks a drag request's settings and ignores them, so one command line serves every method
    "noop": Method("noop", "the input unchanged: the baseline (MD = the drag distance); 0 UNet calls", None,
                   lambda: dict(TABLE["dragdiffusion"].fields)),
    **{name: _row(m) for name, m in TABLE.items()},
}
# The Move tool takes the object's own mask, which only the toy benchmark knows (DragBench's mask is the
# editable area): bench.toy_drag offers it, bench.dragbench does not.
EXTRA: dict[str, Method] = {
    "move": Method("move", "DiffEditor move of the object's own mask by the handle->target offset", _move,
                   lambda: dict(GUIDED_FIELDS), "object"),
}


def lookup(name: str, table: dict[str, Method] | None = None) -> Method:
    """A row by name; ``default`` is the Drag tab's method."""
    table = METHODS if table is None else table
    name = DEFAULT_METHOD if name == "default" else name
    if name not in table:
        raise EditError(f"Unknown method {name!r}: choose from {', '.join(table)} (or default).")
    return table[name]


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
            tables[n] = fields(n, table)
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
