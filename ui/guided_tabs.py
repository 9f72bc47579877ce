"""Move & Resize, Paste and Appearance tabs (DiffEditor / DragonDiffusion guided editing).

Each Run button saves the canvases to files and calls an API endpoint (``/move``, ``/paste``,
``/appearance``) that API clients can call the same way::

    Client(url).predict(handle_file("in.png"), handle_file("object.png"), 30, 0, 1.0, "", "DiffEditor",
                        api_name="/move")   # image, object mask, dx, dy, scale, prompt, method

The three tabs share one history (before/after, download with the recipe, continue from a result).
"""
from __future__ import annotations

import logging

import gradio as gr
import numpy as np
import torch
from PIL import Image

from editing.geometry import mask_centre, place
from editing.images import load_image, load_mask
from editing.requests import AppearanceRequest, EditError, MoveRequest, PasteRequest
from ui import overlay
from ui.drag_tab import (GPU_SECONDS, EngineProgress, Session, arm, canvas_image, lora_specs, notify, request_cancel,
                         shows_errors, summary)
from ui.zerogpu import gpu, zero_gpu

log = logging.getLogger(__name__)

METHODS = {"DiffEditor": "diffeditor", "DragonDiffusion": "dragondiffusion"}
BRUSH = dict(type="numpy", image_mode="RGBA", format="png", sources=("upload", "clipboard"), transforms=(),
             layers=False, brush=gr.Brush(colors=[("#ff2bd6", 0.5)], color_mode="fixed"))


# ---- previews (instant) -------------------------------------------------------------------------------
def _warp(image: Image.Image, mask: np.ndarray, centre, scale: float, offset, size) -> tuple[np.ndarray, np.ndarray]:
    """(RGB float array, bool mask) of ``image``'s masked object placed like the engine will place it."""
    img = torch.from_numpy(np.asarray(image.convert("RGB").resize(size), np.float32)).permute(2, 0, 1)[None]
    m = torch.from_numpy(np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127)
    m = m.float()[None, None]
    rgb = place(img, centre, scale, offset, size, mode="bilinear")[0].permute(1, 2, 0).numpy()
    return rgb, place(m, centre, scale, offset, size)[0, 0].numpy() > 0.5


def placement_preview(base: Image.Image, obj: Image.Image, mask: np.ndarray, dx: float, dy: float, scale: float,
                      old: np.ndarray | None = None) -> np.ndarray:
    """The base picture with the object drawn translucent where it will land (and its old place outlined)."""
    size = base.size
    m = mask if mask.shape == (size[1], size[0]) else (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127)
    rgb, placed = _warp(obj, m, mask_centre(m), float(scale), (float(dx), float(dy)), size)
    out = np.asarray(base.convert("RGB"), np.float32).copy()
    out[placed] = 0.35 * out[placed] + 0.65 * rgb[placed]
    if old is not None and old.any():
        import cv2

        edge = cv2.morphologyEx(old.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        out[edge] = (255, 43, 214)
    return overlay.zoomed(np.clip(out, 0, 255).astype(np.uint8))


def _num(v, name: str, default: float = 0.0) -> float:
    try:
        f = float(default if v is None else v)
    except (TypeError, ValueError):
        raise EditError(f"{name} must be a number.") from None
    if not np.isfinite(f):
        raise EditError(f"{name} must be a finite number.")
    return f


def move_preview(value, dx, dy, scale):
    image, mask = canvas_image(value)
    if image is None:
        return None, "Upload a picture, then paint the object to move."
    if mask is None:
        return overlay.zoomed(overlay.as_rgb(image)), "Paint the object to move with the brush."
    try:
        dx, dy, scale = _num(dx, "dx"), _num(dy, "dy"), _num(scale, "scale", 1.0)
    except EditError as e:
        return gr.skip(), str(e)
    return (placement_preview(image, image, mask, dx, dy, max(scale, 0.05), old=mask),
            "Object shown where it will go (outline: its old place). Click the preview to place its centre.")


def move_click(value, evt: gr.SelectData):
    image, mask = canvas_image(value)
    if image is None or mask is None or evt.index is None:
        return gr.skip(), gr.skip()
    x, y = overlay.to_picture(evt.index, overlay.preview_zoom(image.size))
    cx, cy = mask_centre(mask)
    return round(x - cx), round(y - cy)


def paste_preview(base, ref_value, dx, dy, scale):
    ref, mask = canvas_image(ref_value)
    if base is None or ref is None:
        return None, "Upload the photo and the reference image, then paint the object on the reference."
    base = Image.fromarray(base) if isinstance(base, np.ndarray) else base
    if mask is None:
        return overlay.zoomed(overlay.as_rgb(base)), "Paint the object to paste on the reference image."
    try:
        dx, dy, scale = _num(dx, "dx"), _num(dy, "dy"), _num(scale, "scale", 1.0)
    except EditError as e:
        return gr.skip(), str(e)
    return (placement_preview(base, ref.resize(base.size), mask, dx, dy, max(scale, 0.05)),
            "The object is shown where it will be pasted. Click the preview to place its centre.")


def paste_click(base, ref_value, evt: gr.SelectData):
    ref, mask = canvas_image(ref_value)
    if base is None or mask is None or evt.index is None:
        return gr.skip(), gr.skip()
    h, w = np.asarray(base).shape[:2]
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    x, y = overlay.to_picture(evt.index, overlay.preview_zoom((w, h)))
    cx, cy = mask_centre(m)
    return round(x - cx), round(y - cy)


# ---- hand-over: canvases -> files for the API endpoints ------------------------------------------------
def _save_canvas(session: Session, value, name: str, need_mask: bool = True):
    image, mask = canvas_image(value)
    if image is None:
        return None, None
    img_path = session.save_png(image, f"{name}.png")
    mask_path = session.save_png(Image.fromarray(mask.astype(np.uint8) * 255), f"{name}-mask.png") if mask is not None else None
    return img_path, mask_path


def prepare_move(session: Session, value):
    arm(session)
    return _save_canvas(session, value, "move")


def prepare_paste(session: Session, base, ref_value):
    arm(session)
    base_path = session.save_png(Image.fromarray(base).convert("RGB"), "paste-base.png") if base is not None else None
    return (base_path, *_save_canvas(session, ref_value, "paste-ref"))


def prepare_appearance(session: Session, base_value, ref_value):
    arm(session)
    return (*_save_canvas(session, base_value, "look-base"), *_save_canvas(session, ref_value, "look-ref"))


# ---- engine handlers ------------------------------------------------------------------------------------
class GuidedHandlers:
    def __init__(self, editor):
        self.editor = editor
        self.can_cancel = not zero_gpu()
        self._edit = gpu(GPU_SECONDS["drag"])(editor.edit)

    def _run(self, request, session: Session, progress, caption: str, loras=None):
        notify(request.notices)
        result = self._edit(request, progress=EngineProgress(progress),
                            cancel=session.cancel if self.can_cancel else None, loras=lora_specs(loras))
        notify(result.notices)
        details = {"timings_s": {k: round(v, 3) for k, v in result.timings.items()}, "unet_calls": result.unet_calls,
                   "notices": result.notices, "params": result.recipe.get("params"), **result.extra}
        session.add_result(request.image, result, caption, details)
        return *session.shown(), session.gallery(), summary(result, True)

    @staticmethod
    def _kw(method, steps, seed):
        if method is not None and method not in METHODS and method not in METHODS.values():
            raise EditError(f"Unknown method {method!r}: choose DiffEditor or DragonDiffusion.")
        return dict(method=METHODS.get(method, method or "diffeditor"),
                    n_inference_steps=int(_num(steps, "Steps", 50)), seed=int(_num(seed, "Seed", 42)))

    @shows_errors
    def move(self, image, mask, dx, dy, scale, prompt, method, session: Session, progress=gr.Progress(),
             steps=50, seed=42, loras=None):
        """Move (dx, dy px) and resize (scale) the object under ``mask``; the hole is filled."""
        if not image:
            raise EditError("No image: upload a picture first.")
        if not mask:
            raise EditError("No object mask: paint the object to move.")
        req = MoveRequest(image=load_image(image), mask=load_mask(mask), offset=(_num(dx, "dx"), _num(dy, "dy")),
                          scale=_num(scale, "Scale", 1.0), prompt=prompt or "", **self._kw(method, steps, seed))
        return self._run(req, session, progress, f"move ({req.offset[0]:+.0f}, {req.offset[1]:+.0f}) ×{req.scale:g}", loras)

    @shows_errors
    def paste(self, image, reference, reference_mask, dx, dy, scale, prompt, method, session: Session,
              progress=gr.Progress(), steps=50, seed=42, loras=None):
        """Paste the object under ``reference_mask`` from ``reference`` into ``image``, moved by (dx, dy), scaled."""
        if not image:
            raise EditError("No photo: upload the picture to paste into.")
        if not reference:
            raise EditError("No reference image: upload the picture that holds the object.")
        if not reference_mask:
            raise EditError("The reference image needs a mask: paint the object to paste.")
        req = PasteRequest(image=load_image(image), reference=load_image(reference), reference_mask=load_mask(reference_mask),
                           offset=(_num(dx, "dx"), _num(dy, "dy")), scale=_num(scale, "Scale", 1.0), prompt=prompt or "",
                           **self._kw(method, steps, seed))
        return self._run(req, session, progress, "paste", loras)

    @shows_errors
    def appearance(self, image, mask, reference, reference_mask, prompt, method, session: Session,
                   progress=gr.Progress(), steps=50, seed=42, loras=None):
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
        return self._run(req, session, progress, "appearance", loras)


# ---- layout ---------------------------------------------------------------------------------------------
def _results(prefix: str):
    result = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id=f"{prefix}-result")
    download = gr.DownloadButton("Download PNG (with recipe)", size="md", elem_id=f"{prefix}-download")
    gallery = gr.Gallery(label="History (shared by Move, Paste and Appearance)", format="png", columns=4,
                         fit_columns=False, height=200, allow_preview=False, elem_id=f"{prefix}-history")
    with gr.Accordion("Details: timings, UNet calls, memory bank", open=False):
        details = gr.JSON(label="Details")
    return result, download, gallery, details


def _controls(prefix: str, settings: dict):
    prompt = gr.Textbox(label="Prompt (optional): what the image shows", elem_id=f"{prefix}-prompt")
    method = gr.Radio(list(METHODS), value="DiffEditor", label="Method", elem_id=f"{prefix}-method",
                      info="DiffEditor: regional SDE + time travel (sharper); DragonDiffusion: guidance at every early step.")
    with gr.Accordion("Settings", open=False):
        steps = gr.Slider(4, 100, value=settings.get("n_inference_steps", 50), step=1, label="DDIM steps",
                          elem_id=f"{prefix}-steps")
        seed = gr.Number(value=settings.get("seed", 42), precision=0, label="Seed")
    with gr.Row():
        run = gr.Button("Run", variant="primary", elem_id=f"{prefix}-run")
        cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
    status = gr.Markdown("", min_height=48, elem_id=f"{prefix}-status")
    return prompt, method, steps, seed, run, cancel, status


def build_guided_tabs(editor, settings: dict | None = None, links=None) -> None:
    """Add the Move & Resize, Paste and Appearance tabs."""
    settings = settings or {}
    h = GuidedHandlers(editor)
    engine = dict(concurrency_id="gpu")
    instant = dict(concurrency_id="guided-preview", concurrency_limit=1, show_progress="hidden", api_visibility="private")
    session = gr.State(Session(), delete_callback=Session.close)

    # -- Move & Resize
    with gr.Tab("Move & Resize", id="move"):
        gr.Markdown("**1.** Upload a picture and paint the object. **2.** Click the preview where its centre should go "
                    "(or use the sliders) and pick a size. **3.** Run: the object moves and the hole is filled.")
        with gr.Row(equal_height=False):
            with gr.Column():
                canvas = gr.ImageEditor(label="Picture: paint the object", elem_id="move-canvas", **BRUSH)
                with gr.Row():
                    dx = gr.Slider(-1024, 1024, value=0, step=1, label="dx (px)", elem_id="move-dx")
                    dy = gr.Slider(-1024, 1024, value=0, step=1, label="dy (px)", elem_id="move-dy")
                scale = gr.Slider(0.2, 4.0, value=1.0, step=0.05, label="Scale", elem_id="move-scale")
            with gr.Column():
                preview = gr.Image(label="Where the object will go", type="numpy", format="png", interactive=False,
                                   elem_id="move-preview")
                info = gr.Markdown("Upload a picture, then paint the object to move.")
                prompt, method, steps, seed, run, cancel, status = _controls("move", settings)
                picker = links.lora_picker() if links is not None else None
            with gr.Column():
                outputs = _results("move")
        files = [gr.File(visible=False), gr.File(visible=False)]
    # .upload too: on a busy machine the editor's first .change can arrive before its picture has loaded
    for ev in (canvas.upload, canvas.change, dx.change, dy.change, scale.change):
        ev(move_preview, [canvas, dx, dy, scale], [preview, info], trigger_mode="always_last", **instant)
    preview.select(move_click, [canvas], [dx, dy], **instant)
    cancel.click(request_cancel, [session], [status], queue=False, api_visibility="private")
    run.click(prepare_move, [session, canvas], files, queue=False, api_visibility="private").then(
        h.move, [*files, dx, dy, scale, prompt, method, session], [outputs[0], outputs[1], outputs[3], outputs[2], status],
        inputs_kwargs={"steps": steps, "seed": seed} | ({"loras": picker} if picker is not None else {}),
        api_name="move", show_progress_on=[status], **engine)
    if links is not None:
        links.inboxes["move"].change(lambda p: p, [links.inboxes["move"]], [canvas], **instant)

    # -- Paste
    with gr.Tab("Paste", id="paste"):
        gr.Markdown("**1.** Upload the photo, and a reference picture on which you paint the object. **2.** Click the "
                    "preview where the object should go; pick its size. **3.** Run: it is pasted and blended in.")
        with gr.Row(equal_height=False):
            with gr.Column():
                base = gr.Image(label="Photo to paste into", type="numpy", format="png", elem_id="paste-base")
                ref = gr.ImageEditor(label="Reference: paint the object", elem_id="paste-ref", **BRUSH)
            with gr.Column():
                p_preview = gr.Image(label="Live preview: click to place", type="numpy", format="png",
                                     interactive=False, elem_id="paste-preview")
                p_info = gr.Markdown("Upload the photo and the reference image.")
                with gr.Row():
                    p_dx = gr.Slider(-1024, 1024, value=0, step=1, label="dx (px)", elem_id="paste-dx")
                    p_dy = gr.Slider(-1024, 1024, value=0, step=1, label="dy (px)", elem_id="paste-dy")
                p_scale = gr.Slider(0.2, 4.0, value=1.0, step=0.05, label="Scale", elem_id="paste-scale")
                p_prompt, p_method, p_steps, p_seed, p_run, p_cancel, p_status = _controls("paste", settings)
                p_picker = links.lora_picker() if links is not None else None
            with gr.Column():
                p_out = _results("paste")
        p_files = [gr.File(visible=False) for _ in range(3)]
    for ev in (base.change, ref.upload, ref.change, p_dx.change, p_dy.change, p_scale.change):
        ev(paste_preview, [base, ref, p_dx, p_dy, p_scale], [p_preview, p_info], trigger_mode="always_last", **instant)
    p_preview.select(paste_click, [base, ref], [p_dx, p_dy], **instant)
    p_cancel.click(request_cancel, [session], [p_status], queue=False, api_visibility="private")
    p_run.click(prepare_paste, [session, base, ref], p_files, queue=False, api_visibility="private").then(
        h.paste, [*p_files, p_dx, p_dy, p_scale, p_prompt, p_method, session],
        [p_out[0], p_out[1], p_out[3], p_out[2], p_status],
        inputs_kwargs={"steps": p_steps, "seed": p_seed} | ({"loras": p_picker} if p_picker is not None else {}),
        api_name="paste", show_progress_on=[p_status], **engine)
    if links is not None:
        links.inboxes["paste"].change(lambda p: p, [links.inboxes["paste"]], [base], **instant)

    # -- Appearance
    with gr.Tab("Appearance", id="appearance"):
        gr.Markdown("**1.** Paint the object whose look should change. **2.** Upload a reference and paint the object "
                    "whose look to take. **3.** Run.")
        with gr.Row(equal_height=False):
            with gr.Column():
                a_base = gr.ImageEditor(label="Photo: paint the object", elem_id="look-base", **BRUSH)
                a_ref = gr.ImageEditor(label="Reference: paint the object with the look", elem_id="look-ref", **BRUSH)
            with gr.Column():
                a_prompt, a_method, a_steps, a_seed, a_run, a_cancel, a_status = _controls("look", settings)
                a_picker = links.lora_picker() if links is not None else None
            with gr.Column():
                a_out = _results("look")
        a_files = [gr.File(visible=False) for _ in range(4)]
    a_cancel.click(request_cancel, [session], [a_status], queue=False, api_visibility="private")
    a_run.click(prepare_appearance, [session, a_base, a_ref], a_files, queue=False, api_visibility="private").then(
        h.appearance, [*a_files, a_prompt, a_method, session], [a_out[0], a_out[1], a_out[3], a_out[2], a_status],
        inputs_kwargs={"steps": a_steps, "seed": a_seed} | ({"loras": a_picker} if a_picker is not None else {}),
        api_name="appearance", show_progress_on=[a_status], **engine)
    if links is not None:
        links.inboxes["appearance"].change(lambda p: p, [links.inboxes["appearance"]], [a_base], **instant)

    # The shared history: picking an entry in any gallery shows it in that tab.
    for out in (outputs, p_out, a_out):
        out[2].select(_pick, [session], [out[0], out[1], out[3]], **instant)


def _pick(session: Session, evt: gr.SelectData):
    session.selected = evt.index if isinstance(evt.index, int) else None
    return session.shown()
