"""DragCanvas: run the web app.

    python app.py                      # best model available (SD-1.5 if reachable, else an offline built-in)
    python app.py --model tiny         # tiny random-weight model: fast, for trying the UI on a CPU
    python app.py --model ./my-model   # a diffusers folder, a .safetensors checkpoint or a Hub id

Also the Hugging Face Space entry point (``app_file: app.py``; Spaces run ``python app.py``).
"""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("dragcanvas")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DragCanvas web UI (drag-based image editing).")
    p.add_argument("--model", default="auto",
                   help="model spec: 'auto', a named built-in ('tiny', ...), a Hub id, a diffusers folder "
                        "or a single .safetensors file (default: auto)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle weights (.bin/.ckpt/.pt); only for files you trust")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--offload", action="store_true",
                   help="keep weights in RAM and move each model to the GPU only while it runs (low-VRAM GPUs)")
    p.add_argument("--max-side", type=int, default=2048,
                   help="larger images are downscaled to this long side before editing (default: 2048)")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """Editor (models load lazily on first use) + UI, with the single shared queue."""
    from editing.engine import Editor
    from ui import build_demo

    editor = Editor(args.model, allow_pickle=args.allow_pickle, max_side=args.max_side, offload=args.offload)
    log.info("model: %s%s", editor.model_name, f" ({editor.banner})" if editor.banner else "")
    return build_demo(editor).queue(default_concurrency_limit=1)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    demo = build(args)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size="50mb")


if __name__ == "__main__":
    main()
