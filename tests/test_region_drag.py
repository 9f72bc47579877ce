"""Region drag (RegionDrag) end to end: correspondences, tiny model (sizes, UNet calls, caching, determinism,
replay, bad input) and the toy model (a toy-world shape really moves)."""
import math

import numpy as np
import pytest

from editing.drag.region import REGION_FIELDS, RegionDragRequest, correspondences, point_regions
from models.errors import EditError
from tests.conftest import scene

FAST = dict(n_steps=6, start_t=0.5, end_t=0.2)  # 3 inversion + 3 denoising steps


def box(h=64, w=96, y0=16, y1=48, x0=16, x1=56):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def req(**kw):
    base = dict(image=scene(), points=(((34, 32), (46, 30)),), mask=box(), **FAST)
    return RegionDragRequest(**(base | kw))


def test_correspondences_scale_the_target_onto_the_handle_box():
    h = box(16, 16, 2, 6, 2, 6)  # 4×4 cells at (2..5, 2..5)
    t = box(16, 16, 8, 16, 6, 14)  # 8×8 cells: each handle cell covers 2×2 target cells
    src, dst = correspondences(h, t)
    assert len(dst) == 64 and h[src[:, 1], src[:, 0]].all()
    assert tuple(src[(dst[:, 0] == 6) & (dst[:, 1] == 8)][0]) == (2, 2)
    assert tuple(src[(dst[:, 0] == 13) & (dst[:, 1] == 15)][0]) == (5, 5)
    same = box(16, 16, 2, 6, 8, 12)  # same size: a pure translation by (+6, 0)
    s2, d2 = correspondences(h, same)
    assert (d2 - s2 == [6, 0]).all()


def test_point_regions_translate_even_where_the_frame_clips_the_target():
    h = box(16, 16, 6, 12, 8, 14)  # a handle region near the right edge, dragged +5 cells: the frame clips it
    t = box(16, 16, 6, 12, 13, 16)
    src, dst = correspondences(h, t, offset=(5.2, 0.0))
    assert len(dst) == 18 and (dst - src == [5, 0]).all()  # nothing squashed: every cell moves by the drag
    scaled, _ = correspondences(h, t)  # painted regions of different sizes: the target scaled onto the handle
    assert set(scaled[:, 0]) == {8, 10, 12}


def test_point_regions_discs_or_the_mask_split_between_handles():
    pts = (((20, 20), (30, 20)), ((70, 40), (70, 50)))
    discs = point_regions((96, 64), pts, 5.0, None)
    assert len(discs) == 2 and discs[0][0][20, 20] and discs[0][1][20, 30] and not discs[0][0][20, 30]
    split = point_regions((96, 64), pts, 0.0, np.ones((64, 96), bool))
    assert not (split[0][0] & split[1][0]).any() and (split[0][0] | split[1][0]).all()
    assert split[0][1][20, 30] and split[1][1][50, 70]  # each part moved by its own handle's drag


def test_region_drag_size_calls_cache_determinism_and_replay(editor):
    editor.clear_caches()
    first = editor.edit(req())
    again = editor.edit(req(points=(((34, 32), (40, 40)),), radius=6.0))
    assert first.image.size == (96, 64)
    assert first.unet_calls == {"inversion": 3, "denoise": 3}
    assert again.unet_calls == {"denoise": 3}
    editor.clear_caches()
    assert editor.edit(req()).image.tobytes() == first.image.tobytes()
    assert editor.replay(first.recipe).image.tobytes() == first.image.tobytes()
    assert editor.edit(req(seed=7)).image.tobytes() != first.image.tobytes()  # the vacated cells' noise
    a, b = np.asarray(scene(), np.int16), np.asarray(first.image, np.int16)
    assert np.array_equal(a[~box()], b[~box()])  # outside the mask: the original pixels


def test_region_drag_with_painted_regions_and_their_replay(editor):
    hr = box(y0=20, y1=40, x0=20, x1=36)
    tr = box(y0=20, y1=40, x0=40, x1=56)
    r = editor.edit(RegionDragRequest(scene(), (hr,), (tr,), **FAST))
    assert r.image.size == (96, 64) and any("No mask" in n for n in r.notices)
    assert r.extra["copied_cells"] > 0
    assert editor.replay(r.recipe).image.tobytes() == r.image.tobytes()


@pytest.mark.parametrize("kw, match", [
    (dict(points=(), handle_regions=(box(),), target_regions=()), "1 handle regions but 0 target"),
    (dict(points=(), handle_regions=(box(),), target_regions=(np.zeros((64, 96), bool),)), "Target region 1 is empty"),
    (dict(points=(), handle_regions=(box(),), target_regions=(None,)), "missing"),
    (dict(points=(), handle_regions=(), target_regions=()), "No regions"),
    (dict(handle_regions=(box(),), target_regions=(box(),)), "not both"),
    (dict(points=(((10, 10), (10, 10)),)), "Every point is pinned"),
    (dict(points=(((30, 30), (30, 300)),)), "outside"),
    (dict(points=tuple(((20 + i, 20), (22 + i, 22)) for i in range(17))), "at most 16"),
    (dict(n_steps=float("nan")), "finite"),
    (dict(start_t=float("nan")), "finite"),
    (dict(end_t=0.6), "must be below start_t"),
    (dict(points=(((80, 5), (90, 5)),)), "outside the mask"),
    (dict(points=(), handle_regions=(box(0 + 64, 96, 0, 5, 80, 96),), target_regions=(box(),)), "outside the mask"),
])
def test_region_bad_input_is_one_line_and_the_next_request_works(editor, kw, match):
    with pytest.raises(EditError, match=match) as e:
        editor.edit(req(**kw))
    assert "\n" not in str(e.value)
    assert editor.edit(req()).image.size == (96, 64)


def test_region_fields_are_declared_once():
    assert REGION_FIELDS["n_steps"].default == 20 and REGION_FIELDS["start_t"].default == 0.5
    assert REGION_FIELDS["end_t"].default == 0.2 and REGION_FIELDS["guidance_scale"].default == 1.0


def test_region_moves_toy_shapes_towards_their_targets(toy):
    from bench.toy_drag import make_cases, measure

    md, noop = [], []
    for c in make_cases(4):
        r = toy.edit(RegionDragRequest(c.scene.image, points=((c.handle, c.target),), mask=c.mask,
                                       prompt=c.scene.caption))
        md.append(measure(c, r.image)["md"])
        noop.append(math.dist(c.handle, c.target))
        assert sum(r.unet_calls.values()) == 20
    assert np.mean(md) < 0.6 * np.mean(noop)
