"""FastDrag's latent warpage (editing/drag_warp.py) against hand-computed cases, and the live preview."""
import math
import time

import numpy as np
import pytest

from editing.drag import warp as dw
from models.errors import EditError
from tests.conftest import scene


def box(h=32, w=32, y0=8, y1=24, x0=8, x1=24):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_circle_circumscribes_the_bounding_box():
    centre, r = dw.circumscribed_circle(box())  # cells 8..23: centre 15.5, corner at distance √2·7.5
    assert tuple(centre) == (15.5, 15.5)
    assert r == pytest.approx(7.5 * math.sqrt(2))
    with pytest.raises(EditError, match="empty"):
        dw.circumscribed_circle(np.zeros((4, 4), bool))


def test_stretch_factor_is_one_at_the_handle_zero_on_the_circle_and_linear_between():
    centre, r = np.array([0.0, 0.0]), 10.0
    a = np.array([0.0, 0.0])  # handle at the centre: |AP| = R in every direction
    cells = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, -10.0], [5.0, 0.0], [0.0, 2.5]])
    f = dw.stretch_factor(cells, a, centre, r)
    assert f == pytest.approx([1.0, 0.0, 0.0, 0.5, 0.75])
    # off-centre handle A = (4, 0): the ray towards +x meets the circle at x = 10 (|AP| = 6), towards −x at −10
    f = dw.stretch_factor(np.array([[7.0, 0.0], [-3.0, 0.0]]), np.array([4.0, 0.0]), centre, r)
    assert f == pytest.approx([1 - 3 / 6, 1 - 7 / 14])


def test_single_pair_moves_the_handle_cell_by_exactly_b_minus_a_and_circle_cells_not_at_all():
    region = box()
    a, b = np.array([[12.0, 14.0]]), np.array([[17.0, 11.0]])
    cells, disp, _ = dw.warp_field(region, a, b)
    at_a = (cells[:, 0] == 12) & (cells[:, 1] == 14)
    assert disp[at_a][0] == pytest.approx([5.0, -3.0], abs=1e-5)
    centre, r = dw.circumscribed_circle(region)
    on_circle = np.array([[8.0, 8.0], [23.0, 23.0]])  # bounding-box corners lie on the circle
    assert np.abs(dw.displacement(on_circle, a, b, centre, r)).max() < 1e-5
    # every displacement is a fraction of B − A, never more
    assert (np.linalg.norm(disp, axis=1) <= math.hypot(5, 3) + 1e-6).all()


def test_inverse_distance_weights_sum_to_one_and_favour_the_nearer_handle():
    cells = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 10.0]])
    handles = np.array([[0.0, 0.0], [10.0, 10.0]])
    w = dw.pair_weights(cells, handles)
    assert w.sum(axis=0) == pytest.approx(np.ones(3))
    assert w[0, 0] > 0.99 and w[1, 2] > 0.99  # a cell on a handle follows that handle
    d1, d2 = 5.0, math.hypot(7, 6)  # cell (3, 4): w_1 ∝ 1/5, w_2 ∝ 1/|(7, 6)|
    assert w[0, 1] == pytest.approx((1 / d1) / (1 / d1 + 1 / d2), rel=1e-3)


def test_two_pairs_blend_their_displacements():
    region = box(41, 41, 4, 37, 4, 37)  # centre (20, 20): the two handles sit symmetrically
    handles = np.array([[10.0, 20.0], [30.0, 20.0]])
    targets = np.array([[10.0, 14.0], [30.0, 26.0]])  # one up, one down
    cells, disp, _ = dw.warp_field(region, handles, targets)
    def pick(x, y):
        return disp[(cells[:, 0] == x) & (cells[:, 1] == y)][0]
    assert pick(10, 20) == pytest.approx([0, -6], abs=1e-3)
    assert pick(30, 20) == pytest.approx([0, 6], abs=1e-3)
    assert abs(pick(20, 20)[1]) < 1e-3  # midway: equal weights, opposite moves cancel


def test_forward_copy_does_not_overwrite_and_bnni_fills_every_hole():
    x = np.arange(5 * 6, dtype=np.float64).reshape(5, 6, 1)
    cells = np.array([[1, 2], [2, 2], [3, 2]])
    disp = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # all three land on (3, 2)
    priority = np.array([0.0, 1.0, 2.0])  # the first wins
    out, filled = dw.forward_copy(x, cells, disp, priority)
    assert out[2, 3, 0] == x[2, 1, 0]
    assert not filled[2, 1] and not filled[2, 2] and filled[2, 3]
    full = dw.bnni_fill(out, filled)
    assert np.isfinite(full).all()
    # hole (1, 2): left (0, 2) 1 away, right (3, 2) 2 away, up (1, 1) and down (1, 3) 1 away: 1/k weights
    vals = [(x[2, 0, 0], 1), (out[2, 3, 0], 1 / 2), (x[1, 1, 0], 1), (x[3, 1, 0], 1)]
    expect = sum(v * w for v, w in vals) / sum(w for _, w in vals)
    assert full[2, 1, 0] == pytest.approx(expect)
    assert (full[filled] == out[filled]).all()  # filled cells are untouched


def test_warp_keeps_layouts_and_moves_a_blob_towards_the_target():
    img = np.zeros((4, 32, 32), np.float32)
    img[:, 12:16, 8:12] = 1.0  # a 4×4 blob around (9.5, 13.5)
    region = box()
    out, changed = dw.warp(img, region, [(9.5, 13.5)], [(15.5, 13.5)], layout="chw")
    assert out.shape == img.shape and changed[region].all()
    ys, xs = np.nonzero(out[0] > 0.5)
    assert xs.mean() > 12  # the blob moved right (stretched: its front less than the full 6 cells)
    hwc, _ = dw.warp(np.moveaxis(img, 0, -1), region, [(9.5, 13.5)], [(15.5, 13.5)])
    assert np.array_equal(np.moveaxis(hwc, -1, 0), out)
    outside = ~changed
    assert np.array_equal(out[:, outside], img[:, outside])


def test_rigid_warp_translates_the_whole_region_by_b_minus_a():
    img = np.zeros((32, 32), np.float32)
    img[10:14, 10:14] = 1.0
    img[20, 20] = 2.0  # far from the handle, still in the region: moves by the same drag
    region = box()
    out, _ = dw.warp(img, region, [(11.5, 11.5)], [(14.5, 13.5)], rigid=True)
    assert np.array_equal(out[12:16, 13:17], np.ones((4, 4))) and out[22, 23] == 2.0
    cells, disp, _ = dw.warp_field(region, [(11.5, 11.5)], [(14.5, 13.5)], rigid=True)
    assert np.allclose(disp, [3.0, 2.0])
    moved = dw.preview(scene(64, 64), box(64, 64, 10, 40, 10, 40), [((20, 20), (26, 24))], rigid=True)
    a, b = np.asarray(scene(64, 64)), np.asarray(moved)
    assert np.array_equal(b[24:40, 26:40], a[20:36, 20:34])


def test_fill_holes_and_handle_checks():
    ring = box() & ~box(y0=12, y1=20, x0=12, x1=20)
    assert dw.fill_holes(ring).sum() == box().sum()
    dw.check_handles_in_mask(ring, [((15, 15), (20, 20))])  # inside the ring counts as inside
    with pytest.raises(EditError, match="Handle 2 .* outside the mask"):
        dw.check_handles_in_mask(ring, [((15, 15), (20, 20)), ((2, 2), (5, 5))])


def test_a_handle_on_the_rim_of_a_tight_mask_counts_as_on_it():
    """A point put on an object's end or corner may land a pixel or two off its mask (edge_px: 2 at 64², 4 at 512²);
    farther off it is outside."""
    assert dw.edge_px((64, 64)) == 2 and dw.edge_px((512, 384)) == 4
    obj = box(64, 64, 20, 40, 20, 40)  # rows and columns 20..39
    dw.check_handles_in_mask(obj, [((41.0, 30.0), (50.0, 30.0)), ((30.0, 18.2), (30.0, 10.0))])
    with pytest.raises(EditError, match="Handle 1 .* outside the mask"):
        dw.check_handles_in_mask(obj, [((43.0, 30.0), (50.0, 30.0))])
    big = box(512, 512, 160, 320, 160, 320)
    dw.check_handles_in_mask(big, [((323.0, 200.0), (400.0, 200.0))])
    with pytest.raises(EditError, match="outside the mask"):
        dw.check_handles_in_mask(big, [((326.0, 200.0), (400.0, 200.0))])


def test_preview_matches_the_size_moves_pixels_and_is_fast():
    img = scene(512, 512)
    mask = np.zeros((512, 512), bool)
    mask[160:360, 80:300] = True
    pts = [((180, 256), (240, 230))]
    out = dw.preview(img, mask, pts)
    assert out.size == img.size
    a, b = np.asarray(img, np.int16), np.asarray(out, np.int16)
    assert np.abs(a - b)[mask].max() > 50
    # content may land just outside the mask (cells near the box edge still move a little), never farther than
    # the drag distance
    near = np.zeros_like(mask)
    near[160 - 66:360 + 66, 80 - 66:300 + 66] = True
    assert np.array_equal(a[~near], b[~near])
    assert dw.preview(img, None, []).tobytes() == img.tobytes()
    # budget: 0.2 s at 512² on one core, checked against 5 pairs over a whole-image mask (the slow case)
    full = np.ones((512, 512), bool)
    many = [((50 + 80 * i, 100 + 60 * i), (60 + 80 * i, 110 + 60 * i)) for i in range(5)]
    times = []
    for _ in range(3):
        t0 = time.process_time()  # CPU time of this process: other jobs on the shared cores do not count
        dw.preview(img, full, many)
        times.append(time.process_time() - t0)
    assert min(times) < 0.3


def test_preview_without_mask_moves_around_the_handle_and_big_images_are_downscaled():
    img = scene(1024, 700)
    out = dw.preview(img, None, [((300, 350), (360, 350))])
    assert out.size == img.size
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(out, np.int16)).sum(-1) > 30
    ys, xs = np.nonzero(diff)
    assert xs.size and math.dist((xs.mean(), ys.mean()), (330, 350)) < 120
    with pytest.raises(EditError, match="outside the mask"):
        dw.preview(img, np.zeros((700, 1024), bool) | box(700, 1024, 0, 10, 0, 10), [((300, 350), (360, 350))])


# ---- shapes: moving least squares (rigid with several pairs) --------------------------------------------------
def test_shape_map_is_exact_at_the_points_and_inverts_by_swapping_them():
    p = np.array([[10.0, 10.0], [30.0, 10.0]])
    v = np.array([[20.0, 10.0], [20.0, 14.0], [30.0, 10.0], [10.0, 10.0]])
    for q, axial, mid in ((np.array([[10.0, 10.0], [40.0, 10.0]]), True, [25, 14]),   # stretch from a pin: width kept
                          (np.array([[5.0, 10.0], [35.0, 10.0]]), False, [20, 16]),   # scale about the centre
                          (np.array([[10.0, 10.0], [10.0, 30.0]]), True, [6, 20])):   # a quarter turn about a pin
        f = dw.shape_map(v, p, q, axial)
        assert np.allclose(f[2:], q[::-1]) and np.allclose(f[1], mid)
        assert np.allclose(dw.shape_map(f, q, p, axial), v)
    assert np.allclose(dw.shape_map(v, p[:1], p[:1] + [3, -2], False), v + [3, -2])  # one point: a translation


def test_the_shape_warp_reshapes_toy_shapes_as_the_points_ask():
    """In pixels (what the live preview shows and an inpainting drag starts from), the rigid warp with a pin or two
    handles lands the re-rendered truth of every deformation family (IoU ≥ 0.7 with the true shape)."""
    from bench.toy_drag import measure_case
    from models import toy_world as tw

    for family in ("scale", "stretch", "rotate"):
        for case in tw.make_deform_cases(family, 4, tw.TUNE_SEED):
            row = measure_case(case, dw.preview(case.scene.image, case.mask, case.points, rigid=True))
            assert row["success"] and row["iou"] > 0.8, (family, row)


def test_a_drag_that_squeezes_the_object_below_one_latent_cell_is_refused_by_the_warp_methods():
    """A bar 12 px wide pulled across its width against a pin to 2 px is refused by name (one latent cell is 8 px
    on SD at its size, 4 on toy's); to 8 px it runs. A thin object may stay thin; one pair never squeezes."""
    bar = box(64, 64, 10, 50, 26, 38)  # 40 tall, 12 wide
    pin, handle = ((26.0, 30.0), (26.0, 30.0)), (37.0, 30.0)
    assert dw.squeezed_extent(bar, [(37.0, 30.0), (26.0, 30.0)], [(28.0, 30.0), (26.0, 30.0)])[1] < 4
    with pytest.raises(EditError, match=r"squeezes the object to \d+ px across, less than one latent cell \(4 px"):
        dw.check_not_squeezed(bar, [handle, pin[0]], [(28.0, 30.0), pin[1]], 4)
    dw.check_not_squeezed(bar, [handle, pin[0]], [(34.0, 30.0), pin[1]], 4)
    dw.check_not_squeezed(box(64, 64, 10, 50, 30, 32), [(31.0, 30.0), (30.0, 12.0)], [(31.0, 40.0), (30.0, 12.0)], 4)
    dw.check_not_squeezed(bar, [handle], [(28.0, 30.0)], 4)
    from editing.drag.methods import lookup
    from editing.engine import Editor

    for name in ("inpaint", "instant"):
        req = lookup(name).request(scene(64, 64), ((handle, (27.0, 30.0)), pin), bar)
        with pytest.raises(EditError, match="less than one latent cell"):
            Editor("tiny").edit(req)
