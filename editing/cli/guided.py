"""The guided tasks: ``python -m editing move|paste|appearance ...`` (DiffEditor / DragonDiffusion).

    python -m editing move --image photo.png --mask dog.png --offset 80,-10 --scale 1.2 --out moved.png
    python -m editing paste --image beach.png --ref dog.png --ref-mask dog_mask.png --offset 40,60 --scale 0.8
    python -m editing appearance --image photo.png --mask car.png --ref other.png --ref-mask other_car.png
    python -m editing move --image photo.png --mask-click 210,140 --mask-click +230,200 --offset 60,0

Every mask flag has a ``-click`` twin (``--mask-click``, ``--ref-mask-click``): click the object instead of
painting its PNG; ``--segmenter`` says what finds the mask (editing/segment).

A guided drag is ``drag --method diffeditor`` (editing/cli/drag.py).
"""
from __future__ import annotations

import argparse
import dataclasses

from editing.cli.common import (
    add_common,
    add_guided_flags,
    add_mask_click_flags,
    editor,
    given,
    lora_specs,
    progress,
    resolve_mask,
    write,
)
from editing.requests import GUIDED_FIELDS, GUIDED_METHODS
from models.errors import EditError


def _pair(text: str, what: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise EditError(f"{what} must be two numbers 'DX,DY', got {text!r}.") from None
    return a, b


def _default(request_cls, name: str):
    """The request dataclass's default for ``name`` (for --help; the CLI passes nothing when a flag is unset)."""
    return next(f.default for f in dataclasses.fields(request_cls) if f.name == name)


def _fields(args) -> dict:
    """Guided settings given on the command line, plus the method/prompt/IP-Adapter every guided task takes."""
    out = given(args, GUIDED_FIELDS) | {"method": args.method, "prompt": args.prompt, "ip_adapter": args.ip_adapter}
    if getattr(args, "offset", None) is not None:
        out["offset"] = _pair(args.offset, "--offset")
    if getattr(args, "scale", None) is not None:
        out["scale"] = args.scale
    return out


def _run(req, args) -> None:
    write(editor(args).edit(req, progress=progress(), loras=lora_specs(args)), args)


def cmd_move(args) -> None:
    from editing.images import load_image, load_mask
    from editing.requests import MoveRequest

    image = load_image(args.image)
    _run(MoveRequest(image=image, mask=resolve_mask(args, image, required=True),
                     hole_mask=load_mask(args.hole_mask) if args.hole_mask else None,
                     inpaint_hole=not args.no_inpaint_hole, **_fields(args)), args)


def cmd_paste(args) -> None:
    from editing.images import load_image
    from editing.requests import PasteRequest

    reference = load_image(args.ref, "reference image")
    _run(PasteRequest(image=load_image(args.image), reference=reference,
                      reference_mask=resolve_mask(args, reference, "ref_mask", required=True),
                      reference_prompt=args.ref_prompt, **_fields(args)), args)


def cmd_appearance(args) -> None:
    from editing.images import load_image
    from editing.requests import AppearanceRequest

    image, reference = load_image(args.image), load_image(args.ref, "reference image")
    _run(AppearanceRequest(image=image, mask=resolve_mask(args, image, required=True), reference=reference,
                           reference_mask=resolve_mask(args, reference, "ref_mask", required=True),
                           reference_prompt=args.ref_prompt, **_fields(args)), args)


def _shared(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--method", default=GUIDED_METHODS[0], choices=GUIDED_METHODS, type=str.lower)  # DiffEditor too
    add_guided_flags(p, task)
    add_common(p)


def _add_move(sub) -> None:
    from editing.requests import MoveRequest

    m = sub.add_parser("move", help="move and/or resize the masked object; the hole is filled (DiffEditor)")
    m.add_argument("--mask", help="PNG of the object, white = object (or --mask-click)")
    add_mask_click_flags(m)
    m.add_argument("--offset", required=True, help="DX,DY in image pixels")
    m.add_argument("--scale", type=float, default=None,
                   help=f"resize factor of the object (default {_default(MoveRequest, 'scale')})")
    m.add_argument("--hole-mask", help="optional PNG: the area whose look should fill the vacated place")
    m.add_argument("--no-inpaint-hole", action="store_true",
                   help="keep DiffEditor's own fill of the vacated place: no inpainting model repaints it (one does "
                        "by default when there is one: --inpaint-model, or toy-inpaint beside toy)")
    _shared(m, "move")
    m.set_defaults(fn=cmd_move)


def _add_paste(sub) -> None:
    from editing.requests import PasteRequest

    dx, dy = _default(PasteRequest, "offset")
    p = sub.add_parser("paste", help="paste an object from a reference image (DiffEditor)")
    p.add_argument("--ref", required=True, help="reference image holding the object")
    p.add_argument("--ref-mask", help="PNG of the object in the reference, white = object (or --ref-mask-click)")
    add_mask_click_flags(p, "ref_mask", "the object in the reference")
    p.add_argument("--offset", default=None, help="DX,DY: where the object's centre moves from its place in the "
                                                  f"reference (default {dx:g},{dy:g})")
    p.add_argument("--scale", type=float, default=None,
                   help=f"resize factor of the object (default {_default(PasteRequest, 'scale')})")
    p.add_argument("--ref-prompt", default="", help="what the reference shows (default: --prompt)")
    _shared(p, "paste")
    p.set_defaults(fn=cmd_paste)


def _add_appearance(sub) -> None:
    a = sub.add_parser("appearance", help="give the masked object the look of a reference object (DiffEditor)")
    a.add_argument("--mask", help="PNG of the object to restyle (or --mask-click)")
    add_mask_click_flags(a)
    a.add_argument("--ref", required=True)
    a.add_argument("--ref-mask", help="PNG of the reference object (or --ref-mask-click)")
    add_mask_click_flags(a, "ref_mask", "the reference object", segmenter=False)
    a.add_argument("--ref-prompt", default="")
    _shared(a, "appearance")
    a.set_defaults(fn=cmd_appearance)


def add_commands(sub) -> None:
    _add_move(sub)
    _add_paste(sub)
    _add_appearance(sub)
