"""The Sketch tab: draw coloured strokes on a blank canvas or over a photo, then SDEdit turns them into pictures.

Handlers first (instant handlers, the engine handler), layout, then wiring. The Generate button calls the
same ``/sketch`` endpoint API clients use::

    from gradio_client import Client, handle_file
    Client(url).predict(handle_file("drawing.png"), None, "a red house", "", "", strength=0.7,
                        n_inference_steps=30, api_name="/sketch")
    # sketch (RGB drawing, or RGBA strokes layer), photo under it or None, prompt, negative prompt,
    # scribble-assist ControlNet spec ("" = off), then any SketchRequest.FIELDS_UI value by name.

Results are drag-ready when strength is 1 (the whole trajectory exists); "Send to Drag" opens them there.
"""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np
from PIL import Image

from editing.generation import SKETCH_FIELDS, SketchRequest
from editing.images import load_image, load_sketch
from models.errors import EditError
from ui import examples
from ui.common import (
    GPU_SECONDS,
    GpuHandlers,
    details_of,
    lora_picker,
    lora_specs,
    model_names,
    model_spec,
    notify,
    pick_seed,
    request_cancel,
    results_gallery,
    run_controls,
    sender,
    status_line,
    streams_errors,
)
from ui.feedback import stream_to_gallery
from ui.fields import field_input
from ui.history import Results, on_select
from ui.zerogpu import gpu

BRUSH_COLOURS = ["#000000", "#e03030", "#f0a020", "#f5e040", "#30a040", "#3070e0", "#8040c0", "#8b5a2b",
                 "#ffffff", "#87ceeb"]
CANVAS_SIZE = (512, 512)  # the blank canvas; an uploaded photo sets its own size
STRENGTH_HELP = ("SDEdit t0: low keeps your strokes and colours (faithful), high lets the model redraw them "
                 "(realistic); 0 returns the sketch, 1 ignores it.")


# ---- canvas -> files --------------------------------------------------------------------------------
def _strokes(layers) -> Image.Image | None:
    """Every painted layer composited into one RGBA strokes image, or None when nothing is painted."""
    strokes = None
    for layer in layers or []:
        a = np.asarray(layer)
        if a.ndim == 3 and a.shape[2] == 4 and (a[..., 3] > 0).any():
            img = Image.fromarray(a.astype(np.uint8), "RGBA")
            strokes = img if strokes is None else Image.alpha_composite(strokes, img.resize(strokes.size))
    return strokes


def split_canvas(value) -> tuple[Image.Image | None, Image.Image | None]:
    """ImageEditor value -> (sketch, photo under it or None).

    Strokes on layers become an RGBA strokes layer over the uploaded photo (or a blank canvas); an upload
    with no strokes on it is taken as a finished drawing (RGB)."""
    if not value:
        return None, None
    bg = value.get("background")
    strokes = _strokes(value.get("layers"))
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


def sketch_received(value) -> str:
    """What the server has of the canvas, e.g. "Sketch: 430 px of strokes on a blank 64×64 canvas" (the line a
    person, and a browser test, reads to know the strokes arrived before pressing Generate)."""
    sketch, photo = split_canvas(value)
    if sketch is None:
        return "Sketch: nothing drawn yet."
    w, h = sketch.size
    if sketch.mode != "RGBA":
        return f"Sketch: an uploaded {w}×{h} drawing."
    n = int(np.count_nonzero(np.asarray(sketch)[..., 3]))
    return f"Sketch: {n} px of strokes on {'the photo' if photo is not None else 'a blank canvas'}, {w}×{h}."


def load_example(evt: gr.SelectData):
    """A ready sketch (ui/examples.py): crayon strokes on a blank canvas and the prompt."""
    ex = examples.picked("sketch", evt.index)
    if ex is None:
        return gr.skip(), gr.skip()
    return examples.strokes_value(ex.values["sketch"]), ex.values["prompt"]


def prepare_sketch(value, results: Results, randomize: bool, seed):
    """Run, step 1, instant: arm Cancel, write the sketch (and photo) for the /sketch endpoint, pick the seed."""
    results.cancel.clear()
    sketch, photo = split_canvas(value)
    sketch_path = results.save_png(sketch, "sketch.png") if sketch is not None else None
    photo_path = results.save_png(photo, "photo.png") if photo is not None else None
    return sketch_path, photo_path, pick_seed(randomize, seed, SKETCH_FIELDS["seed"])


def receive_image(path):
    """An image sent from another tab (or a result drawn over again) becomes the photo to draw over."""
    return path if path else gr.skip()


def scribble_spec(name) -> str | None:
    """The scribble ControlNet field (empty or 'off' = none; else a registry name, never a path) -> engine spec."""
    if name is None or (isinstance(name, str) and name.strip() in ("", "off")):
        return None
    return model_spec("controlnet", name)


# ---- engine handler ----------------------------------------------------------------------------------
class SketchHandlers(GpuHandlers):
    def __init__(self, editor):
        super().__init__(editor)
        self._edit = gpu(GPU_SECONDS["sketch"])(editor.edit)

    @streams_errors(4)
    def sketch(self, sketch, photo, prompt, negative_prompt, scribble_controlnet, results: Results,
               progress=gr.Progress(), loras=None, **settings):
        """Sketch (+ optional photo under it) -> image(s) with SDEdit; returns gallery, download, details, status."""
        if not sketch:
            raise EditError("The sketch is blank: draw some strokes first (or upload a drawing).")
        req = SketchRequest(load_sketch(sketch), load_image(photo) if photo else None, prompt=prompt or "",
                            negative_prompt=negative_prompt or "",
                            scribble_controlnet=scribble_spec(scribble_controlnet), **settings)
        notify(req.notices)
        result = yield from stream_to_gallery(self._edit, req, results, self.cancel_of(results), progress,
                                              lora_specs(loras))
        notify(result.notices[len(req.notices):])
        results.add(result, f"sketch, strength {req.strength:g}", details_of(result))
        yield results.gallery(), *results.shown(), status_line(result, "image")


# ---- layout and wiring -----------------------------------------------------------------------------
def _sketch_input(name: str, value) -> gr.components.Component:
    label = name.replace("n_inference_steps", "steps").replace("_", " ").capitalize()
    return field_input(name, SKETCH_FIELDS[name], value, f"sketch-{name}", label)


def _settings_column(w: SimpleNamespace, can_cancel: bool, start: dict, links) -> None:
    """Strength, seed, more settings, the LoRA picker, Run / Cancel."""
    lo, hi, _, _ = SKETCH_FIELDS["strength"]
    w.fields = {"strength": gr.Slider(lo, hi, value=start["strength"], step=0.05, label="Strength (t0)",
                                      info=STRENGTH_HELP, elem_id="sketch-strength")}
    with gr.Row():
        lo, hi, _, _ = SKETCH_FIELDS["seed"]
        w.seed = gr.Number(value=start["seed"], precision=0, label="Seed", minimum=lo, maximum=hi,
                           elem_id="sketch-seed")
        w.randomize = gr.Checkbox(value=False, label="Random seed each run")
    with gr.Accordion("More settings", open=False):
        for name in ("n_inference_steps", "guidance_scale", "batch"):
            w.fields[name] = _sketch_input(name, start[name])
        w.scribble = gr.Dropdown([("off", ""), *((n, n) for n in model_names().choices("controlnet"))], value="",
                                 allow_custom_value=True, label="ControlNet-scribble assist",
                                 elem_id="sketch-scribble")
        w.fields["scribble_scale"] = _sketch_input("scribble_scale", start["scribble_scale"])
    w.picker = lora_picker(links)
    run_controls(w, "Generate from sketch", "sketch", can_cancel)


def _results_column(w: SimpleNamespace) -> None:
    results_gallery(w, "sketch", 320)
    with gr.Row():
        w.to_drag = gr.Button("Send to Drag", size="sm", elem_id="sketch-to-drag")
        w.again = gr.Button("Draw over the selected result", size="sm")
    with gr.Accordion("Details: timings, UNet calls, settings", open=False):
        w.details = gr.JSON(label="Details")


def build_sketch_tab(editor, settings: dict | None = None, links=None) -> None:
    h = SketchHandlers(editor)
    start = {name: spec[2] for name, spec in SKETCH_FIELDS.items()}
    start.update({k: v for k, v in (settings or {}).items() if k in SKETCH_FIELDS})
    with gr.Tab("Sketch", id="sketch"):
        w = SimpleNamespace(results=gr.State(Results("sketch"), delete_callback=Results.close))
        gr.Markdown("**1.** Draw coloured strokes on the blank canvas, or upload a photo and draw over it. "
                    "**2.** Say what it should become. **3.** Pick how faithful vs how realistic (strength) and run.")
        with gr.Row(equal_height=False):
            with gr.Column():
                w.canvas = gr.ImageEditor(
                    label="Sketch: draw here (upload a photo to draw over it)", type="numpy", image_mode="RGBA",
                    format="png", sources=("upload", "clipboard"), transforms=(), layers=False,
                    brush=gr.Brush(colors=BRUSH_COLOURS, default_color="#000000", color_mode="defaults"),
                    eraser=gr.Eraser(), canvas_size=CANVAS_SIZE, elem_id="sketch-canvas")
                w.prompt = gr.Textbox(label="Prompt: what the sketch shows", elem_id="sketch-prompt",
                                      placeholder="a red house on a green hill under a blue sky")
                w.negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality")
                w.info = gr.Markdown(sketch_received(None), elem_id="sketch-info")
                w.examples = examples.example_table("sketch", "sketch-examples", "strokes and prompt")
            with gr.Column():
                _settings_column(w, h.can_cancel, start, links)
            with gr.Column():
                _results_column(w)
        w.files = [gr.File(visible=False), gr.File(visible=False)]  # sketch, photo under it
    w.fields["seed"] = w.seed
    _wire(w, h, links)


def _wire(w: SimpleNamespace, h: SketchHandlers, links) -> None:
    instant = dict(show_progress="hidden", api_visibility="private")
    w.gallery.select(on_select, [w.results], [w.download, w.details], **instant)
    for ev in (w.canvas.upload, w.canvas.change):
        ev(sketch_received, [w.canvas], [w.info], trigger_mode="always_last", concurrency_id="sketch-info",
           concurrency_limit=1, **instant)
    w.examples.select(load_example, None, [w.canvas, w.prompt], **instant)
    w.cancel_btn.click(lambda r: request_cancel(r), [w.results], [w.status], queue=False, api_visibility="private")
    w.again.click(lambda r: receive_image(r.current()), [w.results], [w.canvas], **instant)
    if links is not None:
        links.inboxes["sketch"].change(receive_image, [links.inboxes["sketch"]], [w.canvas], **instant)
        fn, outputs = sender(links, "drag")
        w.to_drag.click(fn, [w.results], outputs, **instant)
    if w.picker is not None:
        w.fields["loras"] = w.picker
    w.run_btn.click(prepare_sketch, [w.canvas, w.results, w.randomize, w.seed], [*w.files, w.seed],
                    queue=False, api_visibility="private").then(
        h.sketch, [*w.files, w.prompt, w.negative, w.scribble, w.results], [w.gallery, w.download, w.details, w.status],
        inputs_kwargs=w.fields, api_name="sketch", concurrency_id="gpu", show_progress_on=[w.status])
