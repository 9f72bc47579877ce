"""A repeated DragDiffusion drag of one image reuses the reference branch (its latents and mutual-attention K/V
source, editing/drag_diffusion.py) and gives the pixels a cold run gives."""
import numpy as np

from editing.drag import GOODDRAG, DragRequest
from editing.engine import Editor
from tests.conftest import FAST, scene

PAIR = (((30.0, 32.0), (45.0, 30.0)),)


def _mask(w=96, h=64):
    m = np.zeros((h, w), bool)
    m[10:55, 15:70] = True
    return m


def test_repeat_drag_reuses_the_reference_branch_with_identical_pixels(editor: Editor):
    req = DragRequest(scene(seed=11), PAIR, _mask(), **FAST)
    editor.clear_caches()
    first = editor.drag(req)
    again = editor.drag(req)
    n = round(0.7 * FAST["n_inference_steps"])
    assert first.unet_calls["denoise"] == 2 * n  # reference branch + edited branch
    assert again.unet_calls["denoise"] == n  # the edited branch only
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.final_points == again.final_points
    # the cache does not change what a cold engine computes: forget everything and run once more
    editor.clear_caches()
    cold = editor.drag(req)
    assert np.array_equal(np.asarray(cold.image), np.asarray(first.image))


def test_other_points_on_the_same_image_reuse_it_too(editor: Editor):
    editor.clear_caches()
    img = scene(seed=12)
    editor.drag(DragRequest(img, PAIR, _mask(), **FAST))
    other = editor.drag(DragRequest(img, (((30.0, 32.0), (40.0, 42.0)),), _mask(), **FAST))
    assert other.unet_calls["denoise"] == round(0.7 * FAST["n_inference_steps"])
    # another prompt is another reference branch
    third = editor.drag(DragRequest(img, PAIR, _mask(), prompt="a red disk", **FAST))
    assert third.unet_calls["denoise"] == 2 * round(0.7 * FAST["n_inference_steps"])


def test_gooddrag_repeat_is_identical_too(editor: Editor):
    fields = {**GOODDRAG, **FAST, "max_steps": 3, "drag_timesteps": 3}
    req = DragRequest(scene(seed=13), PAIR, _mask(), **fields)
    editor.clear_caches()
    first = editor.drag(req)
    again = editor.drag(req)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert again.unet_calls["denoise"] < first.unet_calls["denoise"]
