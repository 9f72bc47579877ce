"""Filling the hole an object left: what lay behind it. The inpainting drag's fill (``editing.drag.inpaint``) and
the Move tool's hole (``editing.guidance.tasks``) both call ``fill_hole``.

1. **The background estimate** (``background_estimate``): the object — where it is now and where it was — and the
   hole are filled from the background around them by OpenCV's fast-marching inpainting (Telea, 2004). The model
   is then shown this object-free picture, not the object itself: shown the object beside a thin hole (a shape
   that shrank leaves a ring), an inpainting model grows the object back into it; the hole is background.
2. **The model**, in ``n_steps`` DDIM steps from the estimate noised to ``strength`` (1: from pure noise), with
   the inpainting UNet's two extra inputs as it was trained (diffusers' protocol): the mask binarised and resized
   to the latent grid by nearest neighbour, the masked image the estimate with the hole blanked. Without an
   inpainting model, blended latent diffusion with the base model (Avrahami et al., 2023): after every step the
   latents outside the hole (rounded out to whole cells) are the estimate's, re-noised to the level just reached:
   x ← m ⊙ x + (1 − m) ⊙ (√ᾱ · z_known + √(1 − ᾱ) · ε).
3. **The composite**: only the hole's pixels are taken from the model's picture; every other pixel is the input's.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from editing.context import EditContext
from editing.geometry import mask_at
from editing.images import pil_to_tensor, tensor_to_pil
from editing.sampling import Hook, NoisePredictor, Schedule, StepState, add_noise, denoise

TELEA_RADIUS = 3  # px: the neighbourhood each filled pixel is estimated from
SEAM_AT = 512  # a seam is given in pixels at this long side and scaled with the picture


@dataclass(frozen=True)
class FillSettings:
    prompt: str = ""
    n_steps: int = 8
    strength: float = 0.5
    guidance_scale: float = 1.0
    seed: int = 42
    fast_decode: bool = False


@dataclass(frozen=True)
class Filled:
    image: np.ndarray  # H×W×3 uint8: the input with its hole repainted
    filler: str  # what painted it: the inpainting model's name, or "blended latents with <base>"
    decoder: str  # "vae" or "taesd"


def widen(hole: np.ndarray, seam: float) -> np.ndarray:
    """``hole`` (H×W bool) grown by a seam band of ``seam`` pixels at a ``SEAM_AT`` px long side (scaled with the
    picture), so the repainted area reaches past the edge of what was left, where the old object's soft rim is."""
    r = round(seam * max(hole.shape) / SEAM_AT)
    if r <= 0 or not hole.any():
        return hole
    return cv2.dilate(hole.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)) > 0


def background_estimate(rgb: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """``rgb`` (H×W×3 uint8) with ``unknown`` (H×W bool, widened by one pixel for the objects' soft rims) filled
    from the pixels around it (Telea's fast marching method, 2004). Pure; the estimate of what lies behind."""
    grown = cv2.dilate(unknown.astype(np.uint8), np.ones((3, 3), np.uint8))
    return cv2.inpaint(np.ascontiguousarray(rgb), grown, TELEA_RADIUS, cv2.INPAINT_TELEA)


class BlendKnown(Hook):
    """Blended latent diffusion: after each step, latents outside ``fill`` (1, 1, h, w) are the known image's
    re-noised to the level just reached (the last step: the known latents themselves)."""

    def __init__(self, known: torch.Tensor, noise: torch.Tensor, fill: torch.Tensor):
        self.known, self.noise, self.fill = known, noise, fill

    def after_step(self, s: StepState) -> None:
        ref = add_noise(self.known, self.noise, torch.tensor(s.a_next, dtype=self.known.dtype))
        s.x = torch.where(self.fill > 0.5, s.x, ref)


def _decoder(ctx: EditContext, bundle, fast: bool):
    """(decode(z) -> image in [-1, 1], name): the bundle's VAE, or the TAESD of --preview-decoder."""
    if fast and ctx.options.preview_decoder:
        from editing.previews import preview_decoder

        tiny = preview_decoder(ctx).tiny
        return (lambda z: tiny.decode((z / tiny.config.scaling_factor).to(bundle.device, bundle.dtype)).sample), "taesd"
    return (lambda z: bundle.vae.decode((z / bundle.vae.config.scaling_factor).to(bundle.device, bundle.dtype)).sample,
            "vae")


def fill_hole(ctx: EditContext, rgb: np.ndarray, hole: np.ndarray, objects: np.ndarray, work_size: tuple[int, int],
              settings: FillSettings, blend_fallback: bool = True) -> Filled | None:
    """``rgb`` (H×W×3 uint8) with ``hole`` (H×W bool) repainted as background, the model working at ``work_size``
    = (w, h); ``objects`` (H×W bool) is what the context leaves out (the object now and where it was). The
    inpainting model is the loaded one when it is one, else ``--inpaint-model``, else the built-in companion of a
    built-in base; without one, blended latents with the base model, or None when ``blend_fallback`` is off."""
    from models.families import inpaint_mask_latent, inpainting_conditioning
    from models.loader import inpainting_companion

    b, run = ctx.bundle, ctx.run
    with run.step("load"):
        ib = inpainting_companion(b, ctx.options.inpaint_model) or b
    if not ib.family.inpainting and not blend_fallback:
        return None
    run.count_unet(ib.unet)
    with run.step("estimate"):
        estimate = background_estimate(rgb, hole | objects)
    f = ib.vae_scale_factor
    est_work = pil_to_tensor(Image.fromarray(estimate).resize(work_size, Image.LANCZOS)).to(ib.device, ib.dtype)
    hole_px = torch.from_numpy(mask_at(hole, work_size))[None, None].to(ib.device, ib.dtype)
    latent_hw = (work_size[1] // f, work_size[0] // f)
    s = ib.vae.config.scaling_factor
    with run.step("encode"), torch.no_grad():
        known = ib.vae.encode(est_work).latent_dist.mean.float() * s
        masked = ib.vae.encode(est_work * (1 - hole_px)).latent_dist.mean.float() * s if ib.family.inpainting else None
    schedule = Schedule.from_scheduler(ib.scheduler, settings.n_steps)
    start = schedule.start_index(settings.strength)
    noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(settings.seed)).to(ib.device)
    x_t = noise if settings.strength >= 1.0 else add_noise(known, noise, torch.tensor(
        schedule.alpha(int(schedule.timesteps[start]))))
    cfg = settings.guidance_scale > 1.0
    predict = NoisePredictor(ib.unet, ib.encode_prompt(settings.prompt), 1,
                             uncond=ib.encode_prompt("") if cfg else None, guidance_scale=settings.guidance_scale,
                             device=ib.device, graphs=False)
    with run.step("fill"), torch.no_grad():
        if ib.family.inpainting:
            cells = inpaint_mask_latent(hole_px.float(), latent_hw).to(ib.dtype)
            with inpainting_conditioning(ib.unet, cells, masked):
                z0 = denoise(predict, x_t, schedule, start, run=run)
        else:  # a thin hole must not vanish from the blend: a cell is repainted if any of its pixels is in it
            cells = F.max_pool2d(hole_px.float(), f)
            z0 = denoise(predict, x_t, schedule, start, hooks=[BlendKnown(known, noise, cells)], run=run)
    decode, decoder = _decoder(ctx, ib, settings.fast_decode)
    with run.step("decode"), torch.no_grad():
        painted = tensor_to_pil(decode(z0).float()).resize((rgb.shape[1], rgb.shape[0]), Image.LANCZOS)
    filler = ib.name if ib.family.inpainting else f"blended latents with {b.name}"
    return Filled(np.where(hole[..., None], np.asarray(painted), rgb), filler, decoder)
