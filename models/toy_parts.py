"""The toy model's parts for models/train_toy.py: architectures, data stream, schedules, saving."""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import toy_world
from models.tiny import _DOWN, _UP, SD15_SCHEDULER, _vocab

log = logging.getLogger("train_toy")

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=16, sample_size=64, scaling_factor=1.0,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
    block_out_channels=(32, 64, 128, 128), layers_per_block=1, cross_attention_dim=64,
    attention_head_dim=4, norm_num_groups=16,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77)


# ----------------------------------------------------------------------------------------------- parts
def build_vae():
    """A fresh 4× AutoencoderKL (3 down blocks) for 64² toy scenes."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    """A fresh small UNet2DConditionModel with the SD-1.5 block layout, on 16² latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder():
    """A fresh tiny CLIPTextModel over the character-level vocab of ``tiny_tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    v = _vocab()
    cfg = CLIPTextConfig(vocab_size=len(v), bos_token_id=v["<|startoftext|>"], eos_token_id=v["<|endoftext|>"],
                         pad_token_id=v["<|endoftext|>"], **TEXT_CONFIG)
    return CLIPTextModel(cfg)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 -> N×3×H×W float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) between image batches in [-1, 1] (computed on the [0, 1] scale, per image)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % of ``base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids, padded / truncated to 77 like SD's."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1−decay)·model, parameter by parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)


class SceneStream:
    """Batches of training scenes of ``world`` (v1 or v2) from seeds drawn with ``rng`` (all below ``HELDOUT_SEED``)."""

    def __init__(self, rng: np.random.Generator, world: str = "v1"):
        if world not in toy_world.WORLDS:
            raise ValueError(f"unknown world {world!r}; choose one of {toy_world.WORLDS}")
        self.rng, self.world = rng, world

    def next(self, n: int) -> tuple[torch.Tensor, list[str]]:
        seeds = self.rng.integers(0, toy_world.HELDOUT_SEED, size=n)
        images, captions = toy_world.make_batch(seeds, self.world)
        return images_to_tensor(images), captions


# ---------------------------------------------------------------------------------------------- saving
def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, card: dict) -> None:
    """Write the diffusers folder (fp16 safetensors) and ``card.json``; components are swapped in one by one."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(text_encoder).half(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(), scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(staging, safe_serialization=True)
    for item in sorted(staging.iterdir()):
        dest = out / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    shutil.rmtree(staging, ignore_errors=True)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    log.info("saved %s (%.1f MB of safetensors)", out, size / 1e6)




# ------------------------------------------------------------------------------------ training state
# The whole state of a run (weights, optimiser moments, RNG states, step) so ``--resume`` continues exactly
# where a stopped run left off: safetensors for tensors, JSON for the rest (no pickle, as everywhere here).
STATE_DIR = ".train-state"  # inside --out
STATE_KEEP = 2  # checkpoints kept: a corrupt newest one falls back to the one before
PHASES = ("vae", "unet")


class CheckpointError(RuntimeError):
    """A training checkpoint is missing or unreadable; the message says what to delete or run."""


@dataclass
class TrainState:
    """One checkpoint: ``phase`` ("vae" mid-phase, or "unet" once the VAE is done), ``step`` done in it,
    ``tensors`` by prefixed name ("vae.", "unet.", "opt.0.exp_avg", ...) and ``meta`` (JSON: RNG states,
    losses, the card so far, optimiser groups)."""

    phase: str
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict under ``prefix.``, contiguous and unshared (as safetensors wants)."""
    return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def load_module(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Load what ``module_tensors(prefix, ...)`` saved (strict: a mismatch is an error, not a silent reset)."""
    n = len(prefix) + 1
    module.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """(per-parameter moment tensors under ``prefix.<index>.<name>``, the JSON-able param groups)."""
    sd = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": torch.as_tensor(v).clone().contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], groups: list) -> None:
    """Restore what ``optimizer_tensors`` saved."""
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(prefix + "."):
            i, name = k[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_state(out: Path, state: TrainState, keep: int = STATE_KEEP) -> Path:
    """Write ``state`` to ``out/.train-state/<n><phase>-<step>/`` (staged, then renamed: never half-written; the
    names sort in training order) and drop all but the newest ``keep``."""
    from safetensors.torch import save_file

    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PHASES.index(state.phase) + 1}{state.phase}-{state.step:07d}"  # sorts in training order
    staging = root / (name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(state.tensors, str(staging / "tensors.safetensors"))
    (staging / "meta.json").write_text(json.dumps({"phase": state.phase, "step": state.step, **state.meta}))
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(staging, root / name)
    others = sorted(p for p in root.iterdir() if p.is_dir() and p.name != name and not p.name.endswith(".staging"))
    for old in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("training state saved: %s (resume with --resume)", root / name)
    return root / name


def _read_state(folder: Path) -> TrainState:
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text())
    tensors = load_file(str(folder / "tensors.safetensors"))
    return TrainState(meta.pop("phase"), int(meta.pop("step")), tensors, meta)


def load_state(out: Path) -> TrainState:
    """The newest readable checkpoint of ``out``; falls back to an older one (with a warning) if the newest is
    corrupt. Raises CheckpointError saying what to run or delete when there is none."""
    root = out / STATE_DIR
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".staging")),
                     reverse=True) if root.is_dir() else []
    if not folders:
        raise CheckpointError(f"no training checkpoint in {root}: the run stopped before its first checkpoint "
                              f"(every --checkpoint-minutes). Start it again without --resume (delete {out} first "
                              "if you want a clean folder).")
    from safetensors import SafetensorError

    errors = []
    for folder in folders:
        try:
            state = _read_state(folder)
        except (OSError, ValueError, KeyError, SafetensorError) as e:  # try the older one, report all at the end
            errors.append(f"{folder.name}: {type(e).__name__}: {e}")
            log.warning("checkpoint %s is unreadable (%s); trying an older one", folder, e)
            continue
        if errors:
            log.warning("resuming from %s; delete the unreadable %s", folder, ", ".join(e.split(":")[0] for e in errors))
        return state
    raise CheckpointError(f"every training checkpoint in {root} is unreadable ({'; '.join(errors)}). Delete {root} "
                          "and start the run again without --resume.")
