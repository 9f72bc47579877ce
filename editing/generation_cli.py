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

from editing.cli import common, editor, lora_specs, progress, write
from editing.requests import EditError

UNIT_KEYS = {"pre", "start", "end", "guess", "factor"}


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
        if not key:
            continue
        opts[key] = value.strip() if eq else "true"
    return spec.strip(), cond.strip(), scale, opts


def _number(opts: dict, key: str, flag: str):
    try:
        return float(opts.pop(key))
    except ValueError:
        raise EditError(f"{flag}: {key}= must be a number.") from None


def _condition(path: str, flag: str):
    from editing.images import load_image

    if not Path(path).is_file():
        raise EditError(f"{flag}: condition image {path} does not exist.")
    return load_image(path)


def controlnet_unit(text: str):
    from editing.generation import ControlNetUnit

    spec, cond, scale, opts = parse_unit(text, "--controlnet")
    kw = {"preprocessor": opts.pop("pre", "none"), "guess_mode": opts.pop("guess", "false").lower() in ("1", "true", "yes")}
    for key in ("start", "end"):
        if key in opts:
            kw[key] = _number(opts, key, "--controlnet")
    if scale is not None:
        kw["scale"] = scale
    return ControlNetUnit(_condition(cond, "--controlnet"), spec, options=_options(opts, "--controlnet"), **kw)


def adapter_unit(text: str):
    from editing.generation import AdapterUnit

    spec, cond, scale, opts = parse_unit(text, "--t2i-adapter")
    kw = {"preprocessor": opts.pop("pre", "none")}
    if "factor" in opts:
        kw["conditioning_factor"] = _number(opts, "factor", "--t2i-adapter")
    if scale is not None:
        kw["weight"] = scale
    return AdapterUnit(_condition(cond, "--t2i-adapter"), spec, options=_options(opts, "--t2i-adapter"), **kw)


def _options(opts: dict, flag: str) -> dict:
    out = {}
    for k, v in opts.items():
        try:
            out[k] = float(v)
        except ValueError:
            raise EditError(f"{flag}: option {k}={v!r} must be a number.") from None
    return out


def parse_size(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 0
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise EditError(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 512x384.") from None
    return w, h


def write_all(result, args) -> None:
    """The first image through cli.write (recipe, notes, timings); the rest of a batch next to it."""
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


def cmd_sketch(args) -> None:
    from editing.generation import SketchRequest
    from editing.images import load_image

    sketch = _sketch_image(args.sketch)
    base = load_image(args.image) if args.image else None
    req = SketchRequest(sketch, base, prompt=args.prompt, negative_prompt=args.negative_prompt, strength=args.strength,
                        n_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                        batch=args.batch, scribble_controlnet=args.scribble_controlnet, scribble_scale=args.scribble_scale)
    ed = editor(args)
    write_all(ed.edit(req, progress=progress(), loras=lora_specs(args)), args)


def _sketch_image(path: str):
    """A drawing; a PNG with transparency is a strokes layer (kept as RGBA for compositing over --image)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise EditError(f"Sketch file {path} does not exist.")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise EditError(f"The sketch is not a readable image ({type(e).__name__}).") from None
    has_alpha = img.mode in ("RGBA", "LA", "P") and img.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return img.convert("RGBA") if has_alpha else img.convert("RGB")


def cmd_generate(args) -> None:
    from editing.generation import GenerateRequest, IPAdapterUnit
    from editing.images import load_image
    from editing.requests import DRAG_FIELDS

    w, h = parse_size(args.size)
    steps = args.steps
    if args.drag_ready:
        drag_steps = DRAG_FIELDS["n_inference_steps"][2]
        if steps not in (None, drag_steps):
            raise EditError(f"--drag-ready needs the drag's {drag_steps} DDIM steps; drop --steps {steps}.")
        steps = drag_steps
    ip = None
    if args.ip_image and not args.ip_adapter:
        raise EditError("--ip-image needs --ip-adapter SPEC (e.g. --ip-adapter tiny).")
    if args.ip_adapter:
        if not args.ip_image:
            raise EditError("--ip-adapter needs at least one --ip-image REF.png.")
        ip = IPAdapterUnit(tuple(load_image(p) for p in args.ip_image), args.ip_adapter, args.ip_scale)
    req = GenerateRequest(args.prompt, args.negative_prompt, w, h, steps if steps is not None else 50,
                          args.guidance_scale, args.seed, args.batch,
                          controlnets=tuple(controlnet_unit(t) for t in args.controlnet),
                          adapters=tuple(adapter_unit(t) for t in args.t2i_adapter), ip_adapter=ip)
    ed = editor(args)
    write_all(ed.edit(req, progress=progress(), loras=lora_specs(args)), args)


def make_drag_ready(ed, image_path) -> bool:
    """If the PNG at ``image_path`` carries a sketch/generate recipe, replay it so a drag of it skips
    inversion and LoRA (for ``cmd_drag``). True when the replay reproduced this exact image."""
    from editing.images import image_hash, load_image, read_recipe

    try:
        recipe = read_recipe(image_path)
    except Exception:  # noqa: BLE001 - a PNG without a readable recipe is just a photo
        return False
    if not recipe or recipe.get("task") not in ("generate", "sketch"):
        return False
    result = ed.replay(recipe)
    return image_hash(result.image) == image_hash(load_image(image_path)) and ed.is_drag_ready(result.image)


def add_commands(sub) -> None:
    s = sub.add_parser("sketch", help="sketch to image (SDEdit), optionally with a ControlNet-scribble assist")
    s.add_argument("--sketch", required=True, help="the drawing (PNG with transparency = strokes over --image)")
    s.add_argument("--image", help="photo under the strokes (default: a blank white canvas)")
    s.add_argument("--prompt", default="")
    s.add_argument("--negative-prompt", default="")
    s.add_argument("--strength", type=float, default=0.75,
                   help="SDEdit t0 in [0, 1]: low = faithful to the sketch, high = realistic (0 keeps it, 1 redraws)")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps of the full schedule")
    s.add_argument("--guidance-scale", type=float, default=7.5)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--batch", type=int, default=1, help="images per run (image i uses seed + i)")
    s.add_argument("--scribble-controlnet", metavar="SPEC", help="also steer with the strokes via this ControlNet")
    s.add_argument("--scribble-scale", type=float, default=1.0)
    s.add_argument("--recipe", help="also write the recipe JSON here")
    common(s)
    s.set_defaults(fn=cmd_sketch)

    g = sub.add_parser("generate", help="text-to-image with ControlNet / T2I-Adapter / IP-Adapter units; drag-ready")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--size", help="WxH, e.g. 512x384 (default: the model's native size)")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, the drag's)")
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--batch", type=int, default=1, help="images per run (image i uses seed + i)")
    g.add_argument("--controlnet", action="append", default=[], metavar="SPEC=COND.png[@SCALE][,k=v]",
                   help="a ControlNet unit (repeatable); keys pre=, start=, end=, guess, preprocessor options")
    g.add_argument("--t2i-adapter", action="append", default=[], metavar="SPEC=COND.png[@WEIGHT][,k=v]",
                   help="a T2I-Adapter unit (repeatable); keys pre=, factor=, preprocessor options")
    g.add_argument("--ip-adapter", metavar="SPEC", help="IP-Adapter: tiny, a .safetensors file or a Hub id")
    g.add_argument("--ip-image", action="append", default=[], metavar="REF.png", help="reference image (repeatable)")
    g.add_argument("--ip-scale", type=float, default=0.6)
    g.add_argument("--drag-ready", action="store_true",
                   help="use the drag's 50 DDIM steps, so a drag replaying this image's recipe skips inversion and LoRA")
    g.add_argument("--recipe", help="also write the recipe JSON here")
    common(g)
    g.set_defaults(fn=cmd_generate)
