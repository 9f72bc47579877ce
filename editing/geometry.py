"""The one place where user pixels become working-image, latent or feature-grid coordinates."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def working_size(size: tuple[int, int], native: int, multiple: int) -> tuple[int, int]:
    """Scale (w, h) so the long side is ``native`` and both sides are multiples of ``multiple``.

    Diffusion models are trained at one resolution; keeping the aspect ratio and rounding to the
    UNet's down-sampling multiple lets any image shape go through without distortion.
    """
    w, h = size
    s = native / max(w, h)
    rw = max(multiple, int(round(w * s / multiple)) * multiple)
    rh = max(multiple, int(round(h * s / multiple)) * multiple)
    return rw, rh


def scale_point(p: tuple[float, float], src: tuple[int, int], dst: tuple[int, int]) -> tuple[float, float]:
    """Map (x, y) between images of sizes ``src`` and ``dst`` (w, h), treating pixels as unit cells."""
    return ((p[0] + 0.5) * dst[0] / src[0] - 0.5, (p[1] + 0.5) * dst[1] / src[1] - 0.5)


def points_to_grid(points, image_size: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """(x, y) image pixels -> (N, 2) float tensor of (x, y) in a grid of ``grid_hw`` = (H, W) cells."""
    h, w = grid_hw
    return torch.tensor([scale_point(p, image_size, (w, h)) for p in points], dtype=torch.float32)


def grid_to_points(grid_pts: torch.Tensor, grid_hw: tuple[int, int], image_size: tuple[int, int]):
    h, w = grid_hw
    return [scale_point((float(x), float(y)), (w, h), image_size) for x, y in grid_pts.tolist()]


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """H×W bool -> (1, 1, h, w) float in {0, 1}; a cell counts as editable if any pixel in it is."""
    h, w = hw
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (torch.nn.functional.adaptive_max_pool2d(m, (h, w)) > 0).float()


def resize_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.LANCZOS)


def place(x: torch.Tensor, centre: tuple[float, float], scale: float, offset: tuple[float, float],
          image_size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Warp a (B, C, H, W) map of an image of ``image_size`` (w, h): the content at pixel ``p`` moves to
    ``centre + scale·(p − centre) + offset``; uncovered cells become 0.

    The one helper that moves objects for Move/Paste — on latents (z_T), masks and feature maps alike,
    so they always agree. ``centre`` and ``offset`` are in image pixels.
    """
    w, h = image_size
    cx, cy = (2 * (centre[0] + 0.5) / w - 1, 2 * (centre[1] + 0.5) / h - 1)  # normalised, align_corners=False
    ox, oy = 2 * offset[0] / w, 2 * offset[1] / h
    # Output q samples the source at p = c + (q − o − c) / s.
    theta = torch.tensor([[1 / scale, 0, cx * (1 - 1 / scale) - ox / scale],
                          [0, 1 / scale, cy * (1 - 1 / scale) - oy / scale]], dtype=torch.float32)
    grid = torch.nn.functional.affine_grid(theta[None].expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x.float(), grid.to(x.device), mode=mode, padding_mode="zeros",
                                          align_corners=False)
    return out.to(x.dtype)


def mask_centre(mask: np.ndarray) -> tuple[float, float]:
    """Centre (x, y) of a mask's bounding box, in pixels."""
    ys, xs = np.nonzero(mask)
    return (float(xs.min() + xs.max()) / 2, float(ys.min() + ys.max()) / 2)


def mask_at(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An H×W bool mask at ``size`` = (w, h), nearest neighbour (itself when it is that size already)."""
    if mask.shape == (size[1], size[0]):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def place_object(image: Image.Image, mask: np.ndarray, scale: float, offset: tuple[float, float],
                 size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Where Move/Paste will put the object under ``mask`` of ``image``, both resized to ``size`` (w, h): its
    bounding-box centre scaled by ``scale`` and shifted by ``offset`` pixels, exactly as ``place`` moves it.

    PIL/NumPy in and out, so the UI's live preview needs no torch: returns (H×W×3 float32 RGB in [0, 255],
    H×W bool of where the object lands).
    """
    mask = mask_at(mask, size)
    rgb = torch.from_numpy(np.asarray(image.convert("RGB").resize(size), np.float32)).permute(2, 0, 1)[None]
    m = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    centre = mask_centre(mask)
    moved = place(rgb, centre, scale, offset, size, mode="bilinear")[0].permute(1, 2, 0).numpy()  # (H, W, 3)
    return moved, place(m, centre, scale, offset, size)[0, 0].numpy() > 0.5
