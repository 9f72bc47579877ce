"""The front end's Editor: ``RemoteEditor`` has the surface the UI uses (edit, drag, generate,
train_identity_lora, replay, generation_of, is_drag_ready, load, clear_caches, model_spec, options, banner)
and sends every engine call to the Serve deployment; ``map_edits`` spreads a batch over the replicas.

Each call carries a routing key, the content hash of the request's image (``routing_key``), as Serve's
multiplexed model id, so the replica that holds that image's caches gets it. Progress and previews stream
back from the replica and reach the caller's callback in the caller's thread; Cancel (the caller's Event)
cancels the Serve request, which stops the replica's run at its next step. A replica that dies mid-edit is
retried once on another replica (the result then carries a notice); failing that, or when the deployment is
gone, the call raises an ``EditError`` saying so. Nothing here waits without a bound on a dead replica.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import ray
from PIL import Image
from ray import serve
from ray.exceptions import OutOfMemoryError, RayActorError, TaskCancelledError

from editing.context import EngineOptions
from editing.drag import DragRequest
from editing.images import image_hash
from editing.runtime import EditResult, Progress, decode_image
from editing.serve import APP_NAME, cluster
from models.errors import EditCancelled, EditError

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the caller's thread looks at Cancel while waiting for events
ALIVE_CHECK_S = 10.0  # while waiting, how often to ask whether the deployment still exists
CALL_TIMEOUT_S = 60.0  # plain (non-edit) calls: info, tokenizer, generation lookups
HOST_OOM = ("The replica ran out of host memory and Ray stopped it: use fewer replicas per machine, a smaller "
            "image or a lower resolution.")
GONE = (RayActorError, serve.exceptions.ReplicaUnavailableError)  # the replica died or cannot be reached


def routing_key(request) -> str | None:
    """The content hash of the image a request edits (its ``image``, else its first picture), or None."""
    if isinstance(request, Image.Image):
        return image_hash(request.convert("RGB"))
    if not dataclasses.is_dataclass(request):
        return None
    first = getattr(request, "image", None)
    if not isinstance(first, Image.Image):
        first = next((v for f in dataclasses.fields(request)
                      if isinstance(v := getattr(request, f.name), Image.Image)), None)
    return None if first is None else image_hash(first.convert("RGB"))


def _recipe_key(recipe: dict) -> str | None:
    png = recipe.get("image_png") if isinstance(recipe, dict) else None
    return routing_key(decode_image(png)) if png else None


class RemoteEditor:
    """``Editor`` stand-in whose engine runs on a Ray Serve deployment (``python -m editing.serve``).

    ``address``: a Ray cluster ('auto' = the one on this machine; None = already connected in this process).
    ``affinity=False`` sends requests without their routing key (for measuring what affinity buys).
    """

    def __init__(self, address: str | None = "auto", *, app: str = APP_NAME, affinity: bool = True,
                 retries: int = 1):
        if not ray.is_initialized():  # in a process that already joined (tests, bench), reuse that connection
            cluster.connect(address or "auto")
        self.app, self.affinity, self.retries = app, affinity, int(retries)
        self._handle = cluster.app_handle(app)
        info = self._call("info", None)
        self.options = EngineOptions(**info["options"])
        self.banner = info["banner"]
        self._cleared_at = 0.0
        self._bundle = None
        self._running: dict[int, str] = {}  # caller thread -> replica running its call (diagnostics, tests)
        self._lock = threading.Lock()
        self.trust_lora_paths = True  # as Editor: the app sets False, so clients name library LoRAs only

    # ---- what the UI reads -------------------------------------------------------------------------------
    @property
    def model_spec(self) -> str:
        return self.options.model_spec


    @property
    def allow_pickle(self) -> bool:
        return self.options.allow_pickle

    @property
    def resolution(self) -> int | None:
        return self.options.resolution

    def load(self, progress=None):
        """What the front end needs of the model (its tokenizer); the weights stay on the replicas."""
        if self._bundle is None:
            self._bundle = SimpleNamespace(tokenizer=self._call("tokenizer", None), model_spec=self.model_spec)
        return self._bundle

    bundle = property(lambda self: self._bundle)

    def clear_caches(self) -> None:
        """Every replica forgets its per-image caches before its next request (cleared lazily, by time)."""
        self._cleared_at = time.time()

    @property
    def concurrency(self) -> int:
        """Engine calls worth having in flight: two per replica (one running, one waiting to start at once)."""
        return 2 * _replica_count(self.app)

    def running(self) -> dict[int, str]:
        """Caller thread id -> the replica running that thread's call, for the calls in flight."""
        with self._lock:
            return dict(self._running)

    # ---- engine calls ---------------------------------------------------------------------------------
    def _loras(self, loras, trusted: bool | None) -> dict:
        """The LoRA arguments of an engine call; the replica's Editor checks them (paths only when trusted)."""
        return {"loras": tuple(loras or ()), "trusted": self.trust_lora_paths if trusted is None else bool(trusted)}

    def edit(self, request, progress: Progress | None = None, cancel=None, loras=(), *,
             trusted: bool | None = None) -> EditResult:
        return self._stream("edit", (request,), self._loras(loras, trusted), routing_key(request), progress,
                            cancel)

    def edit_routed(self, request, key: str | None, loras=(), *, trusted: bool | None = None) -> EditResult:
        """``edit`` with an explicit routing key (None: Serve's load balancing only)."""
        return self._stream("edit", (request,), self._loras(loras, trusted), key, None, None)

    def drag(self, request: DragRequest, progress: Progress | None = None, cancel=None, loras=(), *,
             trusted: bool | None = None) -> EditResult:
        if not isinstance(request, DragRequest):
            raise EditError("drag() takes a DragRequest.")
        return self.edit(request, progress, cancel, loras, trusted=trusted)

    def generate(self, prompt: str, seed: int | None = None, size: tuple[int, int] | None = None,
                 guidance_scale: float | None = None, n_inference_steps: int | None = None,
                 progress: Progress | None = None, cancel=None) -> EditResult:
        from editing.generation import GenerateRequest

        w, h = size or (0, 0)
        given = {"seed": seed, "guidance_scale": guidance_scale, "n_inference_steps": n_inference_steps}
        req = GenerateRequest(prompt, width=w, height=h, **{k: v for k, v in given.items() if v is not None})
        return self.edit(req, progress, cancel)

    def train_identity_lora(self, image, prompt: str = "", steps: int | None = None, rank: int | None = None,
                            lr: float | None = None, seed: int | None = None, progress: Progress | None = None,
                            cancel=None, loras=(), *, trusted: bool | None = None) -> None:
        self._stream("train_identity_lora", (image, prompt, steps, rank, lr, seed), self._loras(loras, trusted),
                     routing_key(image) if isinstance(image, Image.Image) else None, progress, cancel)

    def replay(self, recipe: dict, progress: Progress | None = None, cancel=None, *,
               trusted: bool | None = None) -> EditResult:
        if not isinstance(recipe, dict) or "task" not in recipe:
            raise EditError("This is not a DragCanvas recipe (no 'task' field).")
        trusted = self.trust_lora_paths if trusted is None else bool(trusted)
        return self._stream("replay", (recipe,), {"trusted": trusted}, _recipe_key(recipe), progress, cancel)

    def generation_of(self, image: Image.Image):
        return None if image is None else self._call("generation_of", routing_key(image), image)

    def is_drag_ready(self, image: Image.Image) -> bool:
        return image is not None and bool(self._call("is_drag_ready", routing_key(image), image))

    def stats(self, image: Image.Image | None = None) -> dict:
        """Counts of the replica ``image`` routes to (any replica without an image)."""
        return self._call("stats", routing_key(image) if image is not None else None)

    # ---- transport ----------------------------------------------------------------------------------------
    def _routed(self, key: str | None, **options):
        if self.affinity and key:
            options["multiplexed_model_id"] = key
        return self._handle.options(**options)

    def _call(self, method: str, key: str | None, *args):
        try:
            return getattr(self._routed(key), method).remote(*args).result(timeout_s=CALL_TIMEOUT_S)
        except GONE as e:
            raise EditError(f"The replica answering {method} stopped ({type(e).__name__}); try again.") from None
        except TimeoutError:
            raise EditError(f"The deployment did not answer {method} within {CALL_TIMEOUT_S:.0f} s: is it "
                            "running (`serve status`)?") from None

    def _stream(self, method: str, args: tuple, kwargs: dict, key: str | None, progress, cancel):
        notices = []
        for attempt in range(self.retries + 1):
            try:
                result = self._attempt(method, args, kwargs, key, progress, cancel)
            except GONE as e:
                if cancel is not None and cancel.is_set():
                    raise EditCancelled("Cancelled.") from None
                if "out of memory" in str(e).lower() or "oom" in str(e).lower().split():
                    raise EditError(HOST_OOM) from None  # a retry would take down a second replica the same way
                if attempt < self.retries:
                    log.warning("replica died during %s (%s); retrying", method, type(e).__name__)
                    notices.append(f"The replica running this edit stopped ({type(e).__name__}); "
                                   "it was run again on another replica.")
                    continue
                raise EditError(f"The replica running this edit stopped ({type(e).__name__}) and the retry failed "
                                "too; the deployment replaces dead replicas: try again in a minute.") from None
            if isinstance(result, EditResult):
                result.notices = notices + result.notices
            return result

    def _attempt(self, method: str, args: tuple, kwargs: dict, key: str | None, progress, cancel):
        """One try: stream the replica's events to ``progress``, watch ``cancel``, return the outcome."""
        gen = self._routed(key, stream=True).call.remote(method, args, kwargs, self._cleared_at)
        events: queue.Queue = queue.Queue()

        def pump():  # the generator blocks: read it in a helper thread, the caller's thread polls Cancel
            try:
                for ev in gen:
                    events.put(ev)
                events.put(("eos",))
            except BaseException as e:
                events.put(("raised", e))

        threading.Thread(target=pump, name="serve-stream", daemon=True).start()
        me, cancelled, started = threading.get_ident(), False, False
        next_check = time.monotonic() + ALIVE_CHECK_S
        try:
            while True:
                if cancel is not None and cancel.is_set() and not cancelled:
                    cancelled = True
                    gen.cancel()  # Serve raises CancelledError on the replica: its run stops at the next step
                try:
                    ev = events.get(timeout=POLL_S)
                except queue.Empty:
                    # Not yet on a replica: is the deployment still there? (Once started, the replica answers,
                    # drains on shutdown, or dies, which the stream reports.)
                    if not started and time.monotonic() > next_check:
                        next_check = time.monotonic() + ALIVE_CHECK_S
                        if not cluster.app_alive(self.app):
                            gen.cancel()
                            raise EditError(f"The DragCanvas deployment {self.app!r} is gone; restart "
                                            "`python -m editing.serve`.") from None
                    continue
                kind = ev[0]
                if kind == "started":
                    started = True
                    with self._lock:
                        self._running[me] = ev[1]
                elif kind == "progress":
                    if progress is not None:
                        progress(ev[1], ev[2], ev[3])
                elif kind == "preview":
                    show = getattr(progress, "preview", None)
                    if show is not None:
                        show(ev[1], ev[2])
                elif kind == "result":
                    return ev[1]
                elif kind == "cancelled":
                    raise EditCancelled(ev[1])
                elif kind == "error":
                    raise EditError(ev[1])
                elif kind == "failure":
                    raise RuntimeError(ev[1])
                elif kind == "eos":
                    raise EditCancelled("Cancelled.") if cancelled else RuntimeError(
                        f"The replica ended {method} without an answer.")
                elif kind == "raised":
                    err = ev[1]
                    if cancelled or isinstance(err, (TaskCancelledError, serve.exceptions.RequestCancelledError)):
                        raise EditCancelled("Cancelled.") from None
                    if isinstance(err, OutOfMemoryError):
                        raise EditError(HOST_OOM) from None
                    raise err
        finally:
            with self._lock:
                self._running.pop(me, None)


# ---- batches ---------------------------------------------------------------------------------------------
def map_edits(requests: Sequence, *, address: str | None = "auto", app: str = APP_NAME, editor: RemoteEditor | None = None,
              concurrency: int | None = None, loras=(), return_errors: bool = False) -> list:
    """Run ``requests`` on the deployment's replicas at once and return their ``EditResult``s in order, for
    batch evaluation. The requests of an image that occurs more than once run one after another with its
    routing key (the same replica, its caches); the others go wherever Serve's load balancing sends them (a key
    no replica holds yet would pile new images onto the replica that holds the fewest).
    ``concurrency``: calls in flight (default: two per replica). An ``EditError`` is raised, or with
    ``return_errors`` put in the sample's place."""
    editor = editor or RemoteEditor(address, app=app)
    keys = [routing_key(r) for r in requests]
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k if k is not None else ("single", i), []).append(i)
    results: list = [None] * len(requests)

    def run_group(indices: list[int]) -> None:
        key = keys[indices[0]] if len(indices) > 1 else None
        for i in indices:
            try:
                results[i] = editor.edit_routed(requests[i], key, loras=loras)
            except EditError as e:
                if not return_errors:
                    raise
                results[i] = e

    with ThreadPoolExecutor(max(1, int(concurrency or editor.concurrency)), thread_name_prefix="map-edits") as pool:
        for f in [pool.submit(run_group, g) for g in groups.values()]:
            f.result()
    return results


def _replica_count(app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None:
        return 1
    return sum(sum(d.replica_states.values()) for d in status.deployments.values()) or 1
