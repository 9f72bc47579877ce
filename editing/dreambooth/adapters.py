"""The subject LoRA on the shared model: add it (seeded), read / restore its weights, save it, remove it.

LoRA (Hu et al. 2021, eq. 3): h = W₀x + (α/r)·B·A·x with A Gaussian and B = 0 at start, so W = W₀
exactly until training moves B; α = r gives scale 1 whatever the rank. Everything goes through peft
named adapters (``ADAPTER``) and diffusers' LoRA safetensors format.
"""
from __future__ import annotations

from pathlib import Path

import torch

ADAPTER = "dreambooth"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention projection of the UNet
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP self-attention projections


def lora_config(rank: int, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)


def add_adapters(unet, te, rank: int, seed: int, text_encoder: bool) -> list[torch.nn.Parameter]:
    """Add the LoRA (A drawn from ``seed``, the global RNG untouched), activate it; its parameters in fp32."""
    from peft import inject_adapter_in_model

    from editing import lora_library

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(lora_config(rank, UNET_TARGETS), adapter_name=ADAPTER)
        if text_encoder:
            inject_adapter_in_model(lora_config(rank, TEXT_TARGETS), te, adapter_name=ADAPTER)
    lora_library.set_active(unet, [(ADAPTER, 1.0)])
    if text_encoder:
        lora_library.set_active(te, [(ADAPTER, 1.0)])
    params = []
    for mod in [unet] + ([te] if text_encoder else []):
        for n, p in mod.named_parameters():
            if f".{ADAPTER}." in n:
                p.data = p.data.float()  # train the adapter in fp32 even when the frozen model is fp16
                p.requires_grad_(True)
                params.append(p)
    return params


def lora_state(unet, te, text_encoder: bool) -> dict[str, torch.Tensor]:
    """The adapter's peft weights, keys ``unet.…`` / ``text_encoder.…``."""
    from peft import get_peft_model_state_dict

    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    if text_encoder:
        sd.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te, adapter_name=ADAPTER).items()})
    return sd


def load_lora_state(unet, te, lora: dict[str, torch.Tensor], text_encoder: bool) -> None:
    """Put weights of ``lora_state``'s form back into the adapter."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(unet, {k[5:]: v for k, v in lora.items() if k.startswith("unet.")}, ADAPTER)
    if text_encoder:
        set_peft_model_state_dict(te, {k[13:]: v for k, v in lora.items() if k.startswith("text_encoder.")}, ADAPTER)


def save_lora_file(path: Path, sd: dict[str, torch.Tensor], rank: int) -> None:
    """``lora_state`` -> a diffusers-format LoRA safetensors file (UNet, and text encoder if trained)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers

    unet_sd = convert_state_dict_to_diffusers({k[5:]: v.detach().float().cpu() for k, v in sd.items()
                                               if k.startswith("unet.")})
    te_raw = {k[13:]: v.detach().float().cpu() for k, v in sd.items() if k.startswith("text_encoder.")}
    te_sd = convert_state_dict_to_diffusers(te_raw) if te_raw else None
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(path.parent), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, weight_name=path.name,
        unet_lora_adapter_metadata=lora_config(rank, UNET_TARGETS).to_dict(),
        text_encoder_lora_adapter_metadata=lora_config(rank, TEXT_TARGETS).to_dict() if te_sd else None)


def remove_adapters(bundle, text_encoder: bool, gradient_checkpointing: bool) -> None:
    """Leave the shared model exactly as before training: no adapter, no checkpointing, eval, frozen."""
    from editing import lora_library

    unet, te = bundle.unet, bundle.text_encoder
    if gradient_checkpointing:
        unet.disable_gradient_checkpointing()
        if text_encoder:
            te.gradient_checkpointing_disable()
    for model in (unet, te):  # whatever was added, also when adding failed half-way
        if ADAPTER in (getattr(model, "peft_config", None) or {}):
            lora_library.delete_adapter(model, ADAPTER)
    lora_library.set_active(unet, lora_library.active_loras(unet))
    if text_encoder:
        lora_library.clear_prompt_cache(bundle)
    for mod in (unet, te):
        mod.eval()
        mod.requires_grad_(False)
