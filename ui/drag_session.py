"""The Drag tab's per-session state: the point list (alternating handle, target) with undo/redo, and the point
editor's HTML. Pure Python and PIL, no gradio: the browser sends one edit at a time (ui/js/point_editor.js),
``Session.edit`` applies it to the only copy that counts, and ``editor_html`` renders what the script shows.
"""
from __future__ import annotations

import html
import json
import math

import numpy as np
from PIL import Image

from editing.drag import MAX_POINT_PAIRS
from models.errors import EditError
from ui import overlay
from ui.history import BeforeAfter


def apply_edit(points: list[list[float]], edit: dict, size: tuple[int, int]) -> list[list[float]]:
    """One point-editor edit (ui/js/point_editor.js) -> the new point list (alternating handle, target).

    ``add`` appends a click; ``pair`` adds a dragged handle → target pair and ``pin`` a pin (a pair whose target is
    its handle: that point stays), both before a handle still waiting for its target, so the alternation holds; ``move`` moves point ``i``; ``delete`` removes point ``i`` with its pair
    partner (removing one point alone would swap every later handle and target). Coordinates are clamped to the
    picture. EditError for an edit that names no point or no number."""
    w, h = size

    def xy(kx: str, ky: str) -> list[float]:
        try:
            x, y = float(edit[kx]), float(edit[ky])
        except (KeyError, TypeError, ValueError):
            raise EditError(f"The edit needs numbers {kx}, {ky}.") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise EditError(f"The edit's {kx}, {ky} must be finite numbers.")
        return [round(min(max(x, 0.0), w - 1.0), 1), round(min(max(y, 0.0), h - 1.0), 1)]

    def index() -> int:
        i = edit.get("i")
        if not isinstance(i, int) or not 0 <= i < len(points):
            raise EditError(f"There is no point {i!r} (the picture has {len(points)}).")
        return i

    op, out = edit.get("op"), [list(p) for p in points]
    if op in ("add", "pair", "pin") and len(out) // 2 >= MAX_POINT_PAIRS:
        raise EditError(f"At most {MAX_POINT_PAIRS} handle → target pairs: delete one first.")
    if op == "add":
        out.append(xy("x", "y"))
    elif op in ("pair", "pin"):
        pair = [xy("hx", "hy"), xy("tx", "ty")] if op == "pair" else [xy("x", "y")] * 2
        at = len(out) - len(out) % 2
        out[at:at] = [list(p) for p in pair]
    elif op == "move":
        out[index()] = xy("x", "y")
    elif op == "delete":
        i = index() // 2 * 2
        del out[i:i + 2]
    else:
        raise EditError(f"Unknown point edit {op!r}.")
    return out


class Session(BeforeAfter):
    """One browser tab's Drag data, kept in gr.State: the working image, its mask and points, the history of
    point edits (undo/redo) and of results."""

    UNDO_LIMIT = 100

    def __init__(self, prefix: str = ""):
        super().__init__(prefix)
        self.image: Image.Image | None = None  # the working image; points are in its pixels
        self.fingerprint = None  # overlay.fingerprint(image): tells a new picture from a re-sent one
        self.mask: np.ndarray | None = None  # H×W bool, True = may change; None = everything may
        self.points: list[list[float]] = []  # clicks alternating handle, target
        self.undo: list[list[list[float]]] = []  # earlier point lists, newest last
        self.redo: list[list[list[float]]] = []
        self.ack = 0  # the last point-editor edit (its seq) applied: the browser waits for it
        self.version = 0  # bumped when the picture, mask or points change: the live preview follows it
        self.live_version = -1  # (version, method) the live preview shows

    def use_image(self, image: Image.Image | None) -> None:
        """Start over on ``image`` (upload, generation, continue-from-result): no mask, no points."""
        self.image, self.mask, self.points = image, None, []
        self.undo, self.redo = [], []
        self.fingerprint = overlay.fingerprint(image) if image is not None else None
        self.version += 1

    def update_from_canvas(self, image: Image.Image, mask: np.ndarray | None) -> None:
        """The canvas re-sends its picture with every brush stroke: keep the points unless the picture changed."""
        if not overlay.same_picture(overlay.fingerprint(image), self.fingerprint):
            self.use_image(image)
        self.mask = mask
        self.version += 1

    def set_points(self, points: list[list[float]]) -> None:
        """A new point list, undoable."""
        if points == self.points:
            return
        self.undo = (self.undo + [self.points])[-self.UNDO_LIMIT:]
        self.redo = []
        self.points = points
        self.version += 1

    def edit(self, edit: dict) -> None:
        """Apply one point-editor edit (see ``apply_edit``; also ``undo`` / ``redo``)."""
        if self.image is None:
            raise EditError("Upload or generate an image first, then place points on it.")
        op = edit.get("op")
        if op in ("undo", "redo"):
            source, dest = (self.undo, self.redo) if op == "undo" else (self.redo, self.undo)
            if source:
                dest.append(self.points)
                self.points = source.pop()
                self.version += 1
            return
        self.set_points(apply_edit(self.points, edit, self.image.size))

    def pairs(self) -> list:
        """The complete handle → target pairs (a handle still waiting for its target is left out)."""
        return [(tuple(self.points[i]), tuple(self.points[i + 1])) for i in range(0, len(self.points) - 1, 2)]

    def view(self) -> tuple[str, str]:
        """(point editor HTML, one line about the points that acknowledges the last edit)."""
        return editor_html(self), self.points_line()

    def points_line(self) -> str:
        if self.image is None:
            return "Upload or generate an image to start."
        n = len(self.points)
        if n == 0:
            text = "Click a **handle** point (red), then its **target** (blue), or drag from handle to target."
        elif n % 2:
            text = f"Handle {n // 2 + 1} placed: now click its **target**."
        else:
            text = f"{n // 2} handle → target pair(s). Drag a point to move it, right-click to delete; or **Run drag**."
        return f"{text} _({n} point{'s' * (n != 1)}; edit {self.ack} applied)_"

    @property
    def zoom(self) -> int:
        """How much the point editor enlarges the picture (small pictures are hard to point at)."""
        return overlay.preview_zoom(self.image.size) if self.image is not None else 1


def editor_html(session: Session) -> str:
    """The point editor's content: the picture (frozen area dimmed, points and arrows drawn by the server) and
    an empty SVG layer the script draws the pointer's arrow on; data-* carry what the script needs."""
    points = html.escape(json.dumps(session.points))
    if session.image is None:
        return (f'<div class="pe pe-empty" data-ack="{session.ack}" data-points="{points}">'
                "Upload or generate an image to start.</div>")
    w, h = session.image.size
    url = overlay.png_data_url(overlay.render_preview(session.image, session.mask, session.points, session.zoom))
    return (f'<div class="pe" data-w="{w}" data-h="{h}" data-ack="{session.ack}" data-points="{points}">'
            f'<img src="{url}" alt="Points: handle (red) → target (blue)" draggable="false">'
            f'<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none"></svg></div>')
