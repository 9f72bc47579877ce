"""Quality of the trained toy model, measured offline on held-out toy-world scenes.

    python -m bench.toy_quality [--model models/toy] [--n 64] [--json bench/results/toy_quality.json]

Three numbers, each with the target it should meet (see models/toy/README.md):

- ``vae_psnr_db`` (≥ 26): VAE reconstruction (posterior mean → decode) of ``n`` held-out scenes.
- ``inversion_psnr_db`` (≥ 22): DDIM inversion of those scenes' latents to t = 981 (all 50 steps, no CFG,
  the scene's caption as prompt) and DDIM reconstruction back, with ``editing.sampling``'s loops; PSNR of
  the decoded image against the original scene, so it includes the VAE's error. The same at the
  DragDiffusion inversion strength 0.7 (t = 681) is reported as ``inversion_psnr_db_s07``.
- ``prompt_shape_rate`` (≥ 0.70): text-to-image with CFG from the held-out captions (50 DDIM steps); a
  prompted shape counts as found when ``toy_world.segment_colour`` finds a connected blob of its colour
  whose area is plausible for it (0.3-3× the ground-truth shape's area), each blob used at most once.
  Also reported: the share of samples with every prompted shape found, of samples whose border is the
  prompted background colour, and the mean count of plausible blobs in colours the prompt did not name.

Scenes use seeds from ``toy_world.HELDOUT_SEED`` up, which training never sees. The folder is loaded
with diffusers / transformers classes directly, fp32 on CPU. A sample grid is saved next to the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from editing.sampling import NoisePredictor, Schedule, denoise, invert
from models import toy_world as tw

log = logging.getLogger("bench.toy_quality")

TARGETS = dict(vae_psnr_db=26.0, inversion_psnr_db=22.0, prompt_shape_rate=0.70)
AREA_RANGE = (0.3, 3.0)  # a found blob's area relative to the ground-truth shape's
MIN_BLOB = 6  # pixels; smaller specks of a colour are ignored


def load_toy(model: str | Path) -> dict:
    """``vae, unet, text_encoder, tokenizer, scheduler`` of a diffusers folder, fp32, eval mode."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = str(model)
    parts = dict(
        vae=AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32),
        unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(model, subfolder="scheduler"),
    )
    for k in ("vae", "unet", "text_encoder"):
        parts[k].eval().requires_grad_(False)
    return parts


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 -> N×3×H×W float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """N×3×H×W in [-1, 1] -> N×H×W×3 uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB, [0, 1] scale) between batches in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def encode_text(parts: dict, captions: list[str]) -> torch.Tensor:
    """Text-encoder hidden states (N, 77, D) of ``captions``."""
    tok = parts["tokenizer"]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return parts["text_encoder"](ids).last_hidden_state


@torch.no_grad()
def encode(parts: dict, x: torch.Tensor) -> torch.Tensor:
    """Scaled latents (posterior means) of images in [-1, 1]."""
    vae = parts["vae"]
    return torch.cat([vae.encode(c).latent_dist.mean for c in x.split(32)]) * vae.config.scaling_factor


@torch.no_grad()
def decode(parts: dict, z: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] of scaled latents."""
    vae = parts["vae"]
    return torch.cat([vae.decode(c / vae.config.scaling_factor).sample for c in z.split(32)])


def ddim_denoise(unet, x: torch.Tensor, cond: torch.Tensor, schedule: Schedule, start: int,
                 uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """DDIM from ``timesteps[start]`` down to z₀ (σ = 0) on the shared loop, with classifier-free guidance
    when ``uncond`` is given."""
    cfg = uncond is not None and guidance_scale != 1.0
    predict = NoisePredictor(unet, cond, x.shape[0], uncond=uncond if cfg else None, guidance_scale=guidance_scale,
                             device=x.device)
    return denoise(predict, x, schedule, start)


def match_shapes(sample: np.ndarray, shapes: list[tw.Shape]) -> list[bool]:
    """Per prompted shape: is there a blob of its colour with plausible area (each blob used once)?"""
    found = [False] * len(shapes)
    for colour in {s.colour for s in shapes}:
        lab, n = tw.label(tw.segment_colour(sample, colour))
        areas = sorted((int(a) for a in np.bincount(lab.ravel())[1:] if a >= MIN_BLOB), reverse=True)
        for i in sorted((i for i, s in enumerate(shapes) if s.colour == colour), key=lambda i: -shapes[i].mask.sum()):
            want = float(shapes[i].mask.sum())
            for j, a in enumerate(areas):
                if AREA_RANGE[0] * want <= a <= AREA_RANGE[1] * want:
                    found[i] = True
                    areas.pop(j)
                    break
    return found


def extra_blobs(sample: np.ndarray, shapes: list[tw.Shape]) -> int:
    """Blobs (≥ 40 px) in shape colours the prompt did not name."""
    n_extra = 0
    for colour in set(tw.COLOURS) - {s.colour for s in shapes}:
        lab, n = tw.label(tw.segment_colour(sample, colour))
        n_extra += int((np.bincount(lab.ravel())[1:] >= 40).sum())
    return n_extra


def border_colour(sample: np.ndarray) -> str:
    """The background colour (by nearest palette entry) of most of the image's 2-pixel border."""
    a = sample.astype(np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    names = list(tw.BACKGROUNDS) + list(tw.COLOURS)
    pal = np.asarray(list(tw.BACKGROUNDS.values()) + list(tw.COLOURS.values()), np.float32)
    nearest = np.linalg.norm(border[:, None] - pal[None], axis=-1).argmin(-1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def run(model: str | Path, n: int = 64, steps: int = 50, guidance_scale: float = 5.0, seed: int = 0,
        batch: int = 32, grid: Path | None = None) -> dict:
    """All metrics of one model folder on ``n`` held-out scenes. Returns the report dict."""
    t_start = time.time()
    parts = load_toy(model)
    unet = parts["unet"]
    scenes = [tw.make_scene(tw.HELDOUT_SEED + i) for i in range(n)]
    x = to_tensor(np.stack([np.asarray(s.image) for s in scenes]))
    captions = [s.caption for s in scenes]
    report: dict = dict(model=str(model), n=n, steps=steps, guidance_scale=guidance_scale, seed=seed,
                        heldout_seeds=[tw.HELDOUT_SEED, tw.HELDOUT_SEED + n], targets=TARGETS)
    card = Path(model) / "card.json"
    if card.exists():
        c = json.loads(card.read_text())
        report["model_status"] = c.get("status")
        report["model_unet_steps"] = c.get("unet", {}).get("steps")

    # 1. VAE reconstruction
    t0 = time.time()
    z0 = encode(parts, x)
    report["vae_psnr_db"] = round(psnr_db(decode(parts, z0), x), 2)
    log.info("VAE reconstruction PSNR %.2f dB (%.1f s)", report["vae_psnr_db"], time.time() - t0)

    # 2. DDIM inversion + reconstruction, prompt = the scene's caption, no CFG
    schedule = Schedule.from_scheduler(parts["scheduler"], steps)
    cond = encode_text(parts, captions)
    for key, strength in (("inversion_psnr_db", 1.0), ("inversion_psnr_db_s07", 0.7)):
        t0 = time.time()
        start = schedule.start_index(strength)
        recs = []
        for i in range(0, n, batch):
            inv = invert(NoisePredictor(unet, cond[i:i + batch], len(cond[i:i + batch])), z0[i:i + batch], schedule, start)
            recs.append(ddim_denoise(unet, inv.z_t, cond[i:i + batch], schedule, start))
        report[key] = round(psnr_db(decode(parts, torch.cat(recs)), x), 2)
        log.info("inversion to t=%d and back: PSNR %.2f dB (%.1f s)", schedule.timesteps[start], report[key], time.time() - t0)

    # 3. text-to-image prompt adherence
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, unet.config.in_channels, *z0.shape[2:]), generator=gen)
    uncond = encode_text(parts, [""])
    samples = []
    for i in range(0, n, batch):
        c = cond[i:i + batch]
        z = ddim_denoise(unet, noise[i:i + batch], c, schedule, 0, uncond.expand(len(c), -1, -1), guidance_scale)
        samples.append(to_uint8(decode(parts, z)))
    samples = np.concatenate(samples)
    per_scene = [match_shapes(s, sc.shapes) for s, sc in zip(samples, scenes)]
    flat = [f for fs in per_scene for f in fs]
    report["prompt_shape_rate"] = round(float(np.mean(flat)), 3)
    report["prompt_scene_all_rate"] = round(float(np.mean([all(fs) for fs in per_scene])), 3)
    report["prompt_background_rate"] = round(float(np.mean([border_colour(s) == sc.background.colour
                                                            for s, sc in zip(samples, scenes)])), 3)
    report["unprompted_blobs_per_sample"] = round(float(np.mean([extra_blobs(s, sc.shapes) for s, sc in zip(samples, scenes)])), 3)
    log.info("prompt adherence: %.1f %% of %d shapes found, %.1f %% of scenes complete, background %.1f %% (%.1f s)",
             100 * report["prompt_shape_rate"], len(flat), 100 * report["prompt_scene_all_rate"],
             100 * report["prompt_background_rate"], time.time() - t0)

    report["meets_targets"] = {k: bool(report[k] >= v) for k, v in TARGETS.items()}
    report["seconds"] = round(time.time() - t_start, 1)
    if grid is not None:
        save_grid(grid, np.stack([np.asarray(s.image) for s in scenes]), samples)
        report["grid"] = str(grid)
    return report


def save_grid(path: Path, originals: np.ndarray, samples: np.ndarray, cols: int = 8) -> None:
    """PNG: rows of held-out scenes, each followed by a row of the samples from their captions."""
    from PIL import Image

    k = min(len(samples), 4 * cols) // cols * cols
    if k == 0:
        return
    rows = []
    for r in range(0, k, cols):
        rows.append(np.concatenate(list(originals[r:r + cols]), 1))
        rows.append(np.concatenate(list(samples[r:r + cols]), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/toy")
    p.add_argument("--n", type=int, default=64, help="held-out scenes")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--json", type=Path, default=Path("bench/results/toy_quality.json"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    report = run(args.model, args.n, args.steps, args.guidance_scale, args.seed,
                 grid=args.json.with_suffix(".png"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    for k, target in TARGETS.items():
        print(f"{k:24s} {report[k]:8.3f}   target ≥ {target}   {'ok' if report[k] >= target else 'MISS'}")
    for k in ("inversion_psnr_db_s07", "prompt_scene_all_rate", "prompt_background_rate", "unprompted_blobs_per_sample"):
        print(f"{k:24s} {report[k]:8.3f}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
