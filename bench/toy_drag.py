"""Shapes drag benchmark: does a drag really move or reshape the shape as asked, and does the rest survive?

    python -m bench.toy_drag --methods dragdiffusion,gooddrag,diffeditor,dragondiffusion,instant,region --n 50 \\
        [--family move|scale|stretch|rotate|all] [--model toy] [--set FIELD=VALUE] [--set METHOD.FIELD=VALUE] \\
        [--split bench|tune] [--json OUT.json]
    python -m bench.toy_drag --methods all --n 50        # every method of bench/methods.py, and move

Held-out toy scenes (``models/toy_world.py``), one case family at a time (``--family``, default move):
- move: v1 scenes with one or two shapes; the handle is a shape's centroid, the target 6–20 px away.
- scale: two handles on opposite rim points / corners of a disk, ring, square or triangle pulled apart or
  together (×1.25–1.5 or ×0.67–0.8): the shape grows or shrinks about its centre.
- stretch: one end of a bar, oval or rectangle pulled along its axis to ×1.45–1.8 or ×0.55–0.68 its length,
  a pin on the other end.
- rotate: one end turned 25–60° about a pin at the other end or at the centre.
The mask covers the shape's start and end outline (dilated by 3 px); the ground truth is the scene
re-rendered with the shape moved or deformed (``toy_world.make_deform_cases``). Metrics per (family, method):
- MD (move): pixels between the dragged shape's new centroid (largest blob of its colour, found by the
  generator's own colour segmentation) and the target; a lost shape counts the handle→target distance.
- IoU: that blob against the true moved / deformed shape's mask.
- handle MD: where the dragged feature landed, against its target. move: the centroid (= MD). scale: the
  handle mapped by the blob's centroid shift and area ratio (a similarity without rotation: compact shapes'
  second moments carry no angle). stretch / rotate: the handle mapped through the principal axes (centroid,
  major-axis direction, spread along and across it) from the source shape onto the blob, the axis sign taken
  from the true result (so only a half-turn is resolved by the ground truth). Mean over a case's dragged pairs.
- success: move MD ≤ 3 px; scale / stretch / rotate IoU ≥ 0.7.     - bg PSNR: input vs output outside the mask.
- kept: the blob still has the shape's colour and class (IoU ≥ 0.5 with the source or the true shape
  re-rendered at the blob's centroid).
- refused: cases the method rejected with an EditError (e.g. a pin it cannot take); scored as the input
  unchanged and counted as failures, so a method that refuses never beats one that tries.
- wall time and UNet calls per edit.
The ``noop`` baseline (returns the input) always runs, on the same scenes, in the same table, and every
method's MD is also given as a ratio to noop's (``MD / noop``, per family), so ratios come from one run.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench import methods as bm
from models import toy_world as tw
from models.errors import EditError
from models.toy_world import Case, DeformCase, make_cases

__all__ = ["Case", "DeformCase", "Job", "evaluate", "main", "make_cases", "measure", "measure_case", "run", "run_all"]

log = logging.getLogger(__name__)
SUCCESS_PX = 3.0
SUCCESS_IOU = 0.7  # scale / stretch / rotate: IoU with the true deformed shape
# Every method of the shared table, and the Move tool (it needs the shape's own mask, which only this
# benchmark has). noop is the baseline and always runs.
METHODS: dict[str, bm.Method] = {**bm.METHODS, **bm.EXTRA}
CHOICES = [m for m in METHODS if m != "noop"]
SPLITS = {"bench": tw.HELDOUT_SEED, "tune": tw.TUNE_SEED}  # --split: first scene seed
FAMILIES = tw.FAMILIES


def table_for(name: str) -> dict[str, bm.Method]:
    """The method table that knows ``name``: this benchmark's, or bench.methods' own resolution (an alias such
    as ``default``, which names whatever the Drag tab starts on), under the name asked for."""
    return METHODS if name in METHODS else {name: bm.lookup(name)}


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
    return {"md": md, "success": md <= SUCCESS_PX, "bg_psnr": bg_psnr(case.scene.image, out, case.mask),
            "lost": lost, "kept": bool(kept)}


def bg_psnr(image: Image.Image, out: Image.Image, mask: np.ndarray) -> float:
    """PSNR (dB) of ``out`` against ``image`` outside ``mask``; 99 when identical there."""
    a = np.asarray(image, np.float32)
    b = np.asarray(out.convert("RGB").resize(image.size), np.float32)
    keep = ~mask
    mse = float(((a - b) ** 2)[keep].mean()) if keep.any() else 0.0
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _frame(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroid, major axis unit vector, spreads (σ along, σ across)) of a bool mask, in (x, y) pixels."""
    ys, xs = np.nonzero(mask)
    pts = np.stack([xs + 0.5, ys + 0.5], 1).astype(np.float64)
    mu = pts.mean(0)
    cov = np.cov((pts - mu).T) if len(pts) > 2 else np.eye(2)
    vals, vecs = np.linalg.eigh(cov)  # ascending
    return mu, vecs[:, 1], np.sqrt(np.maximum(vals[::-1], 1e-6))


def landed(case: DeformCase, blob: np.ndarray, handle: tuple[float, float]) -> tuple[float, float]:
    """Where ``handle`` (a point of the source shape) is in the output's ``blob`` (see the module's handle MD)."""
    src = case.shape.mask
    if case.family in ("move", "scale"):  # centroid shift and area ratio, no rotation
        cs, cb = np.array(tw.centroid(src)), np.array(tw.centroid(blob))
        p = cb + (np.asarray(handle) - cs) * math.sqrt(blob.sum() / max(1, src.sum()))
        return float(p[0]), float(p[1])
    ms, es, ss = _frame(src)
    mt, et, _ = _frame(case.truth_shape.mask)
    mb, eb, sb = _frame(blob)
    h, t = np.asarray(handle), np.asarray(case.points[case.drags[0]][1])
    es = es if (h - ms) @ es >= 0 else -es  # the source axis points to the dragged end...
    et = et if (t - mt) @ et >= 0 else -et  # ...and so does the true result's...
    eb = eb if eb @ et >= 0 else -eb  # ...and the blob's axis is the one nearer the truth's (a half-turn is moot)
    a1, a2 = (h - ms) @ es / ss[0], (h - ms) @ np.array([-es[1], es[0]]) / ss[1]  # the handle in units of spread
    p = mb + a1 * sb[0] * eb + a2 * sb[1] * np.array([-eb[1], eb[0]])
    return float(p[0]), float(p[1])


def measure_case(case: DeformCase, out: Image.Image) -> dict:
    """Every metric of one output for a case of any family: md, handle_md, iou, success, bg_psnr, lost, kept.

    move keeps ``measure``'s numbers (MD and the ≤ 3 px success) and adds IoU; the other families succeed on
    IoU ≥ 0.7 with the true deformed shape, and their ``md`` is ``handle_md``."""
    blob = tw.largest_blob(tw.segment_colour(out, case.shape.colour))
    iou = _iou(blob, case.truth_shape.mask)
    drags = [case.points[i] for i in case.drags]
    vac = vacated_error(case, out)
    if case.family == "move":
        row = measure(case.as_move_case(), out)
        return row | {"handle_md": row["md"], "iou": iou, "vacated_err": vac}
    lost = blob.sum() < 0.3 * min(case.shape.mask.sum(), case.truth_shape.mask.sum())
    if lost:
        handle_md = float(np.mean([math.dist(h, t) for h, t in drags]))
    else:
        handle_md = float(np.mean([math.dist(landed(case, blob, h), t) for h, t in drags]))
    kept = False
    if not lost:
        c = tw.centroid(blob)
        bg = case.scene.background
        refs = [tw.render([s.moved(c[0] - s.centroid[0], c[1] - s.centroid[1])], bg).shapes[0].mask
                for s in (case.shape, case.truth_shape)]
        kept = max(_iou(blob, r) for r in refs) >= 0.5
    return {"md": handle_md, "handle_md": handle_md, "iou": iou, "success": iou >= SUCCESS_IOU,
            "bg_psnr": bg_psnr(case.scene.image, out, case.mask),
            "lost": bool(lost), "kept": bool(kept), "vacated_err": vac}


def vacated_error(case: DeformCase, out: Image.Image) -> float:
    """Mean absolute RGB error (0–255) against the true result over the area the shape left (its old pixels that
    the true deformed shape does not cover): how well the hole was filled with background. NaN if it left none."""
    vac = case.shape.mask & ~case.truth_shape.mask
    if not vac.any():
        return float("nan")
    diff = np.abs(np.asarray(out.convert("RGB"), np.float32) - np.asarray(case.truth.image, np.float32))
    return float(diff[vac].mean())


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
    family: str = "move"  # which cases: tw.make_deform_cases(family, n, seed)[index]


def case_mask(method: str, case: DeformCase) -> np.ndarray:
    """The mask ``method`` gets: the shape's own for a method whose mask is the object (the Move tool, Inpaint, as
    in Inpaint4Drag's own DragBench evaluation, whose masks are re-drawn around the objects; the app's one click
    gives it, bench.click_masks), the editable area for the others."""
    return case.shape.mask if table_for(method)[method].mask == "object" else case.mask


def run_case(editor, method: str, case: Case | DeformCase, settings: dict) -> dict:
    """Edit one case with one method (with ``case_mask``) and score it.

    A method that refuses the case (an EditError, e.g. a pin it does not take) is scored on the input
    unchanged, as a failure, with ``refused`` set and the message kept: one refusal never stops the run."""
    if isinstance(case, Case):
        case = tw.as_deform_case(case)
    mask = case_mask(method, case)
    try:
        img, calls, seconds = bm.run_method(method, editor, case.scene.image, case.points, mask, case.scene.caption,
                                            settings, table=table_for(method))
    except EditError as e:
        row = measure_case(case, case.scene.image) | {"success": False}
        return row | {"wall_s": 0.0, "unet_calls": 0, "seed": case.scene.seed, "refused": True, "error": str(e)}
    return measure_case(case, img) | {"wall_s": seconds, "unet_calls": calls, "seed": case.scene.seed, "refused": False}


def evaluate(jobs: Sequence[Job], model: str) -> list[dict]:
    """Every job in order on one Editor in this process (built only when a method needs a model).

    This is the seam for a worker pool (issue 15): anything with this signature that returns one row per
    job, in the jobs' order, can replace it (each worker builds its own Editor of ``model``).
    """
    editor = None
    cases: dict[tuple[str, int], list[DeformCase]] = {}
    rows = []
    last = None
    for job in jobs:
        key = (job.family, job.seed)
        if len(cases.get(key, ())) < job.n:
            cases[key] = tw.make_deform_cases(job.family, job.n, job.seed)
        if editor is None and table_for(job.method)[job.method].build is not None:
            from editing.engine import Editor

            editor = Editor(model)
            editor.load()  # loading the model is not part of any edit's time
        if editor is not None and job.method != last:
            editor.clear_caches()  # a method's times never include another method's cached inversion or bank
        last = job.method
        case = cases[key][job.index]
        row = run_case(editor, job.method, case, job.settings)
        log.info("%s %s %d/%d: md %.1f px (start %.1f), IoU %.2f, bg %.1f dB, %.2f s%s%s", job.family, job.method,
                 job.index + 1, job.n, row["md"], math.dist(case.handle, case.target), row["iou"], row["bg_psnr"],
                 row["wall_s"], " LOST" if row["lost"] else "", " REFUSED: " + row["error"] if row["refused"] else "")
        rows.append(row)
    return rows


Evaluate = Callable[[Sequence[Job], str], list[dict]]


def pooled(remote) -> Evaluate:
    """``evaluate`` on a Ray Serve pool (``bench/pool.py``): the same rows, the jobs spread over its replicas."""
    from bench.pool import ordered_map

    def evaluate_on_pool(jobs: Sequence[Job], model: str) -> list[dict]:
        keys = {(j.family, j.seed) for j in jobs}
        cases = {k: tw.make_deform_cases(k[0], max(j.n for j in jobs if (j.family, j.seed) == k), k[1]) for k in keys}
        return ordered_map(lambda job: run_case(remote, job.method, cases[job.family, job.seed][job.index], job.settings),
                           jobs, remote.concurrency)

    return evaluate_on_pool


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(method: str, rows: list[dict], noop_md: float | None = None, family: str = "move") -> dict:
    """Means over the cases (pure); ``md_vs_noop`` when noop's MD on the same cases is given."""
    finite = [r["bg_psnr"] for r in rows if r["bg_psnr"] < 99]
    md = float(np.mean([r["md"] for r in rows]))
    out = {
        "family": family, "method": method, "n": len(rows), "md": md,
        "success_rate": float(np.mean([r["success"] for r in rows])),
        "iou": float(np.mean([r.get("iou", float("nan")) for r in rows])),
        "handle_md": float(np.mean([r.get("handle_md", r["md"]) for r in rows])),
        "refused": int(sum(r.get("refused", False) for r in rows)),
        "bg_psnr": float(np.mean(finite)) if finite else float("inf"),
        "kept_rate": float(np.mean([r["kept"] for r in rows])), "lost": int(sum(r["lost"] for r in rows)),
        "vacated_err": _finite_mean([r.get("vacated_err", float("nan")) for r in rows]),
        "wall_s": float(np.mean([r["wall_s"] for r in rows])), "unet_calls": float(np.mean([r["unet_calls"] for r in rows])),
        "cases": rows,
    }
    if noop_md is not None:
        out["md_vs_noop"] = md / noop_md if noop_md else float("nan")
    return out


def run(method: str, n: int, model: str, settings: dict, evaluate_fn: Evaluate | None = None,
        seed: int = tw.HELDOUT_SEED, family: str = "move") -> dict:
    """One method on the first ``n`` held-out cases of ``family`` (no noop ratio; ``run_all`` adds it)."""
    rows = (evaluate_fn or evaluate)([Job(method, i, n, settings, seed, family) for i in range(n)], model)
    return summarize(method, rows, family=family)


def run_all(names: list[str], n: int, model: str, settings: dict[str, dict],
            evaluate_fn: Evaluate | None = None, seed: int = tw.HELDOUT_SEED,
            families: Sequence[str] = ("move",)) -> list[dict]:
    """noop and every method of ``names`` on the same ``n`` cases of each family, in one map; one row per
    (family, method), noop first in each family, each with its MD / noop from that family's noop."""
    names = ["noop"] + [m for m in names if m != "noop"]
    jobs = [Job(m, i, n, settings.get(m, {}), seed, f) for f in families for m in names for i in range(n)]
    rows = (evaluate_fn or evaluate)(jobs, model)
    out = []
    for j, family in enumerate(families):
        block = rows[j * len(names) * n:(j + 1) * len(names) * n]
        by_method = {m: block[k * n:(k + 1) * n] for k, m in enumerate(names)}
        noop_md = float(np.mean([r["md"] for r in by_method["noop"]]))
        out += [summarize(m, by_method[m], noop_md, family) | {"settings": settings.get(m, {})} for m in names]
    return out


def _label(r: dict) -> str:
    return r["method"] + (" (" + ", ".join(f"{k}={v}" for k, v in r["settings"].items()) + ")" if r.get("settings") else "")


def markdown(runs: list[dict], model: str, n: int, split: str = "bench") -> str:
    """One table per family: move's as it always was, the deforming families' led by IoU and success."""
    scenes = "held-out scenes" if split == "bench" else "TUNING scenes (not the benchmark's)"
    parts = []
    for family in dict.fromkeys(r.get("family", "move") for r in runs):
        rows = [r for r in runs if r.get("family", "move") == family]
        if family == "move":
            lines = [f"### toy drag benchmark — model {model}, {n} {scenes}\n",
                     "| method | MD px | MD / noop | success (≤3 px) | bg PSNR dB | kept colour+class | lost | s/edit | UNet calls |",
                     "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {_label(r)} | {r['md']:.2f} | {r['md_vs_noop']:.2f} | {r['success_rate']:.0%} | "
                             f"{r['bg_psnr']:.1f} | {r['kept_rate']:.0%} | {r['lost']} | {r['wall_s']:.2f} | "
                             f"{r['unet_calls']:.0f} |")
            refused = [f"{r['method']} {r['refused']}" for r in rows if r.get("refused")]
            if refused:
                lines.append(f"\nrefused (scored as the input, failed): {', '.join(refused)}")
        else:
            lines = [f"### toy drag benchmark, {family} — model {model}, {n} {scenes}\n",
                     "| method | success (IoU ≥ 0.7) | IoU | handle MD px | MD / noop | bg PSNR dB | kept colour+class | "
                     "lost | refused | vacated err | s/edit | UNet calls |",
                     "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {_label(r)} | {r['success_rate']:.0%} | {r['iou']:.2f} | {r['handle_md']:.2f} | "
                             f"{r['md_vs_noop']:.2f} | {r['bg_psnr']:.1f} | {r['kept_rate']:.0%} | {r['lost']} | "
                             f"{r['refused']} | {r.get('vacated_err', float('nan')):.1f} | {r['wall_s']:.2f} | "
                             f"{r['unet_calls']:.0f} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _known(name: str) -> bool:
    try:
        table_for(name)
    except EditError:
        return False
    return True


def _families(items: list[str] | None, p: argparse.ArgumentParser) -> list[str]:
    """--family values (repeatable, comma-separated, or all) in FAMILIES' order; move when none is given."""
    asked = [f.strip() for item in items or ["move"] for f in item.split(",") if f.strip()]
    unknown = [f for f in asked if f not in (*FAMILIES, "all")]
    if unknown:
        p.error(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)} (or all)")
    return [f for f in FAMILIES if f in asked or "all" in asked]


def _methods(args, p: argparse.ArgumentParser) -> list[str]:
    names: list[str] = []
    for item in [*(args.methods or []), *(args.method or [])]:
        for name in (s.strip() for s in item.split(",")):
            if name == "all":
                names += CHOICES
            elif name:
                names.append(name)
    names = list(dict.fromkeys(n for n in names if n != "noop")) or ["dragdiffusion"]
    unknown = [n for n in names if not _known(n)]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(CHOICES)} (or all)")
    return names


def main(argv: list[str] | None = None, evaluate_fn: Evaluate | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_drag", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods:\n" + "\n".join(f"  {k:16s} {m.about}" for k, m in METHODS.items()))
    p.add_argument("--method", action="append", metavar="NAME", help="a method to score (repeatable)")
    p.add_argument("--methods", action="append", metavar="A,B,C", help=f"comma-separated, or all: {','.join(CHOICES)}")
    p.add_argument("--family", action="append", metavar="FAMILY",
                   help=f"case family: {', '.join(FAMILIES)} or all (repeatable or comma-separated; default move)")
    p.add_argument("--n", type=int, default=50, help="cases per family")
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
    families = _families(args.family, p)
    try:
        settings = bm.parse_settings(args.set, names, {**METHODS, **{n: table_for(n)[n] for n in names}})
    except EditError as e:
        p.error(str(e))
    if args.ray and evaluate_fn is None:
        from bench.pool import connect

        try:
            evaluate_fn = pooled(connect(args.ray, args.model))
        except EditError as e:
            p.error(str(e))
    runs = run_all(names, args.n, args.model, settings, evaluate_fn, SPLITS[args.split], families)
    print("\n" + markdown(runs, args.model, args.n, args.split))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"runs": runs, "model": args.model, "n": args.n, "split": args.split, "noop_md": runs[0]["md"],
                  "methods": names, "settings": settings, "families": families}
        if len(names) == 1:  # the one-method summary earlier reports had at the top level
            report |= {k: runs[1][k] for k in ("method", "md", "md_vs_noop", "success_rate", "bg_psnr")}
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
