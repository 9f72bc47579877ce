"""The tab bar and every tab's ready examples.

* The tab bar tells the truth: after visiting each tab, every button still shows its own label, only the
  visited one is selected, and that tab's content is what is shown (a stray non-Tab child of gr.Tabs broke
  this in Gradio 6.31; ``ui.app.check_tabs`` now refuses one).
* Each tab's example, clicked in headless Chromium, sets its inputs (acknowledged by the tab's status line,
  never waited for by time) and runs to a result (app on the ``tiny`` model: wiring, not quality).
* On the offline ``toy`` model each example visibly does what its label says (``slow``): the moved, pasted,
  restyled, sketched or generated shape is found where the example expects it.

Fixtures (browser, app, page) come from tests/test_ui_browser.py.
"""
import re

import gradio as gr
import numpy as np
import pytest

from tests.test_ui_browser import (
    RUN_TIMEOUT_MS,
    app_url,
    browser,
    click_example,
    open_tab,
    page,
    wait_ack,
    wait_status_done,
)
from ui.app import check_tabs

TAB_LABELS = ("Drag", "Move & Resize", "Paste", "Appearance", "Sketch", "Generate", "Personalize")

# What only each tab shows: its main input.
TAB_MARKERS = {"Drag": "#canvas", "Move & Resize": "#move-canvas", "Paste": "#paste-base",
               "Appearance": "#look-base", "Sketch": "#sketch-canvas", "Generate": "#gen-prompt",
               "Personalize": "#pz-photos"}


# ---- the tab bar -------------------------------------------------------------------------------------------
def test_check_tabs_refuses_a_stray_child_and_the_app_has_none(editor):
    with gr.Blocks():
        with gr.Tabs() as tabs:
            with gr.Tab("A"):
                gr.Markdown("a")
            gr.State(0)  # invisible, and still shifts the tab bar's labels
            with gr.Tab("B"):
                gr.Markdown("b")
    with pytest.raises(RuntimeError, match="non-Tab children gr.State"):
        check_tabs(tabs)

    from ui import build_demo

    demo = build_demo(editor)
    bars = [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]
    assert len(bars) == 1
    assert [c.label for c in bars[0].children] == list(TAB_LABELS)


def tab_bar(page) -> list[tuple[str, bool]]:
    return page.eval_on_selector_all(
        "[role=tab]", "els => els.map(e => [e.innerText.trim(), e.getAttribute('aria-selected') === 'true'])")


@pytest.mark.browser
def test_every_label_stays_true_after_visiting_each_tab(page):
    assert [label for label, _ in tab_bar(page)] == list(TAB_LABELS)
    order = list(TAB_LABELS[1:]) + [TAB_LABELS[0], TAB_LABELS[3], TAB_LABELS[1]]  # forwards, then jumps back
    for name in order:
        page.locator("[role=tab]").nth(TAB_LABELS.index(name)).click()
        page.locator(TAB_MARKERS[name]).first.wait_for(state="visible")
        bar = tab_bar(page)
        assert [label for label, _ in bar] == list(TAB_LABELS), f"after visiting {name}: {bar}"
        assert [label for label, selected in bar if selected] == [name]
        for other, marker in TAB_MARKERS.items():
            if other != name:
                assert not page.locator(marker).first.is_visible(), f"{other}'s content shows on {name}"


# ---- each tab's example, clicked and run -------------------------------------------------------------------
PAINTED = r"mask: [1-9]\d* px painted"


@pytest.mark.browser
def test_move_example_runs(page):
    open_tab(page, "Move & Resize")
    click_example(page, "#move-examples", 0)
    wait_ack(page, "#move-info", rf"Picture 64×64, {PAINTED}")
    page.wait_for_function("() => Number(document.querySelector('#move-dx input[type=number]').value) === 22")
    assert "blue square" in page.input_value("#move-prompt textarea")
    page.click("#move-run")
    assert "Done" in wait_status_done(page, "move")
    assert page.locator("#move-history img").count() == 1


@pytest.mark.browser
def test_paste_example_runs(page):
    open_tab(page, "Paste")
    click_example(page, "#paste-examples", 0)
    wait_ack(page, "#paste-info", rf"Photo 64×64 · Reference 64×64, {PAINTED}")
    page.wait_for_function("() => Number(document.querySelector('#paste-dx input[type=number]').value) === 14")
    page.click("#paste-run")
    assert "Done" in wait_status_done(page, "paste")
    assert page.locator("#paste-history img").count() == 1


@pytest.mark.browser
def test_appearance_example_runs(page):
    open_tab(page, "Appearance")
    click_example(page, "#look-examples", 1)
    wait_ack(page, "#look-info", rf"Photo 64×64, {PAINTED} · Reference 64×64, {PAINTED}")
    assert "green square" in page.input_value("#look-prompt textarea")
    page.click("#look-run")
    assert "Done" in wait_status_done(page, "look")


@pytest.mark.browser
def test_sketch_example_runs(page):
    open_tab(page, "Sketch")
    click_example(page, "#sketch-examples", 0)
    wait_ack(page, "#sketch-info", r"Sketch: [1-9]\d* px of strokes on a blank canvas, 64×64")
    assert "red disk" in page.input_value("#sketch-prompt textarea")
    page.click("#sketch-run")
    assert "Done" in wait_status_done(page, "sketch")
    assert page.locator("#sketch-gallery img").count() == 1


@pytest.mark.browser
def test_generate_example_runs(page):
    open_tab(page, "Generate")
    click_example(page, "#gen-examples", 1)
    page.wait_for_function("() => document.querySelector('#gen-prompt textarea').value === 'a large cyan ring on black'")
    page.wait_for_function("() => Number(document.querySelector('#gen-seed input').value) === 3")
    page.click("#gen-run")
    assert "Done" in wait_status_done(page, "gen")
    assert page.locator("#gen-gallery img").count() == 1


@pytest.mark.browser
def test_personalize_example_trains(page, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAGCANVAS_LORA_DIR", str(tmp_path))  # the server runs in this process
    open_tab(page, "Personalize")
    click_example(page, "#pz-examples", 0)
    wait_ack(page, "#pz-photos-info", r"4 photos received: personalize-1-photo-1\.png")
    assert page.input_value("#pz-class textarea") == "ring"
    for name, value in (("steps", "4"), ("prior_images", "1")):  # a short training
        box = page.locator(f"#pz-{name} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.click("#pz-train")
    page.wait_for_function("() => document.querySelector('#pz-status').innerText.includes('Saved LoRA')",
                           timeout=RUN_TIMEOUT_MS)
    assert re.search(r"Saved LoRA \w+-ring", page.inner_text("#pz-status"))
    assert page.locator("#pz-previews img").count() >= 1
    assert list(tmp_path.glob("*.safetensors"))


# ---- on the toy model, each example does what it says -------------------------------------------------------
def _found_near(image, colour: str, where, tol: float = 6.0) -> tuple[bool, object]:
    from models.toy_world import centroid, largest_blob, segment_colour

    blob = largest_blob(segment_colour(image, colour))
    c = centroid(blob)
    if c is None or blob.sum() < 40:
        return False, c
    return (where is None or np.hypot(c[0] - where[0], c[1] - where[1]) <= tol), c


def _guided(tab: str, v: dict):
    from editing.requests import AppearanceRequest, MoveRequest, PasteRequest

    kw = dict(prompt=v["prompt"], method=v["method"].lower())
    if tab == "move":
        return MoveRequest(image=v["image"], mask=v["mask"], offset=(v["dx"], v["dy"]), scale=v["scale"], **kw)
    if tab == "paste":
        return PasteRequest(image=v["image"], reference=v["reference"], reference_mask=v["reference_mask"],
                            offset=(v["dx"], v["dy"]), scale=v["scale"], **kw)
    return AppearanceRequest(image=v["image"], mask=v["mask"], reference=v["reference"],
                             reference_mask=v["reference_mask"], **kw)


@pytest.mark.slow
@pytest.mark.parametrize("tab", ["move", "paste", "appearance", "sketch", "generate"])
def test_toy_examples_visibly_succeed(toy, tab):
    from editing.generation import GenerateRequest, SketchRequest
    from models.toy_world import segment_colour
    from ui.examples import tab_examples

    for ex in tab_examples(tab):
        v = ex.values
        if tab == "sketch":
            req = SketchRequest(v["sketch"], None, prompt=v["prompt"])
        elif tab == "generate":
            req = GenerateRequest(v["prompt"], seed=v["seed"])
        else:
            req = _guided(tab, v)
        out = toy.edit(req).image
        colour, where = ex.expect
        ok, got = _found_near(out, colour, where)
        assert ok, f"{tab} example {ex.label!r}: the {colour} shape is at {got}, expected near {where}"
        if tab == "move":  # and its old place is free: moved, not copied
            left = v["mask"] & segment_colour(out, colour)
            assert left.sum() < 0.4 * v["mask"].sum(), f"{ex.label!r}: the object was copied, not moved"
        if tab == "appearance":  # the object's own colour is gone from it
            own = segment_colour(ex.picture, ex.label.split()[1])
            assert (own & segment_colour(out, ex.label.split()[1])).sum() < 0.3 * own.sum(), ex.label


@pytest.mark.slow
def test_toy_personalize_example_learns_the_subject(toy, tmp_path, monkeypatch):
    """The example's short training on the toy model: its previews of "a [V] ring" show a purple ring."""
    from editing.dreambooth import PersonalizeRequest
    from ui.examples import tab_examples

    monkeypatch.setenv("DRAGCANVAS_LORA_DIR", str(tmp_path))
    ex = tab_examples("personalize")[0]
    v = ex.values
    result = toy.edit(PersonalizeRequest(tuple(v["photos"]), v["class_noun"], steps=v["steps"],
                                         prior_images=v["prior_images"], preview_every=v["preview_every"]))
    assert result.images
    ok, got = _found_near(result.images[-1], "purple", None)
    assert ok, f"the last preview shows no purple ring (largest purple blob at {got})"
