"""The drag methods: one module each, one table (``methods.METHODS``) that the UI, CLI, API and benchmarks read.

- ``dragdiffusion``: DragDiffusion (identity LoRA, latent optimisation) with GoodDrag's options; ``reference``: its
  reference branch, denoised once and kept;
- ``instant``: FastDrag (one latent warp, ``warp``); ``region``: RegionDrag (region copy); ``inpaint``: Inpaint4Drag
  (a pixel warp, then an inpainting model fills what it uncovered);
- ``guided``: DiffEditor / DragonDiffusion (gradient guidance, on editing/guidance/'s sampler);
- ``common``: points and their one check, latent cells of a pixel region, pasting the original outside the edit.

Importing the package registers every method's task (``editing.runtime.TASKS``).
"""
from editing.drag.common import MAX_POINT_PAIRS, Point, PointPair, check_drag, pair_points, parse_points
from editing.drag.dragdiffusion import DRAG_FIELDS, GOODDRAG, LORA_FIELDS, DragRequest, IdentityLoraRequest
from editing.drag.guided import GuidedDragRequest
from editing.drag.inpaint import INPAINT_FIELDS, InpaintDragRequest
from editing.drag.instant import INSTANT_FIELDS, InstantDragRequest
from editing.drag.methods import API_DEFAULT_METHOD, DEFAULT_METHOD, METHODS, DragMethod, lookup
from editing.drag.region import REGION_FIELDS, RegionDragRequest

__all__ = ["API_DEFAULT_METHOD", "DEFAULT_METHOD", "DRAG_FIELDS", "GOODDRAG", "INSTANT_FIELDS", "MAX_POINT_PAIRS",
           "METHODS", "REGION_FIELDS", "DragMethod", "DragRequest", "GuidedDragRequest", "IdentityLoraRequest", "INPAINT_FIELDS",
           "InpaintDragRequest",
           "InstantDragRequest", "LORA_FIELDS", "Point", "PointPair", "RegionDragRequest", "check_drag", "lookup", "pair_points",
           "parse_points"]
