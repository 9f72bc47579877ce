"""What every ``python -m editing`` command shares: flags built from the request tables, the Editor,
progress on stderr, writing PNG + recipe, ``--lora`` specs and running a command with one-line errors.

Command modules (drag.py, generate.py, guided.py, personalize.py) import from here and never from
each other. No default number is written here or in them: flags take their type, default, range
and reason from the engine's tables ``name -> (min, max, default, why)``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from editing.lora_library.files import MAX_LORAS, WEIGHT_LIMIT
from models.errors import EditError

log = logging.getLogger(__name__)

# one source for the LoRA limits: the library's (a request from the app is held to the same)
LORA_WEIGHT_LIMIT, MAX_LORAS = WEIGHT_LIMIT, MAX_LORAS


def flag(name: str) -> str:
    """``n_inference_steps`` -> ``--n-inference-steps``."""
    return "--" + name.replace("_", "-")


def describe(table: Mapping, name: str, shown=None) -> str:
    """``why [min..max, default D]`` for ``table[name]``; ``shown`` stands in for a ``None`` default."""
    lo, hi, default, why = table[name]
    value = default
    if default is None:
        value = "the task's published value" if shown is None else f"{shown}, the task's published value"
    return f"{why} [{lo}..{hi}, default {value}]".replace("%", "%%")  # argparse formats help with %


def add_fields(p: argparse.ArgumentParser, table: Mapping, names: Iterable[str] | None = None, *,
               flags: Mapping[str, str] | None = None, prefix: str = "", unset: bool = False,
               shown: Mapping | None = None, note: str = "", extra: Mapping[str, str] | None = None) -> None:
    """Add one flag per field of ``table`` (or of ``names``), help = ``note`` + why + range + default.

    Flag ``--PREFIX-NAME`` (``flags`` renames one, e.g. ``{"n_inference_steps": "--steps"}``), dest
    ``PREFIX_NAME``, int when the table's default is an int. ``unset``: the value is None unless given,
    so the request's own default applies and a command can tell which flags were given; ``shown``:
    what to print for a ``None`` default (e.g. the task's published value); ``extra``: per-name help tail.
    """
    flags, shown, extra = flags or {}, shown or {}, extra or {}
    for name in table if names is None else names:
        default = table[name][2]
        typ = int if isinstance(default, int) and not isinstance(default, bool) else float
        help_ = note + describe(table, name, shown.get(name)) + extra.get(name, "")
        p.add_argument(flags.get(name, flag(prefix + name)), dest=prefix + name, type=typ,
                       default=None if unset else default, help=help_)


def given(args, names: Iterable[str]) -> dict:
    """``{name: value}`` of the ``unset`` flags among ``names`` that were given on the command line."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def add_guided_flags(p: argparse.ArgumentParser, task: str, skip: Iterable[str] = ()) -> None:
    """The DiffEditor/DragonDiffusion settings (``GUIDED_FIELDS``) as flags; unset = ``task``'s published default."""
    from editing.requests import GUIDED_DEFAULTS, GUIDED_FIELDS

    names = [n for n in GUIDED_FIELDS if n not in set(skip)]
    add_fields(p, GUIDED_FIELDS, names, unset=True, shown=GUIDED_DEFAULTS[task], note="(diffeditor/dragondiffusion) ")
    p.add_argument("--ip-adapter", default=None, help="(diffeditor) IP-Adapter spec for the image prompt")


def add_common(p: argparse.ArgumentParser, *, model_default: str | None = "auto", recipe: bool = True,
               out_default: str | None = "out.png", out_help: str = "output PNG (the recipe is embedded)",
               out_metavar: str | None = None) -> None:
    """``--model --allow-pickle --resolution --out --lora`` (and ``--recipe``), taken by every command."""
    if recipe:
        p.add_argument("--recipe", help="also write the recipe JSON here")
    p.add_argument("--model", default=model_default, help="auto | tiny | Hub id | diffusers folder | .safetensors")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.bin pickle weights")
    p.add_argument("--inpaint-model", default=None, metavar="SPEC",
                   help="the inpainting model (same family as --model) the inpaint drag fills with (default: the "
                        "built-in companion of toy / tiny, else the base model's blended-latent fill)")
    p.add_argument("--resolution", type=int, default=None, help="working long side in px (default: the model's)")
    p.add_argument("--out", default=out_default, metavar=out_metavar, help=out_help)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[@WEIGHT]",
                   help="LoRA to apply (repeatable): a .safetensors file, a LoRA folder, or a library name")


def add_mask_click_flags(p: argparse.ArgumentParser, name: str = "mask", what: str = "the object",
                         segmenter: bool = True) -> None:
    """``--NAME-click [+|-]X,Y`` (repeatable): the mask from clicks instead of a ``--NAME`` PNG; and ``--segmenter``
    (once per command: pass ``segmenter=False`` for a second mask flag of the same command)."""
    p.add_argument(f"--{name.replace('_', '-')}-click", dest=f"{name}_click", action="append", default=[],
                   metavar="[+|-]X,Y", help=f"instead of --{name.replace('_', '-')}: click {what} at X,Y (pixels) "
                   "and its mask is found; repeat to add objects, +X,Y adds a part, -X,Y removes one")
    if segmenter:
        p.add_argument("--segmenter", default="auto", help="what turns clicks into masks: auto (a cached SAM model, "
                       "else classical) | classical (OpenCV) | a SAM Hub id or folder")


@functools.lru_cache(maxsize=2)
def _segmenter(spec: str):
    from editing.segment import load_segmenter

    return load_segmenter(spec)  # once per command, however many masks it finds


def resolve_mask(args, image, name: str = "mask", required: bool = False):
    """The H×W bool mask a command was given: ``--NAME`` (a PNG) or ``--NAME-click`` (clicks on ``image``, the PIL
    picture the mask belongs to, through ``--segmenter``); None when neither was given and it is not ``required``."""
    from editing.images import load_mask
    from editing.segment import mask_from_clicks, parse_click

    flag_ = "--" + name.replace("_", "-")
    path, clicks = getattr(args, name, None), getattr(args, f"{name}_click", None) or []
    if path and clicks:
        raise EditError(f"{flag_} and {flag_}-click were both given: pass the mask as a PNG or as clicks, not both.")
    if path:
        return load_mask(path, name.replace("_", " "))
    if not clicks:
        if required:
            raise EditError(f"{flag_} is required: a PNG of the object (white = object), or {flag_}-click X,Y "
                            "to click it.")
        return None
    result = mask_from_clicks(image, [parse_click(c) for c in clicks],
                              _segmenter(getattr(args, "segmenter", None) or "auto"))
    notes([result.notice])
    return result.mask


def lora_specs(args) -> list[tuple[str, float]]:
    """``--lora PATH[@WEIGHT]`` values -> [(path, weight)] (weight 1.0 when omitted)."""
    out = []
    for spec in getattr(args, "lora", None) or []:
        path, _, weight = spec.rpartition("@") if "@" in spec else (spec, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise EditError(f"--lora {spec!r}: the weight after '@' must be a number.") from None
        if not (w == w and abs(w) <= LORA_WEIGHT_LIMIT):
            raise EditError(f"--lora {spec!r}: the weight must be a finite number in "
                            f"[-{LORA_WEIGHT_LIMIT:g}, {LORA_WEIGHT_LIMIT:g}].")
        out.append((path, w))
    if len(out) > MAX_LORAS:
        raise EditError(f"{len(out)} --lora flags; at most {MAX_LORAS} LoRAs can be active at once.")
    return out


def progress():
    """A ``progress(phase, frac, msg)`` callback drawing one updating line on stderr (at most 2 a second)."""
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


def editor(args, **kwargs):
    """The Editor for ``--model --allow-pickle --resolution`` (models load lazily); its banner on stderr."""
    from editing.engine import Editor

    if getattr(args, "inpaint_model", None):
        kwargs.setdefault("inpaint_model", args.inpaint_model)
    ed = Editor(args.model, allow_pickle=args.allow_pickle, resolution=args.resolution, **kwargs)
    if ed.banner:
        sys.stderr.write(ed.banner + "\n")
    return ed


def write(result, args) -> None:
    """Save ``result`` to ``--out`` with its recipe embedded (and to ``--recipe``); notes and timings on stderr."""
    from editing.images import save_png_with_recipe

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png_with_recipe(result.image, out, result.recipe)
    if getattr(args, "recipe", None):
        Path(args.recipe).write_text(json.dumps(result.recipe, indent=1))
    notes(result.notices)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    sys.stderr.write(f"wrote {out} ({times}; UNet evaluations {sum(result.unet_calls.values())})\n")


def notes(notices: Iterable[str]) -> None:
    for n in notices:
        sys.stderr.write(f"note: {n}\n")


def _pil_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning)


PIL_ERRORS = _pil_errors()


def _pil_message(e: BaseException) -> str:
    from PIL import Image

    from editing.images import MAX_PIXELS

    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"the image declares more pixels than the limit of {MAX_PIXELS / 1e6:g} MP (a decompression bomb or "
                "a huge picture): downscale it first.")
    return f"not a readable image ({type(e).__name__}): use PNG, JPEG or WebP."


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run_command(args, cancelled: str = "cancelled") -> int:
    """Run ``args.fn(args)``: status 2 and one ``error:`` line on bad input, 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except EditError as e:
        log.debug("command %s failed", getattr(args, "cmd", None), exc_info=True)
        sys.stderr.write(f"\nerror: {_one_line(e)}\n")
        return 2
    except PIL_ERRORS as e:  # an image a command opened itself, outside editing.images: still the user's file
        log.debug("command %s failed", getattr(args, "cmd", None), exc_info=True)
        sys.stderr.write(f"\nerror: {_pil_message(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{cancelled}\n")
        return 130
    return 0
