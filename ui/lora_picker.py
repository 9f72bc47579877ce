"""The LoRA picker every tab shows: a multi-select of the library's LoRAs, with optional weights.

Its value is a list of strings: a library name (``zwx-dog``), optionally followed by ``@WEIGHT``
(``zwx-dog@0.7``; weight 1 when omitted) — the syntax of the CLI's ``--lora``. Tabs turn it into engine
specs with ``to_specs(value) -> [(name, weight)]`` and pass them as ``Editor.edit(..., loras=...)``.

Clients of the app (the page and API callers alike) name LoRAs by library name only: a server path is
refused here, before anything looks at the file system, and again by the engine (app.py builds the Editor
with ``trust_lora_paths=False``), so ``--allow-pickle`` never reaches a file a client sent or named. Only
the CLI and the operator's own configuration may name files.

All pickers listen to one hidden *library signal* (``library_signal(links)``): whatever changes the
library (training in the Personalize tab, a LoRA upload) writes a new value to it, and every picker
re-reads its choices, so a new LoRA appears in every tab at once. Pickers also re-read on page load.
"""
from __future__ import annotations

import math
import re
import time

import gradio as gr

from models.errors import EditError
from ui import gradio_compat

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # = editing.lora_library.files.NAME_RE (what safe_name makes)

PICKER_INFO = ("Pick LoRAs from the library. For a weight other than 1 type NAME@WEIGHT (e.g. zwx-dog@0.7). "
               "Add your own LoRA files in the Personalize tab's library.")
MAX_ENTRIES = 8  # = editing.lora_library.MAX_LORAS; checked here too so a long list is refused before parsing


def choices() -> list[tuple[str, str]]:
    """(label, value) for every LoRA in the library, newest names sorted alphabetically."""
    from editing.lora_library import list_loras

    return [(info.label, info.name) for info in list_loras()]


def parse_entry(entry: str) -> tuple[str, float]:
    """``NAME[@WEIGHT]`` -> (library name, weight). Raises EditError on a bad weight or anything but a name."""
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
    return library_name(spec), weight


def library_name(spec) -> str:
    """``spec`` if it is a plain library name (letters, digits, '-', '_'), else EditError; the file system is not
    looked at, so the message never says whether some server path exists."""
    text = spec.strip() if isinstance(spec, str) else ""
    if not NAME.fullmatch(text):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise EditError(f"LoRA {shown!r} is not a library name: pick one from the library (letters, digits, "
                        "'-' and '_'); files on the server cannot be named here.")
    return text


def to_specs(value) -> list[tuple[str, float]]:
    """The picker's value -> [(library name, weight)] for ``Editor.edit(loras=...)``. Raises EditError."""
    if not value:
        return []
    if isinstance(value, str):
        value = [v for v in value.replace("\n", ",").split(",")]
    if not isinstance(value, (list, tuple)):
        raise EditError(f"LoRAs must be a list of library names, got {type(value).__name__}.")
    entries = [e for e in value if not (isinstance(e, str) and not e.strip())]
    if len(entries) > MAX_ENTRIES:
        raise EditError(f"{len(entries)} LoRAs in one request; at most {MAX_ENTRIES} can be active at once.")
    specs = []
    for entry in entries:
        if isinstance(entry, (list, tuple)) and len(entry) == 2:  # already (name, weight)
            name, weight = entry
            specs.append(parse_entry(f"{name}@{weight}" if not isinstance(weight, bool) else f"{name}@x"))
        elif isinstance(entry, str):
            specs.append(parse_entry(entry))
        else:
            raise EditError(f"LoRA {str(entry)[:40]!r} is not a library name: pick one from the library.")
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
    root = gradio_compat.building()
    if root is not None and hasattr(root, "load"):
        root.load(refreshed, None, picker, **quiet)
    return picker


def add_upload(path, replace: bool = False) -> str:
    """Put a client's uploaded LoRA file in the library under its file name; returns the one-line status.

    A client's file: safetensors only, whatever ``--allow-pickle`` says (``trusted=False``), and an existing
    name is kept unless the client ticked "replace" (``replace=True``); both refusals are one-line EditErrors."""
    from pathlib import Path

    from editing.lora_library import add_to_library, list_loras

    if not path:
        raise EditError("No file: choose a LoRA .safetensors file to add.")
    stem = Path(str(path)).stem
    before = {i.name for i in list_loras()}
    info = add_to_library(path, name=stem, replace=bool(replace), trusted=False)
    return f"{'Replaced' if info.name in before else 'Added'} **{info.name}** in the library."
