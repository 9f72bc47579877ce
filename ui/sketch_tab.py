"""The Sketch tab: draw coloured strokes on a blank canvas or over a photo, then SDEdit turns them into pictures.

Handlers first (per-session state, instant handlers, the engine handler), layout, then wiring. The
Generate button calls the same ``/sketch`` endpoint API clients use::

    from gradio_client import Client, handle_file
    Client(url).predict(handle_file("drawing.png"), None, "a red house", "", "", strength=0.7,
                        n_inference_steps=30, api_name="/sketch")
    # sketch (RGB drawing, or RGBA strokes layer), photo under it or None, prompt, negative prompt,
    # scribble-assist ControlNet spec ("" = off), then any SketchRequest.FIELDS_UI value by name.

Results are drag-ready when strength is 1 (the whole trajectory exists); "Send to Drag" opens them there.
"""
from __future__ import annotations

import math
import random
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from editing.generation import SKETCH_FIELDS, SketchRequest
from editing.images import load_image, save_png_with_recipe
from editing.requests import EditError
from ui.drag_tab import EngineProgress, notify, request_cancel, shows_errors
from ui.zerogpu import gpu, zero_gpu

HISTORY_LIMIT = 32
GPU_SECONDS = 120
BRUSH_COLOURS = ["#000000", "#e03030", "#f0a020", "#f5e040", "#30a040", "#3070e0", "#8040c0", "#8b5a2b",
                 "#ffffff", "#87ceeb"]
STRENGTH_HELP = ("SDEdit t0: low keeps your strokes and colours (faithful), high lets the model redraw them "
                 "(realistic); 0 returns the sketch, 1 ignores it.")


# ---- per-session state (shared with the Generate tab) --------------------------------------------------
class Results:
    """One browser tab's results for a generation tab, kept in gr.State (models live in the engine)."""

    def __init__(self, prefix: str = "result"):
        self.prefix = prefix
        self.history: list[dict] = []  # newest last: {"path", "caption", "recipe", "details"}
        self.selected: int | None = None
        self.cancel = threading.Event()
        self._dir: Path | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its initial value for every new tab
        return type(self)(self.prefix)

    @property
    def dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"dragcanvas-{self.prefix}-"))
        return self._dir

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def save(self, image: Image.Image, name: str, recipe: dict | None = None) -> str:
        return str(save_png_with_recipe(image, self.dir / name, recipe))

    def add(self, result, caption: str, details: dict) -> None:
        """Every image of a (batch) result, each PNG with its own recipe (its seed)."""
        recipes = result.extra.get("recipes") or [result.recipe] * len(result.all_images)
        for i, img in enumerate(result.all_images):
            n = len(self.history) + 1
            path = self.save(img, f"{self.prefix}-{n:03d}.png", recipes[min(i, len(recipes) - 1)])
            seed = recipes[min(i, len(recipes) - 1)].get("params", {}).get("seed")
            self.history.append({"path": path, "caption": f"{n}: {caption}, seed {seed}", "details": details})
        del self.history[:-HISTORY_LIMIT]
        self.selected = len(self.history) - 1

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


def details_of(result) -> dict:
    return {"timings_s": {k: round(v, 3) for k, v in result.timings.items()}, "unet_calls": result.unet_calls,
            "other_calls": result.extra.get("calls"), "drag_ready": result.extra.get("drag_ready"),
            "notices": result.notices, "params": result.recipe.get("params")}


def status_line(result, what: str) -> str:
    n = len(result.all_images)
    ready = ("Drag-ready: send it to Drag and it drags at once (no inversion, no LoRA)."
             if result.extra.get("drag_ready") else "A drag of it will invert it like a photo (strength < 1).")
    return f"Done in {result.total_s:.1f} s: {n} {what}{'s' * (n > 1)}. {ready}"


def pick_seed(randomize: bool, seed):
    """Before a run: a fresh random seed when asked (shown, so it can be reused), else the seed as typed."""
    if randomize:
        return random.randrange(2**31 - 1)
    return gr.skip() if seed is not None else 42


def on_select(results: Results, evt: gr.SelectData):
    results.selected = evt.index if isinstance(evt.index, int) else None
    return results.shown()


def sender(links, tab_id: str):
    """(fn, outputs) that sends the selected result to ``tab_id`` via ui/links.py."""
    send, outputs = links.send_to(tab_id)
    return (lambda results: send(results.current())), outputs


# ---- canvas -> files --------------------------------------------------------------------------------
def split_canvas(value) -> tuple[Image.Image | None, Image.Image | None]:
    """ImageEditor value -> (sketch, photo under it or None).

    Strokes on layers become an RGBA strokes layer over the uploaded photo (or a blank canvas); an upload
    with no strokes on it is taken as a finished drawing (RGB)."""
    if not value:
        return None, None
    bg = value.get("background")
    strokes = None
    for layer in value.get("layers") or []:
        a = np.asarray(layer)
        if a.ndim == 3 and a.shape[2] == 4 and (a[..., 3] > 0).any():
            img = Image.fromarray(a.astype(np.uint8), "RGBA")
            strokes = img if strokes is None else Image.alpha_composite(strokes, img.resize(strokes.size))
    photo = None
    if bg is not None:
        a = np.asarray(bg)
        if a.ndim == 3 and a.shape[2] == 4 and a[..., 3].max() == 0:
            photo = None  # the blank canvas
        else:
            photo = Image.fromarray(a.astype(np.uint8)).convert("RGBA")
            photo = Image.alpha_composite(Image.new("RGBA", photo.size, (255, 255, 255, 255)), photo).convert("RGB")
            if strokes is None:
                return photo, None
            if np.asarray(photo).min() == 255:  # a white background is the blank canvas too
                photo = None
    if strokes is None:
        comp = value.get("composite")
        if comp is None:
            return None, None
        return Image.fromarray(np.asarray(comp).astype(np.uint8)).convert("RGBA"), None
    if photo is not None and photo.size != strokes.size:
        strokes = strokes.resize(photo.size, Image.NEAREST)
    return strokes, photo


def prepare_sketch(value, results: Results, randomize: bool, seed):
    """Run, step 1, instant: arm Cancel, write the sketch (and photo) for the /sketch endpoint, pick the seed."""
    results.cancel.clear()
    sketch, photo = split_canvas(value)
    sketch_path = results.save(sketch, "sketch.png") if sketch is not None else None
    photo_path = results.save(photo, "photo.png") if photo is not None else None
    return sketch_path, photo_path, pick_seed(randomize, seed)


def receive_image(path):
    """An image sent from another tab (or a result drawn over again) becomes the photo to draw over."""
    return path if path else gr.skip()


# ---- engine handler ----------------------------------------------------------------------------------
class SketchHandlers:
    def __init__(self, editor):
        self.editor = editor
        self.can_cancel = not zero_gpu()
        self._edit = gpu(GPU_SECONDS)(editor.edit)

    @shows_errors
    def sketch(self, sketch, photo, prompt, negative_prompt, scribble_controlnet, results: Results,
               progress=gr.Progress(), loras=None, **settings):  # noqa: B008 - gradio injects it
        """Sketch (+ optional photo under it) -> image(s) with SDEdit; returns gallery, download, details, status."""
        if not sketch:
            raise EditError("The sketch is blank: draw some strokes first (or upload a drawing).")
        req = SketchRequest(_open_sketch(sketch), load_image(photo) if photo else None, prompt=prompt or "",
                            negative_prompt=negative_prompt or "",
                            scribble_controlnet=(scribble_controlnet or "").strip() or None, **settings)
        notify(req.notices)
        result = self._edit(req, progress=EngineProgress(progress),
                            cancel=results.cancel if self.can_cancel else None, loras=lora_specs(loras))
        notify(result.notices[len(req.notices):])
        results.add(result, f"sketch, strength {req.strength:g}", details_of(result))
        return results.gallery(), *results.shown(), status_line(result, "image")


def lora_specs(value) -> list:
    """The LoRA picker's value (ui/lora_picker.py, issue 6) -> [(path, weight)]; nothing when there is no picker."""
    if not value:
        return []
    from ui.lora_picker import to_specs

    return list(to_specs(value))


def _open_sketch(path) -> Image.Image:
    """A sketch file: kept RGBA when it has transparency (a strokes layer), RGB otherwise."""
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # noqa: BLE001 - any unreadable upload is the user's to fix
        raise EditError(f"The sketch is not a readable image ({type(e).__name__}). Use PNG, JPEG or WebP.") from None
    rgba = img.convert("RGBA")
    return rgba if rgba.getchannel("A").getextrema()[0] < 255 else img.convert("RGB")


# ---- layout and wiring -----------------------------------------------------------------------------
def build_sketch_tab(editor, settings: dict | None = None, links=None) -> None:
    h = SketchHandlers(editor)
    start = {name: spec[2] for name, spec in SKETCH_FIELDS.items()}
    start.update({k: v for k, v in (settings or {}).items() if k in SKETCH_FIELDS})
    with gr.Tab("Sketch", id="sketch"):
        results = gr.State(Results("sketch"), delete_callback=Results.close)
        gr.Markdown("**1.** Draw coloured strokes on the blank canvas, or upload a photo and draw over it. "
                    "**2.** Say what it should become. **3.** Pick how faithful vs how realistic (strength) and run.")
        with gr.Row(equal_height=False):
            with gr.Column():
                canvas = gr.ImageEditor(
                    label="Sketch: draw here (upload a photo to draw over it)", type="numpy", image_mode="RGBA",
                    format="png", sources=("upload", "clipboard"), transforms=(), layers=False,
                    brush=gr.Brush(colors=BRUSH_COLOURS, default_color="#000000", color_mode="defaults"),
                    eraser=gr.Eraser(), canvas_size=(512, 512), elem_id="sketch-canvas")
                prompt = gr.Textbox(label="Prompt: what the sketch shows", elem_id="sketch-prompt",
                                    placeholder="a red house on a green hill under a blue sky")
                negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality")
            with gr.Column():
                fields = {"strength": gr.Slider(0.0, 1.0, value=start["strength"], step=0.05, label="Strength (t0)",
                                                info=STRENGTH_HELP, elem_id="sketch-strength")}
                with gr.Row():
                    seed = gr.Number(value=start["seed"], precision=0, label="Seed", minimum=0, maximum=2**31 - 1,
                                     elem_id="sketch-seed")
                    randomize = gr.Checkbox(value=False, label="Random seed each run")
                with gr.Accordion("More settings", open=False):
                    for name in ("n_inference_steps", "guidance_scale", "batch"):
                        fields[name] = field_input(name, SKETCH_FIELDS[name], start[name], "sketch")
                    scribble = gr.Textbox(label="ControlNet-scribble assist (model spec; empty = off)",
                                          placeholder="tiny, or lllyasviel/sd-controlnet-scribble",
                                          elem_id="sketch-scribble")
                    fields["scribble_scale"] = field_input("scribble_scale", SKETCH_FIELDS["scribble_scale"],
                                                           start["scribble_scale"], "sketch")
                picker = links.lora_picker() if links is not None else None
                with gr.Row():
                    run_btn = gr.Button("Generate from sketch", variant="primary", elem_id="sketch-run")
                    cancel_btn = gr.Button("Cancel", variant="stop", visible=h.can_cancel, elem_id="sketch-cancel")
                status = gr.Markdown("", min_height=48, elem_id="sketch-status")
            with gr.Column():
                gallery = gr.Gallery(label="Results: select one to download or send", format="png", columns=3,
                                     height=320, allow_preview=False, elem_id="sketch-gallery")
                download = gr.DownloadButton("Download PNG (with recipe)", elem_id="sketch-download")
                with gr.Row():
                    to_drag = gr.Button("Send to Drag", size="sm", elem_id="sketch-to-drag")
                    again = gr.Button("Draw over the selected result", size="sm")
                with gr.Accordion("Details: timings, UNet calls, settings", open=False):
                    details = gr.JSON(label="Details")
        sketch_file = gr.File(visible=False)
        photo_file = gr.File(visible=False)
    fields["seed"] = seed

    instant = dict(show_progress="hidden", api_visibility="private")  # noqa: C408
    gallery.select(on_select, [results], [download, details], **instant)
    cancel_btn.click(lambda r: request_cancel(r), [results], [status], queue=False, api_visibility="private")
    again.click(lambda r: receive_image(r.current()), [results], [canvas], **instant)
    if links is not None:
        links.inboxes["sketch"].change(receive_image, [links.inboxes["sketch"]], [canvas], **instant)
        fn, outputs = sender(links, "drag")
        to_drag.click(fn, [results], outputs, **instant)
    if picker is not None:
        fields["loras"] = picker
    run_btn.click(prepare_sketch, [canvas, results, randomize, seed], [sketch_file, photo_file, seed],
                  queue=False, api_visibility="private").then(h.sketch, [sketch_file, photo_file, prompt, negative, scribble, results],
             [gallery, download, details, status], inputs_kwargs=fields, api_name="sketch",
             concurrency_id="gpu", show_progress_on=[status])


def field_input(name: str, spec: tuple, value, prefix: str) -> gr.components.Component:
    """A slider (or a number box for wide integer ranges) for a ``name -> (min, max, default, why)`` entry."""
    lo, hi, default, why = spec
    label = name.replace("n_inference_steps", "steps").replace("_", " ").capitalize()
    is_int = isinstance(default, int)
    if is_int and hi - lo > 10_000:
        return gr.Number(value=value, minimum=lo, maximum=hi, precision=0, label=label, info=why,
                         elem_id=f"{prefix}-{name}")
    step = 1 if is_int else 10 ** math.floor(math.log10(min(v for v in (hi / 100, default / 10) if v > 0)))
    return gr.Slider(lo, hi, value=value, step=step, label=label, info=why, elem_id=f"{prefix}-{name}")
