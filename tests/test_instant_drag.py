"""Instant drag (FastDrag) end to end: tiny model (sizes, UNet calls, caching, determinism, replay, bad input) and
the toy model (a toy-world shape really moves)."""
import math

import numpy as np
import pytest
import torch

from editing.drag.instant import INSTANT_FIELDS, InstantDragRequest
from models.errors import EditError
from tests.conftest import scene

FAST = dict(n_steps=6, inversion_strength=0.5)  # 3 inversion + 3 denoising steps


def box(h=64, w=96, y0=16, y1=48, x0=16, x1=56):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def req(**kw):
    base = dict(image=scene(), points=(((34, 32), (46, 30)),), mask=box(), **FAST)
    return InstantDragRequest(**(base | kw))


def test_instant_drag_size_calls_no_gradients_and_cached_inversion(editor):
    editor.clear_caches()
    procs = {n: type(p) for n, p in editor.load().unet.attn_processors.items()}
    grads = []
    hook = editor.load().unet.register_forward_hook(lambda m, i, o: grads.append(torch.is_grad_enabled()))
    try:
        first = editor.edit(req())
        again = editor.edit(req(points=(((34, 32), (40, 40)),)))  # other points, same picture: no inversion
    finally:
        hook.remove()
    assert first.image.size == (96, 64)
    assert first.unet_calls == {"inversion": 3, "denoise": 3}
    assert again.unet_calls == {"denoise": 3}
    assert "inversion" not in again.timings and not any(grads)
    assert first.recipe["task"] == "instant" and first.extra["kv_steps"] == 3
    assert {n: type(p) for n, p in editor.load().unet.attn_processors.items()} == procs  # processors restored
    assert not any(".lora_" in n for n, _ in editor.load().unet.named_parameters())


def test_instant_same_seed_same_pixels_and_replay(editor):
    a = editor.edit(req())
    editor.clear_caches()
    b = editor.edit(req())
    assert a.image.tobytes() == b.image.tobytes()
    c = editor.replay(a.recipe)
    assert c.image.tobytes() == a.image.tobytes()
    assert editor.edit(req(points=(((34, 32), (60, 30)),))).image.tobytes() != a.image.tobytes()


def test_instant_keeps_pixels_outside_the_region_and_runs_without_mask(editor):
    r = editor.edit(req())
    a, b = np.asarray(scene(), np.int16), np.asarray(r.image, np.int16)
    far = ~box(64, 96, 8, 56, 8, 72)
    assert np.array_equal(a[far], b[far])
    free = editor.edit(req(mask=None))
    assert free.image.size == (96, 64) and any("No mask" in n for n in free.notices)
    off = editor.edit(req(keep_outside=0, kv_fraction=0.0, guidance_scale=2.0))
    assert off.unet_calls["denoise"] == 6  # CFG: two batch elements per step


@pytest.mark.parametrize("kw, match", [
    (dict(points=(((10, 10), (10, 10)),)), "Every point is pinned"),
    (dict(points=(((10, 10), (200, 10)),)), "outside"),
    (dict(points=tuple(((10 + i, 10), (12 + i, 12)) for i in range(17))), "at most 16"),
    (dict(points=(((float("nan"), 10), (20, 10)),)), "finite"),
    (dict(n_steps=float("nan")), "finite"),
    (dict(inversion_strength=float("nan")), "finite"),
    (dict(inversion_strength=2.0), "outside"),
    (dict(n_steps=2, inversion_strength=0.1), "at least 1 step"),
    (dict(points=(((80, 5), (90, 5)),)), "outside the mask"),
    (dict(points=()), "No points"),
    (dict(prompt=3), "text"),
])
def test_instant_bad_input_is_one_line_and_the_next_request_works(editor, kw, match):
    with pytest.raises(EditError, match=match) as e:
        editor.edit(req(**kw))
    assert "\n" not in str(e.value)
    assert editor.edit(req()).image.size == (96, 64)


def test_instant_fields_are_declared_once():
    assert INSTANT_FIELDS["n_steps"].default == 10 and INSTANT_FIELDS["inversion_strength"].default == 0.7
    assert INSTANT_FIELDS["guidance_scale"].default == 1.0 and "seed" in INSTANT_FIELDS


def test_instant_moves_toy_shapes_towards_their_targets(toy):
    from bench.toy_drag import make_cases, measure

    cases = make_cases(4)
    md, noop = [], []
    for c in cases:
        r = toy.edit(InstantDragRequest(c.scene.image, ((c.handle, c.target),), c.mask, prompt=c.scene.caption))
        md.append(measure(c, r.image)["md"])
        noop.append(math.dist(c.handle, c.target))
        assert sum(r.unet_calls.values()) == 14
    assert np.mean(md) < 0.8 * np.mean(noop)


def test_rigid_instant_lands_toy_shapes_on_their_targets(toy):
    from bench.toy_drag import make_cases, measure

    hits = []
    for c in make_cases(4):
        r = toy.edit(InstantDragRequest(c.scene.image, ((c.handle, c.target),), c.mask, prompt=c.scene.caption,
                                        rigid=1))
        m = measure(c, r.image)
        hits.append(m["success"] and m["kept"])
    assert sum(hits) >= 3


def _cli_request(*argv):
    import argparse

    from editing.cli import drag

    p = argparse.ArgumentParser()
    drag.add_commands(p.add_subparsers())
    return drag.drag_request(p.parse_args(["drag", *argv]))


def test_cli_builds_the_new_methods_requests_and_refuses_other_methods_flags(tmp_path):
    from PIL import Image

    from editing.drag import GOODDRAG, DragRequest
    from editing.drag.region import RegionDragRequest

    scene().save(tmp_path / "in.png")
    Image.fromarray(box().astype(np.uint8) * 255).save(tmp_path / "m.png")
    img, m = str(tmp_path / "in.png"), str(tmp_path / "m.png")
    r = _cli_request("--method", "instant", "--image", img, "--points", "34,32>46,30", "--mask", m, "--n-steps", "4")
    assert isinstance(r, InstantDragRequest) and r.n_steps == 4 and r.mask is not None
    r = _cli_request("--method", "region", "--image", img, "--handle-region", m, "--target-region", m, "--end-t", "0.1")
    assert isinstance(r, RegionDragRequest) and len(r.handle_regions) == 1 and r.end_t == 0.1
    r = _cli_request("--method", "gooddrag", "--image", img, "--points", "34,32>46,30", "--max-steps", "5")
    assert isinstance(r, DragRequest) and r.max_steps == 5 and r.drag_timesteps == GOODDRAG["drag_timesteps"]
    for argv, match in [(("--method", "instant", "--radius", "3"), "applies to --method region only"),
                        (("--method", "region", "--kv-fraction", "0.5"), "applies to --method instant only"),
                        (("--method", "instant", "--handle-region", m), "apply to --method region only")]:
        with pytest.raises(EditError, match=match):
            _cli_request("--image", img, "--points", "34,32>46,30", *argv)
