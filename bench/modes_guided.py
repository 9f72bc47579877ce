"""Guided-editing modes for ``bench/perf.py`` (DiffEditor / DragonDiffusion): drag, move, paste, appearance.

Each uses the published defaults of its task; only the step count follows the configuration (the
tiny test configuration runs 4 steps). The first run inverts the image and records the memory bank;
the repeat reuses both (a second edit of the same picture).
"""
from __future__ import annotations

import numpy as np
from PIL import ImageOps

from bench.perf import DRAG_PROMPT, Edit, _phase_logger
from editing.drag import GuidedDragRequest
from editing.requests import AppearanceRequest, MoveRequest, PasteRequest


def _steps(cfg) -> dict:
    n = cfg.request.get("n_inference_steps")
    return {"n_inference_steps": max(4, n)} if n else {}


def _box(scene, x0, y0, x1, y1) -> np.ndarray:
    w, h = scene.image.size
    m = np.zeros((h, w), bool)
    m[round(y0 * h): round(y1 * h), round(x0 * w): round(x1 * w)] = True
    return m


def _guided_drag(method: str):
    def mode(editor, scene, cfg, state) -> Edit:
        req = GuidedDragRequest(image=scene.image, points=scene.points, mask=scene.mask, prompt=DRAG_PROMPT,
                                method=method, **_steps(cfg))
        return Edit(editor.edit(req, progress=_phase_logger()))

    mode.__doc__ = f"{method} drag of the same points and mask (no LoRA; memory bank + gradient guidance)"
    return mode


def mode_move(editor, scene, cfg, state) -> Edit:
    """DiffEditor move & resize: the house moves left by 15% of the side and grows 1.2×."""
    w = scene.image.width
    req = MoveRequest(image=scene.image, mask=_box(scene, 0.52, 0.30, 0.88, 0.72), offset=(-0.15 * w, 0.0), scale=1.2,
                      prompt=DRAG_PROMPT, **_steps(cfg))
    return Edit(editor.edit(req, progress=_phase_logger()))


def mode_paste(editor, scene, cfg, state) -> Edit:
    """DiffEditor paste: the sun from a mirrored copy of the scene, pasted at 0.8× into the lower left."""
    ref = ImageOps.mirror(scene.image)
    w, h = scene.image.size
    req = PasteRequest(image=scene.image, reference=ref, reference_mask=_box(scene, 0.65, 0.08, 0.87, 0.30),
                       offset=(-0.45 * w, 0.45 * h), scale=0.8, prompt=DRAG_PROMPT, **_steps(cfg))
    return Edit(editor.edit(req, progress=_phase_logger()))


def mode_appearance(editor, scene, cfg, state) -> Edit:
    """DiffEditor appearance: the house takes the look of the tree's crown."""
    req = AppearanceRequest(image=scene.image, mask=_box(scene, 0.55, 0.45, 0.85, 0.70), reference=scene.image,
                            reference_mask=_box(scene, 0.05, 0.36, 0.22, 0.56), prompt=DRAG_PROMPT, **_steps(cfg))
    return Edit(editor.edit(req, progress=_phase_logger()))


MODES = {
    "diffeditor": _guided_drag("diffeditor"),
    "dragondiffusion": _guided_drag("dragondiffusion"),
    "move": mode_move,
    "paste": mode_paste,
    "appearance": mode_appearance,
}
