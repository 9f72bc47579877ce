"""How tabs talk to each other without knowing each other's insides.

``build_demo`` creates one hidden *inbox* per tab that accepts images (``Links.inboxes[tab_id]``,
a ``gr.Image(type="filepath")``). A tab sends a picture to another by returning its file path to
that inbox and ``gr.Tabs(selected=tab_id)`` to ``Links.tabs`` (see ``send_to``); the receiving tab
listens to its own inbox's ``.change``. LoRA pickers (issue 6) register themselves in
``lora_pickers`` so a newly trained LoRA shows up in every tab at once.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import gradio as gr

INBOX_TABS = ("drag", "sketch", "move", "paste", "appearance", "generate")


@dataclass
class Links:
    editor: object
    tabs: gr.Tabs
    inboxes: dict[str, gr.Image] = field(default_factory=dict)
    lora_pickers: list = field(default_factory=list)

    def send_to(self, tab_id: str):
        """(fn, outputs) for a ``.click``/``.then`` that sends the input file path to ``tab_id`` and opens it."""
        def send(path):
            if not path:
                raise gr.Error("Nothing to send yet: make an image first.")
            if isinstance(path, (list, tuple)):  # gallery selection / image slider pairs: take the last image
                path = path[-1]
                if isinstance(path, (list, tuple)):
                    path = path[0]
            return path, gr.Tabs(selected=tab_id)

        return send, [self.inboxes[tab_id], self.tabs]

    def lora_picker(self):
        """Build the LoRA picker in the current layout (ui/lora_picker.py) or return None before it exists.
        Its value goes through ``ui.lora_picker.to_specs(value) -> [(path, weight)]``."""
        try:
            module = importlib.import_module("ui.lora_picker")
        except ModuleNotFoundError as e:
            if e.name != "ui.lora_picker":
                raise
            return None
        picker = module.build_picker(self.editor, self)
        self.lora_pickers.append(picker)
        return picker


def make_inboxes() -> dict[str, gr.Image]:
    return {t: gr.Image(type="filepath", visible=False, format="png", elem_id=f"inbox-{t}") for t in INBOX_TABS}
