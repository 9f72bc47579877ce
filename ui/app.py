"""The DragCanvas Blocks: title, model banner, tabs.

Tabs are built by the functions in ``TABS`` (``module:function``, each ``build(editor, settings, links)``);
a tab module not written yet is skipped. ``ui/links.py`` is how tabs send images to each other; what they share
(history, error wrapper, progress, Cancel) is in ``ui/common.py``; the widgets built from the engine's field
tables are in ``ui/fields.py``.
"""
from __future__ import annotations

import html
import importlib

import gradio as gr

from ui import click_mask
from ui.links import Links, make_inboxes

INTRO = ("# DragCanvas\n"
         "Drag points on an image and the content follows; move, paste and restyle objects; sketch, generate "
         "and personalise. Model: {model}.")

BANNER_STYLE = ("padding:.6em 1em;border-radius:8px;border:1px solid #e0b000;"
                "background:#fff4cc;color:#5c4400;font-weight:600")

TABS = ("ui.drag_tab:build_drag_tab", "ui.guided_tabs:build_guided_tabs", "ui.sketch_tab:build_sketch_tab",
        "ui.generate_tab:build_generate_tab", "ui.personalize_tab:build_personalize_tab")


def _builder(spec: str):
    module_name, fn = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return None
    return getattr(module, fn)


def check_tabs(tabs: gr.Tabs) -> None:
    """Refuse a direct child of the tab bar that is not a ``gr.Tab``.

    Gradio 6.31's frontend indexes the tab buttons by the Tabs' children, so a stray child (a gr.State
    or a hidden component built between two tabs) shifts them: after a visit, the button of the next tab
    shows the visited tab's label and opens the wrong tab. Gradio warns about visible strays but lets
    States through (gradio#13383), and they break the bar just the same. Build shared components inside a
    Tab (or before ``gr.Tabs``)."""
    strays = [f"gr.{type(c).__name__}(elem_id={getattr(c, 'elem_id', None)!r})"
              for c in tabs.children if not isinstance(c, gr.Tab)]
    if strays:
        raise RuntimeError(f"gr.Tabs has non-Tab children {', '.join(strays)}: they shift the tab bar's labels; "
                           "create them inside a gr.Tab or before gr.Tabs.")


def build_demo(editor, settings: dict | None = None) -> gr.Blocks:
    """The whole app for one shared ``editing.engine.Editor``. ``settings`` overrides slider start values
    (e.g. fast settings for tests and CPU demos). Queue and launch are the caller's (see app.py)."""
    with gr.Blocks(title="DragCanvas", delete_cache=(3600, 3600)) as demo:
        family = getattr(editor, "family_label", None)
        gr.Markdown(INTRO.format(model=f"`{editor.model_spec}`" + (f" ({family})" if family else "")))
        gr.HTML(f'<div style="{BANNER_STYLE}">⚠️ {html.escape(editor.banner)}</div>' if editor.banner else "",
                visible=bool(editor.banner), elem_id="banner")
        inboxes = make_inboxes()
        click_mask.build_endpoint()  # /mask_from_click: hidden, built before the tab bar (see check_tabs)
        with gr.Tabs() as tabs:
            links = Links(editor, tabs, inboxes)
            for spec in TABS:
                build = _builder(spec)
                if build is not None:
                    build(editor, settings, links)
        check_tabs(tabs)
    return demo
