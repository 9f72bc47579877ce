"""The README's pictures, taken from the real app in headless Chromium. Run by hand:

    python -m ui.screenshot                          # every main tab: its first example, run (docs/tab-*.png)
    python -m ui.screenshot --tabs drag move         # only these tabs
    python -m ui.screenshot --drag-sequence          # a drag, frame by frame (docs/drag-1.png … and docs/drag.gif)
    python -m ui.screenshot --model runwayml/...     # with real weights (the examples are made for ``toy``)

Each tab's picture is its first ready example (ui/examples.py) set by one click and run to its result on the
offline ``toy`` model. Not run by the tests. Needs Debian's chromium and the playwright package.
"""
from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from PIL import Image

log = logging.getLogger("dragcanvas.screenshot")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
FAST = dict(lora_steps=40, n_inference_steps=50, max_steps=40)
RUN_MS = 900_000

# tab label, examples table, Run button, status line, what the status says when done, and the server's
# acknowledgement that the example's inputs arrived: (status line, regular expression)
TABS = {
    "drag": ("Drag", "#examples", "#run", "#status", "Done", ("#points-info", "pair")),
    "move": ("Move & Resize", "#move-examples", "#move-run", "#move-status", "Done", ("#move-info", "px painted")),
    "paste": ("Paste", "#paste-examples", "#paste-run", "#paste-status", "Done", ("#paste-info", "px painted")),
    "appearance": ("Appearance", "#look-examples", "#look-run", "#look-status", "Done",
                   ("#look-info", "px painted .* px painted")),
    "sketch": ("Sketch", "#sketch-examples", "#sketch-run", "#sketch-status", "Done",
               ("#sketch-info", "px of strokes")),
    "generate": ("Generate", "#gen-examples", "#gen-run", "#gen-status", "Done", None),
    "personalize": ("Personalize", "#pz-examples", "#pz-train", "#pz-status", "Saved LoRA",
                    ("#pz-photos-info", "photos received")),
}


def wait_text(page, selector: str, text: str, timeout: int = RUN_MS) -> None:
    page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText ?? '').includes(t)",
                           arg=[selector, text], timeout=timeout)


def shoot_tab(page, key: str, out: Path) -> Path:
    """Open the tab, click its first example, run it and take the full page once the status says it is done."""
    label, table, run, status, done, ack = TABS[key]
    page.get_by_role("tab", name=label, exact=True).click()
    page.locator(table).wait_for(state="visible")
    page.locator(f"{table} tbody tr").first.click()
    if ack is not None:
        page.wait_for_function("([s, p]) => new RegExp(p).test(document.querySelector(s)?.innerText ?? '')",
                               arg=list(ack), timeout=120_000)
    else:
        page.wait_for_function("() => document.querySelector('#gen-prompt textarea').value !== ''")
    page.click(run)
    wait_text(page, status, done)
    # the result's image elements load after the status line: wait until every visible one has its pixels
    page.wait_for_function("() => [...document.images].filter(i => i.offsetParent !== null)"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
    page.wait_for_timeout(500)
    path = out / f"tab-{key}.png"
    page.screenshot(path=str(path), full_page=True)
    log.info("wrote %s", path)
    return path


def drag_sequence(page, out: Path, frames: int = 6) -> list[Path]:
    """The Drag tab's first example with its points cleared, then a pointer drag from the handle to the target in
    ``frames`` steps (one picture each, the arrow following), the run's live feedback and the result."""
    from ui.examples import load_examples

    ex = load_examples()[0]
    page.get_by_role("tab", name="Drag", exact=True).click()
    page.locator("#examples tbody tr").first.click()
    wait_text(page, "#points-info", "pair", 60_000)
    page.get_by_role("button", name="Clear points").click()
    wait_text(page, "#points-info", "(0 points", 60_000)
    img = page.locator("#points img").first
    box = img.bounding_box()
    w, h = Image.open(ex.image).size
    (hx, hy), (tx, ty) = ex.points

    def at(x, y):
        return box["x"] + (x + 0.5) / w * box["width"], box["y"] + (y + 0.5) / h * box["height"]

    area = page.locator("#points").first
    shots: list[Path] = []

    def snap():
        path = out / f"drag-{len(shots) + 1}.png"
        area.screenshot(path=str(path))
        shots.append(path)

    snap()
    page.mouse.move(*at(hx, hy))
    page.mouse.down()
    for i in range(1, frames + 1):
        f = i / frames
        page.mouse.move(*at(hx + (tx - hx) * f, hy + (ty - hy) * f), steps=3)
        page.wait_for_timeout(150)
        snap()
    page.mouse.up()
    wait_text(page, "#points-info", "1 handle → target pair", 60_000)
    snap()
    page.click("#run")
    wait_text(page, "#status", "Done")
    page.wait_for_timeout(1000)
    res = out / f"drag-{len(shots) + 1}.png"
    page.locator("#result").first.screenshot(path=str(res))
    shots.append(res)
    frames_rgb = [Image.open(p).convert("RGB") for p in shots]
    size = frames_rgb[1].size
    gif = [f.resize(size) for f in frames_rgb]
    gif[0].save(out / "drag.gif", save_all=True, append_images=gif[1:], duration=[700] + [250] * (len(gif) - 3)
                + [900, 2000], loop=0)
    log.info("wrote %s and %d frames", out / "drag.gif", len(shots))
    return shots


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--out", default="docs")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--tabs", nargs="*", choices=list(TABS), default=None, help="default: every tab")
    p.add_argument("--drag-sequence", action="store_true", help="only the drag frames and docs/drag.gif")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from playwright.sync_api import sync_playwright

    from editing.engine import Editor
    from ui import build_demo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(Editor(args.model), settings=FAST).queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 980})
            page.set_default_timeout(120_000)
            with page.expect_response(lambda r: "/heartbeat/" in r.url):  # the frontend is connected
                page.goto(url)
            page.wait_for_selector("#canvas input[type=file]", state="attached")
            if args.drag_sequence:
                drag_sequence(page, out)
            else:
                for key in args.tabs or TABS:
                    shoot_tab(page, key, out)
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
