"""One-click masks benchmark: does a click on a shape give that shape's mask, and how fast?

    python -m bench.click_masks --n 200 [--size 512] [--split bench|tune] [--segmenter classical|auto|SPEC] \\
        [--json OUT.json]

Held-out toy scenes (``models/toy_world.py``, seeds from ``HELDOUT_SEED``; ``--split tune`` draws the tuning
scenes from ``TUNE_SEED``, where settings are chosen) upscaled from 64² to ``--size`` (bilinear for the picture,
so the anti-aliased edges widen as in a real photo; nearest for the true masks). For every shape, one ``add``
click on its centroid (a ring's centroid is its hole: the segmenter must select the ring around it and leave the
hole out). Metrics per shape kind and over all shapes:

- hit: share of shapes whose mask has IoU ≥ 0.9 with the true mask at the picture's size (``upscale``; target
  ≥ 95 % with the classical segmenter), and the same against the 64² mask upscaled by nearest (``hit_64``);
- mean IoU; errors: clicks answered with an ``EditError`` (counted as IoU 0);
- seconds per click (``mask_from_clicks`` wall time, the picture already decoded), mean and 95th percentile.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from editing.segment import Click, load_segmenter, mask_from_clicks
from models import toy_world as tw
from models.errors import EditError

log = logging.getLogger(__name__)
IOU_HIT = 0.9
SPLITS = {"bench": tw.HELDOUT_SEED, "tune": tw.TUNE_SEED}


def upscale(scene: tw.Scene, size: int) -> tuple[Image.Image, list[np.ndarray], list[np.ndarray], float]:
    """The scene's picture at ``size``² (bilinear), each shape's true mask at that size, the same masks at 64²
    upscaled by nearest (the pixel-quantised truth), and the scale.

    The true mask at ``size`` is the renderer's own anti-aliased coverage, upscaled like the picture, ≥ 1/2: the
    picture is ``background·(1-c) + colour·c`` and bilinear upscaling is linear, so this is the mask rendering
    at ``size``² would have given. The nearest-upscaled 64² mask differs from it by up to half a source pixel
    along the edge (4 px at 512²), which alone keeps a small ring below IoU 0.9."""
    s = size / tw.SIZE
    image = scene.image.resize((size, size), Image.BILINEAR)
    fine, coarse = [], []
    for sh in scene.shapes:
        cov = tw._coverage(sh.kind, sh.center[0], sh.center[1], sh.radius).astype(np.float32)
        fine.append(np.asarray(Image.fromarray(cov, "F").resize((size, size), Image.BILINEAR)) >= 0.5)
        coarse.append(np.asarray(Image.fromarray(sh.mask).resize((size, size), Image.NEAREST)))
    return image, fine, coarse, s


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def evaluate(n: int, size: int, segmenter, seed: int = tw.HELDOUT_SEED) -> list[dict]:
    """One row per shape of the ``n`` scenes from ``seed``: kind, size, IoU, error, seconds."""
    rows = []
    for k in range(n):
        scene = tw.make_scene(seed + k)
        image, masks, coarse, s = upscale(scene, size)
        for shape, truth, truth64 in zip(scene.shapes, masks, coarse):
            if not truth.any():
                continue
            x, y = shape.centroid[0] * s, shape.centroid[1] * s
            t0 = time.perf_counter()
            try:
                got, err = mask_from_clicks(image, [Click(x, y)], segmenter).mask, None
            except EditError as e:
                got, err = np.zeros_like(truth), str(e)
            dt = time.perf_counter() - t0
            rows.append({"seed": seed + k, "kind": shape.kind, "size": shape.size, "colour": shape.colour,
                         "background": scene.background.colour, "iou": iou(got, truth),
                         "iou_64": iou(got, truth64), "error": err, "seconds": dt})
    return rows


def summarize(rows: list[dict]) -> dict:
    """hit share, mean IoU, errors, seconds per click (mean, p95) of some rows."""
    ious = np.array([r["iou"] for r in rows])
    ious64 = np.array([r["iou_64"] for r in rows])
    secs = np.array([r["seconds"] for r in rows])
    return {"shapes": len(rows), "hit": float((ious >= IOU_HIT).mean()), "mean_iou": float(ious.mean()),
            "hit_64": float((ious64 >= IOU_HIT).mean()),
            "errors": sum(r["error"] is not None for r in rows), "s_per_click": float(secs.mean()),
            "s_p95": float(np.percentile(secs, 95))}


def markdown(summary: dict, by_kind: dict, segmenter: str, n: int, size: int, split: str) -> str:
    lines = [f"Click masks: {segmenter} segmenter, {n} {split} scenes at {size}², one click on each shape's centroid",
             "", f"| shapes | n | IoU ≥ {IOU_HIT} | mean IoU | IoU ≥ {IOU_HIT} vs 64² mask | errors | s / click | p95 s |", "|---|---|---|---|---|---|---|---|"]
    for name, s in [*by_kind.items(), ("all", summary)]:
        lines.append(f"| {name} | {s['shapes']} | {s['hit']:.1%} | {s['mean_iou']:.3f} | {s['hit_64']:.1%} | {s['errors']} | "
                     f"{s['s_per_click']:.4f} | {s['s_p95']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.click_masks", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="number of scenes (default 200)")
    p.add_argument("--size", type=int, default=512, help="picture side in px the 64² scenes are upscaled to")
    p.add_argument("--split", choices=list(SPLITS), default="bench", help="held-out scenes, or the tuning ones")
    p.add_argument("--segmenter", default="classical", help="classical | auto | SAM Hub id or folder")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.n < 1 or args.size < 16:
        p.error("--n must be at least 1 and --size at least 16")
    try:
        segmenter = load_segmenter(args.segmenter)
    except EditError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    mask_from_clicks(*_warmup(args.size), segmenter)  # lazy imports and first-call costs, outside the timings
    rows = evaluate(args.n, args.size, segmenter, SPLITS[args.split])
    summary = summarize(rows)
    by_kind = {k: summarize([r for r in rows if r["kind"] == k]) for k in tw.KINDS if any(r["kind"] == k for r in rows)}
    print("\n" + markdown(summary, by_kind, segmenter.name, args.n, args.size, args.split))
    misses = [r for r in rows if r["iou"] < IOU_HIT]
    for r in misses[:10]:
        log.warning("miss: seed %d %s %s %s on %s: IoU %.3f %s", r["seed"], r["size"], r["colour"], r["kind"],
                    r["background"], r["iou"], r["error"] or "")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"segmenter": segmenter.name, "n": args.n, "size": args.size,
                                         "split": args.split, "summary": summary, "by_kind": by_kind,
                                         "misses": misses}, indent=1))
    return 0


def _warmup(size: int) -> tuple[Image.Image, list[Click]]:
    """A tuning scene and a click on its first shape (not a benchmark scene)."""
    scene = tw.make_scene(tw.TUNE_SEED - 1)
    image, _, _, s = upscale(scene, size)
    c = scene.shapes[0].centroid
    return image, [Click(c[0] * s, c[1] * s)]


if __name__ == "__main__":
    raise SystemExit(main())
