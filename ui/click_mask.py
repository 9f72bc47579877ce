"""Click to select: one helper every mask picture uses (Drag, Move & Resize, Paste's reference, both pictures of
Appearance), and the ``/mask_from_click`` endpoint.

Under each mask canvas (a ``gr.ImageEditor``) a click view (a ``gr.HTML`` with ui/js/click_select.js) shows the
picture with its mask; a click on an object there asks ``editing.segment.mask_from_clicks`` for its mask and puts
it on the canvas's mask layer, where the brush corrects it as before. Shift+click adds a part of the current object,
Alt+click removes one, a mode radio does the same without modifier keys (touch screens), and Undo click / Clear clicks
step back. The ImageEditor gives no click positions of its own (its ``select`` fires only when it is not
editable), hence the second view. The status line says which segmenter answered, or why there is no mask ("no
object found here" on the background); a refused click changes nothing.

The clicks of a picture live in a ``ClickState`` (gr.State, one per picture and browser tab). The mask the canvas
shows is the clicks' mask with the brush's later corrections kept: paint added or erased after a click stays added
or erased when the next click recomputes the mask, and Clear clicks gives back what was painted before the first.

Which segmenter answers is set once at start (app.py ``--segmenter``, ``configure``): classical (OpenCV, no weights)
by default; a spec that cannot be loaded is one logged line and the classical one answers instead, saying so.

    from gradio_client import Client, handle_file
    mask_png, notice = Client(url).predict(handle_file("in.png"), "120,80;150,90:add-part;130,60:remove",
                                           api_name="/mask_from_click")   # white = the object
"""
from __future__ import annotations

import html
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import cv2
import gradio as gr
import numpy as np
from PIL import Image

from editing.images import load_image
from editing.segment import CLICK_MODES, Click, load_segmenter, mask_from_clicks, parse_click
from models.errors import EditError
from ui import overlay
from ui.common import canvas_image, shows_errors
from ui.examples import BRUSH_RGBA, canvas_value

log = logging.getLogger(__name__)

CLICK_JS = (Path(__file__).parent / "js" / "click_select.js").read_text()
CLICK_CSS = """
.cm { position: relative; display: inline-block; max-width: 100%; line-height: 0; user-select: none;
      -webkit-user-select: none; }
.cm img { display: block; width: 100%; height: auto; margin: 0 !important; cursor: crosshair;
          image-rendering: pixelated; }
.cm-empty { padding: 1em; line-height: 1.4; color: var(--body-text-color-subdued); }
"""
MODES = [("New object", "add"), ("Add a part (Shift)", "add-part"), ("Remove a part (Alt)", "remove")]
SAID = {"add": "new object", "add-part": "add a part", "remove": "remove a part"}
ADD_RGB, REMOVE_RGB = (40, 200, 80), (230, 40, 40)  # click markers: green adds, red takes off
CLICK_QUEUE = "clicks"  # the CPU segmenter's queue: milliseconds a click, ordered (see queue_kwargs)
GPU_QUEUE = "gpu"  # app.py's engine queue


# ---- the segmenter (configured once at start) ---------------------------------------------------------------
class _Segmenter:
    """The app's one segmenter, loaded at start (``configure``) or, for a UI built on its own, on first use.
    Segmenters keep per-picture caches that are not thread-safe: every call goes through ``lock``."""

    def __init__(self):
        self.spec, self.note, self._seg = "classical", "", None
        self.lock = threading.Lock()

    def get(self):
        if self._seg is None:
            self._seg = load_segmenter("classical")
        return self._seg

    def configure(self, spec: str | None) -> str:
        spec = (spec or "classical").strip() or "classical"
        try:
            seg, note = load_segmenter(spec), ""
        except EditError as e:  # the app keeps serving: classical answers, and every click says why
            seg, note = load_segmenter("classical"), f"--segmenter {spec}: {e} The classical segmenter answers instead."
            log.warning("%s", note)
        with self.lock:
            self.spec, self.note, self._seg = spec, note, seg
        log.info("click to select: the %s segmenter", seg.name)
        return note

    def on_gpu(self) -> bool:
        return str(getattr(self.get(), "device", "cpu")).startswith("cuda")


SEGMENTER = _Segmenter()


def configure(spec: str | None) -> str:
    """Load the ``--segmenter`` every click uses: ``classical`` (default), ``auto``, a SAM Hub id or folder. A spec
    that cannot be loaded gives its one line back (also logged) and the classical segmenter answers instead."""
    return SEGMENTER.configure(spec)


def segment(image: Image.Image, clicks: list[Click]):
    """``mask_from_clicks`` with the app's segmenter, one call at a time (see ``_Segmenter``)."""
    with SEGMENTER.lock:
        return mask_from_clicks(image, clicks, SEGMENTER.get())


def queue_kwargs() -> dict:
    """Where clicks wait. The classical segmenter is milliseconds of CPU: its own ordered queue, so a click never
    waits behind a minutes-long edit. A SAM model on the GPU shares the engine's "gpu" queue instead: DESIGN.md
    serialises GPU work through one queue, and a SAM pass beside a running edit can run the card out of memory."""
    if SEGMENTER.on_gpu():
        return dict(concurrency_id=GPU_QUEUE)
    return dict(concurrency_id=CLICK_QUEUE, concurrency_limit=1)


# ---- one picture's clicks ------------------------------------------------------------------------------------
@dataclass
class ClickState:
    """The clicks on one mask picture (gr.State) and what the brush did around them.

    ``before``: the mask painted before the first click (Clear clicks gives it back); ``painted`` / ``erased``: what
    the brush added to / took off the clicks' mask since, kept through later clicks; ``shown``: the mask the canvas
    had when last seen; ``ack``: the last click (its ``seq``) answered."""

    fingerprint: tuple | None = None
    clicks: list[Click] = field(default_factory=list)
    before: np.ndarray | None = None
    painted: np.ndarray | None = None
    erased: np.ndarray | None = None
    shown: np.ndarray | None = None
    ack: int = 0

    def sync(self, image: Image.Image, mask: np.ndarray | None) -> bool:
        """Take in the canvas as it is now; True when it holds a new picture (the clicks start over)."""
        fp = overlay.fingerprint(image)
        cur = np.zeros(image.size[::-1], bool) if mask is None else mask
        if not overlay.same_picture(fp, self.fingerprint):
            self.fingerprint, self.clicks, self.before, self.painted, self.erased = fp, [], mask, None, None
            self.shown = cur
            return True
        if not self.clicks:
            self.before = mask  # brush work before the first click is what Clear gives back
        elif self.shown is not None and self.shown.shape == cur.shape and not np.array_equal(cur, self.shown):
            added, removed = cur & ~self.shown, self.shown & ~cur
            self.painted = (added if self.painted is None else self.painted | added) & ~removed
            self.erased = (removed if self.erased is None else self.erased | removed) & ~added
        self.shown = cur
        return False

    def mask_of(self, clicks_mask: np.ndarray) -> np.ndarray:
        """The canvas's mask for the clicks' mask: the brush's corrections since the first click applied."""
        out = clicks_mask.copy()
        if self.erased is not None:
            out &= ~self.erased
        if self.painted is not None:
            out |= self.painted
        return out

    def restore(self) -> np.ndarray | None:
        """No clicks left: the mask painted before the first one."""
        self.clicks, self.painted, self.erased = [], None, None
        return self.before


def _value_with(value: dict, mask: np.ndarray | None) -> dict:
    """The canvas value: its own background, ``mask`` as the one brush layer (ui/examples.py ``canvas_value``)."""
    return canvas_value(Image.fromarray(np.asarray(value["background"])), mask)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _said(result, clicks: list[Click]) -> str:
    text = _sentence(result.notice)
    note = f" ({SEGMENTER.note})" if SEGMENTER.note else ""
    return f"{text}{note}. Click {len(clicks)}: {SAID[clicks[-1].mode]}."


def apply_click(state: ClickState, value, x: float, y: float, mode: str = "add"):
    """One click on the picture of canvas ``value`` -> (the canvas value with the new mask, or ``gr.skip()`` when
    the click found nothing; the status line). A refused click (background, outside, no object selected yet for a
    remove) is the segmenter's one line, and the mask, the clicks and the brush work stay as they were."""
    image, mask = canvas_image(value)
    if image is None:
        return gr.skip(), "Upload a picture first, then click on the object to select it."
    state.sync(image, mask)
    try:
        click = Click(x, y, mode or "add")
        clicks = [*state.clicks, click]
        result = segment(image, clicks)
    except EditError as e:
        kept = "Your mask is unchanged." if state.clicks or mask is not None else "Nothing is selected."
        return gr.skip(), f"{_sentence(str(e))} {kept}"
    state.clicks = clicks
    state.shown = state.mask_of(result.mask)
    return _value_with(value, state.shown), _said(result, clicks)


def undo_click(state: ClickState, value):
    """Undo click: the mask of the clicks before the last (the brush's corrections kept)."""
    image, mask = canvas_image(value)
    if image is None:
        return gr.skip(), gr.skip(), gr.skip()
    state.sync(image, mask)
    if not state.clicks:
        return gr.skip(), view_html(state, value), "No clicks to undo."
    clicks = state.clicks[:-1]
    if not clicks:
        state.shown = state.restore()
        shown = _value_with(value, state.shown)
        return shown, view_html(state, shown), "Clicks undone: the mask is what was painted before them."
    try:
        result = segment(image, clicks)
    except EditError as e:
        return gr.skip(), view_html(state, value), f"{_sentence(str(e))} Your mask is unchanged."
    state.clicks = clicks
    state.shown = state.mask_of(result.mask)
    shown = _value_with(value, state.shown)
    return shown, view_html(state, shown), f"Last click undone. {_said(result, clicks)}"


def clear_clicks(state: ClickState, value):
    """Clear clicks: back to the mask painted before the first click."""
    image, mask = canvas_image(value)
    if image is None:
        return gr.skip(), gr.skip(), gr.skip()
    state.sync(image, mask)
    if not state.clicks:
        return gr.skip(), view_html(state, value), "No clicks to clear."
    state.shown = state.restore()
    shown = _value_with(value, state.shown)
    return shown, view_html(state, shown), "Clicks cleared: the mask is what was painted before them."


# ---- the click view ------------------------------------------------------------------------------------------
def draw_view(image: Image.Image, mask: np.ndarray | None, clicks: list[Click]) -> np.ndarray:
    """The picture with its mask tinted as the brush paints it, enlarged when small, and its clicks marked."""
    rgb = overlay.as_rgb(image).astype(np.float32)
    if mask is not None:
        a = BRUSH_RGBA[3] / 255
        rgb[mask] = (1 - a) * rgb[mask] + a * np.array(BRUSH_RGBA[:3], np.float32)
    factor = overlay.preview_zoom(image.size)
    out = np.ascontiguousarray(overlay.zoom(np.clip(rgb, 0, 255).astype(np.uint8), factor))
    r = overlay.marker_radius(out.shape)
    for c in clicks:
        p = tuple(int(round(v)) for v in overlay.to_preview((c.x, c.y), factor))
        cv2.circle(out, p, r, REMOVE_RGB if c.mode == "remove" else ADD_RGB, -1, cv2.LINE_AA)
        cv2.circle(out, p, r, (255, 255, 255), max(1, r // 4), cv2.LINE_AA)
    return out


def view_html(state: ClickState, value) -> str:
    """The click view's content: the canvas's picture and mask, the clicks, data-* for the script."""
    image, mask = canvas_image(value)
    if image is None:
        return (f'<div class="cm cm-empty" data-ack="{state.ack}">Upload a picture above; then click an object here '
                "to select it.</div>")
    same = overlay.same_picture(overlay.fingerprint(image), state.fingerprint)
    url = overlay.png_data_url(draw_view(image, mask, state.clicks if same else []))
    w, h = image.size
    n = len(state.clicks) if same else 0
    return (f'<div class="cm" data-w="{w}" data-h="{h}" data-ack="{state.ack}" data-clicks="{n}">'
            f'<img src="{url}" alt="{html.escape("Click an object to select it")}" draggable="false"></div>')


def on_canvas(state: ClickState, value):
    """The canvas changed (upload, brush, a picture set by the app): redraw the view; a new picture starts over."""
    image, mask = canvas_image(value)
    if image is None:
        state.fingerprint, state.clicks = None, []
        return view_html(state, value), "Upload a picture, then click on an object to select it."
    new = state.sync(image, mask)
    return view_html(state, value), ("Click on an object to select it." if new else gr.skip())


def on_click(state: ClickState, value, mode: str, evt: gr.EventData):
    """One click from the view's script (``{x, y, mode, seq}``; an empty mode is the radio's)."""
    data = evt._data if isinstance(getattr(evt, "_data", None), dict) else {}
    seq = data.get("seq")
    if isinstance(seq, int) and seq > state.ack:
        state.ack = seq  # answered, whatever the answer: the script (and a browser test) waits for it
    try:
        x, y = float(data["x"]), float(data["y"])
    except (KeyError, TypeError, ValueError):
        return gr.skip(), view_html(state, value), "A click needs numbers x, y."
    new_value, status = apply_click(state, value, x, y, data.get("mode") or mode or "add")
    return new_value, view_html(state, new_value if isinstance(new_value, dict) else value), status


# ---- layout and wiring ---------------------------------------------------------------------------------------
def panel(prefix: str, what: str = "the object") -> SimpleNamespace:
    """The click view, mode radio, Undo click / Clear clicks and status line under one mask canvas, in the current
    layout (elem_ids ``{prefix}-click-view``, ``-click-mode``, ``-click-undo``, ``-click-clear``, ``-click-status``)."""
    p = SimpleNamespace(state=gr.State(ClickState()))
    with gr.Accordion(f"Click to select {what} (Shift+click adds a part, Alt+click removes one)", open=True,
                      elem_id=f"{prefix}-click"):
        p.view = gr.HTML(view_html(ClickState(), None), js_on_load=CLICK_JS, css_template=CLICK_CSS,
                         elem_id=f"{prefix}-click-view", padding=False)
        p.mode = gr.Radio(MODES, value="add", label="A plain click", elem_id=f"{prefix}-click-mode")
        with gr.Row():
            p.undo = gr.Button("Undo click", size="sm", elem_id=f"{prefix}-click-undo")
            p.clear = gr.Button("Clear clicks", size="sm", elem_id=f"{prefix}-click-clear")
        p.status = gr.Markdown("Upload a picture, then click on an object to select it.",
                               elem_id=f"{prefix}-click-status")
    return p


def wire(p: SimpleNamespace, canvas: gr.ImageEditor) -> None:
    """Clicks, Undo and Clear update ``canvas`` (its .change then reaches the tab's own handlers, as a brush
    stroke does); the view follows every change of the canvas."""
    quiet = dict(show_progress="hidden", api_visibility="private")
    for ev in (canvas.upload, canvas.change, canvas.clear):
        ev(on_canvas, [p.state, canvas], [p.view, p.status], trigger_mode="always_last", concurrency_id="click-view",
           concurrency_limit=1, **quiet)
    clicks = queue_kwargs() | quiet
    p.view.edit(on_click, [p.state, canvas, p.mode], [canvas, p.view, p.status], trigger_mode="multiple", **clicks)
    p.undo.click(undo_click, [p.state, canvas], [canvas, p.view, p.status], **clicks)
    p.clear.click(clear_clicks, [p.state, canvas], [canvas, p.view, p.status], **clicks)


# ---- the API endpoint ----------------------------------------------------------------------------------------
def parse_clicks(text) -> list[Click]:
    """``"X,Y;X,Y:add-part;X,Y:remove"`` (also ``+X,Y`` / ``-X,Y``, as the CLI's ``--mask-click``) -> clicks."""
    if not isinstance(text, str) or not text.strip():
        raise EditError("No clicks: send 'X,Y' (pixels), e.g. '120,80', or several as "
                        "'120,80;150,90:add-part;130,60:remove'.")
    clicks = []
    for item in (t for t in text.split(";") if t.strip()):
        xy, sep, mode = item.rpartition(":") if ":" in item else (item, "", "")
        mode = mode.strip().lower()
        if sep and mode not in CLICK_MODES:
            raise EditError(f"click {item.strip()!r}: the mode after ':' must be one of {', '.join(CLICK_MODES)}.")
        click = parse_click(xy)
        clicks.append(Click(click.x, click.y, mode) if sep else click)
    return clicks


@shows_errors
def mask_from_click(image, clicks):
    """The mask of the object(s) the clicks select in ``image``: a PNG (white = object) and the one-line notice.
    ``clicks``: ``"X,Y"`` in pixels, several joined by ';', each optionally ':add-part' or ':remove'."""
    if not image:
        raise EditError("No image: send the picture to click on (gradio_client.handle_file).")
    picture = load_image(image)
    result = segment(picture, parse_clicks(clicks))
    return result.mask.astype(np.uint8) * 255, result.notice + (f" ({SEGMENTER.note})" if SEGMENTER.note else "")


def build_endpoint() -> None:
    """``/mask_from_click`` on hidden components, in the current layout (before ``gr.Tabs``: no tab shifts)."""
    image = gr.File(label="Image", visible=False, elem_id="api-click-image")
    clicks = gr.Textbox(label="Clicks", visible=False, elem_id="api-click-clicks")
    mask = gr.Image(label="Mask", type="numpy", format="png", image_mode="L", visible=False)
    notice = gr.Textbox(label="Notice", visible=False)
    gr.Button(visible=False).click(mask_from_click, [image, clicks], [mask, notice], api_name="mask_from_click",
                                   **queue_kwargs())
