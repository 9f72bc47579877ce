"""Inpainting models as a family variant: a 9-channel UNet loads (built-in, folder, single-file configs), says
"inpainting", is refused by every task that feeds its UNet 4 channels, and ``inpaint_input`` matches what diffusers'
own inpainting pipeline feeds the UNet."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import families, loader
from models.errors import EditError
from models.tiny import build_components

CONFIGS = Path(loader.__file__).parent / "configs"


def test_tiny_inpaint_loads_as_the_sd15_inpainting_variant():
    b = loader.load_bundle("tiny-inpaint", device="cpu")
    assert b.unet.config.in_channels == 9 and b.unet.config.out_channels == 4
    assert b.family.name == "sd15" and b.family.inpainting and b.family.label == "Stable Diffusion 1.x inpainting"
    assert families.is_inpainting(b.unet) and not families.is_inpainting(loader.load_bundle("tiny", device="cpu").unet)
    assert loader.base_model_for(b) == "tiny"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_inpainting_folder_loads_with_its_family(tmp_path, family):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from models.choose import family_hint

    comps = build_components("tiny-inpaint" if family == "sd15" else "tiny-sdxl", seed=3)
    if family == "sdxl":  # the SDXL layout with a 9-channel input, as the SDXL inpainting checkpoints have
        torch.manual_seed(3)
        comps["unet"] = UNet2DConditionModel(**{**comps["unet"].config, "in_channels": 9})
        StableDiffusionXLInpaintPipeline(**comps, add_watermarker=False).save_pretrained(tmp_path)
    else:
        StableDiffusionInpaintPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False).save_pretrained(tmp_path)
    assert "Inpaint" in json.loads((tmp_path / "model_index.json").read_text())["_class_name"]
    label = families.LABELS[family] + " inpainting"
    assert family_hint(str(tmp_path)) == label  # the banner, before anything loads
    b = loader.load_bundle(str(tmp_path), device="cpu")
    assert b.family.name == family and b.family.inpainting and b.family.label == label
    assert torch.equal(b.unet.conv_in.weight, comps["unet"].conv_in.weight)
    assert loader.base_model_for(b) == families.BASE_MODELS[family]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_single_file_inpainting_configs_differ_from_the_base_only_in_the_input(family):
    base, inpaint = CONFIGS / family, CONFIGS / f"{family}-inpainting"
    files = sorted(p.relative_to(base) for p in base.rglob("*.json"))
    assert files == sorted(p.relative_to(inpaint) for p in inpaint.rglob("*.json"))
    for f in files:
        a, b = json.loads((base / f).read_text()), json.loads((inpaint / f).read_text())
        changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        want = {"unet/config.json": {"in_channels"}, "model_index.json": {"_class_name"}}.get(str(f), set())
        assert changed == want, (family, f, changed)
    assert json.loads((inpaint / "unet" / "config.json").read_text())["in_channels"] == 9


def test_single_file_inpainting_is_read_from_the_first_convolution(tmp_path):
    from safetensors.torch import save_file

    from models.choose import family_hint

    key = "model.diffusion_model.input_blocks.0.0.weight"
    for name, channels in (("base", 4), ("inpaint", 9)):
        save_file({key: torch.zeros(8, channels, 3, 3)}, str(tmp_path / f"{name}.safetensors"))
    assert not loader.single_file_is_inpainting(tmp_path / "base.safetensors")
    assert loader.single_file_is_inpainting(tmp_path / "inpaint.safetensors")
    assert family_hint(str(tmp_path / "inpaint.safetensors")) == "Stable Diffusion 1.x inpainting"
    assert family_hint(str(tmp_path / "base.safetensors")) == "Stable Diffusion 1.x"


def test_other_input_widths_are_still_refused():
    from diffusers import UNet2DConditionModel

    c = build_components("tiny")
    depth = UNet2DConditionModel(**{**c["unet"].config, "in_channels": 5})
    with pytest.raises(EditError, match=r"5 input channels.*only 4-channel latent models and 9-channel inpainting"):
        families.detect(depth, c["scheduler"], [c["text_encoder"]])


# ---- the UNet input ------------------------------------------------------------------------------------------
def test_inpaint_input_matches_what_diffusers_inpainting_pipeline_feeds_the_unet():
    """Run diffusers' own StableDiffusionInpaintPipeline one step on tiny-inpaint and catch the UNet's input: our
    channel order and mask resizing must give the same tensor."""
    from diffusers import StableDiffusionInpaintPipeline

    comps = build_components("tiny-inpaint", seed=1)
    pipe = StableDiffusionInpaintPipeline(**comps, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    g = torch.Generator().manual_seed(0)
    z = torch.randn((1, 4, 8, 8), generator=g)
    masked_latent = torch.randn((1, 4, 8, 8), generator=g)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:37, 21:50] = 255  # not on the 8-px latent grid: the resizing rule decides the edge cells
    try:
        pipe(prompt="", image=Image.new("RGB", (64, 64), (90, 120, 200)), mask_image=Image.fromarray(mask),
             masked_image_latents=masked_latent, latents=z, num_inference_steps=1, guidance_scale=1.0,
             height=64, width=64, output_type="latent")
    finally:
        hook.remove()
    m = torch.from_numpy(mask / 255.0).float()[None, None]
    ours = families.inpaint_input(z * pipe.scheduler.init_noise_sigma, families.inpaint_mask_latent(m, (8, 8)),
                                  masked_latent)
    assert seen[0].shape == (1, 9, 8, 8)
    assert torch.equal(ours, seen[0])


def test_inpaint_input_shapes_and_refusals():
    z, m, mi = torch.zeros(2, 4, 6, 5), torch.ones(1, 1, 6, 5), torch.full((1, 4, 6, 5), 2.0)
    x = families.inpaint_input(z, m, mi)  # batch-1 conditions follow the CFG batch
    assert x.shape == (2, 9, 6, 5) and (x[:, 4] == 1).all() and (x[:, 5:] == 2).all() and (x[:, :4] == 0).all()
    with pytest.raises(ValueError, match="4 \\+ 1 \\+ 4 channels"):
        families.inpaint_input(z, mi, mi)
    with pytest.raises(ValueError, match="latent grid"):
        families.inpaint_input(z, torch.ones(1, 1, 3, 5), mi)
    img = torch.ones(1, 3, 4, 4)
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., :2, :] = 1
    assert families.masked_image(img, hole)[..., :2, :].eq(0).all() and families.masked_image(img, hole)[..., 2:, :].eq(1).all()


# ---- tasks -----------------------------------------------------------------------------------------------------
def test_every_task_refuses_an_inpainting_model_naming_the_base(tiny_image):
    from editing.engine import Editor, _check_unet_fits
    from editing.requests import MoveRequest
    from editing.runtime import TASKS

    ed = Editor("tiny-inpaint", device="cpu")
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    with pytest.raises(EditError, match=r"'tiny-inpaint' is a Stable Diffusion 1\.x inpainting model.*the move task "
                                        r"cannot use.*--model tiny\."):
        ed.edit(MoveRequest(image=tiny_image, mask=mask, offset=(4, 0)))
    with pytest.raises(EditError, match="identity LoRA training cannot use"):
        ed.train_identity_lora(tiny_image, steps=1)
    assert [t.name for t in TASKS.values() if t.uses_inpainting_unet] == ["inpaint"]
    for task in (t for t in TASKS.values() if not t.uses_inpainting_unet):
        with pytest.raises(EditError, match=f"the {task.name} task cannot use"):
            _check_unet_fits(ed.bundle, task)


@dataclass(frozen=True)
class _FillRequest:
    image: Image.Image
    mask: np.ndarray


def test_a_task_that_declares_it_runs_the_nine_channel_unet(tiny_image):
    """What the later inpainting task will do, in miniature: the same Editor, a task declaring
    ``uses_inpainting_unet``, one UNet call on ``inpaint_input`` (registered for this test only)."""
    from editing.engine import Editor
    from editing.requests import MoveRequest
    from editing.runtime import TASKS, Task, register

    def run(ctx, req):
        b = ctx.bundle
        x = torch.from_numpy(np.asarray(req.image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        m = torch.from_numpy(req.mask.astype(np.float32))[None, None]
        lat = b.vae.encode(families.masked_image(x, m)).latent_dist.mean * b.family.vae_scaling_factor
        z = torch.randn_like(lat)
        eps = b.unet(families.inpaint_input(z, families.inpaint_mask_latent(m, lat.shape[-2:]), lat), 10,
                     encoder_hidden_states=b.encode_prompt("")).sample
        return eps

    register(Task("fill-test", _FillRequest, run, lambda r: None, uses_inpainting_unet=True))
    try:
        ed = Editor("tiny-inpaint", device="cpu")
        mask = np.zeros((64, 64), bool)
        mask[16:48, 16:48] = True
        with pytest.raises(EditError, match="cannot use"):  # a refusal leaves the Editor usable
            ed.edit(MoveRequest(image=tiny_image, mask=mask, offset=(4, 0)))
        eps = ed.edit(_FillRequest(tiny_image, mask))
        assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
    finally:
        TASKS.pop("fill-test")


@pytest.fixture
def tiny_image():
    from tests.conftest import scene

    return scene(64, 64)


def test_move_repaints_its_hole_with_the_inpainting_companion_and_nothing_else(tiny_image):
    """Move on tiny: tiny-inpaint repaints the area the object left (widened by the seam); every other pixel is the
    guided move's own; off, or with a hole mask (DiffEditor's own fill from that region), it does not run."""
    import cv2

    from editing.engine import Editor
    from editing.requests import MoveRequest

    ed = Editor("tiny", device="cpu")
    mask = np.zeros((64, 64), bool)
    mask[20:36, 16:32] = True
    req = MoveRequest(image=tiny_image, mask=mask, offset=(16, 4), n_inference_steps=4, seed=3)
    plain = ed.edit(req.replace(inpaint_hole=False))
    filled = ed.edit(req)
    assert "hole" not in plain.extra and filled.extra["hole"] == "tiny-inpaint"
    changed = (np.asarray(plain.image) != np.asarray(filled.image)).any(-1)
    near_old = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert changed.any() and not changed[~near_old].any() and changed.sum() <= filled.extra["hole_px"]
    assert filled.unet_calls["fill"] == 4 and "fill" not in plain.unet_calls  # 8 steps from strength 0.5
    assert "hole" not in ed.edit(req.replace(hole_mask=mask)).extra
    with pytest.raises(EditError, match="inpaint_hole must be true or false"):
        req.replace(inpaint_hole="yes")
