"""Cheap previews of x̂₀ while a method samples, for a person watching a long run.

The API (for tasks and for the UI side):

* ``sample_previews(ctx, every=None) -> list[Hook]`` — add its result to the hooks of any ``sampling.denoise``
  call. It is ``[]`` unless the request's progress callback takes images (``ctx.run.wants_previews``: the callback
  has a ``preview(step, image)`` method), so a run nobody watches pays nothing. ``every`` = a preview every that
  many steps (default: about ``PREVIEWS`` per loop, never the last step — the result follows it).
* ``SamplePreviews(run, decoder, every)`` — the hook itself: at a preview step it takes x̂₀ of the step
  (``predict_x0(x_t, ε_x0, ᾱ_t)``: after guidance, so it shows what the guided step aims at) and, after the step,
  calls ``run.preview(step, image)`` with ``step`` = steps done in this loop (1-based) and ``image`` a PIL RGB
  picture of the working image's size. It only reads the loop's state: the output pixels are the same with and
  without previews.
* ``PreviewDecoder(bundle, folder=None)`` / ``preview_decoder(ctx)`` (cached per engine) — latents (scaled, as
  the loop holds them) → PIL. With ``EngineOptions.preview_decoder`` naming a local folder of a diffusers
  ``AutoencoderTiny`` (TAESD, e.g. ``madebyollin/taesd`` downloaded by the user), that decodes; otherwise the
  model's own VAE decodes x̂₀ average-pooled 2× (a quarter of the pixels: about a quarter of a full decode) and
  the picture is scaled back up. Why the VAE at half size rather than a linear latent→RGB map: it needs no
  fitting per model, shows the model's real colours and edges (a linear map shows blobs of colour), works for
  any VAE (the toy model's 4× VAE as SD-1.5's 8×), and its cost stays a fixed fraction of the decode the run
  ends with anyway.

The UI's ``ui.feedback.LiveProgress`` has ``preview`` (and ``trail``): passing it as ``progress`` to
``Editor.edit`` turns previews on. Generation (diffusers pipelines) can reuse ``preview_decoder`` and call
``run.preview`` from its ``callback_on_step_end`` every ``every`` steps with ``predict_x0`` of the step.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from PIL import Image

from editing.images import tensor_to_pil
from editing.sampling import Hook, StepState, predict_x0
from models.errors import EditError

log = logging.getLogger(__name__)

PREVIEWS = 8  # previews per sampling loop by default: often enough to follow, rarely enough to cost little


class PreviewDecoder:
    """Scaled latents (1, c, h, w) → a small-cost PIL preview of the working image's size."""

    def __init__(self, bundle, folder: str | None = None):
        self.bundle = bundle
        self.tiny = None
        if folder:
            from diffusers import AutoencoderTiny

            try:
                self.tiny = AutoencoderTiny.from_pretrained(folder, local_files_only=True).to(bundle.device, bundle.dtype)
            except (OSError, ValueError) as e:
                raise EditError(f"Cannot load the preview decoder from {folder!r} ({type(e).__name__}): give a local "
                                "folder of a diffusers AutoencoderTiny (TAESD), or none.") from None
            self.tiny.requires_grad_(False).eval()
        self.kind = "taesd" if self.tiny is not None else "vae-half"
        self.last_ms = 0.0

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> Image.Image:
        t0 = time.perf_counter()
        b = self.bundle
        f = b.vae_scale_factor
        size = (z.shape[-1] * f, z.shape[-2] * f)  # (w, h) of the working image
        if self.tiny is not None:
            x = self.tiny.decode((z / self.tiny.config.scaling_factor).to(b.device, b.dtype)).sample
        else:
            small = F.avg_pool2d(z.float(), 2) if min(z.shape[-2:]) >= 4 else z.float()
            x = b.vae.decode((small / b.vae.config.scaling_factor).to(b.device, b.dtype)).sample
        img = tensor_to_pil(x[:1].float().clamp(-1, 1))
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        self.last_ms = (time.perf_counter() - t0) * 1e3
        return img


def preview_decoder(ctx) -> PreviewDecoder:
    """The engine's preview decoder (built once per bundle and folder, kept in the caches)."""
    folder = getattr(ctx.options, "preview_decoder", None)
    key = (id(ctx.bundle), folder)
    return ctx.caches.task("preview_decoder", 1).get_or(key, lambda: PreviewDecoder(ctx.bundle, folder))[0]


class SamplePreviews(Hook):
    """Every ``every`` steps: x̂₀ of the step, decoded cheaply, to ``run.preview(step, image)``."""

    def __init__(self, run, decoder, every: int | None = None):
        self.run, self.decoder, self.every = run, decoder, every
        self._x0: torch.Tensor | None = None
        self.shown = 0

    def _due(self, s: StepState) -> bool:
        every = self.every or max(1, round(s.n / PREVIEWS))
        return (s.i + 1) % every == 0 and s.i + 1 < s.n

    def after_eps(self, s: StepState) -> None:
        if self._due(s):  # x̂₀ from the guided ε (hooks before this one may have set it); the last repeat wins
            self._x0 = predict_x0(s.x, s.eps_x0, s.a_t).detach()[:1]

    def after_step(self, s: StepState) -> None:
        if self._x0 is None:
            return
        dec = self.decoder if isinstance(self.decoder, PreviewDecoder) else self.decoder()  # a factory: built lazily
        self.run.preview(s.i + 1, dec(self._x0))
        self._x0 = None
        self.shown += 1


def sample_previews(ctx, every: int | None = None) -> list[Hook]:
    """``[SamplePreviews]`` when the run's progress callback takes images, else ``[]`` (no cost at all). Put it
    last in a loop's hooks, so x̂₀ comes from the ε the other hooks settled on."""
    if not ctx.run.wants_previews:
        return []
    return [SamplePreviews(ctx.run, lambda: preview_decoder(ctx), every)]
