"""The DragCanvas Blocks: title, model banner, tabs."""
from __future__ import annotations

import html

import gradio as gr

from ui.drag_tab import build_drag_tab

INTRO = ("# DragCanvas\n"
         "Drag points on an image and the content follows (DragDiffusion). Model: `{model}`.")

BANNER_STYLE = ("padding:.6em 1em;border-radius:8px;border:1px solid #e0b000;"
                "background:#fff4cc;color:#5c4400;font-weight:600")


def build_demo(editor, settings: dict | None = None) -> gr.Blocks:
    """The whole app for one shared ``editing.engine.Editor``. ``settings`` overrides slider start values
    (e.g. fast settings for tests and CPU demos). Queue and launch are the caller's (see app.py)."""
    with gr.Blocks(title="DragCanvas", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO.format(model=editor.model_name))
        gr.HTML(f'<div style="{BANNER_STYLE}">⚠️ {html.escape(editor.banner)}</div>' if editor.banner else "",
                visible=bool(editor.banner), elem_id="banner")
        with gr.Tabs():
            build_drag_tab(editor, settings)
    return demo
