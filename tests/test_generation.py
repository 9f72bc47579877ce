"""Sketch (SDEdit) and conditioned generation on the tiny model: units compose, zero scale is a no-op,
generated images drag without inversion or LoRA, the UNet is left as found, every bad input is explained."""
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from editing.drag import DragRequest
from editing.generation import (
    MAX_BATCH,
    AdapterUnit,
    ControlNetUnit,
    GenerateRequest,
    IPAdapterUnit,
    SketchRequest,
)
from editing.runtime import TASKS
from models import adapters
from models.errors import EditCancelled, EditError

STEPS = 3
FAST = {"n_inference_steps": STEPS, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def ed():
    """The tiny model at 64² (shares the loaded bundle with the session's editor)."""
    from editing.engine import Editor

    e = Editor("tiny", resolution=64)
    e.load()
    return e


def drawing(size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.ellipse((10, 10, 40, 40), outline=(200, 30, 30), width=3)
    d.line((5, 55, 60, 50), fill=(30, 120, 30), width=3)
    return img


def edges(size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, "black")
    ImageDraw.Draw(img).rectangle((12, 12, 44, 44), outline="white", width=2)
    return img


def px(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def unet_state(unet):
    return ({k: type(v) for k, v in unet.attn_processors.items()}, unet.encoder_hid_proj,
            unet.config.encoder_hid_dim_type, len(unet._forward_pre_hooks))


# ---- sketch ----------------------------------------------------------------------------------------
def test_sketch_size_batch_seeds_and_determinism(ed):
    req = SketchRequest(drawing((80, 56)), prompt="a red ball", strength=0.6, n_inference_steps=STEPS, batch=2, seed=5)
    r = ed.edit(req)
    assert len(r.images) == 2 and all(im.size == (80, 56) for im in r.images)
    assert r.unet_calls == {"sketch": 2 * 2 * int(STEPS * 0.6)}  # batch 2 × CFG 2 × steps run
    assert [x["params"]["seed"] for x in r.extra["recipes"]] == [5, 6]
    assert np.abs(px(r.images[0]) - px(r.images[1])).max() > 0
    again = ed.edit(req.__class__(drawing((80, 56)), prompt="a red ball", strength=0.6, n_inference_steps=STEPS, seed=6))
    assert np.abs(px(again.image) - px(r.images[1])).max() <= 2  # image i of a batch = seed + i alone


def test_sketch_strength_zero_returns_the_sketch_and_one_is_drag_ready(ed):
    r0 = ed.edit(SketchRequest(drawing(), strength=0.0, n_inference_steps=STEPS))
    assert r0.unet_calls == {} and r0.image.tobytes() == drawing().tobytes()
    assert "Strength 0" in r0.notices[0]
    r1 = ed.edit(SketchRequest(drawing(), prompt="x", strength=1.0, n_inference_steps=STEPS))
    assert r1.extra["drag_ready"] and ed.is_drag_ready(r1.image)
    rp = ed.edit(SketchRequest(drawing(), prompt="x", strength=0.5, n_inference_steps=STEPS))
    assert rp.extra["drag_ready"]  # a partial trajectory serves drags up to its own strength
    from editing.drag import DragRequest

    drag = dict(points=(((10, 10), (20, 12)),), n_inference_steps=STEPS, lora_steps=2, max_steps=2)
    d = ed.drag(DragRequest(rp.image, inversion_strength=0.34, **drag))  # 1 of 3 steps: within the sketch's
    assert "lora" not in d.timings and "inversion" not in d.timings
    d = ed.drag(DragRequest(rp.image, inversion_strength=0.9, **drag))
    assert "inversion" in d.timings and any("inverted like a photo" in n for n in d.notices)


def test_strokes_layer_over_a_photo_and_scribble_assist(ed):
    photo = Image.fromarray(np.full((64, 64, 3), 90, np.uint8))
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).line((0, 32, 63, 32), fill=(255, 0, 0, 255), width=3)
    req = SketchRequest(layer, photo, prompt="a road", strength=0.7, n_inference_steps=STEPS,
                        scribble_controlnet="tiny", scribble_scale=0.8)
    assert req.sketch.getpixel((10, 10)) == (90, 90, 90) and req.sketch.getpixel((10, 32)) == (255, 0, 0)
    assert np.asarray(req.strokes)[32, 10, 0] == 255 and np.asarray(req.strokes)[10, 10, 0] == 0
    r = ed.edit(req)
    assert r.extra["calls"]["controlnet"]["sketch"] == r.unet_calls["sketch"]


# ---- generation with units -----------------------------------------------------------------------
def test_units_compose_and_zero_scale_changes_nothing(ed):
    before = unet_state(ed.bundle.unet)
    plain = ed.edit(GenerateRequest("a cat", **FAST)).image
    one = ed.edit(GenerateRequest("a cat", controlnets=(ControlNetUnit(edges()),), **FAST))
    two = ed.edit(GenerateRequest("a cat", controlnets=(ControlNetUnit(edges()), ControlNetUnit(drawing(), preprocessor="scribble", scale=0.7)), **FAST))
    every = ed.edit(GenerateRequest("a cat", controlnets=(ControlNetUnit(edges(), start=0.2, end=0.9),),
                                    adapters=(AdapterUnit(drawing(), preprocessor="palette"),),
                                    ip_adapter=IPAdapterUnit((drawing(),)), **FAST))
    images = [plain, one.image, two.image, every.image]
    for i in range(4):
        for j in range(i):
            assert np.abs(px(images[i]) - px(images[j])).max() > 0, (i, j)
    calls = two.extra["calls"]
    assert calls["controlnet"]["generate"] == 2 * two.unet_calls["generate"]  # each ControlNet runs with the UNet
    assert set(every.extra["calls"]) == {"controlnet", "t2i_adapter", "image_encoder"}
    zero = ed.edit(GenerateRequest("a cat", controlnets=(ControlNetUnit(edges(), scale=0),),
                                   adapters=(AdapterUnit(drawing(), weight=0),),
                                   ip_adapter=IPAdapterUnit((drawing(),), scale=0), **FAST))
    assert zero.image.tobytes() == plain.tobytes()
    assert unet_state(ed.bundle.unet) == before  # processors, projection, hooks all restored


def test_generated_image_drags_without_inversion_or_lora(ed):
    g = ed.edit(GenerateRequest("a red disk", controlnets=(ControlNetUnit(edges()),), seed=3, **FAST))
    assert g.extra["drag_ready"] and ed.is_drag_ready(g.image)
    r = ed.drag(DragRequest(g.image, (((20, 30), (28, 30)),), n_inference_steps=STEPS, max_steps=2, lora_steps=3))
    assert "inversion" not in r.unet_calls and "lora" not in r.unet_calls
    assert r.recipe["generated"]["task"] == "generate"


def test_condition_of_another_size_is_resized_and_said(ed):
    r = ed.edit(GenerateRequest("x", controlnets=(ControlNetUnit(edges((100, 40)), preprocessor="canny"),),
                                adapters=(AdapterUnit(drawing((30, 30))),), **FAST))
    assert any("ControlNet 1's condition image was 100×40; it was resized to the output's 64×64" in n for n in r.notices)
    assert any("T2I-Adapter 1's condition image was 30×30" in n for n in r.notices)
    assert r.extra["conditions"]["controlnet0"].size == (64, 64)


def test_recipe_replays_the_same_image(ed):
    req = GenerateRequest("a tree", controlnets=(ControlNetUnit(edges(), preprocessor="canny", scale=0.5),),
                          ip_adapter=IPAdapterUnit((drawing(),), scale=0.4), seed=11, **FAST)
    first = ed.edit(req)
    again = ed.edit(TASKS["generate"].from_recipe(first.recipe))
    assert again.image.tobytes() == first.image.tobytes()
    sk = ed.edit(SketchRequest(drawing(), prompt="a", strength=0.5, n_inference_steps=STEPS, seed=2))
    assert ed.edit(TASKS["sketch"].from_recipe(sk.recipe)).image.tobytes() == sk.image.tobytes()


def test_cancel_restores_the_unet(ed):
    before = unet_state(ed.bundle.unet)
    cancel = threading.Event()
    cancel.set()
    req = GenerateRequest("x", adapters=(AdapterUnit(drawing()),), ip_adapter=IPAdapterUnit((drawing(),)), **FAST)
    with pytest.raises(EditCancelled):
        ed.edit(req, cancel=cancel)
    assert unet_state(ed.bundle.unet) == before
    assert ed.edit(GenerateRequest("x", **FAST)).image.size == (64, 64)


def test_ip_adapter_api_installs_on_cross_attention_only_and_restores(ed):
    b = ed.bundle
    before = dict(b.unet.attn_processors)
    z = torch.randn(1, 4, 8, 8)
    text = b.encode_prompt("x")
    ref = b.unet(z, 500, encoder_hidden_states=text).sample
    with adapters.ip_adapter(b, "tiny", scale=0.0) as ip:
        now = b.unet.attn_processors
        assert all(now[k] is before[k] for k in now if k.endswith("attn1.processor"))
        assert all(type(now[k]).__name__.startswith("IPAdapter") for k in now if k.endswith("attn2.processor"))
        emb = ip.embed([drawing(), edges()])
        assert emb.shape == (1, 2, 32)
        kw = ip.added_cond_kwargs(emb[:, :1], 1)
        assert torch.equal(b.unet(z, 500, encoder_hidden_states=text, added_cond_kwargs=kw).sample, ref)
        ip.set_scale(1.0)
        assert not torch.equal(b.unet(z, 500, encoder_hidden_states=text, added_cond_kwargs=kw).sample, ref)
    assert all(b.unet.attn_processors[k] is before[k] for k in before)
    assert b.unet.encoder_hid_proj is None and b.unet.config.encoder_hid_dim_type is None


def test_tiny_controlnet_follows_the_vae_factor():
    assert adapters._cond_embedding_channels(8) == (8, 16, 32, 32)
    assert len(adapters._cond_embedding_channels(4)) == 3  # a 4× VAE (the toy model): two halvings


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: SketchRequest(Image.new("RGB", (64, 64), "white")), "The sketch is blank"),
    (lambda: SketchRequest(Image.new("RGBA", (64, 64), (0, 0, 0, 0))), "The sketch is blank"),
    (lambda: SketchRequest(drawing(), strength=1.5), "strength=1.5 is outside"),
    (lambda: SketchRequest(drawing(), strength=float("nan")), "strength must be a finite number"),
    (lambda: SketchRequest(drawing(), batch=MAX_BATCH + 1), f"batch={MAX_BATCH + 1} is outside"),
    (lambda: GenerateRequest("x", batch=MAX_BATCH + 1), "batch=9 is outside"),
    (lambda: GenerateRequest("x", guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (lambda: GenerateRequest("x", seed=1.5), "seed must be a whole number"),
    (lambda: GenerateRequest(None, width=-64), "width=-64 is outside"),
    (lambda: ControlNetUnit(edges(), start=0.6, end=0.6), r"guidance start \(0.6\) must be before its end"),
    (lambda: ControlNetUnit(edges(), scale=float("nan")), "scale must be a finite number"),
    (lambda: ControlNetUnit(None), "condition image is missing"),
    (lambda: ControlNetUnit(edges(), preprocessor="pose"), "OpenPose"),
    (lambda: AdapterUnit(edges(), conditioning_factor=2), "conditioning_factor=2 is outside"),
    (lambda: IPAdapterUnit(()), "needs a reference image"),
    (lambda: GenerateRequest("x", controlnets=(ControlNetUnit(edges()),) * 5), "at most 4"),
])
def test_bad_requests_say_what_to_fix(make, match):
    with pytest.raises(EditError, match=match):
        make()


@pytest.mark.parametrize("unit, match", [
    (lambda: ControlNetUnit(edges(), model="nobody/missing-controlnet"), "Could not load ControlNet 'nobody/missing-controlnet'"),
    (lambda: ControlNetUnit(edges(), model="./no/such/folder"), "Unknown ControlNet"),
    (lambda: AdapterUnit(edges(), model="weights.bin"), "does not exist"),
    (lambda: IPAdapterUnit((edges(),), model="ip.bin"), "does not exist"),
])
def test_unavailable_adapters_are_named_and_the_next_request_works(ed, unit, match):
    u = unit()
    kw = {"controlnets": (u,)} if isinstance(u, ControlNetUnit) else {"adapters": (u,)} if isinstance(u, AdapterUnit) else {"ip_adapter": u}
    before = unet_state(ed.bundle.unet)
    with pytest.raises(EditError, match=match):
        ed.edit(GenerateRequest("x", **kw, **FAST))
    assert unet_state(ed.bundle.unet) == before
    assert ed.edit(GenerateRequest("x", **FAST)).image.size == (64, 64)


def test_pickle_adapter_files_are_refused(tmp_path, ed):
    f = tmp_path / "adapter.bin"
    f.write_bytes(b"not really a pickle")
    with pytest.raises(EditError, match="pickle"):
        adapters.ip_adapter(ed.bundle, str(f)).__enter__()
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    (tmp_path / "cn" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(EditError, match="only pickle weights"):
        adapters.controlnet(ed.bundle, str(tmp_path / "cn"))


def test_size_is_rounded_and_said(ed):
    r = ed.edit(GenerateRequest("x", width=70, height=50, n_inference_steps=2))
    assert r.image.size == (64, 64) or r.image.size[0] % ed.bundle.pixel_multiple == 0
    assert any("was rounded" in n for n in r.notices)


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_generate_and_sketch(tmp_path, capsys):
    from editing.cli import main
    from editing.cli.generate import parse_unit
    from editing.images import read_recipe

    assert parse_unit("tiny=a.png@0.5,pre=canny,end=0.8", "--controlnet") == ("tiny", "a.png", 0.5, {"pre": "canny", "end": "0.8"})
    edges().save(tmp_path / "e.png")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).line((0, 30, 63, 30), fill=(0, 0, 255, 255), width=3)
    layer.save(tmp_path / "s.png")
    out = tmp_path / "g.png"
    rc = main(["generate", "--model", "tiny", "--resolution", "64", "--prompt", "a cat", "--size", "64x64",
               "--steps", "2", "--batch", "2", "--controlnet", f"tiny={tmp_path / 'e.png'}@0.8,pre=canny,end=0.8",
               "--t2i-adapter", f"tiny={tmp_path / 'e.png'},pre=palette,cells=4", "--ip-adapter", "tiny",
               "--ip-image", str(tmp_path / "e.png"), "--out", str(out)])
    assert rc == 0 and (tmp_path / "g-2.png").exists()
    rec = read_recipe(out)
    assert rec["task"] == "generate" and rec["params"]["controlnets"][0]["end"] == 0.8
    rc = main(["sketch", "--model", "tiny", "--resolution", "64", "--sketch", str(tmp_path / "s.png"), "--prompt", "sea",
               "--strength", "0.5", "--steps", "2", "--scribble-controlnet", "tiny", "--out", str(tmp_path / "k.png")])
    assert rc == 0 and read_recipe(tmp_path / "k.png")["task"] == "sketch"
    capsys.readouterr()
    for argv, msg in (
        (["generate", "--prompt", "x", "--controlnet", "tiny"], "write SPEC=CONDITION.png"),
        (["generate", "--prompt", "x", "--controlnet", f"tiny={tmp_path / 'e.png'},start=0.9,end=0.1"], "must be before its end"),
        (["generate", "--prompt", "x", "--ip-image", str(tmp_path / "e.png")], "--ip-image needs --ip-adapter"),
        (["generate", "--prompt", "x", "--drag-ready", "--steps", "4"], "--drag-ready needs"),
        (["sketch", "--sketch", str(tmp_path / "missing.png")], "does not exist"),
    ):
        assert main([*argv, "--model", "tiny", "--out", str(tmp_path / "bad.png")]) == 2
        assert msg in capsys.readouterr().err


def test_tiny_controlnet_builds_after_a_lora_touched_the_unet(ed):
    """An identity LoRA leaves peft wrappers on the UNet; the tiny ControlNet must not depend on its state dict."""
    ed.drag(DragRequest(drawing(), (((20, 30), (28, 30)),), n_inference_steps=2, max_steps=1, lora_steps=1))
    adapters.clear_cache()
    r = ed.edit(GenerateRequest("x", controlnets=(ControlNetUnit(edges()),), **FAST))
    assert r.extra["calls"]["controlnet"]["generate"] == r.unet_calls["generate"]


def test_a_4x_vae_model_generates_with_every_unit():
    """Nothing assumes an 8× VAE: a model whose VAE halves twice (like the toy model) runs every mode."""
    from diffusers import AutoencoderKL

    from editing.engine import Editor
    from models.loader import ModelBundle
    from models.tiny import build_components

    c = build_components("tiny")
    torch.manual_seed(0)
    c["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32),
                             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             layers_per_block=1, norm_num_groups=8, sample_size=128).eval()
    e = Editor("tiny", resolution=64)
    e._bundle = ModelBundle("tiny-4x", c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"],
                            torch.device("cpu"), torch.float32, "builtin")
    assert e.bundle.vae_scale_factor == 4
    r = e.edit(GenerateRequest("x", controlnets=(ControlNetUnit(edges()),), adapters=(AdapterUnit(drawing()),),
                               ip_adapter=IPAdapterUnit((drawing(),)), **FAST))
    assert r.image.size == (64, 64) and r.extra["drag_ready"]
    assert e.edit(SketchRequest(drawing(), strength=1.0, n_inference_steps=2, scribble_controlnet="tiny")).image.size == (64, 64)
    assert e.edit(GenerateRequest("x", guidance_scale=1.0, ip_adapter=IPAdapterUnit((drawing(),)), **FAST)).image.size == (64, 64)


def test_partial_sketch_trajectory_is_kept_for_drags(ed):
    """SDEdit below strength 1 keeps x_t0 … z_0, starting at the step strength 0.5 begins at."""
    r = ed.edit(SketchRequest(drawing(), prompt="x", strength=0.5, n_inference_steps=4))
    gen = ed.generation_of(r.image)
    assert r.extra["drag_ready"] and gen is not None
    assert (len(gen.inversion.latents), gen.inversion.start, len(gen.inversion.schedule.timesteps)) == (3, 2, 4)


def test_adapter_conditioning_factor_limits_the_steps_it_steers(ed):
    plain = ed.edit(GenerateRequest("a cat", **FAST)).image
    off = ed.edit(GenerateRequest("a cat", adapters=(AdapterUnit(drawing(), conditioning_factor=0.0),), **FAST)).image
    early = ed.edit(GenerateRequest("a cat", adapters=(AdapterUnit(drawing(), conditioning_factor=0.4),), **FAST)).image
    full = ed.edit(GenerateRequest("a cat", adapters=(AdapterUnit(drawing()),), **FAST)).image
    assert off.tobytes() == plain.tobytes()
    assert early.tobytes() != plain.tobytes() and early.tobytes() != full.tobytes()


def test_make_drag_ready_replays_a_saved_sketch(ed, tmp_path):
    """For cmd_drag: a PNG written by `sketch` carries its recipe; replaying it makes a new Editor drag-ready."""
    from editing.cli.drag import make_drag_ready
    from editing.engine import Editor
    from editing.images import save_png_with_recipe

    r = ed.edit(SketchRequest(drawing(), prompt="x", strength=1.0, n_inference_steps=2, seed=4))
    save_png_with_recipe(r.image, tmp_path / "s.png", r.recipe)
    fresh = Editor("tiny", resolution=64)
    assert not fresh.is_drag_ready(r.image)
    assert make_drag_ready(fresh, tmp_path / "s.png") and fresh.is_drag_ready(r.image)
    drawing().save(tmp_path / "photo.png")
    assert not make_drag_ready(fresh, tmp_path / "photo.png")  # a photo without a recipe: nothing to replay


def test_guess_mode_runs_and_mixed_units_are_told(ed):
    normal = ed.edit(GenerateRequest("a cat", controlnets=(ControlNetUnit(edges()),), **FAST))
    guess = ed.edit(GenerateRequest("a cat", controlnets=(ControlNetUnit(edges(), guess_mode=True), ControlNetUnit(drawing())), **FAST))
    assert guess.extra["calls"]["controlnet"]["generate"] == guess.unet_calls["generate"]  # cond half only, 2 units
    assert any("Guess mode applies to all ControlNet units" in n for n in guess.notices)
    assert guess.image.tobytes() != normal.image.tobytes()
