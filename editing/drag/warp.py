"""FastDrag's one-step latent warpage (Zhao et al., NeurIPS 2024, §3.2–3.3), vectorised in NumPy.

The same code moves diffusion latents (the ``instant`` task, on the latent grid) and pixels (the UI's live
preview), so what the preview shows is what the edit starts from. No torch here: the UI imports this module.

Coordinates are ``(x, y)`` on the array's own grid (column, row), cell centres at integers. Given an edit
region (a bool ``H×W`` array) and handle → target pairs ``A_i → B_i``:

1. ``circumscribed_circle``: centre O and radius R of the circle through the corners of the region's
   bounding box; every region cell lies inside it.
2. ``stretch_factor``: for a region cell C and a handle A, the ray from A through C leaves the circle at P;
   the cell moves by ``(|PC| / |AP|) · (B − A)`` (paper eq. 2): the handle moves by exactly B − A, a cell on
   the circle not at all, and the content between is stretched or compressed linearly along the ray.
3. ``displacement``: several pairs are blended with normalised inverse-distance weights
   ``w_i = (1/|C − A_i|) / Σ_j 1/|C − A_j|`` (paper eq. 3).
4. ``forward_copy``: every region cell is first vacated, then its value is copied to its rounded new cell;
   a cell that already received a value is not overwritten (paper §3.3, "not recover").
5. ``bnni_fill``: the cells left empty take the bilateral nearest-neighbour interpolation (paper eq. 4): the
   ``1/k``-weighted mean of the nearest filled cell in each of the four axis directions, ``k`` cells away.

With ``rigid`` and several pairs (pins included) the content follows the points as a shape instead
(``shape_map``): the moving-least-squares similarity of Schaefer et al. (SIGGRAPH 2006) through the pairs — a
uniform scale and turn for two handles, an axial stretch and turn about a pin (a pin with one handle: the end
moves, the shape lengthens or turns, its width stays) — applied backward (``shape_warp``: every cell takes the
value its inverse image lands on), so a growing shape has no holes. One pair stays FastDrag's rigid move.

Deliberate difference from the official code: when several cells land on one cell, the one nearest to a
handle wins (the dragged content lies on top), not the first in row-major order, which made the result
depend on the drag direction. Holes are tracked with a bool array, not by testing ``value == 0``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from models.errors import EditError

EPS = 1e-4  # the official code's guard in 1/(|C − A| + ε)
PREVIEW_SIDE = 512  # the live preview works at most at this long side (then is resized back)
DEFAULT_RADIUS_FRACTION = 1 / 8  # no mask: a disc of at least this × the short side around each handle


# ---- the field ------------------------------------------------------------------------------------------
def circumscribed_circle(region: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre O = (x, y) and radius R of the circle through the region's bounding-box corners (cell centres):
    O = ((x_min + x_max)/2, (y_min + y_max)/2), R = |O − (x_min, y_min)|."""
    ys, xs = np.nonzero(region)
    if xs.size == 0:
        raise EditError("The edit region is empty: paint the object to drag.")
    lo = np.array([xs.min(), ys.min()], np.float64)
    hi = np.array([xs.max(), ys.max()], np.float64)
    centre = (lo + hi) / 2
    return centre, float(np.linalg.norm(centre - lo))


def stretch_factor(cells: np.ndarray, a: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """|PC| / |AP| for cells C (M, 2), handle A inside the circle (O, R); P = where the ray A→C meets the circle.

    With e = (C − A)/|C − A| and OA = A − O, the ray A + s·e meets the circle at
    s = |AP| = −e·OA + √((e·OA)² − |OA|² + R²)  (the positive root of |A + s·e − O|² = R²),
    and |PC| = |AP| − |AC|, so the factor is 1 − |AC|/|AP|: 1 at the handle, 0 on the circle (clipped to [0, 1]
    for cells on or beyond it). A handle on or outside the circle (a one-cell region) gives 1 at the handle and
    0 elsewhere.
    """
    cells = np.asarray(cells)
    dt = np.float32 if cells.dtype == np.float32 else np.float64
    dx = cells[:, 0].astype(dt) - dt(a[0])
    dy = cells[:, 1].astype(dt) - dt(a[1])
    return _factor(dx, dy, np.sqrt(dx * dx + dy * dy), a, centre, radius)


def _factor(dx, dy, d_ac, a, centre, radius):
    oax, oay = float(a[0] - centre[0]), float(a[1] - centre[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        e_dot = np.where(d_ac > 1e-6, (dx * oax + dy * oay) / d_ac, 0.0)
        ap = -e_dot + np.sqrt(np.maximum(e_dot * e_dot - (oax * oax + oay * oay) + radius * radius, 0.0))
        f = np.where(ap > 1e-6, 1.0 - d_ac / np.where(ap > 1e-6, ap, 1.0), 0.0)
    f = np.where(d_ac <= 1e-6, 1.0, f)
    return np.clip(f, 0.0, 1.0).astype(dx.dtype, copy=False)


def pair_weights(cells: np.ndarray, handles: np.ndarray) -> np.ndarray:
    """(N, M) weights w_i(C) = (1/(|C − A_i| + ε)) / Σ_j 1/(|C − A_j| + ε); each column sums to 1."""
    inv = 1.0 / (np.linalg.norm(np.asarray(cells, np.float64)[None] - np.asarray(handles, np.float64)[:, None],
                                axis=-1) + EPS)
    return inv / inv.sum(axis=0, keepdims=True)


def displacement(cells: np.ndarray, handles, targets, centre: np.ndarray, radius: float) -> np.ndarray:
    """(M, 2) displacement of each cell: Σ_i w_i(C) · (|P_iC|/|A_iP_i|) · (B_i − A_i)."""
    return _field(cells, handles, targets, centre, radius)[0]


def _field(cells, handles, targets, centre, radius, rigid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(displacement (M, 2), distance to the nearest handle (M,)); float32, one pass per pair, so 16 pairs over a
    512² region stay inside the preview's budget."""
    handles, targets = np.asarray(handles, np.float64), np.asarray(targets, np.float64)
    cx = np.asarray(cells)[:, 0].astype(np.float32)
    cy = np.asarray(cells)[:, 1].astype(np.float32)
    num = np.zeros((cx.size, 2), np.float32)
    den = np.zeros(cx.size, np.float32)
    near = np.full(cx.size, np.inf, np.float32)
    for a, b in zip(handles, targets):
        dx, dy = cx - np.float32(a[0]), cy - np.float32(a[1])
        d = np.sqrt(dx * dx + dy * dy)
        inv = 1.0 / (d + np.float32(EPS))
        g = inv if rigid else inv * _factor(dx, dy, d, a, centre, radius)
        num[:, 0] += g * np.float32(b[0] - a[0])
        num[:, 1] += g * np.float32(b[1] - a[1])
        den += inv
        np.minimum(near, d, out=near)
    return (num / den[:, None]).astype(np.float64), near


def warp_field(region: np.ndarray, handles, targets, rigid: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The region's cells (M, 2) as integer (x, y), their displacements (M, 2) and distances to the nearest
    handle (M,). ``rigid``: no stretch (every factor 1), so one pair translates the whole region by B − A and
    several pairs blend their drags by inverse distance only (FastDrag's "object moving")."""
    centre, radius = circumscribed_circle(region)
    ys, xs = np.nonzero(region)
    cells = np.stack([xs, ys], axis=1)
    disp, near = _field(cells, handles, targets, centre, radius, rigid)
    return cells, disp, near


# ---- moving values ---------------------------------------------------------------------------------------
def forward_copy(x: np.ndarray, cells: np.ndarray, disp: np.ndarray, priority: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Vacate ``cells`` of ``x`` (H, W, C) and copy each one's value to ``round(C + disp)`` (clipped to the grid).

    Where several cells land on one, the one with the lowest ``priority`` wins and later ones are dropped (no
    overwriting); a cell outside the region may receive a value once. Returns (moved array, filled mask): the
    filled mask is False exactly at the holes (vacated cells nothing landed on).
    """
    h, w = x.shape[:2]
    out = x.copy()
    filled = np.ones((h, w), bool)
    filled[cells[:, 1], cells[:, 0]] = False
    if cells.shape[0] == 0:
        return out, filled
    dest = np.rint(cells + disp).astype(np.int64)
    dest[:, 0] = np.clip(dest[:, 0], 0, w - 1)
    dest[:, 1] = np.clip(dest[:, 1], 0, h - 1)
    order = np.argsort(priority, kind="stable")
    flat = dest[order, 1] * w + dest[order, 0]
    _, first = np.unique(flat, return_index=True)  # the first (highest-priority) arrival at each cell
    src, dst = cells[order[first]], dest[order[first]]
    out[dst[:, 1], dst[:, 0]] = x[src[:, 1], src[:, 0]]
    filled[dst[:, 1], dst[:, 0]] = True
    return out, filled


def _nearest_filled(filled: np.ndarray, axis: int, reverse: bool) -> np.ndarray:
    """Index along ``axis`` of the nearest filled cell strictly before (or after, ``reverse``) each cell; −1 if none."""
    n = filled.shape[axis]
    shape = [1, 1]
    shape[axis] = n
    idx = np.broadcast_to(np.arange(n).reshape(shape), filled.shape)
    if not reverse:
        marked = np.where(filled, idx, -1)
        acc = np.maximum.accumulate(marked, axis=axis)
    else:
        marked = np.where(filled, idx, n)
        acc = np.flip(np.minimum.accumulate(np.flip(marked, axis=axis), axis=axis), axis=axis)
        acc = np.where(acc == n, -1, acc)
    return acc


def bnni_fill(x: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Bilateral nearest-neighbour interpolation (FastDrag eq. 4) of the holes (``~filled``) of ``x`` (H, W, C):

    x(C) = Σ_d (1/k_d) · x(C + k_d·u_d) / Σ_d (1/k_d) over the four axis directions u_d with a filled cell, k_d
    cells away (the nearest one). A hole with no filled cell in any direction keeps its value.
    """
    holes = ~filled
    if not holes.any():
        return x
    out = x.astype(np.float32 if x.dtype.kind in "ui" else x.dtype, copy=True)
    hy, hx = np.nonzero(holes)
    acc = np.zeros((hy.size,) + x.shape[2:], np.float64)
    wsum = np.zeros(hy.size, np.float64)
    for axis, reverse in ((1, False), (1, True), (0, False), (0, True)):
        near = _nearest_filled(filled, axis, reverse)[hy, hx]
        ok = near >= 0
        k = np.abs(near - (hx if axis == 1 else hy)).astype(np.float64)
        wt = np.where(ok, 1.0 / np.maximum(k, 1.0), 0.0)
        sy, sx = (hy, np.where(ok, near, 0)) if axis == 1 else (np.where(ok, near, 0), hx)
        acc += wt.reshape(-1, *([1] * (x.ndim - 2))) * x[sy, sx]
        wsum += wt
    good = wsum > 0
    vals = acc[good] / wsum[good].reshape(-1, *([1] * (x.ndim - 2)))
    out[hy[good], hx[good]] = vals.astype(out.dtype)
    return out


# ---- shapes: moving least squares ---------------------------------------------------------------------------
def shape_map(v: np.ndarray, p: np.ndarray, q: np.ndarray, axial: bool) -> np.ndarray:
    """Where points ``v`` (M, 2) go when control points ``p`` (N, 2) go to ``q``: MLS similarity (Schaefer et al.
    2006, eq. 7 in complex form), per point v with w_i = 1/|p_i − v|², p* = Σw_i p_i / Σw_i (q* likewise):

        c = Σ w_i conj(p̂_i) q̂_i / Σ w_i |p̂_i|²,   f(v) = c · (v − p*) + q*      (p̂_i = p_i − p*, q̂_i = q_i − q*)

    ``axial``: |c| scales only along the principal direction u of the weighted p̂_i, f(v) = ĉ·((|c|−1)(v̂·u)u + v̂)
    + q* with ĉ = c/|c| — a bar pulled away from a pin gets longer, not wider. One control point: a translation.
    Exact at the control points for one or two of them (a global similarity / axial map, whose inverse is the same
    map with ``p`` and ``q`` swapped)."""
    v, p, q = (np.asarray(a, np.float64).reshape(-1, 2) for a in (v, p, q))
    if len(p) == 1:
        return v + (q[0] - p[0])
    w = 1.0 / (((v[:, None] - p[None]) ** 2).sum(-1) + 1e-6)  # (M, N)
    ws = w.sum(1, keepdims=True)
    ps, qs = (w @ p) / ws, (w @ q) / ws  # (M, 2)
    ph, qh = p[None] - ps[:, None], q[None] - qs[:, None]  # (M, N, 2)
    pc, qc = ph[..., 0] + 1j * ph[..., 1], qh[..., 0] + 1j * qh[..., 1]
    mu = (w * np.abs(pc) ** 2).sum(1)
    c = np.where(mu > 1e-9, (w * np.conj(pc) * qc).sum(1) / np.where(mu > 1e-9, mu, 1.0), 1.0)
    vh = (v - ps)[:, 0] + 1j * (v - ps)[:, 1]
    if axial:
        cxx, cyy = (w * ph[..., 0] ** 2).sum(1), (w * ph[..., 1] ** 2).sum(1)
        cxy = (w * ph[..., 0] * ph[..., 1]).sum(1)
        u = np.exp(0.5j * np.arctan2(2 * cxy, cxx - cyy))  # principal direction of the p̂_i
        along = (vh * np.conj(u)).real
        scale = np.abs(c)
        vh = vh + (scale - 1.0) * along * u
        c = np.where(scale > 1e-9, c / np.where(scale > 1e-9, scale, 1.0), 1.0)
    f = c * vh
    return np.stack([f.real, f.imag], axis=1) + qs


def shape_warp(hwc: np.ndarray, region: np.ndarray, handles, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward warp of the ``region`` of ``hwc`` (H, W, C) by ``shape_map`` (axial when a pair is a pin): every
    cell whose inverse image (nearest cell) lies in the region takes its value; region cells nothing lands on are
    vacated and filled by BNNI. Returns (array, filled-before-BNNI mask, landed-cells mask)."""
    h, w = region.shape
    p, q = np.asarray(handles, np.float64), np.asarray(targets, np.float64)
    axial = bool(np.any(np.all(p == q, axis=1)))
    ys, xs = np.mgrid[0:h, 0:w]
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
    src = np.rint(shape_map(grid, q, p, axial)).astype(np.int64)
    inside = (src[:, 0] >= 0) & (src[:, 0] < w) & (src[:, 1] >= 0) & (src[:, 1] < h)
    ok = inside.copy()
    ok[inside] = region[src[inside, 1], src[inside, 0]]
    out = hwc.copy()
    filled = ~region.copy()
    dst = grid[ok]
    out[dst[:, 1], dst[:, 0]] = hwc[src[ok, 1], src[ok, 0]]
    filled[dst[:, 1], dst[:, 0]] = True
    return out, filled, ok.reshape(h, w)


def warp(x: np.ndarray, region: np.ndarray, handles, targets, *, layout: str = "hwc", rigid: bool = False
         ) -> tuple[np.ndarray, np.ndarray]:
    """FastDrag's warpage of ``x`` ((H, W, C) for ``layout="hwc"``, (C, H, W) for ``"chw"``, or (H, W)) over the
    bool ``region`` (H, W), points in ``x``'s grid; with ``rigid`` and several pairs, ``shape_warp``. Returns (warped
    array of ``x``'s layout and dtype kind, the bool (H, W) map of every cell that changed or received a value: the
    vacated and the landed cells)."""
    if layout not in ("hwc", "chw"):
        raise ValueError(layout)
    arr = np.asarray(x)
    plane = arr.ndim == 2
    hwc = arr[..., None] if plane else (np.moveaxis(arr, 0, -1) if layout == "chw" else arr)
    if hwc.shape[:2] != region.shape:
        raise ValueError(f"region {region.shape} does not match the array's grid {hwc.shape[:2]}")
    if rigid and len(handles) > 1:
        moved, filled, landed = shape_warp(hwc, region, handles, targets)
        out, changed = bnni_fill(moved, filled), region | landed
    else:
        cells, disp, near = warp_field(region, handles, targets, rigid)
        moved, filled = forward_copy(hwc, cells, disp, near)
        out = bnni_fill(moved, filled)
        changed = region.copy()
        dest = np.rint(cells + disp).astype(np.int64)
        changed[np.clip(dest[:, 1], 0, region.shape[0] - 1), np.clip(dest[:, 0], 0, region.shape[1] - 1)] = True
    if arr.dtype.kind in "ui":
        out = np.clip(np.rint(out), np.iinfo(arr.dtype).min, np.iinfo(arr.dtype).max).astype(arr.dtype)
    out = out[..., 0] if plane else (np.moveaxis(out, -1, 0) if layout == "chw" else out)
    return out, changed


# ---- the region and the checks the task and the preview share --------------------------------------------
def default_region(size: tuple[int, int], points) -> np.ndarray:
    """Without a mask: a disc around each handle, radius max(|B − A|, short side / 8) pixels (H×W bool of ``size``
    = (w, h)). It reaches past the target, so the circle the field falls off in covers the whole drag."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), bool)
    for (hx, hy), (tx, ty) in points:
        r = max(math.dist((hx, hy), (tx, ty)), min(w, h) * DEFAULT_RADIUS_FRACTION)
        out |= (xx - hx) ** 2 + (yy - hy) ** 2 <= r * r
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every unmasked area it encloses (4-connected, not reaching the border): a painted ring's
    inside moves with the ring, and a handle at its centre is "in" the mask."""
    outside = (~mask).astype(np.uint8)
    n, labels = cv2.connectedComponents(outside, connectivity=4)
    if n <= 1:
        return mask.copy()
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    enclosed = ~np.isin(labels, border) & (outside > 0)
    return mask | enclosed


def squeezed_extent(region: np.ndarray, handles, targets) -> tuple[float, float]:
    """(before, after): the ``region``'s narrowest extent in pixels, √12 · σ along its minor principal axis (the
    width of a uniform bar), and the same of its image under ``shape_map``'s deformation by handles → targets."""
    ys, xs = np.nonzero(region)
    v = np.stack([xs, ys], 1).astype(np.float64)[:: max(1, len(xs) // 20000)]
    p, q = np.asarray(handles, np.float64).reshape(-1, 2), np.asarray(targets, np.float64).reshape(-1, 2)
    axial = bool(np.any(np.all(p == q, axis=1)))

    def narrowest(pts: np.ndarray) -> float:
        if len(pts) < 3:
            return 0.0
        return float(math.sqrt(12.0 * max(0.0, np.linalg.eigvalsh(np.cov(pts.T))[0])))

    return narrowest(v), narrowest(_mapped(v, p, q, axial))


def check_not_squeezed(region: np.ndarray, handles, targets, cell: float) -> None:
    """A deformation that squeezes the object narrower than one latent cell (``cell`` pixels: 8 for SD, 4 for the
    toy model, in the picture's pixels) is refused: the model cannot draw it, and the object would vanish. An
    object that was that narrow already may stay so."""
    if len(handles) < 2 or not region.any():
        return
    before, after = squeezed_extent(region, handles, targets)
    if after < cell <= before:
        raise EditError(f"The drag squeezes the object to {after:.0f} px across, less than one latent cell ({cell:g} "
                        "px for this model), where it would vanish: bring the points less close together.")


def edge_px(size: tuple[int, int]) -> int:
    """How far (pixels) off a mask a handle may be and still be on it: 2 px at 64², 4 at 512², with the picture."""
    return max(2, round(max(size) / 128))


def check_handles_in_mask(mask: np.ndarray | None, points) -> None:
    """A painted mask (holes filled) must contain every handle, the content to move; EditError names the first
    that is not. A handle within ``edge_px`` of the mask counts as on it: a point put on an object's rim (its end,
    its corner) often lands a pixel outside a tight mask. A pin (target = handle) may lie anywhere: outside the mask
    it just stays."""
    if mask is None:
        return
    mask = fill_holes(mask)
    h, w = mask.shape
    r = edge_px((w, h))
    for i, ((hx, hy), target) in enumerate(points, 1):
        if (hx, hy) == tuple(target):
            continue
        x, y = min(max(int(round(hx)), 0), w - 1), min(max(int(round(hy)), 0), h - 1)
        yy, xx = np.ogrid[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
        near = mask[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] & ((yy - y) ** 2 + (xx - x) ** 2 <= r * r)
        if not near.any():
            raise EditError(f"Handle {i} ({hx:g}, {hy:g}) is outside the mask: paint over the object to drag, "
                            "or clear the mask.")


def edit_region(size: tuple[int, int], mask: np.ndarray | None, points) -> np.ndarray:
    """The region the warp stretches, in pixels of ``size`` = (w, h): the mask with its holes filled, or
    ``default_region``."""
    if mask is None:
        return default_region(size, points)
    check_handles_in_mask(mask, points)
    return fill_holes(mask)


def preview(image: Image.Image, mask: np.ndarray | None, points: Sequence, rigid: bool = False) -> Image.Image:
    """What the ``instant`` drag's warp does, applied to the pixels (target ≤ 0.2 s at 512² on one CPU core).

    ``points`` are ((hx, hy), (tx, ty)) pairs in ``image`` pixels, ``mask`` an H×W bool (None: ``default_region``).
    Images with a long side above ``PREVIEW_SIDE`` are warped at that size and resized back. No pairs: the image
    unchanged. A handle outside the mask raises the same ``EditError`` as the task.
    """
    img = image.convert("RGB")
    pairs = [((float(a[0]), float(a[1])), (float(b[0]), float(b[1]))) for a, b in (points or ())]
    if not pairs:
        return img
    if mask is not None and not np.asarray(mask).any():
        mask = None  # an empty mask means "no mask", as in the requests
    region = edit_region(img.size, None if mask is None else np.asarray(mask, bool), pairs)
    scale = min(1.0, PREVIEW_SIDE / max(img.size))
    work = img
    if scale < 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        work = img.resize(size, Image.BILINEAR)
        region = np.asarray(Image.fromarray(region.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
        # pixel centres map as (p + 0.5)·s − 0.5, the same convention as editing.geometry.scale_point
        pairs = [tuple(((p[0] + 0.5) * size[0] / img.width - 0.5, (p[1] + 0.5) * size[1] / img.height - 0.5)
                       for p in pair) for pair in pairs]
    out, _ = warp(np.asarray(work), region, [a for a, _ in pairs], [b for _, b in pairs], rigid=rigid)
    res = Image.fromarray(out)
    return res.resize(img.size, Image.BILINEAR) if res.size != img.size else res


# ---- pixels: the bidirectional warp of the inpainting drag ---------------------------------------------------
def _mapped(v: np.ndarray, p: np.ndarray, q: np.ndarray, axial: bool) -> np.ndarray:
    """``shape_map(v, p, q, axial)``; with one or two control points the map is one affine map for every v (see
    ``shape_map``), so it is fitted on three points and applied to all — a 512² grid in milliseconds."""
    if len(p) > 2:
        return shape_map(v, p, q, axial)
    basis = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) * 64.0 + p[0]
    o, ex, ey = shape_map(basis, p, q, axial)
    a = np.stack([(ex - o) / 64.0, (ey - o) / 64.0], axis=1)  # columns: images of the unit x and y steps
    return (np.asarray(v, np.float64) - basis[0]) @ a.T + o


def bidirectional_warp(hwc: np.ndarray, region: np.ndarray, handles, targets
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move the ``region`` of ``hwc`` (H, W, C) so its points follow handles → targets, in pixels (Inpaint4Drag's
    bidirectional warp, with ``shape_map`` as the deformation: one pair translates, two scale and turn, a pin makes
    it axial about the pin). Returns (warped array, where the object now is, the uncovered holes), both masks H×W.

    Forward: every region pixel v goes to f(v) (rounded), marking the object's new footprint; backward: every pixel
    u whose inverse image f⁻¹(u) falls in the region belongs to it too (so a grown object has no pinholes), and a
    morphological closing joins the two. Every footprint pixel then takes the bilinear sample at f⁻¹(u): the object
    keeps its own pixels, resampled, and the holes are what the region lost and nothing covered."""
    h, w = region.shape
    p, q = np.asarray(handles, np.float64).reshape(-1, 2), np.asarray(targets, np.float64).reshape(-1, 2)
    axial = bool(np.any(np.all(p == q, axis=1)))
    ys, xs = np.nonzero(region)
    fwd = np.rint(_mapped(np.stack([xs, ys], 1), p, q, axial)).astype(np.int64)
    keep = (fwd[:, 0] >= 0) & (fwd[:, 0] < w) & (fwd[:, 1] >= 0) & (fwd[:, 1] < h)
    placed = np.zeros((h, w), bool)
    placed[fwd[keep, 1], fwd[keep, 0]] = True
    gy, gx = np.mgrid[0:h, 0:w]
    src = _mapped(np.stack([gx.ravel(), gy.ravel()], 1), q, p, axial).astype(np.float32)
    sx, sy = src[:, 0].reshape(h, w), src[:, 1].reshape(h, w)
    rx, ry = np.rint(sx).astype(np.int64), np.rint(sy).astype(np.int64)
    ok = (rx >= 0) & (rx < w) & (ry >= 0) & (ry < h)
    back = np.zeros((h, w), bool)
    back[ok] = region[ry[ok], rx[ok]]
    obj = cv2.morphologyEx((placed | back).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)) > 0
    sampled = cv2.remap(np.ascontiguousarray(hwc, dtype=np.float32), sx, sy, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
    sampled = sampled.reshape(hwc.shape)
    out = hwc.astype(np.float32, copy=True)
    out[obj] = sampled[obj]
    if hwc.dtype.kind in "ui":
        out = np.clip(np.rint(out), 0, np.iinfo(hwc.dtype).max).astype(hwc.dtype)
    return out, obj, region & ~obj
