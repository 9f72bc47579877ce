"""Model families: what a method needs to know about the loaded base model, in one place.

A ``Family`` is detected from the loaded components' configs (never from a name or file size), so a
fine-tune, a random-weight built-in and a single-file checkpoint of the same architecture agree:

========  ===============  ==========================  ============================================
family    UNet layout      text conditioning           prediction / native size
========  ===============  ==========================  ============================================
``sd15``  4 down / 4 up,   one CLIP ViT-L encoder,     ε, 512²
          attention in     last hidden state
          up_blocks[1..3]
``sd2``   as sd15, linear  one OpenCLIP-H encoder      ε (512² base) or v (768² "-v" models)
          projections,     (CLIPTextModel, gelu)
          heads per block
``sdxl``  3 down / 3 up,   two encoders (CLIP ViT-L +  ε, 1024²; pooled text + size/crop time ids
          attention in     OpenCLIP-bigG), penultimate  through ``added_cond_kwargs`` (``text_time``)
          up_blocks[0..1]  hidden states concatenated
========  ===============  ==========================  ============================================

Each family has an **inpainting variant**: the same layout with a 9-channel UNet input (noisy latent, mask,
masked-image latent; ``inpaint_input``). ``Family.inpainting`` says so and the label ends in "inpainting"; only
tasks that declare ``uses_inpainting_unet`` run on one (the Editor refuses the rest, naming the base model to pick).

The feature blocks are chosen so that each method reads the same *kind* of feature on every family:

- DragDiffusion's motion supervision reads the output of the up-block that ends at full latent
  resolution with the second-widest channels (SD-1.5 ``up_blocks[2]``: 640 channels; SDXL
  ``up_blocks[1]``: 640 channels, the same place in a UNet with one level fewer).
- DiffEditor / DragonDiffusion guidance reads the two up-blocks ending at 1/2 and full latent resolution
  (SD-1.5 ``(1, 2)``; SDXL ``(0, 1)``).
- Mutual self-attention (DragDiffusion) replaces the self-attention of the last attention up-blocks: six
  layers on SD-1.5 (``up_blocks.2``, ``up_blocks.3``: 3 transformers each) and six on SDXL
  (``up_blocks.1``: 3 transformers × 2 layers), so the same share of the decoder is shared.
- The memory bank of the guided methods records every up-block self-attention layer (``up_blocks``).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from models.choose import DEFAULT_HUB_MODEL, INPAINTING
from models.errors import EditError

FAMILIES = ("sd15", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# The inpainting variant's UNet input: noisy latent (4) + mask (1) + masked-image latent (4), in that order.
LATENT_CHANNELS, INPAINT_CHANNELS = 4, 9
# Each family's base model, for messages that send a user from an inpainting model to the one a task needs.
BASE_MODELS = {"sd15": DEFAULT_HUB_MODEL, "sd2": "stabilityai/stable-diffusion-2-1",
               "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


@dataclass(frozen=True)
class Family:
    """What the methods read instead of hard-coded SD-1.5 numbers."""

    name: str  # "sd15" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction" (from the scheduler config)
    native_resolution: int  # pixels per side the model was trained at (UNet sample_size × VAE factor)
    vae_scale_factor: int  # pixels per latent cell
    vae_scaling_factor: float  # latents are ``vae.encode(x).sample() × this``
    vae_upcast: bool  # the VAE overflows in fp16 (SDXL's original VAE): keep it in fp32
    drag_block: int  # DragDiffusion: the up-block whose output motion supervision reads
    guidance_blocks: tuple[int, ...]  # DiffEditor / DragonDiffusion: up-blocks whose outputs carry the energies
    mutual_layers: tuple[str, ...]  # DragDiffusion's mutual self-attention: attention-layer name prefixes
    bank_layers: tuple[str, ...]  # guided methods' memory bank: self-attention layer name prefixes
    text_encoders: int = 1  # 2 on SDXL
    pooled_dim: int = 0  # SDXL: width of the pooled text embedding (text_encoder_2's projection), else 0
    inpainting: bool = False  # the inpainting variant: a 9-channel UNet input (``inpaint_input``)

    @property
    def conditioned_on_size(self) -> bool:
        """SDXL's UNet also takes the pooled prompt and the size/crop time ids (``added_cond_kwargs``)."""
        return self.name == "sdxl"

    @property
    def label(self) -> str:
        """"Stable Diffusion 1.x", "SDXL inpainting", …: what the banner and the messages call the model."""
        return LABELS[self.name] + (INPAINTING if self.inpainting else "")


# Block choices per UNet layout (see the module docstring for why these are the same features).
_LAYOUT_BLOCKS = {
    "sd15": dict(drag_block=2, guidance_blocks=(1, 2), mutual_layers=("up_blocks.2", "up_blocks.3"),
                 bank_layers=("up_blocks",)),
    "sdxl": dict(drag_block=1, guidance_blocks=(0, 1), mutual_layers=("up_blocks.1",), bank_layers=("up_blocks",)),
}
_LAYOUT_BLOCKS["sd2"] = _LAYOUT_BLOCKS["sd15"]

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


class UnknownFamilyError(EditError):
    """The base model is none of sd15 / sd2 / sdxl; the message names what was found."""


def _found(u, te) -> str:
    return (f"UNet with {len(u.down_block_types)} down blocks {tuple(u.down_block_types)}, {u.in_channels} input "
            f"channels, text width {u.cross_attention_dim}, addition_embed_type={u.addition_embed_type!r}, "
            f"{len(te)} text encoder(s) ({', '.join(type(t).__name__ for t in te) or 'none'})")


def _family_name(u, text_encoders) -> str:
    te = [t for t in text_encoders if t is not None]
    why = None
    if u.in_channels not in (4, INPAINT_CHANNELS) or u.out_channels != 4:
        why = (f"only 4-channel latent models and {INPAINT_CHANNELS}-channel inpainting models are supported (a depth or "
               "instruct-pix2pix model has another number of input channels)")
    elif getattr(u, "class_embed_type", None) is not None or getattr(u, "encoder_hid_dim_type", None) not in (None, "ip_image_proj"):
        why = "class / image-conditioned UNets (upscalers, unCLIP) are not supported"
    elif any("CLIPText" not in type(t).__name__ for t in te):
        why = "only CLIP text encoders are supported"
    elif u.addition_embed_type == "text_time":
        if tuple(u.down_block_types) == _XL_DOWN and tuple(u.up_block_types) == _XL_UP and len(te) == 2:
            return "sdxl"
        why = "an SDXL-style UNet needs the SDXL block layout and two text encoders"
    elif u.addition_embed_type is not None:
        why = f"addition_embed_type {u.addition_embed_type!r} is not supported"
    elif tuple(u.down_block_types) == _SD_DOWN and tuple(u.up_block_types) == _SD_UP and len(te) == 1:
        # SD-2.x differs from SD-1.x in its text encoder (OpenCLIP-H, 1024 wide, gelu) and its linear
        # transformer projections; widths alone cannot tell the small built-in models apart.
        sd2 = u.cross_attention_dim == 1024 or bool(u.use_linear_projection) or \
            getattr(te[0].config, "hidden_act", "quick_gelu") != "quick_gelu"
        return "sd2" if sd2 else "sd15"
    else:
        why = "the block layout is neither SD-1.x/2.x (4 levels) nor SDXL (3 levels)"
    raise UnknownFamilyError(f"Unsupported base model: found a {_found(u, te)}; {why}. DragCanvas supports "
                             "Stable Diffusion 1.x, 2.x and SDXL bases.")


def detect(unet, scheduler, text_encoders, vae=None) -> Family:
    """The family of a loaded model from its configs; ``UnknownFamilyError`` names what was found otherwise.

    ``text_encoders``: the loaded text encoders in order (one, or two for SDXL)."""
    u = unet.config
    name = _family_name(u, list(text_encoders))
    pred = getattr(scheduler.config, "prediction_type", "epsilon") or "epsilon"
    if pred not in PREDICTION_TYPES:
        raise UnknownFamilyError(f"Unsupported prediction type {pred!r} in the scheduler config of this "
                                 f"{name} model; supported: {', '.join(PREDICTION_TYPES)}.")
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        scaling = float(vae.config.scaling_factor)
        # SDXL's original VAE overflows to inf/NaN in fp16; a fixed VAE (e.g. madebyollin/sdxl-vae-fp16-fix)
        # says so with force_upcast=False. SD-1.x/2.x VAEs are fine in fp16 whatever the flag says.
        upcast = name == "sdxl" and bool(getattr(vae.config, "force_upcast", True))
    else:
        factor, scaling, upcast = 8, 0.18215, False
    pooled = 0
    if name == "sdxl":
        te2 = list(text_encoders)[1]
        pooled = int(getattr(te2.config, "projection_dim", 0) or te2.config.hidden_size)
    return Family(name=name, prediction_type=pred, native_resolution=int(u.sample_size) * factor,
                  vae_scale_factor=factor, vae_scaling_factor=scaling, vae_upcast=upcast,
                  text_encoders=2 if name == "sdxl" else 1, pooled_dim=pooled, inpainting=is_inpainting(unet),
                  **_LAYOUT_BLOCKS[name])


def check_same(kind: str, made_for: str, family: Family, model_name: str, error=EditError) -> None:
    """Refuse an add-on (ControlNet, LoRA, ...) made for another family, naming both (raises ``error``)."""
    if made_for != family.name:
        raise error(f"{kind} is made for {LABELS.get(made_for, made_for)}, but the loaded model {model_name!r} "
                        f"is {family.label}: use one made for {family.label}.")


# ---- the inpainting variant ----------------------------------------------------------------------------------
def is_inpainting(unet) -> bool:
    """Whether ``unet`` (or its config) is an inpainting UNet: 9 input channels (latent + mask + masked image)."""
    cfg = getattr(unet, "config", unet)
    return int(getattr(cfg, "in_channels", LATENT_CHANNELS)) == INPAINT_CHANNELS


def inpaint_mask_latent(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask ``(B, 1, H, W)`` (1 = fill this, 0 = keep) -> the UNet's mask channel ``(B, 1, h, w)``: binarised
    at 1/2, then resized to the latent grid by nearest neighbour, as the inpainting models were trained (diffusers'
    inpainting pipelines do the same)."""
    return torch.nn.functional.interpolate((mask >= 0.5).to(mask.dtype), size=tuple(latent_size), mode="nearest")


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The picture the inpainting model sees: ``image`` ``(B, 3, H, W)`` in [-1, 1] with the area to fill set to 0
    (mid-gray), the input its masked-image latent is encoded from (``vae.encode(·) × scaling``)."""
    return image * (mask < 0.5).to(image.dtype)


def inpaint_input(z_t: torch.Tensor, mask_latent: torch.Tensor, masked_image_latent: torch.Tensor) -> torch.Tensor:
    """The 9-channel UNet input ``(B, 9, h, w)``: noisy latent (4), mask (1), masked-image latent (4), concatenated
    on channels in that order (the order the SD inpainting checkpoints were trained with). ``mask_latent`` and
    ``masked_image_latent`` with batch 1 are repeated to ``z_t``'s batch (CFG doubles it)."""
    b = z_t.shape[0]
    if z_t.shape[1] != LATENT_CHANNELS or mask_latent.shape[1] != 1 or masked_image_latent.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"inpaint_input takes 4 + 1 + 4 channels, got {z_t.shape[1]} + {mask_latent.shape[1]} + "
                         f"{masked_image_latent.shape[1]}")
    if mask_latent.shape[-2:] != z_t.shape[-2:] or masked_image_latent.shape[-2:] != z_t.shape[-2:]:
        raise ValueError(f"inpaint_input: mask {tuple(mask_latent.shape[-2:])} and masked-image latent "
                         f"{tuple(masked_image_latent.shape[-2:])} must be on the latent grid {tuple(z_t.shape[-2:])}")

    def batch(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[0] == b else t.expand(b, *t.shape[1:])

    return torch.cat([z_t, batch(mask_latent).to(z_t.dtype), batch(masked_image_latent).to(z_t.dtype)], dim=1)


@contextlib.contextmanager
def inpainting_conditioning(unet, mask_latent: torch.Tensor, masked_image_latent: torch.Tensor):
    """While open, every call of the inpainting ``unet`` with a 4-channel latent gets the mask and masked-image
    latent appended (``inpaint_input``, by a forward pre-hook), so the one denoise loop drives it unchanged."""
    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        if sample.shape[1] != LATENT_CHANNELS:
            return None
        full = inpaint_input(sample, mask_latent.to(sample.device), masked_image_latent.to(sample.device))
        return ((full, *args[1:]), kwargs) if args else (args, {**kwargs, "sample": full})

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ---- SDXL conditioning through one tensor ------------------------------------------------------------
# Installed once per module; weak, so an evicted bundle's UNet / VAE is freed with its hook.
_sdxl_hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_upcast_vaes: weakref.WeakSet = weakref.WeakSet()

def pack_sdxl(prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``(B, 77, D)`` text states + ``(B, P)`` pooled embedding -> ``(B, 78, D)``: the pooled embedding rides
    as one extra, zero-padded last token (P ≤ D: 1280 ≤ 2048 on SDXL)."""
    tok = prompt_embeds.new_zeros((prompt_embeds.shape[0], 1, prompt_embeds.shape[-1]))
    tok[:, 0, : pooled.shape[-1]] = pooled.to(prompt_embeds.dtype)
    return torch.cat([prompt_embeds, tok], dim=1)


def unpack_sdxl(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_sdxl``: ``(text states (B, 77, D), pooled (B, P))``."""
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def sdxl_time_ids(height: int, width: int) -> list[int]:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2): original size, crop top-left, target size — the
    image as it is, uncropped: ``(h, w, 0, 0, h, w)`` like diffusers' pipelines' defaults."""
    return [height, width, 0, 0, height, width]


def install_sdxl_conditioning(unet, n_tokens: int, pooled_dim: int, vae_factor: int):
    """Let every caller condition an SDXL UNet with one ``encoder_hidden_states`` tensor from ``pack_sdxl``.

    Why a pre-hook: every method (DragDiffusion's optimisation, the guided samplers, the LoRA trainers, the
    shared ``NoisePredictor``) calls ``unet(x, t, encoder_hidden_states=cond)`` with one conditioning tensor
    that it expands for CFG, slices per batch and caches; SDXL also needs the pooled text embedding and the
    size/crop time ids in ``added_cond_kwargs``. Packing the pooled embedding into the tensor keeps it aligned
    with its row through every expand / cat / chunk, so no method changes. The hook acts only on an
    ``encoder_hidden_states`` of ``n_tokens + 1`` tokens: it removes the extra token and fills what
    ``added_cond_kwargs`` lacks — ``text_embeds`` from that token, ``time_ids`` from the latent's size × the
    VAE factor (crop 0). diffusers' own SDXL pipelines pass 77-token embeddings and full ``added_cond_kwargs``
    themselves, so their calls pass through untouched. Installed once per UNet (idempotent)."""
    if unet in _sdxl_hooks:
        return _sdxl_hooks[unet]
    time_ids: dict = {}  # (h, w, device, dtype) -> (1, 6); built outside any CUDA-graph capture (first call)

    def pre_hook(module, args, kwargs):
        if len(args) > 2:
            kwargs["encoder_hidden_states"], args = args[2], args[:2]
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None or ehs.ndim != 3 or ehs.shape[1] != n_tokens + 1:
            return None
        text, pooled = unpack_sdxl(ehs, pooled_dim)
        added = dict(kwargs.get("added_cond_kwargs") or {})
        x = args[0] if args else kwargs["sample"]
        added.setdefault("text_embeds", pooled)
        if "time_ids" not in added:
            key = (x.shape[-2], x.shape[-1], ehs.device, ehs.dtype)
            if key not in time_ids:
                time_ids[key] = torch.tensor([sdxl_time_ids(x.shape[-2] * vae_factor, x.shape[-1] * vae_factor)],
                                             dtype=ehs.dtype, device=ehs.device)
            added["time_ids"] = time_ids[key].expand(x.shape[0], -1)
        kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"] = text, added
        return args, kwargs

    _sdxl_hooks[unet] = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return _sdxl_hooks[unet]


def install_vae_upcast(vae) -> None:
    """Inputs of an fp32 VAE kept beside an fp16 model are cast to fp32 (SDXL's VAE overflows in fp16), so
    callers keep passing ``x.to(bundle.dtype)``. Encoder and ``post_quant_conv`` are where ``encode`` /
    ``decode`` enter the network."""
    if vae in _upcast_vaes:
        return

    def cast(module, args):
        return tuple(a.to(torch.float32) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for m in (vae.encoder, vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder):
        m.register_forward_pre_hook(cast)
    _upcast_vaes.add(vae)


# ---- prediction type per UNet ----------------------------------------------------------------------------
_predictions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_prediction(unet, scheduler) -> None:
    """Remember what ``unet`` predicts and its training ᾱ schedule, for ``editing.sampling`` (which converts
    v-predictions to ε in one place). Only non-ε models are recorded: ε needs no conversion."""
    pred = getattr(scheduler.config, "prediction_type", "epsilon") or "epsilon"
    if pred == "epsilon":
        _predictions.pop(unet, None)
        return
    from diffusers import DDIMScheduler

    _predictions[unet] = (pred, DDIMScheduler.from_config(scheduler.config).alphas_cumprod.float())


def prediction_of(unet) -> tuple[str, torch.Tensor] | None:
    """``(prediction_type, alphas_cumprod)`` for a loaded non-ε UNet, else ``None`` (ε)."""
    return _predictions.get(unet)


def family_of_unet_config(cfg) -> str:
    """``sd15`` / ``sd2`` / ``sdxl`` from a UNet-shaped config alone (a ControlNet's, or a UNet's), for refusing
    an add-on made for another family: SDXL adds ``text_time`` embeddings; SD-2.x uses 1024-wide text (OpenCLIP-H)
    and linear transformer projections; the rest is SD-1.x."""
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if getattr(cfg, "cross_attention_dim", None) == 1024 or bool(getattr(cfg, "use_linear_projection", False)):
        return "sd2"
    return "sd15"


# Cross-attention (text) width of the published bases -> family, for add-ons that only show a width.
FAMILY_BY_TEXT_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
LABELS = {"sd15": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class Blocks:
    """The feature blocks of a UNet layout (the same values as its ``Family``; see the module docstring)."""

    drag_block: int
    guidance_blocks: tuple[int, ...]
    mutual_layers: tuple[str, ...]
    bank_layers: tuple[str, ...]


def unet_blocks(unet) -> Blocks:
    """The feature blocks for ``unet`` from its layout alone, for code that holds a UNet but no bundle (the
    methods' low-level functions, benchmarks on bare components). SDXL's 3-level layout or the 4-level one."""
    cfg = unet.config
    xl = getattr(cfg, "addition_embed_type", None) == "text_time" and tuple(cfg.up_block_types) == _XL_UP
    return Blocks(**_LAYOUT_BLOCKS["sdxl" if xl else "sd15"])
