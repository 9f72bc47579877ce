"""Every guided task, DreamBooth-LoRA and the LoRA library on ``tiny-sdxl`` and ``tiny-sd2-v`` (issue 16), end to
end on CPU: output size, determinism, recipe replay, and the shared model left as it was (attention processors,
forward hooks, peft adapters). The SD-1.5 versions of these tests (tests/test_guidance.py, test_dreambooth.py,
test_lora_library.py) run on ``tiny``; here the same calls run on the other two families' layouts (SDXL: 3-level
UNet, two text encoders, pooled text + time ids through the packed prompt; SD-2 768-v: v-prediction)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from editing import dreambooth as db
from editing.drag import GuidedDragRequest
from editing.lora_library import loading
from editing.requests import AppearanceRequest, MoveRequest, PasteRequest
from models.errors import EditError
from tests.conftest import scene

SPECS = ("tiny-sdxl", "tiny-sd2-v")
FAMILY = {"tiny-sdxl": "sdxl", "tiny-sd2-v": "sd2"}
LABEL = {"sdxl": "SDXL", "sd2": "Stable Diffusion 2.x", "sd15/sd2": "Stable Diffusion 1.x/2.x"}
STEPS = dict(n_inference_steps=4)
# DreamBooth at the presets' smallest size: 3 steps, 1 class image of 2 DDIM steps, no periodic preview.
TRAIN = dict(steps=3, rank=2, lr=1e-2, prior_images=1, prior_steps=2, preview_steps=2, resolution=64,
             checkpoint_every=0, preview_every=0, seed=7)


def box(h=64, w=64, y0=20, y1=40, x0=12, x1=30):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


_editors: dict = {}


def editor_for(spec):
    from editing.engine import Editor

    if spec not in _editors:
        _editors[spec] = Editor(spec, resolution=64)
        _editors[spec].load()
    return _editors[spec]


@pytest.fixture(scope="module", params=SPECS)
def ed(request):
    return editor_for(request.param)


def model_state(bundle) -> dict:
    """What an edit must leave as it found: processors, hooks and adapters of every component."""
    from editing import lora_library

    mods = {"unet": bundle.unet, "text_encoder": bundle.text_encoder, "text_encoder_2": bundle.text_encoder_2}
    return {
        "processors": dict(bundle.unet.attn_processors),
        "hooks": {k: (len(m._forward_hooks), len(m._forward_pre_hooks)) for k, m in mods.items() if m is not None},
        "peft": {k: sorted(getattr(m, "peft_config", None) or {}) for k, m in mods.items() if m is not None},
        "lora_layers": {k: sum(".lora_" in n for n, _ in m.named_parameters()) for k, m in mods.items() if m is not None},
        "active": lora_library.active_loras(bundle.unet),
        "grad": any(p.requires_grad for m in mods.values() if m is not None for p in m.parameters()),
    }


def pixels(result) -> bytes:
    return result.image.convert("RGB").tobytes()


# ---- move / paste / appearance / guided drag -------------------------------------------------------------------
def _requests():
    img, ref = scene(64, 64), scene(64, 64, seed=3)
    return {
        "move": MoveRequest(image=img, mask=box(), offset=(8, -4), scale=1.25, **STEPS),
        "paste": PasteRequest(image=img, reference=ref, reference_mask=box(), offset=(20, 0), scale=0.75, **STEPS),
        "appearance": AppearanceRequest(image=img, mask=box(), reference=ref,
                                        reference_mask=box(64, 64, 10, 30, 40, 60), **STEPS),
        # not square, and not a multiple of SDXL's 32-px pixel multiple: the output keeps the input's size
        "guided_drag": GuidedDragRequest(image=scene(64, 48), points=(((22, 24), (36, 24)),),
                                         mask=box(48, 64, 8, 40, 8, 50), **STEPS),
    }


@pytest.mark.parametrize("kind", ["move", "paste", "appearance", "guided_drag"])
def test_guided_task_size_determinism_replay_and_restore(ed, kind):
    req = _requests()[kind]
    b = ed.bundle
    before = model_state(b)
    ed.clear_caches()
    r = ed.edit(req)
    assert r.image.size == req.image.size
    assert r.recipe["task"] == ("guided_drag" if kind == "guided_drag" else kind)
    diff = np.abs(np.asarray(r.image.convert("RGB"), np.float32) - np.asarray(req.image.convert("RGB"), np.float32))
    assert diff.mean() > 0  # something was edited
    assert model_state(b) == before
    ed.clear_caches()  # the same request from scratch (no cached inversion / bank) gives the same pixels
    assert pixels(ed.edit(req)) == pixels(r)
    assert pixels(ed.replay(json.loads(json.dumps(r.recipe)))) == pixels(r)
    assert model_state(b) == before


def test_guidance_reads_the_familys_blocks(ed):
    """The guided energies read SDXL's up_blocks[0..1] (1/2 and full latent resolution), SD-2's [1..2]."""
    from editing.guidance.sampler import guidance_features

    b = ed.bundle
    want = (0, 1) if FAMILY[ed.model_spec] == "sdxl" else (1, 2)
    assert b.family.guidance_blocks == want
    x = torch.zeros(1, 4, 8, 8)
    feats = guidance_features(b.unet, x, 500, b.encode_prompt("a cat"), (8, 8))
    assert [f.shape[1] for f in feats] == [b.unet.up_blocks[i].resnets[-1].out_channels for i in want]


# ---- DreamBooth-LoRA ---------------------------------------------------------------------------------------------
_trained: dict = {}


def trained(spec, root: Path):
    """One DreamBooth-LoRA per family, trained once for the module (the later tests apply it)."""
    if spec not in _trained:
        ed = editor_for(spec)
        before = model_state(ed.bundle)
        req = db.PersonalizeRequest((scene(64, 64, 0), scene(96, 64, 1)), "dog", name=f"db-{FAMILY[spec]}",
                                    out_dir=str(root / spec), **TRAIN)
        r = ed.edit(req)
        assert model_state(ed.bundle) == before  # the adapter is gone, nothing trainable left
        _trained[spec] = (req, r)
    return _trained[spec]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families-loras")


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_personalize_trains_deterministically_and_replays(ed, root):
    from editing.dreambooth.trainer import _prediction_type

    spec = ed.model_spec
    req, r = trained(spec, root)
    path = Path(r.extra["lora_path"])
    assert path.is_file() and r.extra["card"]["base_family"] == FAMILY[spec]
    assert r.image.size == (64, 64) and len(r.extra["losses"]) == TRAIN["steps"]
    assert all(np.isfinite(r.extra["losses"]))
    assert _prediction_type(ed.bundle) == ("v_prediction" if spec == "tiny-sd2-v" else "epsilon")
    sd = _tensors(path)
    assert sd and all(k.startswith("unet.") for k in sd)
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if ".up." in k or "lora_B" in k)  # B moved off 0
    lo = loading.load_lora(path)
    assert lo.family in ({"sdxl"} if spec == "tiny-sdxl" else {"sd2", "sd15/sd2"})
    # replay the recipe (the name is free again) -> the same LoRA and preview
    path.rename(path.with_suffix(".first"))
    again = ed.replay(json.loads(json.dumps(r.recipe)))
    assert again.extra["lora_path"] == str(path)
    a, c = _tensors(path.with_suffix(".first")), _tensors(path)
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert again.extra["losses"] == r.extra["losses"] and pixels(again) == pixels(r)


def test_v_prediction_training_target():
    """v = √ᾱ·ε − √(1−ᾱ)·z₀, and ε is passed through untouched (the SD-1.5 goldens)."""
    from editing.dreambooth.loss import training_target
    from editing.sampling import to_eps

    g = torch.Generator().manual_seed(0)
    eps, z0 = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    a = torch.tensor([0.9, 0.2]).view(-1, 1, 1, 1)
    assert training_target(eps, z0, a, "epsilon") is eps
    v = training_target(eps, z0, a, "v_prediction")
    xt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(to_eps(v, xt, a, "v_prediction"), eps)  # the sampler reads v back as this ε
    with pytest.raises(ValueError):
        training_target(eps, z0, a, "sample")


def test_sdxl_text_encoder_training_is_refused_in_one_line(root):
    ed = editor_for("tiny-sdxl")
    before = model_state(ed.bundle)
    with pytest.raises(EditError, match="text encoders is not available on SDXL"):
        ed.edit(db.PersonalizeRequest((scene(64, 64, 0),), "dog", name="te", out_dir=str(root / "te"),
                                      train_text_encoder=True, **TRAIN))
    assert model_state(ed.bundle) == before


# ---- the LoRA library ----------------------------------------------------------------------------------------------
def test_library_lora_of_the_family_applies_and_replays(ed, root):
    _, t = trained(ed.model_spec, root)
    lora = t.extra["lora_path"]
    b = ed.bundle
    before = model_state(b)
    req = _requests()["move"]
    plain = ed.edit(req)
    r = ed.edit(req, loras=[(lora, 1.0)])
    assert r.image.size == req.image.size and pixels(r) != pixels(plain)  # the LoRA changed the UNet's output
    assert model_state(b) == before  # removed afterwards
    assert [tuple(x) for x in r.recipe["loras"]] == [(lora, 1.0)]
    assert pixels(ed.edit(req, loras=[(lora, 1.0)])) == pixels(r)
    assert pixels(ed.replay(json.loads(json.dumps(r.recipe)))) == pixels(r)
    assert pixels(ed.edit(req)) == pixels(plain) and model_state(b) == before


def test_sdxl_lora_with_both_text_encoders_loads_and_is_removed(root):
    """An SDXL LoRA carrying text_encoder and text_encoder_2 layers changes the prompt's encoding while active
    and leaves both encoders (and the prompt cache) as they were afterwards."""
    from safetensors.torch import save_file

    from editing import lora_library

    ed = editor_for("tiny-sdxl")
    b = ed.bundle
    g = torch.Generator().manual_seed(1)
    sd = {}
    for part, te in (("text_encoder", b.text_encoder), ("text_encoder_2", b.text_encoder_2)):
        for n, m in te.named_modules():
            if n.endswith("self_attn.q_proj"):
                sd[f"{part}.{n}.lora_A.weight"] = torch.randn(2, m.in_features, generator=g)
                sd[f"{part}.{n}.lora_B.weight"] = torch.randn(m.out_features, 2, generator=g)
    path = root / "xl-te.safetensors"
    save_file(sd, str(path))
    lo = loading.load_lora(path)
    assert lo.family == "sdxl" and lo.text_encoder and lo.text_encoder_2
    before, plain = model_state(b), b.encode_prompt("a cat").clone()
    with lora_library.activate(b, [(str(path), 1.0)]):
        te_on = {k: sorted(getattr(m, "peft_config", {})) for k, m in (("1", b.text_encoder), ("2", b.text_encoder_2))}
        assert all(te_on.values())  # an adapter on each encoder
        changed = b.encode_prompt("a cat")
        d1 = (changed[:, :-1, :32] - plain[:, :-1, :32]).abs().max()  # text_encoder's half of the states
        d2 = (changed[:, :-1, 32:] - plain[:, :-1, 32:]).abs().max()  # text_encoder_2's half
        assert d1 > 0 and d2 > 0
    assert model_state(b) == before
    assert torch.equal(b.encode_prompt("a cat"), plain)


def test_lora_of_the_wrong_family_is_refused_naming_both(ed, root):
    other = next(s for s in SPECS if s != ed.model_spec)
    _, t = trained(other, root)
    lora = t.extra["lora_path"]
    made_for = loading.load_lora(lora).family
    b = ed.bundle
    before = model_state(b)
    with pytest.raises(EditError) as e:
        ed.edit(_requests()["move"], loras=[(lora, 1.0)])
    msg = str(e.value)
    assert "\n" not in msg and LABEL[made_for] in msg and LABEL[FAMILY[ed.model_spec]] in msg, msg
    assert model_state(b) == before


def test_mixed_family_stack_is_refused(ed, root):
    own = trained(ed.model_spec, root)[1].extra["lora_path"]
    other = trained(next(s for s in SPECS if s != ed.model_spec), root)[1].extra["lora_path"]
    b = ed.bundle
    before = model_state(b)
    with pytest.raises(EditError, match="mixes families") as e:
        ed.edit(_requests()["move"], loras=[(own, 1.0), (other, 0.5)])
    assert Path(own).name in str(e.value) and Path(other).name in str(e.value)
    assert model_state(b) == before
