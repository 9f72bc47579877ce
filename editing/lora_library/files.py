"""The library folder: LoRA files by name, their cards, reading a file safely, and cache identities."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editing.requests import EditError
from models.safety import PICKLE_SUFFIXES, check_weights_file

ENV_DIR = "DRAGCANVAS_LORA_DIR"
LORA_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


class LoraError(EditError):
    """A LoRA cannot be found, is unsafe to read, or does not fit the loaded model."""


def library_dir() -> Path:
    """``$DRAGCANVAS_LORA_DIR`` or ``~/.cache/dragcanvas/loras`` (created on first use)."""
    d = Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "dragcanvas" / "loras").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass(frozen=True)
class LoraInfo:
    name: str
    path: Path
    card: dict = field(default_factory=dict, compare=False)  # the trainer's JSON card, {} for third-party files

    @property
    def label(self) -> str:
        """One line for pickers: name and, for our own LoRAs, what prompt calls it up."""
        prompt = self.card.get("instance_prompt")
        return f"{self.name} — “{prompt}”" if prompt else self.name


def safe_name(text: str) -> str:
    """A file-system and adapter-safe name: letters, digits, ``-`` and ``_``."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", (text or "").strip()).strip("-_")
    return s[:64] or "lora"


def read_card(path: Path) -> dict:
    card = Path(path).with_suffix(".json")
    try:
        return json.loads(card.read_text()) if card.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def list_loras(directory: Path | None = None) -> list[LoraInfo]:
    """Every LoRA in the library, by name (``.safetensors`` only; pickle files are never listed)."""
    d = Path(directory) if directory else library_dir()
    if not d.is_dir():
        return []
    return [LoraInfo(p.stem, p, read_card(p)) for p in sorted(d.glob("*.safetensors")) if not p.name.startswith(".")]


def add_to_library(src: str | Path, name: str | None = None, allow_pickle: bool = False) -> LoraInfo:
    """Copy a LoRA file (e.g. an upload) into the library after checking it can be read; returns its entry."""
    import shutil

    src = Path(src)
    _check_file(src, allow_pickle)
    state = _read_file(src, allow_pickle)
    if not any("lora" in k for k in state):
        raise LoraError(f"{src.name} holds no LoRA weights (no key contains 'lora').")
    dest = library_dir() / f"{safe_name(name or src.stem)}.safetensors"
    if src.suffix.lower() == ".safetensors":
        shutil.copyfile(src, dest)
    else:  # store converted: the library only ever holds safetensors
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(dest))
    if src.with_suffix(".json").is_file():
        shutil.copyfile(src.with_suffix(".json"), dest.with_suffix(".json"))
    return LoraInfo(dest.stem, dest, read_card(dest))


def resolve(spec: str | Path, allow_pickle: bool = False) -> Path:
    """A LoRA spec (library name, file, or folder holding one LoRA file) -> the file. Raises LoraError."""
    text = str(spec).strip()
    if not text:
        raise LoraError("Empty LoRA name: pick a LoRA from the library or give a .safetensors file.")
    p = Path(text).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in LORA_SUFFIXES)
        safe = [f for f in files if f.suffix.lower() == ".safetensors"]
        preferred = [f for f in safe if f.name == "pytorch_lora_weights.safetensors"]
        pick = preferred or safe or files
        if len(pick) != 1:
            raise LoraError(f"LoRA folder {p} holds {len(pick) or 'no'} LoRA files; name the file to use."
                            if pick else f"LoRA folder {p} holds no .safetensors file.")
        p = pick[0]
    elif not p.is_file() and (p.suffix.lower() in LORA_SUFFIXES or "/" in text or os.sep in text):
        raise LoraError(f"LoRA file {p} does not exist.")
    elif not p.is_file():
        lib = library_dir()
        for cand in (lib / f"{text}.safetensors", lib / text):
            if cand.is_file():
                p = cand
                break
        else:
            names = ", ".join(i.name for i in list_loras()) or "none yet"
            raise LoraError(f"LoRA {text!r} not found: no such file, and no LoRA of that name in the library "
                            f"{lib} (available: {names}).")
    _check_file(p, allow_pickle)
    return p


def _check_file(p: Path, allow_pickle: bool) -> None:
    if not p.is_file():
        raise LoraError(f"LoRA file {p} does not exist.")
    check_weights_file(p, allow_pickle, "LoRA file", LoraError)  # the one pickle policy (models/safety.py)
    if p.suffix.lower() not in LORA_SUFFIXES:
        raise LoraError(f"{p.name} is not a LoRA file: use .safetensors (or .bin/.ckpt/.pt with --allow-pickle).")


def _read_file(p: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        assert allow_pickle
        obj = torch.load(str(p), map_location="cpu", weights_only=False)  # the user allowed pickle
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict):
            raise LoraError(f"{p.name} holds a {type(obj).__name__}, not a LoRA state dict.")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    except LoraError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one actionable line
        raise LoraError(f"Cannot read LoRA file {p.name} ({type(e).__name__}: {str(e)[:120]}).") from None


def cache_key(loras, allow_pickle: bool = False) -> tuple:
    """A hashable identity of ((spec, weight), …) for per-image caches computed under these LoRAs: the
    resolved file and its mtime, so a retrained LoRA of the same name is not mistaken for the old one."""
    out = []
    for spec, weight in loras or ():
        try:
            p = resolve(spec, allow_pickle)
            out.append((str(p.resolve()), p.stat().st_mtime_ns, float(weight)))
        except EditError:
            out.append((str(spec), None, float(weight)))
    return tuple(out)
