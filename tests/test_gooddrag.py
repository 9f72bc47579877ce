"""GoodDrag-style DragDiffusion (editing/drag_diffusion.py with editing.requests.GOODDRAG): the supervision math
on hand cases, the alternating drag and denoising end to end on `tiny`, and real drags on the `toy` model."""
import math

import numpy as np
import pytest
import torch

from editing.drag import DRAG_FIELDS, GOODDRAG, DragRequest
from editing.drag import dragdiffusion as dd
from models.errors import EditError
from tests.conftest import FAST, scene


def _ramp(h=12, w=12, shift=0.0):
    """A 1-channel feature map F(x, y) = x + 10·y + shift: bilinear sampling of it is exact."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (xx + 10 * yy + shift)[None, None]


def test_information_preserving_supervision_pulls_toward_the_original_handle():
    feat0 = _ramp()  # the original image's features
    feat = _ramp(shift=5.0)  # the optimised latent's features: the content has drifted by +5
    h0 = torch.tensor([[2.0, 4.0]])  # the original handle
    h = torch.tensor([[3.0, 4.0]])  # tracked one cell on
    g = torch.tensor([[9.0, 4.0]])
    # DragDiffusion: |F(h + d) − sg F(h)| = |(3 + 1) − 3| = 1 per cell of the 3×3 patch, × 9 cells
    assert dd.motion_supervision_loss(feat, h, g, 1).item() == pytest.approx(9 * 1.0)
    # GoodDrag: |F(h + d) − F⁰(h⁰)| = |(3 + 1 + 5) − 2| = 7 per cell: the drift and the lag both count
    keep = dd.motion_supervision_loss(feat, h, g, 1, feat0=feat0, handles0=h0)
    assert keep.item() == pytest.approx(9 * 7.0)
    # GoodDrag's d = 4 cells per step (min(β, distance)): |(3 + 4 + 5) − 2| = 10
    far = dd.motion_supervision_loss(feat, h, g, 1, step=4.0, feat0=feat0, handles0=h0)
    assert far.item() == pytest.approx(9 * 10.0)
    # the pull is toward the original feature: the drifted map's gradient says "lower the features"
    f = feat.clone().requires_grad_(True)
    dd.motion_supervision_loss(f, h, g, 1, feat0=feat0, handles0=h0).backward()
    assert f.grad.sum() > 0
    # a handle that has arrived contributes nothing
    assert dd.motion_supervision_loss(feat, g - 0.5, g, 1, feat0=feat0, handles0=h0).item() == 0.0


def test_drag_direction_never_overshoots():
    h, g = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])
    assert torch.allclose(dd.drag_direction(h, g, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.allclose(dd.drag_direction(h, g, 4.0), torch.tensor([2.4, 3.2]))
    assert torch.allclose(dd.drag_direction(h, g, 8.0), g)  # min(β, ‖g − h‖) = 5: exactly onto the target


def test_drag_timesteps_stay_inside_the_schedule():
    assert dd.drag_timestep_indices(15, 50, 1) == [15]
    assert dd.drag_timestep_indices(12, 50, 7) == list(range(12, 19))
    assert dd.drag_timestep_indices(8, 10, 7) == [8, 9]


def test_gooddrag_values_are_valid_fields_and_defaults_are_dragdiffusion():
    assert set(GOODDRAG) <= set(DRAG_FIELDS)
    for k, v in GOODDRAG.items():
        lo, hi, default, _ = DRAG_FIELDS[k]
        assert lo <= v <= hi, k
    d = {k: DRAG_FIELDS[k].default for k in ("drag_timesteps", "steps_per_track", "drag_step", "preserve_handle",
                                             "patience")}
    assert d == {"drag_timesteps": 1, "steps_per_track": 1, "drag_step": 1.0, "preserve_handle": 0, "patience": 0}
    with pytest.raises(EditError, match="preserve_handle"):
        DragRequest(scene(), (((30, 30), (40, 30)),), preserve_handle=2)
    with pytest.raises(EditError, match="drag_timesteps"):
        DragRequest(scene(), (((30, 30), (40, 30)),), drag_timesteps=0)


def _mask(w=96, h=64):
    m = np.zeros((h, w), bool)
    m[10:55, 15:70] = True
    return m


def test_gooddrag_end_to_end_on_tiny_is_deterministic_and_replays(editor):
    fields = {**GOODDRAG, **FAST, "max_steps": 4, "drag_timesteps": 3, "patience": 0}
    req = DragRequest(scene(seed=21), (((30.0, 32.0), (45.0, 30.0)),), _mask(), **fields)
    editor.clear_caches()
    a = editor.drag(req)
    assert a.extra["drag_timesteps"] >= 1 and a.recipe["params"]["drag_timesteps"] == 3
    assert a.recipe["params"]["preserve_handle"] == 1 and a.recipe["params"]["drag_step"] == 4.0
    steps = round(0.75 * FAST["n_inference_steps"])
    if not a.recipe["arrived"]:  # three timesteps, a plain denoising step between two of them
        assert a.extra["drag_timesteps"] == 3
        # optimisation: 1 reference pass per timestep + 1 per supervision step; two plain steps in between
        assert a.unet_calls["drag"] == 3 + a.recipe["steps_run"] + 2
        # the edited branch is denoised with the reference from the last drag timestep: 2 steps fewer
        assert a.unet_calls["denoise"] == steps + (steps - 2)
    editor.clear_caches()
    b = editor.drag(req)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.final_points == b.final_points
    editor.clear_caches()
    c = editor.replay(a.recipe)
    assert np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_too_many_drag_timesteps_are_clamped_with_a_notice(editor):
    fields = {**FAST, "n_inference_steps": 4, "inversion_strength": 0.5, "drag_timesteps": 5, "max_steps": 2}
    r = editor.drag(DragRequest(scene(seed=22), (((30.0, 32.0), (45.0, 30.0)),), _mask(), **fields))
    assert any("spread over 2 timesteps" in n for n in r.notices)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three real drags: ~50 s each on 2 idle cores, several minutes when they are busy
def test_gooddrag_moves_toy_shapes_closer_than_noop(toy):
    """Real drags: the toy model knows its world, so GoodDrag's drag with its published settings must bring the
    shape nearer the target than leaving the picture alone (the benchmark's noop). The identity LoRA (DragDiffusion's
    part, not GoodDrag's) is off to keep the test short; the benchmark runs it with (report: MD 5.2 vs noop 12.4)."""
    from bench.toy_drag import make_cases, measure

    cases = make_cases(3)
    got, noop = [], []
    for case in cases:
        req = DragRequest(case.scene.image, ((case.handle, case.target),), case.mask, prompt=case.scene.caption,
                          **{**GOODDRAG, "lora_steps": 0})
        r = toy.drag(req)
        got.append(measure(case, r.image)["md"])
        noop.append(measure(case, case.scene.image)["md"])
        # the tracked handle ends nearer the target than it started
        assert math.dist(r.final_points[0], case.target) < math.dist(case.handle, case.target)
    assert np.mean(got) < 0.5 * np.mean(noop), (got, noop)
    assert sum(g < n for g, n in zip(got, noop)) >= 2, (got, noop)
