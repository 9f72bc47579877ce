"""The Drag tab's point editor and live feedback in headless Chromium: a pointer drag makes a handle → target
pair, points move and go away, undo/redo, the live preview follows, and a DragDiffusion run shows the handles'
trail and a sampling preview before its result.

Every wait is on the server's acknowledgement (the editor's ``data-ack`` and the points line) or on DOM state,
never on time. Fixtures (browser, app, page) come from tests/test_ui_browser.py.
"""
import json

import pytest

from tests.test_ui_browser import RUN_TIMEOUT_MS, PlaywrightTimeout, app_url, browser, image_path, open_app, page

pytestmark = pytest.mark.browser


def load_picture(page, path, attempts: int = 3):
    """Upload into the canvas and wait until the point editor shows it (the server has the picture). A busy
    machine rarely drops an upload made right after page load: then start over on a fresh page."""
    for attempt in range(1, attempts + 1):
        page.locator("#canvas input[type=file]").set_input_files(path)
        try:
            page.wait_for_selector("#points .pe img", timeout=30_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts:
                raise
            open_app(page, page.url)


def state(page) -> dict:
    """What the server last rendered: the acknowledged edit and the point list."""
    return page.evaluate("""() => { const b = document.querySelector('#points .pe');
        return {ack: Number(b.dataset.ack), points: JSON.parse(b.dataset.points)}; }""")


def wait_ack(page, n: int) -> dict:
    """Wait until the server has applied edit ``n`` (and said so in the points line)."""
    page.wait_for_function("n => document.querySelector('#points .pe')?.dataset.ack === String(n)", arg=n)
    page.wait_for_function("n => document.querySelector('#points-info').innerText.includes(`edit ${n} applied`)",
                           arg=n)
    return state(page)


def at(page, fx: float, fy: float) -> tuple[float, float]:
    """Page coordinates of a fraction of the editor's picture."""
    box = page.locator("#points .pe img").bounding_box()
    return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy


def picture_xy(page, fx: float, fy: float) -> tuple[float, float]:
    """The picture pixel under a fraction of the editor (pixel centres at integers, as the script maps it)."""
    w, h = page.evaluate("() => { const b = document.querySelector('#points .pe'); return [+b.dataset.w, +b.dataset.h]; }")
    return fx * w - 0.5, fy * h - 0.5


def pointer_drag(page, start, end, steps: int = 8, check_arrow: bool = False):
    page.mouse.move(*at(page, *start))
    page.mouse.down()
    for i in range(1, steps + 1):
        fx = start[0] + (end[0] - start[0]) * i / steps
        fy = start[1] + (end[1] - start[1]) * i / steps
        page.mouse.move(*at(page, fx, fy))
        if check_arrow and i == steps // 2:  # halfway: the arrow follows the pointer before anything is sent
            page.wait_for_selector("#points svg line.pe-arrow", state="attached")
    page.mouse.up()


def test_pointer_drag_makes_a_pair(page, image_path):
    load_picture(page, image_path)
    pointer_drag(page, (0.25, 0.5), (0.6, 0.45), check_arrow=True)
    s = wait_ack(page, 1)
    assert len(s["points"]) == 2 and "1 handle → target pair" in page.inner_text("#points-info")
    (hx, hy), (tx, ty) = s["points"]
    ex_h, ex_t = picture_xy(page, 0.25, 0.5), picture_xy(page, 0.6, 0.45)
    assert abs(hx - ex_h[0]) < 1.5 and abs(hy - ex_h[1]) < 1.5, s
    assert abs(tx - ex_t[0]) < 1.5 and abs(ty - ex_t[1]) < 1.5, s
    # the click-click way still works next to it: two clicks make a second pair
    page.mouse.click(*at(page, 0.2, 0.2))
    wait_ack(page, 2)
    page.mouse.click(*at(page, 0.4, 0.2))
    assert len(wait_ack(page, 3)["points"]) == 4
    assert "2 handle → target pair" in page.inner_text("#points-info")


def test_move_and_delete_points(page, image_path):
    load_picture(page, image_path)
    pointer_drag(page, (0.25, 0.5), (0.5, 0.5))
    wait_ack(page, 1)
    pointer_drag(page, (0.5, 0.5), (0.7, 0.3))  # grab the target and move it
    s = wait_ack(page, 2)
    ex = picture_xy(page, 0.7, 0.3)
    assert len(s["points"]) == 2 and abs(s["points"][1][0] - ex[0]) < 1.5 and abs(s["points"][1][1] - ex[1]) < 1.5
    page.mouse.click(*at(page, 0.7, 0.3), button="right")  # right-click the target: the pair goes
    s = wait_ack(page, 3)
    assert s["points"] == [] and "0 points" in page.inner_text("#points-info")
    # select a point with a click, then the Delete key
    pointer_drag(page, (0.3, 0.6), (0.5, 0.6))
    wait_ack(page, 4)
    page.mouse.click(*at(page, 0.3, 0.6))  # a click on a point selects it (nothing is sent)
    page.wait_for_selector("#points svg circle.pe-sel", state="attached")
    page.keyboard.press("Delete")
    assert wait_ack(page, 5)["points"] == []


@pytest.mark.slow  # 40-60 s; the default run keeps the pointer, live preview and click tests
def test_undo_redo_with_keys_and_buttons(page, image_path):
    load_picture(page, image_path)
    pointer_drag(page, (0.25, 0.5), (0.5, 0.5))
    first = wait_ack(page, 1)["points"]
    pointer_drag(page, (0.5, 0.5), (0.6, 0.2))
    moved = wait_ack(page, 2)["points"]
    assert moved != first
    page.keyboard.press("Control+z")
    assert wait_ack(page, 3)["points"] == first
    page.keyboard.press("Control+z")
    assert wait_ack(page, 4)["points"] == []
    page.keyboard.press("Control+Shift+z")
    assert wait_ack(page, 5)["points"] == first
    page.keyboard.press("Control+Shift+z")
    assert wait_ack(page, 6)["points"] == moved
    # the buttons do the same (they answer without a seq: wait for the points line instead)
    page.click("#undo")
    page.wait_for_function("p => document.querySelector('#points .pe').dataset.points === p",
                           arg=json.dumps(first))
    # typing in the prompt is not an edit: Ctrl+Z there stays the textbox's
    page.fill("#prompt textarea", "a red block")
    page.press("#prompt textarea", "Control+z")
    page.click("#redo")
    page.wait_for_function("p => document.querySelector('#points .pe').dataset.points === p",
                           arg=json.dumps(moved))
    assert state(page)["ack"] == 6


def test_live_preview_follows_the_points(page, image_path):
    load_picture(page, image_path)
    page.wait_for_function("() => document.querySelector('#live-info').innerText.includes('add a handle')")
    pointer_drag(page, (0.25, 0.5), (0.55, 0.5))
    wait_ack(page, 1)
    page.wait_for_function("() => document.querySelector('#live-info').innerText.includes('1 pair')")
    page.wait_for_selector("#live-preview img")
    before = page.get_attribute("#live-preview img", "src")
    pointer_drag(page, (0.55, 0.5), (0.7, 0.7))  # move the target: the preview follows
    wait_ack(page, 2)
    page.wait_for_function("s => document.querySelector('#live-preview img')?.src !== s", arg=before)
    assert "1 pair" in page.inner_text("#live-info")


# Record every status line and result picture the page shows while a run streams (DOM state, not timing).
WATCH_JS = """() => {
  window.__seen = [];
  const note = () => {
    const status = document.querySelector('#status')?.innerText || '';
    const imgs = [...document.querySelectorAll('#result img')].map(i => i.src).join(' ');
    const last = window.__seen[window.__seen.length - 1];
    if (!last || last.status !== status || last.imgs !== imgs) window.__seen.push({status, imgs});
  };
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                     attributes: true, attributeFilter: ['src']});
}"""


@pytest.mark.slow  # 40-60 s; the default run keeps the pointer, live preview and click tests
def test_trail_and_sampling_preview_show_before_the_result(page, image_path):
    load_picture(page, image_path)
    pointer_drag(page, (0.25, 0.5), (0.5, 0.5))
    wait_ack(page, 1)
    page.get_by_label("DragDiffusion", exact=True).check()
    page.click("#advanced")
    steps = page.locator("#field-n_inference_steps input[type=number]")
    steps.wait_for(state="visible")
    steps.fill("40")  # enough denoising steps for previews to show while it samples
    steps.press("Enter")
    page.evaluate(WATCH_JS)
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')",
                           timeout=RUN_TIMEOUT_MS)
    seen = page.evaluate("() => window.__seen")
    done = next(i for i, s in enumerate(seen) if "Done" in s["status"])
    trail = [i for i, s in enumerate(seen[:done]) if "handle trail" in s["status"]]
    preview = [i for i, s in enumerate(seen[:done]) if "preview at step" in s["status"]]
    assert trail, [s["status"] for s in seen]
    assert preview, [s["status"] for s in seen]
    assert any(seen[i]["imgs"] for i in trail), "the before/after view shows the trail while it runs"
    assert any("left in this phase" in s["status"] for s in seen[:done])
    assert page.locator("#history img").count() == 1


# The point editor's picture: its pixel (r + g + b) at a picture pixel, frozen (unmasked) pixels shown at 40 %.
BRIGHTNESS_JS = """([x, y]) => { const i = document.querySelector('#points .pe img');
    if (!i || !i.complete || !i.naturalWidth) return -1;
    const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(i, 0, 0);
    const k = i.naturalWidth / Number(i.closest('.pe').dataset.w);
    const d = g.getImageData(Math.floor((x + 0.5) * k), Math.floor((y + 0.5) * k), 1, 1).data;
    return d[0] + d[1] + d[2]; }"""


def test_click_to_select_masks_the_object_on_the_drag_canvas(page, image_path):
    """A click on the red block in the click view: the server answers (status, data-ack), the canvas's mask reaches
    the Drag session (the point editor dims everything else); Shift+click adds a part; Clear clicks undoes it."""
    load_picture(page, image_path)
    view = page.locator("#canvas-click-view .cm img")
    view.wait_for()
    corner = page.evaluate(BRIGHTNESS_JS, [90, 60])
    assert corner > 400  # nothing frozen yet: the gradient's bright corner (180, 180, 150)
    box = view.bounding_box()
    view.click(position={"x": box["width"] * 22.5 / 96, "y": box["height"] * 30.5 / 64})
    page.wait_for_function("() => document.querySelector('#canvas-click-view .cm')?.dataset.ack === '1'")
    status = page.inner_text("#canvas-click-status")
    assert "by the classical segmenter" in status and "1 object" in status, status
    # the mask went onto the canvas and from there, as a brush stroke does, into the Drag session
    page.wait_for_function(f"() => ({BRIGHTNESS_JS})([90, 60]) > 0 && ({BRIGHTNESS_JS})([90, 60]) < 300")
    assert page.evaluate(BRIGHTNESS_JS, [22, 30]) >= 290  # the block itself is not frozen (220, 40, 40)
    view.click(position={"x": box["width"] * 16.5 / 96, "y": box["height"] * 22.5 / 64}, modifiers=["Shift"])
    page.wait_for_function("() => document.querySelector('#canvas-click-view .cm')?.dataset.ack === '2'")
    status = page.inner_text("#canvas-click-status")
    assert "2 clicks" in status and "add a part" in status, status
    page.click("#canvas-click-clear")
    page.wait_for_function("() => document.querySelector('#canvas-click-status').innerText.includes('cleared')")
    page.wait_for_function(f"() => ({BRIGHTNESS_JS})([90, 60]) > 400")
