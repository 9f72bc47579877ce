"""The Editor: routes typed requests to task modules, owns the per-image caches, replays recipes.

One Editor per process; the model bundle is loaded lazily on first use and shared. GPU work is
serialised with a lock (the UI also runs one queue), and every change to the shared UNet happens
inside a context manager that undoes it. A task gets an ``EditContext`` (editing/context.py), never
the Editor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable

import torch
from PIL import Image

from editing.context import Caches, EditContext, EngineOptions, Generated
from editing.drag import DragRequest, IdentityLoraRequest
from editing.runtime import TASKS, EditResult, Progress, Run, load_task_modules, task_for
from models.errors import EditError

log = logging.getLogger(__name__)


def _check_unet_fits(bundle, task) -> None:
    """The one place an inpainting model (9-channel UNet) is refused to a task that feeds its UNet 4 channels."""
    if not bundle.family.inpainting or getattr(task, "uses_inpainting_unet", False):
        return
    from models.loader import base_model_for

    what = f"the {task.name} task" if task is not None else "identity LoRA training"
    raise EditError(f"{bundle.name!r} is a {bundle.family.label} model (9-channel UNet), which {what} cannot use: "
                    f"run it with its base model instead, e.g. --model {base_model_for(bundle)}.")


class Editor:
    """Entry point of the engine: ``Editor("tiny").edit(DragRequest(...))``."""

    def __init__(self, model_spec: str = "auto", *, allow_pickle: bool = False, max_side: int = 2048,
                 device: str | None = None, dtype: torch.dtype | None = None, offload: bool = False,
                 resolution: int | None = None, lora_checkpointing: bool = False, bank_on_cpu: bool = False,
                 trust_lora_paths: bool = True, preview_decoder: str | None = None, inpaint_model: str | None = None):
        """``trust_lora_paths``: whether the ``loras`` of a request may be server paths (and, with
        ``allow_pickle``, pickles). True for the CLI and scripts; the app passes False, so its clients (UI and
        API) choose LoRAs by library name only (editing/lora_library/files.py). A call's ``trusted=`` overrides."""
        from models.choose import resolve_auto

        self.banner = ""
        if model_spec == "auto":
            model_spec, self.banner = resolve_auto()
        self.options = EngineOptions(model_spec, allow_pickle, int(max_side), resolution, lora_checkpointing,
                                     bank_on_cpu, preview_decoder, inpaint_model)
        self.device, self.dtype, self.offload = device, dtype, offload
        self.trust_lora_paths = bool(trust_lora_paths)
        self.caches = Caches()
        self._bundle = None
        self._lock = threading.RLock()
        load_task_modules()

    # ---- model -------------------------------------------------------------------------------
    @property
    def model_spec(self) -> str:
        return self.options.model_spec

    @property
    def family_label(self) -> str | None:
        """"SDXL", "Stable Diffusion 1.x", … of the model (read from its configs; None if only loading can tell)."""
        if self._bundle is not None:
            return self._bundle.family.label
        from models.choose import family_hint

        return family_hint(self.model_spec)

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
    def _trusted(self, trusted: bool | None) -> bool:
        return self.trust_lora_paths if trusted is None else bool(trusted)

    def _options_for(self, trusted: bool | None) -> EngineOptions:
        """The options a request runs with: an untrusted caller's never allow pickles, so ``--allow-pickle`` (the
        operator's trust in their own files) cannot reach a file a client named (a LoRA, ControlNet, adapter)."""
        if self._trusted(trusted) or not self.options.allow_pickle:
            return self.options
        return dataclasses.replace(self.options, allow_pickle=False)

    def check_loras(self, loras, trusted: bool | None = None) -> tuple[tuple[str, float], ...]:
        """``loras`` as a request carries them, checked before any work: at most ``MAX_LORAS``, finite weights,
        and for an untrusted caller library names of existing LoRAs only. Raises EditError."""
        from editing.lora_library import check_loras, library_file

        checked = tuple((str(spec), w) for spec, w in check_loras(loras))
        if not self._trusted(trusted):
            for spec, _ in checked:
                library_file(spec)
        return checked

    @contextlib.contextmanager
    def _context(self, progress: Progress | None, cancel, loras, trusted: bool | None = None, task=None):
        """Lock, loaded bundle, a fresh ``Run`` and the chosen LoRAs active on the UNet, for one request of ``task``
        (None: the identity LoRA training, a base-model job)."""
        active = self.check_loras(loras, trusted)  # before the lock: a bad list never waits for the GPU
        with self._lock:
            b = self.load(progress=(lambda m: progress("load", 0.0, m)) if progress else None)
            _check_unet_fits(b, task)
            run = Run(b.unet, progress, cancel)
            try:
                with contextlib.ExitStack() as stack:
                    if active:
                        from editing.lora_library import activate

                        stack.enter_context(activate(b, active, allow_pickle=self.allow_pickle,
                                                     trusted=self._trusted(trusted)))
                    yield EditContext(b, run, self.caches, self._options_for(trusted), active)
            finally:
                run.close()

    def edit(self, request, progress: Progress | None = None, cancel=None, loras=(), *,
             trusted: bool | None = None) -> EditResult:
        """Run any registered task's request (drag, move, sketch, …). ``loras``: ((path or name, weight), …)
        LoRAs active for this edit (the identity LoRA of a drag stacks on top). ``trusted``: whether ``loras``
        may name server paths (None = the Editor's ``trust_lora_paths``; the app's clients: False)."""
        task = task_for(request)
        with self._context(progress, cancel, loras, trusted, task) as ctx:
            return task.run(ctx, request)

    def drag(self, request: DragRequest, progress: Progress | None = None, cancel=None, loras=(), *,
             trusted: bool | None = None) -> EditResult:
        """DragDiffusion edit: (identity LoRA) → DDIM inversion → latent optimisation → denoise."""
        if not isinstance(request, DragRequest):
            raise EditError("drag() takes a DragRequest.")
        return self.edit(request, progress, cancel, loras, trusted=trusted)

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
                            cancel=None, loras=(), *, trusted: bool | None = None) -> None:
        """Train (or find cached) the identity LoRA a later drag of ``image`` will use; ``loras`` as in ``edit``
        (the identity LoRA is trained on top of them, as the drag will). ``None`` = the drag's default."""
        from editing.drag import dragdiffusion

        req = IdentityLoraRequest(image, prompt, steps, rank, lr, seed)
        with self._context(progress, cancel, loras, trusted) as ctx:
            work, _, _ = ctx.fit(req.image)
            dragdiffusion.identity_lora(ctx, work, req.prompt, req)

    # ---- generations ---------------------------------------------------------------------------
    def generation_of(self, image: Image.Image) -> Generated | None:
        """What a generation kept for this exact image (its trajectory), if anything."""
        return self.caches.generation_of(image)

    def is_drag_ready(self, image: Image.Image) -> bool:
        return self.generation_of(image) is not None

    # ---- recipes -----------------------------------------------------------------------------
    def replay(self, recipe: dict, progress: Progress | None = None, cancel=None, *,
               trusted: bool | None = None) -> EditResult:
        """Re-run a recipe produced by this engine (a generation first, when the edit started from one).
        ``trusted`` as in ``edit``: a recipe a client sent may name LoRAs by library name only."""
        if not isinstance(recipe, dict) or "task" not in recipe:
            raise EditError("This is not a DragCanvas recipe (no 'task' field).")
        if recipe.get("model") not in (None, self.model_spec):
            log.warning("recipe was made with %s; replaying with %s", recipe.get("model"), self.model_spec)
        task = recipe["task"]
        if task not in TASKS:
            raise EditError(f"Unknown recipe task {task!r}.")
        if recipe.get("generated"):  # the edit started from an image generated here: make it drag-ready again
            self.replay(recipe["generated"], progress=progress, cancel=cancel, trusted=trusted)
        try:
            request = TASKS[task].from_recipe(recipe)
        except (KeyError, ValueError, TypeError) as e:
            raise EditError(f"The recipe is incomplete or damaged ({type(e).__name__}: {e}).") from None
        try:
            loras = [tuple(x) for x in recipe.get("loras") or ()]
        except TypeError:
            raise EditError("The recipe's 'loras' field is damaged: it must be a list of [name, weight].") from None
        return self.edit(request, progress, cancel, loras=loras, trusted=trusted)

