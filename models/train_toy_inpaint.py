"""Train ``toy-inpaint``: the trained ``toy`` UNet turned into an inpainting UNet (9 input channels).

    python -m models.train_toy_inpaint --base models/toy --out models/toy-inpaint --steps 1500 --seed 0

The recipe of the SD inpainting checkpoints, at toy scale: the base UNet's first convolution gets five more input
channels (the mask and the masked image's latent, ``models.families.inpaint_input``), initialised to zero so the
fine-tune starts from the base model's own predictions, and the whole UNet is fine-tuned with the ε-loss on
(noisy latent, mask, masked-image latent) inputs. The VAE, text encoder and tokenizer stay the base's and are not
shipped again: ``models/toy-inpaint`` holds only ``unet/`` (the loader takes the rest from ``toy``).

Training masks, one of two kinds per example (half each):

- *vacated*: one shape of a toy-world v2 scene is moved, scaled or turned; the target is the scene re-rendered
  with it there, and the mask is the area it left (its old footprint, dilated, minus its new one) — exactly the
  hole a drag leaves, so the model learns what is behind a shape that went away;
- *free*: one to three random ellipses and boxes anywhere, the target the scene itself (general inpainting).

Scenes come from seeds below ``toy_world.HELDOUT_SEED`` as for ``toy``; the EMA (0.999) weights are saved in
fp16 safetensors with ``card.json`` and ``training_log.txt``. Every step count is a flag: a run is reproducible.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models import toy_world
from models.families import INPAINT_CHANNELS, inpaint_input, inpaint_mask_latent, masked_image
from models.toy_parts import ema_update, images_to_tensor, lr_at, tokenize
from models.train_toy import _alphas_cumprod

log = logging.getLogger("train_toy_inpaint")

MOVE_PX = 16.0  # a vacated example moves its shape up to this far per axis
SEAM_PX = 2  # the vacated footprint is dilated by this much, as the drag's seam band


def widen_conv_in(unet) -> None:
    """Give ``unet`` INPAINT_CHANNELS input channels: the new ones (mask, masked-image latent) start at zero, so
    the widened UNet predicts exactly what the base did until training moves them."""
    old = unet.conv_in
    if old.in_channels == INPAINT_CHANNELS:
        return
    new = torch.nn.Conv2d(INPAINT_CHANNELS, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=INPAINT_CHANNELS)


def _deformed(shape: toy_world.Shape, rng: np.random.Generator) -> toy_world.Shape:
    """The shape moved, and half the time also scaled or turned (what drags do to it)."""
    dx, dy = rng.uniform(-MOVE_PX, MOVE_PX, size=2)
    out = shape.moved(float(dx), float(dy))
    kind = rng.integers(0, 4)
    if kind == 1:
        out = replace(out, radius=float(out.radius * rng.uniform(0.6, 1.4)))
    elif kind == 2:
        out = replace(out, angle=float(out.angle + rng.uniform(-60, 60)))
    return out


def _free_mask(rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((toy_world.SIZE, toy_world.SIZE), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = (int(v) for v in rng.integers(4, toy_world.SIZE - 4, size=2))
        a, b = (int(v) for v in rng.integers(4, 18, size=2))
        if rng.random() < 0.5:
            cv2.ellipse(m, (cx, cy), (a, b), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            cv2.rectangle(m, (cx - a, cy - b), (cx + a, cy + b), 1, -1)
    return m > 0


def make_example(seed: int) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(target H×W×3 uint8, mask H×W bool = area to fill, caption, whether the mask is a vacated area) for one
    training seed. Deterministic."""
    rng = np.random.default_rng([seed, 7])
    scene = toy_world.make_scene_v2(seed)
    if scene.shapes and rng.random() < 0.5:
        i = int(rng.integers(0, len(scene.shapes)))
        others = scene.shapes[:i] + scene.shapes[i + 1:]
        for _ in range(10):
            new = _deformed(scene.shapes[i], rng)
            if toy_world.fits(new, others):
                after = toy_world.render(others + [new], scene.background)
                old = cv2.dilate(scene.shapes[i].mask.astype(np.uint8), np.ones((2 * SEAM_PX + 1,) * 2, np.uint8)) > 0
                hole = old & ~after.shapes[-1].mask
                if hole.sum() >= 8:
                    return np.asarray(after.image), hole, after.caption, True
    return np.asarray(scene.image), _free_mask(rng), scene.caption, False


@torch.no_grad()
def encode_examples(vae, seeds: np.ndarray, chunk: int = 128):
    """Scaled latents of the targets, latents of the masked images, the masks on the latent grid, captions and
    the share of vacated-area masks."""
    s = vae.config.scaling_factor
    zs, zms, ms, caps, vacated = [], [], [], [], 0
    for i in range(0, len(seeds), chunk):
        ex = [make_example(int(seed)) for seed in seeds[i:i + chunk]]
        x = images_to_tensor(np.stack([e[0] for e in ex]))
        m = torch.from_numpy(np.stack([e[1] for e in ex]))[:, None].float()
        z = vae.encode(x).latent_dist.mean * s
        zms.append(vae.encode(masked_image(x, m)).latent_dist.mean * s)
        zs.append(z)
        ms.append(inpaint_mask_latent(m, tuple(z.shape[-2:])))
        caps += [e[2] for e in ex]
        vacated += sum(e[3] for e in ex)
    return torch.cat(zs), torch.cat(zms), torch.cat(ms), caps, vacated / max(1, len(caps))


def train(args) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from models.tiny import tiny_tokenizer

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.base / "vae").float().eval().requires_grad_(False)
    text = CLIPTextModel.from_pretrained(args.base / "text_encoder").float().eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(args.base / "unet").float()
    widen_conv_in(unet)
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    tokenizer = tiny_tokenizer()
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    seeds = rng.integers(0, toy_world.HELDOUT_SEED, size=args.examples)
    z0_all, zm_all, m_all, caps, vacated = encode_examples(vae, seeds)
    log.info("encoded %d examples in %.1f min (%.0f %% of masks are vacated areas)", len(caps),
             (time.time() - t0) / 60, 100 * vacated)
    with torch.no_grad():
        cond_all = torch.cat([text(tokenize(tokenizer, caps[i:i + 256]))[0] for i in range(0, len(caps), 256)])
        empty = text(tokenize(tokenizer, [""]))[0]
    ac = torch.tensor(_alphas_cumprod())
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    deadline = time.time() + args.minutes * 60
    losses: list[float] = []
    t1 = time.time()
    for step in range(args.steps):
        if time.time() > deadline:
            log.warning("time cap after %d of %d steps", step, args.steps)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=args.warmup)
        idx = torch.from_numpy(rng.integers(0, len(caps), size=args.batch))
        z0, zm, m = z0_all[idx], zm_all[idx], m_all[idx]
        cond = cond_all[idx].clone()
        cond[torch.from_numpy(rng.random(len(idx)) < args.caption_dropout)] = empty
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (z0.shape[0],), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(inpaint_input(zt, m, zm), t, encoder_hidden_states=cond).sample
        snr = ac[t] / (1 - ac[t])
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * snr.clamp(max=5.0) / snr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, min(args.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step == 0:
            log.info("step %d/%d  loss %.4f  lr %.2e  %.2f s/step", step + 1, args.steps, np.mean(losses[-50:]),
                     opt.param_groups[0]["lr"], (time.time() - t1) / (step + 1))
    ema.half().save_pretrained(args.out / "unet", safe_serialization=True)
    card = dict(command="python -m models.train_toy_inpaint " + " ".join(sys.argv[1:]), base=str(args.base),
                seed=args.seed, steps=len(losses), vacated_share=round(vacated, 3), planned_steps=args.steps, examples=args.examples,
                batch=args.batch, lr=args.lr, ema=args.ema, minutes=round((time.time() - t0) / 60, 2),
                final_loss=float(np.mean(losses[-200:])) if losses else None, torch=torch.__version__,
                loss="eps MSE, min-SNR-5 weighted, 9-channel input (latent, mask, masked-image latent)")
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("saved %s after %d steps in %.1f min", args.out, len(losses), card["minutes"])
    return card


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=Path("models/toy"), help="the trained base model folder")
    p.add_argument("--out", type=Path, default=Path("models/toy-inpaint"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--examples", type=int, default=8000, help="training examples, encoded once")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--minutes", type=float, default=60.0, help="time cap (logged and recorded if hit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.base / "unet" / "config.json").is_file():
        raise SystemExit(f"--base {args.base} is not a trained model folder (no unet/config.json); train it first "
                         "with 'python -m models.train_toy'.")
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr),
                                  logging.FileHandler(args.out / "training_log.txt", mode="w")])
    torch.set_num_threads(args.threads)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
