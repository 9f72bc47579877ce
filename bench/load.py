"""How many people one server holds: the app under concurrent clients, and whether one user's settings leak.

    python -m bench.load --model toy --users 8 --requests 4 --json bench/results/load_toy_8.json
    python -m bench.load --model tiny --users 4 --requests 2
    python -m bench.load --model tiny --users 4 --requests 2 --backend ray --replicas 2    # where Ray is installed

Starts ``app.py`` on a free port (a subprocess, as a real server), with a LoRA library holding one random LoRA.
The mix is four requests: an Instant drag, a generation, the same generation (prompt and seed) with the library
LoRA, and a sketch. First one client runs ``--requests`` of them one at a time (after one warm-up of each: model
load and caches); then ``--users`` clients each run ``--requests`` of them at once, each user starting at another
point of the mix, so a LoRA request always runs beside requests without it. Every result's pixels are compared
with the same request run alone (same seed; deterministic on the CPU): a difference is a *leak* (a LoRA or setting
of one user reaching another's result). One JSON row: users, requests, errors, leaks, alone_p50_s, p50_s, p95_s,
max_wait_s (the longest a request took under load, queue included), throughput_ratio (requests per second under
load / alone).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("bench.load")
ROOT = Path(__file__).resolve().parents[1]
LORA = "bench-style"
KINDS = ("instant_drag", "generate", "generate_lora", "sketch")


# ---- inputs ---------------------------------------------------------------------------------------------------
def picture(path: Path, size: int = 64) -> str:
    """A coloured-shape scene (the toy model's world): grey ground, a red disc, a blue square."""
    im = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(im)
    d.ellipse((10, 22, 30, 42), fill=(210, 40, 40))
    d.rectangle((40, 12, 56, 28), fill=(40, 70, 200))
    im.save(path)
    return str(path)


def strokes(path: Path, size: int = 64) -> str:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.line((8, 50, 56, 50), fill=(40, 160, 60), width=6)
    d.ellipse((20, 14, 40, 34), outline=(220, 40, 40), width=5)
    im.save(path)
    return str(path)


def library_lora(model: str, folder: Path) -> None:
    """A random LoRA for ``model``'s UNet in the library folder (the diffusers LoRA format the library reads)."""
    import torch
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from editing.engine import Editor

    unet = Editor(model).load().unet
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="bench")
    for n, p in unet.named_parameters():
        if "lora_B.bench." in n:
            p.data.normal_(0, 0.3)  # a LoRA that visibly changes the result
    sd = {k: v.clone() for k, v in get_peft_model_state_dict(unet, adapter_name="bench").items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(sd),
                                                     weight_name=f"{LORA}.safetensors")


def call(client, kind: str, files: dict, seed: int) -> dict:
    """One request of the mix -> the result PNG (a file value: its URL on the server; nothing else is fetched)."""
    from gradio_client import handle_file

    if kind == "instant_drag":
        out = client.predict(handle_file(files["picture"]), None, "[[20, 32], [30, 36]]", "", method="Instant",
                             n_inference_steps=10, seed=seed, api_name="/drag")
        return out[1]
    if kind == "sketch":
        out = client.predict(handle_file(files["strokes"]), None, "a red ring above green grass", "", "",
                             n_inference_steps=6, seed=seed, api_name="/sketch")
        return out[1]
    loras = [LORA] if kind == "generate_lora" else []
    out = client.predict("a red disc and a blue square", "", "[]", None, n_inference_steps=6, seed=seed, loras=loras,
                         api_name="/text_to_image")
    return out[1]


def pixels_hash(file: dict) -> str:
    """The result's pixels (not its PNG bytes: the recipe inside holds timings), fetched from the server."""
    import io

    import httpx

    data = httpx.get(file["url"], timeout=60).content
    return hashlib.sha256(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()).hexdigest()[:16]


# ---- the server ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``app.py`` (and, for ``--backend ray``, ``python -m editing.serve`` first) as subprocesses."""

    def __init__(self, model: str, work: Path, users: int, backend: str, replicas: int):
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = os.environ | {"DRAGCANVAS_LORA_DIR": str(work / "loras"), "HF_HUB_OFFLINE": "1",
                                 "GRADIO_ANALYTICS_ENABLED": "False"}
        self.app_args = [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--outputs",
                         str(work / "outputs"), "--max-queue", str(max(16, 2 * users)), "--time-budget", "0"]
        if backend == "ray":
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "editing.serve", "--model", model, "--replicas", str(replicas),
                 "--gpus-per-replica", "0", "--cpus-per-replica", "1", "--threads", "1"],
                cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.app_args += ["--backend", "ray"]
        else:
            self.app_args += ["--model", model]
        self.log = open(work / "server.log", "w")  # closed in stop()

    def start(self, timeout: float = 600) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            app = subprocess.Popen(self.app_args, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
            while app.poll() is None and time.monotonic() - t0 < timeout:
                if _answers(self.url):
                    self.procs.append(app)
                    return
                time.sleep(0.5)
            if app.poll() is None:
                app.kill()
            time.sleep(2)  # a Ray deployment still starting: the app refused to start; try again
        raise SystemExit(f"the app did not start within {timeout:.0f} s (see the server log)")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        self.log.close()


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}config", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ---- the benchmark ---------------------------------------------------------------------------------------------
def plan(user: int, requests: int) -> list[tuple[str, int]]:
    """(kind, seed) of one user's requests: the mix from another starting point per user; one seed per kind, so
    every request has its alone twin."""
    return [(KINDS[(user + i) % len(KINDS)], 100 + (user + i) % len(KINDS)) for i in range(requests)]


def run_user(url: str, todo, files, out: list, errors: list, start: threading.Barrier | None) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)  # only the result PNG is fetched (pixels_hash)
    if start is not None:
        start.wait()
    for kind, seed in todo:
        t0 = time.perf_counter()
        try:
            file = call(client, kind, files, seed)
            out.append((kind, seed, time.perf_counter() - t0, pixels_hash(file)))
        except Exception as e:  # one failed request is counted, the benchmark goes on
            log.warning("%s (seed %d) failed", kind, seed, exc_info=True)
            errors.append(f"{kind}: {e}")


def bench(model: str, users: int, requests: int, backend: str = "local", replicas: int = 2) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    (work / "loras").mkdir()
    library_lora(model, work / "loras")
    files = {"picture": picture(work / "picture.png"), "strokes": strokes(work / "strokes.png")}
    server = Server(model, work, users, backend, replicas)
    try:
        server.start()
        warm, warm_errors = [], []
        run_user(server.url, [(k, 100 + i) for i, k in enumerate(KINDS)], files, warm, warm_errors, None)
        alone, alone_errors = [], []
        todo_alone = [(k, 100 + i) for j in range(requests) for i, k in enumerate(KINDS)][:max(requests, len(KINDS))]
        t0 = time.perf_counter()
        run_user(server.url, todo_alone, files, alone, alone_errors, None)
        alone_s = time.perf_counter() - t0
        reference = {(k, s): h for k, s, _, h in warm + alone}
        unstable = sum(reference[(k, s)] != h for k, s, _, h in alone)  # the same request alone, twice
        loaded, errors = [], []
        barrier = threading.Barrier(users)
        threads = [threading.Thread(target=run_user, args=(server.url, plan(u, requests), files, loaded, errors,
                                                            barrier)) for u in range(users)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_s = time.perf_counter() - t0
    finally:
        server.stop()
    leaks = [f"{k} seed {s}" for k, s, _, h in loaded if reference.get((k, s)) != h]
    waits = sorted(w for _, _, w, _ in loaded) or [float("nan")]
    alone_waits = sorted(w for _, _, w, _ in alone) or [float("nan")]
    alone_rate = len(alone) / alone_s if alone_s else float("nan")
    load_rate = len(loaded) / load_s if load_s else float("nan")
    per_kind = {k: round(statistics.median([w for kk, _, w, _ in alone if kk == k] or [float("nan")]), 3)
                for k in KINDS}
    return {"model": model, "backend": backend if backend == "local" else f"{backend} x{replicas}", "users": users,
            "requests": users * requests, "errors": len(errors) + len(alone_errors) + len(warm_errors),
            "leaks": len(leaks), "alone_unstable": unstable,
            "alone_p50_s": round(statistics.median(alone_waits), 3),
            "p50_s": round(statistics.median(waits), 3), "p95_s": round(_percentile(waits, 0.95), 3),
            "max_wait_s": round(waits[-1], 3), "throughput_ratio": round(load_rate / alone_rate, 3),
            "fair_bound_s": round(1.3 * users * statistics.median(alone_waits), 3), "alone_p50_by_kind_s": per_kind,
            "leaked": leaks[:10], "error_messages": errors[:5], "cpus": os.cpu_count(),
            "python": platform.python_version()}


def _percentile(sorted_values: list[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def table(rows: list[dict]) -> str:
    head = "| model | backend | users | requests | errors | leaks | alone p50 s | p50 s | p95 s | max wait s | 1.3×users×alone p50 | throughput ratio |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['backend']} | {r['users']} | {r['requests']} | {r['errors']} | {r['leaks']} | "
                     f"{r['alone_p50_s']} | {r['p50_s']} | {r['p95_s']} | {r['max_wait_s']} | {r['fair_bound_s']} | "
                     f"{r['throughput_ratio']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy", choices=("toy", "tiny"), help="the app's model (default: toy)")
    p.add_argument("--users", type=int, default=4, help="concurrent clients (default: 4)")
    p.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    p.add_argument("--backend", default="local", choices=("local", "ray"),
                   help="the engine in the app's process (default) or on a Ray Serve deployment")
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas with --backend ray (default: 2)")
    p.add_argument("--json", help="write the row here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
            raise SystemExit("--backend ray needs Ray Serve: pip install -r requirements-ray.txt")
    row = bench(args.model, args.users, args.requests, args.backend, args.replicas)
    print(table([row]))
    print(json.dumps(row))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")
    return 0 if row["errors"] == 0 and row["leaks"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
