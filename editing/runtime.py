"""What every task shares: the result type, the per-request run (timing, UNet-call counting,
progress, cancel), recipe encoding, and the task registry the Editor dispatches through.

A task is one edit kind (``drag``, ``move``, ``sketch``, …). Its module registers it::

    register(Task("sketch", SketchRequest, run=run_sketch, from_recipe=sketch_from_recipe))

``run(ctx, request) -> EditResult`` executes it with an ``EditContext`` (editing/context.py: the loaded
bundle, this request's ``Run``, the caches, the active LoRAs; the Editor holds the lock around it);
``from_recipe(recipe)`` rebuilds the request from the JSON a result carried, so ``Editor.replay``
works for every task.
"""
from __future__ import annotations

import base64
import contextlib
import importlib
import io
import logging
import platform
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.errors import EditCancelled, EditError

log = logging.getLogger(__name__)

Progress = Callable[[str, float, str], None]  # (phase, fraction 0..1, message)
RECIPE_VERSION = 1


@dataclass
class EditResult:
    image: Image.Image
    recipe: dict
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    unet_calls: dict[str, int] = field(default_factory=dict)  # phase -> NFE (batch elements)
    notices: list[str] = field(default_factory=list)
    final_points: list[tuple[float, float]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)  # a batch (image is images[0]); empty = [image]
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific facts (e.g. memory-bank size)

    @property
    def total_s(self) -> float:
        return sum(self.timings.values())

    @property
    def all_images(self) -> list[Image.Image]:
        return self.images or [self.image]


class Run:
    """Timing, NFE counting and progress for one request.

    ``with run.step("phase"):`` times a phase (CUDA-synchronised) and attributes UNet calls to it;
    ``run.report(frac, msg)`` reports progress and raises ``EditCancelled`` once Cancel was pressed;
    ``run.preview(step, image)`` and ``run.trail(points)`` pass intermediate images and handle positions on to a
    progress callback that has ``preview`` / ``trail`` methods (``wants_previews`` / ``wants_trail`` say whether
    one does, so nobody pays for what nobody shows).
    Extra modules (ControlNet, adapters) can be counted with ``run.count_module(module, "controlnet")``.
    A CUDA-graph replay of the UNet bypasses ``Module.__call__``: ``Run.counting(unet)`` finds the run counting
    that UNet and ``count_replay`` counts the call; ``paused()`` keeps graph warm-up and capture passes out.
    """

    def __init__(self, unet, progress: Progress | None, cancel):
        self.timings: dict[str, float] = {}
        self.nfe: dict[str, int] = {}
        self.calls: dict[str, dict[str, int]] = {}  # other counted modules: name -> phase -> calls
        self.phase = "setup"
        self.progress, self.cancel = progress, cancel
        self._paused = False
        self._unet = unet
        self._hooks = [unet.register_forward_pre_hook(self._counter(self.nfe, pausable=True), with_kwargs=True)]
        _COUNTING[unet] = self

    @staticmethod
    def counting(unet) -> Run | None:
        """The run counting ``unet``'s calls right now, if any."""
        return _COUNTING.get(unet)

    def _add(self, table: dict, batch: int) -> None:
        table[self.phase] = table.get(self.phase, 0) + int(batch)

    def _counter(self, table: dict, pausable: bool = False):
        def count(module, args, kwargs):
            if not (pausable and self._paused):
                self._add(table, (args[0] if args else kwargs["sample"]).shape[0])

        return count

    def count_replay(self, batch: int) -> None:
        """Count one UNet call of ``batch`` elements that ran as a CUDA-graph replay."""
        self._add(self.nfe, batch)

    @contextlib.contextmanager
    def paused(self):
        """UNet calls inside are not evaluations of the method (graph warm-up and capture): not counted."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def count_unet(self, unet: torch.nn.Module) -> None:
        """Count another UNet's calls as evaluations of the method too (an inpainting model beside the base)."""
        if unet is not self._unet:
            self._hooks.append(unet.register_forward_pre_hook(self._counter(self.nfe, pausable=True), with_kwargs=True))

    def count_module(self, module: torch.nn.Module, name: str) -> None:
        """Also count the batch elements ``module`` is called with (removed by ``close``)."""
        table = self.calls.setdefault(name, {})
        self._hooks.append(module.register_forward_pre_hook(self._counter(table), with_kwargs=True))

    @contextlib.contextmanager
    def step(self, name: str):
        self.phase = name
        self.report(0.0, "")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def report(self, frac: float, msg: str = ""):
        if self.cancel is not None and self.cancel.is_set():
            raise EditCancelled("Cancelled.")
        if self.progress:
            self.progress(self.phase, float(frac), msg)

    def preview(self, step: int, image) -> None:
        """Hand an intermediate image (e.g. a training preview after ``step`` steps) to the progress callback,
        when it takes images (has a ``preview(step, image)`` method, as the UI's callbacks do)."""
        show = getattr(self.progress, "preview", None)
        if show is not None:
            show(step, image)

    @property
    def wants_previews(self) -> bool:
        """Whether ``preview`` reaches anyone: intermediate images are made only then (they cost decodes)."""
        return getattr(self.progress, "preview", None) is not None

    def trail(self, points) -> None:
        """Hand the current handle positions, ``[(x, y), ...]`` in the user's image pixels, to the progress callback
        when it draws them (has a ``trail(points)`` method): the path of a drag's optimisation, step by step."""
        show = getattr(self.progress, "trail", None)
        if show is not None:
            show([(float(x), float(y)) for x, y in points])

    @property
    def wants_trail(self) -> bool:
        return getattr(self.progress, "trail", None) is not None

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if _COUNTING.get(self._unet) is self:
            del _COUNTING[self._unet]


_COUNTING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet -> the Run counting its calls


# ---- recipes ---------------------------------------------------------------------------------------
def encode_image(img: Image.Image) -> str:
    """PNG bytes as base64 text, for recipes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(s: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")
    except Exception as e:
        raise EditError(f"The recipe holds a damaged image ({type(e).__name__}).") from None


def encode_mask(mask: np.ndarray | None) -> str | None:
    return None if mask is None else encode_image(Image.fromarray(mask.astype(np.uint8) * 255))


def decode_mask(s: str | None) -> np.ndarray | None:
    return None if not s else np.asarray(decode_image(s).convert("L")) > 127


def versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


# ---- tasks -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str
    request_type: type
    run: Callable  # (ctx: EditContext, request) -> EditResult
    from_recipe: Callable[[dict], Any]  # recipe -> request
    aliases: tuple[str, ...] = ()  # other names old recipes carry
    # Whether the task can run an inpainting model's 9-channel UNet; the Editor refuses an inpainting model to the
    # others (models.families.inpaint_input builds that input).
    uses_inpainting_unet: bool = False


TASKS: dict[str, Task] = {}  # name or alias -> task
# Modules that register tasks; imported by the Editor on construction.
TASK_MODULES = ("editing.drag", "editing.guidance", "editing.generation", "editing.dreambooth")


def register(task: Task) -> Task:
    for name in (task.name, *task.aliases):
        TASKS[name] = task
    return task


def task_for(request) -> Task:
    for t in TASKS.values():
        if type(request) is t.request_type:
            return t
    raise EditError(f"No task takes a {type(request).__name__}.")


def load_task_modules() -> None:
    for name in TASK_MODULES:
        importlib.import_module(name)
