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

from editing.cli.common import (add_common, add_fields, add_guided_flags, describe, editor, flag, given, lora_specs,
                                progress, write)
from editing.instant_drag import INSTANT_FIELDS
from editing.region_drag import REGION_FIELDS
from editing.requests import DRAG_FIELDS, GOODDRAG, GUIDED_DEFAULTS, GUIDED_FIELDS, GUIDED_METHODS, EditError

log = logging.getLogger(__name__)

# method -> (field table, what it costs, in one line for --help)
METHOD_TABLES = {
    "dragdiffusion": (DRAG_FIELDS, "identity LoRA + latent optimisation: best identity, slowest (LoRA + ~80 "
                                   "UNet forward/backward passes)"),
    "gooddrag": (DRAG_FIELDS, "DragDiffusion with GoodDrag's published settings (identity LoRA, drag spread over "
                              "several timesteps): as slow as dragdiffusion"),
    "diffeditor": (GUIDED_FIELDS, "training-free gradient guidance: no LoRA, ~2 passes per step of 50 plus gradients"),
    "dragondiffusion": (GUIDED_FIELDS, "training-free gradient guidance: no LoRA, ~2 passes per step of 50 plus gradients"),
    "instant": (INSTANT_FIELDS, "FastDrag one-step latent warp: no LoRA, no gradients, ~14 UNet passes (7 on a "
                                "repeat drag of the same image)"),
    "region": (REGION_FIELDS, "RegionDrag region copy: no gradients, ~20 UNet passes (10 on a repeat)"),
}
METHODS = tuple(METHOD_TABLES)
assert set(GUIDED_METHODS) <= set(METHODS)


def _methods_with(name: str) -> str:
    return "/".join(m for m, (table, _) in METHOD_TABLES.items() if name in table)


def drag_request(args):
    """The request the flags ask for (``DragRequest``, ``GuidedDragRequest``, ``InstantDragRequest`` or
    ``RegionDragRequest``); a flag of another method is an error."""
    from editing.images import load_image, load_mask
    from editing.requests import DragRequest, GuidedDragRequest, parse_points

    image = load_image(args.image)
    mask = load_mask(args.mask) if args.mask else None
    own = METHOD_TABLES[args.method][0]
    fields = given(args, DRAG_FIELDS | GUIDED_FIELDS | INSTANT_FIELDS | REGION_FIELDS)
    wrong = sorted(set(fields) - set(own))
    if wrong:
        raise EditError(f"{flag(wrong[0])} applies to --method {_methods_with(wrong[0])} only.")
    regions = (args.handle_region or [], args.target_region or [])
    if (regions[0] or regions[1]) and args.method != "region":
        raise EditError("--handle-region/--target-region apply to --method region only.")
    if args.method == "region":
        from editing.region_drag import RegionDragRequest

        if regions[0] or regions[1]:
            if args.points:
                raise EditError("Give either --points or --handle-region/--target-region, not both.")
            hr = tuple(load_mask(p, "handle region") for p in regions[0])
            tr = tuple(load_mask(p, "target region") for p in regions[1])
            return RegionDragRequest(image, hr, tr, mask=mask, prompt=args.prompt, **fields)
        if not args.points:
            raise EditError("--method region needs --points (with --radius) or --handle-region/--target-region.")
        return RegionDragRequest(image, points=parse_points(args.points), mask=mask, prompt=args.prompt, **fields)
    if not args.points:
        raise EditError(f"--method {args.method} needs --points \"x,y>x,y\".")
    points = parse_points(args.points)
    if args.method == "dragdiffusion":
        return DragRequest(image, points, mask, prompt=args.prompt, **fields)
    if args.method == "gooddrag":
        return DragRequest(image, points, mask, prompt=args.prompt, **(GOODDRAG | fields))
    if args.method == "instant":
        from editing.instant_drag import InstantDragRequest

        return InstantDragRequest(image, points, mask, prompt=args.prompt, **fields)
    return GuidedDragRequest(image=image, points=points, mask=mask, prompt=args.prompt, method=args.method,
                             ip_adapter=args.ip_adapter, **fields)


def make_drag_ready(ed, image_path) -> bool:
    """If the PNG at ``image_path`` carries a sketch/generate recipe, replay it so a drag of it skips
    inversion and LoRA. True when the replay reproduced this exact image."""
    from editing.images import image_hash, load_image, read_recipe

    try:
        recipe = read_recipe(image_path)
    except Exception:  # noqa: BLE001 - a PNG without a readable recipe is just a photo
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
    d = sub.add_parser("drag", help="drag handle points to targets (DragDiffusion, GoodDrag, DiffEditor, "
                                    "DragonDiffusion, instant, region)")
    d.add_argument("--method", default=METHODS[0], choices=METHODS,
                   help="; ".join(f"{m}: {cost}" for m, (_, cost) in METHOD_TABLES.items()).replace("%", "%%"))
    d.add_argument("--image", required=True)
    d.add_argument("--points", help='handle>target pairs: "x,y>x,y;x,y>x,y" (image pixels)')
    d.add_argument("--mask", help="PNG, white (or opaque) = region that may change (instant/region: what moves)")
    d.add_argument("--prompt", default="")
    d.add_argument("--handle-region", action="append", default=[], metavar="PNG",
                   help="(region) a handle region, white = content to move; repeatable, one per --target-region")
    d.add_argument("--target-region", action="append", default=[], metavar="PNG",
                   help="(region) where the matching --handle-region goes; repeatable")
    # A setting several methods have (steps, guidance, seed) is one flag; its help gives every range.
    shared = {n: "; diffeditor/dragondiffusion: " + describe(GUIDED_FIELDS, n, GUIDED_DEFAULTS["drag"].get(n))
              for n in DRAG_FIELDS if n in GUIDED_FIELDS}
    for n in DRAG_FIELDS:
        for m, table in (("instant", INSTANT_FIELDS), ("region", REGION_FIELDS)):
            if n in table:
                shared[n] = shared.get(n, "") + f"; {m}: " + describe(table, n)
    add_fields(d, DRAG_FIELDS, unset=True, extra=shared)
    add_guided_flags(d, "drag", skip=DRAG_FIELDS)
    taken = set(DRAG_FIELDS) | set(GUIDED_FIELDS)
    instant_own = [n for n in INSTANT_FIELDS if n not in taken]
    region_shared = {n: "; region: " + describe(REGION_FIELDS, n) for n in instant_own if n in REGION_FIELDS}
    add_fields(d, INSTANT_FIELDS, instant_own, unset=True, note="(instant) ", extra=region_shared)
    add_fields(d, REGION_FIELDS, [n for n in REGION_FIELDS if n not in taken | set(INSTANT_FIELDS)], unset=True,
               note="(region) ")
    add_common(d)
    d.set_defaults(fn=cmd_drag)


def add_commands(sub) -> None:
    _add_drag(sub)
    r = sub.add_parser("replay", help="re-run a recipe (.json, or a PNG written by DragCanvas)")
    r.add_argument("recipe_file")
    add_common(r, model_default=None, recipe=False)
    r.set_defaults(fn=cmd_replay)
