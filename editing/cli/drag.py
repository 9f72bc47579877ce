"""``python -m editing drag`` (DragDiffusion, DiffEditor, DragonDiffusion) and ``python -m editing replay``.

    python -m editing drag --image photo.png --points "120,200>180,190" --mask editable.png --out dragged.png
    python -m editing drag --method diffeditor --image photo.png --points "120,200>180,190" --energy-scale 2
    python -m editing replay dragged.json --out again.png   # or any PNG DragCanvas wrote
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from editing.cli.common import (add_common, add_fields, add_guided_flags, describe, editor, flag, given, lora_specs,
                                progress, write)
from editing.requests import DRAG_FIELDS, GUIDED_DEFAULTS, GUIDED_FIELDS, GUIDED_METHODS, EditError

log = logging.getLogger(__name__)

METHODS = ("dragdiffusion", *GUIDED_METHODS)


def drag_request(args):
    """The ``DragRequest`` or ``GuidedDragRequest`` that the flags ask for; the other kind's flags are errors."""
    from editing.images import load_image, load_mask
    from editing.requests import DragRequest, GuidedDragRequest, parse_points

    image = load_image(args.image)
    mask = load_mask(args.mask) if args.mask else None
    fields = given(args, DRAG_FIELDS | GUIDED_FIELDS)
    own, other = ((DRAG_FIELDS, "--method diffeditor/dragondiffusion") if args.method == "dragdiffusion"
                  else (GUIDED_FIELDS, "--method dragdiffusion"))
    wrong = sorted(set(fields) - set(own))
    if wrong:
        raise EditError(f"{flag(wrong[0])} applies to {other} only.")
    points = parse_points(args.points)
    if args.method == "dragdiffusion":
        return DragRequest(image, points, mask, prompt=args.prompt, **fields)
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
    d = sub.add_parser("drag", help="drag handle points to targets (DragDiffusion, DiffEditor or DragonDiffusion)")
    d.add_argument("--method", default=METHODS[0], choices=METHODS,
                   help="dragdiffusion: identity LoRA + latent optimisation; diffeditor/dragondiffusion: "
                        "training-free gradient guidance")
    d.add_argument("--image", required=True)
    d.add_argument("--points", required=True, help='handle>target pairs: "x,y>x,y;x,y>x,y" (image pixels)')
    d.add_argument("--mask", help="PNG, white (or opaque) = region that may change")
    d.add_argument("--prompt", default="")
    # A setting both methods have (steps, guidance, seed) is one flag; its help gives both ranges.
    shared = {n: "; diffeditor/dragondiffusion: " + describe(GUIDED_FIELDS, n, GUIDED_DEFAULTS["drag"].get(n))
              for n in DRAG_FIELDS if n in GUIDED_FIELDS}
    add_fields(d, DRAG_FIELDS, unset=True, extra=shared)
    add_guided_flags(d, "drag", skip=DRAG_FIELDS)
    add_common(d)
    d.set_defaults(fn=cmd_drag)


def add_commands(sub) -> None:
    _add_drag(sub)
    r = sub.add_parser("replay", help="re-run a recipe (.json, or a PNG written by DragCanvas)")
    r.add_argument("recipe_file")
    add_common(r, model_default=None, recipe=False)
    r.set_defaults(fn=cmd_replay)
