"""The Gradio app in-process with the tiny model, driven through gradio_client (the public API)."""
import json

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from editing.images import read_recipe

FAST = dict(lora_steps=2, n_inference_steps=4, max_steps=3)  # inversion_strength 0.7 × 4 -> 3 steps
POINTS = "[[20, 30], [40, 30]]"  # handle, target


@pytest.fixture(scope="module")
def app_url(editor, tmp_path_factory):
    """The app as app.py serves it (checked numbers, outputs folder, bounded queue)."""
    from tests.test_hostile import served_app

    with served_app(editor, tmp_path_factory.mktemp("ui-client-outputs"), "--max-queued-per-session", "0") as (url, *_):
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    yy, xx = np.mgrid[0:64, 0:96]
    a = np.stack([xx * 2, yy * 3, (xx + yy)], -1).astype(np.uint8)
    a[20:40, 15:30] = (220, 40, 40)  # a red block to drag
    path = tmp_path_factory.mktemp("ui") / "in.png"
    Image.fromarray(a).save(path)
    return str(path)


def drag(client, image, points=POINTS, mask=None, **settings):
    return client.predict(handle_file(image) if image else None, handle_file(mask) if mask else None, points, "",
                          **(FAST | settings), api_name="/drag")


def test_drag_returns_result_of_input_size_with_recipe(client, image_path):
    (before, after), download, details, gallery, status = drag(client, image_path)
    assert Image.open(after).size == (96, 64)
    assert Image.open(before).size == (96, 64)
    recipe = read_recipe(download)
    assert recipe["task"] == "dragdiffusion" and recipe["params"]["points"] == [[[20.0, 30.0], [40.0, 30.0]]]
    assert details["mask"] is False and "drag" in details["timings_s"]
    assert len(details["final_points"]) == 1
    assert gallery and "Done in" in status


def test_drag_with_mask_file(client, image_path, tmp_path):
    mask = np.zeros((64, 96), np.uint8)
    mask[10:50, 10:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (_, after), _, details, _, status = drag(client, image_path, mask=str(tmp_path / "mask.png"))
    assert Image.open(after).size == (96, 64)
    assert details["mask"] is True and "painted area" in status


def _corrupt(tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return str(p)


@pytest.mark.parametrize("case, expected", [
    (dict(points="[[20, 30]]"), "every handle needs a target"),
    (dict(points="[]"), "No points"),
    (dict(image=None), "No image"),
    (dict(points="[[NaN, 30], [40, 30]]"), "not a finite position"),
    (dict(points="[[20, 30], [400, 30]]"), "outside the 96×64 image"),
    (dict(points="[[20, 30], [40, 30"), "Points must be JSON"),
    (dict(image="corrupt"), "not a readable image"),
    (dict(inversion_strength=0.1), "at least 1 step"),
])
def test_bad_request_gives_clear_error_and_next_request_works(client, image_path, tmp_path, case, expected):
    case = dict(case)
    image = case.pop("image", image_path)
    image = _corrupt(tmp_path) if image == "corrupt" else image
    with pytest.raises(AppError, match=expected):
        drag(client, image, **case)
    (_, after), *_ = drag(client, image_path)
    assert Image.open(after).size == (96, 64)


def test_generated_image_is_drag_ready(client):
    canvas, *_ = client.predict("a red ball", 7, FAST["n_inference_steps"], api_name="/generate")
    generated = canvas["background"]
    w, h = Image.open(generated).size
    (_, after), _, details, *_ = drag(client, generated, points=json.dumps([[w // 3, h // 2], [w // 2, h // 2]]))
    assert Image.open(after).size == (w, h)
    assert "lora" not in details["timings_s"] and "inversion" not in details["timings_s"]


def test_trained_identity_lora_is_reused_by_drag(client, image_path):
    prompt = "a red block"  # a prompt no other test uses, so the LoRA is not cached yet
    status = client.predict(handle_file(image_path), prompt, lora_steps=2, api_name="/train_lora")
    assert "Identity LoRA ready" in status
    _, _, details, *_ = client.predict(handle_file(image_path), None, POINTS, prompt, **FAST, api_name="/drag")
    assert "lora" not in details["timings_s"]


def test_train_lora_without_image_is_a_clear_error(client):
    with pytest.raises(AppError, match="No image"):
        client.predict(None, "", api_name="/train_lora")


# ---- guided editing: Drag's method switch, Move & Resize, Paste, Appearance --------------------------------
GUIDED = dict(steps=4, seed=1)


@pytest.fixture(scope="module")
def object_mask(tmp_path_factory):
    m = np.zeros((64, 96), np.uint8)
    m[18:42, 13:32] = 255  # around the red block
    path = tmp_path_factory.mktemp("ui-masks") / "object.png"
    Image.fromarray(m).save(path)
    return str(path)


def test_drag_method_switch_runs_diffeditor(client, image_path):
    (_, after), download, details, _, status = client.predict(
        handle_file(image_path), None, POINTS, "", method="DiffEditor", n_inference_steps=4, api_name="/drag")
    assert Image.open(after).size == (96, 64)
    assert read_recipe(download)["task"] == "guided_drag" and "lora" not in details["timings_s"]


def test_move_paste_appearance_endpoints(client, image_path, object_mask):
    img, mask = handle_file(image_path), handle_file(object_mask)
    (_, after), download, details, gallery, status = client.predict(
        img, mask, 20, 4, 1.2, "", "DiffEditor", **GUIDED, api_name="/move")
    assert Image.open(after).size == (96, 64) and read_recipe(download)["task"] == "move"
    assert details["memory_bank_mb"] > 0 and "Done in" in status
    (_, after), download, *_ = client.predict(img, img, mask, 30, 0, 0.8, "", "DragonDiffusion", **GUIDED,
                                              api_name="/paste")
    assert read_recipe(download)["task"] == "paste"
    (_, after), download, _, gallery, _ = client.predict(img, mask, img, mask, "", "DiffEditor", **GUIDED,
                                                         api_name="/appearance")
    assert read_recipe(download)["task"] == "appearance"
    assert len(gallery) == 3  # one shared history


@pytest.mark.parametrize("api, args, expected", [
    ("/move", lambda i, m: (i, None, 5, 0, 1.0, "", "DiffEditor"), "paint the object"),
    ("/move", lambda i, m: (i, m, 5, 0, 0.0, "", "DiffEditor"), r"Scale=0 is outside \[0.2, "),
    ("/move", lambda i, m: (i, m, 500, 0, 1.0, "", "DiffEditor"), "leave the image"),
    ("/move", lambda i, m: (i, m, 5, 0, 1.0, "", "Magic"), "Magic"),
    ("/paste", lambda i, m: (i, i, None, 5, 0, 1.0, "", "DiffEditor"), "needs a mask"),
    ("/paste", lambda i, m: (i, None, m, 5, 0, 1.0, "", "DiffEditor"), "No reference"),
    ("/appearance", lambda i, m: (i, m, i, None, "", "DiffEditor"), "needs a mask"),
])
def test_guided_bad_input_then_next_request_works(client, image_path, object_mask, api, args, expected):
    with pytest.raises(AppError, match=expected):
        client.predict(*args(handle_file(image_path), handle_file(object_mask)), **GUIDED, api_name=api)
    (_, after), *_ = client.predict(handle_file(image_path), handle_file(object_mask), 10, 0, 1.0, "", "DiffEditor",
                                    **GUIDED, api_name="/move")
    assert Image.open(after).size == (96, 64)
