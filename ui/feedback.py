"""Live feedback while the engine runs: progress with the time left per phase, the handle trail of a drag's
optimisation, and intermediate previews (x̂₀) of sampling, streamed by a generator handler.

The engine runs in a worker thread and talks to a ``LiveProgress`` (it is the ``progress=`` callback):

* ``live(phase, frac, msg)``  -- every ``Run.report`` (``frac`` in 0..1 within ``phase``);
* ``live.trail(points)``      -- ``Run.trail``: the current handle positions ``[(x, y), ...]`` in image pixels,
  once per optimisation step (DragDiffusion's point tracking);
* ``live.preview(step, img)`` -- ``Run.preview``: an intermediate PIL image (a cheap x̂₀ decode while sampling,
  a training preview while fine-tuning).

The handler's own thread polls it with ``follow`` and yields whenever something new arrived. A streaming handler
(wrap it in ``ui.common.streams_errors(n_outputs)``) looks like this::

    live = LiveProgress(progress)                       # progress: the handler's gr.Progress()
    for snap in live.follow(lambda cb: self._edit(request, progress=cb, cancel=session.cancel),
                            cancel=session.cancel):
        yield (snap.preview if snap.new_preview else gr.skip()), snap.status
    result = live.result                                # the engine's EditResult (errors are re-raised)

``Snapshot.status`` is one line such as ``"denoise: step 3/10 · ~4 s left in this phase · done: lora 2.1 s"``;
``snap.trail`` is every ``trail`` call so far (draw it with ``ui.overlay.draw_trail``). On ZeroGPU the engine
runs in another process that no callback reaches: ``follow`` then runs the call with a plain
``EngineProgress`` (the progress bar still moves) and yields nothing. Nothing here imports torch.
"""
from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import gradio as gr

from ui.common import EngineProgress
from ui.zerogpu import zero_gpu

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the handler looks for news: often enough to feel live, rarely enough to stay cheap
ETA_AFTER = 0.05  # estimate the time left in a phase only once this fraction of it is done (early guesses jump)


@dataclass(frozen=True)
class Snapshot:
    """What the handler shows after one poll (immutable; built under the lock)."""

    phase: str
    frac: float  # 0..1 within ``phase``
    message: str
    eta_s: float | None  # seconds left in ``phase``, None while unknown
    done: tuple[tuple[str, float], ...]  # finished phases and their seconds, in order
    trail: tuple[tuple[tuple[float, float], ...], ...]  # every trail() call: handle positions (image px)
    preview: object | None  # the latest preview image (PIL), None before the first
    preview_step: int | None
    new_trail: bool = False  # the trail grew since the previous yielded snapshot
    new_preview: bool = False  # a new preview arrived since the previous yielded snapshot
    previews_seen: int = 0  # how many preview() calls so far

    @property
    def status(self) -> str:
        """One status line: phase and message, time left in this phase, finished phases."""
        parts = [f"{self.phase}: {self.message}" if self.message else self.phase]
        if self.eta_s is not None:
            parts.append(f"~{format_seconds(self.eta_s)} left in this phase")
        if self.trail:
            parts.append(f"handle trail: {len(self.trail)} step{'s' * (len(self.trail) != 1)}")
        if self.preview_step is not None:
            parts.append(f"preview at step {self.preview_step}")
        if self.done:
            parts.append("done: " + ", ".join(f"{name} {format_seconds(s)}" for name, s in self.done))
        return " · ".join(parts)


def format_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


@dataclass
class _State:
    phase: str = "starting"
    frac: float = 0.0
    message: str = ""
    phase_t0: float = field(default_factory=time.perf_counter)
    done: dict[str, float] = field(default_factory=dict)
    trail: list[tuple[tuple[float, float], ...]] = field(default_factory=list)
    preview: object | None = None
    preview_step: int | None = None
    previews: int = 0
    version: int = 0  # bumped by every call: the poller yields only when it moved


class LiveProgress:
    """The engine's progress callback (``__call__``, ``trail``, ``preview``) for a handler that streams.

    ``gr_progress`` (the handler's ``gr.Progress``, optional) is moved from the polling thread, so the usual
    progress bar keeps working next to whatever the handler shows."""

    def __init__(self, gr_progress: gr.Progress | None = None, clock: Callable[[], float] = time.perf_counter):
        self.gr_progress = gr_progress
        self.clock = clock
        self._lock = threading.Lock()
        self._s = _State(phase_t0=clock())
        self.result = None  # set by follow() once the call returned

    # ---- engine side (worker thread) ----
    def __call__(self, phase: str, frac: float, msg: str = "") -> None:
        frac = min(1.0, max(0.0, frac)) if math.isfinite(frac) else 0.0
        with self._lock:
            s, now = self._s, self.clock()
            if phase != s.phase:  # a new phase: the previous one is finished
                if s.phase != "starting":
                    s.done[s.phase] = s.done.get(s.phase, 0.0) + now - s.phase_t0
                s.phase, s.phase_t0 = phase, now
            s.frac, s.message = frac, msg
            s.version += 1

    def trail(self, points) -> None:
        pts = tuple((float(x), float(y)) for x, y in points)
        with self._lock:
            self._s.trail.append(pts)
            self._s.version += 1

    def preview(self, step: int, image) -> None:
        with self._lock:
            self._s.preview, self._s.preview_step = image, int(step)
            self._s.previews += 1
            self._s.version += 1

    # ---- handler side (polling thread) ----
    def snapshot(self, since: Snapshot | None = None) -> Snapshot:
        """The current state; ``new_trail`` / ``new_preview`` are relative to ``since``."""
        with self._lock:
            s = self._s
            elapsed = self.clock() - s.phase_t0
            eta = elapsed * (1.0 - s.frac) / s.frac if s.frac >= ETA_AFTER and s.phase != "starting" else None
            trail = tuple(s.trail)
            snap = Snapshot(s.phase, s.frac, s.message, eta, tuple(s.done.items()), trail, s.preview,
                            s.preview_step, previews_seen=s.previews)
        new_trail = len(trail) != (len(since.trail) if since else 0)
        new_preview = snap.previews_seen != (since.previews_seen if since else 0)
        return replace(snap, new_trail=new_trail, new_preview=new_preview)

    @property
    def version(self) -> int:
        with self._lock:
            return self._s.version

    def _move_bar(self, snap: Snapshot) -> None:
        if self.gr_progress is not None:
            self.gr_progress(snap.frac, desc=f"{snap.phase}: {snap.message}" if snap.message else snap.phase)

    def follow(self, call: Callable[[object], object], cancel: threading.Event | None = None,
               poll_s: float = POLL_S) -> Iterator[Snapshot]:
        """Run ``call(progress_callback)`` in a worker thread; yield a ``Snapshot`` whenever the engine reported
        something new (at most every ``poll_s``). Afterwards ``self.result`` holds what ``call`` returned; an
        exception it raised is re-raised here. If the consumer stops early (the browser went away), ``cancel``
        is set so the engine stops at its next step."""
        if zero_gpu():  # another process: only a picklable progress bar reaches it
            self.result = call(EngineProgress(self.gr_progress) if self.gr_progress is not None else None)
            return
        outcome: dict = {}

        def work():
            try:
                outcome["result"] = call(self)
            except BaseException as e:
                outcome["error"] = e

        # The worker runs in a copy of this handler's context, so context variables set around the handler
        # (e.g. by ui.common's run guards) reach the engine call as they would without the thread.
        context = contextvars.copy_context()
        worker = threading.Thread(target=context.run, args=(work,), name="engine-live", daemon=True)
        worker.start()
        last, seen = None, -1
        try:
            while worker.is_alive():
                worker.join(poll_s)
                if not worker.is_alive():
                    break
                version = self.version
                if version == seen:
                    continue
                seen = version
                snap = self.snapshot(last)
                self._move_bar(snap)
                last = snap
                yield snap
        finally:
            if worker.is_alive() and cancel is not None:
                cancel.set()
        if "error" in outcome:
            raise outcome["error"]
        self.result = outcome.get("result")


def stream_to_gallery(edit, req, results, cancel, progress, loras) -> Iterator[tuple]:
    """Run ``edit(req, …)`` (a tab's GPU-wrapped ``Editor.edit``) in a worker and yield the four outputs of a
    generating tab — gallery, download, details, status — while it samples: the kept results plus the newest
    x̂₀ preview when the engine sends one, and "Running: …". Returns the result: ``result = yield from …``."""
    live = LiveProgress(progress)
    def call(cb):
        return edit(req, progress=cb, cancel=cancel, loras=loras)
    for snap in live.follow(call, cancel=cancel):
        if cancel is None or not cancel.is_set():  # else Cancel's own status line stays
            yield (_live_gallery(results, snap), gr.skip(), gr.skip(), f"Running: {snap.status}")
    return live.result


def _live_gallery(results, snap):
    if not snap.new_preview or snap.preview is None:
        return gr.skip()
    return [*results.gallery(), (snap.preview, f"preview at step {snap.preview_step} (not kept)")]
