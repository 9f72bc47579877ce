"""Take docs/screenshot.png: the running app after a real drag, in headless Chromium. Run by hand:

    python -m ui.screenshot                      # offline: the built-in model, with its banner
    python -m ui.screenshot --model runwayml/...  # with real weights, for a nicer picture
    python -m ui.screenshot --model toy --example 1  # a ready toy example (ui/examples.py)

Not run by the tests. Needs Debian's chromium and the playwright package.
"""
from __future__ import annotations

import argparse
import logging
import socket
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("dragcanvas.screenshot")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
FAST = dict(lora_steps=10, n_inference_steps=20, max_steps=20)


def demo_picture(w: int = 384, h: int = 256) -> Image.Image:
    """A simple scene to drag: a red ball and a blue box on a soft gradient."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([170 + xx / w * 60, 200 - yy / h * 40, 230 - xx / w * 50], -1)
    a[(xx - 0.33 * w) ** 2 + (yy - 0.55 * h) ** 2 < (0.16 * h) ** 2] = (215, 50, 45)
    a[int(0.25 * h): int(0.5 * h), int(0.65 * w): int(0.82 * w)] = (40, 70, 190)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def run_and_save(page, out: str) -> None:
    """Press Run, wait for the result, take the full-page screenshot."""
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    page.wait_for_timeout(1500)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=out, full_page=True)
    log.info("wrote %s", out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="auto")
    p.add_argument("--out", default="docs/screenshot.png")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--example", type=int, default=0, help="click this ready example (1-based) instead of drawing")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from playwright.sync_api import TimeoutError, sync_playwright

    from editing.engine import Editor
    from ui import build_demo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(Editor(args.model), settings=FAST).queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    picture = Path(tempfile.mkdtemp()) / "scene.png"
    demo_picture().save(picture)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 980})
            page.set_default_timeout(600_000)
            with page.expect_response(lambda r: "/heartbeat/" in r.url):  # the frontend is connected
                page.goto(url)
            page.wait_for_selector("#canvas input[type=file]", state="attached")
            if args.example:
                page.locator("#examples tbody tr").nth(args.example - 1).click()
                page.wait_for_function("() => document.querySelector('#points-info').innerText.includes('pair')")
                page.wait_for_timeout(1500)
                run_and_save(page, args.out)
                browser.close()
                return
            for attempt in range(1, 4):  # an upload right after page load can be dropped: retry
                page.locator("#canvas input[type=file]").set_input_files(str(picture))
                try:
                    page.wait_for_selector("#points img", timeout=20_000)
                    break
                except TimeoutError:
                    log.info("upload not picked up (attempt %d), retrying", attempt)

            # Paint over the ball and the space to its right: the area allowed to change.
            src = page.get_attribute("#points img", "src")
            box = page.locator("#canvas canvas").first.bounding_box()
            cx, cy = box["x"] + box["width"] * 0.42, box["y"] + box["height"] * 0.55
            for dy in (-24, -8, 8, 24):
                page.mouse.move(cx - 80, cy + dy)
                page.mouse.down()
                for i in range(1, 13):
                    page.mouse.move(cx - 80 + 14 * i, cy + dy)
                page.mouse.up()
            page.wait_for_function("s => document.querySelector('#points img')?.src !== s", arg=src)

            img = page.locator("#points img")
            ib = img.bounding_box()
            for fx in (0.33, 0.5):  # handle on the ball, target to its right
                img.click(position={"x": ib["width"] * fx, "y": ib["height"] * 0.55})
                page.wait_for_timeout(700)
            page.fill("#prompt textarea", "a red ball next to a blue box")
            run_and_save(page, args.out)
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
