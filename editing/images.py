"""Image I/O at the boundary: decoding uploads, tensors in [-1, 1], PNGs that carry their recipe."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from editing.requests import EditError

RECIPE_KEY = "dragcanvas_recipe"


def load_image(src) -> Image.Image:
    """Path, bytes, numpy array or PIL image -> PIL RGB. Raises EditError on anything else."""
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            img = Image.fromarray(src.astype(np.uint8) if src.dtype != np.uint8 else src)
        elif isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        elif isinstance(src, (str, Path)):
            p = Path(src)
            if not p.is_file():
                raise EditError(f"Image file {p} does not exist.")
            img = Image.open(p)
        else:
            raise EditError(f"Cannot read an image from {type(src).__name__}.")
        img.load()
    except EditError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
        raise EditError(f"That file is not a readable image ({type(e).__name__}). Use PNG, JPEG or WebP.") from None
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def load_mask(src) -> np.ndarray:
    """A mask file (white = may change; alpha is used when present) -> H×W bool."""
    img = src if isinstance(src, Image.Image) else None
    if img is None:
        try:
            img = Image.open(src)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise EditError(f"The mask is not a readable image ({type(e).__name__}).") from None
    if img.mode in ("RGBA", "LA") and np.asarray(img.getchannel("A")).min() < 255:
        return np.asarray(img.getchannel("A")) > 127
    return np.asarray(img.convert("L")) > 127


def save_png_with_recipe(image: Image.Image, path, recipe: dict | None) -> Path:
    """Write a lossless PNG with the recipe JSON embedded in a tEXt chunk."""
    info = PngImagePlugin.PngInfo()
    if recipe is not None:
        info.add_text(RECIPE_KEY, json.dumps(recipe))
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_recipe(src) -> dict | None:
    img = src if isinstance(src, Image.Image) else Image.open(src)
    text = getattr(img, "text", {}).get(RECIPE_KEY) or img.info.get(RECIPE_KEY)
    return json.loads(text) if text else None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return a.permute(2, 0, 1)[None]


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL RGB."""
    a = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a)


def image_hash(img: Image.Image) -> str:
    import hashlib

    return hashlib.sha1(img.tobytes() + repr(img.size).encode()).hexdigest()[:16]
