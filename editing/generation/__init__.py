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
from editing.generation.requests import (
                                         ADAPTER_FIELDS,
                                         CONTROLNET_FIELDS,
                                         GENERATE_FIELDS,
                                         IP_FIELDS,
                                         MAX_BATCH,
                                         MAX_SIDE,
                                         MAX_UNITS,
                                         SKETCH_FIELDS,
                                         AdapterUnit,
                                         ControlNetUnit,
                                         GenerateRequest,
                                         IPAdapterUnit,
                                         SketchRequest,
)
from editing.generation.tasks import (
                                         generate_from_recipe,
                                         output_size,
                                         replace,
                                         run_generate,
                                         run_sketch,
                                         sketch_from_recipe,
)

__all__ = [
    "ADAPTER_FIELDS",
    "AdapterUnit",
    "CONTROLNET_FIELDS",
    "ControlNetUnit",
    "GENERATE_FIELDS",
    "GenerateRequest",
    "IPAdapterUnit",
    "IP_FIELDS",
    "MAX_BATCH",
    "MAX_SIDE",
    "MAX_UNITS",
    "SKETCH_FIELDS",
    "SketchRequest",
    "generate_from_recipe",
    "output_size",
    "replace",
    "run_generate",
    "run_sketch",
    "sketch_from_recipe",
]
