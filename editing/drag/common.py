"""What the drag methods share: points (parsing, pairing, the one check every drag request makes), the latent
cells of a pixel region and back, and pasting the original pixels outside the edit.

Coordinates are ``(x, y)`` pixels of the image the user gave, origin top-left; a pair is (handle, target). A pair
whose target is its handle is a **pin**: "this point stays" (DragBench's anchors, a chin held while the mouth
opens). Every method takes pins: it moves nothing there, and where it can, it holds that content in place.
"""
from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image

from editing.checks import check_image, check_point, normalize_mask
from editing.geometry import resize_mask
from models.errors import EditError

Point = tuple[float, float]
PointPair = tuple[Point, Point]  # (handle, target)

MAX_POINT_PAIRS = 16


def pair_points(clicks: list[Point] | tuple[Point, ...]) -> tuple[PointPair, ...]:
    """Clicked points alternate handle, target, handle, target … -> pairs."""
    clicks = list(clicks or [])
    if not clicks:
        raise EditError("No points: click a handle point, then where it should go (target).")
    if len(clicks) % 2:
        raise EditError(f"{len(clicks)} points: every handle needs a target — add one more point or undo the last.")
    return tuple((tuple(clicks[i]), tuple(clicks[i + 1])) for i in range(0, len(clicks), 2))


_NUM = r"\s*([-\d.eE+]+)\s*"
_PAIR_RE = re.compile(rf"^{_NUM},{_NUM}>{_NUM},{_NUM}$")
_PIN_RE = re.compile(rf"^{_NUM},{_NUM}$")
PIN_PX = 1.0  # a target closer than this to its handle makes the pair a pin


def parse_points(text: str) -> tuple[PointPair, ...]:
    """Parse ``"x,y>x,y;x,y>x,y"`` (handle>target pairs separated by ';'); a lone ``"x,y"`` is a pin."""
    pairs = []
    for chunk in filter(None, (c.strip() for c in (text or "").split(";"))):
        m, pin = _PAIR_RE.match(chunk), _PIN_RE.match(chunk)
        if not (m or pin):
            raise EditError(f"Cannot read point pair {chunk!r}: write handle>target as 'x,y>x,y' (or 'x,y' to pin a "
                            "point).")
        if pin:
            x, y = (float(g) for g in pin.groups())
            pairs.append(((x, y), (x, y)))
            continue
        hx, hy, tx, ty = (float(g) for g in m.groups())
        pairs.append(((hx, hy), (tx, ty)))
    if not pairs:
        raise EditError("No points: give at least one pair as 'x,y>x,y'.")
    return tuple(pairs)


def is_pin(pair: PointPair) -> bool:
    return pair[0] == pair[1]


def check_points(points, size: tuple[int, int]) -> tuple[PointPair, ...]:
    """1 to ``MAX_POINT_PAIRS`` (handle, target) pairs inside an image of ``size`` = (w, h), as float tuples; a
    target within ``PIN_PX`` of its handle is its handle (a pin), and at least one pair must move."""
    pairs = tuple(points) if points is not None else ()
    if not pairs:
        raise EditError("No points: click a handle point, then where it should go (target).")
    if len(pairs) > MAX_POINT_PAIRS:
        raise EditError(f"{len(pairs)} point pairs; at most {MAX_POINT_PAIRS} are supported.")
    checked = []
    for i, pair in enumerate(pairs, 1):
        if len(pair) != 2:
            raise EditError(f"Point pair {i} must be (handle, target).")
        h = check_point(pair[0], size, f"Handle {i}")
        t = check_point(pair[1], size, f"Target {i}")
        checked.append((h, h) if math.dist(h, t) < PIN_PX else (h, t))
    if all(is_pin(p) for p in checked):
        raise EditError("Every point is pinned (its target is its handle): drag at least one target away from its "
                        "handle.")
    return tuple(checked)


def check_drag(image, points, mask) -> tuple[Image.Image, tuple[PointPair, ...], np.ndarray | None, tuple[str, ...]]:
    """The checks every drag request makes: an image, its points (``check_points``) and its mask (normalised to the
    image's size; None = no mask). Returns (image, points, mask, notices)."""
    if image is None:
        raise EditError("No image: upload or generate an image first.")
    img = check_image(image, "image")
    pairs = check_points(points, img.size)
    m, notices = normalize_mask(mask, img.size)
    return img, pairs, m, tuple(notices)


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise EditError("The prompt must be text.")
    return prompt


def points_json(points) -> list:
    """Pairs as JSON lists, for recipes."""
    return [[list(h), list(t)] for h, t in points]


def points_from_json(items) -> tuple[PointPair, ...]:
    return tuple((tuple(h), tuple(t)) for h, t in items)


# ---- pixels and latent cells ---------------------------------------------------------------------------------------
def latent_region(region_px: np.ndarray, lat_hw: tuple[int, int]) -> np.ndarray:
    """Pixel region -> latent cells (H, W) bool; a cell belongs if any of its pixels does (editing.geometry)."""
    return resize_mask(region_px, lat_hw)[0, 0].numpy() > 0.5


def cells_to_pixels(cells: np.ndarray, lat_hw, size) -> np.ndarray:
    """Latent-cell bool map -> H×W bool of the image ``size`` = (w, h) (nearest)."""
    img = Image.fromarray(cells.astype(np.uint8) * 255).resize(size, Image.NEAREST)
    return np.asarray(img) > 127


def paste_outside(result: Image.Image, original: Image.Image, region: np.ndarray) -> Image.Image:
    """The original pixels where ``region`` (H×W bool of ``original``'s size) is False."""
    a = np.asarray(result.convert("RGB").resize(original.size, Image.LANCZOS))
    return Image.fromarray(np.where(region[..., None], a, np.asarray(original.convert("RGB"))))
