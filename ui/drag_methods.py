"""The Drag tab's method switch and what its inputs become: the methods with a one-line cost each, the name an API
client may give (any case, aliases), and the /drag inputs -> the engine request of the chosen method. No gradio.
"""
from __future__ import annotations

import json

from editing.images import load_image, load_mask
from editing.instant_drag import InstantDragRequest
from editing.region_drag import RegionDragRequest
from editing.requests import (GOODDRAG, GUIDED_FIELDS, DragRequest, EditError, GuidedDragRequest, pair_points,
                              parse_points)

FIELDS = DragRequest.FIELDS_UI  # name -> (min, max, default, help)

# label -> (engine name, what it costs: one line); the order is the switch's order.
ALL_METHODS = {  # costs measured on the toy model, 2 CPU cores (bench.toy_drag; DragDiffusion on a busy machine)
    "Instant": ("instant", "~0.3 s on toy, no training: one warp of the inverted latent, then denoising (FastDrag)"),
    "Region": ("region", "~0.3 s on toy, no training: the masked content (or discs of `radius`) copied along the drag (RegionDrag)"),
    "DragDiffusion": ("dragdiffusion", "slowest (20 s idle, minutes busy): an identity LoRA, then latent optimisation"),
    "GoodDrag": ("gooddrag", "DragDiffusion's cost or more: the drag spread over several timesteps, keeps content"),
    "DiffEditor": ("diffeditor", "~6–25 s, no training: gradient guidance while sampling"),
    "DragonDiffusion": ("dragondiffusion", "~6–25 s, no training: gradient guidance, no inpainting term"),
}
METHODS = {label: name for label, (name, _) in ALL_METHODS.items()}
COSTS = {label: ALL_METHODS[label][1] for label in METHODS}
# The page starts on Instant when it exists: it answers in about a second (toy, 2 CPU cores) and the live preview
# shows what it starts from. API clients that name no method keep getting DragDiffusion, as before the switch.
DEFAULT_METHOD = "Instant" if "Instant" in METHODS else "DragDiffusion"
API_DEFAULT_METHOD = "DragDiffusion"
_ALIASES = {"fastdrag": "instant", "regiondrag": "region"}


def method_name(choice) -> str:
    """A METHODS label or an engine name, any case ("DiffEditor", "diffeditor", "FastDrag") -> the engine name;
    none given -> API_DEFAULT_METHOD's."""
    key = str(choice or API_DEFAULT_METHOD).strip().lower()
    names = {label.lower(): name for label, name in METHODS.items()} | {n: n for n in METHODS.values()}
    name = names.get(_ALIASES.get(key, key))
    if name is None:
        raise EditError(f"Unknown method {choice!r}: use one of {', '.join(METHODS)}.")
    return name


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


def _gooddrag(settings: dict) -> dict:
    """GoodDrag's published values for every DragDiffusion setting left at its default (a moved slider wins)."""
    out = dict(settings)
    for k, v in GOODDRAG.items():
        if k not in FIELDS or settings.get(k, FIELDS[k][2]) == FIELDS[k][2]:
            out[k] = v
    return out


def drag_request(image, mask, points, prompt, settings: dict):
    """The /drag inputs -> the request of the chosen method.

    ``settings``: DragRequest values by name, ``method``, and the other methods' values as ``guided_<name>``,
    ``instant_<name>``, ``region_<name>``."""
    if not image:
        raise EditError("No image: upload or generate an image first.")
    method = method_name(settings.pop("method", None))
    guided, instant, region = (_prefixed(settings, p) for p in ("guided_", "instant_", "region_"))
    common = dict(image=load_image(image), points=parse_clicks(points), mask=load_mask(mask) if mask else None,
                  prompt=prompt or "")
    if method == "dragdiffusion":
        return DragRequest(**common, **settings)
    if method == "gooddrag":
        return DragRequest(**common, **_gooddrag(settings))
    if method == "instant":
        return InstantDragRequest(**common, **instant)
    if method == "region":
        return RegionDragRequest(**common, **region)
    # The guided methods share only steps and seed with the DragDiffusion sliders.
    shared = {k: settings.get(k, GUIDED_FIELDS[k][2]) for k in ("n_inference_steps", "seed")}
    return GuidedDragRequest(**common, method=method, **shared, **guided)
