"""Attention control through diffusers processors (installed and restored, never a forked file)."""
from __future__ import annotations

import contextlib


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
