"""Command line: ``python -m editing drag|generate|replay|...``. Progress on stderr; one-line errors.

Task modules add their own subcommands: each module in ``COMMAND_MODULES`` defines
``add_commands(sub)`` and builds its parsers with this module's helpers (``common``, ``editor``,
``write``, ``progress``, ``lora_specs``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from editing.requests import DRAG_FIELDS, EditError


def progress():
    last = {"t": 0.0, "phase": None}

    def report(phase: str, frac: float, msg: str):
        now = time.monotonic()
        if phase != last["phase"] or frac >= 1.0 or now - last["t"] > 0.5:
            last.update(t=now, phase=phase)
            sys.stderr.write(f"\r[{phase:>9}] {frac * 100:5.1f}% {msg[:70]:<70}")
            if frac >= 1.0:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return report


def editor(args):
    from editing.engine import Editor

    ed = Editor(args.model, allow_pickle=args.allow_pickle, resolution=args.resolution)
    if ed.banner:
        sys.stderr.write(ed.banner + "\n")
    return ed


def write(result, args) -> None:
    from editing.images import save_png_with_recipe

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png_with_recipe(result.image, out, result.recipe)
    if getattr(args, "recipe", None):
        Path(args.recipe).write_text(json.dumps(result.recipe, indent=1))
    for n in result.notices:
        sys.stderr.write(f"note: {n}\n")
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    sys.stderr.write(f"wrote {out} ({times}; UNet evaluations {sum(result.unet_calls.values())})\n")


def cmd_drag(args) -> None:
    from editing.images import load_image, load_mask
    from editing.requests import DragRequest, parse_points

    from editing.requests import GUIDED_FIELDS, GuidedDragRequest

    image = load_image(args.image)
    mask = load_mask(args.mask) if args.mask else None
    given = {k for k in DRAG_FIELDS | GUIDED_FIELDS if getattr(args, k, None) is not None}
    if args.method == "dragdiffusion":
        wrong = sorted(given - set(DRAG_FIELDS))
        if wrong:
            raise EditError(f"--{wrong[0].replace('_', '-')} applies to --method diffeditor/dragondiffusion only.")
        fields = {k: getattr(args, k) for k in given}
        req = DragRequest(image, parse_points(args.points), mask, prompt=args.prompt, **fields)
    else:
        wrong = sorted(given - set(GUIDED_FIELDS))
        if wrong:
            raise EditError(f"--{wrong[0].replace('_', '-')} applies to --method dragdiffusion only.")
        fields = {k: getattr(args, k) for k in given}
        req = GuidedDragRequest(image=image, points=parse_points(args.points), mask=mask, prompt=args.prompt,
                                method=args.method, ip_adapter=args.ip_adapter, **fields)
    ed = editor(args)
    from editing.generation_cli import make_drag_ready

    make_drag_ready(ed, args.image)  # a PNG this tool generated: replay it, so the drag skips inversion and LoRA
    write(ed.edit(req, progress=progress(), loras=lora_specs(args)), args)


def cmd_replay(args) -> None:
    from editing.images import read_recipe

    path = Path(args.recipe_file)
    if not path.is_file():
        raise EditError(f"Recipe file {path} does not exist.")
    if path.suffix.lower() == ".png":
        recipe = read_recipe(path)
        if recipe is None:
            raise EditError(f"{path} carries no DragCanvas recipe.")
    else:
        try:
            recipe = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EditError(f"{path} is not valid JSON ({e.__class__.__name__}).") from None
    if args.model is None:
        args.model = recipe.get("model") or "auto"
    if args.resolution is None:
        args.resolution = recipe.get("resolution")
    ed = editor(args)
    args.recipe = None
    write(ed.replay(recipe, progress=progress()), args)


def common(p: argparse.ArgumentParser, model_default: str | None = "auto") -> None:
    p.add_argument("--model", default=model_default, help="auto | tiny | Hub id | diffusers folder | .safetensors")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.bin pickle weights")
    p.add_argument("--resolution", type=int, default=None, help="working long side in px (default: the model's)")
    p.add_argument("--out", default="out.png", help="output PNG (the recipe is embedded)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[@WEIGHT]",
                   help="LoRA to apply (repeatable): a .safetensors file, a LoRA folder, or a library name")


def add_guided_flags(p: argparse.ArgumentParser, skip=()) -> None:
    """The DiffEditor/DragonDiffusion settings (``GUIDED_FIELDS``) as flags; unset = the task's published default."""
    from editing.requests import GUIDED_FIELDS

    for name, (lo, hi, default, why) in GUIDED_FIELDS.items():
        if name in skip:
            continue
        typ = int if isinstance(default, int) else float
        shown = "the task's published value" if default is None else default
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"(diffeditor/dragondiffusion) {why} [{lo}..{hi}, default {shown}]")
    p.add_argument("--ip-adapter", default=None, help="(diffeditor) IP-Adapter spec for the image prompt")


def lora_specs(args) -> list[tuple[str, float]]:
    """``--lora PATH[@WEIGHT]`` values -> [(path, weight)] (weight 1.0 when omitted)."""
    out = []
    for spec in getattr(args, "lora", None) or []:
        path, _, weight = spec.rpartition("@") if "@" in spec else (spec, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise EditError(f"--lora {spec!r}: the weight after '@' must be a number.") from None
        if not (w == w and abs(w) <= 4):
            raise EditError(f"--lora {spec!r}: the weight must be a finite number in [-4, 4].")
        out.append((path, w))
    return out


# Modules that add subcommands (``add_commands(sub)``); a module not written yet is skipped.
COMMAND_MODULES = ("editing.guidance_cli", "editing.generation_cli", "editing.personalize")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m editing", description="DragCanvas: diffusion-based drag editing.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("drag", help="drag handle points to targets (DragDiffusion, DiffEditor or DragonDiffusion)")
    d.add_argument("--method", default="dragdiffusion", choices=("dragdiffusion", "diffeditor", "dragondiffusion"),
                   help="dragdiffusion: identity LoRA + latent optimisation; diffeditor/dragondiffusion: "
                        "training-free gradient guidance")
    d.add_argument("--image", required=True)
    d.add_argument("--points", required=True, help='handle>target pairs: "x,y>x,y;x,y>x,y" (image pixels)')
    d.add_argument("--mask", help="PNG, white (or opaque) = region that may change")
    d.add_argument("--prompt", default="")
    d.add_argument("--recipe", help="also write the recipe JSON here")
    for name, (lo, hi, default, why) in DRAG_FIELDS.items():
        typ = int if isinstance(default, int) else float
        d.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=f"{why} [{lo}..{hi}, default {default}]")
    add_guided_flags(d, skip=set(DRAG_FIELDS))
    common(d)
    d.set_defaults(fn=cmd_drag)

    r = sub.add_parser("replay", help="re-run a recipe (.json, or a PNG written by DragCanvas)")
    r.add_argument("recipe_file")
    common(r, model_default=None)
    r.set_defaults(fn=cmd_replay)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_commands(sub)
    return ap


def run_command(args, cancelled: str = "cancelled") -> int:
    """Run ``args.fn(args)``: status 2 and one ``error:`` line on bad input, 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except EditError as e:
        sys.stderr.write(f"\nerror: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{cancelled}\n")
        return 130
    return 0


def main(argv=None) -> int:
    return run_command(build_parser().parse_args(argv))

