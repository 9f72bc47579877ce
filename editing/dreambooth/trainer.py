"""DreamBooth-LoRA training as a numbered script over one ``TrainState``.

``train_dreambooth_lora`` runs, in order:

1. ``plan``            identifier [V], prompts "a [V] [class]" / "a [class]", training size, folders;
2. ``make_priors``     class-prior images from the frozen model (cached on disk; main process only);
3. ``encode_inputs``   photos and priors as pixels in [-1, 1], the fixed text embeddings;
4. ``add_lora``        the seeded LoRA on the UNet (and text encoder), AdamW over its parameters;
5. ``resume``          the newest compatible checkpoint, if any;
6. ``prepare``         accelerate (mixed precision, several processes), gradient checkpointing;
7. ``train``           ``train_step`` per step: augment, encode, x_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε (DDPM eq. 4),
                       the target ε (or v = √ᾱ_t·ε − √(1−ᾱ_t)·z₀ on a v-prediction model, ``training_target``),
                       the prior-preservation loss (DreamBooth eq. 2), one optimiser step; progress,
                       checkpoints, previews and cancel (a checkpoint is saved, then ``EditCancelled``);
8. ``save``            the final preview, the LoRA file, its card and a last checkpoint (atomic writes; an
                       existing name only with ``replace``; a cancelled run never reaches the library).

The shared model is left exactly as it was afterwards (``adapters.remove_adapters``).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from editing.dreambooth.adapters import add_adapters, load_lora_state, lora_state, remove_adapters, save_lora_file
from editing.dreambooth.checkpoints import (
    fingerprint,
    latest_checkpoint,
    load_optimizer_state,
    lora_tensors,
    save_checkpoint,
)
from editing.dreambooth.identifier import class_prompt, instance_prompt
from editing.dreambooth.loss import prior_preservation_loss, training_target
from editing.dreambooth.photos import augment, square
from editing.dreambooth.priors import class_prior_images, encode_text, sample
from editing.dreambooth.request import PersonalizeRequest, check_free, names, output_dir, work_dir
from editing.dreambooth.runs import cancel_requested
from editing.images import atomic_write, load_image, pil_to_tensor
from editing.sampling import add_noise, unet_dtype
from models.errors import EditCancelled, EditError

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    lora_path: Path
    card: dict
    losses: list[float]
    previews: list[tuple[int, Image.Image]]
    notices: list[str]
    resumed_from: int = 0
    priors_generated: int = 0


@dataclass
class TrainState:
    """What the steps share; each step fills in its part (numbers = the step that sets it)."""

    bundle: Any
    req: PersonalizeRequest
    model_key: str
    run: Any  # the task's Run (editing/runtime.py): step(phase), report(frac, msg), cancel, preview(step, image)
    notices: list[str] = field(default_factory=list)
    acc: Any = None  # 1. accelerate.Accelerator
    identifier: str = ""  # 1.
    name: str = ""
    prompt_i: str = ""  # "a [V] [class]"
    prompt_c: str = ""  # "a [class]"
    size: int = 0  # training side S (px)
    out_dir: Path = Path()
    work: Path = Path()  # checkpoints and previews
    fingerprint: str = ""
    rank_seed: int = 0  # each process draws its own photos, noise and t
    priors: list[Image.Image] = field(default_factory=list)  # 2.
    generated: int = 0
    photos: list[torch.Tensor] = field(default_factory=list)  # 3. each (1, 3, S, S) in [-1, 1]
    prior_px: list[torch.Tensor] = field(default_factory=list)
    fixed_i: torch.Tensor | None = None  # (1, 77, D) fp32; used while the text encoder is frozen
    fixed_c: torch.Tensor | None = None
    uncond: torch.Tensor | None = None  # (1, 77, D) for the previews' CFG
    ids: torch.Tensor | None = None  # (2, 77) token ids of [prompt_i, prompt_c]
    base_dtype: torch.dtype = torch.float32  # the frozen model's dtype
    use_gc: bool = False
    params: list[torch.nn.Parameter] = field(default_factory=list)  # 4. the LoRA's (fp32)
    opt: Any = None
    start: int = 0  # 5. first step to run (resumed from)
    fwd_unet: Any = None  # 6. the UNet / text encoder as forwards see them (DDP-wrapped with several processes)
    fwd_te: Any = None
    a_table: torch.Tensor | None = None  # ᾱ_t, (1000,)
    losses: list[float] = field(default_factory=list)  # 7.
    previews: list[tuple[int, Image.Image]] = field(default_factory=list)
    t0: float = 0.0

    @property
    def models(self) -> list:
        return [self.bundle.unet] + ([self.bundle.text_encoder] if self.req.train_text_encoder else [])


def train_dreambooth_lora(bundle, req: PersonalizeRequest, *, model_key: str, run) -> TrainOutcome:
    """Train a DreamBooth LoRA on ``bundle`` (left exactly as it was afterwards). See the module docstring.

    ``run``: the task's ``Run``: phases, progress, cancel, and every preview image (``run.preview``).
    """
    from editing import lora_library

    if lora_library.active_loras(bundle.unet):
        raise EditError("Personal LoRAs are trained on the base model: remove the LoRAs picked for this run.")
    st = TrainState(bundle, req, model_key, run, list(req.notices))
    plan(st)  # 1
    make_priors(st)  # 2
    encode_inputs(st)  # 3
    try:
        add_lora(st)  # 4
        resume(st)  # 5
        prepare(st)  # 6
        train(st)  # 7
        stop_if_cancelled(st, req.steps)  # Cancel during the last step: a checkpoint, never the LoRA
        st.acc.wait_for_everyone()
        path, card = save(st)  # 8
        st.acc.wait_for_everyone()
        return TrainOutcome(path, card, st.losses, st.previews, st.notices, st.start, st.generated)
    finally:
        remove_adapters(bundle, req.train_text_encoder, st.use_gc)


# ---- 1-3: what to train on -------------------------------------------------------------------------------
def plan(st: TrainState) -> None:
    """1. Identifier, prompts, training size, where things go, the accelerator."""
    b, req = st.bundle, st.req
    if req.train_text_encoder and getattr(b, "text_encoder_2", None) is not None:
        # The trained forward feeds one encoder's states to the UNet; SDXL's packed two-encoder form is not
        # trained through here.
        raise EditError("Training the text encoders is not available on SDXL models: turn off "
                        "“train text encoder” (the UNet LoRA learns the subject).")
    st.identifier, st.name, more = names(b.tokenizer, req)
    st.notices += more
    st.prompt_i, st.prompt_c = instance_prompt(st.identifier, req.class_noun), class_prompt(req.class_noun)
    m = b.pixel_multiple
    st.size = max(m, round((req.resolution or b.native_resolution) / m) * m)
    st.out_dir = output_dir(req)
    st.out_dir.mkdir(parents=True, exist_ok=True)
    check_free(st.out_dir / f"{st.name}.safetensors", req.replace)  # before any work: the name is someone's
    st.work = work_dir(req, st.name)
    st.fingerprint = fingerprint(req, st.model_key, st.identifier, st.size)
    st.acc = _accelerator(b)
    st.rank_seed = req.seed * 1000 + st.acc.process_index


def make_priors(st: TrainState) -> None:
    """2. Class-prior images (frozen model; the main process generates, the others wait and read)."""
    req = st.req
    if not req.prior_preservation:
        return
    with st.run.step("priors"):
        paths, st.generated = class_prior_images(
            st.bundle, req.class_noun, req.prior_images, st.size, st.out_dir / ".class-priors",
            model_key=st.model_key, steps=req.prior_steps, seed=req.seed, generate=st.acc.is_main_process, run=st.run)
        st.acc.wait_for_everyone()
        st.priors = [load_image(p) for p in paths]
    if st.generated < len(paths):
        st.notices.append(f"Reused {len(paths) - st.generated} cached class image(s) for “{st.prompt_c}”.")


def encode_inputs(st: TrainState) -> None:
    """3. Pixels in [-1, 1] at the training size; the text embeddings of a frozen text encoder."""
    b = st.bundle
    st.photos = [pil_to_tensor(square(p, st.size)) for p in st.req.photos]
    st.prior_px = [pil_to_tensor(square(p, st.size)) for p in st.priors]
    with torch.no_grad():
        st.fixed_i = encode_text(b, [st.prompt_i]).float()
        st.fixed_c = encode_text(b, [st.prompt_c]).float()
        st.uncond = encode_text(b, [""])
    st.ids = b.tokenizer([st.prompt_i, st.prompt_c], padding="max_length", max_length=b.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(b.device)
    st.base_dtype = unet_dtype(b.unet)
    req = st.req
    st.use_gc = b.device.type == "cuda" if req.gradient_checkpointing is None else req.gradient_checkpointing


# ---- 4-6: the adapter and its optimiser -----------------------------------------------------------------
def add_lora(st: TrainState) -> None:
    """4. The LoRA (seeded init) and AdamW over its parameters."""
    req = st.req
    st.params = add_adapters(st.bundle.unet, st.bundle.text_encoder, req.rank, req.seed, req.train_text_encoder)
    st.opt = torch.optim.AdamW(st.params, lr=req.lr, betas=(0.9, 0.999), weight_decay=1e-2)


def resume(st: TrainState) -> None:
    """5. Continue from the newest checkpoint of the same set-up (LoRA weights + AdamW moments)."""
    req = st.req
    found = latest_checkpoint(st.work, st.fingerprint, req.steps) if req.resume else None
    if not found:
        return
    st.start, tensors, st.losses = found
    load_lora_state(st.bundle.unet, st.bundle.text_encoder, lora_tensors(tensors), req.train_text_encoder)
    for p in st.params:
        p.data = p.data.float()
    load_optimizer_state(st.opt, tensors)
    st.notices.append(f"Resumed from the checkpoint at step {st.start}.")
    log.info("resuming %s from step %d/%d", st.name, st.start, req.steps)


def prepare(st: TrainState) -> None:
    """6. accelerate: a GradScaler for fp16 on the GPU (a plain optimiser elsewhere); DDP with several processes."""
    acc, unet, te = st.acc, st.bundle.unet, st.bundle.text_encoder
    st.opt = acc.prepare(st.opt)
    # One process: the shared model is used as is. Several: each process owns its model; DDP averages grads.
    st.fwd_unet = acc.prepare(unet) if acc.num_processes > 1 else unet
    st.fwd_te = (acc.prepare(te) if acc.num_processes > 1 else te) if st.req.train_text_encoder else None
    if st.use_gc:
        unet.enable_gradient_checkpointing()
        if st.req.train_text_encoder:
            te.gradient_checkpointing_enable()
    st.a_table = st.bundle.scheduler.alphas_cumprod.to(st.bundle.device)


def _accelerator(bundle):
    from accelerate import Accelerator

    mp = "no"
    if bundle.device.type == "cuda":
        mp = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(bundle.dtype, "no")
    return Accelerator(mixed_precision=mp, cpu=bundle.device.type == "cpu")


# ---- 7: the loop ------------------------------------------------------------------------------------------
def train(st: TrainState) -> None:
    """7. Steps ``start`` … ``steps − 1``; Cancel is honoured between steps (after saving a checkpoint)."""
    req = st.req
    log.info("training %s: steps %d–%d, %d photo(s), %d class image(s)", st.name, st.start + 1, req.steps,
             len(st.photos), len(st.priors))
    st.t0 = time.perf_counter()
    with st.run.step("train"):
        for m in st.models:
            m.train()
        for step in range(st.start, req.steps):
            stop_if_cancelled(st, step)
            l_i, l_c = train_step(st, step)
            done = step + 1
            if cancel_requested(st.run):
                continue  # the top of the loop (or, after the last step, the caller) saves a checkpoint, then stops
            after_step(st, done, l_i, l_c)


def stop_if_cancelled(st: TrainState, step: int) -> None:
    """Cancel pressed: save a resumable checkpoint at ``step`` (if any step ran), then raise ``EditCancelled``.
    Nothing goes into the library: a cancelled run's only file is that checkpoint (``.dreambooth/NAME/``)."""
    if not cancel_requested(st.run):
        return
    ran = step > st.start
    if st.acc.is_main_process and ran:
        save_checkpoint(st.work, step, st.fingerprint, _lora_state(st), st.opt, st.losses)
    raise EditCancelled(f"Cancelled at step {step}/{st.req.steps}."
                        + (" A checkpoint was saved: train again with the same settings to resume." if ran else ""))


def train_step(st: TrainState, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on ``batch`` photos (+ as many class images); returns the two loss terms (detached)."""
    req, acc = st.req, st.acc
    gen = torch.Generator("cpu").manual_seed(hash((st.rank_seed, step)) & 0x7FFF_FFFF)
    x = _pixels(st, gen)  # (B or 2B, 3, S, S)
    zt, noise, t, z0 = _noised(st, x, gen)
    pred = _predict(st, zt, t)
    target = training_target(noise, z0, st.a_table[t].view(-1, 1, 1, 1).float(), _prediction_type(st.bundle))
    b = req.batch
    p_i, p_c = (pred[:b], pred[b:]) if st.priors else (pred, None)
    n_i, n_c = (target[:b], target[b:]) if st.priors else (target, None)
    loss, l_i, l_c = prior_preservation_loss(p_i, n_i, p_c, n_c, req.prior_weight)
    st.opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    if acc.sync_gradients:
        acc.clip_grad_norm_(st.params, 1.0)
    st.opt.step()
    st.losses.append(float(loss.detach()))
    return l_i.detach(), l_c.detach()


def _pixels(st: TrainState, gen: torch.Generator) -> torch.Tensor:
    """Random photos (flip + crop), then as many random class images (flip only), in the model's dtype."""
    req = st.req
    pix = [augment(st.photos[int(torch.randint(len(st.photos), (), generator=gen))], gen, req.flip, req.crop)
           for _ in range(req.batch)]
    if st.priors:
        pix += [augment(st.prior_px[int(torch.randint(len(st.prior_px), (), generator=gen))], gen, req.flip, False)
                for _ in range(req.batch)]
    return torch.cat(pix).to(st.bundle.device, st.bundle.dtype)


def _noised(st: TrainState, x: torch.Tensor, gen: torch.Generator):
    """z₀ ~ q(z|x) (a fresh VAE sample), ε, uniform t, x_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε -> (x_t, ε, t, z₀)."""
    vae, device = st.bundle.vae, st.bundle.device
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z0 = (dist.mean.float() + dist.std.float() * torch.randn(dist.mean.shape, generator=gen)
              .to(device)) * vae.config.scaling_factor  # (B, 4, S/8, S/8)
    noise = torch.randn(z0.shape, generator=gen).to(device)
    t = torch.randint(0, len(st.a_table), (z0.shape[0],), generator=gen).to(device)
    return add_noise(z0, noise, st.a_table[t].view(-1, 1, 1, 1).float()), noise, t, z0


def _prediction_type(bundle) -> str:
    """What the base UNet outputs (``epsilon`` | ``v_prediction``): its family's, else its scheduler's."""
    family = getattr(bundle, "family", None)
    if family is not None:
        return family.prediction_type
    return getattr(bundle.scheduler.config, "prediction_type", "epsilon") or "epsilon"


def _predict(st: TrainState, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's output (ε̂, or v̂ on a v-prediction model) at (x_t, t, c): "a [V] [class]" for the photos,
    "a [class]" for the class images (mixed precision). SDXL's ``c`` is the packed form (``encode_text``)."""
    b = st.req.batch
    with st.acc.autocast():
        if st.fwd_te is not None:
            emb = st.fwd_te(st.ids)[0]  # (2, 77, D), with the text encoder's LoRA
            cond_i, cond_c = emb[0:1], emb[1:2]
        else:
            cond_i, cond_c = st.fixed_i, st.fixed_c
        cond = torch.cat([cond_i.expand(b, -1, -1)] + ([cond_c.expand(b, -1, -1)] if st.priors else []))
        return st.fwd_unet(zt.to(st.base_dtype), t, encoder_hidden_states=cond.to(st.base_dtype)).sample


def after_step(st: TrainState, done: int, l_i: torch.Tensor, l_c: torch.Tensor) -> None:
    """Progress, divergence check, periodic checkpoint and preview after ``done`` steps."""
    req = st.req
    rate = (time.perf_counter() - st.t0) / max(1, done - st.start)
    st.run.report(done / req.steps, f"step {done}/{req.steps}, loss {st.losses[-1]:.4f} "
                  f"(subject {l_i.item():.4f}, prior {l_c.item():.4f}), {rate:.2f} s/step")
    if not math.isfinite(st.losses[-1]):
        raise EditError(f"Training diverged at step {done} (loss {st.losses[-1]}): lower the learning rate.")
    if req.checkpoint_every and done % req.checkpoint_every == 0 and done < req.steps and st.acc.is_main_process:
        save_checkpoint(st.work, done, st.fingerprint, _lora_state(st), st.opt, st.losses)
    if req.preview_every and done % req.preview_every == 0 and done < req.steps:
        with torch.no_grad():
            preview(st, done)


def preview(st: TrainState, step: int) -> None:
    """"a [V] [class]" from the model as trained so far (seed ``req.seed``): kept, saved, handed to ``on_preview``."""
    if not st.acc.is_main_process:
        return
    b, req = st.bundle, st.req
    b.unet.eval()
    cond = encode_text(b, [st.prompt_i])  # now: the text encoder may carry the LoRA
    img = sample(b, cond, st.uncond, st.size, req.preview_steps, [req.seed])[0]  # not cancellable: no run
    st.previews.append((step, img))
    (st.work / "previews").mkdir(parents=True, exist_ok=True)
    atomic_write(st.work / "previews" / f"step-{step:06d}.png", lambda tmp: img.save(tmp, format="PNG"))
    st.run.preview(step, img)
    b.unet.train()


def _lora_state(st: TrainState) -> dict[str, torch.Tensor]:
    return lora_state(st.bundle.unet, st.bundle.text_encoder, st.req.train_text_encoder)


# ---- 8: the result -----------------------------------------------------------------------------------------
def save(st: TrainState) -> tuple[Path, dict]:
    """8. The final preview; the LoRA file, its card and a checkpoint to "train longer" from (main process).

    Each file is written to a temp file and renamed (a crash leaves no torn LoRA); the LoRA's name is taken
    only if it is still free (another run may have finished first) unless ``req.replace``; Cancel pressed
    during the final preview still keeps the LoRA out of the library."""
    req = st.req
    with st.run.step("save"), torch.no_grad():
        preview(st, req.steps)
        stop_if_cancelled(st, req.steps)
        path = st.out_dir / f"{st.name}.safetensors"
        card = _card(st)
        if st.acc.is_main_process:
            sd = _lora_state(st)
            save_checkpoint(st.work, req.steps, st.fingerprint, sd, st.opt, st.losses)  # "train longer" resumes here
            try:
                atomic_write(path, lambda tmp: save_lora_file(tmp, sd, req.rank), replace=req.replace)
            except FileExistsError:
                raise EditError(f"A LoRA named {st.name!r} appeared while training: choose another name, or ask to "
                                "replace it (the training is kept as a checkpoint: train again to finish "
                                "at once).") from None
            atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(card, indent=1)))
            log.info("saved LoRA %s (prompt “%s”)", path, st.prompt_i)
    return path, card


def _card(st: TrainState) -> dict:
    req = st.req
    return {
        "name": st.name, "identifier": st.identifier, "class_noun": req.class_noun, "instance_prompt": st.prompt_i,
        "class_prompt": st.prompt_c, "base_model": st.model_key, "steps": req.steps, "rank": req.rank,
        "lr": req.lr, "prior_preservation": req.prior_preservation, "prior_images": len(st.priors),
        "prior_weight": req.prior_weight, "train_text_encoder": req.train_text_encoder, "resolution": st.size,
        "photos": len(req.photos), "final_loss": float(np.mean(st.losses[-10:])) if st.losses else None,
        "cross_attention_dim": int(st.bundle.unet.config.cross_attention_dim), "processes": st.acc.num_processes,
        "base_family": getattr(getattr(st.bundle, "family", None), "name", None),  # sd15 | sd2 | sdxl
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
