"""Unit tests of ui/overlay.py: pure numpy/OpenCV, no gradio server, no model."""
import numpy as np
import pytest
from PIL import Image

from ui import overlay


def gray(h=64, w=96, value=128):
    return np.full((h, w, 3), value, np.uint8)


def test_as_rgb_accepts_pil_gray_and_rgba():
    assert overlay.as_rgb(Image.new("L", (5, 4), 10)).shape == (4, 5, 3)
    rgba = np.zeros((4, 5, 4), np.uint8)  # fully transparent -> white
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel
    out = overlay.as_rgb(rgba)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)


def test_draw_points_colors_handle_red_target_blue():
    img = gray()
    out = overlay.draw_points(img, [[20, 20], [70, 40]])
    assert out.shape == img.shape and out is not img
    assert np.array_equal(img, gray()), "input must not be modified"
    assert tuple(out[20, 20]) == overlay.HANDLE_RGB  # (row=y, col=x)
    assert tuple(out[40, 70]) == overlay.TARGET_RGB
    # the arrow between them changes pixels halfway along
    assert (out[30, 45] != 128).any()


def test_draw_points_unpaired_last_handle_and_no_points():
    img = gray()
    out = overlay.draw_points(img, [[10, 10], [50, 30], [80, 50]])
    assert tuple(out[50, 80]) == overlay.HANDLE_RGB
    assert np.array_equal(overlay.draw_points(img, []), img)


def test_dim_frozen_darkens_only_unmasked_pixels():
    img = gray(value=200)
    mask = np.zeros((64, 96), bool)
    mask[10:30, 10:50] = True
    out = overlay.dim_frozen(img, mask)
    assert (out[mask] == 200).all()
    assert (out[~mask] == int(200 * overlay.FROZEN_BRIGHTNESS)).all()
    assert np.array_equal(overlay.dim_frozen(img, None), img)


def test_dim_frozen_resizes_a_mask_of_another_size():
    mask = np.zeros((32, 48), bool)
    mask[:, :24] = True  # left half
    out = overlay.dim_frozen(gray(value=200), mask)
    assert out[5, 5, 0] == 200 and out[5, 90, 0] < 200


def test_mask_from_layers_uses_alpha_of_all_layers():
    a = np.zeros((64, 96, 4), np.uint8)
    b = np.zeros((64, 96, 4), np.uint8)
    a[5:10, 5:10, 3] = 128  # semi-transparent brush stroke still counts
    b[40:50, 60:70] = (255, 0, 255, 255)
    mask = overlay.mask_from_layers([a, b], (96, 64))
    assert mask.dtype == bool and mask.shape == (64, 96)
    assert mask.sum() == 25 + 100


def test_mask_from_layers_none_when_nothing_painted():
    assert overlay.mask_from_layers([], (96, 64)) is None
    assert overlay.mask_from_layers(None, (96, 64)) is None
    assert overlay.mask_from_layers([np.zeros((64, 96, 4), np.uint8)], (96, 64)) is None


def test_mask_from_layers_resizes_to_image_size():
    layer = np.zeros((32, 48, 4), np.uint8)
    layer[:16, :, 3] = 255  # top half
    mask = overlay.mask_from_layers([layer], (96, 64))
    assert mask.shape == (64, 96) and mask[:32].all() and not mask[32:].any()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_mask_from_image_white_means_may_change(mode):
    m = Image.new(mode, (8, 6), 0)
    m.paste(255 if mode == "L" else (255, 255, 255), (0, 0, 4, 6))
    mask = overlay.mask_from_image(m)
    assert mask.shape == (6, 8) and mask[:, :4].all() and not mask[:, 4:].any()


def test_mask_from_image_uses_alpha_when_transparent():
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[:3, :, :] = (0, 0, 0, 255)  # opaque black strokes still count as painted
    mask = overlay.mask_from_image(rgba)
    assert mask[:3].all() and not mask[3:].any()


def test_render_preview_dims_and_draws():
    img = Image.fromarray(gray(value=200))
    mask = np.zeros((64, 96), bool)
    mask[:, 48:] = True
    out = overlay.render_preview(img, mask, [[60, 30], [80, 30]])
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    assert out[5, 5, 0] < 200 and out[5, 90, 0] == 200
    assert tuple(out[30, 60]) == overlay.HANDLE_RGB


def test_fingerprint_tells_new_picture_from_resent_copy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-1, 2, a.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    fa = overlay.fingerprint(a)
    assert overlay.same_picture(fa, overlay.fingerprint(a.copy()))
    assert overlay.same_picture(fa, overlay.fingerprint(noisy))
    assert not overlay.same_picture(fa, overlay.fingerprint(255 - a))
    assert not overlay.same_picture(fa, overlay.fingerprint(other[:, :80]))  # other size
    assert not overlay.same_picture(fa, None)


def test_small_pictures_are_zoomed_for_clicking_and_clicks_map_back():
    assert overlay.preview_zoom((512, 341)) == 1 and overlay.preview_zoom((64, 64)) == 6
    img = np.zeros((64, 96, 3), np.uint8)
    f = overlay.preview_zoom((96, 64))
    out = overlay.render_preview(img, None, [[10, 20], [40, 30]], f)
    assert out.shape == (64 * f, 96 * f, 3)
    # the handle is drawn where its picture pixel is shown, and a click there maps back to that pixel
    hx, hy = (round(v) for v in overlay.to_preview((10, 20), f))
    assert tuple(out[hy, hx]) == overlay.HANDLE_RGB
    assert overlay.to_picture((hx, hy), f) == pytest.approx((10, 20), abs=0.5 / f)
    assert overlay.to_picture(overlay.to_preview((3.25, 7.5), f), f) == pytest.approx((3.25, 7.5))
