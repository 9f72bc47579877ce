"""Train the built-in ``toy`` model: an SD-1.5-layout latent diffusion model of the procedural toy world.

    python -m models.train_toy --out models/toy --minutes 85 --seed 0

One seeded command, two phases, in order:

(a) a 4× ``AutoencoderKL`` (3 blocks, 4 latent channels) on 64² scenes, L1 + a small KL term; then its
    ``scaling_factor`` is set to 1 / std of the latents so the UNet sees unit-variance latents;
(b) a small ``UNet2DConditionModel`` with the SD-1.5 block layout (cross-attention in ``down_blocks[0..2]``
    and ``up_blocks[1..3]``) jointly with a tiny ``CLIPTextModel`` over ``models.tiny.tiny_tokenizer()``:
    ε-prediction on the SD-1.5 DDPM schedule, min-SNR-5 loss weighting, AdamW with warm-up and cosine
    decay, 10 % caption dropout (empty prompt, for classifier-free guidance), EMA weights (the ones saved).

Scenes are generated from seeds drawn with the run's seed, all below ``toy_world.HELDOUT_SEED`` (benchmarks
use seeds from there up): fresh ones every VAE step; for the UNet, ``--unet-scenes`` scenes encoded once.
Step counts are flags, so a run is reproducible; ``--minutes`` only caps each phase at a fixed fraction of
the budget (a capped phase is logged and recorded in the card).

Output (``--out``): a diffusers ``StableDiffusionPipeline`` folder in fp16 safetensors (no safety checker),
``training_log.txt`` and ``card.json`` (config, steps, minutes, seed, losses, metrics). The folder is
rewritten every ``--checkpoint-minutes`` so a usable model exists if the run is stopped early.

``--world v2`` trains on toy world v2 (recorded in the card). The whole training state (weights, EMA, AdamW
moments, RNG states, step) is checkpointed at the same times, in either phase, under ``--out/.train-state``;
``python -m models.train_toy --out DIR --resume`` continues a stopped run exactly, with the flags it was
started with (flags given override them). A missing checkpoint says to start again; a corrupt newest one
falls back to the one before (``--keep-checkpoints``), and when none is readable the message says what to delete.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import toy_world
from models.tiny import SD15_SCHEDULER, tiny_tokenizer
from models.toy_parts import (
    TEXT_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
    CheckpointError,
    SceneStream,
    TrainState,
    build_text_encoder,
    build_unet,
    build_vae,
    ema_update,
    images_to_tensor,
    load_module,
    load_optimizer,
    load_state,
    lr_at,
    module_tensors,
    optimizer_tensors,
    psnr,
    save_pipeline,
    save_state,
    tokenize,
)

log = logging.getLogger("train_toy")

VAE_FRACTION = 0.22  # share of --minutes the VAE phase may take at most; the UNet phase gets the rest
SAVE_RESERVE_S = 45.0  # kept free at the end of the budget for the final save


# ---------------------------------------------------------------------------------------------- phases
def train_vae(args, stream: SceneStream, deadline: float, card: dict, resume: TrainState | None = None):
    """Phase (a): the autoencoder. Returns it frozen, with ``scaling_factor`` set from the latents' std.

    Saves its whole state every ``--checkpoint-minutes`` and once done (phase "unet", step 0); ``resume``
    (a phase "vae" checkpoint) continues it exactly."""
    torch.manual_seed(args.seed)
    vae = build_vae().train()
    n_params = sum(p.numel() for p in vae.parameters())
    log.info("VAE: %.2f M params, %d steps of batch %d, lr %g", n_params / 1e6, args.vae_steps, args.vae_batch, args.vae_lr)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0, losses, step, start = time.time(), [], 0, 0
    if resume is not None:
        load_module(vae, "vae", resume.tensors)
        load_optimizer(opt, "opt", resume.tensors, resume.meta["opt_groups"])
        gen.set_state(resume.tensors["gen"])
        stream.rng.bit_generator.state = resume.meta["stream"]
        losses, start = list(resume.meta["losses"]), resume.step
        log.info("resume: VAE phase from step %d", start)
    last_save = time.time()

    def checkpoint(phase: str, step_done: int) -> None:
        tensors = module_tensors("vae", vae)
        meta = dict(stream=stream.rng.bit_generator.state, card=card, losses=losses)
        if phase == "vae":
            opt_t, meta["opt_groups"] = optimizer_tensors("opt", opt)
            tensors |= opt_t | {"gen": gen.get_state()}
        save_state(args.out, TrainState(phase, step_done, tensors, meta), args.keep_checkpoints)

    for step in range(start, args.vae_steps):
        if time.time() > deadline:
            log.warning("VAE phase hit its time cap after %d of %d steps", step, args.vae_steps)
            card["vae_capped_at_step"] = step
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=50)
        x, _ = stream.next(args.vae_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16_vae)):  # ~1.7x faster on AVX512-BF16
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            rec = vae.decode(z).sample
        l1 = (rec.float() - x).abs().mean()
        kl = post.kl().float().mean() / x[0].numel()
        loss = l1 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(l1.item())
        if (step + 1) % args.log_every == 0 or step == start:
            dt = (time.time() - t0) / (step + 1 - start)
            log.info("vae step %d/%d  l1 %.4f  kl %.2f  lr %.2e  %.2f s/step", step + 1, args.vae_steps,
                     np.mean(losses[-args.log_every:]), kl.item(), opt.param_groups[0]["lr"], dt)
        if time.time() - last_save > args.checkpoint_minutes * 60:
            checkpoint("vae", step + 1)
            last_save = time.time()
    steps_done = len(losses)
    vae.eval().requires_grad_(False)
    held = range(toy_world.HELDOUT_SEED, toy_world.HELDOUT_SEED + args.eval_scenes)
    x = images_to_tensor(toy_world.make_batch(held)[0])
    with torch.no_grad():
        z = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(16)])
        rec = torch.cat([vae.decode(c).sample for c in z.split(16)])
        lat = torch.cat([vae.encode(c).latent_dist.mean for c in stream.next(4 * args.eval_scenes)[0].split(32)])
        x2 = images_to_tensor(toy_world.make_batch(held, "v2")[0])
        rec2 = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x2.split(16)])
    sf = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=sf)
    card["vae"] = dict(steps=steps_done, planned_steps=args.vae_steps, batch=args.vae_batch, lr=args.vae_lr,
                       kl_weight=args.vae_kl, params=n_params, minutes=round((time.time() - t0) / 60, 2),
                       s_per_step=round((time.time() - t0) / max(1, steps_done), 3),
                       final_l1=float(np.mean(losses[-100:])) if losses else None,
                       heldout_psnr_db=round(psnr(rec, x), 2), heldout_v2_psnr_db=round(psnr(rec2, x2), 2),
                       scaling_factor=sf)
    log.info("VAE done: %d steps in %.1f min, held-out PSNR %.2f dB, scaling_factor %.4f",
             steps_done, card["vae"]["minutes"], card["vae"]["heldout_psnr_db"], sf)
    checkpoint("unet", 0)  # the UNet phase can start from here without redoing this one
    return vae


def train_unet(args, vae, stream: SceneStream, deadline: float, card: dict, out: Path, tokenizer, init=None,
               resume: TrainState | None = None):
    """Phase (b): UNet + text encoder, jointly, on VAE latents. Saves EMA weights periodically and at the end.
    ``init`` = (unet, text_encoder) continues from trained weights instead of a fresh start; ``resume`` (a
    phase "unet" checkpoint of this run, see ``--resume``) continues the phase exactly where it stopped."""
    torch.manual_seed(args.seed + 2)
    unet, text_encoder = init if init is not None else (build_unet(), build_text_encoder())
    unet, text_encoder = unet.float().train(), text_encoder.float().train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    log.info("UNet: %.2f M params, text encoder %.2f M; %d steps of batch %d, lr %g", n_unet / 1e6, n_text / 1e6,
             args.unet_steps, args.unet_batch, args.unet_lr)
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ac = torch.tensor(_alphas_cumprod())
    gen = torch.Generator().manual_seed(args.seed + 3)
    rng = np.random.default_rng(args.seed + 4)
    empty_ids = tokenize(tokenizer, [""])
    if resume is not None:  # the same training scenes: the stream as it stood when this phase began
        stream.rng.bit_generator.state = resume.meta["stream"]
    stream_at_start = stream.rng.bit_generator.state
    latents, captions_all = encode_scenes(vae, stream, args.unet_scenes)
    t0, last_save, losses, step, start = time.time(), time.time(), [], 0, 0
    if resume is not None and resume.step > 0:
        for prefix, module in (("unet", unet), ("text", text_encoder), ("ema_unet", ema_unet), ("ema_text", ema_text)):
            load_module(module, prefix, resume.tensors)
        load_optimizer(opt, "opt", resume.tensors, resume.meta["opt_groups"])
        gen.set_state(resume.tensors["gen"])
        rng.bit_generator.state = resume.meta["rng"]
        losses, start = list(resume.meta["losses"]), resume.step
        log.info("resume: UNet phase from step %d", start)
    card["unet"] = dict(planned_steps=args.unet_steps, scenes=args.unet_scenes, batch=args.unet_batch,
                        lr=args.unet_lr, ema=args.ema,
                        caption_dropout=args.caption_dropout, params=n_unet, text_params=n_text,
                        loss="eps MSE, min-SNR-5 weighted")

    def checkpoint(final: bool) -> None:
        elapsed = time.time() - t0
        card["unet"].update(steps=len(losses), minutes=round(elapsed / 60, 2),
                            s_per_step=round(elapsed / max(1, len(losses)), 3),
                            final_loss=float(np.mean(losses[-200:])) if losses else None)
        card["status"] = "complete" if final else f"partial (step {len(losses)})"
        card["total_minutes"] = round((time.time() - card["_start"]) / 60, 2)
        save_pipeline(out, vae, ema_unet, ema_text, tokenizer, {k: v for k, v in card.items() if k != "_start"})
        if init is None:  # a fresh run's whole state, for --resume (--resume-unet runs restart from the folder)
            tensors = module_tensors("vae", vae)
            for prefix, module in (("unet", unet), ("text", text_encoder), ("ema_unet", ema_unet), ("ema_text", ema_text)):
                tensors |= module_tensors(prefix, module)
            opt_t, groups = optimizer_tensors("opt", opt)
            meta = dict(stream=stream_at_start, rng=rng.bit_generator.state, losses=losses, opt_groups=groups,
                        card={k: v for k, v in card.items() if k != "_start"})
            save_state(out, TrainState("unet", len(losses), tensors | opt_t | {"gen": gen.get_state()}, meta),
                       args.keep_checkpoints)

    for step in range(start, args.unet_steps):
        if time.time() > deadline:
            log.warning("UNet phase hit its time cap after %d of %d steps", step, args.unet_steps)
            card["unet_capped_at_step"] = step
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=args.warmup)
        idx = rng.integers(0, len(captions_all), size=args.unet_batch)
        ids = tokenize(tokenizer, [captions_all[i] for i in idx])
        drop = torch.from_numpy(rng.random(len(idx)) < args.caption_dropout)
        ids[drop] = empty_ids
        z0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (z0.shape[0],), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        snr = ac[t] / (1 - ac[t])
        weight = snr.clamp(max=5.0) / snr  # min-SNR-γ for ε-prediction (Hang et al. 2023)
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == start:
            dt = (time.time() - t0) / (step + 1 - start)
            log.info("unet step %d/%d  loss %.4f  lr %.2e  %.2f s/step  (%.1f min)", step + 1, args.unet_steps,
                     np.mean(losses[-args.log_every:]), opt.param_groups[0]["lr"], dt, (time.time() - t0) / 60)
        if time.time() - last_save > args.checkpoint_minutes * 60:
            checkpoint(final=False)
            last_save = time.time()
    checkpoint(final=True)
    return ema_unet, ema_text


@torch.no_grad()
def encode_scenes(vae, stream: SceneStream, n: int, chunk: int = 256) -> tuple[torch.Tensor, list[str]]:
    """Scaled latents (posterior means × ``scaling_factor``) and captions of ``n`` fresh training scenes.

    Encoding once up front instead of every step saves ~20 % of the UNet phase on 2 CPU cores.
    """
    t0, zs, caps = time.time(), [], []
    for i in range(0, n, chunk):
        x, c = stream.next(min(chunk, n - i))
        zs.append(torch.cat([vae.encode(b).latent_dist.mean for b in x.split(64)]))
        caps += c
    z = torch.cat(zs) * vae.config.scaling_factor
    log.info("encoded %d training scenes in %.1f min (latent std %.3f)", n, (time.time() - t0) / 60, float(z.std()))
    return z, caps


def _alphas_cumprod() -> np.ndarray:
    """ᾱ_t of the SD-1.5 DDPM schedule (scaled_linear 0.00085 → 0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in SD15_SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")}
    return DDPMScheduler(**cfg).alphas_cumprod.numpy().astype(np.float32)


def shape_weight(x: torch.Tensor, k: float) -> torch.Tensor:
    """Per-pixel loss weight 1 + k·saturation, saturation = max(rgb) − min(rgb) of the target in [0, 1].

    Toy backgrounds are gray (saturation ≈ 0) and every shape colour is saturated, so this weights the
    shapes' pixels ~1 + 0.7k: an unweighted loss is dominated by background and lets the decoder drift
    between close hues (cyan → blue), which is exactly what the benchmarks' colour segmentation measures.
    """
    if k <= 0:
        return torch.ones_like(x[:, :1])
    rgb = (x + 1) / 2
    return 1 + k * (rgb.amax(1, keepdim=True) - rgb.amin(1, keepdim=True))


def finetune_decoder(args) -> dict:
    """Sharpen a trained folder's VAE by training only its decoder (``--decoder-only``).

    The encoder (and ``quant_conv``) stay frozen, so latents, ``scaling_factor`` and therefore the trained
    UNet stay valid — the same move as SD's ft-MSE VAE. Uses ``--vae-steps / --vae-batch / --vae-lr``,
    rewrites ``vae/`` in fp16 and records the run under ``card.json["vae_decoder_finetune"]``.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed + 5)
    vae = AutoencoderKL.from_pretrained(args.out, subfolder="vae", torch_dtype=torch.float32)
    vae.requires_grad_(False).eval()
    train = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in train:
        q.requires_grad_(True)
    vae.decoder.train()
    x_held = images_to_tensor(toy_world.make_batch(range(toy_world.HELDOUT_SEED, toy_world.HELDOUT_SEED + 64))[0])

    on_shapes = (shape_weight(x_held, 1.0) > 1.3).expand_as(x_held)  # the saturated (shape) pixels

    def heldout_psnr() -> tuple[float, float]:
        """(PSNR over the whole held-out images, PSNR over their shapes' pixels only)."""
        with torch.no_grad():
            z = torch.cat([vae.encode(c).latent_dist.mean for c in x_held.split(16)])
            rec = torch.cat([vae.decode(c).sample for c in z.split(16)])
            return psnr(rec, x_held), psnr(rec[on_shapes][None], x_held[on_shapes][None])

    before, before_shapes = heldout_psnr()
    log.info("decoder fine-tune of %s: held-out PSNR before %.2f dB (shapes %.2f dB); %d steps of batch %d, lr %g, "
             "shape weight %g", args.out, before, before_shapes, args.vae_steps, args.vae_batch, args.vae_lr,
             args.shape_weight)
    opt = torch.optim.AdamW(train, lr=args.vae_lr, weight_decay=0.0)
    stream = SceneStream(np.random.default_rng(args.seed + 6), args.world)
    gen = torch.Generator().manual_seed(args.seed + 7)
    t0, losses = time.time(), []
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=20)
        x, _ = stream.next(args.vae_batch)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16_vae)):
            rec = vae.decode(z).sample
        loss = (shape_weight(x, args.shape_weight) * (rec.float() - x).abs()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            log.info("decoder step %d/%d  l1 %.4f  lr %.2e  %.2f s/step", step + 1, args.vae_steps,
                     np.mean(losses[-args.log_every:]), opt.param_groups[0]["lr"], (time.time() - t0) / (step + 1))
    vae.eval().requires_grad_(False)
    after, after_shapes = heldout_psnr()
    staging = args.out / ".staging-vae"
    shutil.rmtree(staging, ignore_errors=True)
    copy.deepcopy(vae).half().save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(args.out / "vae")
    os.replace(staging, args.out / "vae")
    info = dict(steps=args.vae_steps, batch=args.vae_batch, lr=args.vae_lr, seed=args.seed, shape_weight=args.shape_weight,
                minutes=round((time.time() - t0) / 60, 2), heldout_psnr_db_before=round(before, 2),
                heldout_psnr_db=round(after, 2),
                shapes_psnr_db_before=round(before_shapes, 2), shapes_psnr_db=round(after_shapes, 2), final_l1=float(np.mean(losses[-100:])) if losses else None)
    card_path = args.out / "card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card["vae_decoder_finetune"] = info
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log.info("decoder fine-tune done: held-out PSNR %.2f -> %.2f dB, shapes %.2f -> %.2f dB in %.1f min", before,
             after, before_shapes, after_shapes, info["minutes"])
    return info


def resume_unet(args, argv) -> None:
    """Continue the UNet + text-encoder phase of a trained folder for ``--unet-steps`` more steps."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = args.out
    card = json.loads((out / "card.json").read_text())
    previous = {k: card.get(k) for k in ("unet", "unet_capped_at_step", "status")}
    card.setdefault("unet_runs", []).append(previous)
    card["_start"] = time.time()
    vae = AutoencoderKL.from_pretrained(out / "vae").float().eval()
    init = (UNet2DConditionModel.from_pretrained(out / "unet"), CLIPTextModel.from_pretrained(out / "text_encoder"))
    log.info("resume: continuing the UNet phase of %s for %d steps (lr %g, warm-up %d)", out, args.unet_steps,
             args.unet_lr, args.warmup)
    card.setdefault("commands", []).append(
        {"command": "python -m models.train_toy " + " ".join(argv if argv is not None else sys.argv[1:])})
    stream = SceneStream(np.random.default_rng(args.seed + 100), args.world)
    train_unet(args, vae, stream, time.time() + args.minutes * 60 - SAVE_RESERVE_S, card, out, tiny_tokenizer(),
               init=init)


def card_world(out: Path) -> str:
    """The world a trained folder's card records (folders from before v2 existed are v1)."""
    try:
        return str(json.loads((out / "card.json").read_text()).get("world", "v1"))
    except (OSError, ValueError):
        return "v1"  # no readable card: resume_unet says what is wrong


def resume_run(state: TrainState, argv: list[str]) -> int:
    """Continue the run a checkpoint came from: its own flags (from its card's command) overridden by ``argv``'s,
    then the rest of the phase it stopped in, then (if that was the VAE's) the whole UNet phase."""
    card = state.meta["card"]
    original = card["command"].split()[3:]  # "python -m models.train_toy ..."
    args = parse_args([a for a in original if a != "--resume"] + [a for a in argv if a != "--resume"])
    args.world = args.world or card.get("world", "v1")
    torch.set_num_threads(args.threads)
    card["_start"] = time.time()
    card.setdefault("resumes", []).append({"command": "python -m models.train_toy " + " ".join(argv), "phase": state.phase,
                                           "step": state.step, "at": time.strftime("%Y-%m-%d %H:%M:%S")})
    log.info("resume: %s from %s step %d with %s", args.out, state.phase, state.step, vars(args))
    stream = SceneStream(np.random.default_rng(args.seed), args.world)
    start, budget = time.time(), args.minutes * 60
    if state.phase == "vae":
        vae = train_vae(args, stream, start + VAE_FRACTION * budget, card, resume=state)
        state = None
    else:
        vae = build_vae()
        load_module(vae, "vae", state.tensors)
        vae.register_to_config(scaling_factor=card["vae"]["scaling_factor"])
        vae.eval().requires_grad_(False)
    train_unet(args, vae, stream, start + budget - SAVE_RESERVE_S, card, args.out, tiny_tokenizer(), resume=state)
    log.info("done in %.1f min", (time.time() - start) / 60)
    return 0


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (a later flag overrides an earlier one, which ``--resume`` relies on)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/toy"))
    p.add_argument("--minutes", type=float, default=85.0,
                   help="wall-clock budget; caps the phases, never lengthens them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1700)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--bf16-vae", type=int, default=1, help="bf16 autocast for the VAE phase (1/0)")
    p.add_argument("--unet-steps", type=int, default=4800)
    p.add_argument("--unet-scenes", type=int, default=20000, help="training scenes encoded once for the UNet phase")
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="training-state checkpoints kept in --out/.train-state (a corrupt newest one falls back to "
                        "an older one)")
    p.add_argument("--eval-scenes", type=int, default=64,
                   help="held-out scenes for the VAE's PSNR (and 4× as many training scenes for its scaling_factor)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--world", choices=toy_world.WORLDS, default=None,
                   help="training scenes: v1 (the shipped toy's; the default of a fresh run) or v2 (continuous, turned "
                        "and elongated shapes, a quarter of them v1 scenes); recorded in card.json, and --resume-unet / "
                        "--decoder-only default to the card's")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run of --out exactly from its last checkpoint (in --out/.train-state, "
                        "every --checkpoint-minutes, in either phase) with the flags it was started with; flags "
                        "given here override them (e.g. --minutes, --threads)")
    p.add_argument("--resume-unet", action="store_true",
                   help="continue the UNet phase from the trained folder --out (same VAE; the saved EMA weights "
                        "start the run, with fresh scenes from seed+100); recorded in card.json")
    p.add_argument("--shape-weight", type=float, default=4.0,
                   help="--decoder-only: L1 weight 1 + k·saturation, so the shapes' colours count (0 = plain L1)")
    p.add_argument("--decoder-only", action="store_true",
                   help="only fine-tune the VAE decoder of the trained folder --out (keeps the UNet valid)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.world is None:  # a fresh run is v1 as before; continuing a folder keeps the world it was trained on
        args.world = card_world(args.out) if (args.resume_unet or args.decoder_only) else "v1"

    args.out.mkdir(parents=True, exist_ok=True)
    if args.decoder_only:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            handlers=[logging.StreamHandler(sys.stderr),
                                      logging.FileHandler(args.out / "training_log.txt", mode="a")])
        torch.set_num_threads(args.threads)
        finetune_decoder(args)
        return 0
    if args.resume:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            handlers=[logging.StreamHandler(sys.stderr),
                                      logging.FileHandler(args.out / "training_log.txt", mode="a")])
        try:
            state = load_state(args.out)
        except CheckpointError as e:
            log.error("%s", e)
            return 2
        return resume_run(state, argv if argv is not None else sys.argv[1:])
    if args.resume_unet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            handlers=[logging.StreamHandler(sys.stderr),
                                      logging.FileHandler(args.out / "training_log.txt", mode="a")])
        torch.set_num_threads(args.threads)
        resume_unet(args, argv)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr),
                                  logging.FileHandler(args.out / "training_log.txt", mode="w")])
    torch.set_num_threads(args.threads)
    start = time.time()
    budget = args.minutes * 60
    card = dict(_start=start, command="python -m models.train_toy " + " ".join(argv if argv is not None else sys.argv[1:]),
                seed=args.seed, world=args.world, minutes_budget=args.minutes, torch=torch.__version__, threads=args.threads,
                machine=f"{platform.machine()} {os.cpu_count()} CPUs", started=time.strftime("%Y-%m-%d %H:%M:%S"),
                vae_config={k: v for k, v in VAE_CONFIG.items()}, unet_config=UNET_CONFIG, text_config=TEXT_CONFIG)
    log.info("train_toy: %s", vars(args))
    stream = SceneStream(np.random.default_rng(args.seed), args.world)
    tokenizer = tiny_tokenizer()
    vae = train_vae(args, stream, start + VAE_FRACTION * budget, card)
    train_unet(args, vae, stream, start + budget - SAVE_RESERVE_S, card, args.out, tokenizer)
    log.info("done in %.1f min", (time.time() - start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
