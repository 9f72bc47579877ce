"""The procedural toy world (models/toy_world.py): determinism, ground truth, captions, colour segmentation."""
import math

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


# ---- world v2 and the deformation cases -------------------------------------------------------------
V1_FINGERPRINT = "72a75db04666739342fe0186c2ac9a450288fc7ba19e50f440bcfdaf179e3005"  # models/toy_world.py before v2


def test_v1_is_bit_for_bit_what_the_shipped_toy_model_was_trained_and_benchmarked_on():
    import hashlib

    h = hashlib.sha256()
    for s in list(range(30)) + [tw.HELDOUT_SEED + 5]:
        sc = tw.make_scene(s)
        h.update(np.asarray(sc.image).tobytes())
        h.update(sc.caption.encode())
    for c in tw.make_cases(5):
        h.update(repr((c.scene.seed, c.handle, c.target)).encode())
        h.update(c.mask.tobytes())
    assert h.hexdigest() == V1_FINGERPRINT
    assert np.array_equal(np.asarray(tw.make_scene(4, "v1").image), np.asarray(tw.make_scene(4).image))
    with pytest.raises(ValueError):
        tw.make_scene(4, "v3")


V2_SEEDS = range(60)


def test_v2_scenes_are_seeded_continuous_turned_and_keep_their_spacing():
    assert np.array_equal(np.asarray(tw.make_scene(11, "v2").image), np.asarray(tw.make_scene(11, "v2").image))
    kinds, radii, angles = set(), set(), set()
    for seed in V2_SEEDS:
        sc = tw.make_scene(seed, "v2")
        assert sc.image.size == (tw.SIZE, tw.SIZE) and 1 <= len(sc.shapes) <= 3 and sc.seed == seed
        seen = np.zeros((tw.SIZE, tw.SIZE), bool)
        for i, s in enumerate(sc.shapes):
            kinds.add(s.kind)
            radii.add(round(s.radius, 3))
            angles.add(round(s.angle, 3))
            assert s.kind in tw.KINDS_V2 and s.size == tw.size_word(s) and s.mask.sum() > 20
            assert not (seen & s.mask).any()
            seen |= s.mask
            if s.kind in tw.ELONGATED:
                assert s.width >= 8.0 and 2 * s.radius >= s.width + 6  # two latent cells wide, and elongated
            assert tw.inside(s)
            if s.angle or s.kind in tw.ELONGATED:  # a v2 scene (a quarter are v1's own): shapes never touch
                assert all(tw.gap(s, o) >= tw.GAP_V2 for o in sc.shapes[i + 1:])
    assert kinds == set(tw.KINDS_V2) and len(radii) > 50 and len(angles) > 20


def test_v2_geometry_area_rotation_and_size_words():
    for kind in tw.KINDS_V2:
        w = 10.0 if kind in tw.ELONGATED else 0.0
        for angle in (0.0, 30.0, 90.0):
            s = tw.Shape(kind, "red", "medium", (32.3, 31.8), 15.0 if w else 10.0, angle=angle, width=w)
            m = tw.render([s], "gray").shapes[0].mask
            assert m.sum() == pytest.approx(tw.area(s), rel=0.06), (kind, angle)
        flat = tw.coverage(tw.Shape(kind, "red", "medium", (32.0, 32.0), 15.0 if w else 10.0, angle=0.0, width=w))
        upright = tw.coverage(tw.Shape(kind, "red", "medium", (32.0, 32.0), 15.0 if w else 10.0, angle=90.0, width=w))
        if kind != "triangle":  # everything else is symmetric under a half turn: 90° is the transpose
            assert np.abs(flat.T - upright).max() < 0.02, kind
    bar = tw.Shape("bar", "red", "medium", (32.0, 32.0), 15.0, angle=90.0, width=10.0)
    assert tw.ends(bar)[0] == pytest.approx((32.0, 47.0)) and tw.min_extent(bar) == 10.0
    for r, word in ((5.0, "small"), (9.0, "medium"), (13.0, "large")):
        assert tw.size_word(tw.Shape("disk", "red", "", (0.0, 0.0), r)) == word
    assert tw.size_word(tw.Shape("bar", "red", "", (0.0, 0.0), 23.0, width=13.0)) == "large"
    assert tw.size_word(tw.Shape("oval", "red", "", (0.0, 0.0), 9.0, width=8.0)) == "small"
    with pytest.raises(ValueError):
        tw.coverage(tw.Shape("star", "red", "medium", (30.0, 30.0), 9.0, angle=10.0))


def test_v2_captions_fit_77_tokens_and_use_only_known_tokens():
    from models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    worst = [tw.Shape("rectangle", "yellow", "small", (10.0 + 20 * i, 30.0), 9.0, width=8.0) for i in range(3)]
    caps = [tw.caption(worst, "black")] + [tw.make_scene(s, "v2").caption for s in V2_SEEDS]
    for cap in caps:
        ids = tok(cap).input_ids
        assert len(ids) <= 77 and tok.unk_token_id not in ids[1:-1]  # its unk is the end token
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == cap.replace(" ", "")
    assert any(k in " ".join(caps) for k in tw.ELONGATED)


def test_deformation_cases_carry_exact_ground_truth():
    for family in tw.FAMILIES:
        for case in tw.make_deform_cases(family, 6):
            assert case.family == family and case.drags and case.mask.dtype == bool
            new, old = case.truth_shape, case.shape
            assert (case.mask >= (old.mask | new.mask)).all()  # old and new outline are editable
            assert np.array_equal(np.asarray(case.truth.image)[~case.mask], np.asarray(case.scene.image)[~case.mask])
            assert all(0 <= v < tw.SIZE for pair in case.points for p in pair for v in p)  # nothing leaves the image
            assert tw.min_extent(new) >= tw.MIN_EXTENT and new.colour == old.colour and new.kind == old.kind
            assert all(tw.gap(new, o) >= tw.GAP_V2 for o in case.truth.shapes[1:]) or family == "move"
            for i in case.drags if family != "move" else ():  # a dragged rim point or end sits on the shape, and
                # its target on the new shape (move drags the centroid, which is a ring's hole)
                (hx, hy), (tx, ty) = case.points[i]
                assert tw._dilate(old.mask, 2)[int(hy), int(hx)] and tw._dilate(new.mask, 2)[int(ty), int(tx)]
            if family == "move":
                assert case.pins == () and case.truth_shape.centroid == pytest.approx(case.target, abs=1.0)
            elif family == "scale":
                s = case.amount
                assert 0.67 <= s <= 0.8 or 1.25 <= s <= 1.5
                assert new.radius == pytest.approx(old.radius * s)
                assert new.mask.sum() / old.mask.sum() == pytest.approx(s * s, rel=0.25)  # small shapes: pixel steps
                assert new.centroid == pytest.approx(old.centroid, abs=0.6) and case.pins == ()
            elif family == "stretch":
                (pin,) = case.pins
                assert old.kind in tw.ELONGATED and new.angle == old.angle and new.width == old.width
                assert 2 * (new.radius - old.radius) == pytest.approx(case.amount)
                assert pin in [pytest.approx(e) for e in tw.ends(new)]  # the pinned end stays put
                assert case.target in [pytest.approx(e) for e in tw.ends(new)]  # the dragged end lands on the target
                assert case.landing == (case.target,)
            else:  # rotate
                (pin,) = case.pins
                assert old.kind in tw.ELONGATED and new.radius == old.radius and 25 <= abs(case.amount) <= 60
                assert pin == pytest.approx(old.center) or pin in [pytest.approx(e) for e in tw.ends(old)]
                assert case.target in [pytest.approx(e) for e in tw.ends(new)]
                assert math.dist(pin, case.handle) == pytest.approx(math.dist(pin, case.target))


def test_move_cases_are_v1s_and_splits_stay_disjoint():
    v1 = tw.make_cases(4)
    for a, b in zip(v1, tw.make_deform_cases("move", 4)):
        assert (a.scene.seed, a.handle, a.target) == (b.scene.seed, b.handle, b.target)
        assert np.array_equal(a.mask, b.mask) and b.as_move_case().handle == a.handle
    for family in tw.FAMILIES:
        bench = {c.scene.seed for c in tw.make_deform_cases(family, 20)}
        tune = {c.scene.seed for c in tw.make_deform_cases(family, 20, tw.TUNE_SEED)}
        assert not bench & tune and tw.HELDOUT_SEED <= min(bench) and max(bench) < tw.TUNE_SEED <= min(tune)
    with pytest.raises(ValueError):
        tw.make_deform_cases("twist", 1)


def test_a_scale_case_never_shrinks_below_the_world_or_a_latent_cell():
    # a small ring can only grow; a small square shrunk by 0.67 would fall below the world's smallest radius
    rng = np.random.default_rng(0)
    ring = tw.Shape("ring", "red", "small", (32.0, 32.0), tw.RING_MIN_RADIUS)
    for _ in range(20):
        made = tw._deform("scale", ring, rng)
        assert made is None or made[0].radius > ring.radius
    assert tw._deform("stretch", ring, rng) is None and tw._deform("rotate", ring, rng) is None
