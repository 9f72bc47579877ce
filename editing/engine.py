"""The Editor: routes typed requests to task modules, owns the per-image caches, replays recipes.

One Editor per process; the model bundle is loaded lazily on first use and shared. GPU work is
serialised with a lock (the UI also runs one queue), and every change to the shared UNet happens
inside a context manager that undoes it. A task gets an ``EditContext`` (editing/context.py), never
the Editor.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import torch
from PIL import Image

from editing.context import Caches, EditContext, EngineOptions, Generated
from editing.requests import DragRequest, EditError, IdentityLoraRequest
from editing.runtime import TASKS, EditResult, Progress, Run, load_task_modules, task_for

log = logging.getLogger(__name__)


class Editor:
    """Entry point of the engine: ``Editor("tiny").edit(DragRequest(...))``."""

    def __init__(self, model_spec: str = "auto", *, allow_pickle: bool = False, max_side: int = 2048,
                 device: str | None = None, dtype: torch.dtype | None = None, offload: bool = False,
                 resolution: int | None = None, lora_checkpointing: bool = False, bank_on_cpu: bool = False):
        from models.loader import resolve_auto

        self.banner = ""
        if model_spec == "auto":
            model_spec, self.banner = resolve_auto()
        self.options = EngineOptions(model_spec, allow_pickle, int(max_side), resolution, lora_checkpointing,
                                     bank_on_cpu)
        self.device, self.dtype, self.offload = device, dtype, offload
        self.caches = Caches()
        self._bundle = None
        self._lock = threading.RLock()
        load_task_modules()

    # ---- model -------------------------------------------------------------------------------
    @property
    def model_spec(self) -> str:
        return self.options.model_spec

    model_name = model_spec

    @property
    def allow_pickle(self) -> bool:
        return self.options.allow_pickle

    @property
    def resolution(self) -> int | None:
        return self.options.resolution

    @property
    def bundle(self):
        """The loaded ModelBundle (None before ``load``)."""
        return self._bundle

    def load(self, progress: Callable[[str], None] | None = None):
        """Load (once) and return the ModelBundle."""
        from models.loader import load_bundle

        with self._lock:
            if self._bundle is None:
                self._bundle = load_bundle(self.model_spec, allow_pickle=self.allow_pickle, device=self.device,
                                           dtype=self.dtype, offload=self.offload, progress=progress)
            return self._bundle

    def clear_caches(self) -> None:
        """Forget per-image latents, LoRAs, inversions, memory banks and generations (the model stays loaded)."""
        self.caches.clear()

    # ---- running tasks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self, progress: Progress | None, cancel, loras):
        """Lock, loaded bundle, a fresh ``Run`` and the chosen LoRAs active on the UNet, for one request."""
        with self._lock:
            b = self.load(progress=(lambda m: progress("load", 0.0, m)) if progress else None)
            run = Run(b.unet, progress, cancel)
            active = tuple((str(p), float(w)) for p, w in (loras or ()))
            try:
                with contextlib.ExitStack() as stack:
                    if active:
                        from editing.lora_library import activate

                        stack.enter_context(activate(b, active, allow_pickle=self.allow_pickle))
                    yield EditContext(b, run, self.caches, self.options, active)
            finally:
                run.close()

    def edit(self, request, progress: Progress | None = None, cancel=None, loras=()) -> EditResult:
        """Run any registered task's request (drag, move, sketch, …). ``loras``: ((path or name, weight), …)
        LoRAs active for this edit (the identity LoRA of a drag stacks on top)."""
        task = task_for(request)
        with self._context(progress, cancel, loras) as ctx:
            return task.run(ctx, request)

    def drag(self, request: DragRequest, progress: Progress | None = None, cancel=None, loras=()) -> EditResult:
        """DragDiffusion edit: (identity LoRA) → DDIM inversion → latent optimisation → denoise."""
        if not isinstance(request, DragRequest):
            raise EditError("drag() takes a DragRequest.")
        return self.edit(request, progress, cancel, loras)

    def generate(self, prompt: str, seed: int | None = None, size: tuple[int, int] | None = None,
                 guidance_scale: float | None = None, n_inference_steps: int | None = None,
                 progress: Progress | None = None, cancel=None) -> EditResult:
        """Text-to-image (a ``GenerateRequest`` without units); the result is drag-ready. ``None`` = the
        request's default."""
        from editing.generation import GenerateRequest

        w, h = size or (0, 0)
        given = {"seed": seed, "guidance_scale": guidance_scale, "n_inference_steps": n_inference_steps}
        req = GenerateRequest(prompt, width=w, height=h, **{k: v for k, v in given.items() if v is not None})
        return self.edit(req, progress, cancel)

    def train_identity_lora(self, image, prompt: str = "", steps: int | None = None, rank: int | None = None,
                            lr: float | None = None, seed: int | None = None, progress: Progress | None = None,
                            cancel=None, loras=()) -> None:
        """Train (or find cached) the identity LoRA a later drag of ``image`` will use; ``loras`` as in ``edit``
        (the identity LoRA is trained on top of them, as the drag will). ``None`` = the drag's default."""
        from editing import drag_diffusion

        req = IdentityLoraRequest(image, prompt, steps, rank, lr, seed)
        with self._context(progress, cancel, loras) as ctx:
            work, _, _ = ctx.fit(req.image)
            drag_diffusion.identity_lora(ctx, work, req.prompt, req)

    # ---- generations ---------------------------------------------------------------------------
    def generation_of(self, image: Image.Image) -> Generated | None:
        """What a generation kept for this exact image (its trajectory), if anything."""
        return self.caches.generation_of(image)

    def is_drag_ready(self, image: Image.Image) -> bool:
        return self.generation_of(image) is not None

    # ---- recipes -----------------------------------------------------------------------------
    def replay(self, recipe: dict, progress: Progress | None = None, cancel=None) -> EditResult:
        """Re-run a recipe produced by this engine (a generation first, when the edit started from one)."""
        if not isinstance(recipe, dict) or "task" not in recipe:
            raise EditError("This is not a DragCanvas recipe (no 'task' field).")
        if recipe.get("model") not in (None, self.model_spec):
            log.warning("recipe was made with %s; replaying with %s", recipe.get("model"), self.model_spec)
        task = recipe["task"]
        if task not in TASKS:
            raise EditError(f"Unknown recipe task {task!r}.")
        if recipe.get("generated"):  # the edit started from an image generated here: make it drag-ready again
            self.replay(recipe["generated"], progress=progress, cancel=cancel)
        try:
            request = TASKS[task].from_recipe(recipe)
        except (KeyError, ValueError, TypeError) as e:
            raise EditError(f"The recipe is incomplete or damaged ({type(e).__name__}: {e}).") from None
        return self.edit(request, progress, cancel, loras=[tuple(x) for x in recipe.get("loras") or ()])

