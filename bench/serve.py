"""Serving benchmark: throughput of the Ray Serve deployment with 1 vs 2 replicas, and what cache-affine
routing buys (the share of repeat edits that found their image's caches), all from one run.

    python -m bench.serve [--clients 8] [--edits 3] [--model tiny] [--json bench/results/serve_tiny.json]

Each of ``--clients`` concurrent clients (threads, like browser sessions) edits its own image ``--edits``
times in a row, waiting for each result (the first edit of an image is cold: identity LoRA + inversion; the
others can reuse them). Configurations, each on a fresh deployment or with cleared caches and new images:
1 replica (affinity on), 2 replicas (affinity on), 2 replicas (affinity off: no routing key, Serve's
power-of-two-choices spreads requests), and the last two again under light load (a quarter of the clients,
twice the pause, twice the edits). A repeat edit "hit" when its UNet calls show no lora/inversion phase. Clients pause (``--think-s``) before
each repeat: without a pause, a closed-loop client's finished edit frees a slot on its own replica, and Serve's
least-loaded choice sends its next edit back there, which hides what affinity does for real users.
On one machine's CPUs the replicas share cores, so the 2-replica speed-up here is a lower bound of what two
GPUs give; ``--paper`` adds the expected N-GPU throughput from measured per-edit GPU times.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "bench" / "results" / "perf_sd15_h100.json"
FAST = dict(lora_steps=3, n_inference_steps=10, max_steps=4)  # as the test suite: a tiny drag in ~1-2 s


def scene(seed: int, w: int = 96, h: int = 64) -> Image.Image:
    """A distinct synthetic photo per client: gradient background, a disk and a box at seeded places."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([xx / w * 200 + 30, yy / h * 150 + 50, (xx + yy) / (w + h) * 100 + 80], -1)
    cx, cy = rng.uniform(0.25, 0.45) * w, rng.uniform(0.35, 0.65) * h
    a[(xx - cx) ** 2 + (yy - cy) ** 2 < (min(w, h) * 0.18) ** 2] = rng.uniform(0, 255, 3)
    a += rng.normal(0, 3, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _requests(seed0: int, clients: int, edits: int):
    from editing.drag import DragRequest

    out = []
    for c in range(clients):
        img = scene(seed0 + c)
        out.append([DragRequest(img, (((30.0, 32.0), (40.0 + 3 * k, 30.0 + 2 * k)),), None, **FAST)
                    for k in range(edits)])
    return out


def run_clients(editor, per_client: list[list], think_s: float) -> dict:
    """Every client in its own thread, its edits in order, a seeded pause of up to ``think_s`` before each
    repeat (a user looks at the result first); wall time, latencies, hits, replicas used."""
    records, lock = [], threading.Lock()

    def client(c, reqs):
        rng = np.random.RandomState(c)
        last = None
        for k, req in enumerate(reqs):
            if k:
                time.sleep(rng.uniform(0, think_s))
            t0 = time.perf_counter()
            r = editor.edit(req)
            with lock:
                records.append({"repeat": k > 0, "s": time.perf_counter() - t0,
                                "hit": "lora" not in r.unet_calls and "inversion" not in r.unet_calls,
                                "replica": r.extra.get("served_by"), "same": r.extra.get("served_by") == last})
            last = r.extra.get("served_by")

    threads = [threading.Thread(target=client, args=(c, reqs)) for c, reqs in enumerate(per_client)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    repeats = [r for r in records if r["repeat"]]
    return {"edits": len(records), "wall_s": round(wall, 2), "edits_per_min": round(60 * len(records) / wall, 1),
            "mean_latency_s": round(float(np.mean([r["s"] for r in records])), 2),
            "repeat_hit_rate": round(sum(r["hit"] for r in repeats) / max(1, len(repeats)), 3),
            "repeat_same_replica_rate": round(sum(r["same"] for r in repeats) / max(1, len(repeats)), 3),
            "replicas_used": len({r["replica"] for r in records})}


def paper(perf: dict, gpus=(1, 2, 4, 8), repeats_per_image: int = 3) -> dict:
    """Expected edits/minute for N GPUs from measured per-edit GPU times (first and repeat DragDiffusion edit).

    With affinity every repeat edit pays ``repeat_s``; without it a repeat lands on the replica holding the
    image with probability 1/N and otherwise pays ``first_s``. Edits of different images are independent, so
    throughput is N × 60 / mean seconds per edit (the routing overhead, milliseconds, is left out).
    """
    run = next(r for r in perf["runs"] if r["mode"] == "dragdiffusion")
    first, repeat, k = run["first_s"], run["repeat_s"], repeats_per_image
    rows = []
    for n in gpus:
        on = (first + k * repeat) / (k + 1)
        off = (first + k * (repeat / n + first * (1 - 1 / n))) / (k + 1)
        rows.append({"gpus": n, "affinity_on_edits_per_min": round(n * 60 / on, 1),
                     "affinity_off_edits_per_min": round(n * 60 / off, 1)})
    return {"source": str(PERF.relative_to(ROOT)), "device": perf.get("device"), "first_s": first,
            "repeat_s": repeat, "repeats_per_image": k, "rows": rows}


def bench(model: str, clients: int, edits: int, max_ongoing: int, think_s: float) -> dict:
    from editing.serve import cluster
    from editing.serve.client import RemoteEditor

    cpus = os.cpu_count() or 2
    cluster.connect(None, num_cpus=cpus)
    results = {}
    try:
        light = max(1, clients // 4)  # light load: replicas often idle when a request arrives
        plan = (("1 replica", 1, True, 100, clients, edits, think_s),
                ("2 replicas", 2, True, 200, clients, edits, think_s),
                ("2 replicas, affinity off", 2, False, 300, clients, edits, think_s),
                ("2 replicas, light load", 2, True, 400, light, 2 * edits, 2 * think_s),
                ("2 replicas, light load, affinity off", 2, False, 500, light, 2 * edits, 2 * think_s))
        for name, replicas, affinity, seed0, n_clients, n_edits, think in plan:
            app = f"bench-{replicas}"
            if replicas not in {v["replicas"] for v in results.values()}:
                t0 = time.perf_counter()
                cluster.deploy(model, replicas=replicas, cpus_per_replica=min(1.0, cpus / replicas), threads=1,
                               app=app, max_ongoing=max_ongoing)
                log.info("%s: deployed in %.1f s", name, time.perf_counter() - t0)
            editor = RemoteEditor(None, app=app, affinity=affinity)
            editor.clear_caches()
            row = run_clients(editor, _requests(seed0, n_clients, n_edits), think)
            results[name] = {"replicas": replicas, "affinity": affinity, "clients": n_clients, "think_s": think, **row}
            log.info("%s: %s", name, row)
            if replicas == 1:  # free its CPUs for the 2-replica runs
                cluster.remove(app)
    finally:
        cluster.shutdown()
    one, two, off = results["1 replica"], results["2 replicas"], results["2 replicas, affinity off"]
    lon, loff = results["2 replicas, light load"], results["2 replicas, light load, affinity off"]
    ratios = {"throughput_2_vs_1_replicas": round(two["edits_per_min"] / one["edits_per_min"], 2),
              "hit_rate_affinity_on": two["repeat_hit_rate"], "hit_rate_affinity_off": off["repeat_hit_rate"],
              "throughput_affinity_on_vs_off": round(two["edits_per_min"] / off["edits_per_min"], 2),
              "light_hit_rate_affinity_on": lon["repeat_hit_rate"],
              "light_hit_rate_affinity_off": loff["repeat_hit_rate"]}
    return {"model": model, "clients": clients, "edits_per_client": edits, "think_s": think_s, "max_ongoing": max_ongoing,
            "cpus": cpus, "python": platform.python_version(), "configs": results, "ratios": ratios}


def table(report: dict) -> str:
    lines = []
    if "configs" in report:
        lines.append(f"{'configuration':<38} {'clients':>7} {'edits/min':>9} {'mean s':>7} {'repeat hits':>11} "
                     f"{'same replica':>12}")
        for name, r in report["configs"].items():
            lines.append(f"{name:<38} {r['clients']:>7} {r['edits_per_min']:>9.1f} {r['mean_latency_s']:>7.2f} "
                         f"{r['repeat_hit_rate']:>11.0%} {r['repeat_same_replica_rate']:>12.0%}")
        q = report["ratios"]
        lines.append(f"2 vs 1 replicas: ×{q['throughput_2_vs_1_replicas']}; affinity on vs off: hit rate "
                     f"{q['hit_rate_affinity_on']:.0%} vs {q['hit_rate_affinity_off']:.0%} (light load "
                     f"{q['light_hit_rate_affinity_on']:.0%} vs {q['light_hit_rate_affinity_off']:.0%}), throughput "
                     f"×{q['throughput_affinity_on_vs_off']}")
    if "paper" in report:
        p = report["paper"]
        lines.append(f"on paper ({p['device']}: first {p['first_s']} s, repeat {p['repeat_s']} s, "
                     f"{p['repeats_per_image']} repeats per image):")
        lines += [f"  {r['gpus']} GPU{'s' * (r['gpus'] > 1)}: {r['affinity_on_edits_per_min']} edits/min with "
                  f"affinity, {r['affinity_off_edits_per_min']} without" for r in p["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--edits", type=int, default=3, help="edits per client, of its one image (default: 3)")
    p.add_argument("--think-s", type=float, default=2.0,
                   help="a client pauses up to this long (seeded) before each repeat edit (default: 2)")
    p.add_argument("--max-ongoing", type=int, default=4, help="as python -m editing.serve (default: 4)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--paper-only", action="store_true", help="only the on-paper N-GPU table (no Ray needed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {} if args.paper_only else bench(args.model, args.clients, args.edits, args.max_ongoing, args.think_s)
    if PERF.exists():
        report["paper"] = paper(json.loads(PERF.read_text()))
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
