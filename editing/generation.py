"""Sketch-to-image (SDEdit) and conditioned text-to-image (ControlNet, T2I-Adapter, IP-Adapter).

Both tasks run diffusers' pipelines built around the *already loaded* components (no second UNet,
VAE or text encoder; no safety checker; a fresh DDIM scheduler from the bundle's config, so the
shared one is never mutated). Every generated image is drag-ready: its DDIM trajectory (z_T … z_0,
recorded with ``callback_on_step_end``) is handed to ``Editor.remember_generation``, so a drag of
it needs neither inversion nor an identity LoRA.

    ctx.edit(SketchRequest(sketch, prompt="a red house", strength=0.7))
    ctx.edit(GenerateRequest("a cat", controlnets=(ControlNetUnit(edges, preprocessor="canny"),)))

Design notes (where we differ from diffusers' defaults):
- T2I-Adapter features are attached at the UNet's ``down_intrablock_additional_residuals`` hook
  (``models.adapters.adapter_residuals``) instead of ``StableDiffusionAdapterPipeline``, because that
  pipeline cannot be combined with ControlNet; the adapter pipeline's ``adapter_conditioning_factor``
  (apply on the first fraction of steps) is kept as ``conditioning_factor``.
- Strength (SDEdit t0) 0 returns the sketch itself (no model call); 1 starts from (almost) pure noise.
- Image ``i`` of a batch uses seed ``seed + i``, so any one image can be remade alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from editing import conditions
from editing.images import tensor_to_pil
from editing.sampling import Schedule
from editing.checks import check_fields, check_text, field_table, num
from editing.requests import EditError
from editing.runtime import EditResult, Task, decode_image, register

MAX_BATCH = 8
MAX_UNITS = 4
MAX_SIDE = 2048

_STEPS = "DDIM steps (50 = the drag's default, so results are drag-ready)"
_CFG = "classifier-free guidance: how closely the prompt is followed"
_SEED = "random seed of the first image (image i uses seed + i)"


def _check_fields(obj, table: dict) -> None:
    check_fields(obj, table)


def _check_image(img, what: str) -> Image.Image:
    if img is None:
        raise EditError(f"{what} is missing.")
    if not isinstance(img, Image.Image):
        raise EditError(f"{what} must be a picture, got {type(img).__name__}.")
    if min(img.size) < 8:
        raise EditError(f"{what} is {img.width}×{img.height}; it must be at least 8 px on each side.")
    return img


def _check_spec(spec, what: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise EditError(f"No {what} model given: use 'tiny', a local folder or a Hub id.")
    return spec.strip()


# ---- units -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet: the model, its condition picture (preprocessed by ``preprocessor``) and when/how much it steers."""

    image: Image.Image
    model: str = "tiny"
    preprocessor: str = "none"
    options: Mapping = field(default_factory=dict)  # preprocessor options (editing/conditions.OPTIONS)
    scale: float = num(1.0, 0.0, 2.0, "how strongly this ControlNet steers (residuals × scale; 0 = off)")
    start: float = num(0.0, 0.0, 1.0, "fraction of the steps at which this unit starts steering")
    end: float = num(1.0, 0.0, 1.0, "fraction of the steps at which this unit stops steering")
    guess_mode: bool = False

    def __post_init__(self):
        object.__setattr__(self, "image", _check_image(self.image, "A ControlNet condition image").convert("RGB"))
        object.__setattr__(self, "model", _check_spec(self.model, "ControlNet"))
        object.__setattr__(self, "options", conditions.check_options(self.preprocessor, self.options))
        _check_fields(self, CONTROLNET_FIELDS)
        if self.start >= self.end:
            raise EditError(f"ControlNet guidance start ({self.start:g}) must be before its end ({self.end:g}).")
        object.__setattr__(self, "guess_mode", bool(self.guess_mode))

    def params(self) -> dict:
        return {"model": self.model, "preprocessor": self.preprocessor, "options": dict(self.options),
                "scale": self.scale, "start": self.start, "end": self.end, "guess_mode": self.guess_mode}



CONTROLNET_FIELDS = field_table(ControlNetUnit)

@dataclass(frozen=True)
class AdapterUnit:
    """One T2I-Adapter: the model, its condition picture and preprocessor, weight and conditioning factor."""

    image: Image.Image
    model: str = "tiny"
    preprocessor: str = "none"
    options: Mapping = field(default_factory=dict)
    weight: float = num(1.0, 0.0, 2.0, "how strongly this T2I-Adapter steers (features × weight; 0 = off)")
    conditioning_factor: float = num(1.0, 0.0, 1.0, "fraction of the (early, noisy) steps on which the adapter is applied")

    def __post_init__(self):
        object.__setattr__(self, "image", _check_image(self.image, "A T2I-Adapter condition image").convert("RGB"))
        object.__setattr__(self, "model", _check_spec(self.model, "T2I-Adapter"))
        object.__setattr__(self, "options", conditions.check_options(self.preprocessor, self.options))
        _check_fields(self, ADAPTER_FIELDS)

    def params(self) -> dict:
        return {"model": self.model, "preprocessor": self.preprocessor, "options": dict(self.options),
                "weight": self.weight, "conditioning_factor": self.conditioning_factor}



ADAPTER_FIELDS = field_table(AdapterUnit)

@dataclass(frozen=True)
class IPAdapterUnit:
    """An image prompt: one or more reference pictures (averaged into one prompt by the adapter) and a scale."""

    images: tuple[Image.Image, ...]
    model: str = "tiny"
    scale: float = num(0.6, 0.0, 2.0, "how strongly the reference image steers (0 = ignored)")

    def __post_init__(self):
        imgs = (self.images,) if isinstance(self.images, Image.Image) else tuple(self.images or ())
        if not imgs:
            raise EditError("The IP-Adapter needs a reference image.")
        if len(imgs) > MAX_UNITS:
            raise EditError(f"{len(imgs)} IP-Adapter reference images; at most {MAX_UNITS} are supported.")
        object.__setattr__(self, "images", tuple(_check_image(i, "An IP-Adapter reference image").convert("RGB") for i in imgs))
        object.__setattr__(self, "model", _check_spec(self.model, "IP-Adapter"))
        _check_fields(self, IP_FIELDS)

    def params(self) -> dict:
        return {"model": self.model, "scale": self.scale, "n_images": len(self.images)}



IP_FIELDS = field_table(IPAdapterUnit)

# ---- requests ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SketchRequest:
    """SDEdit: a sketch (RGB drawing, or an RGBA strokes layer over ``image`` / white) becomes a picture.

    ``scribble_controlnet`` (a ControlNet spec, e.g. ``tiny`` or a scribble ControlNet) additionally
    steers with the strokes, so low-strength results keep the lines."""

    sketch: Image.Image
    image: Image.Image | None = None  # the photo drawn over (None = a blank canvas)
    prompt: str = ""
    negative_prompt: str = ""
    strength: float = num(0.75, 0.0, 1.0, "SDEdit t0: low keeps your sketch (faithful), high lets the model redraw (realistic)")
    n_inference_steps: int = num(50, 2, 200, _STEPS)
    guidance_scale: float = num(7.5, 1.0, 30.0, _CFG)
    seed: int = num(42, 0, 2**31 - 1, _SEED)
    batch: int = num(1, 1, MAX_BATCH, "images per run")
    scribble_controlnet: str | None = None
    scribble_scale: float = num(1.0, 0.0, 2.0, "strength of the optional ControlNet-scribble assist")
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        sketch = _check_image(self.sketch, "The sketch")
        notices = list(self.notices)
        base = None if self.image is None else _check_image(self.image, "The photo under the sketch").convert("RGB")
        if base is not None and base.size != sketch.size:
            notices.append(f"The photo was {base.width}×{base.height}; it was resized to the sketch's "
                           f"{sketch.width}×{sketch.height}.")
            base = base.resize(sketch.size, Image.LANCZOS)
        if sketch.mode in ("RGBA", "LA"):  # a strokes layer: alpha = where someone drew
            sketch = sketch.convert("RGBA")
            strokes = conditions.strokes_mask(sketch)
            paper = (base or Image.new("RGB", sketch.size, (255, 255, 255))).convert("RGBA")
            composite = Image.alpha_composite(paper, sketch).convert("RGB")
        else:
            composite = sketch.convert("RGB")
            strokes = conditions.strokes_mask(composite, background=base)
        if not strokes.any():
            raise EditError("The sketch is blank: draw some strokes first (or raise nothing and upload a drawing).")
        set_("sketch", composite)
        set_("image", base)
        set_("prompt", check_text(self.prompt, "prompt"))
        set_("negative_prompt", check_text(self.negative_prompt, "negative prompt"))
        _check_fields(self, SKETCH_FIELDS)
        if self.scribble_controlnet is not None and not str(self.scribble_controlnet).strip():
            set_("scribble_controlnet", None)
        if self.scribble_controlnet is not None:
            set_("scribble_controlnet", _check_spec(self.scribble_controlnet, "scribble ControlNet"))
        set_("notices", tuple(notices))

    @property
    def strokes(self) -> Image.Image:
        """The drawn strokes as a white-on-black scribble (the ControlNet-scribble assist's condition)."""
        return conditions.scribble(self.sketch, background=self.image)

    def params(self) -> dict:
        return {k: getattr(self, k) for k in ("prompt", "negative_prompt", *SKETCH_FIELDS, "scribble_controlnet")}



SKETCH_FIELDS = field_table(SketchRequest)  # the Sketch tab's sliders and the CLI flags
SketchRequest.FIELDS_UI = SKETCH_FIELDS

@dataclass(frozen=True)
class GenerateRequest:
    """Text-to-image, optionally steered by ControlNet units, T2I-Adapter units and an IP-Adapter."""

    prompt: str
    negative_prompt: str = ""
    width: int = num(0, 0, MAX_SIDE, "image width in px (0 = the model's native size)")
    height: int = num(0, 0, MAX_SIDE, "image height in px (0 = the model's native size)")
    n_inference_steps: int = num(50, 2, 200, _STEPS)
    guidance_scale: float = num(7.5, 1.0, 30.0, _CFG)
    seed: int = num(42, 0, 2**31 - 1, _SEED)
    batch: int = num(1, 1, MAX_BATCH, "images per run")
    controlnets: tuple[ControlNetUnit, ...] = ()
    adapters: tuple[AdapterUnit, ...] = ()
    ip_adapter: IPAdapterUnit | None = None
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("prompt", check_text(self.prompt, "prompt"))
        set_("negative_prompt", check_text(self.negative_prompt, "negative prompt"))
        _check_fields(self, GENERATE_FIELDS)
        for name, kind, what in (("controlnets", ControlNetUnit, "ControlNet"), ("adapters", AdapterUnit, "T2I-Adapter")):
            units = tuple(getattr(self, name) or ())
            if len(units) > MAX_UNITS:
                raise EditError(f"{len(units)} {what} units; at most {MAX_UNITS} can be combined.")
            if not all(isinstance(u, kind) for u in units):
                raise EditError(f"{name} must be {kind.__name__} values.")
            set_(name, units)
        if self.ip_adapter is not None and not isinstance(self.ip_adapter, IPAdapterUnit):
            raise EditError("ip_adapter must be an IPAdapterUnit.")

    def params(self) -> dict:
        return {**{k: getattr(self, k) for k in ("prompt", "negative_prompt", *GENERATE_FIELDS)},
                "controlnets": [u.params() for u in self.controlnets],
                "adapters": [u.params() for u in self.adapters],
                "ip_adapter": self.ip_adapter.params() if self.ip_adapter else None}

    def pictures(self) -> dict[str, Image.Image]:
        """The request's pictures by recipe name."""
        out = {f"controlnet{i}": u.image for i, u in enumerate(self.controlnets)}
        out.update({f"adapter{i}": u.image for i, u in enumerate(self.adapters)})
        if self.ip_adapter:
            out.update({f"ip{j}": im for j, im in enumerate(self.ip_adapter.images)})
        return out



GENERATE_FIELDS = field_table(GenerateRequest)
GenerateRequest.FIELDS_UI = GENERATE_FIELDS

# ---- the shared denoise run ------------------------------------------------------------------------
def _components(b, scheduler) -> dict:
    return {"vae": b.vae, "text_encoder": b.text_encoder, "tokenizer": b.tokenizer, "unet": b.unet, "scheduler": scheduler,
                "safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}


def _pipeline(b, kind: str, controlnets=None):
    """A diffusers pipeline around the loaded components (cheap: nothing is copied)."""
    import diffusers
    from diffusers import DDIMScheduler

    cls = getattr(diffusers, kind)
    comps = _components(b, DDIMScheduler.from_config(b.scheduler.config))  # fresh: the shared one is never mutated
    if controlnets is not None:
        comps["controlnet"] = controlnets[0] if len(controlnets) == 1 else list(controlnets)
    pipe = cls(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Recorder:
    """Keeps the latent trajectory (start latent, then one latent per step) and reports progress/cancel."""

    def __init__(self, run, unet, batch: int, n_steps: int, what: str):
        self.run, self.batch, self.n, self.what = run, batch, n_steps, what
        self.latents: list[torch.Tensor] = []
        self._hook = unet.register_forward_pre_hook(self._first_input, with_kwargs=True)

    def _first_input(self, module, args, kwargs):
        if not self.latents:  # the latent the loop starts from (CFG doubles the batch: take the first half)
            x = args[0] if args else kwargs["sample"]
            self.latents.append(x[: self.batch].detach().float().clone())  # kept on the device: no sync per step

    def __call__(self, pipe, i, t, kw):
        self.latents.append(kw["latents"].detach().float().clone())
        self.run.report((i + 1) / self.n, f"{self.what} step {i + 1}/{self.n}")
        return kw

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
              "prompt_embeds": b.encode_prompt(req.prompt),
              "negative_prompt_embeds": b.encode_prompt(req.negative_prompt), "output_type": "latent"}
    if req.scribble_controlnet:
        cn = models_adapters.controlnet(b, req.scribble_controlnet, ctx.options.allow_pickle)
        run.count_module(cn, "controlnet")
        pipe = _pipeline(b, "StableDiffusionControlNetImg2ImgPipeline", [cn])
        kwargs.update(control_image=req.strokes.resize(work.size, Image.NEAREST),
                      controlnet_conditioning_scale=req.scribble_scale)
    else:
        pipe = _pipeline(b, "StableDiffusionImg2ImgPipeline")
    rec = _Recorder(run, b.unet, req.batch, n_run, "SDEdit")
    try:
        with run.step("sketch"), torch.no_grad():
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
              "prompt_embeds": b.encode_prompt(req.prompt),
              "negative_prompt_embeds": b.encode_prompt(req.negative_prompt), "output_type": "latent"}
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

    rec = _Recorder(run, b.unet, req.batch, req.n_inference_steps, "generate")
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
    img = lambda k: decode_image(recipe[f"{k}_png"])
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
