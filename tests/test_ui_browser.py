"""The real app in headless Chromium: upload, paint a mask, click points, run; and the error paths.

Needs Debian's chromium at /usr/bin/chromium (skipped otherwise). On failure a full-page screenshot
is saved under tests/artifacts/.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serving import launch

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api")
PlaywrightTimeout = sync_api.TimeoutError

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts"
FAST = dict(lora_steps=2, n_inference_steps=4, max_steps=3)
RUN_TIMEOUT_MS = 300_000  # a tiny-model drag takes seconds, but the CI machine has 2 busy cores


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app_url(editor, browser):
    from ui import build_demo

    demo = build_demo(editor, settings=FAST).queue(default_concurrency_limit=1)
    yield launch(demo)
    demo.close()


@pytest.fixture
def page(browser, app_url, request):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    open_app(page, app_url)
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # this test failed: keep what the page showed
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    page.close()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    yy, xx = np.mgrid[0:64, 0:96]
    a = np.stack([xx * 2, yy * 3, (xx + yy)], -1).astype(np.uint8)
    a[20:40, 15:30] = (220, 40, 40)
    path = tmp_path_factory.mktemp("browser") / "in.png"
    Image.fromarray(a).save(path)
    return str(path)


def open_app(page, url):
    """Load the app and wait until it is live: an upload made before the frontend has connected
    (its heartbeat) can be dropped without any event."""
    with page.expect_response(lambda r: "/heartbeat/" in r.url):
        page.goto(url)
    page.wait_for_selector("#canvas input[type=file]", state="attached")


def upload(page, path, attempts: int = 3):
    """Upload into the canvas. Rarely (busy machine, right after page load) the canvas shows the file
    but sends no event to the server; then start over with a fresh page."""
    for attempt in range(1, attempts + 1):
        page.locator("#canvas input[type=file]").set_input_files(path)
        try:
            page.wait_for_selector("#points img", timeout=30_000)
            wait_preview_settled(page)  # the canvas may send the same picture with a second event
            return
        except PlaywrightTimeout:
            if attempt == attempts:
                raise
            open_app(page, page.url)


def wait_preview_settled(page, quiet_ms: int = 1500):
    """A stroke can update the preview more than once; click only once it has stopped changing."""
    src, same_since = None, 0
    while same_since < quiet_ms:
        page.wait_for_timeout(250)
        now = page.get_attribute("#points img", "src")
        same_since = same_since + 250 if now == src else 0
        src = now


def click_point(page, fx: float, fy: float, expect: str):
    """Click at a fraction of the points image and wait for the points line to say `expect`."""
    img = page.locator("#points img")
    box = img.bounding_box()
    img.click(position={"x": box["width"] * fx, "y": box["height"] * fy})
    page.wait_for_function("t => document.querySelector('#points-info').innerText.includes(t)", arg=expect)


def run_and_wait(page) -> str:
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')",
                           timeout=RUN_TIMEOUT_MS)
    return page.inner_text("#status")


def expect_message(page, text: str):
    """Wait for a gr.Warning / gr.Error toast containing `text`."""
    page.locator(".toast-wrap").get_by_text(text).first.wait_for(state="visible", timeout=RUN_TIMEOUT_MS)


def test_upload_paint_click_run(page, image_path):
    upload(page, image_path)
    before = page.get_attribute("#points img", "src")

    # Paint a stroke across the middle of the canvas (the brush is the active tool after an upload).
    box = page.locator("#canvas canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 80, cy)
    page.mouse.down()
    for i in range(1, 17):
        page.mouse.move(cx - 80 + 10 * i, cy + (i % 4))
    page.mouse.up()
    # The preview re-renders with the frozen area dimmed.
    page.wait_for_function("s => document.querySelector('#points img')?.src !== s", arg=before)
    wait_preview_settled(page)

    click_point(page, 0.3, 0.5, "now click its")
    click_point(page, 0.55, 0.5, "1 handle → target pair")
    status = run_and_wait(page)
    assert "Only the painted area could change" in status
    assert page.locator("#result img").count() >= 1
    assert page.locator("#history img").count() == 1

    # Continue from the result: it becomes the working image, with no points.
    page.locator("#history img").first.click()
    page.click("#continue")
    page.wait_for_function("() => document.querySelector('#points-info').innerText.startsWith('Click a handle')")


def test_error_messages_then_app_keeps_serving(page, image_path):
    page.click("#run")  # nothing uploaded yet
    expect_message(page, "No image: upload or generate an image first.")

    upload(page, image_path)
    click_point(page, 0.3, 0.5, "now click its")
    page.click("#run")  # a handle without a target
    expect_message(page, "every handle needs a target")

    click_point(page, 0.6, 0.5, "1 handle → target pair")
    status = run_and_wait(page)
    assert "No mask" in status


@pytest.mark.slow  # 30-50 s; the API cancel test stays in the default run
def test_cancel_stops_a_run_and_keeps_inputs(page, image_path):
    upload(page, image_path)
    click_point(page, 0.3, 0.5, "now click its")
    click_point(page, 0.6, 0.5, "1 handle → target pair")
    page.locator("#method").get_by_role("radio", name="DragDiffusion", exact=True).check()  # it trains a LoRA
    page.click("#advanced")  # open the accordion, then ask for a long identity-LoRA training
    steps = page.locator("#field-lora_steps input[type=number]")
    steps.wait_for(state="visible")
    steps.fill("400")
    steps.press("Enter")
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('LoRA step')",
                           timeout=RUN_TIMEOUT_MS)
    page.click("#cancel")
    expect_message(page, "Your image, mask and points are unchanged")  # the engine's EditCancelled
    assert "Cancelled" in page.inner_text("#status")
    assert "1 handle → target pair" in page.inner_text("#points-info")

    steps.fill("2")  # the app keeps serving: a short run right after works
    steps.press("Enter")
    assert "Done" in run_and_wait(page)


# ---- Move & Resize, Paste, Appearance ------------------------------------------------------------------------
def open_tab(page, name: str):
    page.get_by_role("tab", name=name).click()


def upload_canvas(page, selector: str, path: str, shows: str | None = None, tab: str | None = None, attempts: int = 3,
                  ack: tuple[str, str] | None = None):
    """Upload into an ImageEditor and wait until the server has it: ``ack`` = (status line, regular expression)
    that the server writes once it holds the picture (see ``wait_ack``), and/or ``shows``, a preview that displays
    it. If the upload was dropped (the busy-machine case of ``upload``), start over on a fresh page and ``tab``
    (only safe as the first input of a test)."""
    for attempt in range(1, attempts + 1):
        page.locator(f"{selector} input[type=file]").set_input_files(path)
        page.locator(f"{selector} canvas").first.wait_for(state="visible")
        try:
            if shows is not None:
                page.wait_for_selector(f"{shows} img", timeout=30_000)
            if ack is not None:
                wait_ack(page, *ack, timeout=30_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts or tab is None:
                raise
            open_app(page, page.url)
            open_tab(page, tab)


def paint(page, selector: str, fx: float = 0.3, fy: float = 0.5, length: int = 60):
    """A short horizontal brush stroke on an ImageEditor at a fraction of its canvas (scrolled into view first: the
    mouse only reaches what the viewport shows, and a tab's second canvas may sit below it)."""
    canvas = page.locator(f"{selector} canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * fx, box["y"] + box["height"] * fy
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 13):
        page.mouse.move(x + length * i / 12, y + (i % 3))
    page.mouse.up()


def paint_until(page, selector: str, info: str, pattern: str, fx: float = 0.3, fy: float = 0.5, length: int = 60,
                attempts: int = 3):
    """Paint a stroke (``paint``) and wait for the server's acknowledgement (``wait_ack(page, info, pattern)``).
    A stroke made while the editor is still setting up an upload on a busy machine can be lost without any
    event; then stroke again (the input is repeated, never a wait for time)."""
    for attempt in range(1, attempts + 1):
        paint(page, selector, fx, fy, length)
        try:
            return wait_ack(page, info, pattern, timeout=30_000)
        except PlaywrightTimeout:
            if attempt == attempts:
                raise


def wait_status_done(page, prefix: str) -> str:
    page.wait_for_function(f"() => document.querySelector('#{prefix}-status').innerText.includes('Done')",
                           timeout=RUN_TIMEOUT_MS)
    return page.inner_text(f"#{prefix}-status")


def click_preview(page, selector: str, fx: float, fy: float):
    img = page.locator(f"{selector} img")
    img.wait_for(state="visible", timeout=60_000)
    box = img.bounding_box()
    img.click(position={"x": box["width"] * fx, "y": box["height"] * fy})


def wait_ack(page, selector: str, pattern: str, timeout: int = 60_000):
    """Wait until the status line ``selector`` (what the server has, e.g. "mask: 1234 px painted") matches the
    regular expression ``pattern``: the input reached the server. Never a wait for time."""
    page.wait_for_function("([s, p]) => new RegExp(p).test(document.querySelector(s)?.innerText ?? '')",
                           arg=[selector, pattern], timeout=timeout)
    return page.inner_text(selector)


def click_example(page, selector: str, index: int = 0):
    """Click row ``index`` of a tab's examples table (ui/examples.py)."""
    table = page.locator(selector)
    table.wait_for(state="visible")
    rows = table.locator("tbody tr")
    if rows.count() == 0:  # a gallery-style dataset: one button per sample
        rows = table.locator("button.gallery-item, .gallery-item")
    rows.nth(index).click()


PAINTED = r"mask: [1-9]\d* px painted"  # a status line's "mask: 1234 px painted"


def test_move_tab_paint_place_run(page, image_path):
    open_tab(page, "Move & Resize")
    upload_canvas(page, "#move-canvas", image_path, shows="#move-preview", tab="Move & Resize",
                  ack=("#move-info", "Picture 96×64"))
    paint_until(page, "#move-canvas", "#move-info", PAINTED, 0.15, 0.45, 40)
    click_preview(page, "#move-preview", 0.7, 0.5)  # place the object's centre here
    page.wait_for_function("() => Number(document.querySelector('#move-dx input[type=number]').value) > 10")
    page.click("#move-run")
    assert "Done" in wait_status_done(page, "move")
    assert page.locator("#move-history img").count() == 1


def test_paste_tab_live_preview_and_run(page, image_path):
    open_tab(page, "Paste")
    for attempt in range(3):  # the first upload after page load can be dropped: start over
        page.locator("#paste-base input[type=file]").set_input_files(image_path)
        try:
            wait_ack(page, "#paste-info", "Photo 96×64", timeout=30_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            open_app(page, page.url)
            open_tab(page, "Paste")
    upload_canvas(page, "#paste-ref", image_path, ack=("#paste-info", "Reference 96×64"))
    paint_until(page, "#paste-ref", "#paste-info", rf"Reference 96×64, {PAINTED}", 0.15, 0.45, 40)
    click_preview(page, "#paste-preview", 0.75, 0.3)
    page.wait_for_function("() => Number(document.querySelector('#paste-dx input[type=number]').value) > 10")
    page.click("#paste-run")
    assert "Done" in wait_status_done(page, "paste")


@pytest.mark.slow  # 30-50 s; the API cancel test stays in the default run
def test_appearance_tab_needs_both_masks_then_runs(page, image_path):
    open_tab(page, "Appearance")
    upload_canvas(page, "#look-base", image_path, tab="Appearance", ack=("#look-info", "Photo 96×64"))
    paint_until(page, "#look-base", "#look-info", rf"Photo 96×64, {PAINTED}", 0.15, 0.45, 40)
    upload_canvas(page, "#look-ref", image_path, ack=("#look-info", "Reference 96×64"))
    page.click("#look-run")  # no mask on the reference yet
    expect_message(page, "needs a mask")
    paint_until(page, "#look-ref", "#look-info", rf"Photo 96×64, {PAINTED} · Reference 96×64, {PAINTED}", 0.5, 0.3, 40)
    page.click("#look-run")
    assert "Done" in wait_status_done(page, "look")


def test_example_sets_picture_mask_and_points_then_runs(page):
    page.locator("#examples").get_by_text("a blue ring on white").click()  # the first example's row
    page.wait_for_function("() => document.querySelector('#points-info').innerText.includes('1 handle → target pair')")
    assert "ring" in page.input_value("#prompt textarea")
    status = run_and_wait(page)
    assert "Only the painted area could change" in status
