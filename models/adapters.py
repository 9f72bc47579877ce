"""Structure and image-prompt adapters for the loaded base model: ControlNet, T2I-Adapter, IP-Adapter.

A *spec* is one of
- ``tiny``: seeded random weights built in code to match the loaded base model (any VAE factor), so
  every mode runs offline (tests, CPU demos);
- a local diffusers folder (``config.json`` + weights), e.g. a downloaded ``lllyasviel/sd-controlnet-canny``;
- a Hugging Face Hub id (``owner/name``; for IP-Adapter ``owner/name:path/in/repo.safetensors``,
  default ``h94/IP-Adapter:models/ip-adapter_sd15.safetensors``);
- for IP-Adapter also a local ``.safetensors`` file in the IP-Adapter layout (``image_proj.*``,
  ``ip_adapter.*``) with its CLIP image encoder in ``image_encoder/`` next to it or one folder up.
Pickle weights (``.bin``, ``.pth``, ``.ckpt``, ``.pt``) are refused unless ``allow_pickle=True``.
A unit made for another model family (an SDXL ControlNet on SD-1.5, an SD-1.5 IP-Adapter on SDXL, ...) is
refused with a message naming both families (``models/families.py``).

Public API::

    controlnet(bundle, spec, allow_pickle=False) -> ControlNetModel          # cached
    t2i_adapter(bundle, spec, allow_pickle=False) -> T2IAdapter              # cached
    with ip_adapter(bundle, spec, allow_pickle=False, scale=0.6) as ip:      # installs, then restores
        emb = ip.embed([ref_image])        # (1, n_images, D) CLIP image embeddings
        ip.set_scale(0.8)
        ip.added_cond_kwargs(emb, batch)   # {"image_embeds": [...]} for a direct ``unet(...)`` call
        ip.pipeline_embeds(emb, cfg=True)  # ``ip_adapter_image_embeds=`` for diffusers pipelines

``ip_adapter`` puts IP attention processors on the UNet's cross-attention (``attn2``) layers only,
leaves every other processor (e.g. a custom self-attention processor installed earlier) in place,
sets the UNet's image projection, and restores all three on exit — also after an exception.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import diffusers_private, families
from models.cache import LRU
from models.errors import EditError
from models.safety import PICKLE_SUFFIXES, check_weights_file, load_pickle_weights

log = logging.getLogger(__name__)

DEFAULT_IP_WEIGHT = "models/ip-adapter_sd15.safetensors"
DEFAULT_IP_WEIGHTS = {"sd15": DEFAULT_IP_WEIGHT, "sdxl": "sdxl_models/ip-adapter_sdxl.safetensors"}  # in h94/IP-Adapter
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_SEED = 1234


class AdapterError(EditError):
    """An adapter or ControlNet cannot be found or does not fit the base model; the message says what to do."""


CACHE_SIZE = 8  # adapters per base UNet: a ControlNet is ~1.4 GB in fp16 on SD-1.5, so keep a handful
# One LRU per base UNet, dropped with it: bundles are evicted by the loader's LRU, and an ``id()`` key could be
# reused by a later UNet and hand it adapters built for another model.
_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _cached(bundle, kind: str, spec: str, make):
    with _lock:
        cache = _caches.get(bundle.unet)
        if cache is None:
            cache = _caches[bundle.unet] = LRU(CACHE_SIZE)
        return cache.get_or((kind, spec), make)[0]


def _clean(spec, what: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise AdapterError(f"No {what} given: use 'tiny', a local folder, or a Hugging Face Hub id.")
    return spec.strip()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _from_pretrained(cls, spec: str, bundle, allow_pickle: bool, what: str):
    """A local diffusers folder or a Hub id -> ``cls`` on the bundle's device and dtype."""
    path = Path(spec).expanduser()
    if path.exists():  # a missing file is reported as missing below; Hub ids are guarded by use_safetensors
        check_weights_file(path, allow_pickle, what, AdapterError)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise AdapterError(f"{what} folder {path.name!r} has no config.json: it is not a diffusers {cls.__name__}.")
        source, local = str(path), True
    elif path.suffix.lower() in PICKLE_SUFFIXES + (".safetensors",):
        if not path.exists():
            raise AdapterError(f"{what} file {path.name!r} does not exist.")
        raise AdapterError(f"{what} {path.name} is a single weight file; put it in a folder with its "
                           "config.json (the diffusers layout) and pass the folder.")
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        source, local = spec, _offline()
    else:
        raise AdapterError(f"Unknown {what} {spec!r}: not 'tiny', not an existing folder, and not a Hub id "
                           "of the form owner/name.")
    if path.is_dir():
        _check_folder_class(path, cls, what)
    try:
        model = cls.from_pretrained(source, torch_dtype=bundle.dtype, local_files_only=local,
                                    use_safetensors=None if allow_pickle else True)
    except Exception as e:  # one actionable line for every load failure
        first = (str(e).splitlines() or [""])[0][:160]
        if path.is_dir():
            raise AdapterError(f"Could not load {what} from the folder {spec!r} ({type(e).__name__}: {first}): "
                               f"it must hold a diffusers {cls.__name__} (config.json + weights).") from e
        raise AdapterError(f"Could not load {what} {spec!r} ({type(e).__name__}: {first}). Check the Hub id: it is "
                           "missing from the local Hugging Face cache and could not be downloaded. Download it "
                           "once with internet, pass a local folder, or use 'tiny'.") from e
    return model.to(bundle.device).eval().requires_grad_(False)


def _check_folder_class(path: Path, cls, what: str) -> None:
    """A folder whose config names another class (a UNet, a VAE, a T2I-Adapter given as a ControlNet, ...)."""
    import json

    try:
        name = json.loads((path / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        raise AdapterError(f"{what} folder {path.name!r} has an unreadable config.json.") from None
    if name and name != cls.__name__:
        raise AdapterError(f"{what} folder {path.name!r} holds a {name}, not a {cls.__name__}: pass a {what} folder.")


def _place(module: torch.nn.Module, bundle) -> torch.nn.Module:
    module = module.to(bundle.device)
    if next(module.parameters()).dtype != bundle.dtype:
        module = module.to(dtype=bundle.dtype)
    return module.eval().requires_grad_(False)


def _cond_embedding_channels(vae_factor: int) -> tuple[int, ...]:
    """ControlNet's condition encoder halves the size len-1 times: one stage per factor of 2 of the VAE."""
    n = round(np.log2(vae_factor))
    return tuple([8, 16, 32, 32, 64][: n + 1]) if n <= 4 else (16,) * (n + 1)


# ---- ControlNet ------------------------------------------------------------------------------------
def controlnet(bundle, spec: str, allow_pickle: bool = False):
    """Resolve a ControlNet spec for ``bundle`` (cached). ``tiny`` = ``ControlNetModel.from_unet`` of the loaded
    UNet's config, seeded random weights, zero-convolutions included (real ones start at zero and do nothing)."""
    from diffusers import ControlNetModel

    spec = _clean(spec, "ControlNet")

    def make():
        if spec == "tiny":
            torch.manual_seed(TINY_SEED)
            # Config only: the UNet may carry peft LoRA wrappers (identity or user LoRAs), so no weights are copied.
            cn = ControlNetModel.from_unet(
                bundle.unet, conditioning_embedding_out_channels=_cond_embedding_channels(bundle.vae_scale_factor),
                load_weights_from_unet=False)
            g = torch.Generator().manual_seed(TINY_SEED)
            with torch.no_grad():
                for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
                    conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            return _place(cn, bundle)
        cn = _from_pretrained(ControlNetModel, spec, bundle, allow_pickle, "ControlNet")
        _check_fits_unet(cn.config, bundle, f"ControlNet {spec!r}")
        return cn

    return _cached(bundle, "controlnet", spec, make)


def _check_fits_unet(cfg, bundle, what: str) -> None:
    families.check_same(what, families.family_of_unet_config(cfg), bundle.family, bundle.name, AdapterError)
    u = bundle.unet.config
    if tuple(cfg.block_out_channels) != tuple(u.block_out_channels) or cfg.cross_attention_dim != u.cross_attention_dim:
        raise AdapterError(
            f"{what} was made for a UNet with blocks {tuple(cfg.block_out_channels)} and text width "
            f"{cfg.cross_attention_dim}, but the loaded model {bundle.name!r} has {tuple(u.block_out_channels)} and "
            f"{u.cross_attention_dim}: use a {what.split()[0]} trained for this base model.")


# ---- T2I-Adapter -----------------------------------------------------------------------------------
def t2i_adapter(bundle, spec: str, allow_pickle: bool = False):
    """Resolve a T2I-Adapter spec for ``bundle`` (cached). ``tiny`` = a full adapter whose four feature
    levels have the UNet's down-block widths and whose pixel-unshuffle equals the VAE factor."""
    from diffusers import T2IAdapter

    spec = _clean(spec, "T2I-Adapter")

    def make():
        u = bundle.unet.config
        if spec == "tiny":
            torch.manual_seed(TINY_SEED + 1)
            if bundle.family.name == "sdxl":  # SDXL adapters: 4 levels over 3 UNet levels, from 1/16 of the pixels
                ad = T2IAdapter(in_channels=3, channels=[*u.block_out_channels, u.block_out_channels[-1]],
                                num_res_blocks=1, downscale_factor=2 * bundle.vae_scale_factor,
                                adapter_type="full_adapter_xl")
            else:
                ad = T2IAdapter(in_channels=3, channels=list(u.block_out_channels), num_res_blocks=1,
                                downscale_factor=bundle.vae_scale_factor, adapter_type="full_adapter")
            return _place(ad, bundle)
        ad = _from_pretrained(T2IAdapter, spec, bundle, allow_pickle, "T2I-Adapter")
        # An SDXL adapter says so in its type; SD-1.x and SD-2.x adapters share one layout (checked by widths).
        made_for = "sdxl" if ad.config.adapter_type == "full_adapter_xl" else (
            bundle.family.name if bundle.family.name != "sdxl" else "sd15")
        families.check_same(f"T2I-Adapter {spec!r}", made_for, bundle.family, bundle.name, AdapterError)
        chans = tuple(ad.config.channels)
        xl = bundle.family.name == "sdxl"
        want_chans = (*u.block_out_channels, u.block_out_channels[-1]) if xl else tuple(u.block_out_channels)
        want_scale = bundle.vae_scale_factor * (2 if xl else 1)
        if chans != want_chans[: len(chans)] or ad.config.downscale_factor != want_scale:
            raise AdapterError(
                f"T2I-Adapter {spec!r} produces features {chans} at 1/{ad.config.downscale_factor} scale, but the "
                f"loaded model {bundle.name!r} needs {want_chans} at 1/{want_scale}: "
                "use an adapter trained for this base model.")
        return ad

    return _cached(bundle, "t2i", spec, make)


@contextlib.contextmanager
def adapter_residuals(unet, units: list[tuple[list[torch.Tensor], set[int]]]):
    """Add T2I-Adapter features to the UNet encoder (``down_intrablock_additional_residuals``).

    ``units``: (features already × weight, timesteps on which they apply); the units active at a step
    are summed, as in diffusers' MultiAdapter. diffusers' adapter pipeline cannot be combined with
    ControlNet, so the features are attached at the UNet's own hook point; the hook is removed on exit."""

    def pre_hook(module, args, kwargs):
        t = int(torch.as_tensor(args[1] if len(args) > 1 else kwargs.get("timestep")).flatten()[0])
        active = [feats for feats, steps in units if t in steps]
        if not active:
            return None
        x = args[0] if args else kwargs["sample"]
        summed = [sum(level) for level in zip(*active)]
        # The UNet pops from this list, so every call gets a fresh one, expanded to the batch (CFG doubles it).
        kwargs["down_intrablock_additional_residuals"] = [f.to(x.dtype).expand(x.shape[0], -1, -1, -1) for f in summed]
        return args, kwargs

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ---- IP-Adapter -----------------------------------------------------------------------------------
@dataclass
class _IPWeights:
    state_dict: dict  # {"image_proj": {...}, "ip_adapter": {...}} in the IP-Adapter layout
    encoder: torch.nn.Module  # CLIPVisionModelWithProjection
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    processors: dict | None = None  # attn2 name -> IP processor (built once)
    projection: torch.nn.Module | None = None


def _tiny_ip_weights(bundle) -> _IPWeights:
    """A tiny CLIP vision encoder and a synthetic IP-Adapter state dict that fits the loaded UNet."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(TINY_SEED + 2)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=32))
    u = bundle.unet.config
    cross, d = u.cross_attention_dim, enc.config.projection_dim
    g = torch.Generator().manual_seed(TINY_SEED + 3)

    def rnd(*shape):
        return torch.randn(shape, generator=g) * 0.2

    image_proj = {"proj.weight": rnd(4 * cross, d), "proj.bias": rnd(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip, key_id = {}, 1
    for name in bundle.unet.attn_processors:  # the IP-Adapter numbering: odd ids for cross-attention layers
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(u, name)
        ip[f"{key_id}.to_k_ip.weight"], ip[f"{key_id}.to_v_ip.weight"] = rnd(hidden, cross), rnd(hidden, cross)
        key_id += 2
    return _IPWeights({"image_proj": image_proj, "ip_adapter": ip}, enc, 32, CLIP_MEAN, CLIP_STD)


def _hidden_size(u, name: str) -> int:
    if name.startswith("mid_block"):
        return u.block_out_channels[-1]
    block = int(name.split(".")[1])
    return (list(reversed(u.block_out_channels)) if name.startswith("up_blocks") else u.block_out_channels)[block]


def _ip_files(spec: str, allow_pickle: bool, family: str = "sd15") -> tuple[Path, Path]:
    """(weights file, image-encoder folder) for a local file or a Hub id."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES + (".safetensors",) or path.exists():
        if not path.is_file():
            raise AdapterError(f"IP-Adapter file {path.name!r} does not exist.")
        check_weights_file(path, allow_pickle, "IP-Adapter", AdapterError)
        enc = next((p for p in (path.parent / "image_encoder", path.parent.parent / "image_encoder") if p.is_dir()), None)
        if enc is None:
            raise AdapterError(f"IP-Adapter {path.name} needs its CLIP image encoder: put the 'image_encoder' folder "
                               f"(config.json + model.safetensors) next to it or one folder up.")
        return path, enc
    repo, _, weight = spec.partition(":")
    if repo.count("/") != 1:
        raise AdapterError(f"Unknown IP-Adapter {spec!r}: not 'tiny', not an existing .safetensors file, and not a "
                           "Hub id like h94/IP-Adapter[:models/ip-adapter_sd15.safetensors].")
    weight = weight or DEFAULT_IP_WEIGHTS.get(family, DEFAULT_IP_WEIGHT)
    check_weights_file(weight, allow_pickle, "IP-Adapter", AdapterError)  # a name in the Hub repo: judged by suffix
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        file = Path(hf_hub_download(repo, weight, local_files_only=_offline()))
        sub = str(Path(weight).parent / "image_encoder") if Path(weight).parent != Path(".") else "image_encoder"
        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"], local_files_only=_offline())
    except Exception as e:
        raise AdapterError(f"Could not get IP-Adapter {repo}:{weight} and its image encoder from the Hugging Face "
                           f"Hub or its cache ({type(e).__name__}). Download it once with internet, pass a local "
                           ".safetensors file, or use 'tiny'.") from e
    return file, Path(root) / sub


def _load_ip_weights(bundle, spec: str, allow_pickle: bool) -> _IPWeights:
    from transformers import CLIPVisionModelWithProjection

    file, enc_dir = _ip_files(spec, allow_pickle, bundle.family.name)
    if file.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(file))
        sd = {"image_proj": {}, "ip_adapter": {}}
        for k, v in flat.items():
            head, _, rest = k.partition(".")
            if head in sd:
                sd[head][rest] = v
    else:
        sd = load_pickle_weights(file, "IP-Adapter", AdapterError)  # the container only: weights_only=True
    if not sd.get("image_proj") or not sd.get("ip_adapter"):
        raise AdapterError(f"{file.name} is not an IP-Adapter file (no image_proj / ip_adapter weights).")
    if "proj.weight" not in sd["image_proj"]:
        raise AdapterError(f"{file.name} is an IP-Adapter variant (Plus / Face) that DragCanvas does not support yet; "
                           "use the base ip-adapter_sd15.")
    try:
        enc = CLIPVisionModelWithProjection.from_pretrained(str(enc_dir), use_safetensors=None if allow_pickle else True)
    except Exception as e:
        raise AdapterError(f"Could not load the IP-Adapter image encoder {enc_dir.name!r} next to {file.name} ({type(e).__name__}).") from e
    cross = sd["image_proj"]["proj.weight"].shape[0] // 4
    if cross in families.FAMILY_BY_TEXT_WIDTH and bundle.unet.config.cross_attention_dim in families.FAMILY_BY_TEXT_WIDTH:
        families.check_same(f"IP-Adapter {spec!r}", families.FAMILY_BY_TEXT_WIDTH[cross], bundle.family, bundle.name,
                            AdapterError)
    if cross != bundle.unet.config.cross_attention_dim:
        raise AdapterError(f"IP-Adapter {spec!r} was made for text width {cross}, but the loaded model "
                           f"{bundle.name!r} has {bundle.unet.config.cross_attention_dim}: use one for this base model.")
    size = int(enc.config.image_size)
    return _IPWeights(sd, enc, size, CLIP_MEAN, CLIP_STD)


def _ip_weights(bundle, spec: str, allow_pickle: bool) -> _IPWeights:
    spec = _clean(spec, "IP-Adapter")

    def make():
        w = _tiny_ip_weights(bundle) if spec == "tiny" else _load_ip_weights(bundle, spec, allow_pickle)
        w.encoder = _place(w.encoder, bundle)
        # diffusers' own converters build the IP processors (decoupled K/V per cross-attention layer)
        # and the image projection from the state dict; we keep only the cross-attention ones.
        procs = diffusers_private.ip_adapter_attn_processors(bundle.unet, w.state_dict)
        w.processors = {n: p.to(bundle.device, bundle.dtype) for n, p in procs.items() if not n.endswith("attn1.processor")}
        w.projection = diffusers_private.ip_adapter_image_projection(
            bundle.unet, w.state_dict["image_proj"]).to(bundle.device, bundle.dtype)
        return w

    return _cached(bundle, "ip", spec, make)


class IPAdapterHandle:
    """An installed IP-Adapter: embed reference images, set the image-prompt scale."""

    def __init__(self, bundle, weights: _IPWeights):
        self.bundle, self.weights = bundle, weights

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """Reference image(s) -> CLIP image embeddings ``(1, n_images, D)`` (several images are one prompt)."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise EditError("The IP-Adapter needs at least one reference image.")
        w = self.weights
        px = torch.stack([_clip_pixels(im, w.image_size, w.mean, w.std) for im in images])
        emb = w.encoder(px.to(self.bundle.device, self.bundle.dtype)).image_embeds  # (n, D)
        return emb[None]

    def set_scale(self, scale: float) -> None:
        """How strongly the image prompt steers (0 = ignored, 1 = as strong as the text)."""
        for p in self.weights.processors.values():
            p.scale = [float(scale)] * len(p.scale)

    def pipeline_embeds(self, emb: torch.Tensor, cfg: bool) -> list[torch.Tensor]:
        """``ip_adapter_image_embeds`` for diffusers pipelines: [uncond (zeros), cond] when CFG is on."""
        return [torch.cat([torch.zeros_like(emb), emb]) if cfg else emb]

    def added_cond_kwargs(self, emb: torch.Tensor, batch: int) -> dict:
        """``added_cond_kwargs`` for a direct ``unet(...)`` call on a batch of ``batch`` latents."""
        return {"image_embeds": [emb.expand(batch, -1, -1)]}


def _clip_pixels(img: Image.Image, size: int, mean, std) -> torch.Tensor:
    """CLIP preprocessing without an image-processor dependency: resize short side, centre crop, normalise."""
    img = img.convert("RGB")
    s = size / min(img.size)
    img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    a = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    a = (a - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(a).permute(2, 0, 1)


@contextlib.contextmanager
def ip_adapter(bundle, spec: str, allow_pickle: bool = False, scale: float = 0.6):
    """Install an IP-Adapter on ``bundle.unet`` for the duration of the block; yields an ``IPAdapterHandle``.

    Only cross-attention (attn2) processors are replaced; self-attention processors, the image
    projection and ``config.encoder_hid_dim_type`` are restored exactly on exit."""
    w = _ip_weights(bundle, spec, allow_pickle)
    unet = bundle.unet
    before = dict(unet.attn_processors)
    try:
        unet.set_attn_processor({n: w.processors.get(n, p) for n, p in before.items()})
        with diffusers_private.ip_image_projection_installed(unet, w.projection):
            handle = IPAdapterHandle(bundle, w)
            handle.set_scale(scale)
            yield handle
    finally:
        unet.set_attn_processor(before)


def clear_cache() -> None:
    with _lock:
        _caches.clear()
