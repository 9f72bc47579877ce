"""The ``personalize`` task: the Editor runs it like every other edit (editing/runtime.py registry)."""
from __future__ import annotations

import dataclasses

from PIL import Image

from editing.dreambooth.photos import square
from editing.dreambooth.request import PersonalizeRequest
from editing.dreambooth.trainer import train_dreambooth_lora
from editing.runtime import EditResult, Task, decode_image, encode_image, register


def run_personalize(ctx, req: PersonalizeRequest) -> EditResult:
    """Registered task: train, then return the last preview as the image and the LoRA facts in ``extra``.

    ``ctx``: the ``EditContext`` (editing/context.py). Progress, cancel, phases and each preview as it is made
    (``Run.preview``) go through ``ctx.run``.
    """
    run = ctx.run
    out = train_dreambooth_lora(ctx.bundle, req, model_key=ctx.options.model_spec, run=run)
    size = out.card["resolution"]  # the photos as training saw them (square, training size): a small recipe
    recipe = ctx.recipe("personalize", req.params(),
                        extra={"photos_png": [encode_image(square(p, size)) for p in req.photos],
                               "lora": str(out.lora_path), "card": out.card, "steps_run": req.steps - out.resumed_from})
    image = out.previews[-1][1] if out.previews else Image.new("RGB", (64, 64))
    return EditResult(image, recipe, run.timings, run.nfe, out.notices, [],
                      images=[img for _, img in out.previews],
                      extra={"lora_path": str(out.lora_path), "lora_name": out.lora_path.stem, "card": out.card,
                             "losses": out.losses, "preview_steps": [s for s, _ in out.previews],
                             "resumed_from": out.resumed_from, "priors_generated": out.priors_generated})


def personalize_from_recipe(recipe: dict) -> PersonalizeRequest:
    """The request a personalize recipe was made from (its photos as training saw them)."""
    known = {f.name for f in dataclasses.fields(PersonalizeRequest)} - {"photos", "notices"}
    params = {k: v for k, v in recipe["params"].items() if k in known}
    return PersonalizeRequest(tuple(decode_image(s) for s in recipe["photos_png"]), **params)


register(Task("personalize", PersonalizeRequest, run=run_personalize, from_recipe=personalize_from_recipe))
