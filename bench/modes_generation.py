"""Benchmark modes for sketch (SDEdit) and conditioned generation, for ``bench/perf.py``.

Each mode generates on every run (first and repeat) and then drags the result, so the table shows the
generation's own phases (``<mode>.sketch``, ``<mode>.generate``, ``<mode>.decode`` …) next to a drag
that, for drag-ready generations, needs no LoRA and no inversion. Step counts follow the issue's
targets (SDEdit 50 steps at strength 0.6; ControlNet 30 steps) unless the config overrides
``n_inference_steps`` (the tiny test config does). ControlNet / adapter calls are logged per run and
kept in ``EditResult.extra["calls"]`` of the generation.
"""
from __future__ import annotations

import logging

from PIL import Image

from editing import conditions
from editing.generation import (
    AdapterUnit,
    ControlNetUnit,
    GenerateRequest,
    IPAdapterUnit,
    SketchRequest,
)

log = logging.getLogger(__name__)

SKETCH_STRENGTH = 0.6
SKETCH_STEPS = 50
CONTROLNET_STEPS = 30
PROMPT = "a small house under a sunny sky, photo"


def _steps(cfg, default: int) -> int:
    return int(cfg.request.get("n_inference_steps", default))


def _sketch_of(image: Image.Image) -> Image.Image:
    """A coloured 'sketch' of the scene: flat colour blocks with dark outlines."""
    flat = conditions.palette(image, cells=16)
    lines = conditions.canny(image, 80, 160).convert("L")
    return Image.composite(Image.new("RGB", image.size, (20, 20, 20)), flat, lines)


def _drag_after(editor, scene, cfg, generation, steps: int, **overrides):
    from bench.perf import Edit, _phase_logger, _request

    calls = generation.extra.get("calls") or {}
    if calls:
        log.info("  generation: UNet %s, other modules %s", generation.unet_calls, calls)
    req = _request(scene, cfg, image=generation.image, prompt="", n_inference_steps=steps, **overrides)
    return Edit(editor.drag(req, progress=_phase_logger()), {"gen": generation})


def _generate(editor, scene, cfg, steps: int, **units):
    from bench.perf import _phase_logger

    w, h = scene.image.size
    req = GenerateRequest(PROMPT, width=w, height=h, n_inference_steps=steps, seed=0, **units)
    return editor.edit(req, progress=_phase_logger())


def mode_generate(editor, scene, cfg, state):
    """Plain text-to-image through GenerateRequest (diffusers pipeline), then a drag of it (drag-ready)."""
    steps = _steps(cfg, 50)
    return _drag_after(editor, scene, cfg, _generate(editor, scene, cfg, steps), steps)


def mode_sketch(editor, scene, cfg, state):
    """SDEdit at strength 0.6, then a drag of the result (a partial trajectory: inverted like a photo, no LoRA)."""
    from bench.perf import _phase_logger

    steps = _steps(cfg, SKETCH_STEPS)
    req = SketchRequest(_sketch_of(scene.image), prompt=PROMPT, strength=SKETCH_STRENGTH, n_inference_steps=steps, seed=0)
    gen = editor.edit(req, progress=_phase_logger())
    return _drag_after(editor, scene, cfg, gen, steps, lora_steps=0)


def mode_controlnet(editor, scene, cfg, state):
    """One canny ControlNet unit (spec 'tiny': random weights of the real architecture), then a drag."""
    steps = _steps(cfg, CONTROLNET_STEPS)
    unit = ControlNetUnit(scene.image, "tiny", preprocessor="canny")
    return _drag_after(editor, scene, cfg, _generate(editor, scene, cfg, steps, controlnets=(unit,)), steps)


def mode_conditioned(editor, scene, cfg, state):
    """Two ControlNets + a T2I-Adapter + an IP-Adapter composed, then a drag."""
    steps = _steps(cfg, CONTROLNET_STEPS)
    units = {"controlnets": (ControlNetUnit(scene.image, "tiny", preprocessor="canny"),
                             ControlNetUnit(scene.image, "tiny", preprocessor="lineart", scale=0.5, end=0.6)),
             "adapters": (AdapterUnit(scene.image, "tiny", preprocessor="palette"),),
             "ip_adapter": IPAdapterUnit((scene.image,), "tiny")}
    return _drag_after(editor, scene, cfg, _generate(editor, scene, cfg, steps, **units), steps)


MODES = {
    "gen-plain": mode_generate,
    "sketch": mode_sketch,
    "controlnet": mode_controlnet,
    "conditioned": mode_conditioned,
}
