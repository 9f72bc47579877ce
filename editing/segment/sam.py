"""A SAM-family segmenter through transformers' own ``SamModel`` / ``SamProcessor``.

``load_sam(spec)`` takes a Hub id (e.g. ``facebook/sam-vit-base``, or a SAM-compatible distillation such as
SlimSAM) or a local folder holding ``config.json`` (``model_type: sam``), the processor's config and
``model.safetensors``; nothing but safetensors is read. The image embedding (the expensive ViT pass) is computed
once per picture and kept (``EMBEDDINGS`` pictures), so every further click on that picture costs only the
prompt encoder and the mask decoder.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from editing.segment.clicks import ClickGroup
from models.cache import LRU
from models.errors import EditError

log = logging.getLogger(__name__)

DEFAULT_SAM = "facebook/sam-vit-base"  # what ``--segmenter auto`` uses when its weights are already here
EMBEDDINGS = 2  # pictures whose image embedding is kept: the one being clicked, and the reference of Paste
# What from_pretrained raises for a missing file, no network, a config of another type or mismatched weights.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError)
SUPPORTED = ("sam",)  # config.json model_type values whose classes (SamModel / SamProcessor) we drive


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}"


class SamSegmenter:
    """One SAM model and its processor; ``object_mask`` answers one object (its positive and negative points)."""

    def __init__(self, model, processor, name: str, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor = processor
        self.name = f"sam:{name}"
        self._embeddings = LRU(EMBEDDINGS)

    def _embedding(self, pil: Image.Image, key: str) -> torch.Tensor:
        """The picture's image embedding ``(1, C, h, w)``, computed on the first click and kept."""
        def make():
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                return self.model.get_image_embeddings(pixels.to(self.device, self.model.dtype))

        return self._embeddings.get_or(key, make)[0]

    def object_mask(self, image: np.ndarray, group: ClickGroup) -> np.ndarray:
        """SAM's mask for one prompt of label-1 (positive) and label-0 (negative) points; with one point, the
        best-scored of its three proposals (SAM's answer to an ambiguous click), else its single answer."""
        pil = Image.fromarray(image)
        key = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + str(image.shape)
        points = [list(p) for p in (*group.positive, *group.negative)]
        labels = [1] * len(group.positive) + [0] * len(group.negative)
        inputs = self.processor(images=pil, input_points=[[points]], input_labels=[[labels]], return_tensors="pt")
        multi = len(points) == 1
        with torch.no_grad():
            out = self.model(image_embeddings=self._embedding(pil, key),
                             input_points=inputs["input_points"].to(self.device, self.model.dtype),
                             input_labels=inputs["input_labels"].to(self.device), multimask_output=multi)
        masks = self.processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"],
                                                  inputs["reshaped_input_sizes"])[0]  # (1, K, H, W) bool
        best = int(out.iou_scores[0, 0].float().argmax()) if multi else 0
        mask = masks[0, best].numpy().astype(bool)
        if not mask.any():
            x, y = group.positive[0]
            raise EditError(f"no object found here ({x:g}, {y:g}): {self.name} returned an empty mask; click on the object.")
        return mask


def _classes(model_type: str, where: str):
    if model_type not in SUPPORTED:
        raise EditError(f"segmenter {where} is a {model_type!r} model; supported: {', '.join(SUPPORTED)} "
                        "(SamModel checkpoints such as facebook/sam-vit-base).")
    from transformers import SamModel, SamProcessor

    return SamModel, SamProcessor


def load_sam(spec: str, device: str | torch.device | None = None, local_only: bool = False) -> SamSegmenter:
    """A ``SamSegmenter`` from a local folder or a Hub id; ``EditError`` in one line when it cannot be had."""
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise EditError(f"segmenter folder {path} has no config.json: pass a SAM model folder or a Hub id.")
        if not any(path.glob("*.safetensors")):
            other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            why = f" (only pickle weights {', '.join(other)}: save it as safetensors)" if other else ""
            raise EditError(f"segmenter folder {path} has no weights (model.safetensors){why}.")
        model_cls, proc_cls = _classes(json.loads(cfg.read_text()).get("model_type", "?"), str(path))
        local_only = True
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        model_cls, proc_cls = _classes("sam", spec)  # a Hub id's type is checked by from_pretrained itself
    else:
        raise EditError(f"segmenter {spec!r} is neither a folder nor a Hub id (owner/name); use 'classical', "
                        "'auto', a SAM model folder or a Hub id such as facebook/sam-vit-base.")
    try:
        model = model_cls.from_pretrained(spec, use_safetensors=True, local_files_only=local_only)
        processor = proc_cls.from_pretrained(spec, local_files_only=local_only)
    except LOAD_ERRORS as e:  # offline, missing, wrong type: one line for the user
        log.debug("loading segmenter %r failed", spec, exc_info=True)
        raise EditError(f"could not load the segmenter {spec!r} ({_one_line(e)}); use --segmenter classical "
                        "or a folder with a SAM model.") from None
    log.info("segmenter %s loaded", spec)
    return SamSegmenter(model, processor, path.name if path.is_dir() else spec, device)


def load_cached_default(device: str | torch.device | None = None) -> SamSegmenter | None:
    """``DEFAULT_SAM`` when its weights are already in the local Hugging Face cache, else None (never fetches)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(DEFAULT_SAM, "model.safetensors")
    except (OSError, ValueError):  # a broken cache is the same as no cache here
        return None
    if not isinstance(hit, str):
        return None
    try:
        return load_sam(DEFAULT_SAM, device, local_only=True)
    except EditError as e:
        log.warning("the cached %s did not load (%s); using the classical segmenter", DEFAULT_SAM, e)
        return None
