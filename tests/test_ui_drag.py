"""The Drag tab's logic without a browser: point edits with undo/redo, the method switch, the live preview,
and ui/feedback.py's progress object (threads, trail, previews, time left)."""
import threading
import time

import numpy as np
import pytest
from PIL import Image

from editing.drag import GOODDRAG, MAX_POINT_PAIRS, DragRequest, InstantDragRequest, RegionDragRequest
from models.errors import EditCancelled, EditError
from ui import drag_methods, drag_tab, overlay
from ui.drag_methods import canvas_label, method_name
from ui.drag_session import Session, apply_edit
from ui.feedback import LiveProgress

SIZE = (96, 64)


def session_with_image() -> Session:
    s = Session()
    s.use_image(Image.new("RGB", SIZE, (90, 120, 150)))
    return s


# ---- point edits ---------------------------------------------------------------------------------------
def test_the_canvas_asks_for_what_the_method_takes():
    """Inpaint moves every masked pixel, so its canvas asks for the object; the others for the area that may change.
    The benchmark gives each method the same kind of mask (toy_drag: the shape's own for an object method)."""
    from bench import toy_drag

    assert canvas_label("Inpaint") == canvas_label("inpaint4drag") and "the object to move" in canvas_label("Inpaint")
    for m in ("Instant", "Region", "DragDiffusion", "GoodDrag", "DiffEditor", "DragonDiffusion"):
        assert canvas_label(m) == "Image: paint the area that may change"
    assert {n for n, m in toy_drag.METHODS.items() if m.mask == "object"} == {"inpaint", "move"}
    from models.toy_world import HELDOUT_SEED, make_deform_cases

    case = make_deform_cases("scale", 1, HELDOUT_SEED)[0]
    assert toy_drag.case_mask("inpaint", case) is case.shape.mask and toy_drag.case_mask("default", case) is case.shape.mask
    assert toy_drag.case_mask("instant", case) is case.mask and not np.array_equal(case.mask, case.shape.mask)


def test_add_pair_move_delete():
    pts = apply_edit([], {"op": "add", "x": 10, "y": 20}, SIZE)
    assert pts == [[10, 20]]
    # a dragged pair goes before the handle still waiting for its target: handles stay at even indices
    pts = apply_edit(pts, {"op": "pair", "hx": 30, "hy": 30, "tx": 50, "ty": 31.26}, SIZE)
    assert pts == [[30, 30], [50, 31.3], [10, 20]]
    pts = apply_edit(pts, {"op": "add", "x": 200, "y": -5}, SIZE)  # clamped into the picture
    assert pts[-1] == [95, 0]
    pts = apply_edit(pts, {"op": "move", "i": 1, "x": 60, "y": 40}, SIZE)
    assert pts[1] == [60, 40]
    # deleting a target removes its handle too (else every later handle and target would swap)
    assert apply_edit(pts, {"op": "delete", "i": 1}, SIZE) == [[10, 20], [95, 0]]
    assert apply_edit(pts, {"op": "delete", "i": 2}, SIZE) == [[30, 30], [60, 40]]


def test_a_shift_click_pins_a_point_and_it_is_drawn_apart():
    pts = apply_edit([[10, 20]], {"op": "pin", "x": 40, "y": 30}, SIZE)  # before the handle waiting for its target
    assert pts == [[40, 30], [40, 30], [10, 20]]
    a = np.full((64, 96, 3), 128, np.uint8)
    drawn = overlay.draw_points(a, pts[:2])
    assert tuple(drawn[30, 40]) == overlay.PIN_RGB  # an amber square, no arrow, no red or blue marker
    assert tuple(overlay.draw_points(a, [[40, 30], [60, 30]])[30, 40]) == overlay.HANDLE_RGB


@pytest.mark.parametrize("edit, message", [
    ({"op": "move", "i": 5, "x": 1, "y": 1}, "no point 5"),
    ({"op": "delete", "i": "0"}, "no point"),
    ({"op": "add", "x": "a", "y": 1}, "numbers x, y"),
    ({"op": "add", "x": float("nan"), "y": 1}, "finite"),
    ({"op": "pair", "hx": 1, "hy": 1}, "numbers tx, ty"),
    ({"op": "explode"}, "Unknown point edit"),
])
def test_bad_edits_name_what_is_wrong(edit, message):
    with pytest.raises(EditError, match=message):
        apply_edit([[1, 1], [5, 5]], edit, SIZE)


def test_at_most_max_pairs():
    pts = [[1, 1], [5, 5]] * MAX_POINT_PAIRS
    with pytest.raises(EditError, match=f"At most {MAX_POINT_PAIRS}"):
        apply_edit(pts, {"op": "pair", "hx": 1, "hy": 2, "tx": 3, "ty": 4}, SIZE)


def test_undo_redo_and_a_new_edit_drops_redo():
    s = session_with_image()
    s.edit({"op": "pair", "hx": 10, "hy": 10, "tx": 30, "ty": 10})
    s.edit({"op": "move", "i": 1, "x": 40, "y": 12})
    assert s.points == [[10, 10], [40, 12]]
    s.edit({"op": "undo"})
    assert s.points == [[10, 10], [30, 10]]
    s.edit({"op": "undo"})
    assert s.points == []
    s.edit({"op": "undo"})  # nothing left: no change, no error
    assert s.points == []
    s.edit({"op": "redo"})
    assert s.points == [[10, 10], [30, 10]]
    s.edit({"op": "add", "x": 50, "y": 50})
    s.edit({"op": "redo"})  # the new edit dropped the redo
    assert s.points == [[10, 10], [30, 10], [50, 50]]
    assert s.pairs() == [((10, 10), (30, 10))]


def test_edits_need_a_picture_and_a_new_picture_forgets_points_and_history():
    s = Session()
    with pytest.raises(EditError, match="Upload or generate"):
        s.edit({"op": "add", "x": 1, "y": 1})
    s = session_with_image()
    s.edit({"op": "add", "x": 1, "y": 1})
    s.use_image(Image.new("RGB", (32, 32)))
    assert s.points == [] and s.undo == [] and s.redo == []


def test_view_acknowledges_the_edit_with_the_point_count():
    s = session_with_image()
    s.edit({"op": "pair", "hx": 10, "hy": 10, "tx": 30, "ty": 10})
    s.ack = 7
    html, line = s.view()
    assert 'data-ack="7"' in html and 'data-points="[[10.0, 10.0], [30.0, 10.0]]"' in html
    assert "2 points; edit 7 applied" in line and "1 handle → target pair" in line
    assert 'data-w="96"' in html and html.count("<img") == 1 and "data:image/png;base64," in html
    empty, line = Session().view()
    assert "<img" not in empty and line.startswith("Upload")


# ---- methods -------------------------------------------------------------------------------------------
def test_method_names_any_case_and_unknown_ones_named():
    assert method_name("DiffEditor") == "diffeditor" and method_name("dragondiffusion") == "dragondiffusion"
    assert method_name(None) == "dragdiffusion"  # API clients naming no method get what they always got
    assert method_name("INSTANT") == method_name("fastdrag") == "instant"
    with pytest.raises(EditError, match="Unknown method 'magic'"):
        method_name("magic")
    assert all(drag_methods.COSTS[label] for label in drag_methods.METHODS)  # every method says what it costs


def test_gooddrag_takes_its_values_where_the_sliders_were_left_alone(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", SIZE, (90, 120, 150)).save(path)
    key = next(k for k in GOODDRAG if k in drag_methods.FIELDS)
    untouched = {k: spec.default for k, spec in drag_methods.FIELDS.items()}
    req = drag_methods.drag_request(str(path), None, "[[20, 30], [40, 30]]", "", untouched | {"method": "gooddrag"})
    assert getattr(req, key) == GOODDRAG[key]
    moved = untouched | {key: drag_methods.FIELDS[key].lo, "method": "gooddrag"}
    req = drag_methods.drag_request(str(path), None, "[[20, 30], [40, 30]]", "", moved)
    assert getattr(req, key) == drag_methods.FIELDS[key].lo


def test_drag_request_builds_each_method(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", SIZE, (90, 120, 150)).save(path)
    pts = "[[20, 30], [40, 30]]"
    assert isinstance(drag_methods.drag_request(str(path), None, pts, "", {"method": "DragDiffusion"}), DragRequest)
    guided = drag_methods.drag_request(str(path), None, pts, "", {"method": "diffeditor", "guided_w_edit": 5.0})
    assert guided.method == "diffeditor" and guided.w_edit == 5.0
    req = drag_methods.drag_request(str(path), None, pts, "", {"method": "Instant", "instant_n_steps": 4})
    assert isinstance(req, InstantDragRequest) and req.n_steps == 4
    req = drag_methods.drag_request(str(path), None, pts, "", {"method": "regiondrag", "region_radius": 6.0})
    assert isinstance(req, RegionDragRequest) and req.radius == 6.0


# ---- live preview --------------------------------------------------------------------------------------
def test_live_preview_moves_the_content_and_skips_a_state_already_shown():
    a = np.full((64, 96, 3), 200, np.uint8)
    a[20:40, 15:30] = (220, 40, 40)
    s = Session()
    s.use_image(Image.fromarray(a))
    img, info = drag_tab.live_preview(s, True)
    assert "add a handle" in info
    s.edit({"op": "pair", "hx": 22, "hy": 30, "tx": 42, "ty": 30})
    t0 = time.perf_counter()
    img, info = drag_tab.live_preview(s, True)
    assert time.perf_counter() - t0 < 0.5 and "1 pair" in info
    f = s.zoom
    assert img.shape == (64 * f, 96 * f, 3)
    small = img[::f, ::f]
    assert tuple(small[30, 42]) == (220, 40, 40), "the handle's red must have reached the target"
    assert drag_tab.live_preview(s, True)[0] is not img  # the same state again: skipped (gr.skip())
    assert not isinstance(drag_tab.live_preview(s, True)[0], np.ndarray)
    off, info = drag_tab.live_preview(s, False)
    assert off is None and "off" in info


# ---- feedback ------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_live_progress_time_left_per_phase_and_finished_phases():
    clock = FakeClock()
    live = LiveProgress(clock=clock)
    live("lora", 0.0, "LoRA step 1/10")
    clock.t = 2.0
    live("lora", 0.5, "LoRA step 5/10")
    snap = live.snapshot()
    assert snap.eta_s == pytest.approx(2.0) and "~2.0 s left in this phase" in snap.status
    clock.t = 4.0
    live("drag", 0.01, "step 1/40")  # too early to guess
    snap = live.snapshot()
    assert snap.eta_s is None and snap.done == (("lora", 4.0),) and "done: lora 4.0 s" in snap.status


def test_follow_streams_trail_and_previews_then_returns_the_result():
    step = threading.Event()

    def engine(cb):
        for i in range(3):
            cb("drag", i / 3, f"step {i + 1}/3")
            cb.trail([(10 + i, 20.0)])
            step.wait(0.05)
        cb.preview(2, Image.new("RGB", (8, 8)))
        step.wait(0.05)
        return "result"

    live = LiveProgress()
    snaps = list(live.follow(engine, poll_s=0.01))
    assert live.result == "result"
    assert snaps and any(s.new_trail for s in snaps)
    assert snaps[-1].trail[-1] == ((12.0, 20.0),) or live.snapshot().trail[-1] == ((12.0, 20.0),)
    assert live.snapshot().previews_seen == 1 and live.snapshot().preview_step == 2


def test_follow_reraises_engine_errors_and_cancels_when_abandoned():
    def broken(cb):
        raise EditCancelled("Cancelled.")

    with pytest.raises(EditCancelled):
        list(LiveProgress().follow(broken, poll_s=0.01))

    cancel = threading.Event()

    def slow(cb):
        while not cancel.is_set():
            cb("drag", 0.5, "working")
            time.sleep(0.01)
        raise EditCancelled("Cancelled.")

    stream = LiveProgress().follow(slow, cancel=cancel, poll_s=0.01)
    next(stream)
    stream.close()  # the browser went away
    assert cancel.is_set()


def test_draw_trail_marks_the_path():
    rgb = np.zeros((64, 96, 3), np.uint8)
    out = overlay.draw_trail(rgb, [[(10, 10)], [(30, 10)], [(50, 10)]])
    assert tuple(out[10, 50]) == overlay.TRAIL_RGB and (out[10, 20] > 0).any()
    assert np.array_equal(overlay.draw_trail(rgb, []), rgb) and not rgb.any()


# ---- the /drag API: the new methods by name, any case ----------------------------------------------------
from tests.test_ui_client import app_url, client, drag, image_path


def test_api_runs_instant_and_gooddrag_by_name_in_any_case(client, image_path):
    from gradio_client.exceptions import AppError

    from editing.images import read_recipe

    (_, after), download, details, _, status = drag(client, image_path, method="INSTANT", instant_n_steps=4)
    assert Image.open(after).size == (96, 64) and "Done" in status
    assert read_recipe(download)["task"] == "instant" and "lora" not in details["timings_s"]
    (_, after), download, _, _, status = drag(client, image_path, method="Region", region_radius=8.0,
                                              region_n_steps=4)
    assert Image.open(after).size == (96, 64) and read_recipe(download)["task"] == "region"
    (_, after), download, details, _, _ = drag(client, image_path, method="gooddrag")
    params = read_recipe(download)["params"]
    untouched = next(k for k in GOODDRAG if k not in ("lora_steps", "max_steps", "n_inference_steps"))
    assert params[untouched] == GOODDRAG[untouched] and params["max_steps"] == 3  # a set value wins
    with pytest.raises(AppError, match="Unknown method 'magic'"):
        drag(client, image_path, method="magic")
