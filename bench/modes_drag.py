"""The newer drag methods as ``bench/perf.py`` modes: instant (FastDrag-style), inpaint (Inpaint4Drag-style), region
(RegionDrag-style), gooddrag.

Each builds its request through the shared method table (``bench/methods.py``) from the benchmark
scene's points and mask, with the method's published defaults; of the configuration's request
overrides (the tiny test config's short schedules) only the fields that method's request has are
applied.

    python -m bench.perf --config cpu-small --modes instant,diffeditor    # the issue's speed ratio, one run
"""
from __future__ import annotations

from bench import methods as bm
from bench.perf import DRAG_PROMPT, Edit, _phase_logger

NAMES = ("instant", "inpaint", "region", "gooddrag")  # inpaint fills with the model's built-in companion


def _settings(name: str, cfg) -> dict:
    """The config's request overrides that ``name``'s request has (the tiny config shortens every schedule)."""
    table = bm.fields(name)
    out = {k: v for k, v in cfg.request.items() if k in table}
    if "n_inference_steps" in out and name != "gooddrag":  # at least the guided modes' floor, a schedule that runs
        out["n_inference_steps"] = max(4, out["n_inference_steps"])
    return out


def _mode(name: str):
    def mode(editor, scene, cfg, state) -> Edit:
        req = bm.build_request(name, scene.image, scene.points, scene.mask, DRAG_PROMPT, _settings(name, cfg))
        return Edit(editor.edit(req, progress=_phase_logger()))

    mode.__doc__ = f"{name}: {bm.METHODS[name].about}"
    return mode


MODES = {name: _mode(name) for name in NAMES}
