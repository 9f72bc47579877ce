"""Attention control through diffusers processors (installed and restored, never a forked file)."""
from __future__ import annotations

import contextlib

from diffusers.models.attention_processor import AttnProcessor2_0


class MutualSelfAttnProcessor(AttnProcessor2_0):
    """Mutual self-attention (MasaCtrl, used by DragDiffusion): the edited branch reads the original's K/V.

    The batch is laid out in groups of two, ``[original, edited]`` (times CFG branches). Queries stay
    per sample; keys and values of both samples in a group come from the original. Passing the
    original's hidden states as ``encoder_hidden_states`` gives exactly that through the stock
    SDPA processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None and hidden_states.ndim == 3 and hidden_states.shape[0] % 2 == 0:
            b, n, c = hidden_states.shape
            src = hidden_states.view(b // 2, 2, n, c)[:, :1]
            encoder_hidden_states = src.expand(b // 2, 2, n, c).reshape(b, n, c)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def self_attn_names(unet, prefixes: tuple[str, ...]) -> list[str]:
    return [n for n in unet.attn_processors if n.startswith(prefixes) and ".attn1." in n]


@contextlib.contextmanager
def attn_processors(unet, replace: dict):
    """Install processors for the named layers; restore the previous ones on exit (also on error)."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({n: replace.get(n, p) for n, p in saved.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def mutual_self_attention(unet, prefixes=("up_blocks.2", "up_blocks.3")):
    """DragDiffusion's reference-latent control on the decoder's last two stages (layers 10–15 of 16)."""
    proc = MutualSelfAttnProcessor()
    return attn_processors(unet, {n: proc for n in self_attn_names(unet, prefixes)})
