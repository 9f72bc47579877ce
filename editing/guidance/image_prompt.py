"""DiffEditor's image prompt: the pictures through an IP-Adapter (models/adapters.py), on only at its steps."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from PIL import Image

from editing.requests import GuidedParams
from models.errors import EditError


@dataclass
class ImagePrompt:
    """An installed IP-Adapter (models/adapters.py) with the edit's image embeddings; inert when ``handle`` is None."""

    handle: object | None
    embeds: torch.Tensor | None  # (1, n_images, D)
    scale: float

    def switch(self, active: bool) -> None:
        if self.handle is not None:
            self.handle.set_scale(self.scale if active else 0.0)

    def kwargs(self, batch: int, cfg: bool = False) -> dict:
        """UNet kwargs for a batch: with CFG the unconditional half gets zero image embeddings."""
        if self.handle is None:
            return {}
        if cfg:
            e = self.embeds.expand(batch // 2, -1, -1)
            return {"added_cond_kwargs": {"image_embeds": [torch.cat([torch.zeros_like(e), e])]}}
        return {"added_cond_kwargs": self.handle.added_cond_kwargs(self.embeds, batch)}


@contextlib.contextmanager
def open_image_prompt(ctx, req: GuidedParams, images: list[Image.Image], notices: list[str]):
    """DiffEditor's image prompt: the pictures (base, and the reference for appearance/paste) through an
    IP-Adapter. Yields an ``ImagePrompt``, or None when not asked for or not available (with a notice)."""
    if req.method != "diffeditor" or not req.ip_adapter or req.ip_scale <= 0:
        yield None
        return
    from models.adapters import ip_adapter

    try:
        cm = ip_adapter(ctx.bundle, req.ip_adapter, allow_pickle=ctx.options.allow_pickle, scale=0.0)
        handle = cm.__enter__()
    except EditError as e:
        notices.append(f"Image prompt skipped (the edit ran without it): {e}")
        yield None
        return
    try:
        square = [im.resize((256, 256), Image.LANCZOS) for im in images]  # the published 256² image prompt
        yield ImagePrompt(handle, handle.embed(square), req.ip_scale)
    finally:
        cm.__exit__(None, None, None)


