"""The library folder: LoRA files by name, their cards, reading a file safely, and cache identities.

Who may name what (``resolve(..., trusted=)``): the CLI and the operator's own configuration are *trusted*
and may name any file or folder (pickles only with ``--allow-pickle``). Clients of the app (UI and API) are
not: they choose LoRAs by library name only (``library_file``), never a server path and never a pickle, even
when the operator passed ``--allow-pickle`` (that flag is the operator's trust in their own files), and the
messages they get never say whether some server path exists. A library name is never overwritten unless the
caller says ``replace=True``; every file written here goes through a temp file and a rename.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editing.images import atomic_write
from models.errors import EditError
from models.safety import PICKLE_SUFFIXES, check_weights_file, load_pickle_weights

ENV_DIR = "DRAGCANVAS_LORA_DIR"
LORA_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
MAX_LORAS = 8  # LoRAs active in one request; more only add artefacts (and each costs a load)
WEIGHT_LIMIT = 4.0  # |weight| of one LoRA; beyond this a LoRA only adds artefacts
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what safe_name makes: no '/', '.', '~' or spaces


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


def add_to_library(src: str | Path, name: str | None = None, allow_pickle: bool = False, *, replace: bool = False,
                   trusted: bool = True) -> LoraInfo:
    """Copy a LoRA file (e.g. an upload) into the library after checking it can be read; returns its entry.

    An existing name is never overwritten unless ``replace=True`` (LoraError naming it). ``trusted=False`` (a
    client's upload): safetensors only, whatever ``allow_pickle`` says. Written atomically (temp + rename)."""
    import shutil

    src = Path(src)
    allow_pickle = allow_pickle and trusted
    if not trusted and src.suffix.lower() != ".safetensors":
        raise LoraError(f"{src.name}: only .safetensors LoRA files can be added here (pickle files such as .pt, "
                        ".bin or .ckpt can run code when read).")
    _check_file(src, allow_pickle)
    state = _read_file(src, allow_pickle)
    if not any("lora" in k for k in state):
        raise LoraError(f"{src.name} holds no LoRA weights (no key contains 'lora').")
    dest = library_dir() / f"{safe_name(name or src.stem)}.safetensors"
    if dest.exists() and not replace:
        raise LoraError(f"A LoRA named {dest.stem!r} is already in the library: choose another name, or ask to "
                        "replace it.")
    if src.suffix.lower() == ".safetensors":
        def write(tmp):
            return shutil.copyfile(src, tmp)
    else:  # store converted: the library only ever holds safetensors
        from safetensors.torch import save_file

        def write(tmp):
            return save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    try:
        atomic_write(dest, write, replace=replace)
    except FileExistsError:
        raise LoraError(f"A LoRA named {dest.stem!r} is already in the library: choose another name, or ask to "
                        "replace it.") from None
    card = src.with_suffix(".json")
    if card.is_file():
        atomic_write(dest.with_suffix(".json"), lambda tmp: shutil.copyfile(card, tmp))
    elif replace:
        dest.with_suffix(".json").unlink(missing_ok=True)  # the old card described the replaced file
    return LoraInfo(dest.stem, dest, read_card(dest))


def library_file(spec) -> Path:
    """A library name -> its ``.safetensors`` file: the only LoRA a client (UI, API) may name. Paths, pickles and
    anything but a plain name are refused without looking at the file system outside the library."""
    text = spec.strip() if isinstance(spec, str) else ""
    if not text:
        raise LoraError("Empty LoRA name: pick a LoRA from the library.")
    if not NAME_RE.match(text):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise LoraError(f"LoRA {shown!r} is not a library name: pick one from the library (letters, digits, '-' "
                        "and '_'); files on the server cannot be named here.")
    p = library_dir() / f"{text}.safetensors"
    if not p.is_file():
        names = ", ".join(i.name for i in list_loras()) or "none yet"
        raise LoraError(f"No LoRA named {text!r} in the library (available: {names}).")
    return p


def check_loras(loras) -> list[tuple[str, float]]:
    """``((spec, weight), …)`` -> the same with float weights; at most ``MAX_LORAS``, finite weights within
    ±``WEIGHT_LIMIT``. Raises LoraError with one line."""
    out = []
    for item in loras or ():
        try:
            spec, weight = item
        except (TypeError, ValueError):
            raise LoraError(f"A LoRA must be given as (name, weight), got {str(item)[:40]!r}.") from None
        try:
            w = float(weight.strip() if isinstance(weight, str) else weight)
        except (TypeError, ValueError):
            w = math.nan
        if isinstance(weight, bool) or not (math.isfinite(w) and abs(w) <= WEIGHT_LIMIT):
            raise LoraError(f"LoRA {str(spec)[:40]!r}: the weight must be a number from -{WEIGHT_LIMIT:g} to "
                            f"{WEIGHT_LIMIT:g} (got {str(weight)[:20]!r}).")
        out.append((spec, w))
    if len(out) > MAX_LORAS:
        raise LoraError(f"{len(out)} LoRAs in one request; at most {MAX_LORAS} can be active at once.")
    return out


def resolve(spec: str | Path, allow_pickle: bool = False, *, trusted: bool = True) -> Path:
    """A LoRA spec (library name, file, or folder holding one LoRA file) -> the file. Raises LoraError.

    ``trusted=False`` (a client of the app): library names only (``library_file``), never a pickle."""
    if not trusted:
        return library_file(spec)
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
        obj = load_pickle_weights(p, "LoRA file", LoraError)  # the container only: weights_only=True
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict):
            raise LoraError(f"{p.name} holds a {type(obj).__name__}, not a LoRA state dict.")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    except LoraError:
        raise
    except Exception as e:  # a damaged or foreign file: one actionable line
        raise LoraError(f"Cannot read LoRA file {p.name} ({type(e).__name__}: {str(e)[:120]}).") from e


def cache_key(loras, allow_pickle: bool = False, trusted: bool = True) -> tuple:
    """A hashable identity of ((spec, weight), …) for per-image caches computed under these LoRAs: the
    resolved file and its mtime, so a retrained LoRA of the same name is not mistaken for the old one."""
    out = []
    for spec, weight in loras or ():
        try:
            p = resolve(spec, allow_pickle, trusted=trusted)
            out.append((str(p.resolve()), p.stat().st_mtime_ns, float(weight)))
        except EditError:
            out.append((str(spec), None, float(weight)))
    return tuple(out)
