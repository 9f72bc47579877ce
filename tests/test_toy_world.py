"""The procedural toy world (models/toy_world.py): determinism, ground truth, captions, colour segmentation."""
import numpy as np
import pytest

from models import toy_world as tw

SEEDS = range(40)


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b = tw.make_scene(7), tw.make_scene(7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption
    assert [s.centroid for s in a.shapes] == [s.centroid for s in b.shapes]
    assert not np.array_equal(np.asarray(a.image), np.asarray(tw.make_scene(8).image))


def test_scene_format():
    for seed in SEEDS:
        sc = tw.make_scene(seed)
        assert sc.image.mode == "RGB" and sc.image.size == (tw.SIZE, tw.SIZE)
        assert 1 <= len(sc.shapes) <= 3
        for s in sc.shapes:
            assert s.kind in tw.KINDS and s.colour in tw.COLOURS and s.size in tw.SIZES
            assert s.mask.shape == (tw.SIZE, tw.SIZE) and s.mask.dtype == bool


def test_masks_are_disjoint_and_painted_in_the_shape_colour():
    for seed in SEEDS:
        sc = tw.make_scene(seed)
        a = np.asarray(sc.image).astype(float)
        seen = np.zeros((tw.SIZE, tw.SIZE), bool)
        for s in sc.shapes:
            assert s.mask.sum() > 20
            assert not (seen & s.mask).any()
            seen |= s.mask
            # the mask's inner pixels (not on an anti-aliased edge) are exactly the shape's colour
            d = np.linalg.norm(a[s.mask] - np.asarray(tw.COLOURS[s.colour]), axis=-1)
            assert np.median(d) < 2.0


def test_centroids_lie_inside_their_masks_near_the_centre():
    for seed in SEEDS:
        for s in tw.make_scene(seed).shapes:
            x, y = s.centroid
            if s.kind != "ring":  # a ring's centroid is its hole
                assert s.mask[int(y), int(x)]
            assert np.hypot(x - s.center[0], y - s.center[1]) < 0.25 * s.radius + 0.5 * (s.kind == "triangle") * s.radius


def test_caption_mentions_every_shape_and_the_background():
    for seed in SEEDS:
        sc = tw.make_scene(seed)
        assert sc.caption.endswith(f"on {sc.background.colour}")
        for s in sc.shapes:
            assert f"{s.colour} {s.kind}" in sc.caption
        assert sc.caption.count(" and ") == (len(sc.shapes) > 1)


def test_captions_fit_clip_77_tokens():
    from models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    worst = [tw.Shape("triangle", "yellow", "small", (10.0 + 20 * i, 30.0), 6.0) for i in range(3)]
    for cap in [tw.caption(worst, "black")] + [tw.make_scene(s).caption for s in SEEDS]:
        assert len(tok(cap).input_ids) <= 77


def test_segment_colour_finds_a_rendered_shape():
    for colour in tw.COLOURS:
        for bg in tw.BACKGROUNDS:
            shape = tw.Shape("disk", colour, "medium", (30.0, 34.0), tw.SIZES["medium"])
            sc = tw.render([shape], tw.Background(bg, (15.0, -15.0)))
            m = tw.segment_colour(sc.image, colour)
            gt = sc.shapes[0].mask
            iou = (m & gt).sum() / (m | gt).sum()
            assert iou > 0.85, (colour, bg, iou)
            cx, cy = tw.centroid(tw.largest_blob(m))
            assert abs(cx - 30) < 0.5 and abs(cy - 34) < 0.5


def test_render_moves_a_shape_and_ground_truth_follows():
    sc = tw.make_scene(3)
    moved = [sc.shapes[0].moved(0.0, 0.0)] + sc.shapes[1:]
    again = tw.render(moved, sc.background)
    assert np.array_equal(np.asarray(again.image), np.asarray(sc.image)) and again.caption == sc.caption
    s = tw.Shape("square", "red", "medium", (20.0, 20.0), 9.0)
    a = tw.render([s], "gray").shapes[0]
    b = tw.render([s.moved(15.0, 10.0)], "gray").shapes[0]
    assert b.centroid[0] - a.centroid[0] == pytest.approx(15.0, abs=0.1)
    assert b.centroid[1] - a.centroid[1] == pytest.approx(10.0, abs=0.1)


def test_make_batch_and_unknown_names():
    images, captions = tw.make_batch(range(5))
    assert images.shape == (5, tw.SIZE, tw.SIZE, 3) and images.dtype == np.uint8 and len(captions) == 5
    with pytest.raises(ValueError):
        tw.segment_colour(images[0], "mauve")
    with pytest.raises(ValueError):
        tw.render([tw.Shape("star", "red", "medium", (30.0, 30.0), 9.0)])
