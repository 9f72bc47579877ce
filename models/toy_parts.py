"""The toy model's parts for models/train_toy.py: architectures, data stream, schedules, saving."""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
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


