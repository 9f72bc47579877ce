"""OpenCV condition preprocessors on drawn test patterns, and their bad input."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from editing import conditions
from models.errors import EditError


def pattern(w=64, h=48) -> Image.Image:
    """White paper, a black square outline, a red diagonal stroke."""
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((10, 10, 30, 30), outline="black", width=2)
    d.line((35, 5, 60, 40), fill=(220, 30, 30), width=3)
    return img


def white(img) -> np.ndarray:
    a = np.asarray(img)
    assert a.shape[2] == 3 and set(np.unique(a)) <= {0, 255}  # white structure on black
    return a[..., 0] > 0


def test_canny_finds_the_square_outline_and_nothing_in_flat_areas():
    e = white(conditions.preprocess("canny", pattern()))
    assert e[8:33, 8:33].any() and not e[15:26, 15:26].any()  # the outline, not the flat inside
    assert not e[40:, :8].any()  # flat paper has no edges
    # higher thresholds keep fewer edges
    assert white(conditions.preprocess("canny", pattern(), {"low_threshold": 250, "high_threshold": 255})).sum() <= e.sum()


def test_scribble_from_strokes_on_paper_and_from_an_rgba_layer():
    s = white(conditions.preprocess("scribble", pattern(), {"thickness": 1}))
    assert s[10, 20] and s[22, 47] and not s[40, 5]  # square edge and red stroke drawn; paper empty
    thick = white(conditions.preprocess("scribble", pattern(), {"thickness": 7}))
    assert thick.sum() > s.sum()
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(layer).line((0, 16, 31, 16), fill=(0, 0, 255, 255), width=1)
    m = conditions.strokes_mask(layer)
    assert m[16].all() and m.sum() == 32


def test_strokes_over_a_photo_are_told_apart_from_the_photo():
    photo = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3)))
    drawn = photo.copy()
    ImageDraw.Draw(drawn).line((0, 24, 63, 24), fill=(255, 0, 0), width=1)
    m = conditions.strokes_mask(drawn, background=photo)
    assert m[24].sum() > 50 and m.sum() == m[24].sum()


def test_lineart_and_palette_and_passthrough():
    la = white(conditions.preprocess("lineart", pattern()))
    assert la[10, 20] and not la[20, 20]
    pal = np.asarray(conditions.preprocess("palette", pattern(), {"cells": 4}))
    assert pal.shape == (48, 64, 3) and len(np.unique(pal.reshape(-1, 3), axis=0)) <= 12  # a few colour blocks
    assert conditions.preprocess("none", pattern()).tobytes() == pattern().tobytes()


@pytest.mark.parametrize("name, options, match", [
    ("depth", None, "needs the depth-estimation weights 'Intel/dpt-hybrid-midas'"),
    ("pose", None, "OpenPose"),
    ("sobel", None, "Unknown preprocessor 'sobel'"),
    ("canny", {"low_threshold": 200, "high_threshold": 100}, "must be below"),
    ("canny", {"low_threshold": float("nan")}, "finite"),
    ("canny", {"radius": 3}, "no option radius"),
    ("palette", {"cells": 1}, "outside"),
])
def test_bad_preprocessor_input_says_what_to_do(name, options, match):
    with pytest.raises(EditError, match=match):
        conditions.preprocess(name, pattern(), options)
    assert conditions.preprocess("canny", pattern()).size == (64, 48)  # the next request still works


def test_depth_runs_when_its_weights_are_on_disk(tmp_path, monkeypatch):
    """A tiny random DPT saved locally stands in for Intel/dpt-hybrid-midas."""
    from transformers import DPTConfig, DPTForDepthEstimation

    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
                    patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
                    fusion_hidden_size=16, is_hybrid=False, head_hidden_size=8)
    DPTForDepthEstimation(cfg).save_pretrained(tmp_path / "dpt")
    monkeypatch.setenv("DRAGCANVAS_DEPTH_MODEL", str(tmp_path / "dpt"))
    d = np.asarray(conditions.preprocess("depth", pattern()))
    assert d.shape == (48, 64, 3) and (d[..., 0] == d[..., 2]).all()  # a grey depth map of the input size


def test_dominant_colour_matches_the_sorting_definition_ties_included():
    """The linear-time dominant colour picks what np.unique + argmax picked (the sketch check's reference)."""
    from editing.conditions import dominant_colour

    rng = np.random.default_rng(0)
    for trial in range(30):
        a = rng.integers(0, 256, (24, 20, 3)).astype(np.int16)
        a[: trial % 12] = rng.integers(0, 256, 3)  # a dominant band in some trials, ties in others
        colours, counts = np.unique(a.reshape(-1, 3) // 8, axis=0, return_counts=True)
        assert (dominant_colour(a) == colours[counts.argmax()] * 8 + 4).all()
