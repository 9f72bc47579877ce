"""What every tab shares: per-session history, the error wrapper, progress, Cancel, and widgets built
from the engine's field tables (``name -> (min, max, default, why)``).

No default of a request field is written in ui/: sliders and fallbacks read them from those tables
(editing.requests, editing.generation), so the engine and the UI cannot disagree.
"""
from __future__ import annotations

import functools
import logging
import math
import random
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from editing.generation import GENERATE_FIELDS
from editing.images import save_png_with_recipe
from editing.requests import GUIDED_DEFAULTS, GUIDED_FIELDS, EditCancelled, EditError
from ui import overlay
from ui.zerogpu import zero_gpu

log = logging.getLogger(__name__)

GPU_SECONDS = {"drag": 180, "generate": 60, "lora": 120, "sketch": 120, "text_to_image": 120}  # ZeroGPU reservations
# The mask canvases (Drag, Move, Paste, Appearance): one fixed translucent magenta brush, no layers.
MASK_CANVAS = dict(type="numpy", image_mode="RGBA", format="png", sources=("upload", "clipboard"), transforms=(),
                   layers=False, brush=gr.Brush(colors=[("#ff2bd6", 0.5)], color_mode="fixed"))


# ---- per-session history ----------------------------------------------------------------------------
class History:
    """One browser tab's results, kept in gr.State: files in a temp folder, newest last, one selected.
    Models live in the engine, never here."""

    LIMIT = 24  # results kept per tab

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.history: list[dict] = []
        self.selected: int | None = None  # history index picked in the gallery
        self.cancel = threading.Event()  # set by Cancel; the engine polls it
        self._dir: Path | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its initial value for every new tab
        return type(self)(self.prefix)

    @property
    def dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"dragcanvas-{self.prefix}-" if self.prefix else "dragcanvas-"))
        return self._dir

    def close(self) -> None:
        """Called by gr.State when the tab is gone: delete this session's files."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def save_png(self, image: Image.Image, name: str, recipe: dict | None = None) -> str:
        return str(save_png_with_recipe(image, self.dir / name, recipe))

    def _keep_newest(self) -> None:
        del self.history[:-self.LIMIT]
        self.selected = len(self.history) - 1


class BeforeAfter(History):
    """Edits of a picture (Drag, Move, Paste, Appearance): each entry keeps its input for the before/after view."""

    def add_result(self, before: Image.Image | None, result, caption: str, details: dict) -> None:
        n = len(self.history) + 1
        after = self.save_png(result.image, f"dragcanvas-{n:03d}.png", result.recipe)
        before_path = self.save_png(before, f"before-{n:03d}.png") if before is not None else after
        self.history.append({"before": before_path, "after": after, "recipe": result.recipe,
                             "caption": f"{n}: {caption}", "details": details})
        self._keep_newest()

    def gallery(self) -> list[tuple[str, str]]:
        return [(e["after"], e["caption"]) for e in self.history]

    def shown(self):
        """(before/after pair, download path, details) of the selected result."""
        if self.selected is None or not self.history:
            return None, None, None
        e = self.history[self.selected]
        return (e["before"], e["after"]), e["after"], e["details"]


class Results(History):
    """Generated pictures (Sketch, Generate): every image of a batch is one entry with its own recipe."""

    LIMIT = 32

    def __init__(self, prefix: str = "result"):
        super().__init__(prefix)

    def add(self, result, caption: str, details: dict) -> None:
        recipes = result.extra.get("recipes") or [result.recipe] * len(result.all_images)
        for i, img in enumerate(result.all_images):
            n = len(self.history) + 1
            recipe = recipes[min(i, len(recipes) - 1)]
            path = self.save_png(img, f"{self.prefix}-{n:03d}.png", recipe)
            seed = recipe.get("params", {}).get("seed")
            self.history.append({"path": path, "caption": f"{n}: {caption}, seed {seed}", "details": details})
        self._keep_newest()

    def gallery(self) -> list[tuple[str, str]]:
        return [(e["path"], e["caption"]) for e in self.history]

    def current(self) -> str | None:
        if not self.history:
            return None
        return self.history[-1 if self.selected is None else min(self.selected, len(self.history) - 1)]["path"]

    def shown(self):
        """(download path, details) of the selected image."""
        if not self.history:
            return None, None
        e = self.history[-1 if self.selected is None else self.selected]
        return e["path"], e["details"]


def on_select(history: History, evt: gr.SelectData):
    """A gallery pick: show that entry (its ``shown()``)."""
    history.selected = evt.index if isinstance(evt.index, int) else None
    return history.shown()


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
def _to_ui_error(fn, e: Exception):
    """Raise what the browser shows for ``e`` (called in an ``except``): EditError -> gr.Error with its one-line
    message; a gr.Error as is; anything else is logged and named in one line."""
    if isinstance(e, EditError):
        raise gr.Error(str(e)) from None
    if isinstance(e, gr.Error):
        raise e
    log.exception("%s failed", fn.__name__)
    raise gr.Error(f"Unexpected error ({type(e).__name__}: {e}). The app is still running; "
                   "details are in the server log.") from None


def shows_errors(fn):
    """EditError -> gr.Error with its one-line message; Cancel -> a warning; other errors are logged.

    Inputs are never cleared by a failed run, and the app keeps serving.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EditCancelled as e:
            gr.Warning(f"{e} Your image, mask and points are unchanged.")
            return gr.skip()
        except Exception as e:
            _to_ui_error(fn, e)

    return wrapper


def streams_errors(n_outputs: int):
    """``shows_errors`` for generator handlers with ``n_outputs`` outputs (Cancel leaves all of them as they are)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except EditCancelled as e:
                gr.Warning(str(e))
                yield tuple(gr.skip() for _ in range(n_outputs))
            except Exception as e:
                _to_ui_error(fn, e)

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
        return history.cancel if self.can_cancel else None


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


# ---- widgets from the field tables ------------------------------------------------------------------------
def field_input(name: str, spec: tuple, value, elem_id: str, label: str | None = None) -> gr.components.Component:
    """A slider (or a number box for wide integer ranges, e.g. seeds) for a ``(min, max, default, why)`` entry."""
    lo, hi, default, why = spec
    label = label or name.replace("_", " ").capitalize()
    if isinstance(default, int) and hi - lo > 10_000:  # seeds: a slider would be useless
        return gr.Number(value=value, minimum=lo, maximum=hi, precision=0, label=label, info=why, elem_id=elem_id)
    return gr.Slider(lo, hi, value=value, step=slider_step(spec), label=label, info=why, elem_id=elem_id)


def slider_step(spec: tuple) -> float:
    """1 for whole numbers; else one decade below the smallest meaningful value (the minimum, a hundredth of the
    range, a tenth of the default), e.g. 1e-5 for a learning rate in [1e-5, 1e-2]."""
    lo, hi, default, _ = spec
    if isinstance(default, int):
        return 1
    return 10 ** math.floor(math.log10(min(v for v in (lo, hi / 100, default / 10) if v > 0)))


def guided_input(name: str, task: str = "drag") -> gr.components.Component:
    """A slider for a guided-method field, starting at ``task``'s published default (GUIDED_DEFAULTS)."""
    lo, hi, default, why = GUIDED_FIELDS[name]
    value = GUIDED_DEFAULTS[task].get(name, default)
    step = 1 if isinstance(default, int) else 0.05
    return gr.Slider(lo, hi, value=value, step=step, label=name.replace("_", " ").capitalize(), info=why,
                     elem_id=f"guided-{name}")
