"""The Drag tab: upload, paint the area that may change, drag handle → target points, see the instant warp
at once, run a drag method and watch it work.

Read top to bottom: instant UI handlers, engine handlers, layout, wiring. The method switch and the /drag
inputs -> request are ui/drag_methods.py; the per-session state (the point list with undo/redo, the point
editor's HTML) is ui/drag_session.py. The point editor is a ``gr.HTML``
with its own script (ui/js/point_editor.js): the browser turns pointer and key input into edits, the server
applies each to the session's point list (the only copy that counts) and re-renders; the points line
acknowledges every edit with the point count.

The Run button calls the same ``/drag`` endpoint that API clients use::

    from gradio_client import Client, handle_file
    Client(url).predict(handle_file("in.png"), None, "[[120, 80], [160, 80]]", "a photo of a cat",
                        method="instant", api_name="/drag")
    # image, mask image or None (white / opaque = may change), clicks alternating handle, target
    # (JSON, image pixels), prompt, then ``method`` (any METHODS name or engine name, any case) and the
    # settings by name: DragRequest fields as is, the others as guided_<name>, instant_<name>, region_<name>.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
from PIL import Image

from editing.drag import DRAG_FIELDS, GOODDRAG, INPAINT_FIELDS, INSTANT_FIELDS, LORA_FIELDS, REGION_FIELDS
from editing.generation import GENERATE_FIELDS
from editing.images import load_image
from models.errors import EditCancelled, EditError
from ui import click_mask, overlay

# notify and shows_errors are also imported from here by ui/personalize_tab.py.
from ui.common import (
    GPU_SECONDS,
    MASK_CANVAS,
    EngineProgress,
    GpuHandlers,
    arm,
    canvas_image,
    lora_picker,
    lora_specs,
    notify,
    request_cancel,
    shows_errors,
    streams_errors,
    summary,
    timings,
    with_loras,
)
from ui.drag_methods import API_DEFAULT_METHOD, DEFAULT_METHOD, METHODS, canvas_label, drag_request, method_info
from ui.drag_session import Session, editor_html
from ui.feedback import LiveProgress
from ui.fields import field_input, guided_input
from ui.history import on_select
from ui.zerogpu import gpu

log = logging.getLogger(__name__)

FIELDS = DRAG_FIELDS  # name -> (min, max, default, help); the advanced sliders come from here
# Guided-method sliders (their own components: defaults differ from DragDiffusion's), passed as guided_<name>.
GUIDED_UI = ("guidance_scale", "energy_scale", "w_edit", "w_content", "w_inpaint", "sde_strength")
LABELS = {"lam": "λ (keep the unmasked area)", "r_m": "r_m (motion patch radius)", "r_p": "r_p (tracking radius)",
          "lora_steps": "LoRA steps", "lora_rank": "LoRA rank", "lora_lr": "LoRA learning rate"}
EDITOR_JS = (Path(__file__).parent / "js" / "point_editor.js").read_text()
EDITOR_CSS = """
.pe { position: relative; display: inline-block; max-width: 100%; line-height: 0; touch-action: none;
      user-select: none; -webkit-user-select: none; }
.pe img { display: block; width: 100%; height: auto; margin: 0 !important; cursor: crosshair;
          image-rendering: pixelated; }
.pe svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
.pe .pe-arrow { stroke: white; stroke-width: 3px; vector-effect: non-scaling-stroke; }
.pe .pe-handle { fill: rgb(230, 40, 40); stroke: white; stroke-width: 1.5px; vector-effect: non-scaling-stroke; }
.pe .pe-target { fill: rgb(40, 100, 240); stroke: white; stroke-width: 1.5px; vector-effect: non-scaling-stroke; }
.pe .pe-sel { fill: none; stroke: #ffd200; stroke-width: 3px; vector-effect: non-scaling-stroke; }
.pe-empty { padding: 2em 1em; line-height: 1.4; color: var(--body-text-color-subdued); }
"""


# ---- instant handlers (no engine) -----------------------------------------------------------------
def on_canvas_value(value, session: Session):
    """Upload, brush strokes, pictures set by the app. The canvas may send one picture with several
    events, some of them empty while the file loads, so empty values are ignored and points are
    only dropped when the picture really changed."""
    image, mask = canvas_image(value)
    if image is None:
        return gr.skip()
    session.update_from_canvas(image, mask)
    return session.view()


def on_canvas_clear(session: Session):
    session.use_image(None)
    return session.view()


def on_edit(session: Session, evt: gr.EventData):
    """One edit from the point editor's script; the answer re-renders the editor with ``data-ack`` = its seq."""
    data = evt._data if isinstance(getattr(evt, "_data", None), dict) else {}
    try:
        session.edit(data)
    except EditError as e:
        gr.Warning(str(e))
    seq = data.get("seq")
    if isinstance(seq, int) and seq > session.ack:
        session.ack = seq
    return session.view()


def button_edit(op: str):
    """Undo / Redo / Clear buttons: the same edits as the keys."""

    def handler(session: Session):
        if session.image is not None:
            if op == "clear":
                session.set_points([])
            else:
                session.edit({"op": op})
        return session.view()

    handler.__name__ = f"{op}_points"
    return handler


def live_preview(session: Session, enabled: bool, method: str | None = None):
    """The chosen method's live preview of the current points and mask (its row's ``preview`` in the method table;
    Instant's warp for methods without one): what Run starts from.

    Queued previews of states already shown are skipped, so a burst of edits costs one warp."""
    if not enabled or session.image is None:
        session.live_version = -1
        return None, "Live preview off." if not enabled else "Live preview: upload an image and place points."
    from editing.drag.methods import live_preview as method_preview

    preview, of = method_preview(method)
    if session.live_version == (session.version, of.name):
        return gr.skip(), gr.skip()
    session.live_version = (session.version, of.name)
    pairs = session.pairs()
    t0 = time.perf_counter()
    try:
        out = preview(session.image, session.mask, pairs)
    except EditError as e:
        return overlay.zoom(overlay.as_rgb(session.image), session.zoom), f"Live preview: {e}"
    ms = 1000 * (time.perf_counter() - t0)
    n = len(pairs)
    what = "hatched: what the inpainting fills" if of.name == "inpaint" else f"what {of.label} starts from"
    rgb = overlay.zoom(overlay.as_rgb(out), session.zoom)
    return rgb, (f"Live preview of {n} pair{'s' * (n != 1)} ({of.label}'s warp, {ms:.0f} ms): {what}."
                 if n else "Live preview: add a handle → target pair.")


def prepare_run(session: Session, method: str):
    """Run (or Train LoRA), step 1, instant: arm Cancel and hand the working image, mask, points and method
    to the /drag (/train_lora) endpoint through hidden components."""
    arm(session)
    if session.image is None:
        return None, None, "[]", method
    image = session.save_png(session.image, "input.png")
    mask = None
    if session.mask is not None:
        mask = session.save_png(Image.fromarray(session.mask.astype(np.uint8) * 255), "mask.png")
    return image, mask, json.dumps(session.points), method


def continue_from_result(session: Session):
    if not session.history:
        gr.Warning("No result yet: run a drag first.")
        return gr.skip()
    entry = session.history[-1 if session.selected is None else session.selected]
    session.use_image(load_image(entry["after"]))
    return entry["after"], *session.view()


def receive_image(path, session: Session):
    """An image sent from another tab (ui/links.py) becomes the working image."""
    if not path:
        return gr.skip()
    session.use_image(load_image(path))
    return path, *session.view()


def load_example(session: Session, evt: gr.SelectData):
    """A ready example (ui/examples.py): picture, painted mask, points, prompt and method in one click."""
    from ui.examples import load_examples

    examples = load_examples()
    if not isinstance(evt.index, int) or not 0 <= evt.index < len(examples):
        return gr.skip()
    ex = examples[evt.index]
    image, mask = ex.load()
    session.use_image(image)
    session.mask, session.points = mask, [list(p) for p in ex.points]
    method = ex.method if ex.method in METHODS else DEFAULT_METHOD
    return ex.canvas_value(), *session.view(), ex.prompt, method


# ---- engine handlers (one shared GPU queue) -------------------------------------------------------
def live_frames(request, snap, factor: int):
    """(left, right) of the before/after view while a drag runs: the input with the handles' trail so far, and
    the newest sampling preview (x̂₀) when there is one."""
    flat = [list(p) for pair in request.points for p in pair]
    left = overlay.draw_trail(overlay.render_preview(request.image, request.mask, flat, factor), snap.trail, factor)
    if snap.preview is None:
        return left, left
    right = overlay.as_rgb(snap.preview.resize(request.image.size, Image.BILINEAR)
                           if snap.preview.size != request.image.size else snap.preview)
    return left, overlay.zoom(right, factor)


class EngineHandlers(GpuHandlers):
    """Handlers that run the engine. The Editor (and its models) is held here, never in gr.State."""

    def __init__(self, editor):
        super().__init__(editor)
        self._edit = gpu(GPU_SECONDS["drag"])(editor.edit)
        self._generate = gpu(GPU_SECONDS["generate"])(editor.generate)
        self._train = gpu(GPU_SECONDS["lora"])(editor.train_identity_lora)

    @streams_errors(5)
    def drag(self, image, mask, points, prompt, session: Session, progress=gr.Progress(), **settings):
        """Drag each handle point to its target. points: "[[hx, hy], [tx, ty], ...]" in image pixels.

        Streams while the engine works: the before/after view shows the handles' trail during the optimisation
        and the sampling previews; the status line the time left in the current phase."""
        loras = settings.pop("loras", None)
        request = drag_request(image, mask, points, prompt, settings)
        notify(request.notices)
        label = getattr(request, "method", None) or getattr(request, "TASK", None) or "drag"
        log.info("drag (%s): %d pair(s), %dx%d, mask=%s", label, len(request.points), *request.image.size,
                 request.mask is not None)
        cancel = self.cancel_of(session)
        live = LiveProgress(progress)
        factor = overlay.preview_zoom(request.image.size)
        def call(cb):
            return self._edit(request, progress=cb, cancel=cancel, loras=lora_specs(loras))
        try:
            for snap in live.follow(call, cancel=cancel):
                if cancel is not None and cancel.is_set():
                    continue  # Cancel's own status line stays
                frames = live_frames(request, snap, factor) if snap.new_trail or snap.new_preview else gr.skip()
                yield frames, gr.skip(), gr.skip(), gr.skip(), f"Running {label}: {snap.status}"
        except EditCancelled as e:
            raise EditCancelled(f"{e} Your image, mask and points are unchanged.") from None
        result = live.result
        notify(result.notices)
        details = {"timings_s": timings(result), "unet_calls": result.unet_calls,
                   "final_points": [[round(x, 1), round(y, 1)] for x, y in result.final_points],
                   "notices": result.notices, "params": result.recipe.get("params"), "mask": request.mask is not None,
                   "live": {"trail_steps": len(live.snapshot().trail), "previews": live.snapshot().previews_seen}}
        pairs = len(request.points)
        session.add_result(request.image, result, f"{label}, {pairs} pair{'s' * (pairs > 1)}", details)
        yield *session.shown(), session.gallery(), summary(result, request.mask is not None)

    @shows_errors
    def generate(self, prompt, seed, n_inference_steps, session: Session, progress=gr.Progress()):
        """Text-to-image; the result becomes the working image and is drag-ready (no inversion, no LoRA)."""
        if seed is None or n_inference_steps is None:
            raise EditError("Seed and steps must be whole numbers.")
        result = self._generate(prompt or "", int(seed), n_inference_steps=int(n_inference_steps),
                                progress=EngineProgress(progress), cancel=self.cancel_of(session))
        session.use_image(result.image)
        session.add_result(None, result, "generated", {"timings_s": timings(result), "recipe": result.recipe})
        return (result.image, *session.view(), prompt, *session.shown(), session.gallery(),
                f"Generated in {result.total_s:.1f} s. It is drag-ready: place points on it and run.")

    @shows_errors
    def train_lora(self, image, prompt, session: Session, progress=gr.Progress(), **settings):
        """Fine-tune (and cache) the identity LoRA that a drag of this image and prompt would train first."""
        if not image:
            raise EditError("No image: upload or generate an image first.")
        picture = load_image(image)
        if self.editor.is_drag_ready(picture):
            return "This image was generated here, so dragging it needs no identity LoRA."
        if settings.get("lora_steps") == 0:
            return "LoRA steps is 0, so drags of this image skip the identity LoRA."
        self._train(picture, prompt or "", steps=settings["lora_steps"], rank=settings["lora_rank"],
                    lr=settings["lora_lr"], seed=settings["seed"], progress=EngineProgress(progress),
                    cancel=self.cancel_of(session), loras=lora_specs(settings.get("loras")))
        return "Identity LoRA ready: Run reuses it for this image, prompt and LoRA settings."


# ---- layout --------------------------------------------------------------------------------------
def _source_column(w: SimpleNamespace) -> None:
    """The canvas, the examples and the text-to-image accordion."""
    from ui.examples import load_examples

    w.canvas = gr.ImageEditor(label=canvas_label(DEFAULT_METHOD), elem_id="canvas", **MASK_CANVAS)
    w.click = click_mask.panel("canvas", "the area that may change")
    examples = load_examples()
    w.example_set = gr.Dataset(
        components=[gr.Image(type="filepath", visible=False), gr.Textbox(visible=False)],
        samples=[[str(ex.image), f"{ex.prompt} — {ex.method}"] for ex in examples],
        label="Examples: click one (picture, mask and points are set), then Run drag",
        elem_id="examples", visible=bool(examples), samples_per_page=8)
    with gr.Accordion("Generate an image", open=False):
        w.gen_prompt = gr.Textbox(label="Prompt", placeholder="a photo of a red car on a street")
        w.gen_seed = gr.Number(value=GENERATE_FIELDS["seed"][2], precision=0, label="Seed")
        w.gen_btn = gr.Button("Generate")


def _table_inputs(table: dict | None, prefix: str) -> dict:
    """Sliders for a request's field table, keyed ``{prefix}_{name}`` (the /drag keyword names)."""
    return {f"{prefix}_{name}": field_input(name, spec, spec[2], f"{prefix}-{name}", LABELS.get(name))
            for name, spec in (table or {}).items()}


def _points_column(w: SimpleNamespace, can_cancel: bool, start: dict, links) -> None:
    """The point editor and the live preview, prompt, method, Run / Cancel and the settings."""
    w.editor = gr.HTML(editor_html(Session()), js_on_load=EDITOR_JS, css_template=EDITOR_CSS, elem_id="points",
                       label="Points: drag from handle (red) to target (blue); frozen area dimmed", show_label=True,
                       container=True, padding=False)
    w.points_info = gr.Markdown("Upload or generate an image to start.", label="Points", elem_id="points-info")
    with gr.Row():
        w.undo_btn = gr.Button("Undo (Ctrl+Z)", size="sm", elem_id="undo")
        w.redo_btn = gr.Button("Redo (Ctrl+Shift+Z)", size="sm", elem_id="redo")
        w.clear_btn = gr.Button("Clear points", size="sm", elem_id="clear-points")
    with gr.Accordion("Live preview: what the instant warp does", open=True, elem_id="live"):
        w.live_on = gr.Checkbox(value=True, label="Update on every change", elem_id="live-on")
        w.live = gr.Image(type="numpy", format="png", interactive=False, show_label=False, elem_id="live-preview")
        w.live_info = gr.Markdown("Live preview: upload an image and place points.", elem_id="live-info")
    w.prompt = gr.Textbox(label="Prompt (optional): what the image shows", elem_id="prompt")
    choices = [(f"{label}", label) for label in METHODS]
    w.method = gr.Radio(choices, value=DEFAULT_METHOD, label="Method", elem_id="method", info=method_info())
    with gr.Row():
        w.run_btn = gr.Button("Run drag", variant="primary", elem_id="run")
        w.cancel_btn = gr.Button("Cancel", variant="stop", visible=can_cancel, elem_id="cancel")
    w.status = gr.Markdown("", label="Status", min_height=48, elem_id="status")
    with gr.Accordion("DragDiffusion / GoodDrag settings", open=False, elem_id="advanced"):
        w.fields = {name: field_input(name, spec, start[name], f"field-{name}", LABELS.get(name))
                    for name, spec in FIELDS.items()}
        if GOODDRAG:
            gr.Markdown("GoodDrag uses these sliders; the ones left at their default take GoodDrag's values: "
                        + ", ".join(f"{k} = {v}" for k, v in GOODDRAG.items()))
        w.lora_btn = gr.Button("Train identity LoRA now (optional; Run trains it when needed)", size="sm")
    with gr.Accordion("DiffEditor / DragonDiffusion settings", open=False, elem_id="guided-settings"):
        w.guided_fields = {f"guided_{n}": guided_input(n) for n in GUIDED_UI}
    w.method_fields = {}
    for table, prefix, title in ((INSTANT_FIELDS, "instant", "Instant settings"),
                                 (INPAINT_FIELDS, "inpaint", "Inpaint settings"),
                                 (REGION_FIELDS, "region", "Region settings")):
        if table:
            with gr.Accordion(title, open=False, elem_id=f"{prefix}-settings"):
                w.method_fields |= _table_inputs(table, prefix)
    w.picker = lora_picker(links)


def _results_column(w: SimpleNamespace) -> None:
    w.result = gr.ImageSlider(label="Before / after (while running: the handles' trail and sampling previews)",
                              type="filepath", format="png", elem_id="result")
    w.download = gr.DownloadButton("Download PNG (with recipe)", size="md", elem_id="download")
    w.gallery = gr.Gallery(label="History: select one to compare or continue", format="png", columns=4,
                           fit_columns=False, height=220, allow_preview=False, elem_id="history")
    w.continue_btn = gr.Button("Continue from the selected result", size="sm", elem_id="continue")
    with gr.Accordion("Details: timings, UNet calls, settings", open=False):
        w.details = gr.JSON(label="Details")


def build_drag_tab(editor, settings: dict | None = None, links=None) -> None:
    """Add the Drag tab to the current gr.Blocks. ``settings`` overrides slider start values."""
    h = EngineHandlers(editor)
    start = {name: spec[2] for name, spec in FIELDS.items()} | (settings or {})
    with gr.Tab("Drag", id="drag"):
        w = SimpleNamespace(session=gr.State(Session(), delete_callback=Session.close))
        gr.Markdown("**1.** Upload (or generate) an image. **2.** Click the object under the picture to select it, "
                    "or paint a mask: for Inpaint the object itself (all of it moves), for the other methods the "
                    "area that may change; the rest stays fixed. **3.** Press on a handle point and drag to its "
                    "target (or click handle, then target); repeat for more pairs. Shift+click pins a point that "
                    "must stay. The live preview shows what the method starts from. **4.** Run drag.")
        with gr.Row(equal_height=False):
            with gr.Column():
                _source_column(w)
            with gr.Column():
                _points_column(w, h.can_cancel, start, links)
            with gr.Column():
                _results_column(w)
        # Hidden hand-over from the Run button to the /drag endpoint, so both share one code path. The method
        # goes as text, so API clients may name it in any case.
        w.method_name = gr.Textbox(API_DEFAULT_METHOD, visible=False)
        w.handover = [gr.File(visible=False), gr.File(visible=False), gr.Textbox(visible=False)]
    _wire_instant(w, links)
    _wire_engine(w, h)


# ---- wiring --------------------------------------------------------------------------------------
def _wire_instant(w: SimpleNamespace, links) -> None:
    """Instant handlers: one small ordered queue, so edits and canvas updates apply in order; each is followed
    by the live preview on its own queue (a burst of edits costs one warp: see ``live_preview``)."""
    instant = dict(concurrency_id="points", concurrency_limit=1, show_progress="hidden", api_visibility="private")
    live = _live(w)
    shown = [w.editor, w.points_info]
    # Two listeners, not gr.on([...]): the canvas only uploads brush strokes when it has its own .change listener.
    w.canvas.upload(on_canvas_value, [w.canvas, w.session], shown, **instant).then(**live)
    w.canvas.change(on_canvas_value, [w.canvas, w.session], shown, trigger_mode="always_last",
                    **instant).then(**live)
    w.canvas.clear(on_canvas_clear, [w.session], shown, **instant).then(**live)
    w.editor.edit(on_edit, [w.session], shown, trigger_mode="multiple", **instant).then(**live)
    for btn, op in ((w.undo_btn, "undo"), (w.redo_btn, "redo"), (w.clear_btn, "clear")):
        btn.click(button_edit(op), [w.session], shown, **instant).then(**live)
    w.live_on.change(**live)
    w.method.change(**live)
    w.method.change(lambda m: gr.update(label=canvas_label(m)), [w.method], [w.canvas], queue=False,
                    api_visibility="private")
    w.gallery.select(on_select, [w.session], [w.result, w.download, w.details], **instant)
    w.example_set.select(load_example, [w.session], [w.canvas, *shown, w.prompt, w.method], **instant).then(**live)
    w.continue_btn.click(continue_from_result, [w.session], [w.canvas, *shown], **instant).then(**live)
    if links is not None:
        links.inboxes["drag"].change(receive_image, [links.inboxes["drag"], w.session], [w.canvas, *shown],
                                     **instant).then(**live)
    w.cancel_btn.click(request_cancel, [w.session], [w.status], queue=False, api_visibility="private")
    click_mask.wire(w.click, w.canvas)  # a click's mask lands on the canvas: its .change above takes it in


def _wire_engine(w: SimpleNamespace, h: EngineHandlers) -> None:
    """Engine handlers: one GPU queue (concurrency_id "gpu", limit 1 from queue(default_concurrency_limit=1))."""
    engine = dict(concurrency_id="gpu", show_progress_on=[w.status])
    hand_over = dict(fn=prepare_run, inputs=[w.session, w.method], outputs=[*w.handover, w.method_name],
                     queue=False, api_visibility="private")
    image_file, _, _ = w.handover
    w.run_btn.click(**hand_over).then(
        h.drag, [*w.handover, w.prompt, w.session], [w.result, w.download, w.details, w.gallery, w.status],
        inputs_kwargs=with_loras(w.fields | {"method": w.method_name} | w.guided_fields | w.method_fields, w.picker),
        api_name="drag", **engine)
    w.gen_btn.click(arm, [w.session], None, queue=False, api_visibility="private").then(
        h.generate, [w.gen_prompt, w.gen_seed, w.fields["n_inference_steps"], w.session],
        [w.canvas, w.editor, w.points_info, w.prompt, w.result, w.download, w.details, w.gallery, w.status],
        api_name="generate", **engine).then(**_live(w))
    w.lora_btn.click(**hand_over).then(
        h.train_lora, [image_file, w.prompt, w.session], [w.status],
        inputs_kwargs=with_loras({k: w.fields[k] for k in LORA_FIELDS}, w.picker), api_name="train_lora", **engine)


def _live(w: SimpleNamespace) -> dict:
    """The live-preview step that follows every change of picture, mask or points."""
    return dict(fn=live_preview, inputs=[w.session, w.live_on, w.method], outputs=[w.live, w.live_info],
                concurrency_id="live", concurrency_limit=1, show_progress="hidden", api_visibility="private")
