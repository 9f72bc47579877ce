"""DIFT point matching: diffusion features as a dense descriptor (Tang et al. 2023, "Emergent
Correspondence from Image Diffusion", NeurIPS 2023), through our own model loader.

The DragBench Mean Distance (REFERENCE.md, "Evaluation (DragBench, from DragDiffusion)", exact
protocol of the official ``drag_bench_evaluation/``) uses DIFT on SD-2.1 in fp32 at t = 261, the
output of ``up_blocks[1]`` (``up_ft_index`` 1): the image is repeated 8 times, each copy gets its own
VAE posterior sample and its own noise, x_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε, one UNet pass with the sample's
prompt (no CFG), and the 8 feature maps are averaged; the map is bilinearly upsampled to the image
size and each handle is matched by cosine argmax over the whole image. Those are the defaults here;
the model spec is configurable (tests use "tiny"). As in DragDiffusion's evaluation (and unlike
DIFT's own 768² resize) each image is fed at its own size, not rounded (the diffusers UNet forwards
the upsample sizes of sides that are not a multiple of its downsampling). Beyond the outermost
feature-cell centres the bilinear map is flat, so matches there tie and the first (top-left, row
major, as numpy's argmax) pixel wins.

Seed: the official script seeds the global RNG once (42) and draws for every image in turn, so its
noise depends on the file-system listing order and cannot be reproduced bit for bit. Here every
``features`` call draws from its own generator seeded 42: a sample's score depends on that sample
alone (order-free, so a worker pool gives the same numbers), and an unchanged image gets exactly its
own features.

    dift = Dift()                                     # SD-2.1, t=261, up_blocks[1], 8 draws
    found = dift.match(original, handles, edited, prompt)   # [(x, y), ...] in edited-image pixels
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from editing.features import run_for_features
from editing.images import pil_to_tensor
from editing.sampling import add_noise

DIFT_MODEL = "stabilityai/stable-diffusion-2-1"


def _grid(xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 2) pixel (x, y) of an image of ``size`` = (w, h) -> grid_sample coordinates in [-1, 1].

    With ``align_corners=False`` a pixel's centre sits at (x + 0.5) / w of the width, which is the
    same convention as ``F.interpolate(mode="bilinear")``: sampling here equals sampling the map
    upsampled to the image size, without materialising it.
    """
    w, h = size
    return torch.stack([(2 * xy[:, 0] + 1) / w - 1, (2 * xy[:, 1] + 1) / h - 1], -1)


def sample_features(feat: torch.Tensor, xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear features ``(N, C)`` at pixel positions ``xy`` (N, 2) of an image of ``size`` = (w, h)."""
    g = _grid(xy.to(feat.device, torch.float32), size)[None, None]  # (1, 1, N, 2)
    out = F.grid_sample(feat.float(), g, mode="bilinear", padding_mode="border", align_corners=False)  # (1, C, 1, N)
    return out[0, :, 0].T


def cosine_argmax(src_vecs: torch.Tensor, feat: torch.Tensor, size: tuple[int, int],
                  chunk_px: int = 16384) -> list[tuple[float, float]]:
    """For each row of ``src_vecs`` (K, C): the pixel of the ``size`` image whose upsampled feature is most similar.

    The feature map (1, C, h, w) is upsampled bilinearly one band of rows at a time, so a 1280-channel
    map at 512×768 never has to sit in memory at once.
    """
    w, h = size
    src = F.normalize(src_vecs.float(), dim=1)  # (K, C)
    best = torch.full((src.shape[0],), -2.0, device=src.device)
    best_idx = torch.zeros(src.shape[0], dtype=torch.long, device=src.device)
    rows = max(1, chunk_px // w)
    xs = torch.arange(w, dtype=torch.float32, device=feat.device)
    for y0 in range(0, h, rows):
        ys = torch.arange(y0, min(h, y0 + rows), dtype=torch.float32, device=feat.device)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        xy = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)  # (P, 2), row-major
        dst = F.normalize(sample_features(feat, xy, size), dim=1)  # (P, C)
        sim = src @ dst.T  # (K, P)
        val, idx = sim.max(dim=1)
        better = val > best
        best = torch.where(better, val, best)
        best_idx = torch.where(better, idx + y0 * w, best_idx)
    return [(float(i % w), float(i // w)) for i in best_idx.tolist()]


class Dift:
    """Diffusion features of one model, averaged over noise draws; point matching by cosine argmax."""

    def __init__(self, spec: str = DIFT_MODEL, t: int = 261, block: int = 1, ensemble: int = 8,
                 device=None, seed: int = 42, dtype: torch.dtype = torch.float32):
        from models.loader import load_bundle

        # fp32 as the official evaluation (it loads SD-2.1 without a dtype); cached per process
        self.bundle = load_bundle(spec, device=device, dtype=dtype)
        n_up = len(self.bundle.unet.up_blocks)
        if not 0 <= block < n_up:
            raise ValueError(f"block={block}: the UNet of {spec!r} has up_blocks[0..{n_up - 1}].")
        if not 0 <= t < len(self.bundle.scheduler.alphas_cumprod):
            raise ValueError(f"t={t} is outside the model's {len(self.bundle.scheduler.alphas_cumprod)} timesteps.")
        if ensemble < 1:
            raise ValueError(f"ensemble={ensemble} must be at least 1.")
        self.spec, self.t, self.block, self.ensemble, self.seed = spec, int(t), int(block), int(ensemble), int(seed)

    @torch.no_grad()
    def features(self, image: Image.Image, prompt: str = "") -> torch.Tensor:
        """``(1, C, h, w)`` float32: ``up_blocks[block]`` output at timestep t, mean over ``ensemble`` draws.

        The image goes in at its own size (the map covers the whole image, so any (w, h) maps back by
        scaling). Each of the ``ensemble`` copies takes its own sample of the VAE posterior, z₀ = μ + σ·n
        (the official script encodes the repeated image and calls ``latent_dist.sample()``: the same
        posterior, so it is encoded once here), then its own noise ε. All draws come from a generator
        seeded with ``seed`` per call, so the same image gives the same features.
        """
        b = self.bundle
        x = pil_to_tensor(image.convert("RGB")).to(b.device, b.dtype)
        post = b.vae.encode(x).latent_dist
        gen = torch.Generator("cpu").manual_seed(self.seed)
        shape = (self.ensemble, *post.mean.shape[1:])
        n = torch.randn(shape, generator=gen).to(b.device)  # posterior draws first, then noise, as the official
        noise = torch.randn(shape, generator=gen).to(b.device)
        z0 = (post.mean.float() + post.std.float() * n) * b.vae.config.scaling_factor  # (E, 4, h, w)
        a = b.scheduler.alphas_cumprod[self.t].float().to(b.device)
        z_t = add_noise(z0, noise, a)  # (E, 4, h, w)
        t = torch.tensor(self.t, dtype=torch.long, device=b.device)
        _, feats = run_for_features(b.unet, z_t, t, b.encode_prompt(prompt), blocks=(self.block,))
        return feats[self.block].float().mean(dim=0, keepdim=True)  # (1, C, h, w)

    @torch.no_grad()
    def match(self, src_img: Image.Image, src_points, dst_img: Image.Image, prompt: str = "") -> list[tuple[float, float]]:
        """Where each ``(x, y)`` of ``src_img`` went in ``dst_img`` (pixels of ``dst_img``), by DIFT cosine argmax."""
        pts = [tuple(map(float, p)) for p in src_points]
        if not pts:
            return []
        src_feat = self.features(src_img, prompt)
        dst_feat = src_feat if dst_img is src_img else self.features(dst_img, prompt)  # the same draws: equal
        vecs = sample_features(src_feat, torch.tensor(pts, dtype=torch.float32), src_img.size)  # (K, C)
        return cosine_argmax(vecs, dst_feat, dst_img.size)
