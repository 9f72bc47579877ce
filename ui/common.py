"""What every tab shares: per-session history (ui/history.py, re-exported), the error wrapper that also stops a
run whose client cancelled or left, progress, Cancel, and the values the handlers pass around. The widgets
built from the engine's field tables, and the checks of every input, are in ui/fields.py.

Serving settings (outputs folder, recipes without the input, time budget per request) are set once by app.py
with ``configure``; a tab built on its own (tests) keeps its results in a temp folder only.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import math
import random
import re
import threading
import time

import gradio as gr
import numpy as np
from PIL import Image

from editing.generation import GENERATE_FIELDS
from models.errors import EditCancelled, EditError
from ui import overlay
from ui.gradio_compat import current_request, queue_job
from ui.history import SERVING, History
from ui.zerogpu import zero_gpu

log = logging.getLogger(__name__)

GPU_SECONDS = {"drag": 180, "generate": 60, "lora": 120, "sketch": 120, "text_to_image": 120}  # ZeroGPU reservations
# The mask canvases (Drag, Move, Paste, Appearance): one fixed translucent magenta brush, no layers.
MASK_CANVAS = dict(type="numpy", image_mode="RGBA", format="png", sources=("upload", "clipboard"), transforms=(),
                   layers=False, brush=gr.Brush(colors=[("#ff2bd6", 0.5)], color_mode="fixed"))
HISTORY_HEADER = "x-dragcanvas-history"  # API clients' history key (browsers keep theirs in localStorage)


# ---- widgets shared by the generating tabs ------------------------------------------------------------
def run_controls(w, label: str, prefix: str, can_cancel: bool) -> None:
    """The Run and Cancel buttons and the status line (elem_ids ``{prefix}-run``, ``-cancel``, ``-status``)."""
    with gr.Row():
        w.run_btn = gr.Button(label, variant="primary", elem_id=f"{prefix}-run")
        w.cancel_btn = gr.Button("Cancel", variant="stop", visible=can_cancel, elem_id=f"{prefix}-cancel")
    w.status = gr.Markdown("", min_height=48, elem_id=f"{prefix}-status")


def results_gallery(w, prefix: str, height: int) -> None:
    """The results gallery and its PNG download (elem_ids ``{prefix}-gallery``, ``{prefix}-download``)."""
    w.gallery = gr.Gallery(label="Results: select one to download or send", format="png", columns=3,
                           height=height, allow_preview=False, elem_id=f"{prefix}-gallery")
    w.download = gr.DownloadButton("Download PNG (with recipe)", elem_id=f"{prefix}-download")


# ---- errors, progress, Cancel -------------------------------------------------------------------------
def _to_ui_error(fn, e: Exception) -> gr.Error:
    """What the browser shows for ``e`` (called in an ``except``, which raises it): EditError -> gr.Error with its
    one-line message; a gr.Error as is; anything else is logged and named in one line."""
    if isinstance(e, EditError):
        return gr.Error(str(e))
    if isinstance(e, gr.Error):
        return e
    log.exception("%s failed", fn.__name__)
    return unexpected_error(e)


def unexpected_error(e: BaseException) -> gr.Error:
    """One line for an error nobody foresaw; the traceback stays in the server log."""
    first = (str(e).splitlines() or [""])[0][:160]
    said = f": {_SERVER_PATH.sub('…', first)}" if first else ""
    return gr.Error(f"Unexpected error ({type(e).__name__}{said}). The app is still running; details are in the "
                    "server log.")


_SERVER_PATH = re.compile(r"(?<![\w.])(?:~|[A-Za-z]:)?[/\\][^\s'\"]*")  # shown to strangers as '…': no server paths


_RUN_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("dragcanvas_run_stop",
                                                                                   default=None)
WATCH_S = 0.2  # how often a running handler looks for a cancelled or vanished client


class RunCancel:
    """What the engine polls (``is_set``) for one run: the tab's Cancel button, or the run's own stop (its client
    cancelled through the API, closed the page, or the run went over the time budget)."""

    def __init__(self, button: threading.Event | None, run: threading.Event | None):
        self.button, self.run = button, run

    def is_set(self) -> bool:
        return bool((self.button is not None and self.button.is_set()) or (self.run is not None and self.run.is_set()))

    def set(self) -> None:
        """Stop this run (a handler whose consumer went away), not the tab's later runs."""
        (self.run if self.run is not None else self.button).set()


class _RunGuard:
    """One handler call: watches, from a small thread, whether Gradio still wants its result.

    Gradio 6 cancels a job (``job.cancel()`` in gradio_client, the page's own cancels) by cancelling the asyncio
    task of the event (``/cancel`` -> ``utils.cancel_tasks``), and marks the event not alive when its client's
    event stream disconnects (``Queue.clean_events``); neither reaches a handler running in a worker thread,
    which would compute on for minutes while holding the engine. The guard sees either within ``WATCH_S`` and
    sets the run's stop event (``RunCancel.run`` through ``GpuHandlers.cancel_of``) and the ``cancel`` event of
    every session object the handler got (tabs that pass ``session.cancel`` to the engine themselves); the
    engine raises at its next step and releases its lock. The session objects get a fresh ``cancel`` Event, so
    the same client's next request is not cancelled by this one's stop. The same stop ends a run over
    ``SERVING.time_budget_s``. It also binds the API client's history key (header) to the session's histories."""

    def __init__(self, args, kwargs):
        self.stop = threading.Event()
        self.reason: str | None = None
        self.done = threading.Event()
        self.owners = [o for o in _session_objects(args, kwargs)]
        self.task, self.event = queue_job()
        self.started = time.monotonic()
        self._token = None
        self._bind_history_key()

    def _bind_history_key(self) -> None:
        request = current_request()
        headers = getattr(request, "headers", None) or {}
        try:
            key = headers.get(HISTORY_HEADER)
        except (AttributeError, TypeError):  # an odd request object: no key
            key = None
        if key:
            for o in self.owners:
                if isinstance(o, History):
                    o.bind(key)

    def start(self) -> _RunGuard:
        if self.task is not None or self.event is not None or SERVING.time_budget_s > 0:
            threading.Thread(target=self._watch, name="dragcanvas-run-guard", daemon=True).start()
        return self

    def finish(self) -> None:
        self.done.set()

    def __enter__(self):  # the run's stop event is what GpuHandlers.cancel_of hands the engine
        self._token = _RUN_STOP.set(self.stop)
        return self

    def __exit__(self, *exc):
        _RUN_STOP.reset(self._token)
        return False

    def client_gone(self) -> bool:
        if self.event is not None and not getattr(self.event, "alive", True):
            return True
        task = self.task
        return task is not None and (task.done() or task.cancelling() > 0)

    def _watch(self) -> None:
        while not self.done.wait(WATCH_S):
            if self.client_gone():
                self.trip("cancelled")
                return
            budget = SERVING.time_budget_s
            if budget > 0 and time.monotonic() - self.started > budget:
                self.trip("budget")
                return

    def trip(self, reason: str) -> None:
        if self.stop.is_set():
            return
        self.reason = reason
        self.stop.set()
        for o in self.owners:
            old, o.cancel = o.cancel, threading.Event()
            old.set()
        log.info("run stopped at its next step: %s", "over the time budget" if reason == "budget" else
                 "the client cancelled or went away")

    def cancelled(self, e: EditCancelled, n_outputs: int | None):
        """What a handler returns when the engine stopped: the budget is an error; a cancel leaves outputs as is."""
        if self.reason == "budget":
            raise gr.Error(f"Stopped: this request ran longer than the server's limit of "
                           f"{SERVING.time_budget_s:g} s per request. Try fewer steps or a smaller image.")
        if self.reason is None:  # Cancel pressed in the page: the page is still there to read it
            gr.Warning(f"{e} Your image, mask and points are unchanged." if n_outputs is None else str(e))
        return gr.skip() if n_outputs is None else tuple(gr.skip() for _ in range(n_outputs))


def _session_objects(args, kwargs) -> list:
    """The per-session objects (gr.State values) among a handler's arguments: those with a ``cancel`` Event."""
    found, seen = [], set()
    for v in (*args, *kwargs.values()):
        for o in (v.values() if isinstance(v, dict) else (v,)):
            if isinstance(getattr(o, "cancel", None), threading.Event) and id(o) not in seen:
                seen.add(id(o))
                found.append(o)
    return found


def shows_errors(fn):
    """EditError -> gr.Error with its one-line message; Cancel -> a warning; other errors are logged.

    Inputs are never cleared by a failed run, and the app keeps serving. A run whose client cancels or leaves
    stops at its next step (``_RunGuard``).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        guard = _RunGuard(args, kwargs).start()
        try:
            with guard:
                return fn(*args, **kwargs)
        except EditCancelled as e:
            return guard.cancelled(e, None)
        except Exception as e:
            raise _to_ui_error(fn, e) from e
        finally:
            guard.finish()

    return wrapper


def streams_errors(n_outputs: int):
    """``shows_errors`` for generator handlers with ``n_outputs`` outputs (Cancel leaves all of them as they are).
    Gradio closing the generator (a cancel between two updates) stops the run too."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            guard = _RunGuard(args, kwargs).start()
            finished = False
            try:
                stream = fn(*args, **kwargs)
                while not finished:
                    with guard:  # each step may run in another worker thread: the stop is set per step
                        try:
                            item = next(stream)
                        except StopIteration:
                            finished = True
                            return
                        except EditCancelled as e:
                            finished = True
                            item = guard.cancelled(e, n_outputs)
                        except Exception as e:
                            finished = True
                            raise _to_ui_error(fn, e) from e
                    yield item
            finally:
                if not finished:  # closed by Gradio (cancel, disconnect) before the end
                    guard.trip("cancelled")
                guard.finish()

        return wrapper

    return decorate


class EngineProgress:
    """Engine progress callback (phase, fraction, message) -> gr.Progress bar. Picklable for ZeroGPU."""

    def __init__(self, progress: gr.Progress):
        self.progress = progress

    def __call__(self, phase: str, fraction: float, message: str = "") -> None:
        fraction = min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0
        self.progress(fraction, desc=f"{phase}: {message}" if message else phase)


class GpuHandlers:
    """Base of a tab's engine handlers: holds the Editor (never gr.State) and knows whether Cancel reaches it."""

    def __init__(self, editor):
        self.editor = editor
        self.can_cancel = not zero_gpu()  # a ZeroGPU worker is another process: no Event reaches it

    def cancel_of(self, history: History):
        """The ``cancel=`` for the engine: this tab's Cancel button or this run's own stop (see ``_RunGuard``).

        Called as the engine call starts, it forgets a Cancel pressed for an earlier run: the page clears it in its
        own pre-run step, but an API client calling the endpoint directly has no such step, and a stale Cancel
        would stop each of its later runs at the first step."""
        history.cancel.clear()
        if not self.can_cancel:
            return None
        return RunCancel(history.cancel, _RUN_STOP.get())


def model_names():
    """The registry of model names web requests may use (``--models-dir``; models/registry.py)."""
    return SERVING.model_names if SERVING.model_names is not None else _default_model_names()


@functools.lru_cache(maxsize=1)
def _default_model_names():
    from models.registry import scan

    return scan()


def model_spec(kind: str, name) -> str:
    """A model field's web value (a registry name) -> the spec the engine loads; anything else is one line naming
    what was typed and what may be chosen, without looking at the server's files."""
    return model_names().resolve(kind, name)


def notify(notices) -> None:
    for n in notices:
        gr.Warning(n)


def arm(history: History) -> None:
    """Before every engine call: forget an old Cancel press."""
    history.cancel.clear()


def request_cancel(history: History) -> str:
    history.cancel.set()
    return "Cancelled: the run stops at its next step. Your image, mask and points are unchanged."


# ---- values shared by the handlers ----------------------------------------------------------------------
def canvas_image(value) -> tuple[Image.Image | None, np.ndarray | None]:
    """ImageEditor value (RGBA arrays) -> (working image, painted mask or None)."""
    if not value or value.get("background") is None:
        return None, None
    image = Image.fromarray(overlay.as_rgb(value["background"]))
    return image, overlay.mask_from_layers(value.get("layers"), image.size)


def lora_specs(value) -> list:
    """The LoRA picker's value (ui/lora_picker.py) -> [(path, weight)]; nothing when the picker is absent."""
    if not value:
        return []
    from ui.lora_picker import to_specs

    return list(to_specs(value))


def lora_picker(links):
    """A LoRA picker in the current layout, or None when there are no links (a tab built on its own)."""
    return links.lora_picker() if links is not None else None


def with_loras(kwargs: dict, picker) -> dict:
    """``inputs_kwargs`` plus the picker as ``loras`` when there is one."""
    return kwargs | ({"loras": picker} if picker is not None else {})


def timings(result) -> dict:
    return {k: round(v, 3) for k, v in result.timings.items()}


def summary(result, has_mask: bool) -> str:
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if v >= 0.05)
    area = "Only the painted area could change." if has_mask else "No mask: the whole image could change."
    return f"Done in {result.total_s:.1f} s ({phases}). {area}"


def details_of(result) -> dict:
    return {"timings_s": timings(result), "unet_calls": result.unet_calls,
            "other_calls": result.extra.get("calls"), "drag_ready": result.extra.get("drag_ready"),
            "notices": result.notices, "params": result.recipe.get("params")}


def status_line(result, what: str) -> str:
    n = len(result.all_images)
    ready = ("Drag-ready: send it to Drag and it drags at once (no inversion, no LoRA)."
             if result.extra.get("drag_ready") else "A drag of it will invert it like a photo (strength < 1).")
    return f"Done in {result.total_s:.1f} s: {n} {what}{'s' * (n > 1)}. {ready}"


def pick_seed(randomize: bool, seed, spec: tuple = GENERATE_FIELDS["seed"]):
    """Before a run: a fresh random seed when asked (shown, so it can be reused), else the seed as typed."""
    lo, hi, default, _ = spec
    if randomize:
        return random.randrange(lo, hi)
    return gr.skip() if seed is not None else default


def sender(links, tab_id: str):
    """(fn, outputs) that sends the selected result to ``tab_id`` via ui/links.py."""
    send, outputs = links.send_to(tab_id)
    return (lambda results: send(results.current())), outputs
