"""DragBench evaluation of a drag method: Mean Distance (DIFT) and Image Fidelity (1 − LPIPS).

    python -m bench.dragbench --data DragBench --method dragdiffusion \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out out/dragbench/dragdiffusion \\
        --json out/dragbench_dragdiffusion.json
    python -m bench.dragbench --data DIR --method noop --model tiny --dift-model tiny --limit 4
    python -m bench.dragbench --data DIR --method dragdiffusion --model tiny --dift-model tiny \\
        --set lora_steps=2 --set n_inference_steps=6 --set max_steps=2
    python -m bench.dragbench --data DragBench --method instant --model stable-diffusion-v1-5/stable-diffusion-v1-5

Methods: every entry of ``bench/methods.py`` (dragdiffusion, gooddrag, diffeditor, dragondiffusion,
instant, region, noop); ``--set FIELD=VALUE`` sets a numeric field of that method's request.

The data folder has DragBench's layout (REFERENCE.md, "Evaluation (DragBench, from DragDiffusion)"):
``DIR/<category>/<sample>/original_image.png`` and ``meta_data.pkl`` = {'prompt': str,
'points': [[x, y], …] alternating handle, target, 'mask': H×W uint8 0/1}. Each sample is checked as a
``DragRequest`` (any image size; points inside it, the mask resized when its size differs), then runs
through the method's own request; the result is written in the same layout to ``OUT/<category>/<sample>/dragged_image.png``
(``meta_data.pkl`` copied beside it), so other evaluation scripts can read it too.

Metrics, per sample, then per category and overall, following the official
``drag_bench_evaluation/`` scripts (REFERENCE.md, "Exact protocol"):
- The edited image is first resized to the original's size with PIL bilinear (as the official
  scripts do before both metrics), then saved and scored.
- **MD** (Mean Distance, lower is better): for each handle, its DIFT match in the edited image
  (``bench/dift.py``: SD-2.1 in fp32, t = 261, ``up_ft_index`` 1, the image repeated 8 times with the
  posterior sampled and noised per copy, features averaged, the sample's prompt, no CFG, seed 42,
  features bilinearly upsampled to H×W, cosine argmax over the whole edited image); the pixel
  distance to the target; the mean over all pairs of the run (not of per-image means).
- **IF** (Image Fidelity, higher is better): 1 − LPIPS(AlexNet) between the original and the edited
  image, both in [−1, 1] resized bilinearly to 224², with the ``lpips`` package; the mean over
  samples. Without it (or its AlexNet weights) the table says "unavailable" and the JSON holds null.

Samples run through ``evaluate`` (one process, one Editor, in sorted order); a worker pool can replace
it (``main(evaluate_fn=...)``): every sample's scores depend on that sample alone (DIFT's noise is
seeded per image), so the order and the worker do not change a number.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench import methods as bm
from editing.drag import DragRequest
from editing.engine import Editor
from editing.images import load_image, pil_to_tensor, save_png_with_recipe
from models.errors import EditError

log = logging.getLogger(__name__)

IMAGE_NAME, META_NAME, OUT_NAME = "original_image.png", "meta_data.pkl", "dragged_image.png"
LPIPS_SIZE = 224


# The methods: the shared table (bench/methods.py); the Move tool is not among them (DragBench's mask
# is the editable area, not the object).
METHODS: dict[str, bm.Method] = bm.METHODS


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
    except Exception as e:
        raise SampleError(f"{META_NAME} cannot be read ({type(e).__name__}: {str(e)[:160]}).") from None
    if not isinstance(meta, dict):
        raise SampleError(f"{META_NAME} holds a {type(meta).__name__}, not a dict.")
    missing = [k for k in ("prompt", "points", "mask") if k not in meta]
    if missing:
        raise SampleError(f"{META_NAME} has no {', '.join(repr(k) for k in missing)}.")
    return meta


def build_request(image: Image.Image, meta: dict, settings: dict | None = None) -> DragRequest:
    """DragBench meta -> a checked DragRequest (points alternate handle, target; mask 0/1 -> bool).

    Every method's input is checked this way (noop included), so a bad sample fails the same for all."""
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
    return DragRequest(image, pairs, mask, prompt=prompt, **(settings or {}))


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
        except Exception as e:
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


def to_source_size(edited: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The edited image as the official scripts score it: RGB, resized to the original's (w, h) with PIL bilinear."""
    edited = edited.convert("RGB")
    return edited if edited.size == tuple(size) else edited.resize(tuple(size), Image.BILINEAR)


def run_sample(sample_dir: Path, out_dir: Path | None, method: str, editor: Editor | None, dift, fidelity: Fidelity,
               settings: dict) -> Row:
    """Edit one sample with ``method`` (a name of ``METHODS``), save it in DragBench's layout, score it."""
    row = Row(sample_dir.parent.name, sample_dir.name)
    try:
        meta = read_meta(sample_dir / META_NAME)
        if not (sample_dir / IMAGE_NAME).is_file():
            raise SampleError(f"{IMAGE_NAME} is missing.")
        image = load_image(sample_dir / IMAGE_NAME)
        row.size = list(image.size)
        req = build_request(image, meta)
        row.pairs, row.notices = len(req.points), list(req.notices)

        outcome = bm.run_method(method, editor, req.image, req.points, req.mask, req.prompt, settings, table=METHODS)
        row.wall_s, row.unet_calls = round(outcome.seconds, 4), outcome.unet_calls
        recipe = None
        if outcome.result is not None:
            row.notices += [n for n in outcome.result.notices if n not in row.notices]
            recipe = outcome.result.recipe
        if not isinstance(outcome.image, Image.Image):
            raise SampleError(f"the method returned {type(outcome.image).__name__}, not an image.")
        edited = to_source_size(outcome.image, image.size)
        if outcome.image.size != image.size:
            row.notices.append(f"The method returned {outcome.image.width}×{outcome.image.height}; it was resized "
                               f"(bilinear) to {image.width}×{image.height} for saving and scoring.")
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
    except Exception as e:
        log.exception("%s/%s failed", row.category, row.sample)
        row.error = f"{type(e).__name__}: {str(e)[:200]}"
    return row


@dataclass
class Context:
    """What scoring needs in one process: the editor (None for noop), DIFT, LPIPS, the method and its settings."""

    method: str
    settings: dict
    editor: Editor | None
    dift: object
    fidelity: Fidelity
    out: Path | None


def make_context(args: argparse.Namespace) -> Context:
    """Load the editor (unless the method is noop), DIFT and LPIPS for ``args``; EditError when a model fails."""
    from bench.dift import Dift

    editor = None
    if METHODS[args.method].build is not None and not getattr(args, "ray", None):  # --ray: edits run on the pool
        editor = Editor(args.model, device=args.device, resolution=args.resolution)
        if editor.banner:
            log.warning("%s", editor.banner)
        editor.load()
    dift = Dift(args.dift_model, ensemble=args.dift_ensemble, device=args.device)
    return Context(args.method, args.settings, editor, dift, Fidelity(dift.bundle.device), args.out)


def evaluate(samples: Sequence[Path], ctx: Context) -> list[Row]:
    """Every sample folder in order, in this process. The seam for a worker pool (issue 15): anything of this
    signature returning one Row per sample, in order, can replace it (each worker builds its own Context)."""
    rows = []
    for k, sample_dir in enumerate(samples, 1):
        row = run_sample(sample_dir, ctx.out, ctx.method, ctx.editor, ctx.dift, ctx.fidelity, ctx.settings)
        if row.error:
            log.warning("[%d/%d] %s/%s failed: %s", k, len(samples), row.category, row.sample, row.error)
        else:
            log.info("[%d/%d] %s/%s: MD %.2f, IF %s (%.1f s, %d UNet calls)", k, len(samples), row.category,
                     row.sample, row.md, "–" if row.fidelity is None else f"{row.fidelity:.3f}", row.wall_s,
                     row.unet_calls)
        rows.append(row)
    return rows


Evaluate = Callable[[Sequence[Path], Context], list[Row]]


def pooled(remote) -> Evaluate:
    """``evaluate`` with the edits on a Ray Serve pool (``bench/pool.py``); DIFT and LPIPS score here."""
    from bench.pool import ordered_map

    def evaluate_on_pool(samples: Sequence[Path], ctx: Context) -> list[Row]:
        editor = remote if METHODS[ctx.method].build is not None else None
        return ordered_map(lambda d: run_sample(d, ctx.out, ctx.method, editor, ctx.dift, ctx.fidelity, ctx.settings),
                           samples, remote.concurrency)

    return evaluate_on_pool


def find_samples(data: Path) -> list[tuple[str, list[Path]]]:
    """[(category, [sample folders])] in sorted order; hidden folders and loose files are skipped."""
    def dirs(p):
        return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    return [(cat.name, dirs(cat)) for cat in dirs(data)]


# ---- summarising (pure) -------------------------------------------------------------------------
def aggregate(rows: list[Row]) -> dict:
    """Counts and means over rows: MD over all pairs, IF / wall / UNet calls over successful samples."""
    ok = [r for r in rows if r.error is None]
    dists = [d for r in ok for d in r.distances]
    fids = [r.fidelity for r in ok if r.fidelity is not None]
    def mean(v, nd):
        return round(float(np.mean(v)), nd) if v else None
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
    def cell(v, fmt):
        return "–" if v is None else format(v, fmt)

    def line(name: str, s: dict) -> str:
        f = cell(s["if"], ".3f") if fid else "unavailable"
        return (f"| {name} | {s['samples']} | {s['ok']} | {s['failed']} | {s['pairs']} | {cell(s['md'], '.2f')} | "
                f"{f} | {cell(s['wall_s'], '.2f')} | {cell(s['unet_calls'], '.0f')} |")

    d = report["dift"]
    head = (f"### DragBench — method {report['method']}, model {report['model']}\n\n"
            f"MD: DIFT {d['model']} (t={d['t']}, up_blocks[{d['block']}], ensemble {d['ensemble']}, seed {d['seed']}; "
            f"mean over all points); edited image resized to the source with bilinear; "
            f"IF: 1 − LPIPS(AlexNet) at {LPIPS_SIZE}²"
            + ("" if fid else f" — unavailable: {report['lpips']['reason']}") + "\n")
    lines = ["| category | samples | ok | failed | pairs | MD ↓ | IF ↑ | edit s | UNet calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["categories"].items():
        lines.append(line(name + (" (no samples)" if s["empty_categories"] else ""), s))
    lines.append(line("**all**", report["summary"]))
    failures = [f"- {r['category']}/{r['sample'] or '—'}: {r['error']}" for r in report["samples"] if r["error"]]
    summ = report["summary"]
    tail = ("\n\nFailures (MD and IF cover only the "
            f"{summ['ok']} ok samples, {summ['pairs']} points; the protocol's MD is over every point):\n"
            + "\n".join(failures)) if failures else ""
    return f"{head}\n" + "\n".join(lines) + tail + "\n"


# ---- driver -------------------------------------------------------------------------------------
def parse_settings(items: list[str] | None, method: str = "dragdiffusion") -> dict:
    """``["lora_steps=2", …]`` -> validated settings of ``method``'s request; raises EditError on a bad one."""
    return bm.parse_settings(items, [method], METHODS)[method]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from bench.dift import DIFT_MODEL

    p = argparse.ArgumentParser(prog="python -m bench.dragbench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="DragBench folder: <category>/<sample>/original_image.png")
    p.add_argument("--method", required=True, choices=list(METHODS),
                   help="; ".join(f"{k}: {m.about}" for k, m in METHODS.items()))
    p.add_argument("--model", default="auto", help="the editing model spec (models/loader.py); default auto")
    p.add_argument("--out", type=Path, help="where the edited images go (default out/dragbench/<method>)")
    p.add_argument("--dift-model", default=DIFT_MODEL, help=f"model for DIFT matching (default {DIFT_MODEL})")
    p.add_argument("--dift-ensemble", type=int, default=8, help="DIFT noise draws per image (default 8)")
    p.add_argument("--limit", type=int, help="evaluate at most this many samples (in sorted order)")
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", dest="settings",
                   help="a numeric field of the method's request for every sample, e.g. --set lora_steps=2 (repeatable)")
    p.add_argument("--resolution", type=int, help="the editor's working long side (default: the model's native)")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--ray", metavar="ADDRESS", help="run the edits on a `python -m editing.serve` deployment "
                   "(auto = this machine's cluster); scores as in process")
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
        args.settings = parse_settings(args.settings, args.method)
    except EditError as e:
        p.error(str(e))
    return args


def select(categories: list[tuple[str, list[Path]]], limit: int | None) -> tuple[list[Path], list[tuple[int, Row]]]:
    """The sample folders to evaluate (the first ``limit`` in sorted order) and the rows of empty
    categories met on the way, each with the number of samples before it (to keep the report's order)."""
    chosen: list[Path] = []
    empty: list[tuple[int, Row]] = []
    for cat, samples in categories:
        if limit is not None and len(chosen) >= limit:
            break
        if not samples:
            log.warning("%s: no sample folders", cat)
            empty.append((len(chosen), Row(cat, None, error=f"the category folder {cat}/ has no samples.")))
            continue
        chosen += samples[: None if limit is None else limit - len(chosen)]
    return chosen, empty


def main(argv: list[str] | None = None, evaluate_fn: Evaluate | None = None) -> int:
    args = _parse(argv)
    categories = find_samples(args.data)
    if not categories:
        print(f"{args.data} has no category folders (expected <category>/<sample>/{IMAGE_NAME}).", file=sys.stderr)
        return 2
    try:
        ctx = make_context(args)
    except EditError as e:
        print(str(e), file=sys.stderr)
        return 2
    chosen, empty = select(categories, args.limit)
    if args.ray and evaluate_fn is None:
        from bench.pool import connect

        try:
            evaluate_fn = pooled(connect(args.ray, args.model))
        except EditError as e:
            print(str(e), file=sys.stderr)
            return 2
    scored = (evaluate_fn or evaluate)(chosen, ctx)
    rows: list[Row] = []
    for k, row in enumerate(scored + [None]):
        rows += [r for before, r in empty if before == k]
        if row is not None:
            rows.append(row)
    dift, fidelity = ctx.dift, ctx.fidelity

    report = {
        "method": args.method,
        "model": args.model,
        "data": str(args.data),
        "out": str(args.out),
        "request": args.settings,
        "dift": {"model": args.dift_model, "t": dift.t, "block": dift.block, "ensemble": dift.ensemble, "seed": dift.seed,
                 "dtype": str(dift.bundle.dtype).removeprefix("torch."), "size": "native", "latent": "posterior sample",
                 "resize": "edited -> source size, PIL bilinear"},
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
