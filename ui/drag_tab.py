"""The Drag tab: upload, paint the area that may change, click handle/target points, run DragDiffusion.

Read top to bottom: per-session state, instant UI handlers, engine handlers, layout, wiring.
The Run button calls the same ``/drag`` endpoint that API clients use::

    from gradio_client import Client, handle_file
    Client(url).predict(handle_file("in.png"), None, "[[120, 80], [160, 80]]", "a photo of a cat",
                        max_steps=40, api_name="/drag")
    # image, mask image or None (white / opaque = may change), clicks alternating handle, target
    # (JSON, image pixels), prompt, then any DragRequest.FIELDS_UI value by name.
"""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import gradio as gr
import numpy as np
from PIL import Image

from editing.generation import GENERATE_FIELDS
from editing.images import load_image, load_mask
from editing.requests import GUIDED_FIELDS, DragRequest, EditError, GuidedDragRequest, pair_points, parse_points
from ui import overlay
# notify and shows_errors are also imported from here by ui/personalize_tab.py.
from ui.common import (GPU_SECONDS, MASK_CANVAS, BeforeAfter, EngineProgress, GpuHandlers, arm, canvas_image,
                       field_input, guided_input, lora_picker, lora_specs, notify, on_select, request_cancel,
                       shows_errors, summary, timings, with_loras)
from ui.zerogpu import gpu

log = logging.getLogger(__name__)

FIELDS = DragRequest.FIELDS_UI  # name -> (min, max, default, help); the advanced sliders come from here
LORA_FIELDS = ("lora_steps", "lora_rank", "lora_lr", "seed")
METHODS = {"DragDiffusion": "dragdiffusion", "DiffEditor": "diffeditor", "DragonDiffusion": "dragondiffusion"}
# Guided-method sliders (their own components: defaults differ from DragDiffusion's), passed as guided_<name>.
GUIDED_UI = ("guidance_scale", "energy_scale", "w_edit", "w_content", "w_inpaint", "sde_strength")
LABELS = {"lam": "λ (keep the unmasked area)", "r_m": "r_m (motion patch radius)", "r_p": "r_p (tracking radius)",
          "lora_steps": "LoRA steps", "lora_rank": "LoRA rank", "lora_lr": "LoRA learning rate"}


# ---- per-session state ----------------------------------------------------------------------------
class Session(BeforeAfter):
    """One browser tab's Drag data, kept in gr.State: the working image, its mask and points, the history."""

    def __init__(self, prefix: str = ""):
        super().__init__(prefix)
        self.image: Image.Image | None = None  # the working image; points are in its pixels
        self.fingerprint = None  # overlay.fingerprint(image): tells a new picture from a re-sent one
        self.mask: np.ndarray | None = None  # H×W bool, True = may change; None = everything may
        self.points: list[list[float]] = []  # clicks alternating handle, target

    def use_image(self, image: Image.Image | None) -> None:
        """Start over on ``image`` (upload, generation, continue-from-result): no mask, no points."""
        self.image, self.mask, self.points = image, None, []
        self.fingerprint = overlay.fingerprint(image) if image is not None else None

    def update_from_canvas(self, image: Image.Image, mask: np.ndarray | None) -> None:
        """The canvas re-sends its picture with every brush stroke: keep the points unless the picture changed."""
        if not overlay.same_picture(overlay.fingerprint(image), self.fingerprint):
            self.use_image(image)
        self.mask = mask

    def preview(self) -> tuple[np.ndarray | None, str]:
        """(image to click on, one line about the points)."""
        if self.image is None:
            return None, "Upload or generate an image to start."
        n = len(self.points)
        if n == 0:
            text = "Click a **handle** point (red) on this image, then where it should go: its **target** (blue)."
        elif n % 2:
            text = f"Handle {n // 2 + 1} placed: now click its **target**."
        else:
            text = f"{n // 2} handle → target pair(s). Add more, or press **Run drag**."
        return overlay.render_preview(self.image, self.mask, self.points, self.zoom), text

    @property
    def zoom(self) -> int:
        """How much the click preview enlarges the picture (small pictures are hard to click)."""
        return overlay.preview_zoom(self.image.size) if self.image is not None else 1


def parse_clicks(text: str | None):
    """'[[x, y], [x, y], ...]' (alternating handle, target) or 'x,y>x,y;...' -> ((handle, target), ...)."""
    text = (text or "").strip()
    if text and not text.startswith("["):
        return parse_points(text)
    try:
        clicks = json.loads(text or "[]")
    except json.JSONDecodeError:
        raise EditError('Points must be JSON like "[[x, y], [x, y]]": handle, target, handle, target, …') from None
    if not isinstance(clicks, list) or not all(isinstance(p, list) and len(p) == 2 for p in clicks):
        raise EditError('Points must be a list of [x, y] pairs like "[[10, 20], [30, 20]]".')
    return pair_points([tuple(p) for p in clicks])


def drag_request(image, mask, points, prompt, settings: dict):
    """The /drag inputs -> DragRequest (DragDiffusion) or GuidedDragRequest (DiffEditor / DragonDiffusion).

    ``settings``: FIELDS_UI values by name, ``method``, and the guided sliders as ``guided_<name>``."""
    if not image:
        raise EditError("No image: upload or generate an image first.")
    choice = settings.pop("method", None) or "DragDiffusion"
    method = METHODS.get(choice, str(choice).lower())  # API clients may send "diffeditor"
    guided = {k[len("guided_"):]: settings.pop(k) for k in list(settings) if k.startswith("guided_")}
    common = dict(image=load_image(image), points=parse_clicks(points), mask=load_mask(mask) if mask else None,
                  prompt=prompt or "")
    if method == "dragdiffusion":
        return DragRequest(**common, **settings)
    # The guided methods share only steps and seed with the DragDiffusion sliders.
    shared = {k: settings.get(k, GUIDED_FIELDS[k][2]) for k in ("n_inference_steps", "seed")}
    return GuidedDragRequest(**common, method=method, **shared, **guided)


# ---- instant handlers (no engine) -----------------------------------------------------------------
def on_canvas_value(value, session: Session):
    """Upload, brush strokes, pictures set by the app. The canvas may send one picture with several
    events, some of them empty while the file loads, so empty values are ignored and points are
    only dropped when the picture really changed."""
    image, mask = canvas_image(value)
    if image is None:
        return gr.skip()
    session.update_from_canvas(image, mask)
    return session.preview()


def on_canvas_clear(session: Session):
    session.use_image(None)
    return session.preview()


def on_point_click(session: Session, evt: gr.SelectData):
    if session.image is None:
        gr.Warning("Upload or generate an image first, then click on it.")
    elif evt.index is not None:
        x, y = overlay.to_picture(evt.index, session.zoom)
        session.points.append([x, y])
    return session.preview()


def undo_point(session: Session):
    if session.points:
        session.points.pop()
    return session.preview()


def clear_points(session: Session):
    session.points.clear()
    return session.preview()


def prepare_run(session: Session):
    """Run (or Train LoRA), step 1, instant: arm Cancel and hand the working image, mask and points
    to the /drag (/train_lora) endpoint through hidden components."""
    arm(session)
    if session.image is None:
        return None, None, "[]"
    image = session.save_png(session.image, "input.png")
    mask = None
    if session.mask is not None:
        mask = session.save_png(Image.fromarray(session.mask.astype(np.uint8) * 255), "mask.png")
    return image, mask, json.dumps(session.points)


def continue_from_result(session: Session):
    if not session.history:
        gr.Warning("No result yet: run a drag first.")
        return gr.skip()
    entry = session.history[-1 if session.selected is None else session.selected]
    session.use_image(load_image(entry["after"]))
    return entry["after"], *session.preview()


def receive_image(path, session: Session):
    """An image sent from another tab (ui/links.py) becomes the working image."""
    if not path:
        return gr.skip()
    session.use_image(load_image(path))
    return path, *session.preview()


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
    return ex.canvas_value(), *session.preview(), ex.prompt, ex.method


# ---- engine handlers (one shared GPU queue) -------------------------------------------------------
class EngineHandlers(GpuHandlers):
    """Handlers that run the engine. The Editor (and its models) is held here, never in gr.State."""

    def __init__(self, editor):
        super().__init__(editor)
        self._edit = gpu(GPU_SECONDS["drag"])(editor.edit)
        self._generate = gpu(GPU_SECONDS["generate"])(editor.generate)
        self._train = gpu(GPU_SECONDS["lora"])(editor.train_identity_lora)

    @shows_errors
    def drag(self, image, mask, points, prompt, session: Session, progress=gr.Progress(), **settings):
        """Drag each handle point to its target. points: "[[hx, hy], [tx, ty], ...]" in image pixels."""
        loras = settings.pop("loras", None)
        request = drag_request(image, mask, points, prompt, settings)
        notify(request.notices)
        log.info("drag (%s): %d pair(s), %dx%d, mask=%s", getattr(request, "method", "dragdiffusion"),
                 len(request.points), *request.image.size, request.mask is not None)
        result = self._edit(request, progress=EngineProgress(progress), cancel=self.cancel_of(session),
                            loras=lora_specs(loras))
        notify(result.notices)
        details = {"timings_s": timings(result), "unet_calls": result.unet_calls,
                   "final_points": [[round(x, 1), round(y, 1)] for x, y in result.final_points],
                   "notices": result.notices, "params": result.recipe.get("params"), "mask": request.mask is not None}
        pairs = len(request.points)
        label = "drag" if isinstance(request, DragRequest) else request.method
        session.add_result(request.image, result, f"{label}, {pairs} pair{'s' * (pairs > 1)}", details)
        return *session.shown(), session.gallery(), summary(result, request.mask is not None)

    @shows_errors
    def generate(self, prompt, seed, n_inference_steps, session: Session, progress=gr.Progress()):
        """Text-to-image; the result becomes the working image and is drag-ready (no inversion, no LoRA)."""
        if seed is None or n_inference_steps is None:
            raise EditError("Seed and steps must be whole numbers.")
        result = self._generate(prompt or "", int(seed), n_inference_steps=int(n_inference_steps),
                                progress=EngineProgress(progress), cancel=self.cancel_of(session))
        session.use_image(result.image)
        session.add_result(None, result, "generated", {"timings_s": timings(result), "recipe": result.recipe})
        return (result.image, *session.preview(), prompt, *session.shown(), session.gallery(),
                f"Generated in {result.total_s:.1f} s. It is drag-ready: click points on it and run.")

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

    w.canvas = gr.ImageEditor(label="Image: paint the area that may change", elem_id="canvas", **MASK_CANVAS)
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


def _points_column(w: SimpleNamespace, can_cancel: bool, start: dict, links) -> None:
    """The click preview, prompt, method, Run / Cancel and the settings."""
    w.preview = gr.Image(label="Points: handle (red) → target (blue); frozen area dimmed",
                         type="numpy", format="png", interactive=False, elem_id="points")
    w.points_info = gr.Markdown("Upload or generate an image to start.", label="Points", elem_id="points-info")
    with gr.Row():
        w.undo_btn = gr.Button("Undo last point", size="sm")
        w.clear_btn = gr.Button("Clear points", size="sm")
    w.prompt = gr.Textbox(label="Prompt (optional): what the image shows", elem_id="prompt")
    w.method = gr.Radio(list(METHODS), value="DragDiffusion", label="Method", elem_id="method",
                        info="DragDiffusion: trains an identity LoRA, then optimises the latent (best identity). "
                             "DiffEditor / DragonDiffusion: training-free gradient guidance (no LoRA).")
    with gr.Row():
        w.run_btn = gr.Button("Run drag", variant="primary", elem_id="run")
        w.cancel_btn = gr.Button("Cancel", variant="stop", visible=can_cancel, elem_id="cancel")
    w.status = gr.Markdown("", label="Status", min_height=48, elem_id="status")
    with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
        w.fields = {name: field_input(name, spec, start[name], f"field-{name}", LABELS.get(name))
                    for name, spec in FIELDS.items()}
        w.lora_btn = gr.Button("Train identity LoRA now (optional; Run trains it when needed)", size="sm")
    with gr.Accordion("DiffEditor / DragonDiffusion settings", open=False, elem_id="guided-settings"):
        w.guided_fields = {f"guided_{n}": guided_input(n) for n in GUIDED_UI}
    w.picker = lora_picker(links)


def _results_column(w: SimpleNamespace) -> None:
    w.result = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id="result")
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
        gr.Markdown("**1.** Upload (or generate) an image. **2.** Optionally paint the area that may change; "
                    "the rest stays fixed. **3.** Click a handle point, then its target; repeat for more pairs. "
                    "**4.** Run drag.")
        with gr.Row(equal_height=False):
            with gr.Column():
                _source_column(w)
            with gr.Column():
                _points_column(w, h.can_cancel, start, links)
            with gr.Column():
                _results_column(w)
        # Hidden hand-over from the Run button to the /drag endpoint, so both share one code path.
        w.handover = [gr.File(visible=False), gr.File(visible=False), gr.Textbox(visible=False)]
    _wire_instant(w, links)
    _wire_engine(w, h)


# ---- wiring --------------------------------------------------------------------------------------
def _wire_instant(w: SimpleNamespace, links) -> None:
    """Instant handlers: one small ordered queue, so clicks and canvas updates apply in order."""
    instant = dict(concurrency_id="points", concurrency_limit=1, show_progress="hidden", api_visibility="private")
    shown = [w.preview, w.points_info]
    # Two listeners, not gr.on([...]): the canvas only uploads brush strokes when it has its own .change listener.
    w.canvas.upload(on_canvas_value, [w.canvas, w.session], shown, **instant)
    w.canvas.change(on_canvas_value, [w.canvas, w.session], shown, trigger_mode="always_last", **instant)
    w.canvas.clear(on_canvas_clear, [w.session], shown, **instant)
    w.preview.select(on_point_click, [w.session], shown, trigger_mode="multiple", **instant)
    w.undo_btn.click(undo_point, [w.session], shown, **instant)
    w.clear_btn.click(clear_points, [w.session], shown, **instant)
    w.gallery.select(on_select, [w.session], [w.result, w.download, w.details], **instant)
    w.example_set.select(load_example, [w.session], [w.canvas, *shown, w.prompt, w.method], **instant)
    w.continue_btn.click(continue_from_result, [w.session], [w.canvas, *shown], **instant)
    if links is not None:
        links.inboxes["drag"].change(receive_image, [links.inboxes["drag"], w.session], [w.canvas, *shown], **instant)
    w.cancel_btn.click(request_cancel, [w.session], [w.status], queue=False, api_visibility="private")


def _wire_engine(w: SimpleNamespace, h: EngineHandlers) -> None:
    """Engine handlers: one GPU queue (concurrency_id "gpu", limit 1 from queue(default_concurrency_limit=1))."""
    engine = dict(concurrency_id="gpu", show_progress_on=[w.status])
    hand_over = dict(fn=prepare_run, inputs=[w.session], outputs=w.handover, queue=False, api_visibility="private")
    image_file, _, _ = w.handover
    w.run_btn.click(**hand_over).then(
        h.drag, [*w.handover, w.prompt, w.session], [w.result, w.download, w.details, w.gallery, w.status],
        inputs_kwargs=with_loras(w.fields | {"method": w.method} | w.guided_fields, w.picker),
        api_name="drag", **engine)
    w.gen_btn.click(arm, [w.session], None, queue=False, api_visibility="private").then(
        h.generate, [w.gen_prompt, w.gen_seed, w.fields["n_inference_steps"], w.session],
        [w.canvas, w.preview, w.points_info, w.prompt, w.result, w.download, w.details, w.gallery, w.status],
        api_name="generate", **engine)
    w.lora_btn.click(**hand_over).then(
        h.train_lora, [image_file, w.prompt, w.session], [w.status],
        inputs_kwargs=with_loras({k: w.fields[k] for k in LORA_FIELDS}, w.picker), api_name="train_lora", **engine)
