"""The Drag tab's method switch and what its inputs become: the methods with a one-line cost each, the name an API
client may give (any case, aliases), and the /drag inputs -> the engine request of the chosen method. No gradio.
"""
from __future__ import annotations

import json

from editing.drag.common import pair_points, parse_points
from editing.drag.methods import METHODS as TABLE
from editing.drag.methods import lookup
from editing.images import load_image, load_mask
from editing.requests import GUIDED_FIELDS
from models.errors import EditError

# label -> engine name, in the switch's order, and what each costs (one line), all from the one method table
METHODS = {m.label: m.name for m in TABLE.values()}
COSTS = {m.label: m.cost for m in TABLE.values()}
DEFAULT_METHOD = lookup("default").label
API_DEFAULT_METHOD = lookup(None).label
FIELDS = TABLE["dragdiffusion"].fields  # the DragDiffusion sliders (GoodDrag shares them)
PREFIXES = {"instant": "instant_", "region": "region_", "inpaint": "inpaint_", "diffeditor": "guided_",
            "dragondiffusion": "guided_"}


def canvas_label(choice) -> str:
    """What the Drag canvas asks for under ``choice``: the object itself for a method that moves what is masked
    (Inpaint), the area that may change for the others."""
    if lookup(choice).mask == "object":
        return "Image: paint or click the object to move (just the object: all of the mask moves)"
    return "Image: paint the area that may change"


def method_name(choice) -> str:
    """A METHODS label or an engine name, any case ("DiffEditor", "diffeditor", "FastDrag") -> the engine name;
    none given -> API_DEFAULT_METHOD's."""
    return lookup(choice).name


def method_info() -> str:
    return " · ".join(f"**{label}**: {COSTS[label]}" for label in METHODS)


def parse_clicks(text: str | None):
    """'[[x, y], [x, y], ...]' (alternating handle, target) or 'x,y>x,y;...' -> ((handle, target), ...)."""
    text = (text or "").strip()
    if text and not text.startswith("["):
        return parse_points(text)
    try:
        clicks = json.loads(text or "[]")
    except json.JSONDecodeError:
        raise EditError('Points must be JSON like "[[x, y], [x, y]]": handle, target, handle, target, …') from None
    if not isinstance(clicks, list) or not all(isinstance(p, list) and len(p) == 2 for p in clicks):
        raise EditError('Points must be a list of [x, y] pairs like "[[10, 20], [30, 20]]".')
    return pair_points([tuple(p) for p in clicks])


def _prefixed(settings: dict, prefix: str) -> dict:
    return {k[len(prefix):]: settings.pop(k) for k in list(settings) if k.startswith(prefix)}


def set_by_person(values: dict, table: dict) -> dict:
    """The settings a person set: an untouched slider and one moved back to its default look the same here, so
    only values other than the field's default count (and the method's preset fills the rest)."""
    return {k: v for k, v in values.items() if k not in table or v != table[k].default}


def drag_request(image, mask, points, prompt, settings: dict):
    """The /drag inputs -> the request of the chosen method, through its row of the one method table.

    ``settings``: DragRequest values by name, ``method``, and the other methods' values as ``guided_<name>``,
    ``instant_<name>``, ``region_<name>``, ``inpaint_<name>``."""
    if not image:
        raise EditError("No image: upload or generate an image first.")
    settings = dict(settings)
    m = lookup(settings.pop("method", None))
    own = {p: _prefixed(settings, p) for p in set(PREFIXES.values())}
    if m.name in PREFIXES:
        values = own[PREFIXES[m.name]]
        if m.request_type is TABLE["diffeditor"].request_type:
            # the guided methods share only steps and seed with the DragDiffusion sliders
            values = {k: settings.get(k, GUIDED_FIELDS[k].default) for k in ("n_inference_steps", "seed")} | values
    else:
        values = set_by_person(settings, m.fields)
    return m.request(load_image(image), parse_clicks(points), load_mask(mask) if mask else None, prompt or "", values)
