"""The LoRA picker every tab shows: a multi-select of the library's LoRAs, with optional weights.

Its value is a list of strings: a library name (``zwx-dog``), a path to a ``.safetensors`` file, each
optionally followed by ``@WEIGHT`` (``zwx-dog@0.7``; weight 1 when omitted) — the same syntax as the
CLI's ``--lora``. Tabs turn it into engine specs with ``to_specs(value) -> [(path_or_name, weight)]``
and pass them as ``Editor.edit(..., loras=...)``.

All pickers listen to one hidden *library signal* (``library_signal(links)``): whatever changes the
library (training in the Personalize tab, a LoRA upload) writes a new value to it, and every picker
re-reads its choices, so a new LoRA appears in every tab at once. Pickers also re-read on page load.
"""
from __future__ import annotations

import math
import time

import gradio as gr

from editing.requests import EditError

PICKER_INFO = ("Pick LoRAs from the library. For a weight other than 1 type NAME@WEIGHT (e.g. zwx-dog@0.7); "
               "a path to a .safetensors file also works.")


def choices() -> list[tuple[str, str]]:
    """(label, value) for every LoRA in the library, newest names sorted alphabetically."""
    from editing.lora_library import list_loras

    return [(info.label, info.name) for info in list_loras()]


def parse_entry(entry: str) -> tuple[str, float]:
    """``NAME_OR_PATH[@WEIGHT]`` -> (name or path, weight). Raises EditError on a bad weight."""
    text = str(entry).strip()
    spec, weight = text, 1.0
    if "@" in text:
        head, _, tail = text.rpartition("@")
        try:
            spec, weight = head.strip(), float(tail)
        except ValueError:
            raise EditError(f"LoRA {text!r}: the weight after '@' must be a number, e.g. {head}@0.8.") from None
    if not spec:
        raise EditError(f"LoRA {text!r} has no name before '@'.")
    if not (math.isfinite(weight) and abs(weight) <= 4):
        raise EditError(f"LoRA {text!r}: the weight must be a finite number in [-4, 4].")
    return spec, weight


def to_specs(value) -> list[tuple[str, float]]:
    """The picker's value -> [(library name or path, weight)] for ``Editor.edit(loras=...)``."""
    if not value:
        return []
    if isinstance(value, str):
        value = [v for v in value.replace("\n", ",").split(",")]
    specs = []
    for entry in value:
        if isinstance(entry, (list, tuple)) and len(entry) == 2:  # already (spec, weight)
            specs.append((str(entry[0]), float(entry[1])))
        elif str(entry).strip():
            specs.append(parse_entry(entry))
    return specs


def library_signal(links) -> gr.Textbox:
    """The hidden component all pickers watch; created (invisible) in the current layout on first use."""
    signal = getattr(links, "lora_library_signal", None) if links is not None else None
    if signal is None:
        signal = gr.Textbox(value="", visible=False, elem_id="lora-library-signal")
        if links is not None:
            links.lora_library_signal = signal
    return signal


def bump() -> str:
    """A new signal value: return it to ``library_signal(links)`` after changing the library."""
    return f"{time.time():.6f}"


def refreshed():
    """Update for a picker: the library's current choices (its value is kept)."""
    return gr.Dropdown(choices=choices())


def build_picker(editor, links) -> gr.Dropdown:
    """A LoRA picker in the current layout, wired to the library signal (and to page load)."""
    n = len(getattr(links, "lora_pickers", []) or [])
    picker = gr.Dropdown(choices=choices(), value=[], multiselect=True, allow_custom_value=True,
                         label="LoRAs (subjects, styles)", info=PICKER_INFO, elem_classes=["lora-picker"],
                         elem_id=f"lora-picker-{n}")
    signal = library_signal(links)
    quiet = {"show_progress": "hidden", "api_visibility": "private", "queue": False}
    signal.change(refreshed, None, picker, **quiet)
    root = gr.context.Context.root_block
    if root is not None and hasattr(root, "load"):
        root.load(refreshed, None, picker, **quiet)
    return picker
