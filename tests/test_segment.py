"""One-click masks: the click API, the classical segmenter on toy scenes and photo-like pictures, a real (tiny,
random-weight) SamModel through its own processor, loading segmenters, and the CLI's ``--mask-click``."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from editing.segment import Click, ClickGroup, group_clicks, load_segmenter, mask_from_clicks, parse_click
from editing.segment.classical import ClassicalSegmenter
from models import toy_world as tw
from models.errors import EditError


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ---- clicks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [("12,30", Click(12, 30, "add")), ("+4.5, 7", Click(4.5, 7, "add-part")),
                                        (" -0,63 ", Click(0, 63, "remove"))])
def test_parse_click(text, want):
    assert parse_click(text) == want


@pytest.mark.parametrize("text", ["", "12", "a,b", "1,2,3", "*1,2"])
def test_parse_click_refuses_in_one_line(text):
    with pytest.raises(EditError, match="'X,Y'") as e:
        parse_click(text)
    assert "\n" not in str(e.value)


def test_click_modes_group_into_objects():
    clicks = [Click(1, 1), Click(2, 2, "add-part"), Click(3, 3, "remove"), Click(4, 4), Click(5, 5, "add-part")]
    assert group_clicks(clicks, (10, 10)) == [ClickGroup(((1, 1), (2, 2)), ((3, 3),)), ClickGroup(((4, 4), (5, 5)))]
    with pytest.raises(EditError, match="click mode"):
        Click(1, 1, "shift")
    with pytest.raises(EditError, match="finite"):
        Click(float("nan"), 1)
    with pytest.raises(EditError, match="finite"):
        Click("3", 1)
    assert Click(np.float32(3), np.int64(4)).x == 3  # what a UI or numpy code sends


@pytest.mark.parametrize("clicks, words", [
    ([Click(64, 10)], "outside the picture (64×64 px)"),
    ([Click(-1, 10)], "outside the picture"),
    ([Click(10, 10, "remove")], "no object is selected yet"),
    ([], "no clicks"),
])
def test_bad_clicks_say_what_to_fix(clicks, words):
    scene = tw.make_scene(tw.TUNE_SEED)
    with pytest.raises(EditError) as e:
        mask_from_clicks(scene.image, clicks)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---- the classical segmenter ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 256])
def test_a_click_on_each_toy_shape_gives_its_mask(size):
    """Rings included: their centroid is the hole, and the hole stays out of the mask."""
    kinds = set()
    for seed in range(tw.TUNE_SEED, tw.TUNE_SEED + 12):
        scene = tw.make_scene(seed)
        s = size / tw.SIZE
        image = scene.image.resize((size, size), Image.BILINEAR)
        for shape in scene.shapes:
            truth = np.asarray(Image.fromarray(shape.mask).resize((size, size), Image.NEAREST))
            result = mask_from_clicks(image, [Click(shape.centroid[0] * s, shape.centroid[1] * s)])
            assert result.mask.shape == (size, size) and result.mask.dtype == bool
            assert result.segmenter == "classical" and "classical" in result.notice
            assert iou(result.mask, truth) >= (0.97 if size == 64 else 0.8), (seed, shape.kind, size)
            kinds.add(shape.kind)
    assert kinds == set(tw.KINDS)


def test_a_large_picture_is_analysed_downscaled_and_its_mask_is_full_size():
    from editing.segment.classical import ANALYSIS_SIDE

    scene = tw.render([tw.Shape("triangle", "purple", "large", (30.0, 34.0), 12.5)], tw.Background("white", (8.0, 4.0)))
    w, h = ANALYSIS_SIDE * 3 // 2, ANALYSIS_SIDE * 9 // 8  # non-square, non-integer scale
    image = scene.image.resize((w, h), Image.BILINEAR)
    truth = np.asarray(Image.fromarray(scene.shapes[0].mask).resize((w, h), Image.NEAREST))
    c = scene.shapes[0].centroid
    mask = mask_from_clicks(image, [Click(c[0] * w / 64, c[1] * h / 64)]).mask
    assert mask.shape == (h, w) and iou(mask, truth) >= 0.95


def test_a_ring_click_leaves_the_hole_out():
    ring = tw.render([tw.Shape("ring", "red", "large", (32.0, 32.0), 12.5)], tw.Background("gray", (10.0, -8.0)))
    mask = mask_from_clicks(ring.image, [Click(32, 32)]).mask
    assert not mask[32, 32] and iou(mask, ring.shapes[0].mask) == 1.0


def test_a_click_on_the_background_finds_no_object():
    scene = tw.render([tw.Shape("disk", "blue", "medium", (20.0, 20.0), 9.0)], "white")
    with pytest.raises(EditError, match=r"no object found here \(50, 50\)"):
        mask_from_clicks(scene.image, [Click(50, 50)])


def test_objects_add_and_parts_come_off():
    scene = tw.render([tw.Shape("disk", "red", "medium", (16.0, 16.0), 9.0),
                       tw.Shape("square", "green", "medium", (46.0, 44.0), 9.0)], "black")
    red, green = (s.mask for s in scene.shapes)
    both = mask_from_clicks(scene.image, [Click(16, 16), Click(46, 44)]).mask
    assert iou(both, red | green) == 1.0
    # one object of two colours: a plain click takes all of it, alt-click on a part takes that part off
    a = np.asarray(scene.image).copy()
    a[54:62, 4:24] = tw.COLOURS["yellow"]  # clear of both shapes
    a[54:62, 24:34] = tw.COLOURS["cyan"]
    two = Image.fromarray(a)
    whole = mask_from_clicks(two, [Click(10, 58)]).mask
    assert whole[54:62, 4:34].all() and whole.sum() == 240
    part = mask_from_clicks(two, [Click(10, 58), Click(30, 58, "remove")]).mask
    assert part[54:62, 4:24].all() and part.sum() == 160
    with pytest.raises(EditError, match="no object found here"):
        mask_from_clicks(two, [Click(10, 58), Click(30, 58, "remove"), Click(10, 58, "remove")])


def _product_shot(seed: int = 0, size: int = 256) -> tuple[Image.Image, np.ndarray]:
    """A plain-background photo: a shaded, striped, noisy mug (body + handle) on white with a lens vignette."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    vignette = 240 - 25 * ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size / 2) ** 2  # 240 centre, 190 corners
    body = ((xx - 0.44 * size) / (0.21 * size)) ** 2 + ((yy - 0.52 * size) / (0.29 * size)) ** 2 <= 1
    handle = (np.abs(np.hypot(xx - 0.66 * size, yy - 0.52 * size) - 0.1 * size) <= 0.03 * size) & (xx > 0.62 * size)
    obj = body | handle
    shade = 0.6 + 0.4 * np.clip((0.52 * size - xx) / (0.42 * size) + 0.5, 0, 1)
    mug = np.stack([150 * shade + 20 * np.sin(yy / 5), 90 * shade, 50 * shade], -1)
    img = np.where(obj[..., None], mug, vignette[..., None]) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), obj


def test_plain_background_photo_with_a_vignette_and_a_textured_object():
    image, obj = _product_shot()
    seg = ClassicalSegmenter()
    for click in (Click(113, 133), Click(193, 133)):  # the body, the handle: one object
        assert iou(mask_from_clicks(image, [click], seg).mask, obj) >= 0.97
    assert seg._last[1].plain
    with pytest.raises(EditError, match="no object found here"):
        mask_from_clicks(image, [Click(128, 10)], seg)  # the bright middle of the top edge is background too


def _textured_photo(seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A photo-like picture with no plain background (stripes and grain) and a magenta ellipse on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:160, 0:200]
    bg = np.stack([40 + 160 * ((xx // 12) % 2), 120 + 0 * xx, 200 - 140 * ((yy // 20) % 2)], -1).astype(np.float32)
    obj = ((xx - 100) / 40.0) ** 2 + ((yy - 80) / 28.0) ** 2 <= 1
    img = np.where(obj[..., None], np.array([240, 30, 230], np.float32), bg) + rng.normal(0, 6, bg.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), obj


def test_photo_without_plain_background_uses_fill_and_grabcut():
    image, obj = _textured_photo()
    seg = ClassicalSegmenter()
    mask = mask_from_clicks(image, [Click(100, 80)], seg).mask
    assert not seg._background(np.asarray(image), np.asarray(image, np.float32)).plain
    assert iou(mask, obj) >= 0.9


# ---- SAM (a tiny random-weight SamModel, the real classes) -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
    from models.tiny import tiny_sam

    model, processor = tiny_sam()
    d = tmp_path_factory.mktemp("tiny-sam")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def test_sam_answers_a_click_with_a_mask_of_the_picture_size(tiny_sam_dir):
    seg = load_segmenter(str(tiny_sam_dir))
    assert seg.name == f"sam:{tiny_sam_dir.name}"
    image = tw.make_scene(tw.TUNE_SEED).image.resize((120, 90))
    x, y = 60, 45
    try:
        result = mask_from_clicks(image, [Click(x, y), Click(x + 5, y, "add-part"), Click(10, 10, "remove")], seg)
    except EditError as e:  # random weights may well find nothing: then the message must be the one-line one
        assert "no object found here" in str(e)
    else:
        assert result.mask.shape == (90, 120) and result.mask.dtype == bool and result.segmenter == seg.name
    one = seg.object_mask(np.asarray(image), ClickGroup(((x, y),)))
    assert one.shape == (90, 120) and one.dtype == bool
    assert len(seg._embeddings._items) == 1  # the ViT ran once for the picture, however many clicks


def test_sam_folder_problems_are_one_line(tiny_sam_dir, tmp_path):
    import shutil

    bare = tmp_path / "no-weights"
    shutil.copytree(tiny_sam_dir, bare)
    (bare / "model.safetensors").unlink()
    with pytest.raises(EditError, match="has no weights"):
        load_segmenter(str(bare))
    (bare / "config.json").unlink()
    with pytest.raises(EditError, match="no config.json"):
        load_segmenter(str(bare))
    other = tmp_path / "other"
    shutil.copytree(tiny_sam_dir, other)
    (other / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(EditError, match="'clip' model; supported: sam"):
        load_segmenter(str(other))
    with pytest.raises(EditError, match="could not load the segmenter 'nobody/no-such-sam'"):
        load_segmenter("nobody/no-such-sam")  # HF_HUB_OFFLINE: nothing fetched, one line back
    with pytest.raises(EditError, match="neither a folder nor a Hub id"):
        load_segmenter("no/such/folder")


def test_auto_is_classical_without_segmenter_weights():
    assert load_segmenter("auto").name == "classical" and load_segmenter(None).name == "classical"


# ---- the CLI -----------------------------------------------------------------------------------------------
def _args(**kw) -> argparse.Namespace:
    from editing.cli.common import add_mask_click_flags

    p = argparse.ArgumentParser()
    p.add_argument("--mask")
    add_mask_click_flags(p)
    argv = [a for k, v in kw.items() for a in ([f"--{k.replace('_', '-')}", v] if isinstance(v, str) else
                                               [x for c in v for x in (f"--{k.replace('_', '-')}", c)])]
    return p.parse_args(argv)


def test_cli_resolves_a_mask_from_clicks(tmp_path, capsys):
    from editing.cli.common import resolve_mask

    scene = tw.make_scene(tw.TUNE_SEED + 3)
    c = scene.shapes[0].centroid
    mask = resolve_mask(_args(mask_click=[f"{c[0]},{c[1]}"], segmenter="classical"), scene.image, required=True)
    assert iou(mask, scene.shapes[0].mask) >= 0.97
    assert "note: mask from 1 click by the classical segmenter" in capsys.readouterr().err
    assert resolve_mask(_args(), scene.image) is None
    with pytest.raises(EditError, match="--mask is required"):
        resolve_mask(_args(), scene.image, required=True)
    Image.fromarray(scene.shapes[0].mask).save(tmp_path / "m.png")
    with pytest.raises(EditError, match="both given"):
        resolve_mask(_args(mask=str(tmp_path / "m.png"), mask_click=["1,1"]), scene.image)
    assert np.array_equal(resolve_mask(_args(mask=str(tmp_path / "m.png")), scene.image), scene.shapes[0].mask)


def test_move_takes_a_mask_click_end_to_end(tmp_path, capsys):
    from editing.cli import main

    scene = tw.make_scene(tw.TUNE_SEED + 3)
    scene.image.save(tmp_path / "in.png")
    c = scene.shapes[0].centroid
    base = ["move", "--image", str(tmp_path / "in.png"), "--offset", "4,0", "--model", "tiny",
            "--n-inference-steps", "4", "--out", str(tmp_path / "out.png")]
    assert main([*base, "--mask-click", "70,5"]) == 2
    assert "outside the picture (64×64 px)" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*base, "--mask-click", f"{c[0]:.1f},{c[1]:.1f}", "--segmenter", "classical"]) == 0
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_the_benchmark_runs_and_reports(tmp_path, capsys):
    import json

    from bench import click_masks

    assert click_masks.main(["--n", "3", "--size", "64", "--split", "tune", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["shapes"] >= 3 and report["summary"]["hit"] == 1.0 and report["segmenter"] == "classical"
    assert "| all |" in capsys.readouterr().out
    assert click_masks.main(["--n", "1", "--segmenter", str(tmp_path / "nothing-here")]) == 2  # one line, no table
