"""``PersonalizeRequest`` (validated on construction) and where one training's files go."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from editing.checks import check_flag, check_number
from editing.dreambooth.identifier import check_identifier
from editing.dreambooth.photos import load_photos
from models.errors import EditError

# name -> (min, max, default, one-line why). The UI builds its sliders from this table.
PERSONALIZE_FIELDS: dict[str, tuple[float, float, float, str]] = {
    "steps": (1, 5000, 400, "training steps (DreamBooth-LoRA usually needs 300–800)"),
    "rank": (1, 128, 8, "LoRA rank: capacity of the subject LoRA (4–16 is typical)"),
    "lr": (1e-6, 1e-2, 1e-4, "AdamW learning rate (constant)"),
    "prior_images": (0, 1000, 50, "class images generated once for prior preservation"),
    "prior_weight": (0.0, 10.0, 1.0, "λ: weight of the prior-preservation loss (keeps the class general)"),
    "prior_steps": (2, 200, 25, "DDIM steps per class image"),
    "batch": (1, 16, 1, "photos per step (plus as many class images)"),
    "resolution": (0, 2048, 0, "training side in px (0 = the model's native size)"),
    "checkpoint_every": (0, 10000, 100, "save a resumable checkpoint every N steps (0 = only on cancel)"),
    "preview_every": (0, 10000, 100, "render a preview image every N steps (0 = only at the end)"),
    "preview_steps": (2, 200, 25, "DDIM steps of a preview image"),
    "seed": (0, 2**31 - 1, 0, "random seed (augmentation, noise, timesteps, LoRA init)"),
}
FLAGS = ("prior_preservation", "train_text_encoder", "flip", "crop", "resume", "replace")


@dataclass(frozen=True)
class PersonalizeRequest:
    """Train a subject LoRA. ``photos``: PIL images, image paths or folders (non-images are skipped)."""

    photos: tuple
    class_noun: str
    identifier: str = ""  # "" = pick a rare token automatically
    name: str = ""  # LoRA name; "" = "<identifier>-<class>"
    out_dir: str = ""  # "" = the LoRA library
    prior_preservation: bool = True
    train_text_encoder: bool = False
    flip: bool = True
    crop: bool = True
    resume: bool = True
    replace: bool = False  # an existing LoRA of this name is refused (EditError) unless this says replace it
    gradient_checkpointing: bool | None = None  # None = on for GPUs (memory), off on CPU
    steps: int = 400
    rank: int = 8
    lr: float = 1e-4
    prior_images: int = 50
    prior_weight: float = 1.0
    prior_steps: int = 25
    batch: int = 1
    resolution: int = 0
    checkpoint_every: int = 100
    preview_every: int = 100
    preview_steps: int = 25
    seed: int = 0
    notices: tuple[str, ...] = field(default=(), compare=False)

    FIELDS_UI = PERSONALIZE_FIELDS

    def __post_init__(self):
        images, notices = load_photos(self.photos)
        object.__setattr__(self, "photos", tuple(images))
        object.__setattr__(self, "class_noun", _check_class_noun(self.class_noun))
        object.__setattr__(self, "identifier", str(self.identifier or "").strip())
        object.__setattr__(self, "name", str(self.name or "").strip())
        object.__setattr__(self, "out_dir", str(self.out_dir or ""))
        for name in PERSONALIZE_FIELDS:
            object.__setattr__(self, name, check_number(name, getattr(self, name), PERSONALIZE_FIELDS))
        for name in FLAGS:
            object.__setattr__(self, name, check_flag(name, getattr(self, name)))
        if self.gradient_checkpointing is not None:
            object.__setattr__(self, "gradient_checkpointing", check_flag("gradient_checkpointing",
                                                                          self.gradient_checkpointing))
        if self.prior_preservation and self.prior_images == 0:
            object.__setattr__(self, "prior_preservation", False)
            notices.append("Prior preservation is on but 0 class images were asked for, so it is off.")
        object.__setattr__(self, "notices", tuple(self.notices) + tuple(notices))

    def params(self) -> dict:
        """The JSON-serialisable part (everything but pixels)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("photos", "notices")}


def _check_class_noun(class_noun) -> str:
    noun = " ".join(str(class_noun or "").split())
    if not noun:
        raise EditError("Class noun is empty: say what the subject is, in one or two words (e.g. 'dog', "
                        "'teddy bear'). It anchors the identifier and names the prior-preservation images.")
    if len(noun) > 40 or not re.search(r"[A-Za-z0-9]", noun):
        raise EditError(f"Class noun {noun!r} should be one or two plain words such as 'dog' or 'backpack'.")
    return noun


def check_free(path: Path, replace: bool) -> None:
    """Refuse to train into a LoRA name that is taken (unless ``replace``): another user's LoRA stays theirs."""
    if path.exists() and not replace:
        raise EditError(f"A LoRA named {path.stem!r} already exists: choose another name, or ask to replace it.")


# ---- where things go --------------------------------------------------------------------------------
def names(tokenizer, req: PersonalizeRequest) -> tuple[str, str, list[str]]:
    """(identifier, LoRA name, notices) the trainer will use for ``req``."""
    from editing.lora_library import safe_name

    identifier, notices = check_identifier(tokenizer, req.identifier, req.class_noun)
    return identifier, safe_name(req.name or f"{identifier}-{req.class_noun}"), notices


def output_dir(req: PersonalizeRequest) -> Path:
    """Where ``NAME.safetensors`` and ``NAME.json`` go: ``req.out_dir`` or the LoRA library."""
    from editing.lora_library import library_dir

    return Path(req.out_dir).expanduser() if req.out_dir else library_dir()


def work_dir(req: PersonalizeRequest, name: str) -> Path:
    """Checkpoints (``step-*.safetensors``) and previews (``previews/step-*.png``) of one LoRA's training."""
    return output_dir(req) / ".dreambooth" / name
