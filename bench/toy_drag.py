"""Shapes drag benchmark: does a drag really move the shape to the target, and does the rest survive?

    python -m bench.toy_drag --methods dragdiffusion,gooddrag,diffeditor,dragondiffusion,instant,region --n 50 \\
        [--model toy] [--set FIELD=VALUE] [--set METHOD.FIELD=VALUE] [--json OUT.json]
    python -m bench.toy_drag --methods all --n 50        # every method of bench/methods.py, and move

Held-out toy scenes (``models/toy_world.py``) with one or two shapes; the handle is a shape's
centroid, the target 6–20 px away, the mask covers the shape's start and end (dilated by 3 px).
Metrics per method:
- MD: pixels between the dragged shape's new centroid (largest blob of its colour, found by the
  generator's own colour segmentation) and the target; a lost shape counts the handle→target distance.
- success: MD ≤ 3 px.     - bg PSNR: input vs output outside the mask.
- kept: the blob still has the shape's colour and class (IoU ≥ 0.5 with the shape re-rendered there).
- wall time and UNet calls per edit.
The ``noop`` baseline (returns the input) always runs, on the same scenes, in the same table, and every
method's MD is also given as a ratio to noop's (``MD / noop``), so ratios come from one run.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from bench import methods as bm
from models.errors import EditError
from models import toy_world as tw
from models.toy_world import Case, make_cases  # noqa: F401 - re-exported: bench.toy_drag.make_cases

log = logging.getLogger(__name__)
SUCCESS_PX = 3.0
# Every method of the shared table, and the Move tool (it needs the shape's own mask, which only this
# benchmark has). noop is the baseline and always runs.
METHODS: dict[str, bm.Method] = {**bm.METHODS, **bm.EXTRA}
CHOICES = [m for m in METHODS if m != "noop"]
SPLITS = {"bench": tw.HELDOUT_SEED, "tune": tw.TUNE_SEED}  # --split: first scene seed


def measure(case: Case, out: Image.Image) -> dict:
    """MD, success, background PSNR, kept colour/class for one output image."""
    blob = tw.largest_blob(tw.segment_colour(out, case.shape.colour))
    c = tw.centroid(blob) if blob.sum() >= 0.3 * case.shape.mask.sum() else None
    lost = c is None
    md = math.dist(case.handle, case.target) if lost else math.dist(c, case.target)
    kept = False
    if not lost:
        dx, dy = c[0] - case.shape.centroid[0], c[1] - case.shape.centroid[1]
        ref = tw.render([case.shape.moved(dx, dy)], case.scene.background).shapes[0].mask
        kept = (blob & ref).sum() / max(1, (blob | ref).sum()) >= 0.5
    a = np.asarray(case.scene.image, np.float32)
    b = np.asarray(out.convert("RGB").resize(case.scene.image.size), np.float32)
    keep = ~case.mask
    mse = float(((a - b) ** 2)[keep].mean()) if keep.any() else 0.0
    psnr = 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return {"md": md, "success": md <= SUCCESS_PX, "bg_psnr": psnr, "lost": lost, "kept": bool(kept)}


# ---- one case, and the map over all of them (the seam a worker pool replaces) --------------------
@dataclass(frozen=True)
class Job:
    """One (method, case) evaluation; plain data, so a pool can ship it to another process, which rebuilds
    the case with ``make_cases(n, seed)[index]`` (the held-out cases are a deterministic sequence)."""

    method: str
    index: int
    n: int
    settings: dict
    seed: int = tw.HELDOUT_SEED  # first scene seed of the split (tw.TUNE_SEED: the tuning scenes)


def run_case(editor, method: str, case: Case, settings: dict) -> dict:
    """Edit one case with one method and score it (the Move tool gets the shape's own mask)."""
    mask = case.shape.mask if method == "move" else case.mask
    img, calls, seconds = bm.run_method(method, editor, case.scene.image, ((case.handle, case.target),), mask,
                                        case.scene.caption, settings, table=METHODS)
    return measure(case, img) | {"wall_s": seconds, "unet_calls": calls, "seed": case.scene.seed}


def evaluate(jobs: Sequence[Job], model: str) -> list[dict]:
    """Every job in order on one Editor in this process (built only when a method needs a model).

    This is the seam for a worker pool (issue 15): anything with this signature that returns one row per
    job, in the jobs' order, can replace it (each worker builds its own Editor of ``model``).
    """
    editor = None
    cases: dict[int, list[Case]] = {}
    rows = []
    last = None
    for job in jobs:
        if len(cases.get(job.seed, ())) < job.n:
            cases[job.seed] = make_cases(job.n, job.seed)
        if editor is None and METHODS[job.method].build is not None:
            from editing.engine import Editor

            editor = Editor(model)
            editor.load()  # loading the model is not part of any edit's time
        if editor is not None and job.method != last:
            editor.clear_caches()  # a method's times never include another method's cached inversion or bank
        last = job.method
        case = cases[job.seed][job.index]
        row = run_case(editor, job.method, case, job.settings)
        log.info("%s %d/%d: md %.1f px (start %.1f), bg %.1f dB, %.2f s%s", job.method, job.index + 1, job.n,
                 row["md"], math.dist(case.handle, case.target), row["bg_psnr"], row["wall_s"],
                 " LOST" if row["lost"] else "")
        rows.append(row)
    return rows


Evaluate = Callable[[Sequence[Job], str], list[dict]]


def pooled(remote) -> Evaluate:
    """``evaluate`` on a Ray Serve pool (``bench/pool.py``): the same rows, the jobs spread over its replicas."""
    from bench.pool import ordered_map

    def evaluate_on_pool(jobs: Sequence[Job], model: str) -> list[dict]:
        cases = {seed: make_cases(max(j.n for j in jobs if j.seed == seed), seed) for seed in {j.seed for j in jobs}}
        return ordered_map(lambda job: run_case(remote, job.method, cases[job.seed][job.index], job.settings), jobs,
                           remote.concurrency)

    return evaluate_on_pool


def summarize(method: str, rows: list[dict], noop_md: float | None = None) -> dict:
    """Means over the cases (pure); ``md_vs_noop`` when noop's MD on the same cases is given."""
    finite = [r["bg_psnr"] for r in rows if r["bg_psnr"] < 99]
    md = float(np.mean([r["md"] for r in rows]))
    out = {
        "method": method, "n": len(rows), "md": md,
        "success_rate": float(np.mean([r["success"] for r in rows])),
        "bg_psnr": float(np.mean(finite)) if finite else float("inf"),
        "kept_rate": float(np.mean([r["kept"] for r in rows])), "lost": int(sum(r["lost"] for r in rows)),
        "wall_s": float(np.mean([r["wall_s"] for r in rows])), "unet_calls": float(np.mean([r["unet_calls"] for r in rows])),
        "cases": rows,
    }
    if noop_md is not None:
        out["md_vs_noop"] = md / noop_md if noop_md else float("nan")
    return out


def run(method: str, n: int, model: str, settings: dict, evaluate_fn: Evaluate | None = None,
        seed: int = tw.HELDOUT_SEED) -> dict:
    """One method on the first ``n`` held-out cases (no noop ratio; ``run_all`` adds it)."""
    rows = (evaluate_fn or evaluate)([Job(method, i, n, settings, seed) for i in range(n)], model)
    return summarize(method, rows)


def run_all(names: list[str], n: int, model: str, settings: dict[str, dict],
            evaluate_fn: Evaluate | None = None, seed: int = tw.HELDOUT_SEED) -> list[dict]:
    """noop and every method of ``names`` on the same ``n`` cases, in one map; each with its MD / noop."""
    names = ["noop"] + [m for m in names if m != "noop"]
    jobs = [Job(m, i, n, settings.get(m, {}), seed) for m in names for i in range(n)]
    rows = (evaluate_fn or evaluate)(jobs, model)
    by_method = {m: rows[k * n:(k + 1) * n] for k, m in enumerate(names)}
    noop_md = float(np.mean([r["md"] for r in by_method["noop"]]))
    return [summarize(m, by_method[m], noop_md) | {"settings": settings.get(m, {})} for m in names]


def markdown(runs: list[dict], model: str, n: int, split: str = "bench") -> str:
    scenes = "held-out scenes" if split == "bench" else "TUNING scenes (not the benchmark's)"
    lines = [f"### toy drag benchmark — model {model}, {n} {scenes}\n",
             "| method | MD px | MD / noop | success (≤3 px) | bg PSNR dB | kept colour+class | lost | s/edit | UNet calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        name = r["method"] + (" (" + ", ".join(f"{k}={v}" for k, v in r["settings"].items()) + ")" if r.get("settings") else "")
        lines.append(f"| {name} | {r['md']:.2f} | {r['md_vs_noop']:.2f} | {r['success_rate']:.0%} | {r['bg_psnr']:.1f} | "
                     f"{r['kept_rate']:.0%} | {r['lost']} | {r['wall_s']:.2f} | {r['unet_calls']:.0f} |")
    return "\n".join(lines) + "\n"


def _methods(args, p: argparse.ArgumentParser) -> list[str]:
    names: list[str] = []
    for item in [*(args.methods or []), *(args.method or [])]:
        for name in (s.strip() for s in item.split(",")):
            if name == "all":
                names += CHOICES
            elif name:
                names.append(name)
    names = list(dict.fromkeys(n for n in names if n != "noop")) or ["dragdiffusion"]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(CHOICES)} (or all)")
    return names


def main(argv: list[str] | None = None, evaluate_fn: Evaluate | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_drag", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods:\n" + "\n".join(f"  {k:16s} {m.about}" for k, m in METHODS.items()))
    p.add_argument("--method", action="append", metavar="NAME", help="a method to score (repeatable)")
    p.add_argument("--methods", action="append", metavar="A,B,C", help=f"comma-separated, or all: {','.join(CHOICES)}")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--model", default="toy")
    p.add_argument("--set", action="append", default=[], metavar="[METHOD.]FIELD=VALUE",
                   help="a request field for every chosen method that has it, or for METHOD only (repeatable)")
    p.add_argument("--split", choices=SPLITS, default="bench",
                   help="bench: the held-out scenes the reported numbers use; tune: other held-out scenes, to pick "
                        "settings on without fitting the benchmark")
    p.add_argument("--json", type=Path)
    p.add_argument("--ray", metavar="ADDRESS", help="run the edits on a `python -m editing.serve` deployment "
                   "(auto = this machine's cluster); same rows as in process")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1.")
    names = _methods(args, p)
    try:
        settings = bm.parse_settings(args.set, names, METHODS)
    except EditError as e:
        p.error(str(e))
    if args.ray and evaluate_fn is None:
        from bench.pool import connect

        try:
            evaluate_fn = pooled(connect(args.ray, args.model))
        except EditError as e:
            p.error(str(e))
    runs = run_all(names, args.n, args.model, settings, evaluate_fn, SPLITS[args.split])
    print("\n" + markdown(runs, args.model, args.n, args.split))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"runs": runs, "model": args.model, "n": args.n, "split": args.split, "noop_md": runs[0]["md"],
                  "methods": names, "settings": settings}
        if len(names) == 1:  # the one-method summary earlier reports had at the top level
            report |= {k: runs[1][k] for k in ("method", "md", "md_vs_noop", "success_rate", "bg_psnr")}
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
