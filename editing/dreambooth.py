"""DreamBooth with LoRA (Ruiz et al. 2023; Hu et al. 2021): teach the model a subject from a few photos.

The pipeline, as ``train_dreambooth_lora`` runs it:

1. pick a rare-token identifier [V] (``pick_identifier``) and build "a [V] [class]" / "a [class]";
2. generate N class-prior images "a [class]" with the frozen model, cached on disk (``class_prior_images``);
3. add a LoRA (W = W0 + BA, B zero-initialised) on the UNet attention projections (and optionally the
   CLIP attention projections);
4. train on instance + prior batches with the prior-preservation loss (``prior_preservation_loss``),
   flip / crop augmentation, fresh VAE sample, noise and uniform t each step; mixed precision and
   gradient checkpointing on the GPU via accelerate (several GPUs with ``accelerate launch -m
   editing.personalize``: the same code, one process per GPU); checkpoints (+ resume), cancel, previews;
5. save diffusers-format LoRA safetensors ``NAME.safetensors`` plus a JSON card ``NAME.json``.

Defaults follow the DreamBooth-LoRA recipe of diffusers' example trainer (rank 8, lr 1e-4 constant,
λ = 1, ~100 class images, 400 steps); ours uses 50 class images by default to keep the first run short.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from editing.images import image_hash, load_image, pil_to_tensor, tensor_to_pil
from editing.inversion import Schedule, add_noise, ddim_step
from editing.requests import EditCancelled, EditError, check_number

log = logging.getLogger(__name__)

ADAPTER = "dreambooth"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention projection of the UNet
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP self-attention projections
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Words (and common abbreviations) of ≤ 3 letters the model already knows: never identifiers.
COMMON_WORDS = frozenset("""
a an the and or but if of to in on at by for with from up out off over as is it its be are was were am do did does
has had have not no yes so than then too very can will just all any few new old one two six ten day way man men boy
girl dog cat car sky sun sea red big top end art who why how what our you your she her him his they them we us me my
mine yet get got let put set see saw say said use run ran sit eat ate own try far few fun god guy hat bag box bed
cup cap toy key map pen pet pig cow ant bee bat owl fox rat egg ice oil tea air arm ear eye leg lip toe hip job kid
mom dad son bus van cab war law tax fan fee fit gas gun hot low mix net pay per pop raw row sad sex tie tip wet win
won via etc usa uk eu un tv pc cd dvd usb ok hi hey oh ah ha lol omg wow bro sir mr mrs ms dr st ave rd co inc ltd
pro con vs ii iii iv vi vii ix xi xl am pm id im ive ill ed al ai ml os ui ux js py go io ep lp mp uh um ya ye yo
jan feb mar apr may jun jul aug sep oct nov dec mon tue wed thu fri sat sun am be do go he me no of on or so to up us
we ace add age ago aid aim ale ape apt arc ark ash ask ate awe axe bad ban bar bay bet bid bin bit bow bun buy cod cog
cot cry cub cue cut dam den dew dig dim dip doc doe dot dry dub due dug dye ebb elf elk elm emu era eve ewe fad fat
fig fin fix flu fly foe fog fur gap gel gem gig gin gum gut hay hem hen hid hit hog hop hub hue hug hum hut ill imp
ink inn ion ivy jam jar jaw jet jog joy jug keg kin kit lab lad lag lap lay led lid lie lit log lot mad mat mob mop mud
mug nag nap nod nor nun nut oak oar oat odd ode opt orb ore owe pad pal pan pat paw pea peg pie pin pit ply pod pot
pub pun pup rag ram rap ray rib rid rig rim rip rob rod rot rub rug rum rut rye sag sap saw sew shy sin sip ski sky
sly sob sod sow soy spa spy sub sum tab tag tan tap tar tin ton tow tub tug urn van vat vet vow wag wax web wig wit
woe wok yak yam yap yaw yen yew zap zen zip zoo
""".split())  # noqa: SIM905 - a word list reads best as text

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
MIN_PHOTOS = 2  # fewer is allowed, with a warning: one photo over-fits pose and background


# ---- identifier and prompts -------------------------------------------------------------------------
def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def suggest_identifiers(tokenizer, n: int = 5, avoid: Sequence[str] = ()) -> list[str]:
    """Rare-token identifiers, rarest first: ≤3 lowercase letters that the tokenizer maps to ONE token,
    not a common word. "Rare" = latest in the BPE merge order (highest id), i.e. least frequent in
    CLIP's training text, so the token carries a weak prior the LoRA can overwrite (DreamBooth §4.1).
    Works for byte-level BPE vocabularies (CLIP's ``xyz</w>`` word tokens) and char-level ones."""
    vocab = tokenizer.get_vocab()
    avoid = {a.lower() for a in avoid}
    cands = []
    for tok, idx in vocab.items():
        word = tok[:-4] if tok.endswith("</w>") else (tok[1:] if tok.startswith("▁") else None)
        if (word and re.fullmatch(r"[a-z]{1,3}", word) and word not in COMMON_WORDS and word not in avoid
                and re.search(r"[bcdfghjklmnpqrstvwxz]", word)):  # a consonant: pronounceable, not a vowel cluster
            cands.append((len(word) >= 2, idx, word))
    cands.sort(reverse=True)  # multi-letter first (more distinctive), then rarest
    out = []
    in_context = _token_count(tokenizer, "a dog") + 1  # one token in a prompt too, not merged with neighbours
    for _, _, word in cands:
        if _token_count(tokenizer, word) == 1 and _token_count(tokenizer, f"a {word} dog") == in_context:
            out.append(word)
            if len(out) >= n:
                break
    return out


def pick_identifier(tokenizer, avoid: Sequence[str] = ()) -> str:
    """The rarest suitable identifier (see ``suggest_identifiers``)."""
    found = suggest_identifiers(tokenizer, 1, avoid)
    if not found:
        raise EditError("This tokenizer has no short single-token word to use as an identifier; type one.")
    return found[0]


def check_identifier(tokenizer, identifier: str, class_noun: str = "") -> tuple[str, list[str]]:
    """Validate a user's identifier -> (identifier, notices). Empty -> the automatic pick."""
    ident = (identifier or "").strip()
    if not ident:
        return pick_identifier(tokenizer, avoid=class_noun.split()), []
    if re.search(r"\s", ident):
        raise EditError(f"The identifier {ident!r} must be one word (no spaces), e.g. {pick_identifier(tokenizer)!r}.")
    if ident.lower() == class_noun.strip().lower():
        raise EditError("The identifier must differ from the class noun: it names *this* subject, the noun its kind.")
    notices = []
    n = _token_count(tokenizer, ident)
    if n != 1:
        notices.append(f"The identifier {ident!r} is {n} tokens; one rare token works best "
                       f"(suggestions: {', '.join(suggest_identifiers(tokenizer, 3))}).")
    if ident.lower() in COMMON_WORDS:
        notices.append(f"{ident!r} is a common word the model already knows, which fights the new subject.")
    return ident, notices


def instance_prompt(identifier: str, class_noun: str) -> str:
    """"a [V] [class]" (DreamBooth's instance prompt)."""
    return f"a {identifier} {class_noun}".strip()


def class_prompt(class_noun: str) -> str:
    """"a [class]" (prompt of the class-prior images)."""
    return f"a {class_noun}".strip()


# ---- the loss ----------------------------------------------------------------------------------------
def prior_preservation_loss(eps_pred_inst: torch.Tensor, eps_inst: torch.Tensor, eps_pred_prior: torch.Tensor | None,
                            eps_prior: torch.Tensor | None, weight: float = 1.0):
    """L = ‖ε − ε̂(x_inst, c_inst)‖² + λ‖ε′ − ε̂(x_prior, c_class)‖²  (DreamBooth eq. 2, mean squared errors).

    Returns ``(total, instance term, prior term)``; without prior tensors the prior term is 0.
    """
    inst = F.mse_loss(eps_pred_inst.float(), eps_inst.float())
    if eps_pred_prior is None or eps_prior is None or weight == 0:
        prior = inst.new_zeros(())
    else:
        prior = F.mse_loss(eps_pred_prior.float(), eps_prior.float())
    return inst + weight * prior, inst, prior


# ---- photos ---------------------------------------------------------------------------------------------
def _expand(photos) -> list:
    """Folders become their files (sorted); everything else passes through."""
    out = []
    for p in photos if isinstance(photos, (list, tuple)) else [photos]:
        if isinstance(p, (str, Path)) and Path(p).is_dir():
            out.extend(sorted(f for f in Path(p).iterdir() if f.is_file() and not f.name.startswith(".")))
        else:
            out.append(p)
    return out


def load_photos(photos) -> tuple[list[Image.Image], list[str]]:
    """Paths / folders / PIL images -> (RGB images, notices). Unreadable files are skipped and listed."""
    images, skipped = [], []
    for p in _expand(photos):
        if p is None:
            continue
        try:
            images.append(load_image(p))
        except EditError:
            skipped.append(Path(p).name if isinstance(p, (str, Path)) else type(p).__name__)
    notices = []
    if skipped:
        notices.append(f"Skipped {len(skipped)} file(s) that are not readable images: {', '.join(skipped[:10])}"
                       f"{' …' if len(skipped) > 10 else ''}.")
    if not images:
        raise EditError("No photos: add 3–10 photos (PNG, JPEG or WebP) of the subject"
                        + (f" (none of {', '.join(skipped[:5])} is an image)." if skipped else "."))
    if len(images) < MIN_PHOTOS:
        notices.append(f"Only {len(images)} photo: training works, but 3–10 photos of the subject in different "
                       "poses and places teach it far better (one photo over-fits pose and background).")
    sizes = [im.size for im in images]
    aspects = [w / h for w, h in sizes]
    if max(aspects) / min(aspects) > 1.05 or max(max(s) for s in sizes) > 2 * min(min(s) for s in sizes):
        notices.append(f"The photos have different sizes ({', '.join(f'{w}×{h}' for w, h in sizes[:6])}"
                       f"{' …' if len(sizes) > 6 else ''}); each is centre-cropped to a square and resized.")
    return images, notices


def square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, resize to ``size``² (every photo enters training this way)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool, crop: bool, min_scale: float = 0.8) -> torch.Tensor:
    """Random horizontal flip and random crop (scale ≥ ``min_scale`` of the side) resized back. x: (1, 3, H, W)."""
    _, _, h, w = x.shape
    if crop:
        s = float(min_scale + (1 - min_scale) * torch.rand((), generator=gen))
        ch, cw = max(1, round(h * s)), max(1, round(w * s))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        x = F.interpolate(x[:, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False,
                          antialias=True)
    if flip and bool(torch.rand((), generator=gen) < 0.5):
        x = x.flip(-1)
    return x


# ---- the request --------------------------------------------------------------------------------------
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
        noun = " ".join(str(self.class_noun or "").split())
        if not noun:
            raise EditError("Class noun is empty: say what the subject is, in one or two words (e.g. 'dog', "
                            "'teddy bear'). It anchors the identifier and names the prior-preservation images.")
        if len(noun) > 40 or not re.search(r"[A-Za-z0-9]", noun):
            raise EditError(f"Class noun {noun!r} should be one or two plain words such as 'dog' or 'backpack'.")
        object.__setattr__(self, "class_noun", noun)
        object.__setattr__(self, "identifier", str(self.identifier or "").strip())
        object.__setattr__(self, "name", str(self.name or "").strip())
        object.__setattr__(self, "out_dir", str(self.out_dir or ""))
        for name in PERSONALIZE_FIELDS:
            object.__setattr__(self, name, check_number(name, getattr(self, name), PERSONALIZE_FIELDS))
        for name in ("prior_preservation", "train_text_encoder", "flip", "crop", "resume"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.prior_preservation and self.prior_images == 0:
            object.__setattr__(self, "prior_preservation", False)
            notices.append("Prior preservation is on but 0 class images were asked for, so it is off.")
        object.__setattr__(self, "notices", tuple(self.notices) + tuple(notices))

    def params(self) -> dict:
        """The JSON-serialisable part (everything but pixels)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("photos", "notices")}


# ---- sampling (previews and class priors) ---------------------------------------------------------------
@torch.no_grad()
def encode_text(bundle, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP embeddings (B, 77, D), computed now (never the bundle's cache: the text encoder may carry a LoRA)."""
    tok = bundle.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(bundle.device)
    return bundle.text_encoder(ids)[0].to(bundle.dtype)


@torch.no_grad()
def sample(bundle, cond: torch.Tensor, uncond: torch.Tensor, size: int, steps: int, seeds: Sequence[int],
           guidance: float = 7.5, cancel=None) -> list[Image.Image]:
    """DDIM text-to-image with CFG, one image per seed (batched). cond/uncond: (1, 77, D)."""
    unet, vae = bundle.unet, bundle.vae
    f = bundle.vae_scale_factor
    dtype = next(p for n, p in unet.named_parameters() if ".lora_" not in n).dtype
    x = torch.cat([torch.randn((1, unet.config.in_channels, size // f, size // f),
                               generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]).to(bundle.device)
    b = x.shape[0]
    ctx = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)]).to(dtype)
    schedule = Schedule.from_scheduler(bundle.scheduler, steps)
    for t in schedule.timesteps:
        if cancel is not None and cancel.is_set():
            raise EditCancelled("Cancelled.")
        e_u, e_c = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=ctx).sample.float().chunk(2)
        x = ddim_step(x, e_u + guidance * (e_c - e_u), schedule.alpha(t), schedule.alpha(t - schedule.stride))
    imgs = vae.decode((x / vae.config.scaling_factor).to(bundle.dtype)).sample
    return [tensor_to_pil(imgs[i:i + 1]) for i in range(b)]


def prior_dir(root: Path, model_key: str, class_noun: str, size: int, steps: int, seed: int) -> Path:
    """Where the class images of one (model, class, size, steps, seed) live; reused by every later run."""
    tag = hashlib.sha1(json.dumps([model_key, class_noun, size, steps, seed]).encode()).hexdigest()[:10]
    from editing.lora_library import safe_name

    return root / f"{safe_name(class_noun)}-{size}px-{tag}"


def class_prior_images(bundle, class_noun: str, n: int, size: int, root: Path, *, model_key: str, steps: int = 25,
                       seed: int = 0, batch: int = 4, generate: bool = True,
                       progress: Callable[[float, str], None] | None = None, cancel=None) -> tuple[list[Path], int]:
    """The first ``n`` class images "a [class]" from the frozen model, generating only those not on disk.

    Returns ``(paths, how many were generated now)``. ``generate=False`` (non-main processes) only lists.
    """
    folder = prior_dir(root, model_key, class_noun, size, steps, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.png" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing and generate:
        cond, uncond = encode_text(bundle, [class_prompt(class_noun)]), encode_text(bundle, [""])
        done = 0
        for k in range(0, len(missing), batch):
            chunk = missing[k:k + batch]
            for i, img in zip(chunk, sample(bundle, cond, uncond, size, steps, [seed * 100_003 + i for i in chunk],
                                            cancel=cancel)):
                tmp = paths[i].with_suffix(".tmp.png")
                img.save(tmp)
                os.replace(tmp, paths[i])  # never a half-written image in the cache
            done += len(chunk)
            if progress:
                progress(done / len(missing), f"class image {done}/{len(missing)} (“{class_prompt(class_noun)}”)")
    return paths, len(missing) if generate else 0


# ---- checkpoints ------------------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, step: int, fingerprint: str, lora: dict[str, torch.Tensor], opt, losses) -> Path:
    """LoRA weights + AdamW moments in one safetensors file (no pickle), meta in JSON; keeps the newest 2."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"lora.{k}": v.detach().cpu().contiguous() for k, v in lora.items()}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    path = folder / f"step-{step:06d}.safetensors"
    save_file(tensors, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    path.with_suffix(".json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, "losses": losses}))
    for old in sorted(folder.glob("step-*.safetensors"))[:-2]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def _latest_checkpoint(folder: Path, fingerprint: str, max_step: int):
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


def _load_optimizer_state(opt, tensors: dict) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


# ---- the trainer ------------------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    lora_path: Path
    card: dict
    losses: list[float]
    previews: list[tuple[int, Image.Image]]
    notices: list[str]
    resumed_from: int = 0
    priors_generated: int = 0


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


def _lora_config(rank: int, targets: list[str]):
    from peft import LoraConfig

    # B = 0 at start (W = W0 exactly), A Gaussian; alpha = rank -> scale 1 whatever the rank.
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)


def _fingerprint(req: PersonalizeRequest, model_key: str, identifier: str, size: int) -> str:
    keep = {k: v for k, v in req.params().items()
            if k not in ("steps", "resume", "checkpoint_every", "preview_every", "preview_steps", "out_dir", "name")}
    photos = [image_hash(p) for p in req.photos]
    return hashlib.sha1(json.dumps([keep, model_key, identifier, size, photos], sort_keys=True, default=str)
                        .encode()).hexdigest()[:16]


def _accelerator(bundle):
    from accelerate import Accelerator

    mp = "no"
    if bundle.device.type == "cuda":
        mp = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(bundle.dtype, "no")
    return Accelerator(mixed_precision=mp, cpu=bundle.device.type == "cpu")


def train_dreambooth_lora(bundle, req: PersonalizeRequest, *, model_key: str,
                          progress: Callable[[str, float, str], None] | None = None, cancel=None,
                          on_preview: Callable[[int, Image.Image], None] | None = None,
                          unet_calls: Callable[[str], Any] | None = None) -> TrainOutcome:
    """Train a DreamBooth LoRA on ``bundle`` (left exactly as it was afterwards). See the module docstring.

    ``progress(phase, fraction, message)``; ``cancel`` an Event (a checkpoint is saved, then EditCancelled);
    ``unet_calls(phase)`` a context manager attributing time/UNet calls to a phase (``Run.step``).
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import (
        get_peft_model_state_dict,
        inject_adapter_in_model,
        set_peft_model_state_dict,
    )

    from editing import lora_library

    phase = unet_calls or (lambda name: _null())
    report = (lambda ph, f, m="": progress(ph, f, m)) if progress else (lambda ph, f, m="": None)
    unet, te, vae = bundle.unet, bundle.text_encoder, bundle.vae
    if lora_library.active_loras(unet):
        raise EditError("Personal LoRAs are trained on the base model: remove the LoRAs picked for this run.")
    notices = list(req.notices)

    # 1. identifier, prompts, sizes, where things go
    identifier, name, more = names(bundle.tokenizer, req)
    notices += more
    prompt_i, prompt_c = instance_prompt(identifier, req.class_noun), class_prompt(req.class_noun)
    m = bundle.pixel_multiple
    size = max(m, round((req.resolution or bundle.native_resolution) / m) * m)
    out_dir = output_dir(req)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = work_dir(req, name)
    fingerprint = _fingerprint(req, model_key, identifier, size)
    acc = _accelerator(bundle)
    rank_seed = req.seed * 1000 + acc.process_index  # each GPU draws its own photos, noise and t

    # 2. class-prior images (frozen model; main process generates, the others wait and read)
    priors: list[Image.Image] = []
    generated = 0
    if req.prior_preservation:
        with phase("priors"):
            paths, generated = class_prior_images(
                bundle, req.class_noun, req.prior_images, size, out_dir / ".class-priors",
                model_key=model_key, steps=req.prior_steps, seed=req.seed, generate=acc.is_main_process,
                progress=lambda f, msg: report("priors", f, msg), cancel=cancel)
            acc.wait_for_everyone()
            priors = [load_image(p) for p in paths]
        if generated < len(paths):
            notices.append(f"Reused {len(paths) - generated} cached class image(s) for “{prompt_c}”.")

    # 3. pixels in [-1, 1] at the training size
    photos = [pil_to_tensor(square(p, size)) for p in req.photos]  # each (1, 3, S, S)
    prior_px = [pil_to_tensor(square(p, size)) for p in priors]
    with torch.no_grad():
        fixed_i = encode_text(bundle, [prompt_i]).float()
        fixed_c = encode_text(bundle, [prompt_c]).float()
        uncond = encode_text(bundle, [""])
    ids = bundle.tokenizer([prompt_i, prompt_c], padding="max_length", max_length=bundle.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(bundle.device)

    # 4. adapters (seeded init), optimizer, resume
    base_dtype = next(unet.parameters()).dtype
    use_gc = bundle.device.type == "cuda" if req.gradient_checkpointing is None else req.gradient_checkpointing
    previews: list[tuple[int, Image.Image]] = []
    losses: list[float] = []
    start = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(req.seed)
            unet.add_adapter(_lora_config(req.rank, UNET_TARGETS), adapter_name=ADAPTER)
            if req.train_text_encoder:
                inject_adapter_in_model(_lora_config(req.rank, TEXT_TARGETS), te, adapter_name=ADAPTER)
        lora_library.set_active(unet, [(ADAPTER, 1.0)])
        models = [unet] + ([te] if req.train_text_encoder else [])
        if req.train_text_encoder:
            lora_library.set_active(te, [(ADAPTER, 1.0)])
        params = []
        for mod in models:
            for n, p in mod.named_parameters():
                if f".{ADAPTER}." in n:
                    p.data = p.data.float()  # train the adapter in fp32 even when the frozen model is fp16
                    p.requires_grad_(True)
                    params.append(p)
        opt = torch.optim.AdamW(params, lr=req.lr, betas=(0.9, 0.999), weight_decay=1e-2)

        def lora_state() -> dict[str, torch.Tensor]:
            sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
            if req.train_text_encoder:
                sd.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te, adapter_name=ADAPTER).items()})
            return sd

        if req.resume:
            found = _latest_checkpoint(work, fingerprint, req.steps)
            if found:
                start, tensors, losses = found
                lora = {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")}
                set_peft_model_state_dict(unet, {k[5:]: v for k, v in lora.items() if k.startswith("unet.")}, ADAPTER)
                if req.train_text_encoder:
                    set_peft_model_state_dict(te, {k[13:]: v for k, v in lora.items() if k.startswith("text_encoder.")},
                                              ADAPTER)
                for p in params:
                    p.data = p.data.float()
                _load_optimizer_state(opt, tensors)
                notices.append(f"Resumed from the checkpoint at step {start}.")
        opt = acc.prepare(opt)  # GradScaler for fp16 on the GPU; a plain optimizer elsewhere
        # One process: the shared model is used as is. Several: each process owns its model; DDP averages grads.
        fwd_unet = acc.prepare(unet) if acc.num_processes > 1 else unet
        fwd_te = (acc.prepare(te) if acc.num_processes > 1 else te) if req.train_text_encoder else None
        if use_gc:
            unet.enable_gradient_checkpointing()
            if req.train_text_encoder:
                te.gradient_checkpointing_enable()
        a_table = bundle.scheduler.alphas_cumprod.to(bundle.device)
        s = vae.config.scaling_factor

        def preview(step: int):
            if not acc.is_main_process:
                return
            unet.eval()
            cond = encode_text(bundle, [prompt_i])
            img = sample(bundle, cond, uncond, size, req.preview_steps, [req.seed], cancel=None)[0]
            previews.append((step, img))
            (work / "previews").mkdir(parents=True, exist_ok=True)
            img.save(work / "previews" / f"step-{step:06d}.png")
            if on_preview:
                on_preview(step, img)
            unet.train()

        # 5. the loop
        t0 = time.perf_counter()
        with phase("train"):
            for m_ in models:
                m_.train()
            for step in range(start, req.steps):
                if cancel is not None and cancel.is_set():
                    if acc.is_main_process and step > start:
                        _save_checkpoint(work, step, fingerprint, lora_state(), opt, losses)
                    raise EditCancelled(
                        f"Cancelled at step {step}/{req.steps}."
                        + (" A checkpoint was saved: train again with the same settings to resume." if step > start else ""))
                gen = torch.Generator("cpu").manual_seed(hash((rank_seed, step)) & 0x7FFF_FFFF)
                pix = [augment(photos[int(torch.randint(len(photos), (), generator=gen))], gen, req.flip, req.crop)
                       for _ in range(req.batch)]
                if priors:
                    pix += [augment(prior_px[int(torch.randint(len(prior_px), (), generator=gen))], gen, req.flip, False)
                            for _ in range(req.batch)]
                x = torch.cat(pix).to(bundle.device, bundle.dtype)  # (B or 2B, 3, S, S)
                with torch.no_grad():
                    dist = vae.encode(x).latent_dist
                    z0 = (dist.mean.float() + dist.std.float() * torch.randn(dist.mean.shape, generator=gen)
                          .to(bundle.device)) * s
                noise = torch.randn(z0.shape, generator=gen).to(bundle.device)
                t = torch.randint(0, len(a_table), (z0.shape[0],), generator=gen).to(bundle.device)
                zt = add_noise(z0, noise, a_table[t].view(-1, 1, 1, 1).float())
                with acc.autocast():
                    if fwd_te is not None:
                        emb = fwd_te(ids)[0]
                        cond_i, cond_c = emb[0:1], emb[1:2]
                    else:
                        cond_i, cond_c = fixed_i, fixed_c
                    cond = torch.cat([cond_i.expand(req.batch, -1, -1)]
                                     + ([cond_c.expand(req.batch, -1, -1)] if priors else []))
                    pred = fwd_unet(zt.to(base_dtype), t, encoder_hidden_states=cond.to(base_dtype)).sample
                p_i, p_c = (pred[:req.batch], pred[req.batch:]) if priors else (pred, None)
                n_i, n_c = (noise[:req.batch], noise[req.batch:]) if priors else (noise, None)
                loss, l_i, l_c = prior_preservation_loss(p_i, n_i, p_c, n_c, req.prior_weight)
                l_i, l_c = l_i.detach(), l_c.detach()
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                done = step + 1
                if cancel is not None and cancel.is_set() and done < req.steps:
                    continue  # the top of the loop saves a checkpoint, then stops
                rate = (time.perf_counter() - t0) / max(1, done - start)
                report("train", done / req.steps, f"step {done}/{req.steps}, loss {losses[-1]:.4f} "
                       f"(subject {l_i.item():.4f}, prior {l_c.item():.4f}), {rate:.2f} s/step")
                if not math.isfinite(losses[-1]):
                    raise EditError(f"Training diverged at step {done} (loss {losses[-1]}): lower the learning rate.")
                if req.checkpoint_every and done % req.checkpoint_every == 0 and done < req.steps and acc.is_main_process:
                    _save_checkpoint(work, done, fingerprint, lora_state(), opt, losses)
                if req.preview_every and done % req.preview_every == 0 and done < req.steps:
                    with torch.no_grad():
                        preview(done)
        acc.wait_for_everyone()

        # 6. final preview, save LoRA + card (main process)
        with phase("save"), torch.no_grad():
            preview(req.steps)
            path = out_dir / f"{name}.safetensors"
            card = {
                "name": name, "identifier": identifier, "class_noun": req.class_noun, "instance_prompt": prompt_i,
                "class_prompt": prompt_c, "base_model": model_key, "steps": req.steps, "rank": req.rank,
                "lr": req.lr, "prior_preservation": req.prior_preservation, "prior_images": len(priors),
                "prior_weight": req.prior_weight, "train_text_encoder": req.train_text_encoder, "resolution": size,
                "photos": len(req.photos), "final_loss": float(np.mean(losses[-10:])) if losses else None,
                "cross_attention_dim": int(unet.config.cross_attention_dim), "processes": acc.num_processes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if acc.is_main_process:
                sd = lora_state()
                unet_sd = convert_state_dict_to_diffusers({k[5:]: v.detach().float().cpu() for k, v in sd.items()
                                                           if k.startswith("unet.")})
                te_raw = {k[13:]: v.detach().float().cpu() for k, v in sd.items() if k.startswith("text_encoder.")}
                te_sd = convert_state_dict_to_diffusers(te_raw) if te_raw else None
                cfg_u = _lora_config(req.rank, UNET_TARGETS).to_dict()
                StableDiffusionLoraLoaderMixin.save_lora_weights(
                    str(out_dir), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                    weight_name=path.name, unet_lora_adapter_metadata=cfg_u,
                    text_encoder_lora_adapter_metadata=_lora_config(req.rank, TEXT_TARGETS).to_dict() if te_sd else None)
                path.with_suffix(".json").write_text(json.dumps(card, indent=1))
                _save_checkpoint(work, req.steps, fingerprint, sd, opt, losses)  # "train longer" resumes here
        acc.wait_for_everyone()
        return TrainOutcome(path, card, losses, previews, notices, start, generated)
    finally:
        if use_gc:
            unet.disable_gradient_checkpointing()
            if req.train_text_encoder:
                te.gradient_checkpointing_disable()
        for model in (unet, te):  # whatever was added, also when adding failed half-way
            if ADAPTER in (getattr(model, "peft_config", None) or {}):
                lora_library.delete_adapter(model, ADAPTER)
        lora_library.set_active(unet, lora_library.active_loras(unet))
        if req.train_text_encoder:
            lora_library.clear_prompt_cache(bundle)
        for mod in (unet, te):
            mod.eval()
            mod.requires_grad_(False)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- the task ------------------------------------------------------------------------------------------
def run_personalize(editor, req: PersonalizeRequest, run):
    """Registered task: train, then return the last preview as the image and the LoRA facts in ``extra``."""
    from editing.runtime import EditResult, encode_image

    b = editor.bundle
    out = train_dreambooth_lora(b, req, model_key=editor.model_spec, progress=lambda ph, f, m="": run.report(f, m),
                                cancel=run.cancel, unet_calls=run.step)
    params = req.params()
    size = out.card["resolution"]  # the photos as training saw them (square, training size): a small recipe
    recipe = editor.recipe("personalize", params, extra={"photos_png": [encode_image(square(p, size)) for p in req.photos],
                                                          "lora": str(out.lora_path), "card": out.card,
                                                          "steps_run": req.steps - out.resumed_from})
    image = out.previews[-1][1] if out.previews else Image.new("RGB", (64, 64))
    return EditResult(image, recipe, run.timings, run.nfe, out.notices, [],
                      images=[img for _, img in out.previews],
                      extra={"lora_path": str(out.lora_path), "lora_name": out.lora_path.stem, "card": out.card,
                             "losses": out.losses, "preview_steps": [s for s, _ in out.previews],
                             "resumed_from": out.resumed_from, "priors_generated": out.priors_generated})


def personalize_from_recipe(recipe: dict) -> PersonalizeRequest:
    from editing.runtime import decode_image

    known = {f.name for f in dataclasses.fields(PersonalizeRequest)} - {"photos", "notices"}
    params = {k: v for k, v in recipe["params"].items() if k in known}
    return PersonalizeRequest(tuple(decode_image(s) for s in recipe["photos_png"]), **params)


def _register():
    from editing.runtime import Task, register

    register(Task("personalize", PersonalizeRequest, run=run_personalize, from_recipe=personalize_from_recipe))


_register()
