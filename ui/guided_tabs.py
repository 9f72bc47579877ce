"""Move & Resize, Paste and Appearance tabs (DiffEditor / DragonDiffusion guided editing).

Each Run button saves the canvases to files and calls an API endpoint (``/move``, ``/paste``,
``/appearance``) that API clients can call the same way::

    Client(url).predict(handle_file("in.png"), handle_file("object.png"), 30, 0, 1.0, "", "DiffEditor",
                        api_name="/move")   # image, object mask, dx, dy, scale, prompt, method

The three tabs share one history (before/after, download with the recipe, continue from a result).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from types import SimpleNamespace

import cv2
import gradio as gr
import numpy as np
from PIL import Image

from editing.geometry import mask_centre, place_object
from editing.images import load_image, load_mask
from editing.requests import GUIDED_FIELDS, AppearanceRequest, MoveRequest, PasteRequest
from models.errors import EditError
from ui import click_mask, examples, overlay
from ui.common import (
    GPU_SECONDS,
    MASK_CANVAS,
    GpuHandlers,
    arm,
    canvas_image,
    lora_picker,
    lora_specs,
    notify,
    request_cancel,
    streams_errors,
    summary,
    timings,
    with_loras,
)
from ui.feedback import LiveProgress
from ui.history import BeforeAfter, on_select
from ui.zerogpu import gpu

log = logging.getLogger(__name__)

METHODS = {"DiffEditor": "diffeditor", "DragonDiffusion": "dragondiffusion"}
STEPS, SEED = GUIDED_FIELDS["n_inference_steps"], GUIDED_FIELDS["seed"]  # (min, max, default, why)
PLACEMENT = {f.name: f.default for f in dataclasses.fields(MoveRequest) if f.name in ("offset", "scale")}
# Pure UI ranges: the sliders' reach (the API takes any offset) and the scales MoveRequest accepts.
OFFSET_REACH, SCALE_RANGE, STEPS_SLIDER_MAX = 1024, (0.2, 4.0), 100


# ---- previews (instant) -------------------------------------------------------------------------------
def placement_preview(base: Image.Image, obj: Image.Image, mask: np.ndarray, dx: float, dy: float, scale: float,
                      old: np.ndarray | None = None) -> np.ndarray:
    """The base picture with the object drawn translucent where it will land (and its old place outlined)."""
    rgb, placed = place_object(obj, mask, float(scale), (float(dx), float(dy)), base.size)
    out = np.asarray(base.convert("RGB"), np.float32).copy()
    out[placed] = 0.35 * out[placed] + 0.65 * rgb[placed]
    if old is not None and old.any():
        edge = cv2.morphologyEx(old.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        out[edge] = (255, 43, 214)
    return overlay.zoomed(np.clip(out, 0, 255).astype(np.uint8))


def _num(v, name: str, default: float) -> float:
    try:
        f = float(default if v is None else v)
    except (TypeError, ValueError):
        raise EditError(f"{name} must be a number.") from None
    if not np.isfinite(f):
        raise EditError(f"{name} must be a finite number.")
    return f


def _offset(dx, dy) -> tuple[float, float]:
    """The dx, dy boxes, checked; a blank box means the request's default offset."""
    return _num(dx, "dx", PLACEMENT["offset"][0]), _num(dy, "dy", PLACEMENT["offset"][1])


def _placement(dx, dy, scale) -> tuple[float, float, float]:
    """The preview sliders' (dx, dy, scale), checked."""
    return *_offset(dx, dy), _num(scale, "scale", PLACEMENT["scale"])


def received(what: str, image, mask) -> str:
    """What the server has of one canvas, e.g. "Photo 64×64, mask: 113 px painted": the line a person (and a
    browser test) reads to know a picture or brush stroke has arrived before pressing Run."""
    if image is None:
        return f"{what}: none yet"
    w, h = image.size if hasattr(image, "size") and not isinstance(image, np.ndarray) else np.asarray(image).shape[1::-1]
    n = 0 if mask is None else int(np.count_nonzero(mask))
    return f"{what} {w}×{h}, mask: {n} px painted" if n else f"{what} {w}×{h}, no mask painted"


def move_preview(value, dx, dy, scale):
    image, mask = canvas_image(value)
    if image is None:
        return None, "Upload a picture, then paint the object to move."
    ack = received("Picture", image, mask)
    if mask is None:
        return overlay.zoomed(overlay.as_rgb(image)), f"{ack}. Paint the object to move with the brush."
    try:
        dx, dy, scale = _placement(dx, dy, scale)
    except EditError as e:
        return gr.skip(), f"{ack}. {e}"
    return (placement_preview(image, image, mask, dx, dy, max(scale, 0.05), old=mask),
            f"{ack}. Object shown where it will go (outline: its old place). Click the preview to place its centre.")


def move_click(value, evt: gr.SelectData):
    image, mask = canvas_image(value)
    if image is None or mask is None or evt.index is None:
        return gr.skip(), gr.skip()
    x, y = overlay.to_picture(evt.index, overlay.preview_zoom(image.size))
    cx, cy = mask_centre(mask)
    return round(x - cx), round(y - cy)


def paste_preview(base, ref_value, dx, dy, scale):
    ref, mask = canvas_image(ref_value)
    ack = f"{received('Photo', base, None).split(',')[0]} · {received('Reference', ref, mask)}"
    if base is None or ref is None:
        return None, f"{ack}. Upload the photo and the reference image, then paint the object on the reference."
    base = Image.fromarray(base) if isinstance(base, np.ndarray) else base
    if mask is None:
        return overlay.zoomed(overlay.as_rgb(base)), f"{ack}. Paint the object to paste on the reference image."
    try:
        dx, dy, scale = _placement(dx, dy, scale)
    except EditError as e:
        return gr.skip(), f"{ack}. {e}"
    return (placement_preview(base, ref.resize(base.size), mask, dx, dy, max(scale, 0.05)),
            f"{ack}. The object is shown where it will be pasted. Click the preview to place its centre.")


def appearance_received(base_value, ref_value) -> str:
    """The Appearance tab's acknowledgement line: both canvases as the server has them."""
    return f"{received('Photo', *canvas_image(base_value))} · {received('Reference', *canvas_image(ref_value))}"


def paste_click(base, ref_value, evt: gr.SelectData):
    ref, mask = canvas_image(ref_value)
    if base is None or mask is None or evt.index is None:
        return gr.skip(), gr.skip()
    h, w = np.asarray(base).shape[:2]
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    x, y = overlay.to_picture(evt.index, overlay.preview_zoom((w, h)))
    cx, cy = mask_centre(m)
    return round(x - cx), round(y - cy)


# ---- examples (ui/examples.py) ---------------------------------------------------------------------------
def load_move_example(evt: gr.SelectData):
    """Picture with the object painted, placement, prompt and method of a Move & Resize example."""
    ex = examples.picked("move", evt.index)
    if ex is None:
        return (gr.skip(),) * 6
    v = ex.values
    return examples.canvas_value(v["image"], v["mask"]), v["dx"], v["dy"], v["scale"], v["prompt"], v["method"]


def load_paste_example(evt: gr.SelectData):
    """Photo, reference with the object painted, placement, prompt and method of a Paste example."""
    ex = examples.picked("paste", evt.index)
    if ex is None:
        return (gr.skip(),) * 7
    v = ex.values
    return (np.asarray(v["image"]), examples.canvas_value(v["reference"], v["reference_mask"]), v["dx"], v["dy"],
            v["scale"], v["prompt"], v["method"])


def load_appearance_example(evt: gr.SelectData):
    """Photo and reference, each with its object painted, prompt and method of an Appearance example."""
    ex = examples.picked("appearance", evt.index)
    if ex is None:
        return (gr.skip(),) * 4
    v = ex.values
    return (examples.canvas_value(v["image"], v["mask"]), examples.canvas_value(v["reference"], v["reference_mask"]),
            v["prompt"], v["method"])


# ---- hand-over: canvases -> files for the API endpoints ------------------------------------------------
def _save_canvas(session: BeforeAfter, value, name: str):
    image, mask = canvas_image(value)
    if image is None:
        return None, None
    img_path = session.save_png(image, f"{name}.png")
    if mask is None:
        return img_path, None
    return img_path, session.save_png(Image.fromarray(mask.astype(np.uint8) * 255), f"{name}-mask.png")


def prepare_move(session: BeforeAfter, value):
    arm(session)
    return _save_canvas(session, value, "move")


def prepare_paste(session: BeforeAfter, base, ref_value):
    arm(session)
    base_path = session.save_png(Image.fromarray(base).convert("RGB"), "paste-base.png") if base is not None else None
    return (base_path, *_save_canvas(session, ref_value, "paste-ref"))


def prepare_appearance(session: BeforeAfter, base_value, ref_value):
    arm(session)
    return (*_save_canvas(session, base_value, "look-base"), *_save_canvas(session, ref_value, "look-ref"))


# ---- engine handlers ------------------------------------------------------------------------------------
class GuidedHandlers(GpuHandlers):
    def __init__(self, editor):
        super().__init__(editor)
        self._edit = gpu(GPU_SECONDS["drag"])(editor.edit)

    def _run(self, request, session: BeforeAfter, progress, caption: str, loras=None):
        """Run ``request``, streaming while the engine works: the status line says the phase and the time left in
        it, and the before/after view shows the newest sampling preview (x̂₀) against the input whenever the
        engine sends one (``ui.feedback``); then the result."""
        notify(request.notices)
        cancel = self.cancel_of(session)
        live = LiveProgress(progress)
        before = overlay.as_rgb(request.image)
        def call(cb):
            return self._edit(request, progress=cb, cancel=cancel, loras=lora_specs(loras))
        for snap in live.follow(call, cancel=cancel):
            if cancel is not None and cancel.is_set():
                continue  # Cancel's own status line stays
            view = gr.skip()
            if snap.new_preview and snap.preview is not None:
                view = (before, overlay.as_rgb(snap.preview.resize(request.image.size)))
            yield view, gr.skip(), gr.skip(), gr.skip(), f"Running {caption}: {snap.status}"
        result = live.result
        notify(result.notices)
        details = {"timings_s": timings(result), "unet_calls": result.unet_calls,
                   "notices": result.notices, "params": result.recipe.get("params"), **result.extra,
                   "live": {"previews": live.snapshot().previews_seen}}
        session.add_result(request.image, result, caption, details)
        yield *session.shown(), session.gallery(), summary(result, True)

    @staticmethod
    def _kw(method, steps, seed):
        if method is not None and method not in METHODS and method not in METHODS.values():
            raise EditError(f"Unknown method {method!r}: choose DiffEditor or DragonDiffusion.")
        return dict(method=METHODS.get(method, method or "diffeditor"),
                    n_inference_steps=int(_num(steps, "Steps", STEPS[2])), seed=int(_num(seed, "Seed", SEED[2])))

    @streams_errors(5)
    def move(self, image, mask, dx, dy, scale, prompt, method, session: BeforeAfter, progress=gr.Progress(),
             steps=STEPS[2], seed=SEED[2], loras=None):
        """Move (dx, dy px) and resize (scale) the object under ``mask``; the hole is filled."""
        if not image:
            raise EditError("No image: upload a picture first.")
        if not mask:
            raise EditError("No object mask: paint the object to move.")
        req = MoveRequest(image=load_image(image), mask=load_mask(mask), offset=_offset(dx, dy),
                          scale=_num(scale, "Scale", PLACEMENT["scale"]), prompt=prompt or "",
                          **self._kw(method, steps, seed))
        caption = f"move ({req.offset[0]:+.0f}, {req.offset[1]:+.0f}) ×{req.scale:g}"
        yield from self._run(req, session, progress, caption, loras)

    @streams_errors(5)
    def paste(self, image, reference, reference_mask, dx, dy, scale, prompt, method, session: BeforeAfter,
              progress=gr.Progress(), steps=STEPS[2], seed=SEED[2], loras=None):
        """Paste the object under ``reference_mask`` from ``reference`` into ``image``, moved by (dx, dy), scaled."""
        if not image:
            raise EditError("No photo: upload the picture to paste into.")
        if not reference:
            raise EditError("No reference image: upload the picture that holds the object.")
        if not reference_mask:
            raise EditError("The reference image needs a mask: paint the object to paste.")
        req = PasteRequest(image=load_image(image), reference=load_image(reference),
                           reference_mask=load_mask(reference_mask), offset=_offset(dx, dy),
                           scale=_num(scale, "Scale", PLACEMENT["scale"]), prompt=prompt or "",
                           **self._kw(method, steps, seed))
        yield from self._run(req, session, progress, "paste", loras)

    @streams_errors(5)
    def appearance(self, image, mask, reference, reference_mask, prompt, method, session: BeforeAfter,
                   progress=gr.Progress(), steps=STEPS[2], seed=SEED[2], loras=None):
        """Give the object under ``mask`` the look of the object under ``reference_mask``."""
        if not image or not mask:
            raise EditError("Upload the photo and paint the object whose look should change.")
        if not reference:
            raise EditError("No reference image: upload the picture whose object has the look you want.")
        if not reference_mask:
            raise EditError("The reference image needs a mask: paint the object whose look to take.")
        req = AppearanceRequest(image=load_image(image), mask=load_mask(mask), reference=load_image(reference),
                                reference_mask=load_mask(reference_mask), prompt=prompt or "",
                                **self._kw(method, steps, seed))
        yield from self._run(req, session, progress, "appearance", loras)


# ---- layout ---------------------------------------------------------------------------------------------
def _results(prefix: str) -> SimpleNamespace:
    out = SimpleNamespace()
    out.result = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id=f"{prefix}-result")
    out.download = gr.DownloadButton("Download PNG (with recipe)", size="md", elem_id=f"{prefix}-download")
    out.gallery = gr.Gallery(label="History (shared by Move, Paste and Appearance)", format="png", columns=4,
                             fit_columns=False, height=200, allow_preview=False, elem_id=f"{prefix}-history")
    with gr.Accordion("Details: timings, UNet calls, memory bank", open=False):
        out.details = gr.JSON(label="Details")
    return out


def _controls(prefix: str, settings: dict) -> SimpleNamespace:
    c = SimpleNamespace()
    c.prompt = gr.Textbox(label="Prompt (optional): what the image shows", elem_id=f"{prefix}-prompt")
    c.method = gr.Radio(list(METHODS), value="DiffEditor", label="Method", elem_id=f"{prefix}-method",
                        info="DiffEditor: regional SDE + time travel (sharper); DragonDiffusion: guidance at every early step.")
    with gr.Accordion("Settings", open=False):
        c.steps = gr.Slider(STEPS[0], STEPS_SLIDER_MAX, value=settings.get("n_inference_steps", STEPS[2]), step=1,
                            label="DDIM steps", elem_id=f"{prefix}-steps")
        c.seed = gr.Number(value=settings.get("seed", SEED[2]), precision=0, label="Seed")
    with gr.Row():
        c.run = gr.Button("Run", variant="primary", elem_id=f"{prefix}-run")
        c.cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
    c.status = gr.Markdown("", min_height=48, elem_id=f"{prefix}-status")
    return c


def _placement_sliders(prefix: str):
    """dx, dy (pixels) and scale, starting at the request's defaults (no move)."""
    with gr.Row():
        dx = gr.Slider(-OFFSET_REACH, OFFSET_REACH, value=PLACEMENT["offset"][0], step=1, label="dx (px)",
                       elem_id=f"{prefix}-dx")
        dy = gr.Slider(-OFFSET_REACH, OFFSET_REACH, value=PLACEMENT["offset"][1], step=1, label="dy (px)",
                       elem_id=f"{prefix}-dy")
    scale = gr.Slider(*SCALE_RANGE, value=PLACEMENT["scale"], step=0.05, label="Scale", elem_id=f"{prefix}-scale")
    return dx, dy, scale


def _wire_run(t: SimpleNamespace, prepare, canvases: list, handler, params: list, api_name: str) -> None:
    """Cancel; Run = save the canvases to ``t.files`` (instant), then the ``api_name`` endpoint on the GPU queue;
    the tab's inbox (ui/links.py) of the same name."""
    c, out = t.controls, t.out
    c.cancel.click(request_cancel, [t.session], [c.status], queue=False, api_visibility="private")
    c.run.click(prepare, [t.session, *canvases], t.files, queue=False, api_visibility="private").then(
        handler, [*t.files, *params, c.prompt, c.method, t.session],
        [out.result, out.download, out.details, out.gallery, c.status],
        inputs_kwargs=with_loras({"steps": c.steps, "seed": c.seed}, t.picker),
        api_name=api_name, show_progress_on=[c.status], concurrency_id="gpu")
    if t.links is not None:  # a picture sent from another tab lands on the first canvas
        inbox = t.links.inboxes[api_name]
        inbox.change(lambda p: p, [inbox], [canvases[0]], **t.instant)


@contextlib.contextmanager
def _tab(t: SimpleNamespace, label: str, tab_id: str):
    """A ``gr.Tab`` whose body starts with the history shared by the three tabs (created in the first one).

    The shared gr.State must live inside a Tab: any other direct child of ``gr.Tabs`` (even an invisible
    State) shifts Gradio 6.31's tab bar, so after a visit the next tab's button shows the visited tab's
    label. ``ui.app.check_tabs`` refuses such a child."""
    with gr.Tab(label, id=tab_id):
        if t.shared.session is None:
            t.shared.session = gr.State(BeforeAfter(), delete_callback=BeforeAfter.close)
        t.session = t.shared.session
        yield


def _move_tab(t: SimpleNamespace, h: GuidedHandlers, settings: dict) -> None:
    with _tab(t, "Move & Resize", "move"):
        gr.Markdown("**1.** Upload a picture and paint the object (or click it to select it). **2.** Click the preview where its centre should go "
                    "(or use the sliders) and pick a size. **3.** Run: the object moves and the hole is filled.")
        with gr.Row(equal_height=False):
            with gr.Column():
                canvas = gr.ImageEditor(label="Picture: paint the object", elem_id="move-canvas", **MASK_CANVAS)
                clicks = click_mask.panel("move-canvas", "the object to move")
                dx, dy, scale = _placement_sliders("move")
                table = examples.example_table("move", "move-examples", "picture, object, placement and prompt")
            with gr.Column():
                preview = gr.Image(label="Where the object will go", type="numpy", format="png", interactive=False,
                                   elem_id="move-preview")
                info = gr.Markdown("Upload a picture, then paint the object to move.", elem_id="move-info")
                t.controls = _controls("move", settings)
                t.picker = lora_picker(t.links)
            with gr.Column():
                t.out = _results("move")
        t.files = [gr.File(visible=False), gr.File(visible=False)]
    # .upload too: on a busy machine the editor's first .change can arrive before its picture has loaded
    for ev in (canvas.upload, canvas.change, dx.change, dy.change, scale.change):
        ev(move_preview, [canvas, dx, dy, scale], [preview, info], trigger_mode="always_last", **t.instant)
    preview.select(move_click, [canvas], [dx, dy], **t.instant)
    click_mask.wire(clicks, canvas)
    table.select(load_move_example, None, [canvas, dx, dy, scale, t.controls.prompt, t.controls.method],
                 **t.instant)
    _wire_run(t, prepare_move, [canvas], h.move, [dx, dy, scale], "move")


def _paste_tab(t: SimpleNamespace, h: GuidedHandlers, settings: dict) -> None:
    with _tab(t, "Paste", "paste"):
        gr.Markdown("**1.** Upload the photo, and a reference picture on which you paint (or click) the object. **2.** Click the "
                    "preview where the object should go; pick its size. **3.** Run: it is pasted and blended in.")
        with gr.Row(equal_height=False):
            with gr.Column():
                base = gr.Image(label="Photo to paste into", type="numpy", format="png", elem_id="paste-base")
                ref = gr.ImageEditor(label="Reference: paint the object", elem_id="paste-ref", **MASK_CANVAS)
                clicks = click_mask.panel("paste-ref", "the object to paste")
                table = examples.example_table("paste", "paste-examples", "photo, reference, object, placement and "
                                                                          "prompt")
            with gr.Column():
                preview = gr.Image(label="Live preview: click to place", type="numpy", format="png",
                                   interactive=False, elem_id="paste-preview")
                info = gr.Markdown("Upload the photo and the reference image.", elem_id="paste-info")
                dx, dy, scale = _placement_sliders("paste")
                t.controls = _controls("paste", settings)
                t.picker = lora_picker(t.links)
            with gr.Column():
                t.out = _results("paste")
        t.files = [gr.File(visible=False) for _ in range(3)]
    for ev in (base.change, ref.upload, ref.change, dx.change, dy.change, scale.change):
        ev(paste_preview, [base, ref, dx, dy, scale], [preview, info], trigger_mode="always_last", **t.instant)
    preview.select(paste_click, [base, ref], [dx, dy], **t.instant)
    click_mask.wire(clicks, ref)  # the photo pasted into takes no mask
    table.select(load_paste_example, None, [base, ref, dx, dy, scale, t.controls.prompt, t.controls.method],
                 **t.instant)
    _wire_run(t, prepare_paste, [base, ref], h.paste, [dx, dy, scale], "paste")


def _appearance_tab(t: SimpleNamespace, h: GuidedHandlers, settings: dict) -> None:
    with _tab(t, "Appearance", "appearance"):
        gr.Markdown("**1.** Paint (or click) the object whose look should change. **2.** Upload a reference and paint "
                    "(or click) the object whose look to take. **3.** Run.")
        with gr.Row(equal_height=False):
            with gr.Column():
                base = gr.ImageEditor(label="Photo: paint the object", elem_id="look-base", **MASK_CANVAS)
                base_clicks = click_mask.panel("look-base", "the object whose look changes")
                ref = gr.ImageEditor(label="Reference: paint the object with the look", elem_id="look-ref",
                                     **MASK_CANVAS)
                ref_clicks = click_mask.panel("look-ref", "the object with the look")
                table = examples.example_table("appearance", "look-examples", "photo, reference, both objects and "
                                                                              "prompt")
            with gr.Column():
                info = gr.Markdown(appearance_received(None, None), elem_id="look-info")
                t.controls = _controls("look", settings)
                t.picker = lora_picker(t.links)
            with gr.Column():
                t.out = _results("look")
        t.files = [gr.File(visible=False) for _ in range(4)]
    for ev in (base.upload, base.change, ref.upload, ref.change):
        ev(appearance_received, [base, ref], [info], trigger_mode="always_last", **t.instant)
    table.select(load_appearance_example, None, [base, ref, t.controls.prompt, t.controls.method], **t.instant)
    click_mask.wire(base_clicks, base)
    click_mask.wire(ref_clicks, ref)
    _wire_run(t, prepare_appearance, [base, ref], h.appearance, [], "appearance")


def build_guided_tabs(editor, settings: dict | None = None, links=None) -> None:
    """Add the Move & Resize, Paste and Appearance tabs."""
    settings = settings or {}
    h = GuidedHandlers(editor)
    instant = dict(concurrency_id="guided-preview", concurrency_limit=1, show_progress="hidden",
                   api_visibility="private")
    shared = SimpleNamespace(session=None)
    tabs = [SimpleNamespace(shared=shared, links=links, instant=instant) for _ in range(3)]
    for t, build in zip(tabs, (_move_tab, _paste_tab, _appearance_tab)):
        build(t, h, settings)
    # The shared history: picking an entry in any gallery shows it in that tab.
    for t in tabs:
        t.out.gallery.select(on_select, [shared.session], [t.out.result, t.out.download, t.out.details], **instant)
