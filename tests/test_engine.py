"""End-to-end Editor behaviour on the tiny model: sizes, determinism, caching, generated images, bad input."""
import threading

import numpy as np
import pytest

from editing.drag import DragRequest
from editing.engine import Editor
from models.errors import EditCancelled, EditError
from tests.conftest import FAST, scene

PAIR = (((30.0, 32.0), (45.0, 30.0)),)


def _mask(w=96, h=64):
    m = np.zeros((h, w), bool)
    m[10:55, 15:70] = True
    return m


def test_drag_non_square_returns_input_size_and_recipe(editor):
    img = scene(90, 60)
    r = editor.drag(DragRequest(img, (((30, 30), (45, 28)),), _mask(90, 60), **FAST))
    assert r.image.size == (90, 60)
    assert r.recipe["task"] == "dragdiffusion" and r.recipe["params"]["points"] == [[[30.0, 30.0], [45.0, 28.0]]]
    assert set(r.timings) >= {"lora", "inversion", "drag", "denoise", "decode"}
    assert r.unet_calls["inversion"] == round(0.7 * 10)
    assert r.unet_calls["denoise"] == 2 * round(0.7 * 10)  # [original, edited] batch
    assert len(r.final_points) == 1


def test_repeat_drag_reuses_lora_and_inversion(editor):
    editor.clear_caches()
    img = scene(seed=3)
    req = DragRequest(img, PAIR, _mask(), **FAST)
    first = editor.drag(req)
    again = editor.drag(req.replace(points=(((30.0, 32.0), (40.0, 40.0)),)))
    assert first.unet_calls.get("lora") and first.unet_calls.get("inversion")
    assert "lora" not in again.unet_calls and "inversion" not in again.unet_calls


def test_same_seed_same_output(editor):
    req = DragRequest(scene(seed=5), PAIR, None, **FAST)
    editor.clear_caches()
    a = np.asarray(editor.drag(req).image)
    editor.clear_caches()
    b = np.asarray(editor.drag(req).image)
    assert np.array_equal(a, b)


def test_several_pairs_without_lora(editor):
    req = DragRequest(scene(), (((20, 20), (30, 25)), ((70, 40), (60, 45))), None, **{**FAST, "lora_steps": 0})
    r = editor.drag(req)
    assert "lora" not in r.unet_calls and len(r.final_points) == 2


def test_generated_image_drags_without_inversion_or_lora(editor):
    g = editor.generate("a red disk", seed=3, size=(128, 96), n_inference_steps=10)
    assert g.image.size == (128, 128)  # rounded to the UNet's multiple (64 px)
    assert editor.is_drag_ready(g.image)
    r = editor.drag(DragRequest(g.image, (((40, 30), (60, 30)),), None, **FAST))
    assert "inversion" not in r.unet_calls and "lora" not in r.unet_calls
    assert r.recipe["generated"]["task"] == "generate"


def test_replay_reproduces_the_edit(editor):
    req = DragRequest(scene(seed=7), PAIR, _mask(), **FAST)
    r = editor.drag(req)
    again = editor.replay(r.recipe)
    assert np.array_equal(np.asarray(r.image), np.asarray(again.image))


def test_replay_of_a_dragged_generation(editor):
    g = editor.generate("a blue square", seed=9, size=(64, 64), n_inference_steps=10)
    r = editor.drag(DragRequest(g.image, (((20, 20), (40, 30)),), None, **FAST))
    editor.clear_caches()
    again = editor.replay(r.recipe)
    assert np.array_equal(np.asarray(r.image), np.asarray(again.image))


# ---- bad input: clear message, and the next request still works --------------------------------

@pytest.mark.parametrize("points, match", [
    ((), "No points"),
    ((((10, 10), (10, 10)),), "Every point is pinned"),
    ((((10, 10), (500, 10)),), "outside"),
    ((((-1, 10), (20, 10)),), "outside"),
    ((((float("nan"), 10), (20, 10)),), "finite"),
    ((((10,), (20, 10)),), "two numbers"),
])
def test_bad_points(points, match):
    with pytest.raises(EditError, match=match):
        DragRequest(scene(), points)


@pytest.mark.parametrize("field, value, match", [
    ("lora_steps", float("nan"), "finite"),
    ("latent_lr", -1, "outside"),
    ("max_steps", 2.5, "whole number"),
    ("inversion_strength", "abc", "must be a number"),
    ("guidance_scale", float("inf"), "finite"),
])
def test_bad_numbers(field, value, match):
    with pytest.raises(EditError, match=match):
        DragRequest(scene(), PAIR, **{field: value})


def test_no_image_and_odd_points():
    from editing.drag import pair_points

    with pytest.raises(EditError, match="No image"):
        DragRequest(None, PAIR)
    with pytest.raises(EditError, match="every handle needs a target"):
        pair_points([(1, 2), (3, 4), (5, 6)])
    with pytest.raises(EditError, match="No points"):
        pair_points([])


def test_mask_of_other_size_is_resized_and_empty_mask_ignored():
    r = DragRequest(scene(), PAIR, np.ones((32, 48), bool))
    assert r.mask.shape == (64, 96) and any("resized" in n for n in r.notices)
    r = DragRequest(scene(), PAIR, np.zeros((64, 96), bool))
    assert r.mask is None and any("empty" in n for n in r.notices)


def test_corrupt_upload_is_refused(tmp_path):
    from editing.images import load_image

    bad = tmp_path / "photo.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(EditError, match="not a readable image"):
        load_image(bad)
    with pytest.raises(EditError, match="not a readable image"):
        load_image(b"\x89PNG\r\n\x1a\n broken")


def test_large_image_is_downscaled_with_notice():
    ed = Editor("tiny", max_side=80)
    r = ed.drag(DragRequest(scene(160, 100), (((60, 50), (90, 50)),), None, **FAST))
    assert r.image.size == (80, 50) and any("downscaled" in n for n in r.notices)


def test_unknown_model_spec_is_a_clear_error():
    with pytest.raises(EditError, match="Unknown model"):
        Editor("no-such-model").load()
    with pytest.raises(EditError, match="pickle"):
        Editor("weights.ckpt").load()


def test_auto_falls_back_to_builtin_with_banner(monkeypatch):
    from models import choose

    choose.resolve_auto.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ed = Editor("auto")
    assert ed.model_spec == choose.best_offline_builtin()
    assert "not available" in ed.banner
    choose.resolve_auto.cache_clear()


def test_cancel_mid_run_then_next_request_works(editor):
    cancel = threading.Event()
    phases = []

    def progress(phase, frac, msg):
        phases.append(phase)
        if phase == "inversion" and frac > 0:
            cancel.set()

    editor.clear_caches()
    req = DragRequest(scene(seed=11), PAIR, None, **FAST)
    with pytest.raises(EditCancelled):
        editor.drag(req, progress=progress, cancel=cancel)
    assert "lora" in phases
    r = editor.drag(req)  # caches hold no half-finished state
    assert r.image.size == (96, 64)
    assert not getattr(editor.load().unet, "peft_config", {})  # identity LoRA removed after the cancel


@pytest.mark.parametrize("kwargs, match", [
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"n_inference_steps": 1}, "n_inference_steps"),
    ({"size": (4000, 64)}, "width"),  # one size limit for every generation: GenerateRequest's
    ({"size": (64.5, 64)}, "width"),
])
def test_generate_bad_input(editor, kwargs, match):
    with pytest.raises(EditError, match=match):
        editor.generate("a cat", **kwargs)


def test_generate_rounds_a_small_size_up_with_a_notice(editor):
    r = editor.generate("a cat", size=(10, 10), n_inference_steps=2)
    m = editor.bundle.pixel_multiple
    assert r.image.size == (m, m) and any("rounded" in n for n in r.notices)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": "abc"}, "lora_steps must be a number"),
    ({"rank": 0}, r"lora_rank=0 is outside \[1, 128\]"),
    ({"lr": float("nan")}, "lora_lr must be a finite number"),
    ({"seed": 2.5}, "seed must be a whole number"),
])
def test_train_identity_lora_ahead_names_the_bad_field(editor, kwargs, match):
    with pytest.raises(EditError, match=match):
        editor.train_identity_lora(scene(), "", **kwargs)


def test_train_identity_lora_needs_a_picture(editor):
    with pytest.raises(EditError, match="No image"):
        editor.train_identity_lora(None)
