"""DIFT point matching: diffusion features as a dense descriptor (Tang et al. 2023, "Emergent
Correspondence from Image Diffusion", NeurIPS 2023), through our own model loader.

The DragBench Mean Distance (REFERENCE.md, "Evaluation (DragBench, from DragDiffusion)") uses DIFT on
SD-2.1 at t = 261, the output of ``up_blocks[1]``, averaged over an ensemble of 8 noise draws with
the sample's prompt; the features are bilinearly upsampled to the image size and each handle is
matched by cosine argmax. Those are the defaults here; the model spec is configurable (tests use
"tiny"). As in DragDiffusion's evaluation (and unlike DIFT's own 768² resize) each image keeps its
size, only rounded to the UNet's ``pixel_multiple``. Beyond the outermost feature-cell centres the
bilinear map is flat, so matches there tie and the first (top-left) pixel wins.

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


def _unet_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(w, h) rounded to the nearest multiple of ``multiple`` (at least one), so the UNet divides evenly."""
    return tuple(max(multiple, int(round(s / multiple)) * multiple) for s in size)


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
                 device=None, seed: int = 0):
        from models.loader import load_bundle

        self.bundle = load_bundle(spec, device=device)  # cached per process: shared with an Editor of the same spec
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
        """``(1, C, h, w)`` float32: ``up_blocks[block]`` output at timestep t, mean over ``ensemble`` noise draws.

        The image is resized to the nearest multiple of the model's ``pixel_multiple``; the map covers
        the whole image, so any (w, h) maps back by scaling. The VAE posterior mean is the clean
        latent (deterministic); the noise draws are seeded, so the same image gives the same features.
        """
        b = self.bundle
        img = image.convert("RGB")
        size = _unet_size(img.size, b.pixel_multiple)
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)
        x = pil_to_tensor(img).to(b.device, b.dtype)
        z0 = b.vae.encode(x).latent_dist.mean.float() * b.vae.config.scaling_factor  # (1, 4, H/8, W/8)
        gen = torch.Generator("cpu").manual_seed(self.seed)
        noise = torch.randn((self.ensemble, *z0.shape[1:]), generator=gen).to(b.device)
        a = b.scheduler.alphas_cumprod[self.t].float().to(b.device)
        z_t = add_noise(z0.expand(self.ensemble, -1, -1, -1), noise, a)  # (E, 4, H/8, W/8)
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
        dst_feat = src_feat if dst_img is src_img else self.features(dst_img, prompt)
        vecs = sample_features(src_feat, torch.tensor(pts, dtype=torch.float32), src_img.size)  # (K, C)
        return cosine_argmax(vecs, dst_feat, dst_img.size)
