"""``python -m editing sketch`` and ``python -m editing generate`` (ControlNet / T2I-Adapter / IP-Adapter).

    python -m editing sketch --sketch drawing.png [--image photo.png] --prompt "a red house" --strength 0.7
    python -m editing generate --prompt "a cat" --controlnet tiny=edges.png@0.8,pre=canny,end=0.8 \\
        --t2i-adapter tiny=colours.png@1.0,pre=palette --ip-adapter tiny --ip-image ref.png --ip-scale 0.6

A unit is ``SPEC=CONDITION.png[@SCALE][,key=value...]``: keys ``pre`` (preprocessor: none, canny,
scribble, lineart, palette), ``start``/``end``/``guess`` (ControlNet), ``factor`` (T2I-Adapter
conditioning factor), and the preprocessor's options (``low_threshold``, ``thickness``, ``cells`` …).
With ``--batch N`` the images are written as OUT.png, OUT-2.png, … each with its own recipe.
"""
from __future__ import annotations

import sys
from pathlib import Path

from editing.cli.common import add_common, add_fields, editor, given, lora_specs, progress, write
from models.errors import EditError

STEPS = {"n_inference_steps": "--steps"}  # the sketch/generate flag for the DDIM step count
RUN_FIELDS = ("n_inference_steps", "guidance_scale", "seed", "batch")  # what sketch and generate share
TRUE = ("1", "true", "yes")


def parse_unit(text: str, flag: str) -> tuple[str, str, float | None, dict]:
    """``SPEC=COND.png[@SCALE][,key=value...]`` -> (spec, condition path, scale or None, {key: value})."""
    head, *rest = (text or "").split(",")
    spec, sep, cond = head.partition("=")
    if not sep or not spec.strip() or not cond.strip():
        raise EditError(f"{flag} {text!r}: write SPEC=CONDITION.png[@SCALE], e.g. {flag} tiny=edges.png@0.8.")
    scale = None
    if "@" in cond:
        cond, _, s = cond.rpartition("@")
        try:
            scale = float(s)
        except ValueError:
            raise EditError(f"{flag} {text!r}: the scale after '@' must be a number.") from None
    opts = {}
    for item in rest:
        key, eq, value = item.partition("=")
        key = key.strip()
        if key:
            opts[key] = value.strip() if eq else "true"
    return spec.strip(), cond.strip(), scale, opts


def _number(value: str, what: str, flag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise EditError(f"{flag}: {what} must be a number.") from None


def _condition(path: str, flag: str):
    from editing.images import load_image

    if not Path(path).is_file():
        raise EditError(f"{flag}: condition image {path} does not exist.")
    return load_image(path)


def _options(opts: dict, flag: str) -> dict:
    """The preprocessor's options (what is left after the unit's own keys), as numbers."""
    return {k: _number(v, f"option {k}={v!r}", flag) for k, v in opts.items()}


def controlnet_unit(text: str):
    from editing.generation import ControlNetUnit

    spec, cond, scale, opts = parse_unit(text, "--controlnet")
    kw = {"preprocessor": opts.pop("pre", "none"), "guess_mode": opts.pop("guess", "false").lower() in TRUE}
    kw |= {key: _number(opts.pop(key), f"{key}=", "--controlnet") for key in ("start", "end") if key in opts}
    if scale is not None:
        kw["scale"] = scale
    return ControlNetUnit(_condition(cond, "--controlnet"), spec, options=_options(opts, "--controlnet"), **kw)


def adapter_unit(text: str):
    from editing.generation import AdapterUnit

    spec, cond, scale, opts = parse_unit(text, "--t2i-adapter")
    kw = {"preprocessor": opts.pop("pre", "none")}
    if "factor" in opts:
        kw["conditioning_factor"] = _number(opts.pop("factor"), "factor=", "--t2i-adapter")
    if scale is not None:
        kw["weight"] = scale
    return AdapterUnit(_condition(cond, "--t2i-adapter"), spec, options=_options(opts, "--t2i-adapter"), **kw)


def parse_size(text: str | None) -> dict:
    """``--size WxH`` -> ``{"width": W, "height": H}``; ``{}`` when omitted (the request's default size)."""
    if not text:
        return {}
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise EditError(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 512x384.") from None
    return {"width": w, "height": h}


def write_all(result, args) -> None:
    """The first image through ``write`` (recipe, notes, timings); the rest of a batch next to it."""
    from editing.images import save_png_with_recipe

    write(result, args)
    out = Path(args.out)
    recipes = result.extra.get("recipes") or []
    for i, img in enumerate(result.all_images[1:], start=2):
        path = out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        save_png_with_recipe(img, path, recipes[i - 1] if i - 1 < len(recipes) else result.recipe)
        sys.stderr.write(f"wrote {path}\n")
    if result.extra.get("drag_ready"):
        sys.stderr.write("drag-ready: its recipe is embedded, so a drag that replays it needs no inversion or LoRA\n")


def _sketch_image(path: str):
    """A drawing; a PNG with transparency is a strokes layer (kept as RGBA for compositing over --image)."""
    from editing.images import load_sketch

    if not Path(path).is_file():
        raise EditError(f"Sketch file {path} does not exist.")
    return load_sketch(path)


def cmd_sketch(args) -> None:
    from editing.generation import SKETCH_FIELDS, SketchRequest
    from editing.images import load_image

    sketch = _sketch_image(args.sketch)
    base = load_image(args.image) if args.image else None
    req = SketchRequest(sketch, base, prompt=args.prompt, negative_prompt=args.negative_prompt,
                        scribble_controlnet=args.scribble_controlnet, **{k: getattr(args, k) for k in SKETCH_FIELDS})
    write_all(editor(args).edit(req, progress=progress(), loras=lora_specs(args)), args)


def _steps(args) -> dict:
    """``--steps`` for generate; ``--drag-ready`` pins it to the drag's default (a drag then replays, not inverts)."""
    from editing.drag import DRAG_FIELDS

    steps = args.n_inference_steps
    if args.drag_ready:
        drag_steps = DRAG_FIELDS["n_inference_steps"][2]
        if steps not in (None, drag_steps):
            raise EditError(f"--drag-ready needs the drag's {drag_steps} DDIM steps; drop --steps {steps}.")
        steps = drag_steps
    return {} if steps is None else {"n_inference_steps": steps}


def _ip_unit(args):
    from editing.generation import IPAdapterUnit
    from editing.images import load_image

    if args.ip_image and not args.ip_adapter:
        raise EditError("--ip-image needs --ip-adapter SPEC (e.g. --ip-adapter tiny).")
    if not args.ip_adapter:
        return None
    if not args.ip_image:
        raise EditError("--ip-adapter needs at least one --ip-image REF.png.")
    return IPAdapterUnit(tuple(load_image(p) for p in args.ip_image), args.ip_adapter, args.ip_scale)


def cmd_generate(args) -> None:
    from editing.generation import GenerateRequest

    fields = parse_size(args.size) | given(args, RUN_FIELDS) | _steps(args)
    req = GenerateRequest(args.prompt, args.negative_prompt, ip_adapter=_ip_unit(args),
                          controlnets=tuple(controlnet_unit(t) for t in args.controlnet),
                          adapters=tuple(adapter_unit(t) for t in args.t2i_adapter), **fields)
    write_all(editor(args).edit(req, progress=progress(), loras=lora_specs(args)), args)


def _unit_keys(table: dict, keys: dict) -> str:
    """``@SCALE 0.0..2.0 (default 1.0), start= …`` for a unit's help, from its field table."""
    return ", ".join(f"{key} {table[n][0]}..{table[n][1]} (default {table[n][2]})" for key, n in keys.items())


def _add_sketch(sub) -> None:
    from editing.generation import SKETCH_FIELDS

    s = sub.add_parser("sketch", help="sketch to image (SDEdit), optionally with a ControlNet-scribble assist")
    s.add_argument("--sketch", required=True, help="the drawing (PNG with transparency = strokes over --image)")
    s.add_argument("--image", help="photo under the strokes (default: a blank white canvas)")
    s.add_argument("--prompt", default="")
    s.add_argument("--negative-prompt", default="")
    add_fields(s, SKETCH_FIELDS, ("strength", *RUN_FIELDS), flags=STEPS)
    s.add_argument("--scribble-controlnet", metavar="SPEC", help="also steer with the strokes via this ControlNet")
    add_fields(s, SKETCH_FIELDS, ("scribble_scale",))
    add_common(s)
    s.set_defaults(fn=cmd_sketch)


def _add_generate(sub) -> None:
    from editing.drag import DRAG_FIELDS
    from editing.generation import ADAPTER_FIELDS, CONTROLNET_FIELDS, GENERATE_FIELDS, IP_FIELDS

    g = sub.add_parser("generate", help="text-to-image with ControlNet / T2I-Adapter / IP-Adapter units; drag-ready")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    lo, hi = GENERATE_FIELDS["width"][:2]
    g.add_argument("--size", help=f"WxH, e.g. 512x384, each side {lo}..{hi} (default: the model's native size)")
    add_fields(g, GENERATE_FIELDS, RUN_FIELDS[:1], flags=STEPS, unset=True)  # unset: --drag-ready may set it
    add_fields(g, GENERATE_FIELDS, RUN_FIELDS[1:])
    g.add_argument("--controlnet", action="append", default=[], metavar="SPEC=COND.png[@SCALE][,k=v]",
                   help="a ControlNet unit (repeatable); keys pre=, guess, preprocessor options, "
                        + _unit_keys(CONTROLNET_FIELDS, {"@SCALE": "scale", "start=": "start", "end=": "end"}))
    g.add_argument("--t2i-adapter", action="append", default=[], metavar="SPEC=COND.png[@WEIGHT][,k=v]",
                   help="a T2I-Adapter unit (repeatable); keys pre=, preprocessor options, "
                        + _unit_keys(ADAPTER_FIELDS, {"@WEIGHT": "weight", "factor=": "conditioning_factor"}))
    g.add_argument("--ip-adapter", metavar="SPEC", help="IP-Adapter: tiny, a .safetensors file or a Hub id")
    g.add_argument("--ip-image", action="append", default=[], metavar="REF.png", help="reference image (repeatable)")
    add_fields(g, IP_FIELDS, prefix="ip_")
    g.add_argument("--drag-ready", action="store_true",
                   help=f"use the drag's {DRAG_FIELDS['n_inference_steps'][2]} DDIM steps, so a drag replaying "
                        "this image's recipe skips inversion and LoRA")
    add_common(g)
    g.set_defaults(fn=cmd_generate)


def add_commands(sub) -> None:
    _add_sketch(sub)
    _add_generate(sub)
