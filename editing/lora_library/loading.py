"""Reading a LoRA (diffusers' converters: kohya/A1111 keys too) and checking that it fits the loaded model.

Formats read: diffusers / peft (``unet.…``, ``text_encoder.…``, SDXL's ``text_encoder_2.…``), the old
un-prefixed UNet-only layout, and kohya / A1111 (``lora_unet_…``, ``lora_te_…``; SDXL ``lora_te1_…`` /
``lora_te2_…``), all through diffusers' converters. Each LoRA gets the family it was made for
(``lora_family``) when its keys or widths tell; one made for another family than the loaded model, and a stack
mixing families, are refused with a message naming both."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editing.lora_library.files import LoraError, _read_file, read_card, resolve
from models import families
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
    foreign: list[str]  # keys for components we do not have (transformer, ...)
    card: dict
    text_encoder_2: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL's second text encoder
    text_encoder_2_alphas: dict | None = None
    text_encoder_2_metadata: dict | None = None
    family: str | None = None  # "sd15" | "sd2" | "sdxl" | "sd15/sd2" (4-level layout, width unknown) | None


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
    from diffusers.utils import convert_unet_state_dict_to_peft

    if not raw or not any("lora" in k.lower() for k in raw):
        raise LoraError(f"{path.name} holds no LoRA weights (no key contains 'lora').")
    metadata = _file_metadata(path)
    xl_keys = any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in raw)
    try:
        if xl_keys:  # SDXL's loader knows both text encoders (kohya te1/te2 included)
            from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Loader
        else:
            Loader = StableDiffusionLoraLoaderMixin
        state, alphas = Loader.lora_state_dict(dict(raw))
    except Exception as e:
        raise LoraError(f"{path.name} is not a LoRA diffusers can read ({type(e).__name__}: {str(e)[:120]}).") from None
    unet_sd, te_sd, te2_sd, foreign = {}, {}, {}, []
    for k, v in state.items():
        if k.startswith("unet."):
            unet_sd[k.removeprefix("unet.")] = v
        elif k.startswith("text_encoder_2."):
            te2_sd[k.removeprefix("text_encoder_2.")] = v
        elif k.startswith("text_encoder."):
            te_sd[k.removeprefix("text_encoder.")] = v
        elif "." in k and k.split(".")[0] in ("down_blocks", "mid_block", "up_blocks", "conv_in", "time_embedding"):
            unet_sd[k] = v  # old un-prefixed UNet-only format
        else:
            foreign.append(k)
    unet_sd = convert_unet_state_dict_to_peft(unet_sd) if unet_sd else {}
    te_sd, te2_sd = _text_encoder_to_peft(te_sd), _text_encoder_to_peft(te2_sd)

    def alphas_for(prefix):
        if not alphas:
            return None
        return {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.startswith(f"{prefix}.")} or None

    lora = LoadedLora(path, unet_sd, alphas_for("unet"), _split_metadata(metadata, "unet"),
                      te_sd, alphas_for("text_encoder"), _split_metadata(metadata, "text_encoder"),
                      foreign, read_card(path), te2_sd, alphas_for("text_encoder_2"),
                      _split_metadata(metadata, "text_encoder_2"))
    lora.family = lora_family(lora)
    return lora


def _text_encoder_to_peft(sd: dict) -> dict:
    """A text-encoder LoRA in peft keys (``<module>.lora_A.weight``), whatever diffusers' converter produced.

    diffusers infers the key format from a few tell-tale names (``to_out_lora`` ...); a LoRA on the query
    projections only has none of them, so the old diffusers format (``to_q_lora.down``) is then named."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    if not sd:
        return {}
    try:
        diff = convert_state_dict_to_diffusers(sd)
    except ValueError:
        if not any("_lora." in k for k in sd):
            raise
        diff = convert_state_dict_to_diffusers(sd, original_type=StateDictType.DIFFUSERS_OLD)
    return {k.removeprefix("text_model."): v for k, v in convert_state_dict_to_peft(diff).items()}


def lora_family(lora: LoadedLora) -> str | None:
    """The family a LoRA was made for, when its keys or widths tell (else ``None``).

    A second text encoder means SDXL; so do several transformer layers in one attention block
    (``transformer_blocks.1``: SDXL has 2 and 10, SD-1.x/2.x one). Attention in ``down_blocks.0`` or
    ``up_blocks.3`` means the 4-level SD-1.x/2.x layout (SDXL has neither); its text width then tells 1.x (768)
    from 2.x (1024)."""
    if lora.text_encoder_2 or any("text_encoder_2" in k or "lora_te2" in k for k in lora.foreign):
        return "sdxl"
    width = next((int(v.shape[1]) for k, v in lora.unet.items() if ".attn2.to_k.lora_A" in k), None)
    by_width = families.FAMILY_BY_TEXT_WIDTH.get(width)
    keys = list(lora.unet)
    if any(".transformer_blocks.1." in k for k in keys):
        return "sdxl"
    if any(k.startswith(("down_blocks.0.attentions", "up_blocks.3.")) for k in keys):
        return by_width if by_width in ("sd15", "sd2") else "sd15/sd2"
    return by_width


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
    except Exception:
        return None


def check_stack(loras: list[LoadedLora]) -> None:
    """Refuse a stack of LoRAs made for different families (naming two of them)."""
    known = [(lo, lo.family) for lo in loras if lo.family is not None]
    for lo, fam in known[1:]:
        first, ffam = known[0]
        if not (_same_family(fam, ffam) or _same_family(ffam, fam)):
            raise LoraError(f"The LoRA stack mixes families: {first.path.name} is made for {_FAMILY_LABELS[ffam]} "
                            f"but {lo.path.name} for {_FAMILY_LABELS[fam]}; use LoRAs made for one base model.")


def guess_base(lora: LoadedLora) -> str:
    """Which base model family a LoRA looks made for, from its layer widths and key names."""
    keys = " ".join(lora.foreign[:50])
    if lora.family in _FAMILY_LABELS:
        return _FAMILY_LABELS[lora.family]
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


_FAMILY_LABELS = {**families.LABELS, "sd15/sd2": "Stable Diffusion 1.x/2.x"}


def _same_family(made_for: str | None, family: str) -> bool:
    return made_for is None or made_for == family or (made_for == "sd15/sd2" and family in ("sd15", "sd2"))


def check_fits(lora: LoadedLora, unet, text_encoder, model_name: str = "the loaded model", *,
               family: str | None = None, text_encoder_2=None) -> None:
    """Raise LoraError (saying which base it seems made for) when the LoRA's layers do not fit the model.

    ``family``: the loaded model's (``bundle.family.name``; default: read from the UNet's config). A LoRA whose
    family is known and differs is refused naming both before any layer is compared."""
    family = family or families.family_of_unet_config(unet.config)
    if not _same_family(lora.family, family):
        raise LoraError(f"LoRA {lora.path.name} is made for {_FAMILY_LABELS[lora.family]}, but {model_name} is "
                        f"{families.LABELS[family]}: use a LoRA trained for {families.LABELS[family]}.")
    problems = []
    if lora.text_encoder_2 and text_encoder_2 is None:
        problems.append("it has layers for a second text encoder, which this model does not have")
    if not lora.unet and not lora.text_encoder:
        if lora.foreign:
            problems.append(f"its layers ({lora.foreign[0]}, …) belong to no part of a Stable Diffusion 1.x/2.x model")
        else:
            problems.append("it holds no UNet or text-encoder layers")
    for sd, model, what in ((lora.unet, unet, "UNet"), (lora.text_encoder, text_encoder, "text encoder"),
                            (lora.text_encoder_2, text_encoder_2, "second text encoder")):
        if not sd or model is None:
            continue
        modules = dict(model.named_modules())
        for k, v in sd.items():
            m = re.match(r"(.+)\.lora_([AB])\.weight$", k)
            if not m:
                continue
            mod = modules.get(m.group(1), modules.get(f"text_model.{m.group(1)}"))  # CLIP keys lose "text_model."
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
