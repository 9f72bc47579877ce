"""Getting weights into memory: resolve a model spec, pick device/dtype, load once per process.

A *spec* is one of
- a built-in name: ``tiny`` / ``tiny-inpaint`` / ``cpu-small`` / ``sd15-random`` / ``tiny-sdxl`` / ``tiny-sd2-v`` / ``sdxl-random``
  (random weights, built in code),
- ``auto``: SD-1.5 when it is cached or downloadable, otherwise the best built-in offline model
  (``models.choose.resolve_auto``, which also names a spec's family without loading it),
- a local diffusers folder (``model_index.json`` inside) of an SD-1.x, SD-2.x or SDXL model,
- a single-file checkpoint ``*.safetensors`` of any of the three (configs ship in ``models/configs/<family>``;
  the family is read from the checkpoint's keys; nothing fetched),
- any of these holding an **inpainting** model (a 9-channel UNet: ``models/configs/<family>-inpainting`` for single
  files, the built-in ``tiny-inpaint``): it loads as its family's inpainting variant (``Family.inpainting``),
- a Hugging Face Hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or
  ``stabilityai/stable-diffusion-xl-base-1.0``.
Pickle formats (``.ckpt``, ``.bin``, ``.pt``) are refused unless ``allow_pickle=True`` (``models/safety.py``).

Every bundle knows its ``family`` (``models/families.py``): SD-1.x, SD-2.x (ε or v) or SDXL, detected from
the configs; an unknown architecture is refused with a message naming what was found. SDXL bundles get the
conditioning pre-hook (``families.install_sdxl_conditioning``) so methods pass one conditioning tensor.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import families
from models.cache import LRU
from models.choose import TOY_DIR, TOY_INPAINT_DIR, toy_available, toy_inpaint_available
from models.errors import EditError
from models.safety import PICKLE_SUFFIXES, check_weights_file

log = logging.getLogger(__name__)

BUILTINS = {"tiny": "tiny", "tiny-inpaint": "tiny-inpaint", "cpu-small": "cpu-small",
            "cpu-small-inpaint": "cpu-small-inpaint", "sd15-random": "sd15",
            "tiny-sdxl": "tiny-sdxl",
            "tiny-sd2-v": "tiny-sd2-v", "sdxl-random": "sdxl"}
CONFIGS = Path(__file__).parent / "configs"
CONFIG_DIR = CONFIGS / "sd15"
# Where a single file's tokenizers come from (the local Hugging Face cache only), per family.
TOKENIZER_REPOS = families.BASE_MODELS
# Built-in inpainting models -> the built-in base model of the same layout (what a task that needs a base uses).
INPAINT_BASES = {"tiny-inpaint": "tiny", "cpu-small-inpaint": "cpu-small", "toy-inpaint": "toy"}
# ... and the other way: the inpainting model a task that wants one (the inpainting drag) runs beside a base.
INPAINT_COMPANIONS = {base: inpainting for inpainting, base in INPAINT_BASES.items()}
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
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second (OpenCLIP-bigG, with projection) encoder
    tokenizer_2: object = None
    family: families.Family | None = None  # detected from the configs when not given
    _prompt_cache: LRU = field(default_factory=lambda: LRU(PROMPT_CACHE_SIZE), repr=False)

    def __post_init__(self):
        if self.family is None:
            try:
                self.family = families.detect(self.unet, self.scheduler, self.text_encoders, self.vae)
            except families.UnknownFamilyError as e:
                raise ModelLoadError(f"{self.name}: {e}") from None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def modules(self) -> list[torch.nn.Module]:
        """Every weight-carrying component (what device / dtype / offload policies apply to)."""
        return [self.unet, self.vae, *self.text_encoders]

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

    def _ids(self, tokenizer, prompt: str) -> torch.Tensor:
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """The one conditioning tensor every method passes as ``encoder_hidden_states``; cached per prompt.

        SD-1.x / 2.x: the text encoder's last hidden state ``(1, 77, D)``. SDXL: ``(1, 78, 2048)`` — both
        encoders' penultimate hidden states concatenated (77 tokens), plus one extra token carrying
        text_encoder_2's pooled projection (zero-padded); the SDXL pre-hook on the UNet splits it off into
        ``added_cond_kwargs`` (``families.install_sdxl_conditioning``). As in diffusers' SDXL pipelines
        (``force_zeros_for_empty_prompt``), the empty prompt (the unconditional branch) is all zeros.
        """
        def make():
            if not self.family.conditioned_on_size:
                return self.text_encoder(self._ids(self.tokenizer, prompt))[0].to(self.dtype)
            if prompt == "":
                width = self.unet.config.cross_attention_dim
                return torch.zeros((1, self.tokenizer.model_max_length + 1, width), device=self.device, dtype=self.dtype)
            h1 = self.text_encoder(self._ids(self.tokenizer, prompt), output_hidden_states=True).hidden_states[-2]
            out2 = self.text_encoder_2(self._ids(self.tokenizer_2, prompt), output_hidden_states=True)
            return families.pack_sdxl(torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds).to(self.dtype)

        return self._prompt_cache.get_or(prompt, make)[0]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (half the memory, tensor cores), fp32 on CPU (fp16 CPU kernels are slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _module_dtype(bundle: ModelBundle, m) -> torch.dtype:
    """The bundle's dtype, except an SDXL VAE that overflows in fp16: that one stays fp32."""
    if m is bundle.vae and bundle.family.vae_upcast and bundle.dtype == torch.float16:
        return torch.float32
    return bundle.dtype


def _apply_policy(bundle: ModelBundle, offload: bool) -> ModelBundle:
    for m in bundle.modules:
        m.eval().requires_grad_(False)
    bundle.vae.enable_slicing()  # decode batches one image at a time: lower peak memory
    if offload and bundle.device.type == "cuda":
        # Keep weights in RAM and move each model to the GPU only while it runs (low-VRAM GPUs).
        from accelerate import cpu_offload_with_hook

        for m in bundle.modules:
            m.to(dtype=_module_dtype(bundle, m))
        hook = None
        for m in (*bundle.text_encoders, bundle.unet, bundle.vae):
            _, hook = cpu_offload_with_hook(m, bundle.device, prev_module_hook=hook)
    else:
        for m in bundle.modules:
            m.to(bundle.device)
            if m.dtype != _module_dtype(bundle, m):
                m.to(dtype=_module_dtype(bundle, m))
    if _module_dtype(bundle, bundle.vae) != bundle.dtype:
        families.install_vae_upcast(bundle.vae)
    if bundle.family.conditioned_on_size:
        families.install_sdxl_conditioning(bundle.unet, bundle.tokenizer.model_max_length, bundle.family.pooled_dim,
                                           bundle.family.vae_scale_factor)
    families.register_prediction(bundle.unet, bundle.scheduler)
    return bundle


def _from_components(name: str, comps: dict, source: str, device, dtype) -> ModelBundle:
    return ModelBundle(
        name=name, unet=comps["unet"], vae=comps["vae"], text_encoder=comps["text_encoder"],
        tokenizer=comps["tokenizer"], scheduler=comps["scheduler"], device=device, dtype=dtype, source=source,
        text_encoder_2=comps.get("text_encoder_2"), tokenizer_2=comps.get("tokenizer_2"),
    )


def _pipeline_components(pipe) -> dict:
    keys = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
    return {k: getattr(pipe, k) for k in keys if getattr(pipe, k, None) is not None}


def _ddim(scheduler_config) -> object:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config)


def _pipeline_class(spec: str, local_only: bool) -> str:
    """``StableDiffusionXLPipeline`` when the model index names an SDXL pipeline, else ``StableDiffusionPipeline``."""
    try:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(spec, local_files_only=local_only)
        name = str(index.get("_class_name", ""))
    except Exception:
        return "StableDiffusionPipeline"
    return "StableDiffusionXLPipeline" if "XL" in name else "StableDiffusionPipeline"


def _load_pretrained(spec: str, source: str, device, dtype, allow_pickle: bool, local_only: bool) -> ModelBundle:
    import diffusers

    cls = getattr(diffusers, _pipeline_class(spec, local_only))
    extra = ({"add_watermarker": False} if cls.__name__ == "StableDiffusionXLPipeline" else
             {"safety_checker": None, "requires_safety_checker": False})
    pipe = cls.from_pretrained(
        spec, torch_dtype=dtype, feature_extractor=None, use_safetensors=None if allow_pickle else True,
        local_files_only=local_only, **extra,
    )
    comps = _pipeline_components(pipe)
    comps["scheduler"] = _ddim(pipe.scheduler.config)
    return _from_components(spec, comps, source, device, dtype)


def single_file_family(path: Path) -> str:
    """``sd15`` / ``sd2`` / ``sdxl`` (with ``-v`` variants as ``sd2``) from an LDM checkpoint's keys and shapes.

    SDXL has a second text encoder (``conditioner.embedders.1``); SD-2.x has an OpenCLIP text encoder
    (``cond_stage_model.model.``) and 1024-wide cross-attention; SD-1.x has ``cond_stage_model.transformer``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "sdxl"
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            return "sd2"
        k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if k in keys and f.get_slice(k).get_shape()[1] == 1024:
            return "sd2"
    return "sd15"


def single_file_is_inpainting(path: Path) -> bool:
    """Whether an LDM checkpoint holds an inpainting UNet: its first convolution takes 9 channels, not 4."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        key = "model.diffusion_model.input_blocks.0.0.weight"
        return key in f.keys() and f.get_slice(key).get_shape()[1] == families.INPAINT_CHANNELS


def base_model_for(bundle: ModelBundle) -> str:
    """The base model to pick instead of an inpainting ``bundle`` for a task that needs 4 input channels: a
    built-in's base built-in, else its family's published base (``families.BASE_MODELS``)."""
    return INPAINT_BASES.get(bundle.name, families.BASE_MODELS[bundle.family.name])


def inpainting_companion(bundle: ModelBundle, spec: str | None = None) -> ModelBundle | None:
    """The inpainting model to fill holes with beside ``bundle``: ``bundle`` itself when it is one, else ``spec``
    (the ``--inpaint-model`` flag), else the built-in companion of a built-in base (``toy`` → ``toy-inpaint``,
    ``tiny`` → ``tiny-inpaint``) when it is here; None when there is none (the caller falls back to the base).
    It must be an inpainting model of the base's family: ModelLoadError says which to pick otherwise."""
    if bundle.family.inpainting:
        return bundle
    spec = spec or INPAINT_COMPANIONS.get(bundle.name)
    if spec is None or (spec == "toy-inpaint" and not toy_inpaint_available()):
        return None
    other = load_bundle(spec, device=bundle.device, dtype=bundle.dtype)
    if not other.family.inpainting:
        raise ModelLoadError(f"The inpainting model {spec!r} is not an inpainting model ({other.family.label}, "
                             f"{other.unet.config.in_channels} UNet input channels): give a 9-channel one.")
    if other.family.name != bundle.family.name:
        raise ModelLoadError(f"The inpainting model {spec!r} is {other.family.label}, but the model is "
                             f"{bundle.family.label}: give the {bundle.family.label} inpainting model.")
    return other


def _single_file_v_prediction(path: Path) -> bool:
    """SD-2.x 768-v checkpoints carry no flag; diffusers and A1111 read the ``v`` from the file's name or
    keep ε. We follow the file name (``*-v*`` / ``768-v``): the user can rename the file otherwise."""
    return "768-v" in path.name.lower() or path.stem.lower().endswith(("-v", "_v"))


def _load_single_file(path: Path, device, dtype) -> ModelBundle:
    """A ``.safetensors`` checkpoint in the original (LDM) layout, with our bundled configs for its family."""
    import diffusers

    fam = single_file_family(path)
    configs = CONFIGS / (f"{fam}-inpainting" if single_file_is_inpainting(path) else fam)
    subs = ("tokenizer", "tokenizer_2") if fam == "sdxl" else ("tokenizer",)
    toks = {s: _cached_tokenizer(TOKENIZER_REPOS[fam], s) for s in subs}
    if any(t is None for t in toks.values()):
        raise ModelLoadError(
            f"A single-file {fam} checkpoint needs the CLIP tokenizer files, which are not in the local "
            f"Hugging Face cache. Run once with internet (any command using {TOKENIZER_REPOS[fam]}) or "
            "convert the checkpoint to a diffusers folder."
        )
    cls = getattr(diffusers, "StableDiffusionXLPipeline" if fam == "sdxl" else "StableDiffusionPipeline")
    extra = ({"add_watermarker": False} if fam == "sdxl" else
             {"safety_checker": None, "requires_safety_checker": False})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / fam
        shutil.copytree(configs, cfg)
        for sub, tok in toks.items():
            shutil.copytree(tok, cfg / sub)
        if fam == "sd2" and configs.name == "sd2" and _single_file_v_prediction(path):  # SD-2 inpainting is ε, 512²
            _set_json(cfg / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
            _set_json(cfg / "unet" / "config.json", sample_size=96)
        pipe = cls.from_single_file(str(path), config=str(cfg), torch_dtype=dtype, local_files_only=True,
                                    feature_extractor=None, **extra)
    comps = _pipeline_components(pipe)
    comps["scheduler"] = _ddim(pipe.scheduler.config)
    return _from_components(path.name, comps, "single-file", device, dtype)


def _set_json(path: Path, **values) -> None:

    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2))


def _cached_tokenizer(repo: str, sub: str = "tokenizer") -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"], local_files_only=True)
        tok = Path(root) / sub
        return tok if (tok / "vocab.json").exists() else None
    except Exception:
        return None


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
    if spec == "toy-inpaint":
        if not toy_inpaint_available():
            raise ModelLoadError("The built-in 'toy-inpaint' model is not in this checkout (models/toy-inpaint); "
                                 "train it with 'python -m models.train_toy_inpaint' (see models/toy-inpaint/README.md).")
        from diffusers import UNet2DConditionModel

        bundle = _load_pretrained(str(TOY_DIR), "builtin", device, dtype, allow_pickle=False, local_only=True)
        bundle.unet = UNet2DConditionModel.from_pretrained(TOY_INPAINT_DIR / "unet", torch_dtype=dtype,
                                                           use_safetensors=True, local_files_only=True)
        bundle.name, bundle.family = "toy-inpaint", None
        bundle.__post_init__()  # the family again, from the 9-channel UNet
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
        except Exception as e:
            raise ModelLoadError(
                f"Could not load {spec!r} from the Hugging Face Hub or its cache ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160]}). Check the id and your connection, or use a local "
                f"folder / .safetensors file, or the built-in 'tiny'."
            ) from e
    raise ModelLoadError(
        f"Unknown model {spec!r}: not a built-in ({', '.join(BUILTINS)}), not an existing folder or "
        ".safetensors file, and not a Hub id of the form owner/name."
    )
