"""Ready-made Drag examples: toy-world scenes with points, mask and prompt (``assets/examples``).

They show a real drag working offline on the built-in ``toy`` model in seconds on a CPU.
``python -m ui.examples`` rewrites the files from the held-out toy scenes (deterministic).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
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
        image, mask = self.load()
        bg = np.asarray(image.convert("RGBA"))
        layer = np.zeros_like(bg)
        layer[mask] = BRUSH_RGBA
        comp = bg.copy()
        comp[mask, :3] = (0.5 * bg[mask, :3] + 0.5 * np.array(BRUSH_RGBA[:3])).astype(np.uint8)
        return {"background": bg, "layers": [layer], "composite": comp}


def load_examples(folder: Path = EXAMPLES_DIR) -> list[Example]:
    out = []
    for meta in sorted(folder.glob("*.json")):
        d = json.loads(meta.read_text())
        out.append(Example(meta.stem, folder / d["image"], folder / d["mask"], d["points"], d["prompt"],
                           d.get("method", "DragDiffusion")))
    return out


def write_examples(folder: Path = EXAMPLES_DIR, n: int = 4) -> list[Example]:
    """Held-out toy scenes (never trained on): drag the first shape's centroid 12–20 px."""
    from models.toy_world import make_cases

    folder.mkdir(parents=True, exist_ok=True)
    methods = ["DragDiffusion", "DiffEditor", "DragDiffusion", "DragonDiffusion"]
    cases = [c for c in make_cases(40) if np.hypot(c.target[0] - c.handle[0], c.target[1] - c.handle[1]) >= 12][:n]
    for i, case in enumerate(cases):
        name = f"toy-{i + 1}"
        case.scene.image.save(folder / f"{name}.png")
        Image.fromarray(case.mask.astype(np.uint8) * 255).save(folder / f"{name}-mask.png")
        meta = {"image": f"{name}.png", "mask": f"{name}-mask.png", "prompt": case.scene.caption,
                "points": [[round(v, 1) for v in case.handle], [round(v, 1) for v in case.target]],
                "method": methods[i % len(methods)], "model": "toy", "scene_seed": case.scene.seed}
        (folder / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return load_examples(folder)


if __name__ == "__main__":
    for ex in write_examples():
        print(ex.name, ex.prompt, ex.points, ex.method)
