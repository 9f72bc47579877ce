"""The attention K/V bank: self-attention inputs recorded on one pass, read back on another.

Every method that keeps an image's identity through attention uses it: DragonDiffusion / DiffEditor (§3.3, the
memory bank read by visual cross-attention), DragDiffusion's reference branch (mutual self-attention, §3.4),
FastDrag's K/V injection and RegionDrag's K/V paste.

K = W_k·h and V = W_v·h, so keeping the layer input h is the same information as keeping K and V at half the
memory; the stock SDPA processor recomputes K/V from whatever it is handed as ``encoder_hidden_states``.

- ``MemoryBank``: the store, h per (layer, timestep).
- A **strategy** decides what a layer attends to, given its input h: ``Record`` (keep h, attend to itself),
  ``Replace`` (the recorded h instead), ``Concat`` (both), ``Splice`` (the reference's object tokens beside the
  base's background tokens) and ``Remap`` (replace, with the handle tokens' h also at the target tokens). It is
  fixed when the ``BankControl`` is made.
- ``BankControl``: the bank, the strategy, and the two things the loop changes per UNet call — the timestep and
  whether the bank is on. Only ``AtStep`` (a sampling hook) changes them, in the loop's hook order.
- ``bank_attention``: installs one ``BankAttnProcessor`` per layer and restores the old processors on exit.
- ``invert_and_record``: DDIM inversion of images that records the bank, cached per image and settings.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from editing.attention import attn_processors, self_attn_names
from editing.geometry import resize_mask
from editing.images import image_hash
from editing.sampling import Hook, Inversion, NoisePredictor, Schedule, StepState, invert
from models import families


class MemoryBank:
    """Self-attention inputs per (layer, timestep); batch = the images of the recording pass."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.store: dict[tuple[str, int], torch.Tensor] = {}

    def put(self, name: str, t: int, h: torch.Tensor) -> None:
        self.store[(name, t)] = h.detach().to(self.device, copy=True)

    def get(self, name: str, t: int, device) -> torch.Tensor:
        return self.store[(name, t)].to(device, non_blocking=True)

    @property
    def layers(self) -> set[str]:
        return {n for n, _ in self.store}

    @property
    def timesteps(self) -> set[int]:
        return {t for _, t in self.store}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.store.values())


def _grid(n: int, aspect: float) -> tuple[int, int]:
    """(h, w) of a layer with ``n`` tokens on a latent of aspect h / w."""
    w = round((n / aspect) ** 0.5)
    return n // w, w


# ---- strategies: (bank, layer, t, h (B, N, C)) -> the K/V source, or None for the layer's own input -------------
class Record:
    """Keep each layer's input in the bank; the layer attends to itself."""

    def __call__(self, bank: MemoryBank, name: str, t: int, h: torch.Tensor) -> None:
        bank.put(name, t, h)
        return None


class Replace:
    """Attend to the recorded input instead: the first recorded image's for the whole batch (FastDrag, the guided
    move), or the recorded batch as it is (``same_batch``: DragDiffusion's reference branch, its CFG halves)."""

    def __init__(self, same_batch: bool = False):
        self.same_batch = same_batch

    def __call__(self, bank: MemoryBank, name: str, t: int, h: torch.Tensor) -> torch.Tensor:
        mem = bank.get(name, t, h.device).to(h.dtype)
        return mem if self.same_batch else mem[:1].expand(h.shape[0], -1, -1)


class Concat:
    """Attend to the current and the recorded tokens (DragonDiffusion's drag)."""

    def __call__(self, bank: MemoryBank, name: str, t: int, h: torch.Tensor) -> torch.Tensor:
        mem = bank.get(name, t, h.device).to(h.dtype)
        return torch.cat([h, mem[:1].expand(h.shape[0], -1, -1)], dim=1)


class Splice:
    """The base image's background tokens beside the reference's object tokens (appearance, paste): the bank holds
    [base, reference]; ``fg`` is the reference object's mask, ``bg`` the base's edit region (working pixels)."""

    def __init__(self, fg: np.ndarray, bg: np.ndarray, aspect: float):
        self.fg, self.bg, self.aspect = fg, bg, aspect
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices (reference object, base background) at a layer with ``n`` tokens."""
        if n not in self._tokens:
            h, w = _grid(n, self.aspect)
            fg = resize_mask(self.fg, (h, w)).flatten() > 0.5
            bg = resize_mask(self.bg, (h, w)).flatten() < 0.5
            self._tokens[n] = (fg.nonzero().flatten().to(device), bg.nonzero().flatten().to(device))
        return self._tokens[n]

    def __call__(self, bank: MemoryBank, name: str, t: int, h: torch.Tensor) -> torch.Tensor:
        mem = bank.get(name, t, h.device).to(h.dtype)
        fg, bg = self.tokens(h.shape[1], h.device)
        return torch.cat([mem[:1, bg], mem[1:2, fg]], dim=1).expand(h.shape[0], -1, -1)


class Remap:
    """Replace, with the handle tokens' recorded input also at the target tokens (RegionDrag). ``pairs`` =
    (handle cells, target cells), (M, 2) integer (x, y) each on a latent grid of ``lat_hw``."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, lat_hw: tuple[int, int]):
        self.src, self.dst, self.lat_hw = src, dst, lat_hw
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices (source, destination) at a layer with ``n`` tokens: a latent cell (x, y) lies in token cell
        (⌊x·w/W⌋, ⌊y·h/H⌋); one source per destination."""
        if n not in self._tokens:
            lh, lw = self.lat_hw
            h, w = _grid(n, lh / lw)
            s = (self.src[:, 1] * h // lh) * w + self.src[:, 0] * w // lw
            d = (self.dst[:, 1] * h // lh) * w + self.dst[:, 0] * w // lw
            d, first = np.unique(d, return_index=True)
            self._tokens[n] = (torch.from_numpy(s[first]).to(device), torch.from_numpy(d).to(device))
        return self._tokens[n]

    def __call__(self, bank: MemoryBank, name: str, t: int, h: torch.Tensor) -> torch.Tensor:
        src, dst = self.tokens(h.shape[1], h.device)
        mem = bank.get(name, t, h.device).to(h.dtype)[:1].clone()
        mem[:, dst] = mem[:, src]
        return mem.expand(h.shape[0], -1, -1)


Strategy = Callable[[MemoryBank, str, int, torch.Tensor], "torch.Tensor | None"]


class BankControl:
    """One bank and one strategy; ``t`` and ``on`` follow the loop (set by ``AtStep`` before each UNet call)."""

    def __init__(self, bank: MemoryBank, strategy: Strategy):
        self.bank, self.strategy = bank, strategy
        self.t, self.on = 0, False

    def context(self, name: str, h: torch.Tensor) -> torch.Tensor | None:
        """The K/V source of a self-attention layer whose queries come from ``h`` (None: its own input)."""
        return self.strategy(self.bank, name, self.t, h) if self.on else None


class BankAttnProcessor(AttnProcessor2_0):
    """Stock SDPA self-attention whose K/V source comes from the bank when the control says so."""

    def __init__(self, name: str, control: BankControl):
        super().__init__()
        self.name, self.control = name, control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None and hidden_states.ndim == 3:
            encoder_hidden_states = self.control.context(self.name, hidden_states)
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def decoder_layers(unet) -> list[str]:
    """Every decoder self-attention layer (``up_blocks[1..3]`` attn1 on SD-1.5): the guided methods' and FastDrag's."""
    return self_attn_names(unet, families.unet_blocks(unet).bank_layers)


def mutual_layers(unet) -> list[str]:
    """DragDiffusion's mutual self-attention layers (``up_blocks[2..3]`` on SD-1.5: its layers 10–15 of 16)."""
    return self_attn_names(unet, families.unet_blocks(unet).mutual_layers)


@contextlib.contextmanager
def bank_attention(unet, control: BankControl, layers: list[str] | None = None):
    """Install bank processors on ``layers`` (self-attention names; default ``decoder_layers``); the previous
    processors come back on exit."""
    procs = {n: BankAttnProcessor(n, control) for n in (decoder_layers(unet) if layers is None else layers)}
    with attn_processors(unet, procs):
        yield


class AtStep(Hook):
    """Before each UNet call: the control's timestep is the step's, and the bank is on where ``when(s)`` holds
    (always, by default: recording an inversion, DragDiffusion's two branches)."""

    def __init__(self, control: BankControl, when: Callable[[StepState], bool] = lambda s: True):
        self.control, self.when = control, when

    def before_unet(self, s: StepState) -> None:
        self.control.t = s.t
        self.control.on = bool(self.when(s))


def while_recorded(control: BankControl, active: Callable[[StepState], bool] = lambda s: True):
    """``AtStep``'s ``when`` for reading a bank recorded by an inversion: on at the sampling steps whose timestep
    the bank holds and where ``active(s)`` (FastDrag: the first ``kv_fraction`` of the steps)."""
    recorded = control.bank.timesteps  # read once: the bank is complete before sampling starts
    return lambda s: s.stage == "step" and s.t in recorded and active(s)


def bank_device(ctx) -> torch.device | str:
    """Where banks live: on the GPU next to the UNet unless the options move them to the CPU."""
    device = ctx.bundle.device
    return device if device.type == "cuda" and not ctx.options.bank_on_cpu else "cpu"


def invert_and_record(ctx, images: list[Image.Image], prompts: list[str], n_steps: int, *, strength: float = 1.0,
                      layers: list[str] | None = None, cache: str) -> Inversion:
    """DDIM inversion of working-size ``images`` (a batch; one prompt each, text only, no CFG) to ``strength`` of an
    ``n_steps`` schedule, recording the inputs of the self-attention ``layers`` (default ``decoder_layers``) at every
    step into ``inv.bank``. Cached in ``ctx.caches.task(cache)`` per images, prompts, schedule, layers and active
    LoRAs, so a second edit of the same picture starts after the inversion."""
    b, run = ctx.bundle, ctx.run
    schedule = Schedule.from_scheduler(b.scheduler, n_steps)
    start = schedule.start_index(strength)
    key = (tuple(image_hash(im) for im in images), images[0].size, tuple(prompts), n_steps, start,
           tuple(layers or ()), ctx.lora_key)

    def make() -> Inversion:
        with run.step("encode"), torch.no_grad():
            z0 = torch.cat([ctx.posterior(im)[0] for im in images]).to(b.device)
        with run.step("inversion"):
            control = BankControl(MemoryBank(bank_device(ctx)), Record())
            with bank_attention(b.unet, control, layers):
                cond = torch.cat([b.encode_prompt(p) for p in prompts])
                predict = NoisePredictor(b.unet, cond, z0.shape[0], device=z0.device, graphs=False)
                inv = invert(predict, z0, schedule, start, hooks=[AtStep(control)], run=run)
            inv.latents = [z.detach() for z in inv.latents]
            inv.bank = control.bank
            return inv

    return ctx.caches.task(cache, 2).get_or(key, make)[0]
