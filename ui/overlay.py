"""Pure numpy/OpenCV drawing for the Drag tab: point markers and arrows, frozen-area dimming, masks.

Images are H×W×3 uint8 RGB arrays, points are (x, y) pixels with origin top-left, masks are H×W bool
with True = may change (DESIGN.md conventions). No gradio here, so everything is unit-testable.
"""
from __future__ import annotations

import base64
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

HANDLE_RGB = (230, 40, 40)  # red: where the content is now
TARGET_RGB = (40, 100, 240)  # blue: where it should go
ARROW_RGB = (255, 255, 255)
PIN_RGB = (250, 200, 30)  # amber square: a pin, a point that stays
FROZEN_BRIGHTNESS = 0.4  # frozen (unmasked) pixels are shown at 40 % brightness


def as_rgb(image) -> np.ndarray:
    """PIL image or array (gray, RGB or RGBA) -> H×W×3 uint8; transparency is composited on white."""
    a = np.asarray(image.convert("RGBA") if isinstance(image, Image.Image) else image)
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] in (2, 4):  # gray+alpha or RGBA
        alpha = a[..., -1:].astype(np.float32) / 255.0
        color = a[..., :-1].astype(np.float32)
        a = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    if mask.shape == (h, w):
        return mask
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0


def mask_from_layers(layers: Sequence[np.ndarray] | None, size: tuple[int, int]) -> np.ndarray | None:
    """ImageEditor layers (RGBA arrays) -> H×W bool of everything painted on any layer, or None if unpainted."""
    mask = None
    for layer in layers or []:
        a = np.asarray(layer)
        if a.ndim != 3 or a.shape[2] != 4:
            continue  # a layer without alpha carries no brush strokes we can read
        painted = _resize_mask(a[..., 3] > 0, size)
        mask = painted if mask is None else mask | painted
    return mask if mask is not None and mask.any() else None


def mask_from_image(image) -> np.ndarray:
    """A mask picture -> H×W bool: its alpha where it has transparency, else its brightest channel > 127."""
    a = np.asarray(image.convert("RGBA") if isinstance(image, Image.Image) else image)
    if a.ndim == 2:
        return a > 127
    if a.shape[2] in (2, 4) and a[..., -1].min() < 255:
        return a[..., -1] > 0
    return a[..., : min(3, a.shape[2])].max(axis=2) > 127


def dim_frozen(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Darken the pixels the edit must keep (mask False); no mask means everything may change."""
    if mask is None:
        return rgb.copy()
    out = rgb.copy()
    keep = ~_resize_mask(mask, (rgb.shape[1], rgb.shape[0]))
    out[keep] = (out[keep].astype(np.float32) * FROZEN_BRIGHTNESS).astype(np.uint8)
    return out


def marker_radius(shape: tuple[int, ...]) -> int:
    """Marker size that stays visible from thumbnails to 2048-px photos."""
    return max(3, round(0.012 * max(shape[:2])))


def draw_points(rgb: np.ndarray, points: Sequence[Sequence[float]]) -> np.ndarray:
    """Draw clicks alternating handle (red) / target (blue), with an arrow from each handle to its target; a pin (a
    pair whose target is its handle) is one amber square."""
    out = np.ascontiguousarray(rgb.copy())
    r = marker_radius(out.shape)
    thick = max(1, r // 3)
    pins = {i for i in range(0, len(points) - 1, 2) if list(points[i]) == list(points[i + 1])}
    pts = [(int(round(x)), int(round(y))) for x, y in points]
    for i, (h, t) in enumerate(zip(pts[0::2], pts[1::2])):  # arrows first so the markers sit on top
        if 2 * i in pins:
            continue
        length = max(1.0, float(np.hypot(t[0] - h[0], t[1] - h[1])))
        tip = min(0.5, 2.5 * r / length)
        cv2.arrowedLine(out, h, t, (0, 0, 0), thick + 2, cv2.LINE_AA, tipLength=tip)
        cv2.arrowedLine(out, h, t, ARROW_RGB, thick, cv2.LINE_AA, tipLength=tip)
    for i, p in enumerate(pts):
        if i in pins or i - 1 in pins:
            if i in pins:
                cv2.rectangle(out, (p[0] - r, p[1] - r), (p[0] + r, p[1] + r), PIN_RGB, -1, cv2.LINE_AA)
                cv2.rectangle(out, (p[0] - r, p[1] - r), (p[0] + r, p[1] + r), (0, 0, 0), max(1, thick // 2),
                              cv2.LINE_AA)
            continue
        color = HANDLE_RGB if i % 2 == 0 else TARGET_RGB
        cv2.circle(out, p, r, color, -1, cv2.LINE_AA)
        cv2.circle(out, p, r, (255, 255, 255), max(1, thick // 2), cv2.LINE_AA)
    return out


PREVIEW_MIN_SIDE = 384  # small pictures (the toy model's 64-px scenes) are shown enlarged to be clickable


def preview_zoom(size: tuple[int, int]) -> int:
    """Whole-number zoom of a click preview for a ``(w, h)`` picture: 1 unless its long side is under 384 px."""
    return max(1, -(-PREVIEW_MIN_SIDE // max(1, max(size))))


def zoom(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole ``factor`` (pixels stay crisp squares)."""
    return rgb if factor == 1 else np.ascontiguousarray(np.repeat(np.repeat(rgb, factor, 0), factor, 1))


def zoomed(rgb: np.ndarray) -> np.ndarray:
    """An H×W×3 preview enlarged by its ``preview_zoom``."""
    return zoom(rgb, preview_zoom((rgb.shape[1], rgb.shape[0])))


def to_picture(xy: Sequence[float], factor: int) -> tuple[float, float]:
    """A click on a preview zoomed by ``factor`` -> (x, y) in the picture's pixels (pixel centres kept)."""
    return tuple((float(v) + 0.5) / factor - 0.5 for v in xy[:2])


def to_preview(xy: Sequence[float], factor: int) -> tuple[float, float]:
    """Inverse of ``to_picture``."""
    return tuple((float(v) + 0.5) * factor - 0.5 for v in xy[:2])


def render_preview(image, mask: np.ndarray | None, points: Sequence[Sequence[float]], factor: int = 1) -> np.ndarray:
    """What the user clicks on: the working image (zoomed by ``factor``), frozen area dimmed, points and arrows."""
    rgb = zoom(dim_frozen(as_rgb(image), mask), factor)
    return draw_points(rgb, [to_preview(p, factor) for p in points])


def fingerprint(image) -> tuple[tuple[int, int], np.ndarray]:
    """(size, 16×16 thumbnail): tells a new picture from a re-sent copy of the same one."""
    rgb = as_rgb(image)
    return (rgb.shape[1], rgb.shape[0]), cv2.resize(rgb, (16, 16), interpolation=cv2.INTER_AREA).astype(np.int16)


def same_picture(a, b) -> bool:
    """True if two fingerprints describe the same picture (tolerates tiny re-encoding differences)."""
    if a is None or b is None or a[0] != b[0]:
        return False
    return float(np.abs(a[1] - b[1]).mean()) < 2.0


TRAIL_RGB = (255, 210, 0)  # yellow: where the handles have been during the optimisation


def draw_trail(rgb: np.ndarray, trail: Sequence[Sequence[Sequence[float]]], factor: int = 1) -> np.ndarray:
    """Draw the handles' paths: ``trail`` is one entry per optimisation step, each the handle positions (x, y)
    in picture pixels; ``rgb`` is a preview zoomed by ``factor``. Each handle gets a polyline through its
    positions and a dot where it is now."""
    out = np.ascontiguousarray(rgb.copy())
    if not trail:
        return out
    r = max(2, marker_radius(out.shape) // 2)
    n = min(len(step) for step in trail)
    for k in range(n):
        path = np.array([to_preview(step[k], factor) for step in trail], np.float64)
        pts = np.round(path).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(out, [pts], False, (0, 0, 0), max(1, r // 2) + 2, cv2.LINE_AA)
        cv2.polylines(out, [pts], False, TRAIL_RGB, max(1, r // 2), cv2.LINE_AA)
        cv2.circle(out, tuple(int(v) for v in pts[-1, 0]), r, TRAIL_RGB, -1, cv2.LINE_AA)
    return out


def png_data_url(rgb: np.ndarray) -> str:
    """An H×W×3 RGB array as a ``data:image/png;base64,…`` URL (what the point editor's <img> shows)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast: the editor re-renders on every edit
    if not ok:
        raise ValueError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()
