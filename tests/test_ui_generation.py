"""Sketch and Generate tabs in-process: the /sketch and /text_to_image endpoints through gradio_client, their
error messages, and one headless-Chromium test that draws on the Sketch canvas and gets an image."""
import json
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from editing.images import read_recipe
from tests.serving import free_port

FAST = {"n_inference_steps": 2}
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def ed():
    from editing.engine import Editor

    e = Editor("tiny", resolution=64)
    e.load()
    return e


@pytest.fixture(scope="module")
def app_url(ed):
    from ui import build_demo

    demo = build_demo(ed, settings={"n_inference_steps": 2, "width": 64, "height": 64}).queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen-ui")
    drawing = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(drawing).ellipse((10, 8, 40, 38), outline=(200, 30, 30), width=3)
    drawing.save(d / "drawing.png")
    Image.new("RGB", (64, 48), "white").save(d / "blank.png")
    edges = Image.new("RGB", (80, 80), "black")
    ImageDraw.Draw(edges).rectangle((10, 10, 60, 60), outline="white", width=2)
    edges.save(d / "edges.png")
    return {k: str(d / f"{k}.png") for k in ("drawing", "blank", "edges")}


def sketch(client, path, **settings):
    return client.predict(handle_file(path), None, "a red ball", "", "", **(FAST | settings), api_name="/sketch")


def generate(client, units=(), files=(), prompt="a cat", **settings):
    return client.predict(prompt, "", json.dumps(list(units)), [handle_file(f) for f in files],
                          **(FAST | {"width": 64, "height": 64} | settings), api_name="/text_to_image")


def test_sketch_endpoint_returns_images_with_recipes(client, files):
    gallery, download, details, status = sketch(client, files["drawing"], strength=1.0, batch=2, seed=3)
    assert len(gallery) == 2 and "Done in" in status and "Drag-ready" in status
    assert Image.open(download).size == (64, 48)
    assert read_recipe(download)["task"] == "sketch" and details["drag_ready"] is True


def test_generate_endpoint_with_units(client, files):
    units = [{"kind": "controlnet", "model": "tiny", "image": 0, "preprocessor": "canny", "scale": 0.8, "end": 0.9},
             {"kind": "t2i_adapter", "model": "tiny", "image": 1, "preprocessor": "palette"},
             {"kind": "ip_adapter", "model": "tiny", "images": [1], "scale": 0.5}]
    _, download, details, status = generate(client, units, [files["edges"], files["drawing"]])
    assert Image.open(download).size == (64, 64) and "Drag-ready" in status
    assert set(details["other_calls"]) == {"controlnet", "t2i_adapter", "image_encoder"}
    rec = read_recipe(download)
    assert rec["params"]["controlnets"][0]["preprocessor"] == "canny" and rec["params"]["ip_adapter"]["scale"] == 0.5


@pytest.mark.parametrize("call, match", [
    (lambda c, f: sketch(c, f["blank"]), "The sketch is blank"),
    (lambda c, f: sketch(c, f["drawing"], batch=99), r"batch=99 is outside \[1, 8\]"),  # ui.fields.checked
    (lambda c, f: generate(c, [{"kind": "controlnet", "image": 0, "start": 0.8, "end": 0.2}], [f["edges"]]),
     "must be before its end"),
    (lambda c, f: generate(c, [{"kind": "controlnet", "image": 3}], [f["edges"]]), "not an index"),
    (lambda c, f: generate(c, [{"kind": "controlnet", "model": "nobody/none", "image": 0}], [f["edges"]]),
     "Unknown ControlNet 'nobody/none'. Choose one of: tiny"),
    (lambda c, f: generate(c, [{"kind": "lora"}]), "kind must be one of"),
])
def test_bad_input_is_explained_and_the_app_keeps_serving(client, files, call, match):
    with pytest.raises(AppError, match=match):
        call(client, files)
    assert "Done in" in generate(client)[3]


def test_nan_and_inf_reaching_the_handlers_are_explained(ed, files):
    """gradio_client cannot send NaN (JSON has none); raw HTTP can, so the handlers are called directly."""
    import gradio as gr

    from ui.generate_tab import GenerateHandlers
    from ui.sketch_tab import Results, SketchHandlers

    # The handlers stream (status lines while the engine works, then the result): run them to their end.
    with pytest.raises(gr.Error, match="guidance_scale must be a finite number"):
        list(GenerateHandlers(ed).generate("x", "", "[]", [], Results(), guidance_scale=float("nan"), **FAST))
    with pytest.raises(gr.Error, match="strength must be a finite number"):
        list(SketchHandlers(ed).sketch(files["drawing"], None, "x", "", "", Results(), strength=float("inf"), **FAST))
    *_, (gallery, _, _, status) = GenerateHandlers(ed).generate("x", "", "[]", [], Results(), width=64, height=64,
                                                                **FAST)
    assert len(gallery) == 1 and "Done in" in status


# ---- browser -------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.mark.browser
@pytest.mark.slow  # ~35 s in a browser; the sketch API tests stay in the default run
def test_draw_on_the_sketch_canvas_and_get_an_image(app_url, files, request):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        condition_path = files["edges"]
        try:
            with page.expect_response(lambda r: "/heartbeat/" in r.url):
                page.goto(app_url)
            page.get_by_role("tab", name="Sketch", exact=True).click()
            canvas = page.locator("#sketch-canvas canvas").first
            canvas.wait_for(state="visible")
            page.click("#sketch-run")  # nothing drawn yet
            page.locator(".toast-wrap").get_by_text("The sketch is blank").first.wait_for(state="visible")
            page.click("#sketch-canvas button[aria-label=Brush]")  # a blank canvas starts with no tool
            page.wait_for_timeout(500)
            box = canvas.bounding_box()
            cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(cx - 60, cy - 20)
            page.mouse.down()
            for i in range(1, 13):
                page.mouse.move(cx - 60 + 10 * i, cy - 20 + 4 * (i % 3))
            page.mouse.up()
            page.wait_for_function(  # the server has the strokes (its acknowledgement line), never a wait for time
                "() => /Sketch: [1-9]\\d* px of strokes/.test(document.querySelector('#sketch-info').innerText)")
            page.fill("#sketch-prompt textarea", "a red ball")
            page.click("#sketch-run")
            page.wait_for_function("() => document.querySelector('#sketch-status').innerText.includes('Done')",
                                   timeout=300_000)
            assert page.locator("#sketch-gallery img").count() >= 1
            page.click("#sketch-to-drag")  # the result opens in the Drag tab, drag-ready
            page.wait_for_selector("#points img", timeout=60_000)

            # Generate tab (same page: the tab bar tells the truth, tests/test_ui_tabs.py): one ControlNet unit
            # with an uploaded condition image, through the accordion.
            page.get_by_role("tab", name="Generate", exact=True).click()
            page.click("#gen-controlnet-0 button")
            page.locator("#gen-controlnet-0-on input").check()
            page.locator("#gen-controlnet-0 input[type=file]").first.set_input_files(condition_path)
            # The upload is on the server once the image shows from the server's file URL.
            page.wait_for_selector("#gen-controlnet-0 img[src*='/file=']", timeout=60_000)
            page.fill("#gen-prompt textarea", "a cat")
            page.click("#gen-run")
            page.wait_for_function("() => document.querySelector('#gen-status').innerText.includes('Done')",
                                   timeout=300_000)
            assert page.locator("#gen-gallery img").count() >= 1
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_unit_accordions_become_units_json(ed, files):
    import gradio as gr

    from ui.generate_tab import _unit_widgets, parse_units

    with gr.Blocks():
        cn = _unit_widgets(ed, "controlnet", "ControlNet unit 1", 0)
        ip = _unit_widgets(ed, "ip_adapter", "IP-Adapter", 0)
    data = {cn.enabled: True, cn.model: "tiny", cn.image: files["edges"], cn.preprocessor: "canny", cn.low: 50,
            cn.high: 150, cn.scale: 0.7, cn.start: 0.0, cn.end: 0.8, cn.guess: False,
            ip.enabled: True, ip.model: "tiny", ip.image: files["drawing"], ip.scale: 0.3}
    paths: list[str] = []
    units = [cn.unit(data, paths), ip.unit(data, paths)]
    assert units[0]["options"] == {"low_threshold": 50, "high_threshold": 150} and units[1]["images"] == [1]
    cns, ads, ipu = parse_units(json.dumps(units), paths)
    assert cns[0].end == 0.8 and not ads and ipu.scale == 0.3
    data[cn.image] = None
    with pytest.raises(Exception, match="has no image"):
        cn.unit(data, [])
    data[cn.enabled] = False
    assert cn.unit(data, []) is None


def test_split_canvas_blank_photo_and_upload_only():
    import numpy as np

    from ui.sketch_tab import split_canvas

    strokes = np.zeros((40, 50, 4), np.uint8)
    strokes[20, 5:45] = (255, 0, 0, 255)
    transparent = np.zeros((40, 50, 4), np.uint8)
    sketch, photo = split_canvas({"background": transparent, "layers": [strokes], "composite": None})
    assert photo is None and sketch.mode == "RGBA" and sketch.getpixel((10, 20)) == (255, 0, 0, 255)
    white = np.full((40, 50, 4), 255, np.uint8)
    assert split_canvas({"background": white, "layers": [strokes]})[1] is None  # a white canvas is blank too
    grey = np.full((40, 50, 4), 128, np.uint8)
    grey[..., 3] = 255
    sketch, photo = split_canvas({"background": grey, "layers": [strokes]})
    assert photo.getpixel((0, 0)) == (128, 128, 128) and sketch.mode == "RGBA"
    sketch, photo = split_canvas({"background": grey, "layers": [np.zeros_like(strokes)]})
    assert photo is None and sketch.mode == "RGB"  # an upload without strokes is a finished drawing
    assert split_canvas(None) == (None, None)


def test_generation_streams_the_sampling_preview_into_the_gallery(ed):
    """While the engine samples, the gallery shows the kept results plus the newest x̂₀ preview (not kept), and
    the final yield is the result alone. The engine is held at its first preview until the handler has shown
    it, so the test waits for the handler's output, never for time."""
    import threading

    from editing.generation import GenerateRequest
    from ui.feedback import stream_to_gallery
    from ui.history import Results

    shown = threading.Event()

    def edit(req, progress, cancel, loras):
        class HoldAtFirstPreview:  # the engine's progress, passed through to the handler's LiveProgress
            def __call__(self, *args):
                progress(*args)

            def preview(self, step, image):
                progress.preview(step, image)
                shown.wait(120)

        return ed.edit(req, progress=HoldAtFirstPreview(), cancel=cancel, loras=loras)

    results = Results()
    stream = stream_to_gallery(edit, GenerateRequest("x", width=64, height=64, n_inference_steps=6), results,
                               None, None, ())
    captions = []
    try:
        while True:
            gallery, _, _, status = next(stream)
            if isinstance(gallery, list):
                captions.append([c for _, c in gallery])
                shown.set()
    except StopIteration as stop:
        result = stop.value
    assert captions and "preview at step" in captions[0][-1] and "(not kept)" in captions[0][-1]
    assert result is not None and result.images and len(results.gallery()) == 0  # the preview was never kept
