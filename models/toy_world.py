"""A seeded procedural toy world: small RGB scenes of flat-coloured shapes, with captions and ground truth.

Every scene is 64×64 and holds one to three non-overlapping shapes (disk, square, triangle, ring) in one
of six well-separated colours and three sizes, on a plain or gently graded gray / white / black
background. Each scene comes with a caption ("a red disk and a small blue square on gray") and,
per shape, a bool mask, its centroid ``(x, y)`` in pixels, its colour name and its class.

It is the training set of the built-in ``toy`` model (``models/train_toy.py``) and the ground truth of
the offline quality benchmark (``bench/toy_quality.py``): ``render`` rebuilds a scene with a shape
moved, and ``segment_colour`` finds a colour's pixels in any image (a sample, an edit), so a dragged
shape's new centroid can be measured.

Seeds: training uses seeds below ``HELDOUT_SEED``; benchmarks draw scenes from ``HELDOUT_SEED`` up.

Drag cases (``make_cases``): held-out scenes with a handle, a target and a mask, shared by the drag benchmark
(``bench/toy_drag.py``) and the UI's examples (``ui/examples.py``), which must not import ``bench``.

World v2 (``make_scene(seed, "v2")``, ``make_batch(seeds, "v2")``): the same colours, backgrounds and captions,
with continuous sizes (captions still say small / medium / large by range, ``size_word``), squares and
triangles at any rotation (``Shape.angle``) and three elongated kinds, ``bar`` (a capsule), ``oval`` and
``rectangle`` (``Shape.radius`` = half-length, ``Shape.width`` ≥ 8 px = two latent cells). A quarter of v2
scenes are exactly v1's, so what the shipped ``toy`` draws stays in training. v1 (the default everywhere) is
bit for bit what it was: the shipped ``toy`` model, its benchmark and goldens depend on it.

Deformation cases (``make_deform_cases(family, n, seed)`` -> ``DeformCase``): ``move`` (v1's ``make_cases``),
``scale`` (two opposite rim points / corners pulled apart or together), ``stretch`` (an end pulled along the
axis, the other end pinned), ``rotate`` (an end turned about a pin at the other end or the centre); each with
its points (pins are pairs with handle == target), edit mask and the re-rendered true result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

SIZE = 64  # image side, pixels
HELDOUT_SEED = 1_000_000_000  # first seed of the held-out (benchmark) scenes; training stays below
TUNE_SEED = 1_500_000_000  # first seed of the tuning scenes: settings are picked here, never on the benchmark's

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 205, 215),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
}
KINDS = ("disk", "square", "triangle", "ring")
SIZES: dict[str, float] = {"small": 6.0, "medium": 9.0, "large": 12.5}  # "radius" in pixels
GRADIENT_AMPLITUDE = 20.0  # a graded background varies by ± this much (0-255 scale) across the image
SEGMENT_MAX_DISTANCE = 100.0  # RGB distance beyond which a pixel belongs to no palette colour

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres


@dataclass(frozen=True)
class Shape:
    """One shape: geometry (``kind``, ``colour``, ``size``, ``center``, ``radius``) and its rendered ground truth.

    ``mask`` (H×W bool, the pixels it covers) and ``centroid`` (``(x, y)``, the mask's mean) are filled
    in by ``render``; a Shape built by hand only needs the geometry.
    """

    kind: str
    colour: str
    size: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float  # elongated kinds (v2): half the length, centre to end
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    centroid: tuple[float, float] | None = None
    angle: float = 0.0  # degrees, v2: the axis is (cos, sin) in (x, y) pixels, so positive turns clockwise on screen
    width: float = 0.0  # pixels, full width across the axis: elongated kinds (v2) only

    def moved(self, dx: float, dy: float) -> Shape:
        """The same shape translated by ``(dx, dy)`` pixels (ground truth cleared; call ``render``)."""
        return replace(self, center=(self.center[0] + dx, self.center[1] + dy), mask=None, centroid=None)


@dataclass(frozen=True)
class Background:
    """A background colour name and a linear gradient ``(gx, gy)``: brightness offset at the right / bottom edge."""

    colour: str = "gray"
    gradient: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Scene:
    """A rendered scene: PIL RGB ``image`` (64×64), ``caption``, ``shapes`` (with masks and centroids), ``background``."""

    image: Image.Image
    caption: str
    shapes: list[Shape]
    background: Background
    seed: int | None = None


def _coverage(kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on the pixel grid, from an (approximate) signed distance."""
    dx, dy = _XX - cx, _YY - cy
    if kind == "disk":
        d = np.sqrt(dx * dx + dy * dy) - r
    elif kind == "square":
        d = np.maximum(np.abs(dx), np.abs(dy)) - r * 0.85  # about the disk's area
    elif kind == "ring":
        d = np.abs(np.sqrt(dx * dx + dy * dy) - r * 0.72) - r * 0.28
    elif kind == "triangle":
        # Equilateral, pointing up, centroid at (cx, cy); circumradius 1.25 r. Max of the three half-planes.
        ri = r * 0.625  # inradius
        s3 = np.float32(np.sqrt(3.0) / 2.0)
        d = np.maximum(np.maximum(dy - ri, -0.5 * dy + s3 * dx - ri), -0.5 * dy - s3 * dx - ri)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; choose one of {KINDS}")
    return np.clip(0.5 - d, 0.0, 1.0)


def _background_array(background: Background) -> np.ndarray:
    """H×W×3 float background: the base colour plus a linear brightness gradient centred on the image."""
    base = np.asarray(BACKGROUNDS[background.colour], np.float32)
    gx, gy = background.gradient
    shade = gx * (_XX / SIZE - 0.5) * 2 + gy * (_YY / SIZE - 0.5) * 2
    return base[None, None, :] + shade[..., None]


def render(shapes: list[Shape], background: Background | str = "gray") -> Scene:
    """Draw ``shapes`` (in order, later ones on top) on ``background``; return the Scene with ground truth.

    Each returned shape's ``mask`` is the pixels it covers at least half and that no later shape covers
    (so masks never overlap), and ``centroid`` is that mask's mean ``(x, y)`` (the centre if fully hidden).
    The caption is rebuilt from the shapes, so a scene with a shape moved keeps its caption.
    """
    if isinstance(background, str):
        background = Background(background)
    img = _background_array(background)
    covers = [coverage(s) for s in shapes]
    for s, c in zip(shapes, covers):
        col = np.asarray(COLOURS[s.colour], np.float32)
        img = img * (1 - c[..., None]) + col * c[..., None]
    out = []
    hidden = np.zeros((SIZE, SIZE), bool)
    for s, c in reversed(list(zip(shapes, covers))):
        m = (c >= 0.5) & ~hidden
        hidden |= c >= 0.5
        if m.any():
            cen = (float(_XX[m].mean()), float(_YY[m].mean()))
        else:
            cen = tuple(map(float, s.center))
        out.append(replace(s, mask=m, centroid=cen))
    out.reverse()
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    return Scene(image, caption(out, background), out, background)


def _phrase(s: Shape) -> str:
    size = "" if s.size == "medium" else s.size + " "  # "small"/"large" are said, "medium" is not
    return f"a {size}{s.colour} {s.kind}"


def caption(shapes: list[Shape], background: Background | str = "gray") -> str:
    """'a red disk, a small blue square and a large cyan ring on gray' (shapes left to right).

    At most 73 tokens with ``models.tiny.tiny_tokenizer`` (one token per character), within CLIP's 77."""
    bg = background if isinstance(background, str) else background.colour
    parts = [_phrase(s) for s in sorted(shapes, key=lambda s: s.center[0])]
    if not parts:
        return f"a plain {bg} background"
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} on {bg}"  # "on a gray background" would push 3-shape captions past 77 tokens


def apart(cx: float, cy: float, r: float, other: Shape) -> bool:
    """Whether a shape of radius ``r`` centred at (cx, cy) keeps the world's spacing from ``other``: scenes never
    have shapes closer than this, so the toy model has never seen two shapes touch."""
    return bool(np.hypot(cx - other.center[0], cy - other.center[1]) > (r + other.radius) * 1.25 + 2)


def random_shapes(rng: np.random.Generator, n: int) -> list[Shape]:
    """``n`` random shapes placed without overlap (fewer if placement fails after many tries)."""
    shapes: list[Shape] = []
    for _ in range(n):
        for _try in range(30):
            size = str(rng.choice(list(SIZES)))
            r = SIZES[size]
            reach = r * 1.25 + 1.5  # the triangle's circumradius, plus a margin inside the frame
            cx, cy = rng.uniform(reach, SIZE - reach, size=2)
            if all(apart(cx, cy, r, o) for o in shapes):
                shapes.append(Shape(str(rng.choice(KINDS)), str(rng.choice(list(COLOURS))), size,
                                    (float(cx), float(cy)), r))
                break
    return shapes


def make_scene(seed: int, world: str = "v1") -> Scene:
    """The scene of ``seed``: deterministic, one to three shapes, plain (half the time) or graded background.

    ``world="v2"``: the continuous, deformable world (``make_scene_v2``); the default keeps v1 bit for bit."""
    if world == "v2":
        return make_scene_v2(seed)
    if world != "v1":
        raise ValueError(f"unknown world {world!r}; choose one of {WORLDS}")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    bg = str(rng.choice(list(BACKGROUNDS)))
    grad = (0.0, 0.0) if rng.random() < 0.5 else tuple(float(g) for g in rng.uniform(-1, 1, 2) * GRADIENT_AMPLITUDE)
    shapes = random_shapes(rng, n)
    scene = render(shapes, Background(bg, grad))
    return replace(scene, seed=seed)


def make_batch(seeds, world: str = "v1") -> tuple[np.ndarray, list[str]]:
    """Images (N×64×64×3 uint8) and captions of the scenes of ``seeds`` in ``world`` (v1 or v2)."""
    scenes = [make_scene(int(s), world) for s in seeds]
    return np.stack([np.asarray(s.image) for s in scenes]), [s.caption for s in scenes]


def segment_colour(image, colour: str, max_distance: float = SEGMENT_MAX_DISTANCE) -> np.ndarray:
    """Bool H×W mask of the pixels whose nearest palette entry is ``colour``.

    The palette is every shape colour and every background colour, so anti-aliased edges, gradients and
    the colour drift of a generated image are assigned to the closest named colour; pixels farther than
    ``max_distance`` (RGB, 0-255) from every entry belong to none.
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of {sorted(COLOURS)}")
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)[..., :3]
    names = list(COLOURS) + ["bg-" + b for b in BACKGROUNDS]
    pal = np.asarray(list(COLOURS.values()) + list(BACKGROUNDS.values()), np.float32)
    d = np.linalg.norm(a[:, :, None, :] - pal[None, None], axis=-1)  # H×W×P
    nearest = d.argmin(-1)
    return (nearest == names.index(colour)) & (d.min(-1) <= max_distance)


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask: (labels H×W int, 0 = background; count)."""
    import cv2

    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    return lab, n - 1


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (empty mask in, empty mask out)."""
    lab, n = label(mask)
    if n == 0:
        return np.zeros_like(mask, bool)
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (1 + int(sizes.argmax()))


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """Mean ``(x, y)`` of a bool mask's pixels (pixel centres), or None if empty."""
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


# ---- drag cases: a scene, the shape to drag, handle -> target, and the editable mask -------------
@dataclass(frozen=True)
class Case:
    scene: Scene
    shape: Shape  # the dragged shape
    handle: tuple[float, float]
    target: tuple[float, float]
    mask: np.ndarray  # H×W bool


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0


def make_cases(n: int, seed: int = HELDOUT_SEED) -> list[Case]:
    """``n`` held-out drag cases: 1–2 shapes, the dragged shape's colour unique in its scene; the handle is its
    centroid, the target 6–20 px away, the mask covers its start and end dilated by 3 px."""
    cases, s = [], seed
    rng = np.random.default_rng(seed)
    while len(cases) < n:
        scene, s = make_scene(s), s + 1
        if len(scene.shapes) > 2:
            continue
        shape = scene.shapes[0]
        if sum(o.colour == shape.colour for o in scene.shapes) > 1 or shape.mask.sum() < 20:
            continue
        for _ in range(20):  # a target 6–20 px away that keeps the shape inside the frame
            ang, dist = rng.uniform(0, 2 * math.pi), rng.uniform(6, 20)
            dx, dy = dist * math.cos(ang), dist * math.sin(ang)
            reach = shape.radius * 1.25 + 1
            cx, cy = shape.center[0] + dx, shape.center[1] + dy
            if reach <= cx <= SIZE - reach and reach <= cy <= SIZE - reach:
                break
        else:
            continue
        moved = render([shape.moved(dx, dy)], scene.background).shapes[0]
        handle = shape.centroid
        target = (handle[0] + dx, handle[1] + dy)
        cases.append(Case(scene, shape, handle, target, _dilate(shape.mask | moved.mask, 3)))
    return cases


# ==== world v2: continuous size, any rotation, elongated kinds, and deformation cases ==============
# v1 above stays bit for bit (the shipped ``toy`` model, its benchmark and goldens depend on it); v2 adds
# geometry a reshaping drag can act on. A v2 Shape uses the same dataclass: ``radius`` is continuous,
# ``angle`` turns it, and the elongated kinds also have a ``width`` (their ``radius`` is the half-length).
WORLDS = ("v1", "v2")
ELONGATED = ("bar", "oval", "rectangle")  # bar = capsule (rounded ends); captions use these words
KINDS_V2 = KINDS + ELONGATED
RADIUS_RANGE = (5.0, 13.5)  # compact kinds' continuous radius (v1 used 6 / 9 / 12.5)
RING_MIN_RADIUS = 6.0  # a ring's band is 0.56 r wide: below v1's small ring it would be thinner than v1 ever drew
WIDTH_RANGE = (8.0, 13.0)  # elongated widths: at 64² with the 4× VAE, at least two latent cells
LENGTH_RANGE = (18.0, 46.0)  # elongated full lengths
MIN_EXTENT = 4.0  # one latent cell: no deformation case makes any part of a shape thinner than this
GAP_V2 = 4.0  # pixels of background kept between any two v2 shapes (v1's `apart` keeps ≥ 5 for its sizes)
V1_SHARE = 0.25  # share of v2 scenes that are exactly a v1 scene, so v1's axis-aligned sizes stay in training
# size words by the radius of the disk of equal area; the cuts are midway between v1's 6 / 9 / 12.5
SIZE_CUTS = ((7.5, "small"), (10.75, "medium"), (float("inf"), "large"))
FAMILIES = ("move", "scale", "stretch", "rotate")
# v2 case scenes start at the split's first seed plus this, so the families draw different scenes (move keeps
# v1's seeds); 100 M apart keeps every bench seed below TUNE_SEED
FAMILY_OFFSET = {"move": 0, "scale": 100_000_000, "stretch": 200_000_000, "rotate": 300_000_000}


def area(shape: Shape) -> float:
    """The shape's geometric area in pixels² (from its parameters, not its rendered mask)."""
    r, w = shape.radius, shape.width
    if shape.kind == "disk":
        return math.pi * r * r
    if shape.kind == "square":
        return (1.7 * r) ** 2
    if shape.kind == "ring":
        return math.pi * (r * r - (0.44 * r) ** 2)
    if shape.kind == "triangle":
        return 3 * math.sqrt(3) * (0.625 * r) ** 2  # equilateral with inradius 0.625 r
    if shape.kind == "bar":
        return 2 * r * w - (4 - math.pi) * (w / 2) ** 2
    if shape.kind == "oval":
        return math.pi * r * w / 2
    if shape.kind == "rectangle":
        return 2 * r * w
    raise ValueError(f"unknown shape kind {shape.kind!r}; choose one of {KINDS_V2}")


def size_word(shape: Shape) -> str:
    """small / medium / large: compact kinds by their radius (as v1 named them), elongated ones by the radius of
    the disk of their area; the cuts lie midway between v1's 6 / 9 / 12.5."""
    r = shape.radius if shape.kind in KINDS else math.sqrt(area(shape) / math.pi)
    return next(word for cut, word in SIZE_CUTS if r < cut)


def min_extent(shape: Shape) -> float:
    """The thinnest part of the shape in pixels (a ring's band, a bar's width, a square's side...)."""
    r = shape.radius
    return {"disk": 2 * r, "square": 1.7 * r, "triangle": 1.875 * r, "ring": 0.56 * r}.get(
        shape.kind, min(shape.width, 2 * r))


def reach(shape: Shape) -> float:
    """Radius of a circle about ``center`` that holds the whole shape."""
    if shape.kind == "rectangle":
        return math.hypot(shape.radius, shape.width / 2)
    if shape.kind in ELONGATED:
        return shape.radius
    return shape.radius * (1.25 if shape.kind == "triangle" else 1.21 if shape.kind == "square" else 1.0)


def axis(shape: Shape) -> tuple[float, float]:
    """Unit vector of the shape's angle, in (x, y) pixels."""
    a = math.radians(shape.angle)
    return math.cos(a), math.sin(a)


def ends(shape: Shape) -> tuple[tuple[float, float], tuple[float, float]]:
    """The two ends of an elongated shape's axis (centre ± half-length along the axis): (+ end, − end)."""
    (cx, cy), (ux, uy), h = shape.center, axis(shape), shape.radius
    return (cx + h * ux, cy + h * uy), (cx - h * ux, cy - h * uy)


def coverage(shape: Shape) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of any v1 or v2 shape (v1 geometry goes through v1's ``_coverage``)."""
    cx, cy = shape.center
    if shape.kind in KINDS and shape.angle == 0.0:
        return _coverage(shape.kind, cx, cy, shape.radius)  # bit for bit what v1 drew
    if shape.kind not in KINDS_V2:
        raise ValueError(f"unknown shape kind {shape.kind!r}; choose one of {KINDS_V2}")
    ux, uy = (np.float32(v) for v in axis(shape))
    dx, dy = _XX - cx, _YY - cy
    u, v = dx * ux + dy * uy, -dx * uy + dy * ux  # along and across the axis
    r, hw = shape.radius, shape.width / 2
    if shape.kind in ("disk", "ring"):
        return _coverage(shape.kind, cx, cy, r)  # rotation changes nothing
    if shape.kind == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - r * 0.85  # v1's square in the turned frame
    elif shape.kind == "triangle":
        ri = r * 0.625  # v1's triangle (pointing up at angle 0) in the turned frame: v plays dy, u plays dx
        s3 = np.float32(np.sqrt(3.0) / 2.0)
        d = np.maximum(np.maximum(v - ri, -0.5 * v + s3 * u - ri), -0.5 * v - s3 * u - ri)
    elif shape.kind == "bar":  # capsule: distance to the axis segment, minus the half-width
        d = np.sqrt(np.maximum(np.abs(u) - max(r - hw, 0.0), 0.0) ** 2 + v * v) - hw
    elif shape.kind == "rectangle":  # Chebyshev-style like v1's square: exact inside, within 0.5 px at corners
        d = np.maximum(np.abs(u) - r, np.abs(v) - hw)
    else:  # oval: first-order distance to the ellipse (level-set value over its gradient's length)
        k = np.sqrt((u / r) ** 2 + (v / hw) ** 2)
        g = np.sqrt((u / r**2) ** 2 + (v / hw**2) ** 2) / np.maximum(k, 1e-6)
        d = (k - 1) / np.maximum(g, 1e-6)
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


def gap(a: Shape, b: Shape) -> float:
    """Pixels of background between two shapes' rendered footprints (0 if they touch or overlap)."""
    import cv2

    fa, fb = coverage(a) > 0, coverage(b) > 0
    if (fa & fb).any():
        return 0.0
    dist = cv2.distanceTransform((~fa).astype(np.uint8), cv2.DIST_L2, 5)
    return float(dist[fb].min()) if fb.any() else float("inf")


def inside(shape: Shape, margin: float = 1.0) -> bool:
    """Whether the whole shape lies at least ``margin`` px inside the frame."""
    cx, cy, r = shape.center[0], shape.center[1], reach(shape)
    if margin <= cx - r and cx + r <= SIZE - margin and margin <= cy - r and cy + r <= SIZE - margin:
        return True
    cov = coverage(shape) > 0  # the bounding circle is loose for thin turned shapes: look at the pixels
    m = int(math.ceil(margin))
    return bool(cov.any()) and not (cov[:m].any() or cov[-m:].any() or cov[:, :m].any() or cov[:, -m:].any())


def fits(shape: Shape, others: list[Shape]) -> bool:
    """Inside the frame and at least ``GAP_V2`` px from every other shape: the only placements v2 ever draws."""
    return inside(shape, 1.5) and all(gap(shape, o) >= GAP_V2 for o in others)


def random_shape_v2(rng: np.random.Generator, kind: str | None = None) -> Shape:
    """One v2 shape at a random place: continuous size, any angle (compact kinds upright half the time)."""
    kind = kind or str(rng.choice(KINDS_V2))
    colour = str(rng.choice(list(COLOURS)))
    if kind in ELONGATED:
        width = float(rng.uniform(*WIDTH_RANGE))
        length = float(rng.uniform(max(LENGTH_RANGE[0], width + 6), LENGTH_RANGE[1]))
        radius, angle = length / 2, float(rng.uniform(0, 180))
    else:
        width = 0.0
        radius = float(rng.uniform(RING_MIN_RADIUS if kind == "ring" else RADIUS_RANGE[0], RADIUS_RANGE[1]))
        turn = kind in ("square", "triangle") and rng.random() < 0.5
        angle = float(rng.uniform(0, 90 if kind == "square" else 120)) if turn else 0.0  # their symmetry periods
    probe = Shape(kind, colour, "medium", (0.0, 0.0), radius, angle=angle, width=width)
    r = reach(probe)
    cx, cy = rng.uniform(r + 1.5, SIZE - r - 1.5, size=2) if r + 1.5 < SIZE / 2 else (SIZE / 2, SIZE / 2)
    return replace(probe, size=size_word(probe), center=(float(cx), float(cy)))


def random_shapes_v2(rng: np.random.Generator, n: int) -> list[Shape]:
    """``n`` random v2 shapes that all ``fits`` (fewer if placement fails after many tries)."""
    shapes: list[Shape] = []
    for _ in range(n):
        for _try in range(30):
            s = random_shape_v2(rng)
            if fits(s, shapes):
                shapes.append(s)
                break
    return shapes


def make_scene_v2(seed: int, v1_share: float = V1_SHARE) -> Scene:
    """The v2 scene of ``seed``: with probability ``v1_share`` exactly v1's scene of that seed, else one to three
    v2 shapes (any of ``KINDS_V2``) on a plain or graded background. Deterministic."""
    rng = np.random.default_rng([seed, 2])  # a stream of its own: v2's draws never shift v1's
    if rng.random() < v1_share:
        return make_scene(seed)
    n = int(rng.integers(1, 4))
    bg = str(rng.choice(list(BACKGROUNDS)))
    grad = (0.0, 0.0) if rng.random() < 0.5 else tuple(float(g) for g in rng.uniform(-1, 1, 2) * GRADIENT_AMPLITUDE)
    return replace(render(random_shapes_v2(rng, n), Background(bg, grad)), seed=seed)


# ---- deformation cases: v2 scenes, a drag that reshapes one shape, and its exact re-rendered result ------
Point = tuple[float, float]


@dataclass(frozen=True)
class DeformCase:
    """One seeded drag case of a ``family`` (move / scale / stretch / rotate) with exact ground truth.

    ``points`` are the ``((handle, target), ...)`` pairs a method gets, pins (handle == target) included;
    ``drags`` indexes the pairs that move (their targets are where the dragged features, an end or a rim
    point or the centroid, must land); ``mask`` is the editable area (old and new outline, dilated by 3 px);
    ``truth`` is the scene re-rendered with the shape deformed and ``truth_shape`` that shape with its mask;
    ``amount`` says how much: the scale factor, the length change in px, the turn in degrees (clockwise on
    screen), or the move distance in px."""

    family: str
    scene: Scene
    shape: Shape  # the dragged shape, as rendered in ``scene``
    points: tuple[tuple[Point, Point], ...]
    drags: tuple[int, ...]
    mask: np.ndarray = field(repr=False)  # H×W bool
    truth: Scene = field(repr=False)
    truth_shape: Shape = field(repr=False)
    amount: float = 0.0

    @property
    def handle(self) -> Point:
        """The first dragged pair's handle (the only one for move, stretch and rotate)."""
        return self.points[self.drags[0]][0]

    @property
    def target(self) -> Point:
        """The first dragged pair's target."""
        return self.points[self.drags[0]][1]

    @property
    def landing(self) -> tuple[Point, ...]:
        """Where each dragged feature (the centroid, a rim point or corner, an end) must land: the drags' targets."""
        return tuple(self.points[i][1] for i in self.drags)

    @property
    def pins(self) -> tuple[Point, ...]:
        """The points that stay (pairs whose handle is their target)."""
        return tuple(h for h, t in self.points if h == t)

    def as_move_case(self) -> Case:
        """A move case as v1's ``Case`` (what ``make_cases`` gives), for v1's metric."""
        return Case(self.scene, self.shape, self.handle, self.target, self.mask)


def _turn(p: Point, pivot: Point, degrees: float) -> Point:
    """``p`` turned about ``pivot`` by ``degrees`` (clockwise on screen: y points down)."""
    a = math.radians(degrees)
    dx, dy = p[0] - pivot[0], p[1] - pivot[1]
    return pivot[0] + dx * math.cos(a) - dy * math.sin(a), pivot[1] + dx * math.sin(a) + dy * math.cos(a)


def _in_frame(p: Point) -> bool:
    return 0.0 <= p[0] < SIZE and 0.0 <= p[1] < SIZE


def rim_pair(shape: Shape, rng: np.random.Generator) -> tuple[Point, Point]:
    """Two opposite boundary points through the centre for a scale drag: a disk's or ring's rim at a random
    angle, two opposite corners of a square, a triangle's vertex and the middle of the side facing it."""
    cx, cy = shape.center
    if shape.kind in ("disk", "ring"):
        phi = rng.uniform(0, 2 * math.pi)
        off = (shape.radius * math.cos(phi), shape.radius * math.sin(phi))
        return (cx + off[0], cy + off[1]), (cx - off[0], cy - off[1])
    if shape.kind == "square":
        a = 0.85 * shape.radius
        corner = _turn((cx + a * rng.choice([-1, 1]), cy + a), (cx, cy), shape.angle)
        return corner, (2 * cx - corner[0], 2 * cy - corner[1])
    if shape.kind == "triangle":  # at angle 0 the vertex points up, at 1.25 r; the facing side is 0.625 r below
        k = int(rng.integers(0, 3))
        vertex = _turn((cx, cy - 1.25 * shape.radius), (cx, cy), shape.angle + 120 * k)
        return vertex, (cx - (vertex[0] - cx) / 2, cy - (vertex[1] - cy) / 2)
    e = ends(shape)
    return e[0], e[1]


def _deform(family: str, shape: Shape, rng: np.random.Generator):
    """(new shape, points, drags, amount) of one random ``family`` drag on ``shape``, or None if it has none."""
    c = shape.center
    if family == "scale":
        if shape.kind not in KINDS:
            return None
        grow = rng.random() < 0.5
        s = float(rng.uniform(1.25, 1.5) if grow else rng.uniform(0.67, 0.8))
        new = replace(shape, radius=shape.radius * s, mask=None, centroid=None)
        lo = RING_MIN_RADIUS if shape.kind == "ring" else RADIUS_RANGE[0]
        if not lo <= new.radius <= RADIUS_RANGE[1]:  # stay within the sizes the world draws
            return None
        a, b = rim_pair(shape, rng)
        pts = tuple((p, (c[0] + s * (p[0] - c[0]), c[1] + s * (p[1] - c[1]))) for p in (a, b))
        return new, pts, (0, 1), s
    if shape.kind not in ELONGATED:
        return None
    (ux, uy), h = axis(shape), shape.radius
    sign = 1.0 if rng.random() < 0.5 else -1.0  # which end is dragged
    end = (c[0] + sign * h * ux, c[1] + sign * h * uy)
    other = (c[0] - sign * h * ux, c[1] - sign * h * uy)
    if family == "stretch":  # the other end is pinned: the shape grows or shrinks from it
        # by a length ratio beyond 0.7 either way, so the unchanged input never passes IoU >= 0.7 with the result
        ratio = float(rng.uniform(1.45, 1.8) if rng.random() < 0.5 else rng.uniform(0.55, 0.68))
        length = 2 * h * ratio
        delta = length - 2 * h
        if not max(LENGTH_RANGE[0], shape.width + 6) <= length <= LENGTH_RANGE[1]:
            return None
        new_c = (other[0] + sign * length / 2 * ux, other[1] + sign * length / 2 * uy)
        new = replace(shape, center=new_c, radius=length / 2, mask=None, centroid=None)
        target = (end[0] + sign * delta * ux, end[1] + sign * delta * uy)
        return new, ((end, target), (other, other)), (0,), delta
    if family == "rotate":  # pinned at the other end or at the centre: the shape turns about the pin
        pivot = other if rng.random() < 0.5 else c
        turn = float(rng.uniform(25, 60)) * (1.0 if rng.random() < 0.5 else -1.0)
        new = replace(shape, center=_turn(c, pivot, turn), angle=(shape.angle + turn) % 180, mask=None, centroid=None)
        return new, ((end, _turn(end, pivot, turn)), (pivot, pivot)), (0,), turn
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def deform_case(family: str, seed: int) -> DeformCase | None:
    """The ``family`` case of scene ``seed`` (a pure v2 scene), or None when that scene makes no fair case:
    more than two shapes, a dragged shape whose colour repeats or of a kind the family cannot act on, or a
    result that would leave the frame, touch another shape, leave the world's sizes or get thinner than
    ``MIN_EXTENT``. The deformation is drawn from ``(seed, family)`` alone, so any process rebuilds it."""
    scene = replace(make_scene_v2(seed, v1_share=0.0), seed=seed)
    if len(scene.shapes) > 2:
        return None
    shape = scene.shapes[0]
    if sum(o.colour == shape.colour for o in scene.shapes) > 1 or shape.mask.sum() < 20:
        return None
    rng = np.random.default_rng([seed, FAMILIES.index(family), 7])
    made = _deform(family, shape, rng)
    if made is None:
        return None
    new, points, drags, amount = made
    others = scene.shapes[1:]
    if min_extent(new) < MIN_EXTENT or not fits(new, others) or not all(_in_frame(p) for pair in points for p in pair):
        return None
    truth = render([new, *others], scene.background)
    moved = truth.shapes[0]
    if moved.mask.sum() < 20:
        return None
    return DeformCase(family, scene, shape, points, drags, _dilate(shape.mask | moved.mask, 3), truth, moved, amount)


def as_deform_case(case: Case) -> DeformCase:
    """v1's move case with its ground truth: the same scene re-rendered with the shape translated."""
    dx, dy = case.target[0] - case.handle[0], case.target[1] - case.handle[1]
    others = [s for s in case.scene.shapes if s is not case.shape]
    truth = render([case.shape.moved(dx, dy), *others], case.scene.background)
    return DeformCase("move", case.scene, case.shape, ((case.handle, case.target),), (0,), case.mask, truth,
                      truth.shapes[0], math.hypot(dx, dy))


def make_deform_cases(family: str, n: int, seed: int = HELDOUT_SEED) -> list[DeformCase]:
    """The first ``n`` cases of ``family`` whose scenes start at ``seed`` (``HELDOUT_SEED``: the benchmark's,
    ``TUNE_SEED``: the tuning split's). ``move`` is exactly v1's ``make_cases(n, seed)``; the others use
    pure v2 scenes from ``seed + FAMILY_OFFSET[family]`` up."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if family == "move":
        return [as_deform_case(c) for c in make_cases(n, seed)]
    cases, s = [], seed + FAMILY_OFFSET[family]
    while len(cases) < n:
        case, s = deform_case(family, s), s + 1
        if case is not None:
            cases.append(case)
    return cases
