"""Benchmark mode for DreamBooth-LoRA training (editing/dreambooth/), for ``bench/perf.py``.

``personalize`` trains a subject LoRA on four crops of the benchmark scene with prior preservation.
The first run also generates the class-prior images (phase ``priors``); the repeat finds them cached
on disk, so its ``train`` phase is the pure training time (``steps_run`` steps, no resume). Issue 6's
target for ``sd15-full`` on an H100-class GPU: 400 steps with prior preservation ≤ 3 min, peak ≤ 12 GB
at 512². Seconds per training step are logged and kept in ``EditResult.extra["s_per_step"]``.
"""
from __future__ import annotations

import logging
import tempfile

from editing.dreambooth import PersonalizeRequest

log = logging.getLogger(__name__)

# model -> (training steps, class images, DDIM steps per class image); the sd15 row is the target run
SETTINGS = {"sd15-random": (400, 50, 25), "cpu-small": (10, 4, 10), "tiny": (2, 1, 2)}


def _photos(scene):
    """Four overlapping crops of the scene: a 'subject' seen from slightly different framings."""
    w, h = scene.image.size
    boxes = [(0, 0, 0.8, 0.8), (0.2, 0, 1, 0.8), (0, 0.2, 0.8, 1), (0.1, 0.1, 0.9, 0.9)]
    return tuple(scene.image.crop((round(a * w), round(b * h), round(c * w), round(d * h))) for a, b, c, d in boxes)


def mode_personalize(editor, scene, cfg, state: dict):
    """DreamBooth-LoRA with prior preservation (rank 8, lr 1e-4, batch 1 photo + 1 class image per step)."""
    from bench.perf import Edit, _phase_logger

    steps, priors, prior_steps = SETTINGS.get(cfg.model, SETTINGS["cpu-small"])
    if "dir" not in state:  # one folder for first and repeat: the repeat reuses the class images
        state["dir"] = tempfile.TemporaryDirectory(prefix="bench-personalize-")
    req = PersonalizeRequest(_photos(scene), "house", name="bench-house", out_dir=state["dir"].name, steps=steps,
                             prior_images=priors, prior_steps=prior_steps, preview_steps=prior_steps,
                             resolution=cfg.resolution, resume=False, checkpoint_every=0, preview_every=0,
                             replace=True)  # the repeat trains the same LoRA again, into the same folder
    result = editor.edit(req, progress=_phase_logger())
    train_s = result.timings.get("train", 0.0)
    result.extra["s_per_step"] = train_s / max(1, steps)
    log.info("  personalize: %d steps in %.1f s (%.3f s/step), %d class images generated now",
             steps, train_s, result.extra["s_per_step"], result.extra["priors_generated"])
    return Edit(result)


MODES = {"personalize": mode_personalize}
