"""``python -m editing drag`` (DragDiffusion, GoodDrag, DiffEditor, DragonDiffusion, instant, region) and
``python -m editing replay``.

    python -m editing drag --image photo.png --points "120,200>180,190" --mask editable.png --out dragged.png
    python -m editing drag --method diffeditor --image photo.png --points "120,200>180,190" --energy-scale 2
    python -m editing drag --method instant --image photo.png --points "120,200>180,190" --mask object.png
    python -m editing drag --method region --image photo.png --handle-region a.png --target-region b.png
    python -m editing replay dragged.json --out again.png   # or any PNG DragCanvas wrote
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from editing.cli.common import (
    add_common,
    add_fields,
    add_guided_flags,
    add_mask_click_flags,
    describe,
    editor,
    flag,
    given,
    lora_specs,
    progress,
    resolve_mask,
    write,
)
from editing.drag.common import parse_points
from editing.drag.methods import API_DEFAULT_METHOD, METHODS, lookup, methods_with
from editing.requests import GUIDED_DEFAULTS, GUIDED_FIELDS
from models.errors import EditError

log = logging.getLogger(__name__)

ALL_FIELDS = {n: spec for m in METHODS.values() for n, spec in m.fields.items()}


def drag_request(args):
    """The request the flags ask for, built by the method's row of the one table; a flag of another method is an
    error."""
    from editing.images import load_image, load_mask

    m = lookup(args.method)
    image = load_image(args.image)
    mask = resolve_mask(args, image)
    settings = given(args, ALL_FIELDS)
    wrong = sorted(set(settings) - set(m.fields))
    if wrong:
        raise EditError(f"{flag(wrong[0])} applies to --method {'/'.join(methods_with(wrong[0]))} only.")
    regions = (args.handle_region or [], args.target_region or [])
    if (regions[0] or regions[1]) and m.name != "region":
        raise EditError("--handle-region/--target-region apply to --method region only.")
    inputs = {"ip_adapter": args.ip_adapter} if "ip_adapter" in m.inputs else {}
    if regions[0] or regions[1]:
        if args.points:
            raise EditError("Give either --points or --handle-region/--target-region, not both.")
        inputs["handle_regions"] = tuple(load_mask(p, "handle region") for p in regions[0])
        inputs["target_regions"] = tuple(load_mask(p, "target region") for p in regions[1])
        return m.request(image, (), mask, args.prompt, settings, **inputs)
    if not args.points:
        need = "--points (with --radius) or --handle-region/--target-region" if m.name == "region" else '--points "x,y>x,y"'
        raise EditError(f"--method {m.name} needs {need}.")
    return m.request(image, parse_points(args.points), mask, args.prompt, settings, **inputs)


def make_drag_ready(ed, image_path) -> bool:
    """If the PNG at ``image_path`` carries a sketch/generate recipe, replay it so a drag of it skips
    inversion and LoRA. True when the replay reproduced this exact image."""
    from editing.images import image_hash, load_image, read_recipe

    try:
        recipe = read_recipe(image_path)
    except Exception:
        log.debug("no readable recipe in %s", image_path, exc_info=True)
        return False
    if not recipe or recipe.get("task") not in ("generate", "sketch"):
        return False
    result = ed.replay(recipe)
    return image_hash(result.image) == image_hash(load_image(image_path)) and ed.is_drag_ready(result.image)


def cmd_drag(args) -> None:
    req = drag_request(args)
    ed = editor(args)
    make_drag_ready(ed, args.image)  # a PNG this tool generated: replay it, so the drag skips inversion and LoRA
    write(ed.edit(req, progress=progress(), loras=lora_specs(args)), args)


def read_recipe_file(path: Path) -> dict:
    """A recipe from a ``.json`` file or from a PNG DragCanvas wrote (embedded)."""
    from editing.images import read_recipe

    if not path.is_file():
        raise EditError(f"Recipe file {path} does not exist.")
    if path.suffix.lower() == ".png":
        recipe = read_recipe(path)
        if recipe is None:
            raise EditError(f"{path} carries no DragCanvas recipe.")
        return recipe
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EditError(f"{path} is not valid JSON ({e.__class__.__name__}).") from None


def cmd_replay(args) -> None:
    recipe = read_recipe_file(Path(args.recipe_file))
    if args.model is None:
        args.model = recipe.get("model") or "auto"
    if args.resolution is None:
        args.resolution = recipe.get("resolution")
    ed = editor(args)
    args.recipe = None
    write(ed.replay(recipe, progress=progress()), args)


def _add_drag(sub) -> None:
    d = sub.add_parser("drag", help="drag handle points to targets (" + ", ".join(m.label for m in METHODS.values())
                                    + ")")
    d.add_argument("--method", default=API_DEFAULT_METHOD, choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.cost}" for m in METHODS.values()).replace("%", "%%"))
    d.add_argument("--image", required=True)
    d.add_argument("--points", help='handle>target pairs: "x,y>x,y;x,y>x,y" (image pixels)')
    d.add_argument("--mask", help="PNG, white (or opaque) = region that may change (instant/region: what moves)")
    add_mask_click_flags(d)
    d.add_argument("--prompt", default="")
    d.add_argument("--handle-region", action="append", default=[], metavar="PNG",
                   help="(region) a handle region, white = content to move; repeatable, one per --target-region")
    d.add_argument("--target-region", action="append", default=[], metavar="PNG",
                   help="(region) where the matching --handle-region goes; repeatable")
    # One flag per setting name; a setting several methods have (steps, guidance, seed) gives every range in its help.
    drag_fields = METHODS["dragdiffusion"].fields
    others = [m for m in METHODS.values() if m.fields is not drag_fields and m.fields is not GUIDED_FIELDS]
    shared = {n: "; diffeditor/dragondiffusion: " + describe(GUIDED_FIELDS, n, GUIDED_DEFAULTS["guided_drag"].get(n))
              for n in drag_fields if n in GUIDED_FIELDS}
    for n in drag_fields:
        for m in others:
            if n in m.fields:
                shared[n] = shared.get(n, "") + f"; {m.name}: " + describe(m.fields, n)
    add_fields(d, drag_fields, unset=True, extra=shared)
    add_guided_flags(d, "guided_drag", skip=drag_fields)
    taken = set(drag_fields) | set(GUIDED_FIELDS)
    for m in others:  # each method's own settings, once, with the other methods' ranges of a shared name
        own = [n for n in m.fields if n not in taken]
        extra = {n: "".join(f"; {o.name}: " + describe(o.fields, n) for o in others if o is not m and n in o.fields)
                 for n in own}
        add_fields(d, m.fields, own, unset=True, note=f"({m.name}) ", extra=extra)
        taken |= set(own)
    add_common(d)
    d.set_defaults(fn=cmd_drag)


def add_commands(sub) -> None:
    _add_drag(sub)
    r = sub.add_parser("replay", help="re-run a recipe (.json, or a PNG written by DragCanvas)")
    r.add_argument("recipe_file")
    add_common(r, model_default=None, recipe=False)
    r.set_defaults(fn=cmd_replay)
