"""The LoRA library: LoRA files by name, and ``activate`` — the context manager every edit runs inside.

A *LoRA spec* is a library name (``zwx-dog``), a ``.safetensors`` file, or a folder holding one. The
library is a folder (``~/.cache/dragcanvas/loras``, or ``$DRAGCANVAS_LORA_DIR``) of
``NAME.safetensors`` files, each optionally with a ``NAME.json`` card written by the DreamBooth trainer.

Files are read with diffusers' ``StableDiffusionLoraLoaderMixin.lora_state_dict`` (it converts
kohya/A1111 ``lora_unet_*``/``lora_te_*`` keys), then loaded as named peft adapters: into the UNet with
diffusers' ``load_lora_into_unet``, into the CLIP text encoder with peft directly (transformers' own
adapter integration needs a newer peft than we pin). ``activate`` removes them again on exit, so the
shared model computes exactly what it did before.
"""
from __future__ import annotations

import contextlib
import weakref
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editing.requests import EditError
from models.cache import LRU
from models.safety import PICKLE_SUFFIXES, check_weights_file

log = logging.getLogger(__name__)

ENV_DIR = "DRAGCANVAS_LORA_DIR"
LORA_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# model -> [(adapter name, weight)] of the library LoRAs active while ``activate`` runs (nothing is stuck on the
# shared model itself; weak keys, so a dropped model leaves no entry)
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Cross-attention width (to_k input) -> the base family a LoRA was trained for.
BASE_BY_CONTEXT_DIM = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}


class LoraError(EditError):
    """A LoRA cannot be found, is unsafe to read, or does not fit the loaded model."""


# ---- the library folder -------------------------------------------------------------------------
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


# ---- reading and checking a LoRA ------------------------------------------------------------------
@dataclass
class LoadedLora:
    """A LoRA file split per component, in peft key format (``<module>.lora_A.weight``)."""

    path: Path
    unet: dict[str, torch.Tensor]
    unet_alphas: dict | None
    unet_metadata: dict | None
    text_encoder: dict[str, torch.Tensor]
    text_encoder_alphas: dict | None
    text_encoder_metadata: dict | None
    foreign: list[str]  # keys for components we do not have (text_encoder_2, transformer, ...)
    card: dict


CACHE_SIZE = 8
_cache = LRU(CACHE_SIZE)  # (path, mtime, size) -> LoadedLora; a few small files
_cache_lock = threading.Lock()


def load_lora(spec: str | Path, allow_pickle: bool = False) -> LoadedLora:
    """Read (cached by file identity) and convert a LoRA with diffusers' converters."""
    path = resolve(spec, allow_pickle)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        if key in _cache:
            return _cache.get(key)
    loaded = _convert(path, _read_file(path, allow_pickle))  # outside the lock: reading may take a while
    with _cache_lock:
        _cache.put(key, loaded)
    return loaded


def _split_metadata(metadata: dict | None, prefix: str) -> dict | None:
    if not metadata:
        return None
    sub = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    return sub or None


def _convert(path: Path, raw: dict[str, torch.Tensor]) -> LoadedLora:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not raw or not any("lora" in k.lower() for k in raw):
        raise LoraError(f"{path.name} holds no LoRA weights (no key contains 'lora').")
    metadata = _file_metadata(path)
    try:
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(raw))
    except Exception as e:  # noqa: BLE001
        raise LoraError(f"{path.name} is not a LoRA diffusers can read ({type(e).__name__}: {str(e)[:120]}).") from None
    unet_sd, te_sd, foreign = {}, {}, []
    for k, v in state.items():
        if k.startswith("unet."):
            unet_sd[k.removeprefix("unet.")] = v
        elif k.startswith("text_encoder."):
            te_sd[k.removeprefix("text_encoder.")] = v
        elif "." in k and k.split(".")[0] in ("down_blocks", "mid_block", "up_blocks", "conv_in", "time_embedding"):
            unet_sd[k] = v  # old un-prefixed UNet-only format
        else:
            foreign.append(k)
    unet_sd = convert_unet_state_dict_to_peft(unet_sd) if unet_sd else {}
    te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd)) if te_sd else {}
    te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}

    def alphas_for(prefix):
        if not alphas:
            return None
        return {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.startswith(f"{prefix}.")} or None

    return LoadedLora(path, unet_sd, alphas_for("unet"), _split_metadata(metadata, "unet"),
                      te_sd, alphas_for("text_encoder"), _split_metadata(metadata, "text_encoder"),
                      foreign, read_card(path))


def _file_metadata(path: Path) -> dict | None:
    """The adapter configs diffusers writes into the safetensors header (``lora_adapter_metadata``)."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        raw = meta.get("lora_adapter_metadata")
        return json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - metadata is optional
        return None


def guess_base(lora: LoadedLora) -> str:
    """Which base model family a LoRA looks made for, from its layer widths and key names."""
    keys = " ".join(lora.foreign[:50])
    if "text_encoder_2" in keys or "lora_te2" in keys:
        return "SDXL"
    if any(k.startswith(("transformer.", "lora_transformer")) for k in lora.foreign):
        return "a transformer (DiT) model such as SD3 or Flux"
    if lora.card.get("base_model"):
        return f"{lora.card['base_model']!r} (from its card)"
    for k, v in lora.unet.items():
        if ".attn2.to_k.lora_A" in k:
            return BASE_BY_CONTEXT_DIM.get(int(v.shape[1]), f"a model with {int(v.shape[1])}-wide text embeddings")
    for k, v in lora.text_encoder.items():
        if ".q_proj.lora_A" in k:
            return BASE_BY_CONTEXT_DIM.get(int(v.shape[1]), f"a text encoder {int(v.shape[1])} wide")
    return "another model"


def check_fits(lora: LoadedLora, unet, text_encoder, model_name: str = "the loaded model") -> None:
    """Raise LoraError (saying which base it seems made for) when the LoRA's layers do not fit the model."""
    problems = []
    if not lora.unet and not lora.text_encoder:
        if lora.foreign:
            problems.append(f"its layers ({lora.foreign[0]}, …) belong to no part of a Stable Diffusion 1.x/2.x model")
        else:
            problems.append("it holds no UNet or text-encoder layers")
    for sd, model, what in ((lora.unet, unet, "UNet"), (lora.text_encoder, text_encoder, "text encoder")):
        if not sd:
            continue
        modules = dict(model.named_modules())
        for k, v in sd.items():
            m = re.match(r"(.+)\.lora_([AB])\.weight$", k)
            if not m:
                continue
            mod = modules.get(m.group(1))
            mod = getattr(mod, "base_layer", mod)
            if mod is None:
                problems.append(f"the {what} has no layer {m.group(1)}")
                break
            want_in = getattr(mod, "in_features", getattr(mod, "in_channels", None))
            want_out = getattr(mod, "out_features", getattr(mod, "out_channels", None))
            got = int(v.shape[1]) if m.group(2) == "A" else int(v.shape[0])
            want = want_in if m.group(2) == "A" else want_out
            if want is not None and got != want:
                problems.append(f"{what} layer {m.group(1)} is {want} wide here but {got} in the LoRA")
                break
    if problems:
        raise LoraError(f"LoRA {lora.path.name} does not fit {model_name}: {problems[0]}. It seems to be made for "
                        f"{guess_base(lora)}; use a LoRA trained for this base model.")


# ---- putting LoRAs into the model ----------------------------------------------------------------
def active_loras(unet) -> list[tuple[str, float]]:
    """(adapter name, weight) of the library LoRAs active on ``unet`` now (the identity LoRA stacks on these)."""
    return list(_ACTIVE.get(unet) or [])


def clear_prompt_cache(bundle) -> None:
    """Text embeddings cached by the bundle are stale once the text encoder changes."""
    clear = getattr(bundle, "clear_prompt_cache", None)
    if callable(clear):
        clear()
    elif isinstance(getattr(bundle, "_prompt_cache", None), dict):
        bundle._prompt_cache.clear()


def _load_text_encoder_adapter(text_encoder, lora: LoadedLora, name: str) -> None:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from models.diffusers_private import lora_config_from_state_dict

    sd = lora.text_encoder
    ranks = {k: v.shape[1] for k, v in sd.items() if k.endswith("lora_B.weight")}
    config = lora_config_from_state_dict(sd, lora.text_encoder_alphas, lora.text_encoder_metadata, ranks, is_unet=False)
    inject_adapter_in_model(config, text_encoder, adapter_name=name)
    set_peft_model_state_dict(text_encoder, sd, adapter_name=name)
    dtype = next(p for n, p in text_encoder.named_parameters() if ".lora_" not in n).dtype
    text_encoder.to(dtype=dtype)


def delete_adapter(model, name: str) -> None:
    """Remove adapter ``name`` from every peft layer of ``model`` and from its ``peft_config``."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    from models.diffusers_private import forget_peft_loaded

    delete_adapter_layers(model, name)
    cfg = getattr(model, "peft_config", None)
    if isinstance(cfg, dict):
        cfg.pop(name, None)
        if not cfg:
            with contextlib.suppress(AttributeError):
                del model.peft_config
            forget_peft_loaded(model)


def set_active(model, adapters: list[tuple[str, float]]) -> None:
    """Activate exactly ``adapters`` (name, weight) on every peft layer of ``model``; freeze them all."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    present = set()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            present.update(getattr(m, "lora_A", {}).keys())
    adapters = [(n, w) for n, w in adapters if n in present]
    if present:
        set_weights_and_activate_adapters(model, [n for n, _ in adapters], [w for _, w in adapters])
    model.requires_grad_(False)  # peft's set_adapter makes active adapters trainable; we never want that here


_counter = iter(range(1, 1 << 62))


@contextlib.contextmanager
def activate(bundle, loras, allow_pickle: bool = False, model_name: str | None = None):
    """Load ``loras`` ((spec, weight), …) as peft adapters for the duration of the block; remove them after.

    Everything is resolved and checked before the model is touched, so a bad LoRA changes nothing.
    Adapters already active (an outer ``activate``) stay active underneath.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    loras = [(s, float(w)) for s, w in (loras or ())]
    if not loras:
        yield []
        return
    unet, te = bundle.unet, bundle.text_encoder
    model_name = model_name or getattr(bundle, "name", "the loaded model")
    loaded = [load_lora(spec, allow_pickle) for spec, _ in loras]
    for lo in loaded:
        check_fits(lo, unet, te, model_name)
    outer = active_loras(unet)
    outer_te = active_loras(te)
    added_unet, added_te, names = [], [], []
    try:
        for lo, (_, w) in zip(loaded, loras):
            name = f"lib{next(_counter)}_{safe_name(lo.path.stem)}"
            names.append((name, w))
            if lo.unet:
                dtype = next(p for n, p in unet.named_parameters() if ".lora_" not in n).dtype
                prefixed = lambda d: {f"unet.{k}": v for k, v in d.items()} if d else None
                StableDiffusionLoraLoaderMixin.load_lora_into_unet(
                    prefixed(lo.unet), None if lo.unet_metadata else prefixed(lo.unet_alphas), unet=unet,
                    adapter_name=name, metadata=prefixed(lo.unet_metadata))
                if name not in (getattr(unet, "peft_config", None) or {}):
                    raise LoraError(f"LoRA {lo.path.name}: none of its UNet layers could be loaded.")
                added_unet.append((name, w))
                for n, p in unet.named_parameters():
                    if f".{name}." in n:
                        p.data = p.data.to(dtype)
            if lo.text_encoder:
                _load_text_encoder_adapter(te, lo, name)
                added_te.append((name, w))
        set_active(unet, outer + added_unet)
        _ACTIVE[unet] = outer + added_unet
        if added_te:
            set_active(te, outer_te + added_te)
            _ACTIVE[te] = outer_te + added_te
            clear_prompt_cache(bundle)
        log.info("LoRAs active: %s", ", ".join(f"{n}@{w:g}" for n, w in names))
        yield names
    finally:
        for name, _ in added_unet:
            delete_adapter(unet, name)
        for name, _ in added_te:
            delete_adapter(te, name)
        set_active(unet, outer)
        _ACTIVE[unet] = outer
        if added_te:
            set_active(te, outer_te)
            _ACTIVE[te] = outer_te
            clear_prompt_cache(bundle)
        unet.requires_grad_(False)
        te.requires_grad_(False)


def load(bundle, spec: str | Path, weight: float = 1.0, allow_pickle: bool = False):
    """``activate`` for one LoRA: ``with load(bundle, "zwx-dog", 0.8): ...``."""
    return activate(bundle, [(spec, weight)], allow_pickle=allow_pickle)
