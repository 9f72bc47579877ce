"""Shapes drag benchmark: does a drag really move the shape to the target, and does the rest survive?

    python -m bench.toy_drag --method dragdiffusion|diffeditor|dragondiffusion|move --n 50 [--model toy] [--json OUT.json]

Held-out toy scenes (``models/toy_world.py``) with one or two shapes; the handle is a shape's
centroid, the target 6–20 px away, the mask covers the shape's start and end (dilated by 3 px).
Metrics per method:
- MD: pixels between the dragged shape's new centroid (largest blob of its colour, found by the
  generator's own colour segmentation) and the target; a lost shape counts the handle→target distance.
- success: MD ≤ 3 px.     - bg PSNR: input vs output outside the mask.
- kept: the blob still has the shape's colour and class (IoU ≥ 0.5 with the shape re-rendered there).
- wall time and UNet calls per edit.
The ``noop`` baseline (returns the input) always runs in the same table.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from editing.requests import DragRequest
from models import toy_world as tw
from models.toy_world import Case, make_cases  # noqa: F401 - re-exported: bench.toy_drag.make_cases

log = logging.getLogger(__name__)
SUCCESS_PX = 3.0


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


# ---- methods: name -> fn(editor, case, settings) -> (image, unet_calls) -------------------------
def _noop(editor, case: Case, settings: dict):
    return case.scene.image, 0


def _dragdiffusion(editor, case: Case, settings: dict):
    req = DragRequest(case.scene.image, ((case.handle, case.target),), case.mask, prompt=case.scene.caption, **settings)
    r = editor.drag(req)
    return r.image, sum(r.unet_calls.values())


def _guided(method: str):
    def fn(editor, case: Case, settings: dict):
        from editing.requests import GuidedDragRequest

        req = GuidedDragRequest(image=case.scene.image, points=((case.handle, case.target),), mask=case.mask,
                                prompt=case.scene.caption, method=method, **settings)
        r = editor.edit(req)
        return r.image, sum(r.unet_calls.values())

    return fn


def _move(editor, case: Case, settings: dict):
    """The Move tool with the shape's own mask (what a user would paint) and the handle→target offset."""
    from editing.requests import MoveRequest

    offset = (case.target[0] - case.handle[0], case.target[1] - case.handle[1])
    req = MoveRequest(image=case.scene.image, mask=case.shape.mask, offset=offset, prompt=case.scene.caption, **settings)
    r = editor.edit(req)
    return r.image, sum(r.unet_calls.values())


METHODS: dict[str, Callable] = {"noop": _noop, "dragdiffusion": _dragdiffusion, "diffeditor": _guided("diffeditor"),
                                "dragondiffusion": _guided("dragondiffusion"), "move": _move}


def run(method: str, n: int, model: str, settings: dict) -> dict:
    from editing.engine import Editor

    editor = None if method == "noop" else Editor(model)
    cases = make_cases(n)
    rows = []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        img, calls = METHODS[method](editor, case, settings)
        m = measure(case, img) | {"wall_s": time.perf_counter() - t0, "unet_calls": calls, "seed": case.scene.seed}
        rows.append(m)
        log.info("%s %d/%d: md %.1f px (start %.1f), bg %.1f dB%s", method, i + 1, n, m["md"],
                 math.dist(case.handle, case.target), m["bg_psnr"], " LOST" if m["lost"] else "")
    finite = [r["bg_psnr"] for r in rows if r["bg_psnr"] < 99]
    return {
        "method": method, "n": len(rows), "md": float(np.mean([r["md"] for r in rows])),
        "success_rate": float(np.mean([r["success"] for r in rows])),
        "bg_psnr": float(np.mean(finite)) if finite else float("inf"),
        "kept_rate": float(np.mean([r["kept"] for r in rows])), "lost": int(sum(r["lost"] for r in rows)),
        "wall_s": float(np.mean([r["wall_s"] for r in rows])), "unet_calls": float(np.mean([r["unet_calls"] for r in rows])),
        "cases": rows,
    }


def _settings(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        k, _, v = p.partition("=")
        out[k.strip()] = float(v) if any(c in v for c in ".e") else int(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.toy_drag", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="dragdiffusion", choices=[m for m in METHODS if m != "noop"])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="DragRequest override")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    settings = _settings(args.set)
    noop = run("noop", args.n, args.model, settings)
    res = run(args.method, args.n, args.model, settings)
    res["noop_md"] = noop["md"]
    res["md_vs_noop"] = res["md"] / noop["md"] if noop["md"] else float("nan")
    res["settings"] = settings
    print(f"\n### toy drag benchmark — model {args.model}, {args.n} held-out scenes\n")
    print("| method | MD px | MD / noop | success (≤3 px) | bg PSNR dB | kept colour+class | lost | s/edit | UNet calls |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in (noop, res):
        ratio = r["md"] / noop["md"] if noop["md"] else float("nan")
        print(f"| {r['method']} | {r['md']:.2f} | {ratio:.2f} | {r['success_rate']:.0%} | {r['bg_psnr']:.1f} | "
              f"{r['kept_rate']:.0%} | {r['lost']} | {r['wall_s']:.2f} | {r['unet_calls']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": [noop, res], "model": args.model, "settings": settings,
                                         **{k: res[k] for k in ("method", "n", "md", "noop_md", "success_rate", "bg_psnr")}},
                                        indent=1))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
