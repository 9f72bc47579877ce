"""The inpainting drag (editing/drag/inpaint.py): the bidirectional pixel warp, the fill by an inpainting model (the
built-in companion, a loaded 9-channel model) or by blended latents with the base, the composite, and its refusals."""
import cv2
import numpy as np
import pytest
from PIL import Image

from editing.drag import warp
from editing.drag.inpaint import InpaintDragRequest, preview, warp_for_fill
from editing.engine import Editor
from models.errors import EditError


def _square_scene(size: int = 64):
    img = np.full((size, size, 3), 128, np.uint8)
    region = np.zeros((size, size), bool)
    region[20:30, 20:30] = True
    img[region] = (220, 40, 40)
    return img, region


def test_translation_places_the_object_and_uncovers_exactly_what_it_left():
    img, region = _square_scene()
    out, obj, hole = warp.bidirectional_warp(img, region, [(25, 25)], [(35, 25)])
    assert obj.sum() == region.sum() and obj[20:30, 30:40].all()
    assert (out[obj] == (220, 40, 40)).all()
    assert (hole == (region & ~obj)).all() and hole[20:30, 20:30].sum() == 100


def test_a_scale_grows_the_footprint_without_pinholes_and_a_pin_stays():
    img, region = _square_scene()
    _, obj, hole = warp.bidirectional_warp(img, region, [(20, 20), (29, 29)], [(15, 15), (34, 34)])
    assert obj[15:35, 15:35].all() and not hole.any()
    _, obj, _ = warp.bidirectional_warp(img, region, [(20, 25), (29, 25)], [(20, 25), (39, 25)])
    cols = np.nonzero(obj[25])[0]
    assert cols.min() in (19, 20) and cols.max() in (39, 40)  # longer to the right, the pinned end stays
    assert np.nonzero(obj[:, 30])[0].tolist() == list(range(20, 30))  # not wider


def test_the_fill_is_the_uncovered_area_and_a_seam_band_never_the_object():
    img, region = _square_scene()
    w = warp_for_fill(Image.fromarray(img), region, (((25.0, 25.0), (35.0, 25.0)),), seam=0)
    assert (w.fill == (region & ~w.obj)).all()
    wide = warp_for_fill(Image.fromarray(img), region, (((25.0, 25.0), (35.0, 25.0)),), seam=64)
    assert wide.fill.sum() > w.fill.sum() and not (wide.fill & wide.obj).any()
    shown = np.asarray(preview(Image.fromarray(img), region, (((25.0, 25.0), (35.0, 25.0)),)))
    assert shown.shape == img.shape and (shown[w.obj] == (220, 40, 40)).all()
    assert set(np.unique(shown[w.fill])) <= {160, 255}  # hatched


def test_a_drag_out_of_the_picture_and_a_handle_outside_the_mask_are_refused():
    img, region = _square_scene()
    with pytest.raises(EditError, match="out of the picture"):
        warp_for_fill(Image.fromarray(img), region, (((25.0, 25.0), (25.0 + 80, 25.0)),), seam=5)
    with pytest.raises(EditError, match="outside the mask"):
        InpaintDragRequest(Image.fromarray(img), (((50.0, 50.0), (55.0, 50.0)),), region)


@pytest.fixture(scope="module")
def tiny():
    return Editor("tiny")


def test_tiny_fills_with_its_inpainting_companion_and_keeps_every_other_pixel(tiny):
    img, region = _square_scene()
    req = InpaintDragRequest(Image.fromarray(img), (((25.0, 25.0), (35.0, 25.0)),), region, n_steps=4)
    res = tiny.edit(req)
    assert res.extra["fill"] == "tiny-inpaint" and sum(res.unet_calls.values()) == 2  # strength 0.5: half of 4
    assert sum(tiny.edit(req.replace(strength=1.0)).unet_calls.values()) == 4  # from pure noise, every step
    w = warp_for_fill(Image.fromarray(img), region, req.points, req.seam)
    out = np.asarray(res.image)
    assert np.any(out[w.fill] != w.image[w.fill])  # the uncovered area was painted
    assert (out[~w.fill] == w.image[~w.fill]).all()  # the object and the rest keep their pixels
    assert res.extra["filled_px"] == w.fill.sum()
    again = tiny.replay(res.recipe)
    assert np.array_equal(np.asarray(again.image), out)


def test_an_inpainting_model_loaded_as_the_model_fills_and_other_methods_name_its_base():
    from editing.drag.methods import lookup

    img, region = _square_scene()
    ed = Editor("tiny-inpaint")
    res = ed.edit(InpaintDragRequest(Image.fromarray(img), (((25.0, 25.0), (35.0, 25.0)),), region, n_steps=2))
    assert res.extra["fill"] == "tiny-inpaint"
    with pytest.raises(EditError, match="--model tiny"):
        ed.edit(lookup("instant").request(Image.fromarray(img), (((25.0, 25.0), (35.0, 25.0)),), region))


def test_without_an_inpainting_model_the_base_fills_by_blending_latents():
    img, region = _square_scene()
    res = Editor("tiny-sd2-v").edit(InpaintDragRequest(Image.fromarray(img), (((25.0, 25.0), (35.0, 25.0)),),
                                                       region, n_steps=2))
    assert res.extra["fill"].startswith("blended latents") and any("--inpaint-model" in n for n in res.notices)


@pytest.mark.parametrize("spec, match", [("tiny-sd2-v", "not an inpainting model"), ("tiny-inpaint", None)])
def test_an_inpaint_model_of_another_family_or_kind_is_named(spec, match):
    img, region = _square_scene()
    req = InpaintDragRequest(Image.fromarray(img), (((25.0, 25.0), (35.0, 25.0)),), region, n_steps=1)
    if match:
        with pytest.raises(EditError, match=match):
            Editor("tiny", inpaint_model=spec).edit(req)
    else:
        with pytest.raises(EditError, match="Stable Diffusion 2"):
            Editor("tiny-sd2-v", inpaint_model=spec).edit(req)


def test_the_widened_unet_predicts_what_the_base_did_and_examples_are_seeded():
    import torch

    from models.families import inpaint_input
    from models.tiny import build_components
    from models.train_toy_inpaint import make_example, widen_conv_in

    unet = build_components("tiny")["unet"].eval()
    x, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(x, 10, encoder_hidden_states=cond).sample
        widen_conv_in(unet)
        after = unet(inpaint_input(x, torch.ones(1, 1, 8, 8), torch.randn(1, 4, 8, 8)), 10,
                     encoder_hidden_states=cond).sample
    assert unet.config.in_channels == 9 and torch.allclose(before, after, atol=1e-5)
    a, b = make_example(123), make_example(123)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    vacated = next(make_example(s) for s in range(50) if make_example(s)[3])
    assert vacated[1].any() and vacated[0].shape == (64, 64, 3)


def test_the_background_estimate_fills_from_around_and_leaves_the_rest():
    """What lies behind a removed object, from its surroundings (Telea): on a smooth gradient it is within a few
    levels of the truth, and pixels away from the unknown area are untouched."""
    from editing.fill import background_estimate

    yy, xx = np.mgrid[0:64, 0:64]
    bg = np.stack([40 + 2 * xx, 60 + yy, np.full_like(xx, 120)], -1).astype(np.uint8)
    img = bg.copy()
    img[20:36, 24:40] = (220, 30, 30)
    unknown = np.zeros((64, 64), bool)
    unknown[20:36, 24:40] = True
    est = background_estimate(img, unknown)
    assert np.abs(est[20:36, 24:40].astype(int) - bg[20:36, 24:40]).mean() < 6
    far = ~(cv2.dilate(unknown.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0)
    assert (est[far] == img[far]).all()


def test_the_seam_band_scales_with_the_picture():
    """widen: 5 px at a 512 px side, 1 px at 64, none below ~52 (shared by the inpaint drag and Move's hole)."""
    from editing.fill import widen

    for side, r in ((512, 5), (64, 1), (32, 0)):
        hole = np.zeros((side, side), bool)
        hole[side // 2, side // 2] = True
        ys, _ = np.nonzero(widen(hole, 5))
        assert ys.max() - side // 2 == r
