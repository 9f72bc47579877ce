"""The sketch (SDEdit) and generate tasks: diffusers pipelines around the loaded components, trajectories
recorded for drags, recipes.

Every family runs its own diffusers pipelines (SD-1.x/2.x: ``StableDiffusion*Pipeline``; SDXL:
``StableDiffusionXL*Pipeline``) built around the loaded components; the prompt is encoded once by the bundle
(``encode_prompt``) and handed over as embeddings (SDXL: text states + pooled, split from the packed tensor).
A v-prediction scheduler config travels into the pipeline's DDIM scheduler, which then converts itself.
Sampling previews (``editing/previews.py``) are made only when the progress callback takes images."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from PIL import Image

from editing import conditions
from editing.generation.requests import (
    GENERATE_FIELDS,
    SKETCH_FIELDS,
    AdapterUnit,
    ControlNetUnit,
    GenerateRequest,
    IPAdapterUnit,
    SketchRequest,
)
from editing.images import tensor_to_pil
from editing.runtime import EditResult, Task, decode_image, register
from editing.sampling import Schedule
from models import families


# ---- the shared denoise run ------------------------------------------------------------------------
def _components(b, scheduler) -> dict:
    if b.family.conditioned_on_size:
        return {"vae": b.vae, "text_encoder": b.text_encoder, "text_encoder_2": b.text_encoder_2,
                "tokenizer": b.tokenizer, "tokenizer_2": b.tokenizer_2, "unet": b.unet, "scheduler": scheduler,
                "feature_extractor": None, "image_encoder": None, "force_zeros_for_empty_prompt": True,
                "add_watermarker": False}
    return {"vae": b.vae, "text_encoder": b.text_encoder, "tokenizer": b.tokenizer, "unet": b.unet, "scheduler": scheduler,
                "safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}


# The SD-1.x/2.x pipeline of each kind and its SDXL counterpart.
_XL_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionXLPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionControlNetPipeline": "StableDiffusionXLControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
}


def _prompt_kwargs(b, prompt: str, negative: str) -> dict:
    """The pipeline's embedding arguments from the bundle's (cached) conditioning tensors."""
    cond, uncond = b.encode_prompt(prompt), b.encode_prompt(negative)
    if not b.family.conditioned_on_size:
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    (c, pc), (u, pu) = (families.unpack_sdxl(x, b.family.pooled_dim) for x in (cond, uncond))
    return {"prompt_embeds": c, "pooled_prompt_embeds": pc, "negative_prompt_embeds": u,
            "negative_pooled_prompt_embeds": pu}


@contextlib.contextmanager
def _vae_dtype_kept(vae):
    """diffusers' SDXL img2img pipelines upcast a ``force_upcast`` VAE to encode and then cast it to the
    pipeline's dtype — which would turn the loader's fp32 SDXL VAE into fp16; put its dtype back."""
    dtype = vae.dtype
    try:
        yield
    finally:
        if vae.dtype != dtype:
            vae.to(dtype=dtype)


def _pipeline(b, kind: str, controlnets=None):
    """A diffusers pipeline around the loaded components (cheap: nothing is copied)."""
    import diffusers
    from diffusers import DDIMScheduler

    cls = getattr(diffusers, _XL_PIPELINES[kind] if b.family.conditioned_on_size else kind)
    comps = _components(b, DDIMScheduler.from_config(b.scheduler.config))  # fresh: the shared one is never mutated
    if controlnets is not None:
        comps["controlnet"] = controlnets[0] if len(controlnets) == 1 else list(controlnets)
    pipe = cls(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_x0_from_step(x_t: torch.Tensor, x_prev: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """x̂₀ of a deterministic DDIM step from its two ends (Song et al. 2021, eq. 12 with σ = 0):
    x_t = √ᾱ_t·x̂₀ + √(1−ᾱ_t)·ε and x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε share x̂₀ and ε, so
    x̂₀ = (√(1−ᾱ_prev)·x_t − √(1−ᾱ_t)·x_prev) / (√ᾱ_t·√(1−ᾱ_prev) − √ᾱ_prev·√(1−ᾱ_t)).
    Lets a pipeline callback (which sees only latents) preview x̂₀ without another UNet call."""
    sa, sb = (1 - a_prev) ** 0.5, (1 - a_t) ** 0.5
    return (sa * x_t - sb * x_prev) / (a_t**0.5 * sa - a_prev**0.5 * sb)


class _Recorder:
    """Keeps the latent trajectory (start latent, then one latent per step) and reports progress/cancel.

    With ``previews`` (a ``(decoder factory, schedule, first step index)``; only when the progress callback
    takes images) it also shows x̂₀ every few steps through ``run.preview``; otherwise nothing extra runs."""

    def __init__(self, run, unet, batch: int, n_steps: int, what: str, previews=None):
        self.run, self.batch, self.n, self.what = run, batch, n_steps, what
        self.latents: list[torch.Tensor] = []
        self.previews = previews
        self._hook = unet.register_forward_pre_hook(self._first_input, with_kwargs=True)

    def _first_input(self, module, args, kwargs):
        if not self.latents:  # the latent the loop starts from (CFG doubles the batch: take the first half)
            x = args[0] if args else kwargs["sample"]
            self.latents.append(x[: self.batch].detach().float().clone())  # kept on the device: no sync per step

    def __call__(self, pipe, i, t, kw):
        self.latents.append(kw["latents"].detach().float().clone())
        if self.previews is not None:
            self._preview(i)
        self.run.report((i + 1) / self.n, f"{self.what} step {i + 1}/{self.n}")
        return kw

    def _preview(self, i: int) -> None:
        from editing.previews import PREVIEWS

        decoder, schedule, first = self.previews
        every = max(1, round(self.n / PREVIEWS))
        if (i + 1) % every or i + 1 >= self.n or len(self.latents) < 2:
            return
        t = schedule.timesteps[first + i]
        x0 = ddim_x0_from_step(self.latents[-2][:1], self.latents[-1][:1], schedule.alpha(t),
                               schedule.alpha(t - schedule.stride))
        self.run.preview(i + 1, decoder()(x0))

    def close(self):
        self._hook.remove()


def _decode(b, z: torch.Tensor) -> list[Image.Image]:
    out = []
    with torch.no_grad():
        for i in range(z.shape[0]):  # one at a time: lower peak memory
            x = b.vae.decode((z[i: i + 1] / b.vae.config.scaling_factor).to(b.dtype)).sample
            out.append(tensor_to_pil(x))
    return out


def _fit_condition(img: Image.Image, size: tuple[int, int], what: str, notices: list[str]) -> Image.Image:
    if img.size != size:
        notices.append(f"{what} was {img.width}×{img.height}; it was resized to the output's {size[0]}×{size[1]}.")
        return img.resize(size, Image.BICUBIC)
    return img


@contextlib.contextmanager
def _extensions(ctx, req_adapters, ip_unit, size, timesteps_of_run, cfg: bool, notices, conds_out):
    """T2I-Adapter residuals and the IP-Adapter, attached for one pipeline call; yields pipeline kwargs."""
    from models import adapters as models_adapters

    b, run = ctx.bundle, ctx.run
    kwargs = {}
    with contextlib.ExitStack() as stack:
        if req_adapters:
            units, counted = [], set()
            with run.step("conditions"):
                for i, u in enumerate(req_adapters):
                    ad = models_adapters.t2i_adapter(b, u.model, ctx.options.allow_pickle)
                    if id(ad) not in counted:
                        run.count_module(ad, "t2i_adapter")
                        counted.add(id(ad))
                    cond = _fit_condition(conditions.preprocess(u.preprocessor, u.image, u.options), size,
                                          f"T2I-Adapter {i + 1}'s condition image", notices)
                    conds_out[f"adapter{i}"] = cond
                    x = torch.from_numpy(np.asarray(cond, np.float32) / 255.0).permute(2, 0, 1)[None]
                    with torch.no_grad():
                        feats = [t * u.weight for t in ad(x.to(b.device, b.dtype))]
                    # Like the adapter pipeline's conditioning factor: the first fraction of this run's steps.
                    active = set(timesteps_of_run[: int(len(timesteps_of_run) * u.conditioning_factor)])
                    units.append((feats, active))
            stack.enter_context(models_adapters.adapter_residuals(b.unet, units))
        if ip_unit is not None:
            ip = stack.enter_context(models_adapters.ip_adapter(b, ip_unit.model, ctx.options.allow_pickle, ip_unit.scale))
            run.count_module(ip.weights.encoder, "image_encoder")
            with run.step("conditions"):
                emb = ip.embed(ip_unit.images).mean(dim=1, keepdim=True)  # several references: one averaged prompt
            kwargs["ip_adapter_image_embeds"] = ip.pipeline_embeds(emb, cfg)
        yield kwargs


def _finish(ctx, req, task: str, latents, images, traj, schedule, start: int | None, notices, recipe_fn,
            size: tuple[int, int] | None) -> EditResult:
    """Decode, resize, make each image drag-ready, build the result.

    ``start``: index into ``schedule.timesteps`` of the trajectory's first latent (0 = from z_T; None = no
    trajectory). A partial trajectory (SDEdit below strength 1) serves drags whose inversion strength is at
    most the sketch's strength, once the Editor accepts it."""
    b, run = ctx.bundle, ctx.run
    with run.step("decode"):
        images = _decode(b, latents) if images is None else images
        if size is not None:
            images = [im if im.size == size else im.resize(size, Image.LANCZOS) for im in images]
    recipes = [recipe_fn(i) for i in range(len(images))]
    ready = bool(traj) and start is not None
    if ready:
        more = {"start": start} if start else {}
        for i, im in enumerate(images):
            ctx.remember_generation(im, [z[i: i + 1] for z in traj], schedule, req.prompt, req.guidance_scale,
                                       recipes[i], **more)
    extra = {"drag_ready": ready, "recipes": recipes,
             "calls": {k: dict(v) for k, v in run.calls.items()}}
    return EditResult(images[0], recipes[0], run.timings, run.nfe, notices, [], images, extra)


def _previews(ctx, schedule: Schedule, first: int):
    """The recorder's preview settings, or ``None`` (no previews, no cost) when nobody watches."""
    if not ctx.run.wants_previews:
        return None
    from editing.previews import preview_decoder

    return (lambda: preview_decoder(ctx), schedule, first)


# ---- sketch (SDEdit) -------------------------------------------------------------------------------
def run_sketch(ctx, req: SketchRequest) -> EditResult:
    """SDEdit (Meng et al. 2022): noise the sketch to t0 = strength, denoise to 0 with the prompt."""
    from models import adapters as models_adapters

    b, run = ctx.bundle, ctx.run
    work, (shown, _, _), notices = ctx.fit(req.sketch)
    notices = list(req.notices) + notices
    schedule = Schedule.from_scheduler(b.scheduler, req.n_inference_steps)
    n_run = min(int(req.n_inference_steps * req.strength), req.n_inference_steps)  # diffusers' img2img rule

    def recipe_fn(i):
        params = req.params() | {"seed": req.seed + i, "batch": 1}
        return ctx.recipe("sketch", params, images={"sketch": req.sketch, "image": req.image},
                             extra={"batch_index": i, "batch_seed": req.seed})

    if n_run == 0:  # strength 0: nothing is redrawn
        notices.append("Strength 0 keeps the sketch as drawn: raise it to let the model redraw the picture.")
        return _finish(ctx, req, "sketch", None, [shown] * req.batch, [], schedule, None, notices,
                       recipe_fn, None)
    gens = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.batch)]
    kwargs = {"image": work, "strength": req.strength, "num_inference_steps": req.n_inference_steps,
              "guidance_scale": req.guidance_scale, "num_images_per_prompt": req.batch, "generator": gens,
              **_prompt_kwargs(b, req.prompt, req.negative_prompt), "output_type": "latent"}
    if req.scribble_controlnet:
        cn = models_adapters.controlnet(b, req.scribble_controlnet, ctx.options.allow_pickle)
        run.count_module(cn, "controlnet")
        pipe = _pipeline(b, "StableDiffusionControlNetImg2ImgPipeline", [cn])
        kwargs.update(control_image=req.strokes.resize(work.size, Image.NEAREST),
                      controlnet_conditioning_scale=req.scribble_scale)
    else:
        pipe = _pipeline(b, "StableDiffusionImg2ImgPipeline")
    rec = _Recorder(run, b.unet, req.batch, n_run, "SDEdit",
                    _previews(ctx, schedule, req.n_inference_steps - n_run))
    try:
        with run.step("sketch"), torch.no_grad(), _vae_dtype_kept(b.vae):
            z = pipe(callback_on_step_end=rec, **kwargs).images
    finally:
        rec.close()
    start = req.n_inference_steps - n_run  # the trajectory starts at timesteps[start] (t0), not at z_T
    return _finish(ctx, req, "sketch", z, None, rec.latents, schedule, start, notices, recipe_fn, shown.size)


# ---- text-to-image with units ---------------------------------------------------------------------
def output_size(ctx, req: GenerateRequest) -> tuple[tuple[int, int], list[str]]:
    """(w, h) the UNet can take (multiples of ``pixel_multiple``) and a notice when the request was rounded."""
    b = ctx.bundle
    native, m = ctx.options.resolution or b.native_resolution, b.pixel_multiple
    w, h = req.width or native, req.height or native
    if req.width and not req.height:
        h = w
    if req.height and not req.width:
        w = h
    rw, rh = max(m, round(w / m) * m), max(m, round(h / m) * m)
    notes = [] if (rw, rh) == (w, h) else [f"The size {w}×{h} was rounded to {rw}×{rh} (sides must be multiples of {m})."]
    return (rw, rh), notes


def run_generate(ctx, req: GenerateRequest) -> EditResult:
    """Text-to-image with DDIM, any mix of ControlNet / T2I-Adapter units and an IP-Adapter; drag-ready."""
    from models import adapters as models_adapters

    b, run = ctx.bundle, ctx.run
    (w, h), notices = output_size(ctx, req)
    notices = list(req.notices) + notices
    schedule = Schedule.from_scheduler(b.scheduler, req.n_inference_steps)
    cfg = req.guidance_scale > 1.0
    f = b.vae_scale_factor
    latents = torch.cat([torch.randn((1, b.unet.config.in_channels, h // f, w // f),
                                     generator=torch.Generator("cpu").manual_seed(req.seed + i))
                         for i in range(req.batch)]).to(b.device, b.dtype)
    kwargs = {"height": h, "width": w, "num_inference_steps": req.n_inference_steps,
              "guidance_scale": req.guidance_scale, "num_images_per_prompt": req.batch, "latents": latents,
              **_prompt_kwargs(b, req.prompt, req.negative_prompt), "output_type": "latent"}
    conds: dict[str, Image.Image] = {}
    if req.controlnets:
        nets = []
        with run.step("conditions"):
            for i, u in enumerate(req.controlnets):
                nets.append(models_adapters.controlnet(b, u.model, ctx.options.allow_pickle))
                conds[f"controlnet{i}"] = _fit_condition(conditions.preprocess(u.preprocessor, u.image, u.options),
                                                         (w, h), f"ControlNet {i + 1}'s condition image", notices)
        for cn in {id(n): n for n in nets}.values():  # the same model in two units is one module: count it once
            run.count_module(cn, "controlnet")
        pipe = _pipeline(b, "StableDiffusionControlNetPipeline", nets)
        single = len(nets) == 1
        guess = [u.guess_mode for u in req.controlnets]
        if any(guess) and not all(guess):
            notices.append("Guess mode applies to all ControlNet units at once, so it is on for every unit.")
        kwargs.update(image=[conds[f"controlnet{i}"] for i in range(len(nets))] if not single else conds["controlnet0"],
                      controlnet_conditioning_scale=req.controlnets[0].scale if single else [u.scale for u in req.controlnets],
                      control_guidance_start=[u.start for u in req.controlnets],
                      control_guidance_end=[u.end for u in req.controlnets], guess_mode=any(guess))
    else:
        pipe = _pipeline(b, "StableDiffusionPipeline")

    def recipe_fn(i):
        params = req.params() | {"seed": req.seed + i, "batch": 1, "width": w, "height": h}
        return ctx.recipe("generate", params, images=req.pictures(),
                             extra={"batch_index": i, "batch_seed": req.seed})

    rec = _Recorder(run, b.unet, req.batch, req.n_inference_steps, "generate", _previews(ctx, schedule, 0))
    try:
        with (_extensions(ctx, req.adapters, req.ip_adapter, (w, h), schedule.timesteps, cfg, notices,
                          conds) as extra_kwargs, run.step("generate"), torch.no_grad()):
            z = pipe(callback_on_step_end=rec, **kwargs, **extra_kwargs).images
    finally:
        rec.close()
    result = _finish(ctx, req, "generate", z, None, rec.latents, schedule, 0, notices, recipe_fn, None)
    result.extra["conditions"] = conds  # the preprocessed condition pictures, as the model saw them
    return result


# ---- recipes ------------------------------------------------------------------------------------
def _pick(params: dict, table_keys) -> dict:
    return {k: params[k] for k in table_keys if k in params}


def sketch_from_recipe(recipe: dict) -> SketchRequest:
    p = recipe["params"]
    image = decode_image(recipe["image_png"]) if recipe.get("image_png") else None
    return SketchRequest(decode_image(recipe["sketch_png"]), image,
                         **_pick(p, ("prompt", "negative_prompt", *SKETCH_FIELDS, "scribble_controlnet")))


def generate_from_recipe(recipe: dict) -> GenerateRequest:
    if "params" not in recipe:  # a plain generation recorded by Editor.generate (prompt etc. at the top level)
        w, h = recipe.get("size") or (0, 0)
        return GenerateRequest(recipe["prompt"], width=w, height=h, seed=recipe["seed"],
                               guidance_scale=recipe["guidance_scale"], n_inference_steps=recipe["n_inference_steps"])
    p = recipe["params"]
    def img(k):
        return decode_image(recipe[f"{k}_png"])

    cns = tuple(ControlNetUnit(img(f"controlnet{i}"), **{k: v for k, v in u.items()})
                for i, u in enumerate(p.get("controlnets") or ()))
    ads = tuple(AdapterUnit(img(f"adapter{i}"), **u) for i, u in enumerate(p.get("adapters") or ()))
    ip = None
    if p.get("ip_adapter"):
        q = p["ip_adapter"]
        ip = IPAdapterUnit(tuple(img(f"ip{j}") for j in range(q["n_images"])), q["model"], q["scale"])
    return GenerateRequest(controlnets=cns, adapters=ads, ip_adapter=ip,
                           **_pick(p, ("prompt", "negative_prompt", *GENERATE_FIELDS)))


def replace(request, **changes):
    """A copy of a request with some fields changed (validated again)."""
    return dataclasses.replace(request, notices=(), **changes)


register(Task("sketch", SketchRequest, run=run_sketch, from_recipe=sketch_from_recipe))
register(Task("generate", GenerateRequest, run=run_generate, from_recipe=generate_from_recipe))
