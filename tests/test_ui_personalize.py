"""The Personalize tab and the LoRA pickers: gradio_client against the in-process app, plus one browser run."""
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from editing import lora_library as lib
from tests.conftest import scene
from tests.serving import launch

# Start values of the tab's sliders (build_demo settings["personalize"]): seconds on the tiny model.
FAST = {"steps": 2, "rank": 2, "prior_images": 1, "prior_steps": 2, "preview_steps": 2, "resolution": 64,
        "preview_every": 1, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-loras")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(lib.ENV_DIR, str(d))
        yield d


@pytest.fixture(scope="module")
def app_url(editor, lora_dir):
    from ui import build_demo

    demo = build_demo(editor, settings={"personalize": FAST}).queue(default_concurrency_limit=1)
    yield launch(demo)
    demo.close()


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-photos")
    paths = []
    for i, size in enumerate(((64, 64), (96, 64))):
        p = d / f"p{i}.png"
        scene(*size, seed=i).save(p)
        paths.append(str(p))
    note = d / "notes.txt"
    note.write_text("not an image")
    return paths, str(note)


def train(client, files, class_noun="dog", identifier="", name="", **settings):
    return client.predict([handle_file(f) for f in files], class_noun, identifier, name, True, False,
                          **(FAST | settings), api_name="/personalize")


def test_personalize_bad_inputs_then_train(client, photo_files, lora_dir):
    photos, note = photo_files
    with pytest.raises(AppError, match="No photos"):
        client.predict([], "dog", "", "", True, False, api_name="/personalize")
    with pytest.raises(AppError, match=r"No photos.*notes.txt"):
        train(client, [note])
    with pytest.raises(AppError, match="Class noun is empty"):
        train(client, photos, class_noun="  ")
    with pytest.raises(AppError, match="one word"):
        train(client, photos, identifier="two words")
    previews, lora_file, card, status, signal, library = train(client, photos + [note], name="ui-dog")
    assert Path(lora_file).name == "ui-dog.safetensors" and (lora_dir / "ui-dog.safetensors").is_file()
    assert card["name"] == "ui-dog" and card["photos"] == 2 and "Saved LoRA **ui-dog**" in status
    assert len(previews) == 2 and signal  # previews at steps 1 and 2; the signal refreshes every picker
    assert "ui-dog" in [row[0] for row in library["data"]]
    from ui.lora_picker import choices

    assert ("ui-dog — “" + card["instance_prompt"] + "”", "ui-dog") in choices()


def test_suggest_identifier_and_add_lora(client, photo_files, lora_dir, tmp_path):
    ident = client.predict("dog", api_name="/suggest_identifier")
    assert 1 <= len(ident) <= 3
    src = lora_dir / "ui-dog.safetensors"
    if not src.exists():
        train(client, photo_files[0], name="ui-dog")
    pkl = tmp_path / "theirs.ckpt"
    pkl.write_bytes(b"\x80\x04pickle")
    with pytest.raises(AppError, match="pickle"):
        client.predict(handle_file(str(pkl)), api_name="/add_lora")
    mine = tmp_path / "owned.safetensors"
    mine.write_bytes(src.read_bytes())
    status, _, library = client.predict(handle_file(str(mine)), api_name="/add_lora")
    assert "owned" in status and "owned" in [row[0] for row in library["data"]]


def test_picker_specs():
    from models.errors import EditError
    from ui.lora_picker import to_specs

    assert to_specs(None) == [] and to_specs([]) == []
    assert to_specs(["zwx-dog", "style@0.5", "zwx-cat@-1"]) == [("zwx-dog", 1.0), ("style", 0.5), ("zwx-cat", -1.0)]
    with pytest.raises(EditError, match="not a library name"):  # clients never name server files
        to_specs(["/x/y.safetensors@-1"])
    assert to_specs("a@2, b") == [("a", 2.0), ("b", 1.0)]
    with pytest.raises(EditError, match="must be a number"):
        to_specs(["dog@heavy"])
    with pytest.raises(EditError, match=r"\[-4, 4\]"):
        to_specs(["dog@9"])


@pytest.mark.browser
@pytest.mark.slow  # ~20 s: a training in the browser
def test_browser_train_and_new_lora_appears_in_every_picker(app_url, photo_files, lora_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.test_ui_browser import ARGS, ARTIFACTS, CHROMIUM, RUN_TIMEOUT_MS

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(app_url)
            page.get_by_role("tab", name="Personalize").click()
            page.locator("#pz-photos input[type=file]").set_input_files(photo_files[0])
            page.locator("#pz-class textarea, #pz-class input").first.fill("teddy")
            page.locator("#pz-name textarea, #pz-name input").first.fill("browser-teddy")
            page.locator("#pz-train").click()
            page.locator("#pz-status").get_by_text("Saved LoRA").wait_for(timeout=RUN_TIMEOUT_MS)
            assert page.locator("#pz-previews img").count() >= 1
            page.locator("#pz-library").get_by_text("browser-teddy").filter(visible=True).first.wait_for()
            checked = []
            for tab in ("Drag", "Move & Resize", "Paste", "Appearance", "Sketch", "Generate"):
                if page.get_by_role("tab", name=tab, exact=True).count() == 0:
                    continue
                page.get_by_role("tab", name=tab, exact=True).click()
                picker = page.locator(".lora-picker input:visible")
                if picker.count() == 0:
                    continue  # this tab has no picker (yet)
                picker.first.click()  # every picker lists the new LoRA without a reload
                page.get_by_role("option", name="browser-teddy").first.wait_for()
                page.keyboard.press("Escape")
                checked.append(tab)
            assert len(checked) >= 2, f"LoRA pickers found only in {checked}"
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "test_browser_personalize.png"), full_page=True)
            raise
        finally:
            browser.close()
