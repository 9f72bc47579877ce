"""DreamBooth with LoRA (Ruiz et al. 2023; Hu et al. 2021): teach the model a subject from a few photos.

The pipeline, as ``train_dreambooth_lora`` (trainer.py) runs it:

1. pick a rare-token identifier [V] (identifier.py) and build "a [V] [class]" / "a [class]";
2. generate N class-prior images "a [class]" with the frozen model, cached on disk (priors.py);
3. add a LoRA (W = W0 + BA, B zero-initialised) on the UNet attention projections (and optionally the
   CLIP attention projections) (adapters.py);
4. train on instance + prior batches with the prior-preservation loss (loss.py, DreamBooth eq. 2),
   flip / crop augmentation (photos.py), fresh VAE sample, noise and uniform t each step; mixed precision
   and gradient checkpointing on the GPU via accelerate (several GPUs with ``accelerate launch -m
   editing personalize``: the same code, one process per GPU); checkpoints + resume (checkpoints.py),
   cancel and previews through the task's ``Run`` (runs.py);
5. save diffusers-format LoRA safetensors ``NAME.safetensors`` plus a JSON card ``NAME.json``.

``PersonalizeRequest`` (request.py) validates the input; task.py registers the ``personalize`` task
on import. Defaults follow the DreamBooth-LoRA recipe of diffusers' example trainer (rank 8, lr 1e-4
constant, λ = 1, ~100 class images, 400 steps); ours uses 50 class images by default to keep the first
run short.
"""
from editing.dreambooth.adapters import ADAPTER, TEXT_TARGETS, UNET_TARGETS
from editing.dreambooth.identifier import (
    COMMON_WORDS,
    check_identifier,
    class_prompt,
    instance_prompt,
    pick_identifier,
    suggest_identifiers,
)
from editing.dreambooth.loss import prior_preservation_loss
from editing.dreambooth.photos import (
    IMAGE_SUFFIXES,
    MAX_PHOTOS,
    MIN_PHOTO_SIDE,
    MIN_PHOTOS,
    augment,
    load_photos,
    square,
)
from editing.dreambooth.priors import class_prior_images, encode_text, prior_dir, sample
from editing.dreambooth.request import PERSONALIZE_FIELDS, PersonalizeRequest, names, output_dir, work_dir
from editing.dreambooth.task import personalize_from_recipe, run_personalize  # registers "personalize"
from editing.dreambooth.trainer import TrainOutcome, train_dreambooth_lora

__all__ = [
    "ADAPTER", "COMMON_WORDS", "IMAGE_SUFFIXES", "MAX_PHOTOS", "MIN_PHOTO_SIDE", "MIN_PHOTOS", "PERSONALIZE_FIELDS", "TEXT_TARGETS", "UNET_TARGETS",
    "PersonalizeRequest", "TrainOutcome", "augment", "check_identifier", "class_prior_images", "class_prompt",
    "encode_text", "instance_prompt", "load_photos", "names", "output_dir", "personalize_from_recipe",
    "pick_identifier", "prior_dir", "prior_preservation_loss", "run_personalize", "sample", "square",
    "suggest_identifiers", "train_dreambooth_lora", "work_dir",
]
