"""DragBench evaluation of a drag method: Mean Distance (DIFT) and Image Fidelity (1 − LPIPS).

    python -m bench.dragbench --data DragBench --method dragdiffusion \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out out/dragbench/dragdiffusion \\
        --json out/dragbench_dragdiffusion.json
    python -m bench.dragbench --data DIR --method noop --model tiny --dift-model tiny --limit 4
    python -m bench.dragbench --data DIR --method dragdiffusion --model tiny --dift-model tiny \\
        --set lora_steps=2 --set n_inference_steps=6 --set max_steps=2

The data folder has DragBench's layout (REFERENCE.md, "Evaluation (DragBench, from DragDiffusion)"):
``DIR/<category>/<sample>/original_image.png`` and ``meta_data.pkl`` = {'prompt': str,
'points': [[x, y], …] alternating handle, target, 'mask': H×W uint8 0/1}. Each sample becomes one
``DragRequest`` (any image size; ``--set field=value`` overrides its settings) and runs through the
method; the result is written in the same layout to ``OUT/<category>/<sample>/dragged_image.png``
(``meta_data.pkl`` copied beside it), so other evaluation scripts can read it too.

Metrics, per sample, then per category and overall:
- **MD** (Mean Distance, lower is better): for each handle, its DIFT match in the edited image
  (``bench/dift.py``: SD-2.1, t = 261, ``up_blocks[1]``, 8 noise draws, the sample's prompt); the
  pixel distance to the target; the mean over all pairs (not over samples).
- **IF** (Image Fidelity, higher is better): 1 − LPIPS(AlexNet) between the original and the edited
  image at 224², with the ``lpips`` package. Without it (or its AlexNet weights) the table says
  "unavailable" and the JSON holds null.

A bad sample (missing or malformed ``meta_data.pkl``, a point outside the image, an unreadable image,
a method error) is reported in its row and the run goes on; a category folder with no samples is
reported too. ``meta_data.pkl`` is read with an unpickler that only rebuilds builtins containers
and numpy arrays, never arbitrary objects.
"""
from __future__ import annotations

import argparse
import builtins
import importlib
import json
import logging
import math
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from editing.engine import Editor, EditResult
from editing.images import load_image, pil_to_tensor, save_png_with_recipe
from editing.requests import DRAG_FIELDS, DragRequest, EditError

log = logging.getLogger(__name__)

IMAGE_NAME, META_NAME, OUT_NAME = "original_image.png", "meta_data.pkl", "dragged_image.png"
LPIPS_SIZE = 224


# ---- methods ------------------------------------------------------------------------------------
# A method edits one request: (editor, request) -> PIL image. It may return an EditResult instead,
# whose engine notices and recipe are then kept (the recipe is embedded in the saved PNG).
Method = Callable[[Editor, DragRequest], "Image.Image | EditResult"]


def method_dragdiffusion(editor: Editor, req: DragRequest) -> EditResult:
    """DragDiffusion with the request's settings: identity LoRA, DDIM inversion, optimisation, denoise."""
    return editor.drag(req)


def method_noop(editor: Editor, req: DragRequest) -> Image.Image:
    """The input unchanged: the baseline (MD = how far the handles start from their targets, IF = 1)."""
    return req.image


METHODS: dict[str, Method] = {
    "dragdiffusion": method_dragdiffusion,
    "noop": method_noop,
}


# ---- reading a sample ---------------------------------------------------------------------------
class SampleError(EditError):
    """A sample that cannot be evaluated; the message names what is wrong with it."""


_SAFE_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                  "bytearray", "bool", "slice", "range"}
# What numpy arrays, dtypes and scalars pickle to (numpy 1 writes numpy.core, numpy 2 numpy._core).
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype")}
_NUMPY_CORE_GLOBALS = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds only builtins containers/numbers/strings and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":  # protocol-2 pickles spell bytes as encode(str, 'latin1')
            import _codecs

            return _codecs.encode
        if (module, name) in _NUMPY_GLOBALS:
            return getattr(importlib.import_module(module), name)
        for prefix in ("numpy.core.", "numpy._core."):
            if module.startswith(prefix) and (module[len(prefix):], name) in _NUMPY_CORE_GLOBALS:
                sub = module[len(prefix):]
                for pkg in ("numpy._core", "numpy.core"):  # the running numpy's name first, no deprecation shim
                    try:
                        return getattr(importlib.import_module(f"{pkg}.{sub}"), name)
                    except (ImportError, AttributeError):
                        continue
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not allowed "
                                     "(only builtins containers and numpy arrays are)")


def read_meta(path: Path) -> dict:
    """Unpickle ``meta_data.pkl`` safely; raises SampleError when it is missing, unreadable or not a dict."""
    if not path.is_file():
        raise SampleError(f"{META_NAME} is missing.")
    try:
        with open(path, "rb") as f:
            meta = _SafeUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a malformed file
        raise SampleError(f"{META_NAME} cannot be read ({type(e).__name__}: {str(e)[:160]}).") from None
    if not isinstance(meta, dict):
        raise SampleError(f"{META_NAME} holds a {type(meta).__name__}, not a dict.")
    missing = [k for k in ("prompt", "points", "mask") if k not in meta]
    if missing:
        raise SampleError(f"{META_NAME} has no {', '.join(repr(k) for k in missing)}.")
    return meta


def build_request(image: Image.Image, meta: dict, settings: dict) -> DragRequest:
    """DragBench meta -> DragRequest (points alternate handle, target; mask 0/1 -> bool)."""
    prompt = meta["prompt"]
    if not isinstance(prompt, str):
        raise SampleError(f"'prompt' must be text, got {type(prompt).__name__}.")
    try:
        pts = np.asarray(meta["points"], dtype=np.float64)
    except (TypeError, ValueError):
        raise SampleError(f"'points' must be a list of [x, y], got {str(meta['points'])[:80]}.") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise SampleError(f"'points' must be a list of [x, y], got an array of shape {pts.shape}.")
    if len(pts) % 2:
        raise SampleError(f"'points' has {len(pts)} points; they must alternate handle, target.")
    pairs = tuple((tuple(pts[i]), tuple(pts[i + 1])) for i in range(0, len(pts), 2))
    mask = meta["mask"]
    if mask is not None:
        try:
            mask = np.asarray(mask)
            mask = mask if mask.dtype == bool else mask.astype(np.float32) > 0
        except (TypeError, ValueError):
            raise SampleError(f"'mask' must be an H×W array of 0/1, got {type(meta['mask']).__name__}.") from None
    return DragRequest(image, pairs, mask, prompt=prompt, **settings)


# ---- metrics ------------------------------------------------------------------------------------
def _load_lpips():
    """LPIPS with AlexNet features (Zhang et al. 2018), as DragBench reports it."""
    import lpips

    return lpips.LPIPS(net="alex", verbose=False)


class Fidelity:
    """Image Fidelity = 1 − LPIPS(AlexNet) at 224², or ``None`` for every pair when LPIPS cannot be loaded."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device, self.model, self.reason = torch.device(device), None, None
        try:
            self.model = _load_lpips().to(self.device).eval()
        except ImportError as e:
            self.reason = f"the lpips package is not installed ({e}); pip install lpips"
        except Exception as e:  # noqa: BLE001 - e.g. the AlexNet weights cannot be downloaded
            self.reason = f"LPIPS could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        if self.reason:
            log.warning("Image Fidelity unavailable: %s", self.reason)

    @property
    def available(self) -> bool:
        return self.model is not None

    def _tensor(self, img: Image.Image) -> torch.Tensor:
        x = pil_to_tensor(img.convert("RGB")).to(self.device)  # (1, 3, H, W) in [-1, 1]
        return F.interpolate(x, (LPIPS_SIZE, LPIPS_SIZE), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def __call__(self, original: Image.Image, edited: Image.Image) -> float | None:
        if self.model is None:
            return None
        return 1.0 - float(self.model(self._tensor(original), self._tensor(edited)).flatten()[0])


# ---- one sample ---------------------------------------------------------------------------------
@dataclass
class Row:
    category: str
    sample: str | None  # None: the category folder has no samples
    size: list[int] | None = None
    pairs: int = 0
    md: float | None = None  # mean over this sample's pairs
    distances: list[float] = field(default_factory=list)
    matched: list[list[float]] = field(default_factory=list)
    fidelity: float | None = None
    wall_s: float | None = None
    eval_s: float | None = None
    unet_calls: int | None = None
    notices: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        r = {k: getattr(self, k) for k in ("category", "sample", "size", "pairs", "md", "distances", "matched")}
        r["if"] = self.fidelity
        r.update({k: getattr(self, k) for k in ("wall_s", "eval_s", "unet_calls", "notices", "error")})
        return r


def run_sample(sample_dir: Path, out_dir: Path | None, method: Method, editor: Editor, dift, fidelity: Fidelity,
               settings: dict) -> Row:
    row = Row(sample_dir.parent.name, sample_dir.name)
    try:
        meta = read_meta(sample_dir / META_NAME)
        if not (sample_dir / IMAGE_NAME).is_file():
            raise SampleError(f"{IMAGE_NAME} is missing.")
        image = load_image(sample_dir / IMAGE_NAME)
        row.size = list(image.size)
        req = build_request(image, meta, settings)
        row.pairs, row.notices = len(req.points), list(req.notices)

        t0 = time.perf_counter()
        out = method(editor, req)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row.wall_s = round(time.perf_counter() - t0, 4)
        row.unet_calls = 0  # a method that returns a bare image (noop) evaluates no UNet
        recipe = None
        if isinstance(out, EditResult):
            row.unet_calls = sum(out.unet_calls.values())
            row.notices += [n for n in out.notices if n not in row.notices]
            out, recipe = out.image, out.recipe
        if not isinstance(out, Image.Image):
            raise SampleError(f"the method returned {type(out).__name__}, not an image.")
        edited = out.convert("RGB")
        if edited.size != image.size:
            row.notices.append(f"The method returned {edited.width}×{edited.height}; it was resized to "
                               f"{image.width}×{image.height} for saving and scoring.")
            edited = edited.resize(image.size, Image.LANCZOS)
        if out_dir is not None:
            dst = out_dir / row.category / row.sample
            dst.mkdir(parents=True, exist_ok=True)
            save_png_with_recipe(edited, dst / OUT_NAME, recipe)
            shutil.copyfile(sample_dir / META_NAME, dst / META_NAME)

        t0 = time.perf_counter()
        found = dift.match(image, [h for h, _ in req.points], edited, req.prompt)
        row.matched = [[round(x, 2), round(y, 2)] for x, y in found]
        row.distances = [round(math.dist(f, t), 4) for f, (_, t) in zip(found, req.points)]
        row.md = float(np.mean(row.distances))
        row.fidelity = fidelity(image, edited)
        row.eval_s = round(time.perf_counter() - t0, 4)
    except EditError as e:
        row.error = str(e)
    except Exception as e:  # noqa: BLE001 - one broken sample must not end a 200-sample run
        log.exception("%s/%s failed", row.category, row.sample)
        row.error = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def find_samples(data: Path) -> list[tuple[str, list[Path]]]:
    """[(category, [sample folders])] in sorted order; hidden folders and loose files are skipped."""
    dirs = lambda p: sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))  # noqa: E731
    return [(cat.name, dirs(cat)) for cat in dirs(data)]


# ---- summarising (pure) -------------------------------------------------------------------------
def aggregate(rows: list[Row]) -> dict:
    """Counts and means over rows: MD over all pairs, IF / wall / UNet calls over successful samples."""
    ok = [r for r in rows if r.error is None]
    dists = [d for r in ok for d in r.distances]
    fids = [r.fidelity for r in ok if r.fidelity is not None]
    mean = lambda v, nd: round(float(np.mean(v)), nd) if v else None  # noqa: E731
    return {
        "samples": sum(r.sample is not None for r in rows),
        "ok": len(ok),
        "failed": sum(r.sample is not None and r.error is not None for r in rows),
        "empty_categories": sum(r.sample is None for r in rows),
        "pairs": len(dists),
        "md": mean(dists, 3),
        "if": mean(fids, 4) if ok and len(fids) == len(ok) else None,
        "wall_s": mean([r.wall_s for r in ok], 3),
        "unet_calls": mean([r.unet_calls for r in ok], 1),
    }


def markdown(report: dict) -> str:
    """One row per category and an overall row: counts, MD ↓, IF ↑, mean seconds and UNet calls per edit."""
    fid = report["lpips"]["available"]
    cell = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731

    def line(name: str, s: dict) -> str:
        f = cell(s["if"], ".3f") if fid else "unavailable"
        return (f"| {name} | {s['samples']} | {s['ok']} | {s['failed']} | {s['pairs']} | {cell(s['md'], '.2f')} | "
                f"{f} | {cell(s['wall_s'], '.2f')} | {cell(s['unet_calls'], '.0f')} |")

    d = report["dift"]
    head = (f"### DragBench — method {report['method']}, model {report['model']}\n\n"
            f"MD: DIFT {d['model']} (t={d['t']}, up_blocks[{d['block']}], ensemble {d['ensemble']}); "
            f"IF: 1 − LPIPS(AlexNet) at {LPIPS_SIZE}²"
            + ("" if fid else f" — unavailable: {report['lpips']['reason']}") + "\n")
    lines = ["| category | samples | ok | failed | pairs | MD ↓ | IF ↑ | edit s | UNet calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["categories"].items():
        lines.append(line(name + (" (no samples)" if s["empty_categories"] else ""), s))
    lines.append(line("**all**", report["summary"]))
    failures = [f"- {r['category']}/{r['sample'] or '—'}: {r['error']}" for r in report["samples"] if r["error"]]
    tail = ("\n\nFailures:\n" + "\n".join(failures)) if failures else ""
    return f"{head}\n" + "\n".join(lines) + tail + "\n"


# ---- driver -------------------------------------------------------------------------------------
def parse_settings(items: list[str] | None) -> dict:
    """``["lora_steps=2", …]`` -> validated DragRequest settings; raises EditError on a bad one."""
    settings = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in DRAG_FIELDS:
            raise EditError(f"--set {item!r}: write field=value with a field among {', '.join(DRAG_FIELDS)}.")
        settings[key] = value.strip()
    probe = DragRequest(Image.new("RGB", (8, 8)), (((0, 0), (4, 4)),), **settings)  # validates ranges
    return {k: getattr(probe, k) for k in settings}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from bench.dift import DIFT_MODEL

    p = argparse.ArgumentParser(prog="python -m bench.dragbench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="DragBench folder: <category>/<sample>/original_image.png")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--model", default="auto", help="the editing model spec (models/loader.py); default auto")
    p.add_argument("--out", type=Path, help="where the edited images go (default out/dragbench/<method>)")
    p.add_argument("--dift-model", default=DIFT_MODEL, help=f"model for DIFT matching (default {DIFT_MODEL})")
    p.add_argument("--dift-ensemble", type=int, default=8, help="DIFT noise draws per image (default 8)")
    p.add_argument("--limit", type=int, help="evaluate at most this many samples (in sorted order)")
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", dest="settings",
                   help="a DragRequest setting for every sample, e.g. --set lora_steps=2 (repeatable)")
    p.add_argument("--resolution", type=int, help="the editor's working long side (default: the model's native)")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        p.error(f"--data {args.data} is not a folder.")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1.")
    if args.dift_ensemble < 1:
        p.error("--dift-ensemble must be at least 1.")
    args.out = args.out or Path("out") / "dragbench" / args.method
    if args.out.resolve() == args.data.resolve():
        p.error("--out must differ from --data (the originals would be mixed with the results).")
    try:
        args.settings = parse_settings(args.settings)
    except EditError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from bench.dift import Dift

    categories = find_samples(args.data)
    if not categories:
        print(f"{args.data} has no category folders (expected <category>/<sample>/{IMAGE_NAME}).", file=sys.stderr)
        return 2
    try:
        editor = Editor(args.model, device=args.device, resolution=args.resolution)
        if editor.banner:
            log.warning("%s", editor.banner)
        editor.load()
        dift = Dift(args.dift_model, ensemble=args.dift_ensemble, device=args.device)
    except EditError as e:
        print(str(e), file=sys.stderr)
        return 2
    fidelity = Fidelity(dift.bundle.device)
    method = METHODS[args.method]

    rows: list[Row] = []
    total = sum(len(s) for _, s in categories)
    todo = total if args.limit is None else min(args.limit, total)
    done = 0
    for cat, samples in categories:
        if args.limit is not None and done >= todo:
            break
        if not samples:
            log.warning("%s: no sample folders", cat)
            rows.append(Row(cat, None, error=f"the category folder {cat}/ has no samples."))
            continue
        for sample_dir in samples[: todo - done]:
            done += 1
            row = run_sample(sample_dir, args.out, method, editor, dift, fidelity, args.settings)
            rows.append(row)
            if row.error:
                log.warning("[%d/%d] %s/%s failed: %s", done, todo, row.category, row.sample, row.error)
            else:
                log.info("[%d/%d] %s/%s: MD %.2f, IF %s (%.1f s, %d UNet calls)", done, todo, row.category,
                         row.sample, row.md, "–" if row.fidelity is None else f"{row.fidelity:.3f}", row.wall_s,
                         row.unet_calls)

    report = {
        "method": args.method,
        "model": args.model,
        "data": str(args.data),
        "out": str(args.out),
        "request": args.settings,
        "dift": {"model": args.dift_model, "t": dift.t, "block": dift.block, "ensemble": dift.ensemble, "seed": dift.seed},
        "lpips": {"available": fidelity.available, "reason": fidelity.reason, "net": "alex", "size": LPIPS_SIZE},
        "device": str(dift.bundle.device),
        "torch": torch.__version__,
        "summary": aggregate(rows),
        "categories": {cat: aggregate([r for r in rows if r.category == cat]) for cat in dict.fromkeys(r.category for r in rows)},
        "samples": [r.to_json() for r in rows],
    }
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    sys.exit(main())
