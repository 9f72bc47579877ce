"""The Serve replica: one ``Editor`` (its model, lock and per-image caches) behind one streaming method.

Routing (cache affinity) uses Serve's model multiplexing with the *image's content hash* as the "model id":
the replica that ran an image "holds" that id (``_hold``), reports it to the Serve router, and the router sends
later requests with the same id there. A generated image is held by the replica that generated it (its
trajectory is cached there), so dragging it goes back to that replica. The replica's own cache policy (the
Editor's LRUs) is unchanged; the multiplexing LRU (``HELD_IMAGES``) only steers requests.

``call(method, args, kwargs, cleared_at)`` is an async generator of events, so progress and previews stream
back while the edit runs in a worker thread:

    ("started", replica_name)
    ("progress", phase, fraction, message)      at most every PROGRESS_EVERY_S per phase
    ("preview", step, image)                    training previews (DreamBooth)
    ("result", EditResult) | ("cancelled", msg) | ("error", msg) | ("failure", msg)

Cancel: the client cancels the Serve request; Serve raises ``CancelledError`` here, which sets the run's
Event, so ``Run.report`` stops the edit at its next step; the replica waits for it before answering.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray import serve

from editing.images import image_hash
from models.errors import EditCancelled, EditError

log = logging.getLogger(__name__)

HELD_IMAGES = 8  # images one replica is routed for: the Editor's largest per-image LRU (posteriors, generations)
PROGRESS_EVERY_S = 0.1  # progress events per phase are thinned to this interval (the last one always goes)
METHODS = ("edit", "train_identity_lora", "replay")  # what ``call`` runs; everything else is a plain method


def oom_message(where: str) -> str:
    return (f"Replica {where} ran out of memory during this edit. Try a smaller image or a lower resolution, "
            "or give each replica more memory (--gpus-per-replica 1, fewer replicas per GPU).")


class _Forward:
    """The Editor's progress callback on the replica: puts events on the asyncio queue of the request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue
        self._last: dict[str, float] = {}

    def _put(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def __call__(self, phase: str, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last.get(phase, -1e9) < PROGRESS_EVERY_S:
            return
        self._last[phase] = now
        self._put(("progress", phase, float(fraction), message))

    def preview(self, step: int, image) -> None:
        self._put(("preview", step, image))


@serve.deployment(name="Editor")
class EditorReplica:
    """One Editor per replica. Edits run one at a time (one worker thread, the Editor's lock besides)."""

    def __init__(self, model: str, engine: dict, threads: int | None = None):
        from editing.engine import Editor

        if threads:  # the same thread count as the in-process engine gives the same pixels
            torch.set_num_threads(int(threads))
        self.name = ray.get_runtime_context().get_actor_name() or f"pid-{os.getpid()}"
        self.editor = Editor(model, **engine)
        try:
            self.editor.load()  # now, so a model that does not fit fails the deployment, not a user's edit
        except EditError as e:
            raise RuntimeError(f"DragCanvas replica could not load model {model!r}: {e}") from None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edit")
        self._stats_lock = threading.Lock()
        self._stats = {"queued_or_running": 0, "done": 0, "cancelled": 0, "failed": 0}
        self._cleared_at = 0.0
        log.info("replica %s: model %s on %s", self.name, self.editor.model_spec, self.editor.bundle.device)

    # ---- routing -----------------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=HELD_IMAGES)
    async def _hold(self, key: str) -> str:
        """Claim ``key`` (an image hash) for this replica: the router sends its later requests here."""
        return key

    async def _hold_request_key(self) -> None:
        key = serve.get_multiplexed_model_id()
        if key:
            await self._hold(key)

    # ---- the streaming call ------------------------------------------------------------------------------
    async def call(self, method: str, args: tuple, kwargs: dict, cleared_at: float = 0.0):
        if method not in METHODS:
            yield ("failure", f"Unknown engine method {method!r}.")
            return
        await self._hold_request_key()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = object()
        yield ("started", self.name)
        with self._stats_lock:
            self._stats["queued_or_running"] += 1
        fut = loop.run_in_executor(self._pool, self._work, method, args, kwargs, cleared_at,
                                   _Forward(loop, events), cancel)
        fut.add_done_callback(lambda _: events.put_nowait(done))
        try:
            while (event := await events.get()) is not done:
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            cancel.set()  # Run.report raises EditCancelled at the run's next step
            await asyncio.wait([fut])  # drain: the replica answers only once its run has stopped
            raise
        finally:
            if not fut.done():  # closed without a CancelledError (the client went away)
                cancel.set()
        outcome = fut.result()
        if outcome[0] == "result":
            await self._hold_results(outcome[1])
        yield outcome

    def _work(self, method: str, args: tuple, kwargs: dict, cleared_at: float, progress: _Forward,
              cancel: threading.Event) -> tuple:
        """Runs in the replica's one worker thread; never raises (the outcome is an event)."""
        kind = "failed"
        try:
            if cleared_at > self._cleared_at:  # a client cleared the caches since this replica last looked
                self.editor.clear_caches()
                self._cleared_at = cleared_at
            if cancel.is_set():
                raise EditCancelled("Cancelled.")
            result = getattr(self.editor, method)(*args, progress=progress, cancel=cancel, **kwargs)
            if result is not None:
                result.extra["served_by"] = self.name
            kind = "done"
            return ("result", result)
        except EditCancelled as e:
            kind = "cancelled"
            return ("cancelled", str(e))
        except EditError as e:
            return ("error", str(e))
        except (torch.cuda.OutOfMemoryError, MemoryError):
            log.exception("out of memory in %s", method)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return ("error", oom_message(self.name))
        except Exception as e:
            log.exception("%s failed", method)
            return ("failure", f"{type(e).__name__} on replica {self.name}: {e}")
        finally:
            with self._stats_lock:
                self._stats["queued_or_running"] -= 1
                self._stats[kind] += 1

    async def _hold_results(self, result) -> None:
        """A drag-ready result (a generation) is cached here: route its image's later drags here too."""
        if result is None:
            return
        for img in result.all_images:
            if self.editor.is_drag_ready(img):
                await self._hold(image_hash(img.convert("RGB")))

    # ---- plain methods --------------------------------------------------------------------------------
    async def info(self) -> dict:
        o = self.editor.options
        return {"replica": self.name, "model_spec": o.model_spec, "banner": self.editor.banner,
                "options": {k: getattr(o, k) for k in o.__dataclass_fields__}}

    async def tokenizer(self):
        return self.editor.bundle.tokenizer

    async def generation_of(self, image):
        await self._hold_request_key()
        return self.editor.generation_of(image)

    async def is_drag_ready(self, image) -> bool:
        await self._hold_request_key()
        return self.editor.is_drag_ready(image)

    async def stats(self) -> dict:
        with self._stats_lock:
            return {"replica": self.name, **self._stats}


def build_app(model: str, *, replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
              max_ongoing: int = 4, drain_s: float = 300.0, threads: int | None = None, engine: dict | None = None,
              env: dict | None = None):
    """The Serve application: ``replicas`` Editors of ``model``. ``max_ongoing`` requests may wait at one
    replica (they run one at a time): more keeps an image on its replica under load, fewer spreads load sooner.
    ``drain_s``: how long shutting down waits for running edits."""
    actor = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    return EditorReplica.options(
        num_replicas=replicas, ray_actor_options=actor, max_ongoing_requests=max_ongoing,
        graceful_shutdown_timeout_s=drain_s, graceful_shutdown_wait_loop_s=1.0,
    ).bind(model, dict(engine or {}), threads)
