"""CLI for the guided tasks: ``python -m editing move|paste|appearance ...`` (drag --method lives in cli.py)."""
from __future__ import annotations

import argparse

from editing import cli
from editing.requests import GUIDED_FIELDS, EditError


def _pair(text: str, what: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise EditError(f"{what} must be two numbers 'DX,DY', got {text!r}.") from None
    return a, b


def _fields(args) -> dict:
    out = {k: getattr(args, k) for k in GUIDED_FIELDS if getattr(args, k, None) is not None}
    return out | {"method": args.method, "prompt": args.prompt, "ip_adapter": args.ip_adapter}


def cmd_move(args) -> None:
    from editing.images import load_image, load_mask
    from editing.requests import MoveRequest

    req = MoveRequest(image=load_image(args.image), mask=load_mask(args.mask), offset=_pair(args.offset, "--offset"),
                      scale=args.scale, hole_mask=load_mask(args.hole_mask) if args.hole_mask else None, **_fields(args))
    cli.write(cli.editor(args).edit(req, progress=cli.progress(), loras=cli.lora_specs(args)), args)


def cmd_paste(args) -> None:
    from editing.images import load_image, load_mask
    from editing.requests import PasteRequest

    if not args.ref_mask:
        raise EditError("--ref-mask is required: the reference image needs a mask of the object to paste.")
    req = PasteRequest(image=load_image(args.image), reference=load_image(args.ref), reference_mask=load_mask(args.ref_mask),
                       offset=_pair(args.offset, "--offset"), scale=args.scale, reference_prompt=args.ref_prompt,
                       **_fields(args))
    cli.write(cli.editor(args).edit(req, progress=cli.progress(), loras=cli.lora_specs(args)), args)


def cmd_appearance(args) -> None:
    from editing.images import load_image, load_mask
    from editing.requests import AppearanceRequest

    if not args.ref_mask:
        raise EditError("--ref-mask is required: the reference image needs a mask of the object whose look to take.")
    req = AppearanceRequest(image=load_image(args.image), mask=load_mask(args.mask), reference=load_image(args.ref),
                            reference_mask=load_mask(args.ref_mask), reference_prompt=args.ref_prompt, **_fields(args))
    cli.write(cli.editor(args).edit(req, progress=cli.progress(), loras=cli.lora_specs(args)), args)


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--method", default="diffeditor", choices=("diffeditor", "dragondiffusion"))
    p.add_argument("--recipe", help="also write the recipe JSON here")
    cli.add_guided_flags(p)
    cli.common(p)


def add_commands(sub) -> None:
    m = sub.add_parser("move", help="move and/or resize the masked object; the hole is filled (DiffEditor)")
    m.add_argument("--mask", required=True, help="PNG of the object, white = object")
    m.add_argument("--offset", required=True, help="DX,DY in image pixels")
    m.add_argument("--scale", type=float, default=1.0, help="resize factor of the object [0.2..4]")
    m.add_argument("--hole-mask", help="optional PNG: the area whose look should fill the vacated place")
    _shared(m)
    m.set_defaults(fn=cmd_move)

    p = sub.add_parser("paste", help="paste an object from a reference image (DiffEditor)")
    p.add_argument("--ref", required=True, help="reference image holding the object")
    p.add_argument("--ref-mask", help="PNG of the object in the reference, white = object")
    p.add_argument("--offset", default="0,0", help="DX,DY: where the object's centre moves from its place in the reference")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--ref-prompt", default="", help="what the reference shows (default: --prompt)")
    _shared(p)
    p.set_defaults(fn=cmd_paste)

    a = sub.add_parser("appearance", help="give the masked object the look of a reference object (DiffEditor)")
    a.add_argument("--mask", required=True, help="PNG of the object to restyle")
    a.add_argument("--ref", required=True)
    a.add_argument("--ref-mask", help="PNG of the reference object")
    a.add_argument("--ref-prompt", default="")
    _shared(a)
    a.set_defaults(fn=cmd_appearance)
