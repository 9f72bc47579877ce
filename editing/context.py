"""What a task receives: ``EditContext`` — the loaded bundle, this request's ``Run``, the engine's caches,
the active LoRAs and the recipe builder. Tasks never see the ``Editor``.

The caches (``Caches``) outlive requests and are keyed by image content, so a repeated edit of one
picture skips its VAE encoding, identity LoRA, inversion or memory bank; each is one bounded LRU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from editing.geometry import resize_image, scale_point, working_size
from editing.images import image_hash, pil_to_tensor
from editing.runtime import RECIPE_VERSION, Run, encode_image, encode_mask, versions
from editing.sampling import Inversion, Schedule
from models.cache import LRU


@dataclass(frozen=True)
class EngineOptions:
    """Per-process engine settings (from ``Editor(...)`` / the app's flags)."""

    model_spec: str
    allow_pickle: bool = False
    max_side: int = 2048  # larger uploads are downscaled to this long side (with a notice)
    resolution: int | None = None  # working long side; None = the model's native resolution
    lora_checkpointing: bool = False  # trade identity-LoRA speed for memory
    bank_on_cpu: bool = False  # guided editing: keep the attention memory bank in host memory
    preview_decoder: str | None = None  # local folder of an AutoencoderTiny (TAESD) for previews; None = own VAE
    inpaint_model: str | None = None  # the inpainting model the inpainting drag fills with; None = the built-in
    # companion of a built-in base (toy -> toy-inpaint), else the base model's blended-latent fill


@dataclass
class Generated:
    """What a generation keeps so a drag of its image needs no inversion and no LoRA."""

    inversion: Inversion  # latents[k] on the generation's own trajectory
    prompt: str
    guidance_scale: float
    recipe: dict


@dataclass
class Caches:
    """Every per-image cache of the engine; ``clear`` forgets them all (the model stays loaded)."""

    latents: LRU = field(default_factory=lambda: LRU(8))  # (image, size) -> VAE posterior (mean, std)
    loras: LRU = field(default_factory=lambda: LRU(4))  # (image, prompt, LoRA params, active LoRAs) -> state (CPU)
    inversions: LRU = field(default_factory=lambda: LRU(4))  # (image, prompt, LoRAs, strength, steps) -> Inversion
    generated: LRU = field(default_factory=lambda: LRU(8))  # image hash -> Generated
    tasks: dict[str, LRU] = field(default_factory=dict)

    def generation_of(self, image: Image.Image | None) -> Generated | None:
        """What a generation kept for this exact image (its trajectory), if anything."""
        return None if image is None else self.generated.get(image_hash(image.convert("RGB")))

    def task(self, name: str, size: int = 2) -> LRU:
        """A task's own LRU (e.g. guided inversions + memory banks)."""
        return self.tasks.setdefault(name, LRU(size))

    def clear(self) -> None:
        for c in (self.latents, self.loras, self.inversions, self.generated, *self.tasks.values()):
            c.clear()


@dataclass
class EditContext:
    """The narrow interface a task runs against."""

    bundle: object  # models.loader.ModelBundle
    run: Run
    caches: Caches
    options: EngineOptions
    loras: tuple[tuple[str, float], ...] = ()  # LoRAs active for this edit (recorded in recipes)

    @property
    def lora_key(self) -> tuple:
        """Identity of the active LoRAs (file + mtime + weight), for caches computed under them."""
        if not self.loras:
            return ()
        from editing.lora_library import cache_key

        return cache_key(self.loras, self.options.allow_pickle)

    # ---- sizes ------------------------------------------------------------------------------------
    def working_size(self, size: tuple[int, int]) -> tuple[int, int]:
        b = self.bundle
        return working_size(size, self.options.resolution or b.native_resolution, b.pixel_multiple)

    def fit(self, image: Image.Image, mask=None, points=()):
        """Limit the size to ``max_side``, then resize to the working resolution.

        Returns ``(work_image, (image, mask, points), notices)``: the working-size image for the model,
        and the (possibly downscaled) image, mask and points that results are reported against.
        """
        notices, max_side = [], self.options.max_side
        if max(image.size) > max_side:
            s = max_side / max(image.size)
            new = (max(8, round(image.width * s)), max(8, round(image.height * s)))
            notices.append(f"The image was {image.width}×{image.height}; it was downscaled to {new[0]}×{new[1]} "
                           f"(limit {max_side} px).")
            points = tuple(tuple(scale_point(p, image.size, new) for p in pair) for pair in points)
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask).resize(new, Image.NEAREST))
            image = image.resize(new, Image.LANCZOS)
        work = self.working_size(image.size)
        if max(work) >= 2 * max(image.size):  # far below what the model was trained at: say why it looks soft
            family = getattr(self.bundle, "family", None)
            notices.append(f"The image is {image.width}×{image.height}, far below the model's "
                           f"{max(work)} px{f' ({family.name})' if family else ''}: it is edited upscaled to "
                           f"{work[0]}×{work[1]} and returned at your size, so fine detail may soften.")
        return resize_image(image, work), (image, mask, points), notices

    # ---- cached stages --------------------------------------------------------------------------
    @torch.no_grad()
    def posterior(self, work_img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached VAE posterior (mean, std), already × scaling_factor, of a working-size image."""
        def make():
            b = self.bundle
            x = pil_to_tensor(work_img).to(b.device, b.dtype)
            dist = b.vae.encode(x).latent_dist
            s = b.vae.config.scaling_factor
            return dist.mean.float() * s, dist.std.float() * s

        return self.caches.latents.get_or((image_hash(work_img), work_img.size), make)[0]

    def remember_generation(self, image: Image.Image, trajectory: list[torch.Tensor], schedule: Schedule,
                            prompt: str, guidance_scale: float, recipe: dict, start: int = 0) -> None:
        """Keep a generated image's DDIM trajectory (its first latent, at ``schedule.timesteps[start]``, first …
        z_0 last) so drags of it skip inversion and LoRA. SDEdit trajectories start below z_T (``start`` > 0)
        and serve drags whose inversion strength they cover."""
        inv = Inversion([z.detach().cpu() for z in reversed(trajectory)], schedule, start)
        self.caches.generated.put(image_hash(image), Generated(inv, prompt, guidance_scale, recipe))

    # ---- results ------------------------------------------------------------------------------------
    def recipe(self, task: str, params: dict, images: dict | None = None, masks: dict | None = None,
               extra: dict | None = None) -> dict:
        """A JSON recipe: task, model, params, and the pictures it needs (base64 PNG) to replay."""
        o = self.options
        r = {"task": task, "recipe_version": RECIPE_VERSION, "model": o.model_spec, "resolution": o.resolution,
             "params": params, "versions": versions(), "loras": [list(x) for x in self.loras]}
        for k, img in (images or {}).items():
            if img is not None:
                r[f"{k}_png"] = encode_image(img)
        for k, m in (masks or {}).items():
            if m is not None:
                r[f"{k}_png"] = encode_mask(m)
        r.update({k: v for k, v in (extra or {}).items() if v is not None})
        return r

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] through the VAE."""
        b = self.bundle
        with self.run.step("decode"), torch.no_grad():
            return b.vae.decode((z / b.vae.config.scaling_factor).to(b.dtype)).sample
