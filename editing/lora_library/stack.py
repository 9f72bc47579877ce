"""Putting LoRAs into the shared model for one ``with`` block (``activate``), and the stack of active ones."""
from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path

from editing.lora_library.files import LoraError, check_loras, library_file, safe_name
from editing.lora_library.loading import LoadedLora, check_fits, check_stack, load_lora
from editing.sampling import unet_dtype

log = logging.getLogger(__name__)

# model -> [(adapter name, weight)] of the library LoRAs active while ``activate`` runs (nothing is stuck on the
# shared model itself; weak keys, so a dropped model leaves no entry)
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def _load_text_encoder_adapter(text_encoder, lora: LoadedLora, name: str, part: str = "text_encoder") -> None:
    """Inject ``lora``'s layers for ``part`` (``text_encoder``, or SDXL's ``text_encoder_2``) as adapter ``name``."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from models.diffusers_private import lora_config_from_state_dict

    sd = getattr(lora, part)
    # LoRA keys name CLIP modules without "text_model." (diffusers' converters drop it); a model whose modules
    # keep it (CLIPTextModelWithProjection: SDXL's second encoder) would otherwise load nothing, silently.
    modules = dict(text_encoder.named_modules())
    sd = {(f"text_model.{k}" if k.split(".lora_")[0] not in modules and f"text_model.{k.split('.lora_')[0]}" in modules
           else k): v for k, v in sd.items()}
    ranks = {k: v.shape[1] for k, v in sd.items() if k.endswith("lora_B.weight")}
    config = lora_config_from_state_dict(sd, getattr(lora, f"{part}_alphas"), getattr(lora, f"{part}_metadata"), ranks,
                                         is_unet=False)
    inject_adapter_in_model(config, text_encoder, adapter_name=name)
    result = set_peft_model_state_dict(text_encoder, sd, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        log.warning("LoRA %s: %d %s key(s) matched no layer (e.g. %s)", lora.path.name, len(result.unexpected_keys),
                    part, result.unexpected_keys[0])
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
    te2 = getattr(bundle, "text_encoder_2", None)  # SDXL's second text encoder
    family = getattr(getattr(bundle, "family", None), "name", None)
    model_name = model_name or getattr(bundle, "name", "the loaded model")
    loaded = [load_lora(spec, allow_pickle) for spec, _ in loras]
    check_stack(loaded)  # a mixed-family stack names two of its families, before any single LoRA's fit
    for lo in loaded:
        check_fits(lo, unet, te, model_name, family=family, text_encoder_2=te2)
    outer = active_loras(unet)
    outer_te = active_loras(te)
    outer_te2 = active_loras(te2) if te2 is not None else []
    added_unet, added_te, added_te2, names = [], [], [], []
    try:
        for lo, (_, w) in zip(loaded, loras):
            name = f"lib{next(_counter)}_{safe_name(lo.path.stem)}"
            names.append((name, w))
            if lo.unet:
                dtype = unet_dtype(unet)

                def prefixed(d):
                    return {f"unet.{k}": v for k, v in d.items()} if d else None

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
            if lo.text_encoder_2:  # check_fits refused it when the model has no second encoder
                _load_text_encoder_adapter(te2, lo, name, "text_encoder_2")
                added_te2.append((name, w))
        set_active(unet, outer + added_unet)
        _ACTIVE[unet] = outer + added_unet
        if added_te:
            set_active(te, outer_te + added_te)
            _ACTIVE[te] = outer_te + added_te
        if added_te2:
            set_active(te2, outer_te2 + added_te2)
            _ACTIVE[te2] = outer_te2 + added_te2
        if added_te or added_te2:
            clear_prompt_cache(bundle)
        log.info("LoRAs active: %s", ", ".join(f"{n}@{w:g}" for n, w in names))
        yield names
    finally:
        for name, _ in added_unet:
            delete_adapter(unet, name)
        for name, _ in added_te:
            delete_adapter(te, name)
        for name, _ in added_te2:
            delete_adapter(te2, name)
        set_active(unet, outer)
        _ACTIVE[unet] = outer
        if added_te:
            set_active(te, outer_te)
            _ACTIVE[te] = outer_te
        if added_te2:
            set_active(te2, outer_te2)
            _ACTIVE[te2] = outer_te2
        if added_te or added_te2:
            clear_prompt_cache(bundle)
        unet.requires_grad_(False)
        te.requires_grad_(False)
        if te2 is not None:
            te2.requires_grad_(False)


def load(bundle, spec: str | Path, weight: float = 1.0, allow_pickle: bool = False, *, trusted: bool = True):
    """``activate`` for one LoRA: ``with load(bundle, "zwx-dog", 0.8): ...``."""
    return activate(bundle, [(spec, weight)], allow_pickle=allow_pickle, trusted=trusted)
