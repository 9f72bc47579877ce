"""The Editor: routes typed requests to method modules, owns the per-image caches, reports progress.

One Editor per process; the model bundle is loaded lazily on first use and shared. GPU work is
serialised with a lock (the UI also runs one queue), and every change to the shared UNet happens
inside a context manager that undoes it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from editing import drag_diffusion
from editing.geometry import (
    grid_to_points,
    points_to_grid,
    resize_image,
    resize_mask,
    scale_point,
    working_size,
)
from editing.images import image_hash, pil_to_tensor, tensor_to_pil
from editing.inversion import Inversion, Schedule, ddim_step, invert, noise_predictor
from editing.lora import lora_adapter, train_identity_lora
from editing.requests import DragRequest, EditError
from editing.runtime import (
    RECIPE_VERSION,
    TASKS,
    EditResult,
    Progress,
    Run,
    Task,
    decode_image,
    decode_mask,
    encode_image,
    encode_mask,
    load_task_modules,
    register,
    task_for,
    versions,
)

log = logging.getLogger(__name__)


@dataclass
class _Generated:
    """What a generation keeps so a drag of its image needs no inversion and no LoRA."""

    inversion: Inversion  # latents[k] on the generation's own trajectory
    prompt: str
    guidance_scale: float
    recipe: dict


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key], True
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value, False


class Editor:
    """Entry point of the engine: ``Editor("tiny").drag(DragRequest(...))``."""

    def __init__(self, model_spec: str = "auto", *, allow_pickle: bool = False, max_side: int = 2048,
                 device: str | None = None, dtype: torch.dtype | None = None, offload: bool = False,
                 resolution: int | None = None, lora_checkpointing: bool = False, bank_on_cpu: bool = False):
        from models.loader import resolve_auto

        self.banner = ""
        if model_spec == "auto":
            model_spec, self.banner = resolve_auto()
        self.model_spec = model_spec
        self.allow_pickle, self.max_side = allow_pickle, int(max_side)
        self.device, self.dtype, self.offload = device, dtype, offload
        self.resolution = resolution  # working long side; default the model's native resolution
        self.lora_checkpointing = lora_checkpointing  # trade identity-LoRA speed for memory
        self.bank_on_cpu = bank_on_cpu  # guided editing: keep the attention memory bank in host memory
        self._task_caches: dict[str, _LRU] = {}
        self._bundle = None
        self._lock = threading.RLock()
        self._latents = _LRU(8)  # (image, size) -> VAE posterior (mean, std)
        self._loras = _LRU(4)  # (image, size, prompt, lora params) -> LoRA state dict (CPU)
        self._inversions = _LRU(4)  # (lora key, strength, steps) -> Inversion
        self._generated = _LRU(8)  # image hash -> _Generated
        self._loras_now: tuple[tuple[str, float], ...] = ()  # LoRAs of the edit in progress (recorded in recipes)
        load_task_modules()

    # ---- model -------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.model_spec

    def load(self, progress: Callable[[str], None] | None = None):
        """Load (once) and return the ModelBundle."""
        from models.loader import load_bundle

        with self._lock:
            if self._bundle is None:
                self._bundle = load_bundle(self.model_spec, allow_pickle=self.allow_pickle, device=self.device,
                                           dtype=self.dtype, offload=self.offload, progress=progress)
            return self._bundle

    def clear_caches(self) -> None:
        """Forget per-image latents, LoRAs, inversions and generations (the model stays loaded)."""
        for c in (self._latents, self._loras, self._inversions, self._generated, *self._task_caches.values()):
            c.clear()

    def cache(self, name: str, size: int = 2) -> _LRU:
        """A per-task LRU cache (e.g. guided inversions + memory banks), cleared by ``clear_caches``."""
        return self._task_caches.setdefault(name, _LRU(size))

    def _working_size(self, size: tuple[int, int]) -> tuple[int, int]:
        b = self._bundle
        return working_size(size, self.resolution or b.native_resolution, b.pixel_multiple)

    # ---- cached stages -----------------------------------------------------------------------
    @torch.no_grad()
    def _posterior(self, img: Image.Image, key) -> tuple[torch.Tensor, torch.Tensor]:
        def make():
            b = self._bundle
            x = pil_to_tensor(img).to(b.device, b.dtype)
            dist = b.vae.encode(x).latent_dist
            s = b.vae.config.scaling_factor
            return dist.mean.float() * s, dist.std.float() * s

        return self._latents.get_or(key, make)[0]

    def _identity_lora(self, run: Run, img, img_key, prompt, steps, rank, lr, seed):
        if steps <= 0:
            return None, None
        key = (img_key, prompt, steps, rank, lr, seed, self.lora_key())

        def make():
            b = self._bundle
            with run.step("lora"):
                return train_identity_lora(
                    b.unet, self._posterior(img, img_key), b.encode_prompt(prompt), b.scheduler.alphas_cumprod,
                    steps=steps, rank=rank, lr=lr, seed=seed, cancel=run.cancel,
                    grad_checkpointing=self.lora_checkpointing,
                    progress=lambda f, loss: run.report(f, f"LoRA step {round(f * steps)}/{steps}, loss {loss:.4f}"),
                )

        state, _ = self._loras.get_or(key, make)
        return state, key

    def train_identity_lora(self, image, prompt: str = "", steps: int = 80, rank: int = 16, lr: float = 5e-4,
                            seed: int = 42, progress: Progress | None = None, cancel=None, loras=()) -> None:
        """Train (or find cached) the identity LoRA a later drag of ``image`` will use; ``loras`` as in ``edit``
        (the identity LoRA is trained on top of them, as the drag will)."""
        req = DragRequest(image, (((0, 0), (1, 1)),), prompt=prompt, lora_steps=steps, lora_rank=rank, lora_lr=lr, seed=seed)
        with self._lock:
            self.load()
            img, _, _ = self._prepare(req)
            run = Run(self._bundle.unet, progress, cancel)
            try:
                with self._active_loras(loras):
                    self._identity_lora(run, img, (image_hash(img), img.size), prompt, steps, rank, lr, seed)
            finally:
                run.close()

    # ---- helpers for task modules ------------------------------------------------------------------
    @property
    def bundle(self):
        """The loaded ModelBundle (task code runs after ``load``)."""
        return self._bundle

    def fit(self, image: Image.Image, mask=None, points=()):
        """Limit the size to ``max_side``, then resize to the working resolution.

        Returns ``(work_image, (image, mask, points), notices)``: the working-size image for the model,
        and the (possibly downscaled) image, mask and points that results are reported against.
        """
        notices = []
        if max(image.size) > self.max_side:
            s = self.max_side / max(image.size)
            new = (max(8, round(image.width * s)), max(8, round(image.height * s)))
            notices.append(f"The image was {image.width}×{image.height}; it was downscaled to {new[0]}×{new[1]} "
                           f"(limit {self.max_side} px).")
            points = tuple(tuple(scale_point(p, image.size, new) for p in pair) for pair in points)
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask).resize(new, Image.NEAREST))
            image = image.resize(new, Image.LANCZOS)
        work = self._working_size(image.size)
        return resize_image(image, work), (image, mask, points), notices

    def posterior(self, work_img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached VAE posterior (mean, std), already × scaling_factor, of a working-size image."""
        return self._posterior(work_img, (image_hash(work_img), work_img.size))

    def remember_generation(self, image: Image.Image, trajectory: list[torch.Tensor], schedule: Schedule,
                            prompt: str, guidance_scale: float, recipe: dict, start: int = 0) -> None:
        """Keep a generated image's DDIM trajectory (its first latent, at ``schedule.timesteps[start]``, first …
        z_0 last) so drags of it skip inversion and LoRA. SDEdit trajectories start below z_T (``start`` > 0)
        and serve drags whose inversion strength they cover."""
        inv = Inversion([z.detach().cpu() for z in reversed(trajectory)], schedule, start)
        self._generated[image_hash(image)] = _Generated(inv, prompt, guidance_scale, recipe)
        while len(self._generated) > self._generated.size:
            self._generated.popitem(last=False)

    def generation_of(self, image: Image.Image) -> _Generated | None:
        """What ``remember_generation`` kept for this exact image, if anything."""
        return None if image is None else self._generated.get(image_hash(image.convert("RGB")))

    def recipe(self, task: str, params: dict, images: dict | None = None, masks: dict | None = None,
               extra: dict | None = None) -> dict:
        """A JSON recipe: task, model, params, and the pictures it needs (base64 PNG) to replay."""
        r = {"task": task, "recipe_version": RECIPE_VERSION, "model": self.model_spec, "resolution": self.resolution,
             "params": params, "versions": versions(), "loras": [list(x) for x in self._loras_now]}
        for k, img in (images or {}).items():
            if img is not None:
                r[f"{k}_png"] = encode_image(img)
        for k, m in (masks or {}).items():
            if m is not None:
                r[f"{k}_png"] = encode_mask(m)
        r.update({k: v for k, v in (extra or {}).items() if v is not None})
        return r

    # ---- any task ----------------------------------------------------------------------------------
    def edit(self, request, progress: Progress | None = None, cancel=None, loras=()) -> EditResult:
        """Run any registered task's request (drag, move, sketch, …). ``loras``: ((path or name, weight), …)
        LoRAs active for this edit (the identity LoRA of a drag stacks on top)."""
        task = task_for(request)
        with self._lock:
            b = self.load(progress=(lambda m: progress("load", 0.0, m)) if progress else None)
            run = Run(b.unet, progress, cancel)
            try:
                with self._active_loras(loras):
                    return task.run(self, request, run)
            finally:
                run.close()

    def lora_key(self) -> tuple:
        """Identity of the LoRAs active in this edit, for per-image caches computed under them."""
        if not self._loras_now:
            return ()
        from editing.lora_library import cache_key

        return cache_key(self._loras_now, self.allow_pickle)

    @contextlib.contextmanager
    def _active_loras(self, loras):
        """((path or name, weight), …) active on the UNet (and in ``lora_key``) for the ``with`` block."""
        self._loras_now = tuple((str(p), float(w)) for p, w in (loras or ()))
        try:
            if not self._loras_now:
                yield
                return
            from editing.lora_library import activate  # issue 6: the LoRA library

            with activate(self._bundle, self._loras_now, allow_pickle=self.allow_pickle):
                yield
        finally:
            self._loras_now = ()

    # ---- drag --------------------------------------------------------------------------------
    def _prepare(self, req: DragRequest):
        work, (image, mask, points), notices = self.fit(req.image, req.mask, req.points)
        return work, (image, mask, points), list(req.notices) + notices

    def drag(self, request: DragRequest, progress: Progress | None = None, cancel=None, loras=()) -> EditResult:
        """DragDiffusion edit: (identity LoRA) → DDIM inversion → latent optimisation → denoise."""
        if not isinstance(request, DragRequest):
            raise EditError("drag() takes a DragRequest.")
        return self.edit(request, progress, cancel, loras)

    def _drag(self, req: DragRequest, run: Run) -> EditResult:
        b = self._bundle
        work_img, (image, mask, points), notices = self._prepare(req)
        img_key = (image_hash(work_img), work_img.size)
        gen = self._generated.get(image_hash(req.image))
        if gen is not None and len(gen.inversion.schedule.timesteps) != req.n_inference_steps:
            notices.append("This image was generated with another step count, so it is inverted like a photo.")
            gen = None
        schedule = Schedule.from_scheduler(b.scheduler, req.n_inference_steps)
        start = schedule.start_index(req.inversion_strength)
        if gen is not None and start < gen.inversion.start:
            notices.append("This image's generation started below the drag's inversion strength, so it is inverted "
                           "like a photo (lower the inversion strength to reuse its latents).")
            gen = None
        prompt = req.prompt or (gen.prompt if gen else "")
        guidance = gen.guidance_scale if gen is not None and req.guidance_scale == 1.0 else req.guidance_scale
        cond = b.encode_prompt(prompt)
        t = schedule.timesteps[start]

        lora_state, lora_key = None, None
        if gen is None:
            lora_state, lora_key = self._identity_lora(run, work_img, img_key, prompt, req.lora_steps, req.lora_rank,
                                                       req.lora_lr, req.seed)
        with lora_adapter(b.unet, lora_state, req.lora_rank):
            if gen is not None:
                z_t = gen.inversion.latents[len(schedule.timesteps) - start]
            else:
                with run.step("encode"):
                    z0 = self._posterior(work_img, img_key)[0]

                def make_inv():
                    with run.step("inversion"):
                        return invert(b.unet, z0, cond, schedule, start, progress=run.report, cancel=run.cancel)

                inv, _ = self._inversions.get_or((img_key, prompt, lora_key, self.lora_key(), req.inversion_strength,
                                                  req.n_inference_steps), make_inv)
                z_t = inv.z_t
            z_t = z_t.to(b.device)
            lat_hw = z_t.shape[-2:]
            grid_hw = drag_diffusion.supervision_grid(tuple(lat_hw))
            pts_h = points_to_grid([h for h, _ in points], image.size, grid_hw)
            pts_t = points_to_grid([g for _, g in points], image.size, grid_hw)
            keep = None
            if mask is not None:
                keep = (1.0 - resize_mask(mask, tuple(lat_hw))).to(b.device)
            with run.step("drag"):
                out = drag_diffusion.optimize_latent(
                    b.unet, z_t, t, cond, schedule, pts_h, pts_t, grid_hw, keep=keep, lr=req.latent_lr,
                    max_steps=req.max_steps, r_m=req.r_m, r_p=req.r_p, lam=req.lam,
                    progress=lambda f, m: run.report(f, m), cancel=run.cancel,
                )
            if not out.arrived:
                notices.append(f"Stopped after {out.steps} steps before every handle reached its target; "
                               "raise 'max steps' or run again from this result.")
            with run.step("denoise"):
                z0_edit = drag_diffusion.denoise_with_reference(
                    b.unet, z_t, out.latent, cond, schedule, start, uncond=b.encode_prompt(""),
                    guidance_scale=guidance, progress=run.report, cancel=run.cancel,
                )
        with run.step("decode"), torch.no_grad():
            x = b.vae.decode((z0_edit / b.vae.config.scaling_factor).to(b.dtype)).sample
            result = tensor_to_pil(x).resize(image.size, Image.LANCZOS)
        final = grid_to_points(out.handles, grid_hw, image.size)
        recipe = self._drag_recipe(req, extra={"steps_run": out.steps, "arrived": out.arrived,
                                                  "generated": gen.recipe if gen else None})
        return EditResult(result, recipe, run.timings, run.nfe, notices, final)

    # ---- generation (drag-ready) --------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str, seed: int = 42, size: tuple[int, int] | None = None, guidance_scale: float = 7.5,
                 n_inference_steps: int = 50, progress: Progress | None = None, cancel=None) -> EditResult:
        """Text-to-image with DDIM; keeps its latent trajectory so dragging the result skips inversion and LoRA."""
        if not isinstance(prompt, str):
            raise EditError("The prompt must be text.")
        for name, v, lo, hi in (("guidance_scale", guidance_scale, 1.0, 30.0), ("n_inference_steps", n_inference_steps, 2, 200)):
            if not (isinstance(v, (int, float)) and np.isfinite(v) and lo <= v <= hi):
                raise EditError(f"{name}={v} is outside [{lo}, {hi}].")
        with self._lock:
            b = self.load(progress=(lambda m: progress("load", 0.0, m)) if progress else None)
            run = Run(b.unet, progress, cancel)
            try:
                native = self.resolution or b.native_resolution
                m = b.pixel_multiple
                w, h = size or (native, native)
                if not (isinstance(w, int) and isinstance(h, int) and m <= w <= 4096 and m <= h <= 4096):
                    raise EditError(f"Image size {w}×{h} must be whole numbers between {m} and 4096.")
                w, h = max(m, round(w / m) * m), max(m, round(h / m) * m)  # the UNet needs multiples of m
                schedule = Schedule.from_scheduler(b.scheduler, int(n_inference_steps))
                cond, uncond = b.encode_prompt(prompt), b.encode_prompt("")
                gen = torch.Generator("cpu").manual_seed(int(seed))
                f = b.vae_scale_factor
                x = torch.randn((1, b.unet.config.in_channels, h // f, w // f), generator=gen).to(b.device)
                traj = [x]
                with run.step("generate"):
                    eps_fn = noise_predictor(b.unet, torch.cat([uncond, cond]), (2, *x.shape[1:]), b.device)
                    for i, t in enumerate(schedule.timesteps):
                        run.report(i / len(schedule.timesteps))
                        e_u, e_c = eps_fn(torch.cat([x, x]), t).chunk(2)
                        x = ddim_step(x, e_u + guidance_scale * (e_c - e_u), schedule.alpha(t), schedule.alpha(t - schedule.stride))
                        traj.append(x)
                with run.step("decode"):
                    img = tensor_to_pil(b.vae.decode((x / b.vae.config.scaling_factor).to(b.dtype)).sample)
                recipe = {"task": "generate", "prompt": prompt, "seed": int(seed), "size": [w, h],
                          "guidance_scale": guidance_scale, "n_inference_steps": int(n_inference_steps),
                          "model": self.model_spec, "versions": versions(), "recipe_version": RECIPE_VERSION}
                self.remember_generation(img, traj, schedule, prompt, guidance_scale, recipe)
                return EditResult(img, recipe, run.timings, run.nfe, [], [])
            finally:
                run.close()

    def is_drag_ready(self, image: Image.Image) -> bool:
        return image is not None and image_hash(image.convert("RGB")) in self._generated

    # ---- recipes -----------------------------------------------------------------------------
    def _drag_recipe(self, req: DragRequest, extra: dict) -> dict:
        params = req.params()
        params["points"] = [[list(h), list(t)] for h, t in req.points]
        return self.recipe("drag", params, images={"image": req.image}, masks={"mask": req.mask}, extra=extra)

    def replay(self, recipe: dict, progress: Progress | None = None, cancel=None) -> EditResult:
        """Re-run a recipe produced by this engine (a generation first, when the drag started from one)."""
        if not isinstance(recipe, dict) or "task" not in recipe:
            raise EditError("This is not a DragCanvas recipe (no 'task' field).")
        if recipe.get("model") not in (None, self.model_spec):
            log.warning("recipe was made with %s; replaying with %s", recipe.get("model"), self.model_spec)
        task = recipe["task"]
        # Editor.generate's own recipe; editing/generation.py's "generate" task writes "params" (a Task).
        if task == "generate" and "params" not in recipe:
            return self.generate(recipe["prompt"], recipe["seed"], tuple(recipe["size"]), recipe["guidance_scale"],
                                 recipe["n_inference_steps"], progress=progress, cancel=cancel)
        if task not in TASKS:
            raise EditError(f"Unknown recipe task {task!r}.")
        if recipe.get("generated"):  # the edit started from an image generated here: make it drag-ready again
            self.replay(recipe["generated"], progress=progress, cancel=cancel)
        try:
            request = TASKS[task].from_recipe(recipe)
        except (KeyError, ValueError, TypeError) as e:
            raise EditError(f"The recipe is incomplete or damaged ({type(e).__name__}: {e}).") from None
        return self.edit(request, progress, cancel, loras=[tuple(x) for x in recipe.get("loras") or ()])


def _drag_from_recipe(recipe: dict) -> DragRequest:
    params = dict(recipe["params"])
    points = tuple((tuple(h), tuple(t)) for h, t in params.pop("points"))
    known = {f.name for f in dataclasses.fields(DragRequest)}
    return DragRequest(decode_image(recipe["image_png"]), points, decode_mask(recipe.get("mask_png")),
                       **{k: v for k, v in params.items() if k in known})


register(Task("drag", DragRequest, run=lambda editor, req, run: editor._drag(req, run), from_recipe=_drag_from_recipe))
