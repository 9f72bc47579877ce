"""Image I/O at the boundary: decoding uploads, tensors in [-1, 1], PNGs that carry their recipe.

Every picture that enters the engine (a path, bytes, an array or a PIL image, from the UI, the API or the
CLI) passes ``open_image`` / ``to_rgb`` here, so the size policy and the mode conversions are decided once:

* size: the pixel count a file *declares* in its header is checked before any pixel is decoded (PIL's
  ``Image.open`` is lazy); above ``MAX_PIXELS`` the image is refused with one line naming both numbers
  (PIL's own decompression-bomb guard, which fires later and larger, becomes the same message). Below it,
  ``EditContext.fit`` downscales to ``EngineOptions.max_side`` with a notice.
* modes: 16-bit and 32-bit greyscale are rescaled to 8 bits (PIL's own conversion clips them to white),
  anything with transparency (RGBA, LA, PA, P with a transparent colour) is composited on white, CMYK /
  YCbCr / 1-bit / L convert as PIL does, an animation gives its first frame, and EXIF orientation is
  applied (``ImageOps.exif_transpose``) so pixels are where the viewer saw them. A mode PIL cannot turn
  into RGB is refused with its name.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from models.errors import EditError

RECIPE_KEY = "dragcanvas_recipe"
# Largest picture accepted, in declared pixels: 50 MP covers today's camera sensors (8192×6144); a decoded RGB
# copy of it is 150 MB. Above it an upload is refused from its header alone (no decoding, well under a second).
MAX_PIXELS = 50_000_000
MIN_SIDE = 8  # smaller pictures carry nothing a model can use (and 1-px sides break resizing)
# PIL's decompression-bomb guard is left at its default (≈ 89 MP warns, twice that raises); ours fires first.
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageSizeError(EditError):
    """A readable picture of a size the engine refuses (too many pixels, or too small a side)."""


def check_size(size: tuple[int, int], what: str = "image", min_side: int = MIN_SIDE) -> None:
    """Refuse a declared ``(w, h)`` above ``MAX_PIXELS`` or below ``min_side`` a side (one line, both numbers)."""
    w, h = int(size[0]), int(size[1])
    if w * h > MAX_PIXELS:
        raise ImageSizeError(f"The {what} is {w}×{h} ({w * h / 1e6:.1f} MP); the limit is {MAX_PIXELS / 1e6:g} MP: "
                             "downscale it before uploading.")
    if min(w, h) < min_side:
        raise ImageSizeError(f"The {what} is {w}×{h}; it must be at least {min_side} px on each side.")


def _unreadable(what: str, e: BaseException) -> EditError:
    if isinstance(e, BOMB_ERRORS):
        m = re.search(r"\((\d+) pixels\)", str(e))  # PIL names the declared count: "Image size (N pixels) …"
        size = f" ({int(m.group(1)) / 1e6:.1f} MP)" if m else ""
        return ImageSizeError(f"The {what} declares more pixels{size} than the limit of {MAX_PIXELS / 1e6:g} MP (a "
                              "decompression bomb or a huge picture): downscale it before uploading.")
    return EditError(f"The {what} is not a readable image ({type(e).__name__}). Use PNG, JPEG or WebP.")


def open_image(src, what: str = "image", min_side: int = MIN_SIDE) -> Image.Image:
    """Path, bytes, numpy array or PIL image -> a *checked* PIL image in its own mode, frame 0, EXIF
    orientation applied. The declared size is checked before decoding. Raises EditError on anything else."""
    try:
        with warnings.catch_warnings():
            # PIL warns from ≈ 89 MP on open; our own check on the header, just below, refuses with the size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                img = src
            elif isinstance(src, np.ndarray):
                img = _from_array(src, what)
            elif isinstance(src, (bytes, bytearray)):
                img = Image.open(io.BytesIO(src))
            elif isinstance(src, (str, Path)):
                p = Path(src)
                if not p.is_file():
                    raise EditError(f"The {what} file {p.name} does not exist.")
                img = Image.open(p)
            else:
                raise EditError(f"Cannot read an image from {type(src).__name__}.")
            check_size(img.size, what, min_side)  # header only: nothing decoded yet
            if getattr(img, "is_animated", False) and img.tell() != 0:
                img.seek(0)  # an animation: its first frame
            img.load()
            if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: pixels as the viewer showed them
                img = ImageOps.exif_transpose(img)
    except EditError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError, EOFError, *BOMB_ERRORS) as e:
        raise _unreadable(what, e) from None
    return img


def _from_array(a: np.ndarray, what: str) -> Image.Image:
    """H×W, H×W×1/3/4 arrays; floats in [0, 1] or [0, 255], any integer depth -> PIL (8-bit)."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise EditError(f"The {what} array has shape {a.shape}; use H×W, H×W×3 or H×W×4.")
    check_size((a.shape[1], a.shape[0]), what)
    if a.dtype != np.uint8:
        f = np.nan_to_num(a.astype(np.float32))
        if a.dtype == bool:
            f = f * 255
        elif np.issubdtype(a.dtype, np.floating):
            f = f * 255 if f.max(initial=0) <= 1.0 else f
        elif a.dtype.itemsize > 1 and f.max(initial=0) > 255:
            f = f / (257.0 if f.max() <= 65535 else f.max() / 255.0)
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _deep_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit L, by the range its mode stands for (PIL clips to 255)."""
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.min(initial=0) >= 0 and a.max(initial=0) <= 65535):
        a = a / 257.0  # 0..65535 -> 0..255 (a PNG's 16-bit grey opens as I;16 or I)
    elif img.mode == "F" and a.min(initial=0) >= 0 and a.max(initial=0) <= 1.0:
        a = a * 255.0
    else:  # another range: stretch what is there
        lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def to_rgba(img: Image.Image) -> Image.Image:
    """Any mode -> RGBA (deep greyscale rescaled first)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _deep_to_l(img).convert("RGBA")
    try:
        return img.convert("RGBA")
    except ValueError as e:
        raise EditError(f"Images of mode {img.mode} cannot be used ({e}); save it as an RGB PNG or JPEG.") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL opens -> RGB: transparency composited on white, deep greyscale rescaled to 8 bits."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _deep_to_l(img).convert("RGB")
    if has_alpha(img) or img.mode == "P":
        rgba = to_rgba(img)
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise EditError(f"Images of mode {img.mode} cannot be used ({e}); save it as an RGB PNG or JPEG.") from None


def load_image(src, what: str = "image") -> Image.Image:
    """Path, bytes, numpy array or PIL image -> PIL RGB (size checked before decoding; see the module
    docstring for the modes). Raises EditError on anything else."""
    return to_rgb(open_image(src, what))


def load_sketch(src, what: str = "sketch") -> Image.Image:
    """A drawing, checked like every picture: RGBA when it has transparency (a strokes layer to composite over a
    photo), RGB otherwise (16-bit pages rescaled, so a light page is not taken for white)."""
    img = open_image(src, what)
    if has_alpha(img):
        rgba = to_rgba(img)
        if rgba.getchannel("A").getextrema()[0] < 255:
            return rgba
    return to_rgb(img)


def load_mask(src, what: str = "mask") -> np.ndarray:
    """A mask file (white = may change; alpha is used when present) -> H×W bool."""
    img = open_image(src, what, min_side=1)
    if has_alpha(img):
        a = np.asarray(to_rgba(img).getchannel("A"))
        if a.min() < 255:
            return a > 127
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return np.asarray(_deep_to_l(img)) > 127
    try:
        return np.asarray(img.convert("L")) > 127
    except ValueError as e:
        raise EditError(f"The {what} has mode {img.mode}, which cannot be read as a mask ({e}).") from None


def atomic_write(path, write, replace: bool = True) -> Path:
    """``write(tmp_path)`` into a temp file in ``path``'s folder, then rename it to ``path``: a crash leaves the
    old file or none, never a torn one. ``replace=False``: never overwrite — when ``path`` exists (also when
    another writer got there first) raise ``FileExistsError`` and leave it untouched (``os.link`` is atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: no check-then-write race
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: the check is not atomic there
                if path.exists():
                    raise FileExistsError(str(path)) from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_png_with_recipe(image: Image.Image, path, recipe: dict | None) -> Path:
    """Write a lossless PNG with the recipe JSON embedded in a tEXt chunk (atomically: temp file + rename)."""
    info = PngImagePlugin.PngInfo()
    if recipe is not None:
        info.add_text(RECIPE_KEY, json.dumps(recipe))
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_recipe(src) -> dict | None:
    """The recipe a DragCanvas PNG carries, or None. A file that is no image (or a bomb) -> EditError."""
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(src)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, *BOMB_ERRORS) as e:
            raise _unreadable("recipe file", e) from None
    text = img.info.get(RECIPE_KEY)  # our tEXt chunk comes before the pixels: no decoding needed
    if text is None and img.width * img.height <= MAX_PIXELS:
        try:
            text = getattr(img, "text", {}).get(RECIPE_KEY)  # chunks after the pixels (decodes them)
        except (OSError, ValueError, SyntaxError, *BOMB_ERRORS) as e:
            raise _unreadable("recipe file", e) from None
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise EditError("The recipe embedded in this PNG is damaged (not valid JSON).") from None


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
