"""Speed, memory and UNet-call (NFE) benchmark of drag edits.

    python -m bench.perf --config cpu-small [--json OUT.json] [--modes dragdiffusion,generated]
    python -m bench.perf --config sd15-full --json out/perf_sd15.json   # needs CUDA

One Editor per process: the model is loaded once (timed), a small warm-up edit absorbs one-time
costs (lazy imports, kernel selection), then every mode runs twice on the same synthetic image:
"first" with the Editor's per-image caches cleared, "repeat" with the same request again (the
cached posterior, identity LoRA and inversion are reused). Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from editing.drag import DragRequest
from editing.engine import Editor, EditResult

log = logging.getLogger(__name__)

# The phases of a drag in pipeline order ("other" = wall time the engine's phases do not cover).
DRAG_PHASES = ("lora", "encode", "inversion", "drag", "denoise", "decode")
GENERATE_PROMPT = "a small house under a sunny sky, photo"
DRAG_PROMPT = "a small house under a sunny sky"


# ---- configurations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    model: str  # a built-in model spec (models/loader.py)
    resolution: int  # working long side; the test image is this size, square
    device: str
    dtype: torch.dtype | None  # None = the loader's default for the device
    request: dict = field(default_factory=dict)  # DragRequest overrides; empty = the paper's defaults
    hidden: bool = False  # not offered on the command line's help (tests only)
    about: str = ""


CONFIGS: dict[str, Config] = {
    "cpu-small": Config("cpu-small", 256, "cpu", torch.float32,
                        about="SD-1.5 block layout with small widths, 256² on CPU, DragRequest defaults"),
    "sd15-full": Config("sd15-random", 512, "cuda", torch.float16,
                        about="full SD-1.5 UNet/VAE/CLIP (random weights), 512², fp16 on CUDA, DragRequest defaults"),
    # Never built in tests: the 2.6 B-parameter UNet alone is ~14 GB while it is built in fp32.
    "sdxl-full": Config("sdxl-random", 1024, "cuda", torch.float16,
                        about="full SDXL-base UNet/VAE/two CLIPs (random weights), 1024², fp16 on CUDA (fp32 VAE), "
                              "DragRequest defaults"),
    "tiny-test": Config("tiny", 64, "cpu", torch.float32, hidden=True,
                        request=dict(lora_steps=2, n_inference_steps=4, inversion_strength=0.5, max_steps=2),
                        about="tiny model, 64², a few steps: checks the benchmark itself (tests)"),
}


# ---- the test image ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    image: Image.Image
    mask: np.ndarray  # H×W bool, True = may change
    points: tuple  # ((handle, target), ...) in image pixels


def make_scene(size: int, seed: int = 0) -> Scene:
    """A deterministic photo-like image (sky, ground, sun, house, tree, grain), a mask and 2 drags."""
    w = h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / size
    sky = np.stack([90 + 80 * yy, 140 + 70 * yy, 235 - 30 * yy], -1)
    ground = np.stack([70 + 40 * xx, 120 + 30 * yy, 50 + 20 * xx], -1)
    a = np.where((yy > 0.62 + 0.04 * np.sin(xx * 9))[..., None], ground, sky)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    def s(*f):
        return [round(v * size) for v in f]
    d.ellipse(s(0.15, 0.10, 0.33, 0.28), fill=(250, 215, 70))  # sun
    d.rectangle(s(0.55, 0.45, 0.85, 0.70), fill=(190, 80, 60))  # house
    d.polygon([tuple(s(0.52, 0.46)), tuple(s(0.70, 0.30)), tuple(s(0.88, 0.46))], fill=(110, 50, 40))  # roof
    d.rectangle(s(0.66, 0.56, 0.73, 0.70), fill=(80, 50, 30))  # door
    d.rectangle(s(0.12, 0.50, 0.15, 0.72), fill=(90, 60, 35))  # trunk
    d.ellipse(s(0.05, 0.36, 0.22, 0.56), fill=(40, 120, 50))  # crown
    rng = np.random.default_rng(seed)
    pix = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (h, w, 3))  # sensor grain
    image = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8))
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in ((0.08, 0.05, 0.55, 0.40), (0.48, 0.20, 0.95, 0.75)):  # sun's path; house and roof
        mask[round(y0 * h): round(y1 * h), round(x0 * w): round(x1 * w)] = True
    def px(x, y):
        return (x * (size - 1), y * (size - 1))
    points = ((px(0.24, 0.19), px(0.42, 0.19)), (px(0.70, 0.31), px(0.70, 0.22)))
    return Scene(image, mask, points)


# ---- modes ----------------------------------------------------------------------------------------
@dataclass
class Edit:
    """What one run of a mode produced: the drag result and the results it needed first (a generation)."""

    result: EditResult
    before: dict[str, EditResult] = field(default_factory=dict)


Mode = Callable[[Editor, Scene, Config, dict], Edit]  # (editor, scene, config, state kept first -> repeat)


def _request(scene: Scene, cfg: Config, image: Image.Image | None = None, **overrides) -> DragRequest:
    params = {"prompt": DRAG_PROMPT, **cfg.request, **overrides}
    return DragRequest(scene.image if image is None else image, scene.points, scene.mask, **params)


def mode_dragdiffusion(editor: Editor, scene: Scene, cfg: Config, state: dict) -> Edit:
    """Real-image drag with DragRequest's defaults: identity LoRA, DDIM inversion, optimisation, denoise."""
    return Edit(editor.drag(_request(scene, cfg), progress=_phase_logger()))


def mode_dragdiffusion_nolora(editor: Editor, scene: Scene, cfg: Config, state: dict) -> Edit:
    """The same drag without the identity LoRA (lora_steps=0)."""
    return Edit(editor.drag(_request(scene, cfg, lora_steps=0), progress=_phase_logger()))


def mode_generated(editor: Editor, scene: Scene, cfg: Config, state: dict) -> Edit:
    """Generate an image (first run only), then drag it: its own trajectory replaces LoRA and inversion."""
    before = {}
    if "image" not in state:
        steps = _request(scene, cfg).n_inference_steps  # must match the drag's, or the engine inverts
        gen = editor.generate(GENERATE_PROMPT, seed=0, size=scene.image.size, n_inference_steps=steps,
                              progress=_phase_logger())
        state["image"], before["generate"] = gen.image, gen
    # Points and mask are fractions of the scene, so they fit the generated image of the same size.
    req = _request(scene, cfg, image=state["image"], prompt="")  # "" -> the generation's prompt and CFG
    return Edit(editor.drag(req, progress=_phase_logger()), before)


MODES: dict[str, Mode] = {
    "dragdiffusion": mode_dragdiffusion,
    "dragdiffusion-nolora": mode_dragdiffusion_nolora,
    "generated": mode_generated,
}


def _phase_logger(every_s: float = 30.0):
    """A progress callback that logs each phase as it starts, then at most every ``every_s`` (a heartbeat)."""
    last = {"phase": None, "t": 0.0}

    def report(phase: str, frac: float, msg: str):
        now = time.monotonic()
        if phase != last["phase"] or now - last["t"] > every_s:
            log.info("  %s %3.0f%% %s", phase, 100 * frac, msg)
            last.update(phase=phase, t=now)

    return report


# ---- measuring -----------------------------------------------------------------------------------
@dataclass
class Measured:
    edit: Edit
    wall_s: float
    rss_before_mb: float | None
    rss_after_mb: float | None
    peak_cuda_mb: float | None


def _rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def _max_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def measure(fn: Callable[[], Edit], device: str) -> Measured:
    """Run ``fn`` once: wall time, RSS before/after and (CUDA) peak allocated memory."""
    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()
    t0 = time.perf_counter()
    edit = fn()
    if _cuda(device):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if _cuda(device) else None
    return Measured(edit, wall, before, _rss_mb(), peak_cuda)


def clear_caches(editor: Editor) -> None:
    """Forget the per-image caches (posterior, LoRA, inversion, generations); the model stays loaded."""
    if hasattr(editor, "clear_caches"):
        editor.clear_caches()
        return
    for name in ("_latents", "_loras", "_inversions", "_generated"):
        getattr(editor, name).clear()


# ---- summarising (pure) --------------------------------------------------------------------------
def phases(m: Measured) -> dict[str, float]:
    """Seconds per phase of the drag, prefixed earlier results, and the uncovered rest as "other"."""
    out: dict[str, float] = {}
    for name, r in m.edit.before.items():
        out.update({k if k == name else f"{name}.{k}": v for k, v in r.timings.items()})
    if m.edit.result.recipe.get("task") == "dragdiffusion":
        out.update({p: 0.0 for p in DRAG_PHASES})  # a phase that did not run took 0 s (cached or skipped)
    out.update(m.edit.result.timings)
    out["other"] = max(0.0, m.wall_s - sum(out.values()))
    return {k: round(v, 4) for k, v in out.items()}


def nfe(m: Measured) -> dict[str, int]:
    """UNet calls (batch elements) per phase; LoRA and inversion are listed even when 0."""
    out: dict[str, int] = {}
    for name, r in m.edit.before.items():
        out.update({k if k == name else f"{name}.{k}": v for k, v in r.unet_calls.items()})
    out.update({"inversion": 0} | ({"lora": 0} if m.edit.result.recipe.get("task") == "dragdiffusion" else {}))
    out.update(m.edit.result.unet_calls)
    return out


def summarize(mode: str, first: Measured, repeat: Measured, max_rss_mb: float) -> dict:
    """One JSON row per mode (see README.md for every field)."""
    nfe_first, nfe_repeat = nfe(first), nfe(repeat)
    cuda = [m.peak_cuda_mb for m in (first, repeat) if m.peak_cuda_mb is not None]
    def rnd(v):
        return None if v is None else round(v, 1)
    return {
        "mode": mode,
        "first_s": round(first.wall_s, 3),
        "repeat_s": round(repeat.wall_s, 3),
        "repeat_ratio": round(repeat.wall_s / first.wall_s, 3) if first.wall_s > 0 else None,
        "unet_calls": sum(nfe_first.values()),
        "unet_calls_repeat": sum(nfe_repeat.values()),
        "phases_first": phases(first),
        "phases_repeat": phases(repeat),
        "nfe_first": nfe_first,
        "nfe_repeat": nfe_repeat,
        "steps_run": first.edit.result.recipe.get("steps_run"),
        "steps_run_repeat": repeat.edit.result.recipe.get("steps_run"),
        "arrived": first.edit.result.recipe.get("arrived"),
        "peak_mem_mb": rnd(max_rss_mb),
        "rss_before_mb": rnd(first.rss_before_mb),
        "rss_after_mb": rnd(repeat.rss_after_mb),
        "peak_cuda_mb": rnd(max(cuda)) if cuda else None,
        "peak_cuda_mb_first": rnd(first.peak_cuda_mb),
        "peak_cuda_mb_repeat": rnd(repeat.peak_cuda_mb),
    }


BASELINE = "diffeditor"  # the speed targets are ratios to DiffEditor's wall time in the same run


def ratios(runs: list[dict], baseline: str = BASELINE) -> dict[str, dict[str, float]] | None:
    """Each mode's first and repeat wall time / the baseline mode's (same run, same machine); None without it."""
    base = next((r for r in runs if r["mode"] == baseline), None)
    if base is None:
        return None
    def div(a, b):
        return round(a / b, 4) if b else None
    return {r["mode"]: {"first": div(r["first_s"], base["first_s"]), "repeat": div(r["repeat_s"], base["repeat_s"])}
            for r in runs}


def _columns(dicts) -> list[str]:
    """Phase names of all runs in pipeline order: earlier results (generation), the drag, the rest."""
    order = ("generate", "generate.decode", "lora", "encode", "inversion", "drag", "edit", "denoise", "decode", "other")
    names = dict.fromkeys(k for d in dicts for k in d)
    return sorted(names, key=lambda k: order.index(k) if k in order else len(order))


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    align = "|" + "|".join("---:" if i > 1 else "---" for i in range(len(header))) + "|"  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", align]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """Two tables, one row per mode and run: seconds per phase, then UNet calls per phase."""
    runs = report["runs"]
    time_cols = _columns(r[f"phases_{w}"] for r in runs for w in ("first", "repeat"))
    nfe_cols = _columns(r[f"nfe_{w}"] for r in runs for w in ("first", "repeat"))
    t_rows, n_rows = [], []
    for r in runs:
        for which in ("first", "repeat"):
            rep = which == "repeat"
            t_rows.append([r["mode"], which, r[f"{which}_s"], r["repeat_ratio"] if rep else None,
                           *(r[f"phases_{which}"].get(c, 0.0) for c in time_cols),
                           r["steps_run_repeat" if rep else "steps_run"],
                           r["peak_mem_mb"], r[f"peak_cuda_mb_{which}"]])
            calls = r[f"nfe_{which}"]
            n_rows.append([r["mode"], which, *(calls.get(c, 0) for c in nfe_cols),
                           r["unet_calls_repeat" if rep else "unet_calls"]])
    head = (f"### {report['config']} — {report['model']} at {report['resolution']}², {report['dtype']} on "
            f"{report['device']}, torch {report['torch']}\n\n"
            f"model load {report['model_load_s']:.1f} s, warm-up edit {report['warmup_s']:.1f} s\n")
    times = _table(["mode", "run", "wall s", "×first", *(f"{c} s" for c in time_cols), "drag steps",
                    "peak RSS MB", "peak CUDA MB"], t_rows)
    calls = _table(["mode", "run", *(f"{c} NFE" for c in nfe_cols), "total NFE"], n_rows)
    out = f"{head}\n{times}\n\n{calls}\n"
    if report.get("ratios"):
        base = report["ratios_to"]
        def g(v):
            return "–" if v is None else f"{v:.3g}"
        rows = [[m, g(v["first"]), g(v["repeat"])] for m, v in report["ratios"].items()]
        out += f"\n{_table(['mode', f'first wall / {base}', f'repeat wall / {base}'], rows)}\n"
    return out


# ---- driver -------------------------------------------------------------------------------------
def _device_name(device: str) -> str:
    if _cuda(device):
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _warm_up(editor: Editor, scene: Scene) -> float:
    """One very short edit (1 LoRA step, 1 inversion step, 1 drag step) so "first" excludes one-time costs."""
    t0 = time.perf_counter()
    editor.drag(DragRequest(scene.image, scene.points, scene.mask, prompt=DRAG_PROMPT, lora_steps=1,
                            n_inference_steps=2, inversion_strength=0.5, max_steps=1))
    clear_caches(editor)
    return time.perf_counter() - t0


def run(config: str, modes: list[str], lora_checkpointing: bool = False) -> dict:
    """Load the model once, warm up, run each mode first + repeat; return the JSON report."""
    cfg = CONFIGS[config]
    scene = make_scene(cfg.resolution)
    editor = Editor(cfg.model, device=cfg.device, dtype=cfg.dtype, resolution=cfg.resolution,
                    lora_checkpointing=lora_checkpointing)
    log.info("loading %s on %s", cfg.model, cfg.device)
    t0 = time.perf_counter()
    bundle = editor.load()
    load_s = time.perf_counter() - t0
    log.info("model loaded in %.1f s; warming up", load_s)
    warm_s = _warm_up(editor, scene)
    runs = []
    for name in modes:
        log.info("mode %s: first (caches cleared)", name)
        clear_caches(editor)
        state: dict = {}
        first = measure(lambda name=name, state=state: MODES[name](editor, scene, cfg, state), cfg.device)
        log.info("mode %s: first %.1f s; repeat", name, first.wall_s)
        repeat = measure(lambda name=name, state=state: MODES[name](editor, scene, cfg, state), cfg.device)
        log.info("mode %s: repeat %.1f s", name, repeat.wall_s)
        runs.append(summarize(name, first, repeat, _max_rss_mb()))
    return {
        "config": config,
        "model": cfg.model,
        "resolution": cfg.resolution,
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "device": _device_name(cfg.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "request": _request(scene, cfg).params(),
        "lora_checkpointing": lora_checkpointing,
        "model_load_s": round(load_s, 3),
        "warmup_s": round(warm_s, 3),
        "runs": runs,
        "ratios_to": BASELINE,
        "ratios": ratios(runs),
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    public = [k for k, c in CONFIGS.items() if not c.hidden]
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="configs:\n" + "\n".join(f"  {k:10s} {CONFIGS[k].about}" for k in public))
    p.add_argument("--config", default="cpu-small", choices=list(CONFIGS), metavar="{" + ",".join(public) + "}")
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--lora-checkpointing", action="store_true",
                   help="gradient checkpointing during identity-LoRA training (less memory, more time)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        p.error(f"unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cfg = CONFIGS[args.config]
    if _cuda(cfg.device) and not torch.cuda.is_available():
        print(f"--config {args.config} needs a CUDA GPU, and torch {torch.__version__} sees none "
              "(torch.cuda.is_available() is False). On this machine run --config cpu-small.", file=sys.stderr)
        return 2
    report = run(args.config, args.modes, args.lora_checkpointing)
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0


def _load_modes() -> None:
    """Other tasks add their modes from their own files (same Mode signature); a file not written yet is
    skipped. Imported last: those files import this module's helpers."""
    for name in MODE_MODULES:
        try:
            MODES.update(importlib.import_module(name).MODES)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


MODE_MODULES = ("bench.modes_guided", "bench.modes_drag", "bench.modes_generation", "bench.modes_personalize")
if __name__ == "__main__":  # run the importable module, so the mode files and this share one bench.perf
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from bench import perf

    sys.exit(perf.main())
else:
    _load_modes()
