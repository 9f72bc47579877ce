"""Model specs: built-ins, local diffusers folders, single files, pickles, caching — all offline."""
import pytest
import torch

from models import loader
from models.errors import EditError
from models.tiny import build_components


def test_bundle_is_loaded_once_per_process():
    a = loader.load_bundle("tiny", device="cpu")
    assert loader.load_bundle("tiny", device="cpu") is a
    assert a.dtype == torch.float32 and a.device.type == "cpu"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    pipe = StableDiffusionPipeline(**build_components("tiny", seed=1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_local_diffusers_folder_loads_same_weights(tiny_folder):
    b = loader.load_bundle(str(tiny_folder), device="cpu")
    ref = build_components("tiny", seed=1)["unet"]
    assert b.source == "folder" and b.vae_scale_factor == 8
    assert torch.equal(b.unet.conv_in.weight, ref.conv_in.weight)
    assert type(b.scheduler).__name__ == "DDIMScheduler"
    assert b.tokenizer("a red disk").input_ids == build_components("tiny")["tokenizer"]("a red disk").input_ids


def test_folder_with_only_pickle_weights_is_refused(tiny_folder, tmp_path):
    import shutil

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_folder, bad)
    for f in bad.rglob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(EditError, match="pickle"):
        loader.load_bundle(str(bad), device="cpu")


@pytest.mark.parametrize("spec, words", [
    ("model.ckpt", "pickle checkpoint"),
    ("missing.safetensors", "does not exist"),
    ("", "No model given"),
    ("just-a-word", "Unknown model"),
])
def test_bad_specs_say_what_to_do(spec, words):
    with pytest.raises(EditError, match=words):
        loader.load_bundle(spec, device="cpu")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(EditError, match="model_index.json"):
        loader.load_bundle(str(tmp_path), device="cpu")


def test_single_file_without_cached_tokenizer_is_explained(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(f))
    with pytest.raises(EditError, match="tokenizer"):
        loader.load_bundle(str(f), device="cpu")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(EditError, match="Hugging Face Hub"):
        loader.load_bundle("someone/not-cached-model", device="cpu")


def test_toy_model_ships_and_is_the_offline_default(monkeypatch):
    """The trained toy model (models/toy) loads through the same path as a Hub model: 4× VAE read from its
    config, 64² native size; without SD-1.5 it is what `auto` starts on, with a banner that says so."""
    from models import choose, loader

    assert choose.toy_available(), "models/toy is part of the repository"
    b = loader.load_bundle("toy")
    assert b.name == "toy" and b.source == "builtin"
    assert b.vae_scale_factor == 4 and b.native_resolution == 64
    assert b.vae.dtype == torch.float32  # fp16 on disk, fp32 on the CPU
    monkeypatch.setattr(choose, "sd15_available", lambda timeout_s=5.0: (False, "offline"))
    choose.resolve_auto.cache_clear()
    try:
        spec, banner = choose.resolve_auto()
    finally:
        choose.resolve_auto.cache_clear()
    assert spec == "toy" and "'toy'" in banner and "examples" in banner


def test_toy_drag_moves_the_shape():
    """On the trained toy model a DiffEditor drag of a held-out scene moves the shape toward the target
    (the second case of bench.toy_drag: 6.5 px -> 2.7 px with the published defaults)."""
    from bench.toy_drag import make_cases, measure
    from editing.drag import GuidedDragRequest
    from editing.engine import Editor

    toy = Editor("toy")
    case = make_cases(2)[1]
    r = toy.edit(GuidedDragRequest(image=case.scene.image, points=((case.handle, case.target),), mask=case.mask,
                                   prompt=case.scene.caption, method="diffeditor"))
    m = measure(case, r.image)
    noop = measure(case, case.scene.image)
    assert not m["lost"] and m["md"] < noop["md"]
