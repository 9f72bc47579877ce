"""Model families (issue 16): detection, SDXL conditioning, v-prediction, generation on tiny-sdxl / tiny-sd2-v,
wrong-family units and LoRAs refused — all offline on the random-weight built-ins."""
import numpy as np
import pytest
import torch

from editing.generation import ControlNetUnit, GenerateRequest, SketchRequest
from editing.sampling import NoisePredictor, Schedule, denoise, invert, to_eps
from models import choose, families, loader
from models.errors import EditError
from tests.conftest import scene

FAST = {"n_inference_steps": 4, "width": 64, "height": 64}
FAMILIES = {"tiny": "sd15", "tiny-sdxl": "sdxl", "tiny-sd2-v": "sd2"}


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd2-v"])
def ed(request):
    from editing.engine import Editor

    e = Editor(request.param, resolution=64)
    e.load()
    return e


# ---- detection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["tiny", "tiny-sdxl", "tiny-sd2-v", "toy"])
def test_family_is_detected_from_the_configs(spec):
    if spec == "toy" and not choose.toy_available():
        pytest.skip("the toy model is not in this checkout")
    b = loader.load_bundle(spec, device="cpu")
    f = b.family
    assert f.name == FAMILIES.get(spec, "sd15")
    assert f.prediction_type == ("v_prediction" if spec == "tiny-sd2-v" else "epsilon")
    assert f.vae_scale_factor == b.vae_scale_factor and f.native_resolution == b.native_resolution
    assert f.vae_scaling_factor == b.vae.config.scaling_factor
    if f.name == "sdxl":
        assert (f.drag_block, f.guidance_blocks, f.mutual_layers) == (1, (0, 1), ("up_blocks.1",))
        assert f.text_encoders == 2 and f.pooled_dim == b.text_encoder_2.config.projection_dim and f.vae_upcast
    else:  # what the SD-1.5 methods use today (their goldens)
        assert (f.drag_block, f.guidance_blocks, f.mutual_layers, f.bank_layers) == \
            (2, (1, 2), ("up_blocks.2", "up_blocks.3"), ("up_blocks",))
        assert not f.vae_upcast and f.pooled_dim == 0
    # every named block exists and the mutual-attention prefixes name self-attention layers
    ups = b.unet.up_blocks
    assert f.drag_block < len(ups) and all(i < len(ups) for i in f.guidance_blocks)
    assert all(any(n.startswith(p) and n.endswith("attn1.processor") for n in b.unet.attn_processors)
               for p in f.mutual_layers)


def test_sdxl_feature_blocks_match_sd15s_kind():
    """The SDXL drag block ends at full latent resolution with the same channel share as SD-1.5's up_blocks[2]."""
    for spec in ("tiny", "tiny-sdxl"):
        b = loader.load_bundle(spec, device="cpu")
        ups, f = b.unet.up_blocks, b.family
        assert ups[f.drag_block].upsamplers is not None  # the block ends by upsampling to the next level
        assert f.drag_block == len(ups) - 2


def test_unknown_family_names_what_was_found():
    from diffusers import UNet2DConditionModel

    from models.tiny import build_components

    c = build_components("tiny")
    pix2pix = UNet2DConditionModel(**{**c["unet"].config, "in_channels": 8})  # 9 is inpainting: tests/test_inpaint_family
    with pytest.raises(EditError, match=r"found a UNet with 4 down blocks.*8 input channels.*9-channel inpainting"):
        families.detect(pix2pix, c["scheduler"], [c["text_encoder"]])
    with pytest.raises(EditError, match=r"1 text encoder\(s\).*SDXL-style UNet needs.*two text encoders"):
        xl = build_components("tiny-sdxl")
        families.detect(xl["unet"], xl["scheduler"], [xl["text_encoder"]])
    with pytest.raises(loader.ModelLoadError, match="Unsupported base model"):
        loader.ModelBundle("bad", pix2pix, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"],
                           torch.device("cpu"), torch.float32, "builtin")


def test_sdxl_folder_loads_with_its_family(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from models.tiny import build_components

    StableDiffusionXLPipeline(**build_components("tiny-sdxl", seed=1), add_watermarker=False).save_pretrained(
        tmp_path, safe_serialization=True)
    b = loader.load_bundle(str(tmp_path), device="cpu")
    assert b.family.name == "sdxl" and b.text_encoder_2 is not None and b.tokenizer_2 is not None
    ref = build_components("tiny-sdxl", seed=1)
    assert torch.equal(b.text_encoder_2.text_projection.weight, ref["text_encoder_2"].text_projection.weight)


def test_single_file_family_from_checkpoint_keys(tmp_path):
    from safetensors.torch import save_file

    z = torch.zeros(1)
    cases = {"xl": ({"conditioner.embedders.1.model.ln_final.weight": z}, "sdxl"),
             "sd2": ({"cond_stage_model.model.ln_final.weight": z}, "sd2"),
             "sd15": ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": z}, "sd15")}
    for name, (sd, fam) in cases.items():
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        assert loader.single_file_family(tmp_path / f"{name}.safetensors") == fam
    for fam in ("sd15", "sd2", "sdxl"):  # the configs a single file needs ship with the code
        assert (loader.CONFIGS / fam / "unet" / "config.json").is_file()


# ---- SDXL conditioning -----------------------------------------------------------------------------------
def test_sdxl_packed_prompt_equals_explicit_added_cond_kwargs():
    """One packed tensor through the pre-hook == diffusers' way (77 tokens + text_embeds + time_ids)."""
    b = loader.load_bundle("tiny-sdxl", device="cpu")
    cond = b.encode_prompt("a red disk")
    assert cond.shape == (1, 78, b.unet.config.cross_attention_dim)
    text, pooled = families.unpack_sdxl(cond, b.family.pooled_dim)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = b.unet(x, 500, encoder_hidden_states=cond.expand(2, -1, -1)).sample
        ids = torch.tensor([families.sdxl_time_ids(64, 96)] * 2, dtype=torch.float32)
        explicit = b.unet(x, 500, encoder_hidden_states=text.expand(2, -1, -1),
                          added_cond_kwargs={"text_embeds": pooled.expand(2, -1), "time_ids": ids}).sample
        other = b.unet(x, 500, encoder_hidden_states=text.expand(2, -1, -1),
                       added_cond_kwargs={"text_embeds": pooled.expand(2, -1), "time_ids": ids * 2}).sample
    assert torch.equal(packed, explicit)
    assert not torch.equal(packed, other)  # the caller's own added_cond_kwargs are left alone
    assert torch.count_nonzero(b.encode_prompt("")) == 0  # force_zeros_for_empty_prompt, as the SDXL pipelines


# ---- v-prediction -------------------------------------------------------------------------------------------
def test_to_eps_inverts_the_v_parameterisation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for a in (0.05, 0.5, 0.97):
        xt = a**0.5 * x0 + (1 - a) ** 0.5 * eps
        v = a**0.5 * eps - (1 - a) ** 0.5 * x0
        assert torch.allclose(to_eps(v, xt, a, "v_prediction"), eps, atol=1e-5)
        assert torch.allclose(to_eps(x0, xt, a, "sample"), eps, atol=1e-4)
    assert to_eps(v, xt, 0.5, "epsilon") is v


def test_v_prediction_inversion_round_trip_error_falls_with_more_steps():
    b = loader.load_bundle("tiny-sd2-v", device="cpu")
    assert Schedule.from_scheduler(b.scheduler, 10).prediction_type == "v_prediction"
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = b.encode_prompt("a cat")
    errors, raw_errors = [], []
    for n in (5, 10, 25):
        s = Schedule.from_scheduler(b.scheduler, n)
        start = s.start_index(0.6)
        p = NoisePredictor(b.unet, cond, 1, schedule=s)
        errors.append(float((denoise(p, invert(p, z0, s, start).z_t, s, start) - z0).abs().mean()))
        raw = NoisePredictor(b.unet, cond, 1, schedule=Schedule(s.timesteps, s.alphas_cumprod, s.final_alpha, s.stride))
        raw_errors.append(float((denoise(raw, invert(raw, z0, s, start).z_t, s, start) - z0).abs().mean()))
        # without a schedule the predictor reads what the loader recorded for this UNet: the same
        q = NoisePredictor(b.unet, cond, 1)
        assert q.prediction_type == "v_prediction"
    assert errors[0] > errors[1] > errors[2]
    assert all(e < r for e, r in zip(errors, raw_errors))  # treating v as ε inverts worse


# ---- generation on every family -------------------------------------------------------------------------
def test_generate_and_sketch_end_to_end(ed):
    g = ed.edit(GenerateRequest("a red disk", seed=3, **FAST))
    assert g.image.size == (64, 64) and g.extra["drag_ready"]
    again = ed.edit(GenerateRequest("a red disk", seed=3, **FAST))
    assert np.array_equal(np.asarray(g.image), np.asarray(again.image))
    other = ed.edit(GenerateRequest("a red disk", seed=4, **FAST))
    assert not np.array_equal(np.asarray(g.image), np.asarray(other.image))
    assert np.array_equal(np.asarray(ed.replay(g.recipe).image), np.asarray(g.image))
    s = ed.edit(SketchRequest(scene(64, 64), prompt="x", strength=0.75, n_inference_steps=4, seed=1))
    assert s.image.size == (64, 64)
    assert np.array_equal(np.asarray(ed.replay(s.recipe).image), np.asarray(s.image))
    assert len(ed.bundle.unet._forward_pre_hooks) == (1 if ed.bundle.family.name == "sdxl" else 0)  # recorders gone


def test_generation_previews_only_when_watched(ed):
    class Watch:
        def __init__(self):
            self.shown = []

        def __call__(self, *args, **kwargs):
            pass

        def preview(self, step, image):
            self.shown.append((step, image.size))

    w = Watch()
    req = GenerateRequest("a red disk", seed=5, n_inference_steps=8, width=64, height=64)
    watched = ed.edit(req, progress=w)
    plain = ed.edit(req)
    assert w.shown and all(size == (64, 64) for _, size in w.shown) and w.shown[-1][0] < 8
    assert np.array_equal(np.asarray(watched.image), np.asarray(plain.image))


# ---- wrong family -----------------------------------------------------------------------------------------
def test_controlnet_of_another_family_is_refused(tmp_path):
    from diffusers import ControlNetModel

    from editing.engine import Editor

    sd15, xl = loader.load_bundle("tiny", device="cpu"), loader.load_bundle("tiny-sdxl", device="cpu")
    ControlNetModel.from_unet(xl.unet).save_pretrained(tmp_path / "xl-cn")
    ControlNetModel.from_unet(sd15.unet, conditioning_embedding_out_channels=(8, 16, 32, 32)).save_pretrained(
        tmp_path / "sd15-cn")
    e = Editor("tiny", resolution=64)
    with pytest.raises(EditError, match=r"made for SDXL, but the loaded model 'tiny' is Stable Diffusion 1\.x"):
        e.edit(GenerateRequest("x", controlnets=(ControlNetUnit(scene(64, 64), model=str(tmp_path / "xl-cn")),), **FAST))
    e2 = Editor("tiny-sdxl", resolution=64)
    with pytest.raises(EditError, match=r"made for Stable Diffusion 1\.x, but the loaded model 'tiny-sdxl' is SDXL"):
        e2.edit(GenerateRequest("x", controlnets=(ControlNetUnit(scene(64, 64), model=str(tmp_path / "sd15-cn")),),
                                **FAST))


def test_wrong_controlnet_folder_and_unknown_id_answer_in_one_line(tmp_path):
    from models import adapters

    b = loader.load_bundle("tiny", device="cpu")
    b.vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(EditError, match=r"holds a AutoencoderKL, not a ControlNetModel") as e:
        adapters.controlnet(b, str(tmp_path / "vae"))
    assert "\n" not in str(e.value)
    with pytest.raises(EditError, match=r"Could not load ControlNet 'nobody/no-such-controlnet'.*Check the Hub id") as e:
        adapters.controlnet(b, "nobody/no-such-controlnet")
    assert "\n" not in str(e.value)


def _lora_file(path, sd):
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path


def test_lora_of_another_family_and_mixed_stacks_are_refused(tmp_path):
    from editing.lora_library import loading

    z = torch.zeros
    xl_kohya = _lora_file(tmp_path / "xl-kohya.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight": z(4, 640),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight": z(640, 4),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": z(4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": z(768, 4),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": z(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": z(1280, 4)})
    k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    sd15 = _lora_file(tmp_path / "sd15.safetensors", {f"{k}.lora_A.weight": z(4, 768), f"{k}.lora_B.weight": z(320, 4)})
    xl = loading.load_lora(xl_kohya)
    assert xl.family == "sdxl" and xl.unet and xl.text_encoder and xl.text_encoder_2
    assert any(k.endswith("lora_A.weight") for k in xl.text_encoder_2)
    lo15 = loading.load_lora(sd15)
    assert lo15.family == "sd15"
    b, bxl = loader.load_bundle("tiny", device="cpu"), loader.load_bundle("tiny-sdxl", device="cpu")
    with pytest.raises(EditError, match=r"made for SDXL, but tiny is Stable Diffusion 1\.x"):
        loading.check_fits(xl, b.unet, b.text_encoder, "tiny", family=b.family.name)
    with pytest.raises(EditError, match=r"made for Stable Diffusion 1\.x, but tiny-sdxl is SDXL"):
        loading.check_fits(lo15, bxl.unet, bxl.text_encoder, "tiny-sdxl", family="sdxl",
                           text_encoder_2=bxl.text_encoder_2)
    with pytest.raises(EditError, match=r"mixes families: sd15\.safetensors is made for Stable Diffusion 1\.x but "
                                        r"xl-kohya\.safetensors for SDXL"):
        loading.check_stack([lo15, xl])
    loading.check_stack([lo15, lo15])  # one family: fine


def test_sdxl_diffusers_lora_keys_are_read(tmp_path):
    """diffusers / peft SDXL format: unet.*, text_encoder.*, text_encoder_2.* with lora_A / lora_B."""
    from editing.lora_library import loading

    bxl = loader.load_bundle("tiny-sdxl", device="cpu")
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    u = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    w2 = bxl.text_encoder_2.config.hidden_size
    path = _lora_file(tmp_path / "xl-peft.safetensors", {
        f"unet.{u}.lora_A.weight": torch.ones(2, 64), f"unet.{u}.lora_B.weight": torch.ones(64, 2),
        f"text_encoder_2.{q}.lora_A.weight": torch.ones(2, w2), f"text_encoder_2.{q}.lora_B.weight": torch.ones(w2, 2)})
    lo = loading.load_lora(path)
    assert lo.family == "sdxl" and lo.unet and lo.text_encoder_2 and not lo.foreign
    loading.check_fits(lo, bxl.unet, bxl.text_encoder, "tiny-sdxl", family="sdxl", text_encoder_2=bxl.text_encoder_2)


def test_sdxl_prompt_encoding_equals_diffusers_sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline

    b = loader.load_bundle("tiny-sdxl", device="cpu")
    pipe = StableDiffusionXLPipeline(vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2,
                                     tokenizer=b.tokenizer, tokenizer_2=b.tokenizer_2, unet=b.unet,
                                     scheduler=b.scheduler, add_watermarker=False)
    pe, npe, ppe, nppe = pipe.encode_prompt("a red disk", device="cpu", do_classifier_free_guidance=True)
    text, pooled = families.unpack_sdxl(b.encode_prompt("a red disk"), b.family.pooled_dim)
    assert torch.allclose(text, pe, atol=1e-6) and torch.allclose(pooled, ppe, atol=1e-6)
    utext, upooled = families.unpack_sdxl(b.encode_prompt(""), b.family.pooled_dim)
    assert torch.equal(utext, npe) and torch.equal(upooled, nppe)


@pytest.mark.parametrize("spec,label", [("toy", "Stable Diffusion 1.x"), ("tiny-sdxl", "SDXL"),
                                        ("tiny-sd2-v", "Stable Diffusion 2.x"),
                                        ("tiny-inpaint", "Stable Diffusion 1.x inpainting")])
def test_the_app_banner_names_the_family_before_anything_loads(spec, label):
    from editing.engine import Editor
    from ui.app import build_demo

    e = Editor(spec)
    assert e.bundle is None and e.family_label == label
    with build_demo(e) as demo:
        pass
    assert any(label in str(getattr(b, "value", "")) for b in demo.blocks.values())
    assert e.bundle is None  # the banner read configs, not weights
