"""Putting LoRAs into the shared model for one ``with`` block (``activate``), and the stack of active ones."""
from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path

from editing.lora_library.files import LoraError, check_loras, library_file, safe_name
from editing.lora_library.loading import LoadedLora, check_fits, load_lora

log = logging.getLogger(__name__)

# model -> [(adapter name, weight)] of the library LoRAs active while ``activate`` runs (nothing is stuck on the
# shared model itself; weak keys, so a dropped model leaves no entry)
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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
def activate(bundle, loras, allow_pickle: bool = False, model_name: str | None = None, *, trusted: bool = True):
    """Load ``loras`` ((spec, weight), …) as peft adapters for the duration of the block; remove them after.

    Everything is resolved and checked before the model is touched, so a bad LoRA changes nothing.
    Adapters already active (an outer ``activate``) stay active underneath. ``trusted=False`` (a client of the
    app): library names only and no pickle, whatever ``allow_pickle`` says (files.py, ``library_file``).
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    loras = check_loras(loras)
    if not loras:
        yield []
        return
    if not trusted:  # resolved to library files here, so nothing below ever sees a client's path
        loras = [(library_file(spec), w) for spec, w in loras]
        allow_pickle = False
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


def load(bundle, spec: str | Path, weight: float = 1.0, allow_pickle: bool = False, *, trusted: bool = True):
    """``activate`` for one LoRA: ``with load(bundle, "zwx-dog", 0.8): ...``."""
    return activate(bundle, [(spec, weight)], allow_pickle=allow_pickle, trusted=trusted)
