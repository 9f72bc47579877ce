"""Condition-image preprocessors for ControlNet / T2I-Adapter units (OpenCV, no weights).

Every preprocessor is ``fn(image: PIL RGB, **options) -> PIL RGB`` of the same size, white structure
on black (the convention of the public ControlNet / T2I-Adapter checkpoints), except ``palette``
(a blocky colour layout for the colour adapter) and ``none`` (the image as given, e.g. a depth map
made elsewhere). Options are validated against ``OPTIONS[name]`` = ``{option: (min, max, default, why)}``.

Model-based preprocessors need estimator weights that DragCanvas does not ship. ``depth`` runs a
transformers depth estimator (DPT) when its weights are on disk: ``DRAGCANVAS_DEPTH_MODEL`` (a local
folder or Hub id, default ``Intel/dpt-hybrid-midas``) found locally or in the Hugging Face cache. The
others (pose, HED, …) always raise an ``EditError`` that names the missing weights and the way around it.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import cv2
import numpy as np
from PIL import Image

from editing.checks import check_number
from models.errors import EditError

OPTIONS: dict[str, dict[str, tuple]] = {
    "none": {},
    "depth": {},
    "canny": {"low_threshold": (0, 255, 100, "Canny lower hysteresis threshold"),
              "high_threshold": (1, 255, 200, "Canny upper hysteresis threshold")},
    "scribble": {"thickness": (1, 32, 3, "line width in px of the scribble made from the strokes")},
    "lineart": {"block": (3, 99, 11, "neighbourhood (odd px) of the adaptive threshold"),
                "sensitivity": (0, 50, 6, "how much darker than its surroundings a pixel must be to count as a line")},
    "palette": {"cells": (2, 128, 8, "colour blocks along the long side")},
}
DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"
MODEL_BASED = {
    "pose": "an OpenPose body-keypoint model (lllyasviel/Annotators body_pose_model.pth)",
    "openpose": "an OpenPose body-keypoint model (lllyasviel/Annotators body_pose_model.pth)",
    "hed": "the HED edge network (lllyasviel/Annotators ControlNetHED.pth)",
    "normal": "a surface-normal estimator (e.g. the lllyasviel/Annotators NormalBae weights)",
    "seg": "a semantic-segmentation model (e.g. openmmlab/upernet-convnext-small)",
    "mlsd": "the M-LSD line detector (lllyasviel/Annotators mlsd_large_512_fp32.pth)",
}


def _gray(image: Image.Image) -> np.ndarray:
    return cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)


def _white_on_black(lines: np.ndarray) -> Image.Image:
    """(H, W) bool/uint8 -> RGB, white where ``lines``."""
    a = np.where(lines > 0, 255, 0).astype(np.uint8)
    return Image.fromarray(np.stack([a] * 3, -1))


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edges (Canny 1986) of the grey image."""
    if low_threshold >= high_threshold:
        raise EditError(f"Canny: the low threshold ({low_threshold}) must be below the high one ({high_threshold}).")
    return _white_on_black(cv2.Canny(_gray(image), low_threshold, high_threshold))


def dominant_colour(a: np.ndarray) -> np.ndarray:
    """The most frequent colour of an H×W×3 array, in 8-level bins (the bin's centre, int16).

    One ``bincount`` over 15-bit codes (r<<10 | g<<5 | b of the 5-bit bins): linear in the pixel count,
    where ``np.unique(axis=0)`` sorts rows and took ~90 s on a 4096² sketch. Ties go to the lowest
    code, the same colour ``np.unique`` + ``argmax`` picked.
    """
    q = a.reshape(-1, 3).astype(np.int32) // 8
    code = int(np.bincount((q[:, 0] << 10) | (q[:, 1] << 5) | q[:, 2], minlength=1 << 15).argmax())
    return (np.array([code >> 10, (code >> 5) & 31, code & 31]) * 8 + 4).astype(np.int16)


def strokes_mask(image: Image.Image, background: Image.Image | None = None, tolerance: float = 24.0) -> np.ndarray:
    """Where someone drew: pixels that differ from ``background`` (or, with none, from the picture's
    dominant colour — the paper of a blank canvas). RGBA images use their alpha instead."""
    if image.mode == "RGBA":
        return np.asarray(image.getchannel("A")) > 0
    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    if background is not None:
        ref = np.asarray(background.convert("RGB").resize(image.size), dtype=np.int16)
    else:
        ref = dominant_colour(a)
    return np.abs(a - ref).max(axis=-1) > tolerance


def scribble(image: Image.Image, thickness: int = 3, background: Image.Image | None = None) -> Image.Image:
    """The drawn strokes as white scribble lines on black (what scribble ControlNets were trained on)."""
    m = strokes_mask(image, background).astype(np.uint8)
    if thickness > 1:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (thickness, thickness)))
    return _white_on_black(m)


def lineart(image: Image.Image, block: int = 11, sensitivity: int = 6) -> Image.Image:
    """Thin line art: pixels darker than their neighbourhood mean (adaptive threshold), white on black."""
    block = block if block % 2 else block + 1
    g = cv2.GaussianBlur(_gray(image), (3, 3), 0)
    lines = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, block, sensitivity)
    return _white_on_black(lines)


def palette(image: Image.Image, cells: int = 8) -> Image.Image:
    """Colour layout for the T2I colour adapter: average colours on a coarse grid, blown back up as blocks."""
    w, h = image.size
    s = cells / max(w, h)
    small = image.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))), Image.BOX)
    return small.resize((w, h), Image.NEAREST)


@functools.lru_cache(maxsize=2)
def _depth_model(spec: str):
    from transformers import AutoModelForDepthEstimation

    try:
        return AutoModelForDepthEstimation.from_pretrained(spec, local_files_only=True).eval()
    except Exception as e:
        raise EditError(
            f"The 'depth' preprocessor needs the depth-estimation weights {spec!r} (a transformers DPT model), "
            f"which are not on this machine ({type(e).__name__}). Download them once, set DRAGCANVAS_DEPTH_MODEL "
            "to a local folder, or make the depth map with another tool and use preprocessor 'none'.") from None


def depth(image: Image.Image) -> Image.Image:
    """Monocular depth (DPT; Ranftl et al. 2021), near = bright, min-max normalised to 0..255."""
    import torch

    model = _depth_model(os.environ.get("DRAGCANVAS_DEPTH_MODEL", DEFAULT_DEPTH_MODEL))
    side = int(getattr(model.config, "image_size", 384))
    a = np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC), np.float32) / 127.5 - 1.0  # DPT: mean=std=.5
    with torch.no_grad():
        d = model(pixel_values=torch.from_numpy(a).permute(2, 0, 1)[None]).predicted_depth[0].numpy()
    d = cv2.resize(d, image.size, interpolation=cv2.INTER_CUBIC)
    d = (d - d.min()) / max(float(d.max() - d.min()), 1e-6) * 255.0
    g = d.round().astype(np.uint8)
    return Image.fromarray(np.stack([g] * 3, -1))


def passthrough(image: Image.Image) -> Image.Image:
    """The condition image as given (a depth map, pose skeleton or edge map made elsewhere)."""
    return image.convert("RGB")


PREPROCESSORS = {"none": passthrough, "depth": depth, "canny": canny, "scribble": scribble, "lineart": lineart, "palette": palette}
NAMES = tuple(PREPROCESSORS)


def check_options(name: str, options: Mapping | None) -> dict:
    """Validate a preprocessor name and its options -> the options with defaults filled in."""
    if name in MODEL_BASED:
        raise EditError(f"The '{name}' preprocessor needs {MODEL_BASED[name]}, which DragCanvas does not have here. "
                        f"Make the {name} map with another tool and pass it with preprocessor 'none'.")
    if name not in PREPROCESSORS:
        raise EditError(f"Unknown preprocessor {name!r}; choose one of {', '.join(NAMES)} "
                        f"(model-based: {', '.join(MODEL_BASED)}).")
    table = OPTIONS[name]
    options = dict(options or {})
    unknown = set(options) - set(table)
    if unknown:
        raise EditError(f"Preprocessor '{name}' has no option {', '.join(sorted(unknown))}; "
                        f"it takes {', '.join(table) or 'none'}.")
    return {k: check_number(k, options.get(k, spec[2]), table) for k, spec in table.items()}


def preprocess(name: str, image: Image.Image, options: Mapping | None = None) -> Image.Image:
    """Run preprocessor ``name`` on ``image`` (PIL) with validated ``options``."""
    if not isinstance(image, Image.Image):
        raise EditError(f"A condition image must be a picture, got {type(image).__name__}.")
    options = check_options(name, options)
    return PREPROCESSORS[name](image, **options)
