"""The attention memory bank (DragonDiffusion §3.3): decoder self-attention inputs recorded during
inversion, read back while sampling through a small SDPA processor (visual cross-attention).

K = W_k·h and V = W_v·h, so keeping h is the same information as keeping K and V at half the memory;
the stock SDPA processor recomputes K/V from it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from editing.attention import attn_processors, self_attn_names
from editing.geometry import resize_mask
from editing.sampling import Hook, StepState
from models import families


class MemoryBank:
    """Decoder self-attention inputs per (layer, timestep), batch = the inverted images (base[, reference])."""

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


class BankControl:
    """What the bank processors do right now: ``record``, ``off``, or read the bank in ``mode``."""

    def __init__(self, bank: MemoryBank, mode: str = "off", fg: np.ndarray | None = None, bg: np.ndarray | None = None):
        self.bank, self.state, self.mode, self.t = bank, "off", mode, 0
        self._fg, self._bg = fg, bg  # splice: reference-object mask, base-edit mask (working-image pixels)
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.aspect = 1.0  # h / w of the latent
        # remap: (handle cells, target cells) on the latent grid, (M, 2) integer (x, y) each, and its (h, w)
        self.pairs: tuple[np.ndarray, np.ndarray, tuple[int, int]] | None = None
        self._remap: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices (reference object, base background) at a layer with ``n`` tokens."""
        if n not in self._tokens:
            w = round((n / self.aspect) ** 0.5)
            h = n // w
            fg = resize_mask(self._fg, (h, w)).flatten() > 0.5
            bg = resize_mask(self._bg, (h, w)).flatten() < 0.5
            self._tokens[n] = (fg.nonzero().flatten().to(device), bg.nonzero().flatten().to(device))
        return self._tokens[n]

    def remap_tokens(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices (source, destination) at a layer with ``n`` tokens: ``pairs`` mapped onto that layer's
        grid (a latent cell (x, y) lies in token cell (⌊x·w/W⌋, ⌊y·h/H⌋)), one source per destination."""
        if n not in self._remap:
            src, dst, (lh, lw) = self.pairs
            w = round((n / self.aspect) ** 0.5)
            h = n // w
            s = (src[:, 1] * h // lh) * w + src[:, 0] * w // lw
            d = (dst[:, 1] * h // lh) * w + dst[:, 0] * w // lw
            d, first = np.unique(d, return_index=True)
            self._remap[n] = (torch.from_numpy(s[first]).to(device), torch.from_numpy(d).to(device))
        return self._remap[n]

    def context(self, name: str, h: torch.Tensor) -> torch.Tensor | None:
        """The K/V source for a self-attention layer whose queries come from ``h`` (B, N, C)."""
        if self.state == "record":
            self.bank.put(name, self.t, h)
            return None
        if self.state != "read":
            return None
        mem = self.bank.get(name, self.t, h.device).to(h.dtype)
        b = h.shape[0]
        if self.mode == "replace":
            return mem[:1].expand(b, -1, -1)
        if self.mode == "concat":
            return torch.cat([h, mem[:1].expand(b, -1, -1)], dim=1)
        if self.mode == "splice":
            fg, bg = self.tokens(h.shape[1], h.device)
            spliced = torch.cat([mem[:1, bg], mem[1:2, fg]], dim=1)
            return spliced.expand(b, -1, -1)
        if self.mode == "remap":  # replace, with the handle tokens' K/V also at the target tokens (RegionDrag)
            src, dst = self.remap_tokens(h.shape[1], h.device)
            mem = mem[:1].clone()
            mem[:, dst] = mem[:, src]
            return mem.expand(b, -1, -1)
        raise ValueError(self.mode)


class BankAttnProcessor(AttnProcessor2_0):
    """Stock SDPA self-attention whose K/V source may come from the memory bank (see ``BankControl``)."""

    def __init__(self, name: str, control: BankControl):
        super().__init__()
        self.name, self.control = name, control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None and hidden_states.ndim == 3:
            encoder_hidden_states = self.control.context(self.name, hidden_states)
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def bank_layers(unet) -> list[str]:
    """Every decoder self-attention layer (``up_blocks[1..3]`` attn1 in SD-1.5)."""
    return self_attn_names(unet, families.unet_blocks(unet).bank_layers)


@contextlib.contextmanager
def memory_bank_attention(unet, control: BankControl, layers: list[str] | None = None):
    """Install bank processors on the decoder's self-attention (or on ``layers``, self-attention names); the
    previous processors come back on exit."""
    procs = {n: BankAttnProcessor(n, control) for n in (bank_layers(unet) if layers is None else layers)}
    with attn_processors(unet, procs):
        yield


class InjectBank(Hook):
    """Sampling hook: the bank processors read the bank at the step's timestep (in the control's mode) while
    ``active(s)`` holds, and are off otherwise (FastDrag's K/V injection, RegionDrag's K/V paste)."""

    def __init__(self, control: BankControl, active=lambda s: True):
        self.control, self.active = control, active
        self.recorded = control.bank.timesteps  # read once: the bank is complete before sampling starts

    def before_unet(self, s: StepState) -> None:
        self.control.t = s.t
        on = s.stage == "step" and s.t in self.recorded and self.active(s)
        self.control.state = "read" if on else "off"
