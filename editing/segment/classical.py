"""The classical segmenter: OpenCV and numpy, no weights, a few milliseconds per click at 512².

Two cases, told apart by the picture's border:

1. **Plain background** (most of the border fits one colour, a gradient or a vignette, within ``BG_TOLERANCE``;
   toy scenes, product shots, plain-background photos): the background is that model, fitted per pixel, and the
   object under a click is the 4-connected blob of not-background pixels holding it. A click on the background
   itself is "no object found here" when that background reaches the border, and selects the object around it when
   it does not (the hole of a ring or a donut: the hole stays out of the mask). The blob's anti-aliased rim is then
   split halfway between the object's colour and the background's (``_split_rim``), where a person would put it.
2. **Anything else**: a colour flood fill seeded by the click (``FILL_TOLERANCE`` around the colour under it),
   refined by GrabCut on a downscaled crop around it; a fill that spreads over most of the border is the
   background, not an object.

``remove`` points take out the colour region under them (the same fill), so a part of another colour comes off.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import cv2
import numpy as np

from editing.segment.clicks import ClickGroup, Point
from models.errors import EditError

log = logging.getLogger(__name__)

BG_TOLERANCE = 40.0  # RGB distance (0-255) from the fitted background within which a pixel is background
PLAIN_SHARE = 0.6  # share of border pixels that must fit the background model for it to be "plain"
FILL_TOLERANCE = 28  # per-channel distance from the clicked colour that a flood fill spreads over
BORDER_SHARE = 0.5  # a region touching this share of the border is the background
FLAT_SPREAD = 12.0  # an object whose median colour deviation is below this (RGB) is flat: its rim is split by colour
ANALYSIS_SIDE = 1024  # longer pictures are analysed at this long side: a click stays well under a second at 4K
GRABCUT_SIDE = 128  # GrabCut runs on a crop downscaled to this long side (its cost grows with the pixel count)


@dataclass(frozen=True)
class Background:
    """What a picture's border says, computed once per picture (every click on it reuses it).

    ``colour``: the fitted background per pixel (H, W, 3) float32; ``plain``: whether most of the border fits it;
    ``is_bg``: (H, W) bool, pixels within ``BG_TOLERANCE`` of it; ``objects`` / ``holes``: 4-connected labels (H, W)
    of the not-background and the background pixels; ``outside``: labels of the background regions that reach the
    border (the background proper, not a hole)."""

    colour: np.ndarray
    plain: bool
    is_bg: np.ndarray | None = None
    objects: np.ndarray | None = None
    holes: np.ndarray | None = None
    outside: frozenset[int] = frozenset()


def _no_object(p: Point) -> EditError:
    return EditError(f"no object found here ({p[0]:g}, {p[1]:g}): the click is on the background; click on the object.")


def _border(a: np.ndarray, t: int) -> np.ndarray:
    """(H, W) bool: the ``t``-pixel frame of an array."""
    m = np.zeros(a.shape[:2], bool)
    m[:t], m[-t:], m[:, :t], m[:, -t:] = True, True, True, True
    return m


def fit_background(img: np.ndarray) -> Background:
    """A smooth background ``c(x, y)``, per channel a quadric in ``x, y`` (a flat colour, a linear gradient, a lens
    vignette), fitted to the border by least squares twice (the second time without the pixels the first fit explains
    worst: an object touching the border); with a plain background, also the background / object labels every
    click reads."""
    h, w = img.shape[:2]
    frame = _border(img, max(1, min(h, w) // 256))
    ys, xs = np.nonzero(frame)
    design = _terms(xs / w - 0.5, ys / h - 0.5)  # (N, 6)
    values = img[ys, xs].astype(np.float32)  # (N, 3)
    keep = np.ones(len(xs), bool)
    for _ in range(2):
        a, v = design[keep], values[keep]
        # Normal equations (a 6×6 solve; lstsq's SVD over thousands of rows costs more than the rest of a click),
        # with a tiny ridge so a degenerate frame (a very thin picture) still solves.
        coef = np.linalg.solve(a.T @ a + 1e-3 * np.eye(6, dtype=np.float32), a.T @ v)  # (6, 3)
        resid = np.linalg.norm(design @ coef - values, axis=1)
        keep = resid <= max(BG_TOLERANCE / 2, float(np.median(resid)) * 3)
    plain = float((resid <= BG_TOLERANCE).mean()) >= PLAIN_SHARE
    # The quadric splits into a row part, a column part and the xy term: two (H, W, 3) passes, not six.
    gx = np.arange(w, dtype=np.float32) / w - 0.5
    gy = np.arange(h, dtype=np.float32) / h - 0.5
    c = coef.astype(np.float32)
    row = c[0] + gx[:, None] * c[1] + (gx * gx)[:, None] * c[3]  # (W, 3)
    col = gy[:, None] * c[2] + (gy * gy)[:, None] * c[4]  # (H, 3)
    colour = row[None] + col[:, None]
    if np.any(c[5]):
        colour += np.multiply.outer(gy, gx)[..., None] * c[5]
    if not plain:
        return Background(colour, False)
    diff = img - colour
    is_bg = np.einsum("hwc,hwc->hw", diff, diff) <= BG_TOLERANCE ** 2  # (H, W)
    _, objects = cv2.connectedComponents((~is_bg).astype(np.uint8), connectivity=4)
    _, holes = cv2.connectedComponents(is_bg.astype(np.uint8), connectivity=4)
    edge = _border(is_bg, 1)
    outside = frozenset(int(v) for v in np.unique(holes[edge & is_bg]))
    return Background(colour, True, is_bg, objects, holes, outside)


def _terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The quadric's terms ``(1, x, y, x², y², xy)`` of centred, size-normalised coordinates: (N, 6)."""
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], 1).astype(np.float32)


def _blob_at(mask: np.ndarray, p: Point) -> np.ndarray:
    """The 4-connected component of ``mask`` holding pixel ``p`` (empty when ``p`` is not in ``mask``)."""
    x, y = int(p[0]), int(p[1])
    if not mask[y, x]:
        return np.zeros_like(mask)
    _, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    return lab == lab[y, x]


def _touches_border(region: np.ndarray) -> float:
    """Share of the picture's one-pixel frame that ``region`` covers."""
    frame = _border(region, 1)
    return float(region[frame].mean())


def _split_rim(img: np.ndarray, blob: np.ndarray, bg: np.ndarray, width: int) -> np.ndarray:
    """Move the edge of a flat-coloured ``blob`` to where its anti-aliased rim is half object, half background: a rim
    pixel ``p`` (within ``width`` px of the edge) that is a blend of the background ``b`` and the object's median
    colour ``o`` is object when its projection ``t = (p-b)·(o-b)/|o-b|²`` is at least 1/2. Works on the blob's
    bounding box (plus the rim), so a small object on a big picture costs little."""
    ys, xs = np.nonzero(blob)
    y0, y1 = max(0, ys.min() - width - 1), min(blob.shape[0], ys.max() + width + 2)
    x0, x1 = max(0, xs.min() - width - 1), min(blob.shape[1], xs.max() + width + 2)
    box = (slice(y0, y1), slice(x0, x1))
    out = np.zeros_like(blob)
    out[box] = _split_rim_crop(img[box], blob[box], bg[box], width)
    return out


def _split_rim_crop(img: np.ndarray, blob: np.ndarray, bg: np.ndarray, width: int) -> np.ndarray:
    k = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    inner = cv2.erode(blob.astype(np.uint8), k, borderType=cv2.BORDER_REPLICATE) > 0
    core = img[inner] if inner.sum() >= 16 else img[blob]  # (N, 3)
    obj = np.median(core, axis=0)  # (3,)
    # Median distance to the median: the rim's blend colours are a minority of a flat object's pixels.
    if float(np.median(np.abs(core - obj).max(-1))) > FLAT_SPREAD:
        return blob  # a textured object has no one colour to split the rim against
    rim = (cv2.dilate(blob.astype(np.uint8), k) > 0) & ~inner
    diff = obj[None] - bg[rim]  # (N, 3)
    rel = img[rim] - bg[rim]
    t = (rel * diff).sum(1) / np.maximum((diff * diff).sum(1), 1e-6)
    # Only blends of these two colours are split; a rim pixel of another colour (a part of the object in a
    # second colour) keeps the blob's answer.
    blend = np.linalg.norm(rel - t[:, None] * diff, axis=1) <= BG_TOLERANCE
    out = inner.copy()
    out[rim] = np.where(blend, t >= 0.5, blob[rim])
    return out


def colour_region(img: np.ndarray, p: Point, tolerance: float = FILL_TOLERANCE) -> np.ndarray:
    """The 4-connected region around ``p`` whose colour stays within ``tolerance`` (per channel) of the median colour
    of the few pixels under the click (a median, so one noisy pixel does not decide)."""
    h, w = img.shape[:2]
    x, y = int(p[0]), int(p[1])
    r = max(1, min(h, w) // 256)
    seed = np.median(img[max(0, y - r): y + r + 1, max(0, x - r): x + r + 1].reshape(-1, 3), axis=0)
    near = np.abs(img - seed[None, None]).max(-1) <= tolerance
    near[y, x] = True  # the clicked pixel itself always belongs to its region
    return _blob_at(near, p)


def _grabcut(rgb: np.ndarray, region: np.ndarray, p: Point) -> np.ndarray:
    """GrabCut around a flood-filled ``region`` (probable object) in a crop 1.5× its box, downscaled to
    ``GRABCUT_SIDE``; the click's neighbourhood is sure object, the crop's frame sure background."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    half_w, half_h = (xs.max() - xs.min()) * 0.75 + 8, (ys.max() - ys.min()) * 0.75 + 8
    x0, x1 = int(max(0, cx - half_w)), int(min(w, cx + half_w + 1))
    y0, y1 = int(max(0, cy - half_h)), int(min(h, cy + half_h + 1))
    scale = min(1.0, GRABCUT_SIDE / max(x1 - x0, y1 - y0))
    size = (max(8, round((x1 - x0) * scale)), max(8, round((y1 - y0) * scale)))
    crop = cv2.resize(np.ascontiguousarray(rgb[y0:y1, x0:x1]), size, interpolation=cv2.INTER_AREA)
    seed = cv2.resize(region[y0:y1, x0:x1].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    gc = np.where(seed, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    gc[_border(gc, 1) & ~seed] = cv2.GC_BGD
    sx, sy = int((p[0] - x0) * scale), int((p[1] - y0) * scale)
    cv2.circle(gc, (min(sx, size[0] - 1), min(sy, size[1] - 1)), 2, int(cv2.GC_FGD), -1)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(crop, gc, None, bgd, fgd, 2, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # one colour only in the crop: GrabCut cannot fit two models; the fill is the answer
        return region
    fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    out = np.zeros_like(region)
    out[y0:y1, x0:x1] = cv2.resize(fg.astype(np.uint8), (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST) > 0
    blob = _blob_at(out, p)
    return blob if blob.any() else region


class ClassicalSegmenter:
    """The OpenCV segmenter (see the module docstring); it keeps the last picture's ``Background``, which every
    click on that picture reads."""

    name = "classical"

    def __init__(self):
        self._last: tuple[str, Background] | None = None  # (picture's key, its analysis): clicks on one picture

    def _background(self, image: np.ndarray, img: np.ndarray) -> Background:
        """The analysis of ``image`` (uint8), from ``img`` (its float32 copy); kept for the next click on it."""
        key = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + str(image.shape)
        if self._last is None or self._last[0] != key:
            self._last = (key, fit_background(img))
        return self._last[1]

    def _object_at(self, img: np.ndarray, rgb: np.ndarray, bg: Background, p: Point) -> np.ndarray:
        h, w = img.shape[:2]
        width = max(1, round(min(h, w) / 64))  # the anti-aliased rim of a 64 px toy scene, scaled with the picture
        if not bg.plain:
            region = colour_region(img, p)
            if _touches_border(region) >= BORDER_SHARE or region.mean() > 0.7:
                raise _no_object(p)
            return _grabcut(rgb, region, p)
        x, y = int(p[0]), int(p[1])
        if not bg.is_bg[y, x]:
            return _split_rim(img, bg.objects == bg.objects[y, x], bg.colour, width)
        hole = bg.holes == bg.holes[y, x]
        if bg.holes[y, x] in bg.outside:
            raise _no_object(p)
        # An enclosed patch of background: the object is the not-background blob that meets most of its edge.
        ys, xs = np.nonzero(hole)
        box = (slice(max(0, ys.min() - 1), ys.max() + 2), slice(max(0, xs.min() - 1), xs.max() + 2))
        ring = (cv2.dilate(hole[box].astype(np.uint8), np.ones((3, 3), np.uint8)) > 0) & ~bg.is_bg[box]
        if not ring.any():
            raise _no_object(p)
        best = np.bincount(bg.objects[box][ring]).argmax()
        return _split_rim(img, bg.objects == best, bg.colour, width)

    def object_mask(self, image: np.ndarray, group: ClickGroup) -> np.ndarray:
        """The object under ``group``'s positive points, less the colour regions under its negative points. A picture
        longer than ``ANALYSIS_SIDE`` is analysed downscaled and its mask upscaled (smoothly, cut at 1/2)."""
        h, w = image.shape[:2]
        scale = ANALYSIS_SIDE / max(h, w)
        if scale >= 1:
            return self._object_mask(image, group)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        sx, sy = size[0] / w, size[1] / h

        def fit(p: Point) -> Point:
            return min(p[0] * sx, size[0] - 1), min(p[1] * sy, size[1] - 1)

        mask = self._object_mask(small, ClickGroup(tuple(map(fit, group.positive)), tuple(map(fit, group.negative))))
        return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5

    def _object_mask(self, image: np.ndarray, group: ClickGroup) -> np.ndarray:
        img = image.astype(np.float32)
        bg = self._background(image, img)
        mask = np.zeros(img.shape[:2], bool)
        for p in group.positive:
            mask |= self._object_at(img, image, bg, p)
        for p in group.negative:
            mask &= ~colour_region(img, p)
        return mask
