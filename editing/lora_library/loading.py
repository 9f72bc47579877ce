"""Reading a LoRA (diffusers' converters: kohya/A1111 keys too) and checking that it fits the loaded model."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from editing.lora_library.files import LoraError, _read_file, read_card, resolve
from models.cache import LRU

# Cross-attention width (to_k input) -> the base family a LoRA was trained for.
BASE_BY_CONTEXT_DIM = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}


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
