"""Getting weights into memory: resolve a model spec, pick device/dtype, load once per process.

A *spec* is one of
- a built-in name: ``tiny`` / ``cpu-small`` / ``sd15-random`` (random weights, built in code),
- ``auto``: SD-1.5 when it is cached or downloadable, otherwise the best built-in offline model,
- a local diffusers folder (``model_index.json`` inside),
- a single-file checkpoint ``*.safetensors`` (configs ship in ``models/configs/sd15``; nothing fetched),
- a Hugging Face Hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
Pickle formats (``.ckpt``, ``.bin``, ``.pt``) are refused unless ``allow_pickle=True`` (``models/safety.py``).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from models.cache import LRU
from models.errors import EditError
from models.safety import PICKLE_SUFFIXES, check_weights_file

log = logging.getLogger(__name__)

DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILTINS = {"tiny": "tiny", "cpu-small": "cpu-small", "sd15-random": "sd15"}
CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
# Bundles kept loaded per process. Two: the model in use plus one more, so switching A -> B -> A (or a
# benchmark comparing two models) does not reload, while a third model drops the least recent one instead
# of piling up SD-sized weights (~2 GB each in fp16, ~4 GB in fp32) until the process runs out of memory.
# An evicted bundle stays valid for whoever still holds it (an Editor keeps its own reference).
BUNDLE_CACHE_SIZE = 2
PROMPT_CACHE_SIZE = 32  # text embeddings per bundle: (1, 77, 768) each, the prompts of the current session


class ModelLoadError(EditError):
    """The model spec cannot be resolved or loaded; the message says what to do."""


@dataclass
class ModelBundle:
    """The components every method needs, already on their device and in their dtype."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    source: str  # builtin | hub | folder | single-file
    _prompt_cache: LRU = field(default_factory=lambda: LRU(PROMPT_CACHE_SIZE), repr=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell, read from the VAE config (8 for SD; never assumed)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this so every UNet down-sampling divides evenly."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (a text-encoder LoRA went on or off)."""
        self._prompt_cache.clear()

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """CLIP text embeddings ``(1, 77, D)``; cached per prompt (the text encoder is frozen)."""
        def make():
            ids = self.tokenizer(
                prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)
            return self.text_encoder(ids)[0].to(self.dtype)

        return self._prompt_cache.get_or(prompt, make)[0]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (half the memory, tensor cores), fp32 on CPU (fp16 CPU kernels are slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _apply_policy(bundle: ModelBundle, offload: bool) -> ModelBundle:
    for m in (bundle.unet, bundle.vae, bundle.text_encoder):
        m.eval().requires_grad_(False)
    bundle.vae.enable_slicing()  # decode batches one image at a time: lower peak memory
    if offload and bundle.device.type == "cuda":
        # Keep weights in RAM and move each model to the GPU only while it runs (low-VRAM GPUs).
        from accelerate import cpu_offload_with_hook

        for m in (bundle.unet, bundle.vae, bundle.text_encoder):
            m.to(dtype=bundle.dtype)
        hook = None
        for m in (bundle.text_encoder, bundle.unet, bundle.vae):
            _, hook = cpu_offload_with_hook(m, bundle.device, prev_module_hook=hook)
    else:
        for m in (bundle.unet, bundle.vae, bundle.text_encoder):
            m.to(bundle.device)
            if m.dtype != bundle.dtype:
                m.to(dtype=bundle.dtype)
    return bundle


def _from_components(name: str, comps: dict, source: str, device, dtype) -> ModelBundle:
    return ModelBundle(
        name=name, unet=comps["unet"], vae=comps["vae"], text_encoder=comps["text_encoder"],
        tokenizer=comps["tokenizer"], scheduler=comps["scheduler"], device=device, dtype=dtype, source=source,
    )


def _pipeline_components(pipe) -> dict:
    return {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}


def _ddim(scheduler_config) -> object:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config)


def _load_pretrained(spec: str, source: str, device, dtype, allow_pickle: bool, local_only: bool) -> ModelBundle:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        spec, torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        use_safetensors=None if allow_pickle else True, local_files_only=local_only,
    )
    comps = _pipeline_components(pipe)
    comps["scheduler"] = _ddim(pipe.scheduler.config)
    return _from_components(spec, comps, source, device, dtype)


def _load_single_file(path: Path, device, dtype) -> ModelBundle:
    """A ``.safetensors`` checkpoint in the original (LDM) layout, with our bundled SD-1.5 configs."""
    from diffusers import StableDiffusionPipeline

    tok = _cached_sd15_tokenizer()
    if tok is None:
        raise ModelLoadError(
            "A single-file checkpoint needs the CLIP tokenizer files, which are not in the local "
            f"Hugging Face cache. Run once with internet (any command using {DEFAULT_HUB_MODEL}) or "
            "convert the checkpoint to a diffusers folder."
        )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "sd15"
        shutil.copytree(CONFIG_DIR, cfg)
        shutil.copytree(tok, cfg / "tokenizer")
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(cfg), torch_dtype=dtype, local_files_only=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    comps = _pipeline_components(pipe)
    comps["scheduler"] = _ddim(pipe.scheduler.config)
    return _from_components(path.name, comps, "single-file", device, dtype)


def _cached_sd15_tokenizer() -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(DEFAULT_HUB_MODEL, allow_patterns=["tokenizer/*"], local_files_only=True)
        tok = Path(root) / "tokenizer"
        return tok if (tok / "vocab.json").exists() else None
    except Exception:  # noqa: BLE001 - any cache miss means "not available offline"
        return None


def sd15_available(timeout_s: float = 5.0) -> tuple[bool, str]:
    """Can SD-1.5 be had? True when it is in the local cache or the Hub answers. Returns (ok, why)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(DEFAULT_HUB_MODEL, "unet/diffusion_pytorch_model.safetensors")
        if isinstance(hit, str) and os.path.exists(hit):
            return True, "cached"
    except Exception:  # noqa: BLE001
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False, "HF_HUB_OFFLINE is set and the model is not cached"
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(DEFAULT_HUB_MODEL, timeout=timeout_s)
        return True, "downloadable"
    except Exception as e:  # noqa: BLE001
        return False, f"the Hugging Face Hub is unreachable ({type(e).__name__})"


TOY_DIR = Path(__file__).resolve().parent / "toy"


def toy_available() -> bool:
    """The trained toy model ships in the repo (models/toy, fp16 safetensors) once training completed."""
    return (TOY_DIR / "model_index.json").is_file() and (TOY_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def best_offline_builtin() -> str:
    """The most useful model that needs no network: the trained ``toy`` model when it is here, else ``tiny``."""
    return "toy" if toy_available() else "tiny"


_cache = LRU(BUNDLE_CACHE_SIZE)  # (spec, device, dtype, offload) -> ModelBundle
_cache_lock = threading.Lock()


def load_bundle(
    spec: str,
    *,
    allow_pickle: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    offload: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ModelBundle:
    """Resolve ``spec`` and load it once per process (later calls return the cached bundle; the
    ``BUNDLE_CACHE_SIZE`` most recently used bundles are kept)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    key = (spec, str(device), dtype, offload)

    def make() -> ModelBundle:
        if progress:
            progress(f"loading model {spec!r}")
        log.info("loading model %r on %s (%s)", spec, device, dtype)
        return _apply_policy(_resolve(spec, device, dtype, allow_pickle), offload)

    with _cache_lock:  # one load at a time: two sessions asking for the same model get the same bundle
        return _cache.get_or(key, make)[0]


def clear_cache() -> None:
    """Forget the loaded bundles (whoever holds one keeps a working reference)."""
    with _cache_lock:
        _cache.clear()


def _resolve(spec: str, device, dtype, allow_pickle: bool) -> ModelBundle:
    if not spec or not spec.strip():
        raise ModelLoadError("No model given: pass a Hub id, a local folder, a .safetensors file or 'tiny'.")
    spec = spec.strip()
    if spec == "toy":
        if not toy_available():
            raise ModelLoadError("The built-in 'toy' model is not in this checkout (models/toy); train it with "
                                 "'python -m models.train_toy --out models/toy' (see models/toy/README.md).")
        bundle = _load_pretrained(str(TOY_DIR), "builtin", device, dtype, allow_pickle=False, local_only=True)
        bundle.name = "toy"
        return bundle
    if spec in BUILTINS:
        from models.tiny import build_components

        return _from_components(spec, build_components(BUILTINS[spec]), "builtin", device, dtype)
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        check_weights_file(path, allow_pickle, "Model file", ModelLoadError)
        if not path.exists():
            raise ModelLoadError(f"Model file {path} does not exist.")
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=dtype, local_files_only=True)
        comps = _pipeline_components(pipe)
        comps["scheduler"] = _ddim(pipe.scheduler.config)
        return _from_components(path.name, comps, "single-file", device, dtype)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelLoadError(f"Model file {path} does not exist.")
        return _load_single_file(path, device, dtype)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{path} is a folder but not a diffusers model (no model_index.json).")
        check_weights_file(path, allow_pickle, "Model", ModelLoadError)
        return _load_pretrained(str(path), "folder", device, dtype, allow_pickle, local_only=True)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        try:
            return _load_pretrained(spec, "hub", device, dtype, allow_pickle, local_only=False)
        except Exception as e:  # noqa: BLE001 - turn network/hub failures into one actionable line
            raise ModelLoadError(
                f"Could not load {spec!r} from the Hugging Face Hub or its cache ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160]}). Check the id and your connection, or use a local "
                f"folder / .safetensors file, or the built-in 'tiny'."
            ) from e
    raise ModelLoadError(
        f"Unknown model {spec!r}: not a built-in ({', '.join(BUILTINS)}), not an existing folder or "
        ".safetensors file, and not a Hub id of the form owner/name."
    )


@functools.lru_cache(maxsize=1)
def resolve_auto() -> tuple[str, str]:
    """``auto`` -> (spec, banner). The banner is empty when the real SD-1.5 is used."""
    ok, why = sd15_available()
    if ok:
        return DEFAULT_HUB_MODEL, ""
    builtin = best_offline_builtin()
    if builtin == "toy":
        return builtin, (
            f"Stable Diffusion 1.5 is not available ({why}), so DragCanvas runs the built-in offline model "
            "'toy': a small model trained on coloured shapes (64 px scenes like \"a red disk and a blue square on "
            "gray\"). Try the examples below the canvas. For real photos start with "
            f"--model {DEFAULT_HUB_MODEL} (or a local folder / .safetensors file)."
        )
    return builtin, (
        f"Stable Diffusion 1.5 is not available ({why}), so DragCanvas runs the built-in offline "
        f"model '{builtin}'. Its random weights make edits look like noise; start with "
        f"--model {DEFAULT_HUB_MODEL} (or a local folder / .safetensors file) for real edits."
    )
