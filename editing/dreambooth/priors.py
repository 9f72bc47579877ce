"""Text-to-image with the model being trained: the class-prior images and the training previews.

Both run the project's one denoise loop (editing/sampling.py) with classifier-free guidance,
ε = ε_u + s·(ε_c − ε_u) (Ho & Salimans 2022, eq. 6), from per-seed Gaussian noise.
Class images "a [class]" come from the frozen model and are cached on disk for every later run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from editing.dreambooth.identifier import class_prompt
from editing.dreambooth.runs import Span
from editing.images import tensor_to_pil
from editing.sampling import NoisePredictor, Schedule, denoise

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_text(bundle, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP embeddings (B, 77, D), computed now (never the bundle's cache: the text encoder may carry a LoRA).

    SDXL: ``bundle.encode_prompt``'s packed form (B, 78, D) — both encoders' states plus the pooled token that
    the UNet's pre-hook turns into ``added_cond_kwargs`` with the size/crop time ids. Its cache is right here:
    SDXL text encoders are never trained (``trainer.plan``) and library LoRAs are off while personalizing."""
    if getattr(bundle, "text_encoder_2", None) is not None:
        return torch.cat([bundle.encode_prompt(p) for p in prompts]).to(bundle.dtype)
    tok = bundle.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(bundle.device)
    return bundle.text_encoder(ids)[0].to(bundle.dtype)


def seed_noise(bundle, size: int, seeds: Sequence[int]) -> torch.Tensor:
    """z_T ~ N(0, I) of shape (len(seeds), C, S/f, S/f); each row drawn alone from its seed (batch-independent)."""
    f, c = bundle.vae_scale_factor, bundle.unet.config.in_channels
    return torch.cat([torch.randn((1, c, size // f, size // f), generator=torch.Generator("cpu").manual_seed(int(s)))
                      for s in seeds]).to(bundle.device)


@torch.no_grad()
def sample(bundle, cond: torch.Tensor, uncond: torch.Tensor, size: int, steps: int, seeds: Sequence[int],
           guidance: float = 7.5, run=None) -> list[Image.Image]:
    """DDIM text-to-image with CFG, one image per seed (batched). cond/uncond: (1, 77, D).

    ``run.report`` (a ``Run`` or ``Span``; None = not cancellable) gets the loop's progress and raises on cancel.
    """
    x = seed_noise(bundle, size, seeds)  # (B, C, h, w)
    predict = NoisePredictor(bundle.unet, cond, x.shape[0], uncond=uncond, guidance_scale=guidance, graphs=False)
    z0 = denoise(predict, x, Schedule.from_scheduler(bundle.scheduler, steps), run=run)
    vae = bundle.vae
    imgs = vae.decode((z0 / vae.config.scaling_factor).to(bundle.dtype)).sample  # (B, 3, S, S) in [-1, 1]
    return [tensor_to_pil(imgs[i:i + 1]) for i in range(x.shape[0])]


def prior_dir(root: Path, model_key: str, class_noun: str, size: int, steps: int, seed: int) -> Path:
    """Where the class images of one (model, class, size, steps, seed) live; reused by every later run."""
    from editing.lora_library import safe_name

    tag = hashlib.sha1(json.dumps([model_key, class_noun, size, steps, seed]).encode()).hexdigest()[:10]
    return root / f"{safe_name(class_noun)}-{size}px-{tag}"


def _save_atomically(img: Image.Image, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)  # never a half-written image in the cache


def class_prior_images(bundle, class_noun: str, n: int, size: int, root: Path, *, model_key: str, steps: int = 25,
                       seed: int = 0, batch: int = 4, generate: bool = True, run=None) -> tuple[list[Path], int]:
    """The first ``n`` class images "a [class]" from the frozen model, generating only those not on disk.

    Returns ``(paths, how many were generated now)``. ``generate=False`` (non-main processes) only lists.
    ``run.report`` gets the phase's progress (0..1 over the missing images) and raises on cancel.
    """
    folder = prior_dir(root, model_key, class_noun, size, steps, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.png" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if not (missing and generate):
        return paths, len(missing) if generate else 0
    prompt = class_prompt(class_noun)
    log.info("generating %d class image(s) “%s” in %s", len(missing), prompt, folder)
    cond, uncond = encode_text(bundle, [prompt]), encode_text(bundle, [""])
    for k in range(0, len(missing), batch):
        chunk = missing[k:k + batch]
        span = None if run is None else Span(run, k / len(missing), (k + len(chunk)) / len(missing),
                                             f"class images {k + 1}–{k + len(chunk)} of {len(missing)} (“{prompt}”)")
        for i, img in zip(chunk, sample(bundle, cond, uncond, size, steps, [seed * 100_003 + i for i in chunk],
                                        run=span)):
            _save_atomically(img, paths[i])
    return paths, len(missing)
