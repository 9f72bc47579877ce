"""DragCanvas: run the web app.

    python app.py                      # best model available (SD-1.5 if reachable, else an offline built-in)
    python app.py --model tiny         # tiny random-weight model: fast, for trying the UI on a CPU
    python app.py --model ./my-model   # a diffusers folder, a .safetensors checkpoint or a Hub id
    python app.py --auth me:secret     # a shared server: log in first (or --auth-file FILE, one user:pass a line)
    python app.py --segmenter facebook/sam-vit-base   # click to select with SAM (default: classical, OpenCV)

Also the Hugging Face Space entry point (``app_file: app.py``; Spaces run ``python app.py``).

Serving (issue 13): every result and its recipe is written atomically to ``--outputs`` (dated subfolders, like
A1111's ``outputs/``) and the history comes back after a reload or a restart (ui/common.py ``wire_history``);
clients name LoRAs by library name only; the GPU queue is bounded (``--max-queue``, ``--max-queued-per-session``)
and a run over ``--time-budget`` seconds is stopped; the server serves only Gradio's cache (no ``allowed_paths``),
whose per-session files live under one temp folder removed on exit and SIGTERM (and, after a kill, at the next
start); listening on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path

log = logging.getLogger("dragcanvas")

RUN_PREFIX = "dragcanvas-run-"  # /tmp/dragcanvas-run-<pid>-<random>: this process's session files and cache
GPU_QUEUE = "gpu"  # the concurrency_id every engine handler uses (ui/*_tab.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DragCanvas web UI (drag-based image editing).")
    p.add_argument("--model", default="auto",
                   help="model spec: 'auto', a named built-in ('tiny', ...), a Hub id, a diffusers folder "
                        "or a single .safetensors file (default: auto)")
    p.add_argument("--inpaint-model", default=None, metavar="SPEC",
                   help="the inpainting model (9-channel UNet, same family as --model) the Inpaint drag fills with "
                        "(default: toy-inpaint beside toy, tiny-inpaint beside tiny, else the base model's "
                        "blended-latent fill)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle weights (.bin/.ckpt/.pt) of the model you name here; only for files "
                        "you trust (never applies to files a client sends or names)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--offload", action="store_true",
                   help="keep weights in RAM and move each model to the GPU only while it runs (low-VRAM GPUs)")
    p.add_argument("--max-side", type=int, default=2048,
                   help="larger images are downscaled to this long side before editing (default: 2048)")
    p.add_argument("--outputs", default="outputs",
                   help="folder for every result and its recipe, in dated subfolders (default: outputs)")
    p.add_argument("--no-input-in-recipe", action="store_true",
                   help="leave the pictures that were sent in out of the recipes in result PNGs (a replay then "
                        "needs them again); for shared servers")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                   help="require this login (repeat for more users); off by default")
    p.add_argument("--auth-file", metavar="FILE", help="require a login from FILE: one USER:PASS a line")
    p.add_argument("--max-queue", type=int, default=16,
                   help="engine requests that may wait at once; more are refused as busy (default: 16)")
    p.add_argument("--max-queued-per-session", type=int, default=2,
                   help="engine requests one session (page or API client) may have waiting (default: 2)")
    p.add_argument("--time-budget", type=float, default=1800,
                   help="stop a run after this many seconds (0 = no limit; default: 1800)")
    p.add_argument("--max-file-size", default="50mb", help="largest upload (default: 50mb)")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose ControlNets, T2I-Adapters, IP-Adapters, models and VAEs web users may pick by "
                        "name (repeat for more; default: the project's models/); read once at start")
    p.add_argument("--allow-hub-models", action="store_true",
                   help="let web users name any Hugging Face Hub id (owner/name), not only the listed ones; the "
                        "server then downloads what strangers ask for")
    p.add_argument("--segmenter", default="classical", metavar="classical|auto|SAM",
                   help="what turns a click on a mask picture into the object's mask: classical (OpenCV, no weights; "
                        "default), auto (a SAM model already cached here, else classical), or a SAM Hub id or folder "
                        "(e.g. facebook/sam-vit-base); one that cannot be loaded is one line in the log, and classical "
                        "answers instead")
    p.add_argument("--backend", default="local", metavar="local|ray[:ADDRESS]",
                   help="where edits run: this process (default), or a `python -m editing.serve` deployment on the "
                        "Ray cluster at ADDRESS (default: the one on this machine); --model etc. are then the deployment's")
    return p.parse_args(argv)


def remote_editor(backend: str):
    """``--backend ray[:ADDRESS]`` -> a RemoteEditor, or exit with one line (nothing half-started)."""
    kind, _, address = backend.partition(":")
    if kind != "ray":
        raise SystemExit(f"--backend: expected local, ray or ray:HOST:PORT, got {backend!r}")
    try:
        from editing.serve.client import RemoteEditor
    except ImportError:
        raise SystemExit("--backend ray needs Ray Serve: pip install -r requirements-ray.txt") from None
    from models.errors import EditError

    try:
        return RemoteEditor(address or "auto")
    except EditError as e:
        raise SystemExit(f"--backend {backend}: {e}") from None


# ---- temp folders ----------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(tmp: Path | None = None) -> int:
    """Remove the temp folders of DragCanvas servers that are gone (killed, so their exit clean-up never ran)."""
    n = 0
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{RUN_PREFIX}*"):
        try:
            pid = int(d.name[len(RUN_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def make_temp_root() -> Path:
    """This process's temp folder; Gradio's cache goes inside it (GRADIO_TEMP_DIR, read when components are built),
    and it is removed on exit and on SIGTERM."""
    if n := clean_stale_temp():
        log.info("removed %d temp folder(s) of DragCanvas servers that were killed", n)
    root = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-"))
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    # torch writes its compile cache to <system temp>/torchinductor_<user> unless told otherwise: keep it in the
    # root too, so the system temp dir holds nothing of this app after it stops
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "torchinductor"))
    atexit.register(shutil.rmtree, root, True)
    return root


def _stop_on_sigterm() -> None:
    """SIGTERM ends the process like Ctrl-C (Python's default skips atexit, leaving the temp folder behind)."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


# ---- auth, queue -------------------------------------------------------------------------------------------
def read_auth(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """(user, password) pairs from --auth and --auth-file, or None (no login)."""
    entries = list(args.auth)
    if args.auth_file:
        text = Path(args.auth_file).read_text(encoding="utf-8")
        entries += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    pairs = []
    for e in entries:
        user, sep, password = e.partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth / --auth-file: expected USER:PASS, got {e.split(':')[0]!r}:…")
        pairs.append((user, password))
    return pairs or None


def bound_queue(demo, max_waiting: int, per_session: int) -> None:
    """Refuse an engine request when ``max_waiting`` already wait, or when its session already has
    ``per_session`` waiting, with a message saying how many are ahead; instant UI events are never refused.

    Gradio's own ``queue(max_size=)`` counts every event (clicks on the points too) and answers
    "Queue is full. Max size is N and size is M."; this checks the GPU queue only (ui/gradio_compat.py)."""
    from ui import gradio_compat

    def check(fn, body):
        if getattr(fn, "concurrency_id", None) != GPU_QUEUE:
            return None
        waiting, running = gradio_compat.queue_load(demo, GPU_QUEUE)
        mine = sum(s == gradio_compat.session_hash(body) for s in waiting)
        if max_waiting and len(waiting) >= max_waiting:
            return False, (f"The server is busy: {len(waiting) + running} requests are ahead of you "
                           f"(at most {max_waiting} may wait). Try again in a minute.")
        if per_session and mine >= per_session:
            return False, (f"You already have {mine} requests waiting (at most {per_session} per session): "
                           "wait for them to finish or cancel one.")
        return None

    gradio_compat.wrap_queue_push(demo, check)


# ---- build and launch ----------------------------------------------------------------------------------------
def browser_secret(outputs: Path) -> str:
    """The key that encrypts each browser's history key in its localStorage: kept in the outputs folder, so a
    restarted server still reads what browsers stored."""
    path = outputs / ".browser-secret"
    if not path.is_file():
        outputs.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def build(args: argparse.Namespace, editor=None, settings: dict | None = None):
    """Editor (models load lazily on first use) + UI, with the bounded shared queue. ``editor``/``settings``: an
    Editor already loaded and slider start values (tests)."""
    from models.registry import PROJECT_MODELS, scan
    from ui import build_demo
    from ui.click_mask import configure as configure_clicks
    from ui.common import unexpected_error
    from ui.fields import check_inputs, refused_file
    from ui.gradio_compat import guard_calls
    from ui.history import configure, wire_history
    from ui.owners import OWNERS

    if editor is None and getattr(args, "backend", "local") != "local":
        editor = remote_editor(args.backend)
    outputs = Path(args.outputs).expanduser().resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    root = Path(os.environ["GRADIO_TEMP_DIR"]).parent if os.environ.get("GRADIO_TEMP_DIR", "").startswith(
        str(Path(tempfile.gettempdir()) / RUN_PREFIX)) else None
    names = scan([Path(d) for d in args.models_dir] or [PROJECT_MODELS], allow_hub=args.allow_hub_models)
    configure(outputs=outputs, input_in_recipe=not args.no_input_in_recipe, time_budget_s=float(args.time_budget),
              temp_root=root, model_names=names)
    if editor is None:
        from editing.engine import Editor

        editor = Editor(args.model, allow_pickle=args.allow_pickle, max_side=args.max_side, offload=args.offload,
                        trust_lora_paths=False, inpaint_model=args.inpaint_model)  # clients name LoRAs by library name only
    else:
        editor.trust_lora_paths = False
    log.info("model: %s%s", editor.model_spec, f" ({editor.banner})" if editor.banner else "")
    configure_clicks(getattr(args, "segmenter", "classical"))  # before the UI: it picks the clicks' queue
    demo = build_demo(editor, settings)
    check_inputs(demo)
    # every refusal explained (a never-uploaded file included), and the owner of each result file recorded
    guard_calls(demo, refused_file, lambda e: unexpected_error(e).message, OWNERS.record_outputs)
    wire_history(demo, browser_secret(outputs))
    demo.queue(default_concurrency_limit=getattr(editor, "concurrency", 1))  # a Ray pool runs several at once
    bound_queue(demo, args.max_queue, args.max_queued_per_session)
    return demo


def launch_kwargs(args: argparse.Namespace) -> dict:
    """What ``demo.launch`` gets: no ``allowed_paths`` (only Gradio's cache is served), optional login; with a
    login, each user's files are served to that user only (ui/owners.py)."""
    auth = read_auth(args)
    kwargs = dict(server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size,
                  auth=auth, allowed_paths=None)
    if auth:
        from starlette.middleware import Middleware

        from ui.owners import OWNERS, OwnerCheck

        kwargs["app_kwargs"] = {"middleware": [Middleware(OwnerCheck, owners=OWNERS)]}
    return kwargs


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    root = make_temp_root()
    _stop_on_sigterm()
    kwargs = launch_kwargs(args)
    demo = build(args)
    try:
        demo.launch(**kwargs)
    finally:
        demo.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
