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

import functools
import json
import logging
import math
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from editing.images import load_image, load_mask, save_png_with_recipe
from editing.requests import (GUIDED_DEFAULTS, GUIDED_FIELDS, DragRequest, EditCancelled, EditError, GuidedDragRequest,
                              pair_points, parse_points)
from ui import overlay
from ui.zerogpu import gpu, zero_gpu

log = logging.getLogger(__name__)

FIELDS = DragRequest.FIELDS_UI  # name -> (min, max, default, help); the advanced sliders come from here
LORA_FIELDS = ("lora_steps", "lora_rank", "lora_lr", "seed")
METHODS = {"DragDiffusion": "dragdiffusion", "DiffEditor": "diffeditor", "DragonDiffusion": "dragondiffusion"}
# Guided-method sliders (their own components: defaults differ from DragDiffusion's), passed as guided_<name>.
GUIDED_UI = ("guidance_scale", "energy_scale", "w_edit", "w_content", "w_inpaint", "sde_strength")
HISTORY_LIMIT = 24
GPU_SECONDS = {"drag": 180, "generate": 60, "lora": 120}  # ZeroGPU reservations
LABELS = {"lam": "λ (keep the unmasked area)", "r_m": "r_m (motion patch radius)", "r_p": "r_p (tracking radius)",
          "lora_steps": "LoRA steps", "lora_rank": "LoRA rank", "lora_lr": "LoRA learning rate"}


# ---- per-session state ----------------------------------------------------------------------------
class Session:
    """One browser tab's data, kept in gr.State. Models live in the engine, never here."""

    def __init__(self):
        self.image: Image.Image | None = None  # the working image; points are in its pixels
        self.fingerprint = None  # overlay.fingerprint(image): tells a new picture from a re-sent one
        self.mask: np.ndarray | None = None  # H×W bool, True = may change; None = everything may
        self.points: list[list[float]] = []  # clicks alternating handle, target
        self.history: list[dict] = []  # results, newest last: {"before", "after", "recipe", "caption", "details"}
        self.selected: int | None = None  # history index picked in the gallery
        self.cancel = threading.Event()  # set by Cancel; the engine polls it
        self._dir: Path | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its initial value for every new tab
        return Session()

    @property
    def dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="dragcanvas-"))
        return self._dir

    def close(self) -> None:
        """Called by gr.State when the tab is gone: delete this session's files."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

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

    def save_png(self, image: Image.Image, name: str, recipe: dict | None = None) -> str:
        return str(save_png_with_recipe(image, self.dir / name, recipe))

    def add_result(self, before: Image.Image | None, result, caption: str, details: dict) -> None:
        n = len(self.history) + 1
        after = self.save_png(result.image, f"dragcanvas-{n:03d}.png", result.recipe)
        before_path = self.save_png(before, f"before-{n:03d}.png") if before is not None else after
        self.history.append({"before": before_path, "after": after, "recipe": result.recipe,
                             "caption": f"{n}: {caption}", "details": details})
        del self.history[:-HISTORY_LIMIT]
        self.selected = len(self.history) - 1

    def gallery(self) -> list[tuple[str, str]]:
        return [(e["after"], e["caption"]) for e in self.history]

    def shown(self):
        """(before/after pair, download path, details) of the selected result."""
        if self.selected is None or not self.history:
            return None, None, None
        e = self.history[self.selected]
        return (e["before"], e["after"]), e["after"], e["details"]


# ---- helpers -------------------------------------------------------------------------------------
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
        except EditError as e:
            raise gr.Error(str(e)) from None
        except gr.Error:
            raise
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"Unexpected error ({type(e).__name__}: {e}). The app is still running; "
                           "details are in the server log.") from None

    return wrapper


class EngineProgress:
    """Engine progress callback (phase, fraction, message) -> gr.Progress bar. Picklable for ZeroGPU."""

    def __init__(self, progress: gr.Progress):
        self.progress = progress

    def __call__(self, phase: str, fraction: float, message: str = "") -> None:
        fraction = min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0
        self.progress(fraction, desc=f"{phase}: {message}" if message else phase)


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


def notify(notices) -> None:
    for n in notices:
        gr.Warning(n)


def summary(result, has_mask: bool) -> str:
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if v >= 0.05)
    area = "Only the painted area could change." if has_mask else "No mask: the whole image could change."
    return f"Done in {result.total_s:.1f} s ({phases}). {area}"


def canvas_image(value) -> tuple[Image.Image | None, np.ndarray | None]:
    """ImageEditor value (RGBA arrays) -> (working image, painted mask or None)."""
    if not value or value.get("background") is None:
        return None, None
    image = Image.fromarray(overlay.as_rgb(value["background"]))
    return image, overlay.mask_from_layers(value.get("layers"), image.size)


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


def arm(session: Session) -> None:
    """Before every engine call: forget an old Cancel press."""
    session.cancel.clear()


def request_cancel(session: Session) -> str:
    session.cancel.set()
    return "Cancelled: the run stops at its next step. Your image, mask and points are unchanged."


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


def on_history_select(session: Session, evt: gr.SelectData):
    session.selected = evt.index if isinstance(evt.index, int) else None
    return session.shown()


def continue_from_result(session: Session):
    if not session.history:
        gr.Warning("No result yet: run a drag first.")
        return gr.skip()
    entry = session.history[-1 if session.selected is None else session.selected]
    session.use_image(load_image(entry["after"]))
    return entry["after"], *session.preview()


# ---- engine handlers (one shared GPU queue) -------------------------------------------------------
class EngineHandlers:
    """Handlers that run the engine. The Editor (and its models) is held here, never in gr.State."""

    def __init__(self, editor):
        self.editor = editor
        self.can_cancel = not zero_gpu()  # a ZeroGPU worker is another process: no Event reaches it
        self._edit = gpu(GPU_SECONDS["drag"])(editor.edit)
        self._generate = gpu(GPU_SECONDS["generate"])(editor.generate)
        self._train = gpu(GPU_SECONDS["lora"])(editor.train_identity_lora)

    def _cancel(self, session: Session):
        return session.cancel if self.can_cancel else None

    @shows_errors
    def drag(self, image, mask, points, prompt, session: Session, progress=gr.Progress(), **settings):
        """Drag each handle point to its target. points: "[[hx, hy], [tx, ty], ...]" in image pixels."""
        if not image:
            raise EditError("No image: upload or generate an image first.")
        choice = settings.pop("method", None) or "DragDiffusion"
        method = METHODS.get(choice, str(choice).lower())  # API clients may send "diffeditor"
        guided = {k[len("guided_"):]: settings.pop(k) for k in list(settings) if k.startswith("guided_")}
        loras = settings.pop("loras", None)
        common = dict(image=load_image(image), points=parse_clicks(points), mask=load_mask(mask) if mask else None,
                      prompt=prompt or "")
        if method == "dragdiffusion":
            request = DragRequest(**common, **settings)
        else:
            request = GuidedDragRequest(**common, method=method, n_inference_steps=settings.get("n_inference_steps", 50),
                                        seed=settings.get("seed", 42), **guided)
        notify(request.notices)
        log.info("drag (%s): %d pair(s), %dx%d, mask=%s", method, len(request.points), *request.image.size,
                 request.mask is not None)
        result = self._edit(request, progress=EngineProgress(progress), cancel=self._cancel(session),
                            loras=lora_specs(loras))
        notify(result.notices)
        details = {"timings_s": {k: round(v, 3) for k, v in result.timings.items()}, "unet_calls": result.unet_calls,
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
                                progress=EngineProgress(progress), cancel=self._cancel(session))
        session.use_image(result.image)
        details = {"timings_s": {k: round(v, 3) for k, v in result.timings.items()}, "recipe": result.recipe}
        session.add_result(None, result, "generated", details)
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
                    cancel=self._cancel(session), loras=lora_specs(settings.get("loras")))
        return "Identity LoRA ready: Run reuses it for this image, prompt and LoRA settings."


def lora_specs(value) -> list:
    """The LoRA picker's value (ui/lora_picker.py) -> [(path, weight)]; nothing when the picker is absent."""
    if not value:
        return []
    from ui.lora_picker import to_specs

    return to_specs(value)


def _guided_input(name: str) -> gr.components.Component:
    lo, hi, default, why = GUIDED_FIELDS[name]
    value = GUIDED_DEFAULTS["drag"].get(name, default)
    step = 1 if isinstance(default, int) else 0.05
    return gr.Slider(lo, hi, value=value, step=step, label=name.replace("_", " ").capitalize(), info=why,
                     elem_id=f"guided-{name}")


# ---- layout and wiring -----------------------------------------------------------------------------
def _field_input(name: str, value) -> gr.components.Component:
    lo, hi, default, why = FIELDS[name]
    label = LABELS.get(name, name.replace("_", " ").capitalize())
    is_int = all(isinstance(v, int) for v in (lo, hi, default))
    if is_int and hi - lo > 10_000:  # seeds: a slider would be useless
        return gr.Number(value=value, minimum=lo, maximum=hi, precision=0, label=label, info=why,
                         elem_id=f"field-{name}")
    if is_int:
        step = 1
    else:  # one decade below the smallest meaningful value, e.g. 1e-5 for a 5e-4 learning rate
        step = 10 ** math.floor(math.log10(min(v for v in (lo, default / 10) if v > 0)))
    return gr.Slider(lo, hi, value=value, step=step, label=label, info=why, elem_id=f"field-{name}")


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


def build_drag_tab(editor, settings: dict | None = None, links=None) -> None:
    """Add the Drag tab to the current gr.Blocks. ``settings`` overrides slider start values."""
    h = EngineHandlers(editor)
    start = {name: spec[2] for name, spec in FIELDS.items()} | (settings or {})

    with gr.Tab("Drag", id="drag"):
        session = gr.State(Session(), delete_callback=Session.close)
        gr.Markdown("**1.** Upload (or generate) an image. **2.** Optionally paint the area that may change; "
                    "the rest stays fixed. **3.** Click a handle point, then its target; repeat for more pairs. "
                    "**4.** Run drag.")
        with gr.Row(equal_height=False):
            with gr.Column():
                canvas = gr.ImageEditor(
                    label="Image: paint the area that may change", type="numpy", image_mode="RGBA",
                    format="png", sources=("upload", "clipboard"), transforms=(), layers=False,
                    brush=gr.Brush(colors=[("#ff2bd6", 0.5)], color_mode="fixed"), elem_id="canvas",
                )
                from ui.examples import load_examples

                examples = load_examples()
                example_set = gr.Dataset(
                    components=[gr.Image(type="filepath", visible=False), gr.Textbox(visible=False)],
                    samples=[[str(ex.image), f"{ex.prompt} — {ex.method}"] for ex in examples],
                    label="Examples: click one (picture, mask and points are set), then Run drag",
                    elem_id="examples", visible=bool(examples), samples_per_page=8)
                with gr.Accordion("Generate an image", open=False):
                    gen_prompt = gr.Textbox(label="Prompt", placeholder="a photo of a red car on a street")
                    gen_seed = gr.Number(value=42, precision=0, label="Seed")
                    gen_btn = gr.Button("Generate")
            with gr.Column():
                preview = gr.Image(label="Points: handle (red) → target (blue); frozen area dimmed",
                                   type="numpy", format="png", interactive=False, elem_id="points")
                points_info = gr.Markdown("Upload or generate an image to start.", label="Points",
                                          elem_id="points-info")
                with gr.Row():
                    undo_btn = gr.Button("Undo last point", size="sm")
                    clear_btn = gr.Button("Clear points", size="sm")
                prompt = gr.Textbox(label="Prompt (optional): what the image shows", elem_id="prompt")
                method = gr.Radio(list(METHODS), value="DragDiffusion", label="Method", elem_id="method",
                                  info="DragDiffusion: trains an identity LoRA, then optimises the latent (best identity). "
                                       "DiffEditor / DragonDiffusion: training-free gradient guidance (no LoRA).")
                with gr.Row():
                    run_btn = gr.Button("Run drag", variant="primary", elem_id="run")
                    cancel_btn = gr.Button("Cancel", variant="stop", visible=h.can_cancel, elem_id="cancel")
                status = gr.Markdown("", label="Status", min_height=48, elem_id="status")
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                    fields = {name: _field_input(name, start[name]) for name in FIELDS}
                    lora_btn = gr.Button("Train identity LoRA now (optional; Run trains it when needed)", size="sm")
                with gr.Accordion("DiffEditor / DragonDiffusion settings", open=False, elem_id="guided-settings"):
                    guided_fields = {f"guided_{n}": _guided_input(n) for n in GUIDED_UI}
                picker = links.lora_picker() if links is not None else None
            with gr.Column():
                result = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id="result")
                download = gr.DownloadButton("Download PNG (with recipe)", size="md", elem_id="download")
                gallery = gr.Gallery(label="History: select one to compare or continue", format="png",
                                     columns=4, fit_columns=False, height=220, allow_preview=False,
                                     elem_id="history")
                continue_btn = gr.Button("Continue from the selected result", size="sm", elem_id="continue")
                with gr.Accordion("Details: timings, UNet calls, settings", open=False):
                    details = gr.JSON(label="Details")
        # Hidden hand-over from the Run button to the /drag endpoint, so both share one code path.
        image_file = gr.File(visible=False)
        mask_file = gr.File(visible=False)
        points_json = gr.Textbox(visible=False)

    # Instant handlers: one small ordered queue, so clicks and canvas updates apply in order.
    instant = dict(concurrency_id="points", concurrency_limit=1, show_progress="hidden", api_visibility="private")
    # Two listeners, not gr.on([...]): the canvas only uploads brush strokes when it has its own .change listener.
    canvas.upload(on_canvas_value, [canvas, session], [preview, points_info], **instant)
    canvas.change(on_canvas_value, [canvas, session], [preview, points_info], trigger_mode="always_last", **instant)
    canvas.clear(on_canvas_clear, [session], [preview, points_info], **instant)
    preview.select(on_point_click, [session], [preview, points_info], trigger_mode="multiple", **instant)
    undo_btn.click(undo_point, [session], [preview, points_info], **instant)
    clear_btn.click(clear_points, [session], [preview, points_info], **instant)
    gallery.select(on_history_select, [session], [result, download, details], **instant)
    example_set.select(load_example, [session], [canvas, preview, points_info, prompt, method], **instant)
    continue_btn.click(continue_from_result, [session], [canvas, preview, points_info], **instant)
    if links is not None:
        links.inboxes["drag"].change(receive_image, [links.inboxes["drag"], session], [canvas, preview, points_info],
                                     **instant)
    cancel_btn.click(request_cancel, [session], [status], queue=False, api_visibility="private")

    # Engine handlers: one GPU queue (concurrency_id "gpu", limit 1 from queue(default_concurrency_limit=1)).
    engine = dict(concurrency_id="gpu", show_progress_on=[status])
    run_btn.click(prepare_run, [session], [image_file, mask_file, points_json], queue=False,
                  api_visibility="private").then(
        h.drag, [image_file, mask_file, points_json, prompt, session], [result, download, details, gallery, status],
        inputs_kwargs=fields | {"method": method} | guided_fields | ({"loras": picker} if picker is not None else {}),
        api_name="drag", **engine)
    gen_btn.click(arm, [session], None, queue=False, api_visibility="private").then(
        h.generate, [gen_prompt, gen_seed, fields["n_inference_steps"], session],
        [canvas, preview, points_info, prompt, result, download, details, gallery, status],
        api_name="generate", **engine)
    lora_btn.click(prepare_run, [session], [image_file, mask_file, points_json], queue=False,
                   api_visibility="private").then(
        h.train_lora, [image_file, prompt, session], [status],
        inputs_kwargs={k: fields[k] for k in LORA_FIELDS} | ({"loras": picker} if picker is not None else {}),
        api_name="train_lora", **engine)
