"""Resumable training checkpoints: LoRA weights + AdamW moments in one safetensors file (no pickle).

They live in ``<library>/.dreambooth/NAME/step-N.safetensors`` (never listed as LoRAs) and are written
atomically (temp file + rename), so a crash leaves the previous checkpoint or none, never a torn file.

A checkpoint belongs to one training set-up (its ``fingerprint``: photos, model, identifier, size and
every setting that changes the result); "train again" with the same set-up resumes from the newest one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from editing.images import atomic_write, image_hash

# Settings that do not change the trained weights: a run differing only in these may resume.
NOT_FINGERPRINTED = ("steps", "resume", "checkpoint_every", "preview_every", "preview_steps", "out_dir", "name",
                     "replace")


def fingerprint(req, model_key: str, identifier: str, size: int) -> str:
    """A short hash of what makes two trainings the same up to their length."""
    keep = {k: v for k, v in req.params().items() if k not in NOT_FINGERPRINTED}
    photos = [image_hash(p) for p in req.photos]
    return hashlib.sha1(json.dumps([keep, model_key, identifier, size, photos], sort_keys=True, default=str)
                        .encode()).hexdigest()[:16]


def save_checkpoint(folder: Path, step: int, fingerprint: str, lora: dict[str, torch.Tensor], opt, losses) -> Path:
    """LoRA weights + AdamW moments in one safetensors file, meta in JSON; keeps the newest 2."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"lora.{k}": v.detach().cpu().contiguous() for k, v in lora.items()}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    path = folder / f"step-{step:06d}.safetensors"
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    meta = {"step": step, "fingerprint": fingerprint, "losses": losses,
            "kind": "resumable training checkpoint (not a library LoRA): train again with the same settings"}
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta)))
    for old in sorted(folder.glob("step-*.safetensors"))[:-2]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def latest_checkpoint(folder: Path, fingerprint: str, max_step: int):
    """(step, tensors, losses) of the newest compatible checkpoint at or below ``max_step``, or None."""
    from safetensors.torch import load_file

    for path in sorted(folder.glob("step-*.safetensors"), reverse=True):
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("fingerprint") == fingerprint and 0 < meta["step"] <= max_step:
            return meta["step"], load_file(str(path)), meta.get("losses", [])
    return None


def lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``lora.*`` part of a checkpoint, keys without the prefix (``unet.…`` / ``text_encoder.…``)."""
    return {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")}


def load_optimizer_state(opt, tensors: dict) -> None:
    """Put a checkpoint's ``opt.<param index>.<name>`` tensors back into ``opt``'s state."""
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)
