"""Ready-made examples for every tab, built from the toy world (``models/toy_world.py``).

Drag: held-out toy scenes with points, mask and prompt (``assets/examples``); ``python -m ui.examples``
rewrites those files (deterministic). Every other tab: ``tab_examples(tab)``, scenes drawn from hand-placed
toy shapes when the app starts (no files in the repo), each a picture, masks, reference, prompt and settings
that one click sets. They show the tab's default method working offline on the built-in ``toy`` model in
seconds on a CPU; tests/test_ui_tabs.py checks that each visibly does what its label says.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
BRUSH_RGBA = (255, 43, 214, 128)  # the mask canvases' brush colour at 50 % (ui/common.py MASK_CANVAS)


@dataclass(frozen=True)
class Example:
    name: str
    image: Path
    mask: Path
    points: list[list[float]]  # alternating handle, target (image pixels)
    prompt: str
    method: str

    def load(self) -> tuple[Image.Image, np.ndarray]:
        return Image.open(self.image).convert("RGB"), np.asarray(Image.open(self.mask).convert("L")) > 127

    def canvas_value(self) -> dict:
        """An ImageEditor value: the picture as background and the mask painted on one layer."""
        return canvas_value(*self.load())


def canvas_value(image: Image.Image, mask: np.ndarray | None) -> dict:
    """A mask canvas's value (ui/common.py MASK_CANVAS): ``image`` as background, ``mask`` painted on one layer."""
    bg = np.asarray(image.convert("RGBA"))
    layer = np.zeros_like(bg)
    comp = bg.copy()
    if mask is not None:
        layer[mask] = BRUSH_RGBA
        comp[mask, :3] = (0.5 * bg[mask, :3] + 0.5 * np.array(BRUSH_RGBA[:3])).astype(np.uint8)
    return {"background": bg, "layers": [layer], "composite": comp}


def strokes_value(drawing: Image.Image) -> dict:
    """A sketch canvas's value: a blank white canvas with ``drawing`` (RGBA, transparent = unpainted) as strokes."""
    strokes = np.asarray(drawing.convert("RGBA"))
    bg = np.full_like(strokes, 255)
    comp = np.asarray(Image.alpha_composite(Image.fromarray(bg), drawing.convert("RGBA")))
    return {"background": bg, "layers": [strokes], "composite": comp}


def load_examples(folder: Path = EXAMPLES_DIR) -> list[Example]:
    out = []
    for meta in sorted(folder.glob("*.json")):
        d = json.loads(meta.read_text())
        out.append(Example(meta.stem, folder / d["image"], folder / d["mask"], d["points"], d["prompt"],
                           d.get("method", "DragDiffusion")))
    return out


EXAMPLE_METHODS = ("Inpaint", "Instant", "Region", "DiffEditor")  # the default first; each lands its example


def write_examples(folder: Path = EXAMPLES_DIR, n: int = 4) -> list[Example]:
    """Held-out toy scenes (never trained on): drag the first shape's centroid 12–20 px to where the toy world
    could have placed it (clear of the other shapes: the toy model has never seen shapes touch, so a drag onto
    another shape asks it for something it cannot draw)."""
    from editing.drag.methods import lookup
    from models.toy_world import apart, make_cases

    def fair(c) -> bool:
        dx, dy = c.target[0] - c.handle[0], c.target[1] - c.handle[1]
        others = [o for o in c.scene.shapes if o is not c.shape]
        cx, cy = c.shape.center[0] + dx, c.shape.center[1] + dy
        return np.hypot(dx, dy) >= 12 and all(apart(cx, cy, c.shape.radius, o) for o in others)

    folder.mkdir(parents=True, exist_ok=True)
    methods = EXAMPLE_METHODS
    cases = [c for c in make_cases(40) if fair(c)][:n]
    for i, case in enumerate(cases):
        name = f"toy-{i + 1}"
        case.scene.image.save(folder / f"{name}.png")
        # what the example's method takes: the shape itself (Inpaint) or the area that may change (the others)
        mask = case.shape.mask if lookup(methods[i % len(methods)]).mask == "object" else case.mask
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}-mask.png")
        meta = {"image": f"{name}.png", "mask": f"{name}-mask.png", "prompt": case.scene.caption,
                "points": [[round(v, 1) for v in case.handle], [round(v, 1) for v in case.target]],
                "method": methods[i % len(methods)], "model": "toy", "scene_seed": case.scene.seed}
        (folder / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return load_examples(folder)


# ---- every other tab: toy scenes from hand-placed shapes ------------------------------------------------
@dataclass(frozen=True)
class TabExample:
    """One click's worth of inputs for a tab. ``values`` by input name (pictures PIL, masks H×W bool,
    numbers as the request takes them); ``picture`` is the thumbnail shown in the examples table.
    ``expect`` is what the result should show (checked by the tests): ``(colour, (x, y))``, the toy colour
    whose blob should be centred near that point, or None."""

    label: str
    picture: Image.Image
    values: dict = field(default_factory=dict)
    expect: tuple | None = None


def _scene(*shapes, background: str = "gray"):
    from models.toy_world import SIZES, Shape, render

    return render([Shape(kind, colour, size, centre, SIZES[size]) for kind, colour, size, centre in shapes],
                  background)


def _move_examples() -> list[TabExample]:
    out = []
    for shapes, offset, bg in (((("square", "blue", "medium", (20.0, 44.0)),), (22, -16), "white"),
                               ((("disk", "red", "medium", (18.0, 32.0)),), (24, 0), "gray")):
        scene = _scene(*shapes, background=bg)
        shape = scene.shapes[0]
        centre = (shape.centroid[0] + offset[0], shape.centroid[1] + offset[1])
        out.append(TabExample(f"move the {shape.colour} {shape.kind} by ({offset[0]:+d}, {offset[1]:+d}) px",
                              scene.image, {"image": scene.image, "mask": shape.mask, "dx": offset[0],
                                            "dy": offset[1], "scale": 1.0, "prompt": scene.caption,
                                            "method": "DiffEditor"}, (shape.colour, centre)))
    return out


def _paste_examples() -> list[TabExample]:
    out = []
    for base_shapes, ref_shape, offset, bg in (
            ((("disk", "green", "medium", (16.0, 32.0)),), ("square", "purple", "medium", (32.0, 32.0)), (14, 0),
             "gray"),
            ((("triangle", "red", "medium", (18.0, 40.0)),), ("disk", "yellow", "medium", (30.0, 30.0)), (16, -12),
             "gray")):
        base, ref = _scene(*base_shapes, background=bg), _scene(ref_shape, background=bg)
        obj, there = ref.shapes[0], base.shapes[0]
        centre = (obj.centroid[0] + offset[0], obj.centroid[1] + offset[1])
        prompt = _scene(*base_shapes, (*ref_shape[:3], centre), background=bg).caption
        out.append(TabExample(f"paste the {obj.colour} {obj.kind} next to the {there.colour} {there.kind}", base.image,
                              {"image": base.image, "reference": ref.image, "reference_mask": obj.mask,
                               "dx": offset[0], "dy": offset[1], "scale": 1.0, "prompt": prompt,
                               "method": "DiffEditor"}, (obj.colour, centre)))
    return out


def _appearance_examples() -> list[TabExample]:
    out = []
    for base_shape, ref_shape, bg in ((("ring", "cyan", "large", (32.0, 32.0)), ("ring", "yellow", "large", (32.0, 32.0)),
                                       "black"),
                                      (("square", "yellow", "large", (30.0, 34.0)),
                                       ("square", "green", "medium", (34.0, 30.0)), "white")):
        base, ref = _scene(base_shape, background=bg), _scene(ref_shape, background=bg)
        a, b = base.shapes[0], ref.shapes[0]
        prompt = _scene((base_shape[0], b.colour, *base_shape[2:]), background=bg).caption
        out.append(TabExample(f"the {a.colour} {a.kind} takes the look of the {b.colour} {b.kind}", base.image,
                              {"image": base.image, "mask": a.mask, "reference": ref.image,
                               "reference_mask": b.mask, "prompt": prompt, "method": "DiffEditor"},
                              (b.colour, a.centroid)))
    return out


def _drawing(scene) -> Image.Image:
    """A toy scene as crayon strokes: its shapes' pixels (slightly ragged edges) on a transparent layer."""
    from models.toy_world import COLOURS

    rng = np.random.default_rng(0)
    a = np.zeros((*scene.shapes[0].mask.shape, 4), np.uint8)
    for s in scene.shapes:
        m = s.mask & (rng.random(s.mask.shape) > 0.08)  # a few gaps, like a quick crayon fill
        a[m] = (*COLOURS[s.colour], 255)
    return Image.fromarray(a, "RGBA")


def _sketch_examples() -> list[TabExample]:
    out = []
    for shapes in ((("disk", "red", "large", (22.0, 34.0)), ("square", "blue", "medium", (46.0, 26.0))),
                   (("triangle", "green", "large", (32.0, 30.0)),)):
        scene = _scene(*shapes, background="white")
        drawing = _drawing(scene)
        first = scene.shapes[0]
        out.append(TabExample(f"crayon sketch → {scene.caption}", Image.alpha_composite(
            Image.new("RGBA", drawing.size, (255, 255, 255, 255)), drawing).convert("RGB"),
            {"sketch": drawing, "prompt": scene.caption}, (first.colour, first.centroid)))
    return out


def _generate_examples() -> list[TabExample]:
    """Captions of the toy world (the toy model was trained on such) with seeds that draw every shape named."""
    out = []
    for shapes, bg, seed in (((("disk", "red", "large", (20.0, 32.0)), ("square", "blue", "medium", (46.0, 32.0))),
                              "gray", 3),
                             ((("ring", "cyan", "large", (32.0, 32.0)),), "black", 3)):
        scene = _scene(*shapes, background=bg)
        out.append(TabExample(f"{scene.caption} (seed {seed})", scene.image,
                              {"prompt": scene.caption, "seed": seed}, (scene.shapes[-1].colour, None)))
    return out


def _personalize_examples() -> list[TabExample]:
    """Four photos of one subject, a purple ring, on different backgrounds and places."""
    photos = [_scene(("ring", "purple", "large", centre), background=bg).image
              for centre, bg in (((30.0, 32.0), "gray"), ((36.0, 28.0), "white"), ((28.0, 36.0), "black"),
                                 ((34.0, 34.0), "gray"))]
    strip = Image.new("RGB", (64 * len(photos), 64))
    for i, p in enumerate(photos):
        strip.paste(p, (64 * i, 0))
    return [TabExample("4 photos of a purple ring → a ring LoRA (short training)", strip,
                       {"photos": photos, "class_noun": "ring", "steps": 40, "prior_images": 4, "preview_every": 20},
                       ("purple", None))]


TAB_EXAMPLES = {"move": _move_examples, "paste": _paste_examples, "appearance": _appearance_examples,
                "sketch": _sketch_examples, "generate": _generate_examples, "personalize": _personalize_examples}


@functools.cache
def tab_examples(tab: str) -> tuple[TabExample, ...]:
    """The ready examples of ``tab`` (a key of ``TAB_EXAMPLES``); deterministic, built once per process."""
    return tuple(TAB_EXAMPLES[tab]())


@functools.cache
def _folder(root: Path | None) -> Path:
    """Where the thumbnails go: inside the app's own temp root (removed on exit and SIGTERM; after a kill, by the
    next start), or, for a UI built without app.py (tests), a folder named like that root
    (``dragcanvas-run-<pid>-…``), so a start after a kill removes it too, and removed at exit."""
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="examples-", dir=root))
    folder = Path(tempfile.mkdtemp(prefix=f"dragcanvas-run-{os.getpid()}-examples-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def saved(image: Image.Image, name: str) -> str:
    """``image`` as a PNG in this process's example folder (under the app's temp root, which Gradio may serve)."""
    from ui.history import SERVING

    path = _folder(SERVING.temp_root) / f"{name}.png"
    if not path.exists():
        image.save(path)
    return str(path)


def dataset_samples(tab: str) -> list[list[str]]:
    """``gr.Dataset`` samples for ``tab``: [thumbnail path, label] per example."""
    return [[saved(ex.picture, f"{tab}-{i + 1}"), ex.label] for i, ex in enumerate(tab_examples(tab))]


def example_table(tab: str, elem_id: str, what: str):
    """The clickable examples of ``tab`` in the current layout (a ``gr.Dataset``: thumbnail and label);
    ``what`` says what a click sets. Wire its ``.select`` to a handler that calls ``picked``."""
    import gradio as gr

    return gr.Dataset(components=[gr.Image(type="filepath", visible=False), gr.Textbox(visible=False)],
                      samples=dataset_samples(tab), label=f"Examples: click one ({what} are set)",
                      elem_id=elem_id, samples_per_page=8)


def picked(tab: str, index) -> TabExample | None:
    """The example a ``gr.Dataset`` select event points at, or None for a stale or odd index."""
    examples = tab_examples(tab)
    return examples[index] if isinstance(index, int) and 0 <= index < len(examples) else None


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for ex in write_examples():
        logging.getLogger("dragcanvas.examples").info("%s %s %s %s", ex.name, ex.prompt, ex.points, ex.method)
