"""The subject's photos: loading (files, folders, PIL images), the square crop, and augmentation."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from editing.images import ImageSizeError, open_image, to_rgb
from models.errors import EditError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_PHOTOS = 2  # fewer is allowed, with a warning: one photo over-fits pose and background
MAX_PHOTOS = 64  # DreamBooth uses 3–10; more only lengthen the load and the encoding
MIN_PHOTO_SIDE = 32  # a smaller photo, blown up to the training size, teaches blur, not the subject


def _expand(photos) -> list:
    """Folders become their files (sorted); everything else passes through."""
    out = []
    for p in photos if isinstance(photos, (list, tuple)) else [photos]:
        if isinstance(p, (str, Path)) and Path(p).is_dir():
            out.extend(sorted(f for f in Path(p).iterdir() if f.is_file() and not f.name.startswith(".")))
        else:
            out.append(p)
    return out


def _size_notice(images: list[Image.Image]) -> str | None:
    """A notice when the photos differ in aspect or size (each is centre-cropped and resized anyway)."""
    sizes = [im.size for im in images]
    aspects = [w / h for w, h in sizes]
    if max(aspects) / min(aspects) > 1.05 or max(max(s) for s in sizes) > 2 * min(min(s) for s in sizes):
        return (f"The photos have different sizes ({', '.join(f'{w}×{h}' for w, h in sizes[:6])}"
                f"{' …' if len(sizes) > 6 else ''}); each is centre-cropped to a square and resized.")
    return None


def load_photos(photos) -> tuple[list[Image.Image], list[str]]:
    """Paths / folders / PIL images -> (RGB images, notices). Unreadable files are skipped and listed."""
    images, skipped = [], []
    items = [p for p in _expand(photos) if p is not None]
    if len(items) > MAX_PHOTOS:
        raise EditError(f"{len(items)} photos; at most {MAX_PHOTOS} can be used (3–10 of the subject work best).")
    for i, p in enumerate(items, 1):
        label = Path(p).name if isinstance(p, (str, Path)) else str(i)
        try:
            images.append(to_rgb(open_image(p, f"photo {label}", min_side=MIN_PHOTO_SIDE)))
        except ImageSizeError as e:  # readable but refused (too small to teach anything, or too large): say so
            raise EditError(f"{e} Subject photos of 256 px or more a side work best.") from None
        except EditError:
            skipped.append(Path(p).name if isinstance(p, (str, Path)) else type(p).__name__)
    notices = []
    if skipped:
        notices.append(f"Skipped {len(skipped)} file(s) that are not readable images: {', '.join(skipped[:10])}"
                       f"{' …' if len(skipped) > 10 else ''}.")
    if not images:
        raise EditError("No photos: add 3–10 photos (PNG, JPEG or WebP) of the subject"
                        + (f" (none of {', '.join(skipped[:5])} is an image)." if skipped else "."))
    if len(images) < MIN_PHOTOS:
        notices.append(f"Only {len(images)} photo: training works, but 3–10 photos of the subject in different "
                       "poses and places teach it far better (one photo over-fits pose and background).")
    size_notice = _size_notice(images)
    if size_notice:
        notices.append(size_notice)
    return images, notices


def square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, resize to ``size``² (every photo enters training this way)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool, crop: bool, min_scale: float = 0.8) -> torch.Tensor:
    """Random horizontal flip and random crop (scale ≥ ``min_scale`` of the side) resized back. x: (1, 3, H, W).

    Draws from ``gen`` in a fixed order (scale, top, left, flip) so a seed replays the same batch.
    """
    _, _, h, w = x.shape
    if crop:
        s = float(min_scale + (1 - min_scale) * torch.rand((), generator=gen))
        ch, cw = max(1, round(h * s)), max(1, round(w * s))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        x = F.interpolate(x[:, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False,
                          antialias=True)
    if flip and bool(torch.rand((), generator=gen) < 0.5):
        x = x.flip(-1)
    return x
