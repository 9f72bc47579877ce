"""Click to select (ui/click_mask.py): a click on a canvas's picture puts the object's mask on its mask layer,
Shift adds a part, Alt removes one, the brush's work survives later clicks, a refused click changes nothing; the
``--segmenter`` choice; and ``/mask_from_click`` through gradio_client on the app as app.py serves it.

The real classical segmenter on toy scenes (models/toy_world.py) and a tiny random-weight SamModel: no mocks."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from models import toy_world as tw
from models.errors import EditError
from ui import click_mask
from ui.click_mask import ClickState, apply_click, clear_clicks, on_canvas, on_click, parse_clicks, undo_click
from ui.common import canvas_image
from ui.examples import canvas_value

RED_AT, GREEN_AT = (16, 16), (46, 44)


@pytest.fixture(autouse=True)
def classical():
    """Every test starts (and leaves the module) on the app's default segmenter."""
    click_mask.configure("classical")
    yield
    click_mask.configure("classical")


@pytest.fixture(scope="module")
def two_shapes():
    """A red disk and a green square on black, and their true masks."""
    scene = tw.render([tw.Shape("disk", "red", "medium", (16.0, 16.0), 9.0),
                       tw.Shape("square", "green", "medium", (46.0, 44.0), 9.0)], "black")
    return scene.image, scene.shapes[0].mask, scene.shapes[1].mask


@pytest.fixture(scope="module")
def bar():
    """One object of two colours on black: yellow [54:62, 4:24] and cyan [54:62, 24:34]."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[54:62, 4:24] = tw.COLOURS["yellow"]
    a[54:62, 24:34] = tw.COLOURS["cyan"]
    return Image.fromarray(a)


def mask_of(value) -> np.ndarray:
    mask = canvas_image(value)[1]
    return np.zeros((64, 64), bool) if mask is None else mask


def test_a_click_puts_the_objects_mask_on_the_canvas(two_shapes):
    image, red, _ = two_shapes
    state, value = ClickState(), canvas_value(image, None)
    new, status = apply_click(state, value, *RED_AT)
    assert np.array_equal(mask_of(new), red)
    assert np.array_equal(np.asarray(new["background"])[..., :3], np.asarray(image))  # the picture is kept
    assert "classical segmenter" in status and "1 object" in status and "\n" not in status


def test_shift_adds_a_part_and_alt_removes_one(two_shapes, bar):
    image, red, green = two_shapes
    state = ClickState()
    value, _ = apply_click(state, canvas_value(image, None), *RED_AT)
    value, status = apply_click(state, value, *GREEN_AT, "add-part")
    assert np.array_equal(mask_of(value), red | green) and "2 clicks" in status and "add a part" in status
    # one object of two colours: a plain click takes all of it, an Alt+click takes the cyan part off
    state = ClickState()
    value, _ = apply_click(state, canvas_value(bar, None), 10, 58)
    assert mask_of(value)[54:62, 4:34].all() and mask_of(value).sum() == 240
    value, status = apply_click(state, value, 30, 58, "remove")
    assert mask_of(value)[54:62, 4:24].all() and mask_of(value).sum() == 160 and "remove a part" in status


def test_the_script_sends_modifier_modes_and_the_radio_decides_a_plain_click(two_shapes):
    image, red, green = two_shapes
    state, value = ClickState(), canvas_value(image, None)
    new, html, status = on_click(state, value, "add", gr.EventData(None, {"x": 16, "y": 16, "mode": "", "seq": 1}))
    assert np.array_equal(mask_of(new), red) and 'data-ack="1"' in html and 'data-clicks="1"' in html
    new, html, status = on_click(state, new, "add-part", gr.EventData(None, {"x": 46, "y": 44, "mode": "", "seq": 2}))
    assert np.array_equal(mask_of(new), red | green) and "add a part" in status and 'data-ack="2"' in html
    new, html, status = on_click(state, new, "add", gr.EventData(None, {"x": 46, "y": 44, "mode": "remove",
                                                                         "seq": 3}))
    # the square's colour comes off; its anti-aliased rim (another colour) is left to the brush
    assert (mask_of(new) & red).sum() == red.sum() and (mask_of(new) & green).sum() < 0.3 * green.sum()
    assert "remove a part" in status


def test_a_background_click_is_one_line_and_keeps_the_mask(two_shapes):
    image, red, _ = two_shapes
    state = ClickState()
    value, _ = apply_click(state, canvas_value(image, None), *RED_AT)
    same, status = apply_click(state, value, 40, 10)  # black background
    assert isinstance(same, type(gr.skip())) and "No object found here (40, 10)" in status
    assert "mask is unchanged" in status and "\n" not in status
    assert len(state.clicks) == 1  # the refused click is not kept: the next one builds on the first
    _, html, status = on_click(state, value, "add", gr.EventData(None, {"x": 70, "y": 10, "mode": "", "seq": 5}))
    assert "outside the picture" in status and 'data-ack="5"' in html
    _, html, status = on_click(state, value, "add", gr.EventData(None, {"x": "left", "y": 1, "seq": 6}))
    assert status == "A click needs numbers x, y." and 'data-ack="6"' in html
    _, status = apply_click(ClickState(), canvas_value(image, None), *RED_AT, "remove")
    assert "no object is selected yet" in status and "Nothing is selected" in status
    new, status = apply_click(state, value, *GREEN_AT)
    assert mask_of(new).sum() > red.sum() and "2 objects" in status


def test_the_brush_work_survives_clicks_and_clear_gives_back_the_painted_mask(two_shapes):
    image, red, green = two_shapes
    painted = np.zeros((64, 64), bool)
    painted[0:4, 0:64] = True  # a stroke made before any click
    state = ClickState()
    value = canvas_value(image, painted)
    on_canvas(state, value)
    value, _ = apply_click(state, value, *RED_AT)
    assert np.array_equal(mask_of(value), red)  # the first click replaces the rough paint
    # the brush corrects the click's mask: a stroke added, a bit of the disk erased
    corrected = mask_of(value).copy()
    corrected[60:64, 0:10] = True
    corrected[16, 16] = False
    value = canvas_value(image, corrected)
    on_canvas(state, value)
    value, _ = apply_click(state, value, *GREEN_AT)  # the next click keeps both corrections
    assert np.array_equal(mask_of(value), corrected | green)
    value, _, status = undo_click(state, value)
    assert np.array_equal(mask_of(value), corrected) and "undone" in status
    value, _, status = clear_clicks(state, value)
    assert np.array_equal(mask_of(value), painted) and "cleared" in status.lower()
    _, _, status = clear_clicks(state, value)
    assert status == "No clicks to clear."


def test_a_new_picture_starts_the_clicks_over(two_shapes, bar):
    image, *_ = two_shapes
    state = ClickState()
    value, _ = apply_click(state, canvas_value(image, None), *RED_AT)
    html, status = on_canvas(state, canvas_value(bar, None))
    assert state.clicks == [] and status.startswith("Click on an object") and 'data-clicks="0"' in html
    html, status = on_canvas(state, None)
    assert "Upload a picture" in html and "Upload a picture" in status
    assert apply_click(state, None, 1, 1)[1].startswith("Upload a picture")


@pytest.mark.parametrize("text, want", [
    ("12,30", [(12, 30, "add")]),
    ("12,30;40.5,8:add-part; 3,4:remove", [(12, 30, "add"), (40.5, 8, "add-part"), (3, 4, "remove")]),
    ("+12,30;-3,4", [(12, 30, "add-part"), (3, 4, "remove")]),
])
def test_api_clicks_text(text, want):
    assert [(c.x, c.y, c.mode) for c in parse_clicks(text)] == want


@pytest.mark.parametrize("text, words", [("", "No clicks"), (None, "No clicks"), ("12", "must be 'X,Y'"),
                                         ("1,2:grow", "must be one of add, add-part, remove")])
def test_api_clicks_text_refused_in_one_line(text, words):
    with pytest.raises(EditError, match=words):
        parse_clicks(text)


def test_segmenter_spec_that_fails_is_one_line_and_classical_answers(two_shapes):
    image, red, _ = two_shapes
    note = click_mask.configure("no/such/folder")
    assert "--segmenter no/such/folder" in note and "classical segmenter answers instead" in note
    assert "\n" not in note and click_mask.queue_kwargs()["concurrency_id"] == "clicks"
    value, status = apply_click(ClickState(), canvas_value(image, None), *RED_AT)
    assert np.array_equal(mask_of(value), red) and "--segmenter no/such/folder" in status


def test_a_sam_segmenter_answers_when_configured(tmp_path, two_shapes):
    from models.tiny import tiny_sam

    model, processor = tiny_sam()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert click_mask.configure(str(tmp_path)) == ""
    image, *_ = two_shapes
    value, status = apply_click(ClickState(), canvas_value(image, None), *RED_AT)
    # random weights: the mask means nothing, but it comes back, at the picture's size, named by its segmenter
    if isinstance(value, dict):
        assert f"sam:{tmp_path.name}" in status and mask_of(value).shape == (64, 64)
    else:
        assert "empty mask" in status


# ---- /mask_from_click on the served app --------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gradio_client import Client

    from editing.engine import Editor
    from tests.test_hostile import served_app

    editor = Editor("tiny")  # never loaded: the endpoint needs no model
    with served_app(editor, tmp_path_factory.mktemp("click-outputs")) as (url, *_):
        yield Client(url, verbose=False)


def test_mask_from_click_endpoint(client, two_shapes, bar, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image, red, green = two_shapes
    image.save(tmp_path / "two.png")
    bar.save(tmp_path / "bar.png")
    png, notice = client.predict(handle_file(str(tmp_path / "two.png")), "16,16;46,44:add-part",
                                 api_name="/mask_from_click")
    assert np.array_equal(np.asarray(Image.open(png).convert("L")) > 127, red | green)
    assert "by the classical segmenter" in notice
    png, _ = client.predict(handle_file(str(tmp_path / "bar.png")), "10,58;30,58:remove", api_name="/mask_from_click")
    assert (np.asarray(Image.open(png).convert("L")) > 127).sum() == 160
    for clicks, words in (("40,10", "no object found here"), ("500,5", "outside the picture"),
                          ("a,b", "must be 'X,Y'"), ("", "No clicks")):
        with pytest.raises(AppError, match=words) as e:
            client.predict(handle_file(str(tmp_path / "two.png")), clicks, api_name="/mask_from_click")
        assert "\n" not in str(e.value)
    with pytest.raises(AppError, match="No image"):
        client.predict(None, "16,16", api_name="/mask_from_click")
    png, _ = client.predict(handle_file(str(tmp_path / "two.png")), "46,44", api_name="/mask_from_click")
    assert np.array_equal(np.asarray(Image.open(png).convert("L")) > 127, green)  # and it still works
