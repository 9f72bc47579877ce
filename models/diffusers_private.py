"""Every private (underscore / internal-module) diffusers API that DragCanvas uses, one small function each.

Rule: a public diffusers API is used wherever one fits; these exist only where none does. Each function
has a test in ``tests/test_boundaries.py`` that runs it on the tiny model, so a diffusers upgrade that
renames or changes one fails there, loudly and by name, instead of deep inside an edit.
Written against diffusers 0.42 (``requirements.txt`` pins it).

Why IP-Adapter needs them: the public route, ``pipeline.load_ip_adapter`` (which calls the private
``UNet2DConditionLoadersMixin._load_ip_adapter_weights``), replaces *every* attention processor of the
UNet (our custom self-attention processors included) and ``unload_ip_adapter`` puts back diffusers'
defaults rather than what was installed before. DragCanvas must put IP processors on the cross-attention
layers only and restore the previous processors exactly, so it builds the same objects with the same
converters that ``_load_ip_adapter_weights`` uses and installs them with the public ``set_attn_processor``.
"""
from __future__ import annotations

import contextlib

import torch


def ip_adapter_attn_processors(unet, state_dict: dict) -> dict:
    """IP-Adapter attention processors (decoupled K/V per cross-attention layer) for ``unet``, keyed like
    ``unet.attn_processors``, from an IP-Adapter state dict ``{"image_proj": ..., "ip_adapter": ...}``.

    Private: ``UNet2DConditionModel._convert_ip_adapter_attn_to_diffusers``. The only public caller is
    ``load_ip_adapter``, which installs the result on every layer (see the module docstring)."""
    return unet._convert_ip_adapter_attn_to_diffusers([state_dict], low_cpu_mem_usage=False)


def ip_adapter_image_projection(unet, image_proj_state_dict: dict) -> torch.nn.Module:
    """The IP-Adapter image projection (CLIP image embedding -> extra context tokens) for ``unet``.

    Private: ``UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers``; it picks the
    projection class from the state dict's keys, which no public function exposes."""
    return unet._convert_ip_adapter_image_proj_to_diffusers(image_proj_state_dict, low_cpu_mem_usage=False)


@contextlib.contextmanager
def ip_image_projection_installed(unet, projection: torch.nn.Module):
    """Make ``unet`` read ``added_cond_kwargs["image_embeds"]`` through ``projection`` inside the block;
    the previous ``encoder_hid_proj`` and ``config.encoder_hid_dim_type`` are restored on exit.

    Internal: ``diffusers.models.embeddings.MultiIPAdapterImageProjection`` (not exported at the top level)
    and the ``encoder_hid_dim_type="ip_image_proj"`` convention that ``UNet2DConditionModel.forward``
    checks; both are what ``_load_ip_adapter_weights`` sets, and there is no public setter."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    before_proj, before_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    try:
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
        yield
    finally:
        unet.encoder_hid_proj = before_proj
        unet.register_to_config(encoder_hid_dim_type=before_type)


def lora_config_from_state_dict(state_dict: dict, network_alphas, metadata, rank_pattern: dict,
                                is_unet: bool = False):
    """A peft ``LoraConfig`` matching a diffusers-format LoRA state dict (ranks, alphas, target modules).

    Private: ``diffusers.utils.peft_utils._create_lora_config``. The public loaders
    (``load_lora_into_text_encoder``) need transformers' PEFT integration, which wants a newer peft than
    we pin, so the LoRA library injects text-encoder adapters with peft directly and needs this config.
    Offered here for ``editing/lora_library/stack.py`` (``_load_text_encoder_adapter``)."""
    from diffusers.utils.peft_utils import _create_lora_config

    return _create_lora_config(state_dict, network_alphas, metadata, rank_pattern, is_unet=is_unet)


def forget_peft_loaded(model) -> None:
    """Clear diffusers' private "a peft config was loaded" flag once a model's last adapter is deleted (no
    public call resets it; left set, the next ``load_lora_into_unet`` assumes adapters are present)."""
    if getattr(model, "_hf_peft_config_loaded", None):
        model._hf_peft_config_loaded = None
