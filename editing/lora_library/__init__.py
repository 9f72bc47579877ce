"""The LoRA library: LoRA files by name, and ``activate`` — the context manager every edit runs inside.

A *LoRA spec* is a library name (``zwx-dog``), a ``.safetensors`` file, or a folder holding one. The
library is a folder (``~/.cache/dragcanvas/loras``, or ``$DRAGCANVAS_LORA_DIR``) of
``NAME.safetensors`` files, each optionally with a ``NAME.json`` card written by the DreamBooth trainer.

Files are read with diffusers' ``StableDiffusionLoraLoaderMixin.lora_state_dict`` (it converts
kohya/A1111 ``lora_unet_*``/``lora_te_*`` keys), then loaded as named peft adapters: into the UNet with
diffusers' ``load_lora_into_unet``, into the CLIP text encoder with peft directly (transformers' own
adapter integration needs a newer peft than we pin). ``activate`` removes them again on exit, so the
shared model computes exactly what it did before.

Clients of the app (UI, API) name LoRAs by library name only: ``resolve(..., trusted=False)`` /
``activate(..., trusted=False)`` / ``Editor(trust_lora_paths=False)`` (files.py says why).
"""
from editing.lora_library.files import (
                                        ENV_DIR,
                                        LORA_SUFFIXES,
                                        MAX_LORAS,
                                        WEIGHT_LIMIT,
                                        LoraError,
                                        LoraInfo,
                                        add_to_library,
                                        cache_key,
                                        check_loras,
                                        library_dir,
                                        library_file,
                                        list_loras,
                                        read_card,
                                        resolve,
                                        safe_name,
)
from editing.lora_library.loading import BASE_BY_CONTEXT_DIM, LoadedLora, check_fits, guess_base, load_lora
from editing.lora_library.stack import activate, active_loras, clear_prompt_cache, delete_adapter, load, set_active

__all__ = [
    "BASE_BY_CONTEXT_DIM",
    "ENV_DIR",
    "LORA_SUFFIXES",
    "LoadedLora",
    "LoraError",
    "LoraInfo",
    "MAX_LORAS",
    "WEIGHT_LIMIT",
    "activate",
    "active_loras",
    "add_to_library",
    "cache_key",
    "check_fits",
    "check_loras",
    "clear_prompt_cache",
    "delete_adapter",
    "guess_base",
    "library_dir",
    "library_file",
    "list_loras",
    "load",
    "load_lora",
    "read_card",
    "resolve",
    "safe_name",
    "set_active",
]
