"""The one pickle policy: weight files in a pickle format can run code when loaded, so they are refused
unless the user passed ``--allow-pickle`` (``allow_pickle=True``). Used by the model loader, the adapters
(ControlNet, T2I-Adapter, IP-Adapter) and the LoRA library, so every layer says the same thing.

Even then weights are data: ``--allow-pickle`` admits the ``.bin``/``.pt``/``.ckpt`` *container* of plain
tensors, and ``load_pickle_weights`` reads it with ``torch.load(weights_only=True)``, which refuses a pickle
that asks for anything more (a class to build, a function to call), so a crafted file cannot run code.

Only names are looked at (nothing is opened), so a Hub path such as ``models/ip-adapter_sd15.bin`` is
checked the same way as a local file.
"""
from __future__ import annotations

from pathlib import Path

from models.errors import EditError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
SAFE_SUFFIX = ".safetensors"


def is_pickle(path: str | Path) -> bool:
    """True when the file name has a pickle suffix (``.bin``, ``.ckpt``, ``.pt``, ``.pth``; any case)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def load_pickle_weights(path: str | Path, what: str = "Weights", error: type[EditError] = EditError):
    """The tensors in a pickle weight file (``torch.load(weights_only=True)``); a file whose pickle wants more
    than tensors, numbers, strings and containers is refused with one line (its code never runs)."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise error(f"{what} {path.name} is a pickle that holds more than plain tensors (it would build objects or "
                    "run code when loaded), so it is refused even with --allow-pickle. Convert it to .safetensors "
                    "from a trusted copy.") from None


def check_weights_file(path: str | Path, allow_pickle: bool, what: str = "Weights",
                       error: type[EditError] = EditError) -> None:
    """Raise ``error`` when ``path`` is pickle weights and ``allow_pickle`` is off.

    ``path`` may be a file (judged by its suffix, whether or not it exists yet) or a folder (refused
    when it holds pickle weights and no ``.safetensors`` to load instead). ``what`` names the thing
    in the message ("LoRA", "ControlNet", "Model"); ``error`` is the caller's ``EditError`` subclass.
    """
    if allow_pickle:
        return
    path = Path(path)
    if path.is_dir():
        # A diffusers folder keeps its weights at its top or one folder down (a pipeline's components): look
        # that deep only, so naming a huge folder (a home directory) never walks a whole tree.
        files = [p for pattern in ("*", "*/*") for p in path.glob(pattern) if p.is_file()]
        if any(is_pickle(p) for p in files) and not any(p.suffix.lower() == SAFE_SUFFIX for p in files):
            raise error(f"{what} folder {path.name!r} holds only pickle weights (.bin/.ckpt), which can run arbitrary "
                        "code when loaded. Convert them to .safetensors, or pass --allow-pickle if you trust "
                        "the source.")
        return
    if is_pickle(path):
        raise error(f"{what} {path.name} is a pickle checkpoint ({path.suffix.lower()}), which can run arbitrary "
                    "code when loaded. Convert it to .safetensors, or pass --allow-pickle if you trust its source.")
