"""One-click object masks: clicks on a picture -> an H×W bool mask of the object(s) clicked.

    result = mask_from_clicks(image, [Click(120, 80), Click(200, 90, "add-part"), Click(150, 60, "remove")])
    result.mask        # H×W bool, True = the object (the mask convention of every request)
    result.segmenter   # "classical" or "sam:<model>"; result.notice says it in one line for the UI

Clicks come in three modes, what the UI's plain, shift and alt clicks send:

- ``add``: a new object; its mask is united with what earlier clicks selected;
- ``add-part``: one more positive point for the current object (a SAM model sees both points in one prompt, so a
  shirt clicked and its sleeve clicked become one object; the classical segmenter unites the two regions);
- ``remove``: a negative point for the current object (the part under it is taken out).

A segmenter (``Segmenter``) answers one object at a time from its positive and negative points: the classical one
(``editing.segment.classical``, OpenCV, no weights, always available) or a SAM-family model through transformers
(``editing.segment.sam``); ``load_segmenter`` picks one from a ``--segmenter`` spec.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from editing.segment.clicks import (
    CLICK_MODES,
    Click,
    ClickGroup,
    Point,
    Segmenter,
    SegmentResult,
    group_clicks,
    parse_click,
)
from models.errors import EditError

__all__ = ["CLICK_MODES", "Click", "ClickGroup", "Point", "SegmentResult", "Segmenter", "group_clicks", "parse_click",
           "mask_from_clicks", "load_segmenter"]
log = logging.getLogger(__name__)


def mask_from_clicks(image: Image.Image, clicks: Sequence[Click], segmenter: Segmenter | None = None) -> SegmentResult:
    """The mask of the objects ``clicks`` select in ``image`` (PIL, any mode), by ``segmenter`` (the classical one when
    None): the union of each object's mask (``group_clicks``). ``EditError`` with one line for no clicks, a click
    outside the picture, or a click on the background ("no object found here")."""
    if not clicks:
        raise EditError("no clicks: click on the object to select it.")
    if segmenter is None:
        from editing.segment.classical import ClassicalSegmenter

        segmenter = ClassicalSegmenter()
    rgb = np.asarray(image.convert("RGB"))
    groups = group_clicks(clicks, image.size)
    mask = np.zeros(rgb.shape[:2], bool)
    for g in groups:
        mask |= np.asarray(segmenter.object_mask(rgb, g), bool)
    if not mask.any():
        x, y = groups[-1].positive[0]
        raise EditError(f"no object found here ({x:g}, {y:g}): the remove clicks took out all of it; click again.")
    share = mask.mean()
    notice = (f"mask from {len(clicks)} click{'s' * (len(clicks) > 1)} by the {segmenter.name} segmenter: "
              f"{len(groups)} object{'s' * (len(groups) > 1)}, {share:.0%} of the picture")
    log.info(notice)
    return SegmentResult(mask, segmenter.name, notice)


def load_segmenter(spec: str | None = None, device: str | None = None) -> Segmenter:
    """The segmenter a ``--segmenter`` spec names: ``None`` / ``"classical"`` -> OpenCV (no weights); ``"auto"`` ->
    the default SAM model when its weights are already on this machine, else the classical one; a Hub id or a local
    folder -> that SAM-family model (``EditError`` in one line when it cannot be loaded)."""
    from editing.segment.classical import ClassicalSegmenter

    if spec is None or spec.strip().lower() in ("", "classical"):
        return ClassicalSegmenter()
    from editing.segment import sam  # a submodule: torch and transformers load only for SAM

    if spec.strip().lower() == "auto":
        found = sam.load_cached_default(device)
        return found if found is not None else ClassicalSegmenter()
    return sam.load_sam(spec.strip(), device)
