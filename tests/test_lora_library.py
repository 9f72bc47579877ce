"""The LoRA library (editing/lora_library/): names, files, safety, fit checks, exact restore, stacking."""
import json

import pytest
import torch

from editing import lora_library as lib
from editing.drag import DragRequest
from editing.lora import lora_adapter, train_identity_lora
from editing.sampling import unet_eps
from models.errors import EditError
from tests.conftest import FAST, scene

PROBE_T = 300


@pytest.fixture(autouse=True)
def lora_dir(tmp_path, monkeypatch):
    d = tmp_path / "loras"
    monkeypatch.setenv(lib.ENV_DIR, str(d))
    d.mkdir()
    return d


def _peft_lora(unet, rank=4, seed=0, name="tmp") -> dict:
    """A random (non-zero) LoRA for ``unet`` in peft format, made without training."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
    try:
        for n, p in unet.named_parameters():
            if f"lora_B.{name}." in n:
                p.data.normal_(0, 0.3)
        return {k: v.clone() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}
    finally:
        unet.delete_adapters(name)
        lib.set_active(unet, lib.active_loras(unet))


def save_diffusers_lora(path, peft_sd):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionLoraLoaderMixin.save_lora_weights(str(path.parent), unet_lora_layers=convert_state_dict_to_diffusers(peft_sd),
                                                     weight_name=path.name)
    return path


@pytest.fixture
def subject(bundle, lora_dir):
    return save_diffusers_lora(lib.library_dir() / "subject.safetensors", _peft_lora(bundle.unet, seed=1))


def eps(bundle, prompt="a photo"):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    return unet_eps(bundle.unet, x, PROBE_T, bundle.encode_prompt(prompt))


def test_list_resolve_and_missing_names(bundle, subject, lora_dir, tmp_path):
    assert [i.name for i in lib.list_loras()] == ["subject"]
    assert lib.resolve("subject") == subject and lib.resolve(str(subject)) == subject
    folder = tmp_path / "folder"
    folder.mkdir()
    save_diffusers_lora(folder / "pytorch_lora_weights.safetensors", _peft_lora(bundle.unet, seed=2))
    assert lib.resolve(folder).name == "pytorch_lora_weights.safetensors"
    with pytest.raises(EditError, match=r"LoRA 'nope' not found.*available: subject"):
        lib.resolve("nope")
    with pytest.raises(EditError, match="does not exist"):
        lib.resolve(tmp_path / "gone.safetensors")  # an explicit path that is missing: not a name lookup
    # and after the errors, a good spec still resolves
    assert lib.resolve("subject") == subject
    key = lib.cache_key([("subject", 0.5), ("nope", 1.0)])
    assert key[0][0] == str(subject.resolve()) and key[0][2] == 0.5 and key[1] == ("nope", None, 1.0)


def test_pickle_lora_refused_unless_allowed(bundle, subject, tmp_path):
    from safetensors.torch import load_file

    pkl = tmp_path / "old.bin"
    torch.save(load_file(str(subject)), pkl)
    with pytest.raises(EditError, match=r"pickle.*--allow-pickle"):
        lib.resolve(pkl)
    with pytest.raises(EditError, match="pickle"), lib.activate(bundle, [(str(pkl), 1.0)]):
        pass
    base = eps(bundle)
    with lib.activate(bundle, [(str(pkl), 1.0)], allow_pickle=True):
        assert not torch.allclose(eps(bundle), base)
    assert torch.equal(eps(bundle), base)
    with pytest.raises(EditError, match="pickle"):
        lib.add_to_library(pkl)
    assert lib.add_to_library(pkl, "converted", allow_pickle=True).path.suffix == ".safetensors"


def test_activate_changes_outputs_and_restores_them_exactly(bundle, subject, lora_dir):
    base = eps(bundle)
    with lib.activate(bundle, [("subject", 1.0)]) as names:
        full = eps(bundle)
        assert [w for _, w in names] == [1.0] and lib.active_loras(bundle.unet) == names
    with lib.activate(bundle, [("subject", 0.5)]):
        half = eps(bundle)
    with lib.activate(bundle, [("subject", 0.0)]):
        off = eps(bundle)
    assert not torch.allclose(full, base) and not torch.allclose(half, full) and not torch.allclose(half, base)
    assert torch.allclose(off, base, atol=1e-6)  # weight 0 = the LoRA contributes nothing
    assert torch.equal(eps(bundle), base)
    assert lib.active_loras(bundle.unet) == [] and not getattr(bundle.unet, "peft_config", {})
    assert not any(p.requires_grad for p in bundle.unet.parameters())


def test_two_loras_stack_and_nest(bundle, subject, lora_dir):
    other = save_diffusers_lora(lora_dir / "style.safetensors", _peft_lora(bundle.unet, seed=5))
    base = eps(bundle)
    with lib.activate(bundle, [("subject", 1.0)]):
        only_subject = eps(bundle)
        with lib.activate(bundle, [(str(other), 0.8)]):
            nested = eps(bundle)
        assert torch.equal(eps(bundle), only_subject)  # the inner block's LoRA is gone, the outer one stays
    with lib.activate(bundle, [("subject", 1.0), ("style", 0.8)]):
        both = eps(bundle)
    assert torch.allclose(both, nested, atol=1e-5) and not torch.allclose(both, only_subject)
    assert torch.equal(eps(bundle), base)


def test_kohya_keys_load_through_diffusers(bundle, subject, lora_dir):
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    peft_sd = _peft_lora(bundle.unet, seed=1)  # same weights as `subject`
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    assert all(k.startswith("lora_unet_") for k in kohya)
    save_file(kohya, str(lora_dir / "kohya.safetensors"))
    with lib.activate(bundle, [("subject", 1.0)]):
        want = eps(bundle)
    with lib.activate(bundle, [("kohya", 1.0)]):
        got = eps(bundle)
    assert torch.allclose(got, want, atol=1e-5)


def test_lora_for_another_base_is_refused_clearly(bundle, lora_dir, editor):
    from safetensors.torch import save_file

    base = eps(bundle)
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"unet.{k}.lora.down.weight": torch.zeros(4, 768), f"unet.{k}.lora.up.weight": torch.zeros(32, 4)},
              str(lora_dir / "sd15-style.safetensors"))
    fits_sd15 = r"does not fit.*768 in the LoRA.*Stable Diffusion 1\.x"
    with pytest.raises(EditError, match=fits_sd15), lib.activate(bundle, [("sd15-style", 1.0)]):
        pass
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)},
              str(lora_dir / "xl.safetensors"))
    with pytest.raises(EditError, match="SDXL"), lib.activate(bundle, [("xl", 1.0)]):
        pass
    save_file({"weight": torch.zeros(2)}, str(lora_dir / "notalora.safetensors"))
    with pytest.raises(EditError, match="no LoRA weights"), lib.activate(bundle, [("notalora", 1.0)]):
        pass
    assert torch.equal(eps(bundle), base) and not getattr(bundle.unet, "peft_config", {})


def test_identity_lora_stacks_on_subject_lora(bundle, subject):
    unet, cond = bundle.unet, bundle.encode_prompt("")
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    base = eps(bundle)
    with lib.activate(bundle, [("subject", 0.7)]) as active:
        with_subject = eps(bundle)
        state = train_identity_lora(unet, (z0, torch.zeros_like(z0)), cond, bundle.scheduler.alphas_cumprod,
                                    steps=3, rank=4, lr=1e-2, batch=1, seed=0)
        assert lib.active_loras(unet) == active
        assert torch.equal(eps(bundle), with_subject)  # subject back at weight 0.7, identity gone
        assert state and not any(".lib" in k for k in state)  # only the identity LoRA was trained
        with lora_adapter(unet, state, rank=4):
            stacked = eps(bundle)
        assert torch.equal(eps(bundle), with_subject)
    with lora_adapter(unet, state, rank=4):
        identity_only = eps(bundle)
    assert not torch.allclose(stacked, with_subject) and not torch.allclose(stacked, identity_only)
    assert torch.equal(eps(bundle), base)


def test_editor_records_loras_and_survives_a_bad_one(editor, subject):
    req = DragRequest(scene(64, 64), (((20, 30), (28, 30)),), None, **{**FAST, "lora_steps": 2})
    r = editor.edit(req, loras=[("subject", 0.6)])
    assert r.recipe["loras"] == [["subject", 0.6]]
    with pytest.raises(EditError, match="not found"):
        editor.edit(req, loras=[("missing-lora", 1.0)])
    r2 = editor.edit(req)
    assert r2.recipe["loras"] == [] and r2.image.size == (64, 64)


def test_identity_lora_trained_ahead_under_subject_loras_is_the_one_the_drag_uses(editor, subject):
    # a seed no other test uses: the editor (and its LoRA cache) is shared by the session
    req = DragRequest(scene(64, 64), (((20, 30), (28, 30)),), None, **{**FAST, "lora_steps": 2, "seed": 1234})
    editor.train_identity_lora(req.image, steps=2, rank=req.lora_rank, lr=req.lora_lr, seed=req.seed,
                               loras=[("subject", 0.6)])
    assert "lora" not in editor.edit(req, loras=[("subject", 0.6)]).timings  # cached under the subject LoRA
    assert "lora" in editor.edit(req).timings  # without it the identity LoRA is another one


def test_add_to_library_and_cards(bundle, tmp_path, lora_dir):
    src = save_diffusers_lora(tmp_path / "mine.safetensors", _peft_lora(bundle.unet, seed=3))
    src.with_suffix(".json").write_text(json.dumps({"instance_prompt": "a zwx dog", "base_model": "tiny"}))
    info = lib.add_to_library(src, "my dog!")
    assert info.name == "my-dog" and info.card["instance_prompt"] == "a zwx dog"
    assert "a zwx dog" in info.label
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(EditError, match="Cannot read LoRA file bad.safetensors"):
        lib.add_to_library(bad)
    assert [i.name for i in lib.list_loras()] == ["my-dog"]
