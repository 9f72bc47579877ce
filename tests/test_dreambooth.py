"""DreamBooth-LoRA (editing/dreambooth/, editing/cli/personalize.py) on the tiny model at 64 px, few steps."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editing import dreambooth as db
from editing import lora_library as lib
from editing.sampling import unet_eps
from models.errors import EditCancelled, EditError
from tests.conftest import scene

# 64 px is the tiny model's smallest size (its pixel multiple); 2 class images at 2 DDIM steps.
FAST = {"steps": 6, "rank": 4, "lr": 3e-3, "prior_images": 2, "prior_steps": 2, "preview_steps": 2, "resolution": 64,
        "checkpoint_every": 0, "preview_every": 0}


@pytest.fixture(autouse=True)
def lora_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(lib.ENV_DIR, str(tmp_path / "loras"))
    return tmp_path / "loras"


@pytest.fixture(scope="module")
def photos():
    return (scene(64, 64, 0), scene(96, 64, 1), scene(48, 80, 2))


def bpe_tokenizer():
    """A CLIP byte-level BPE tokenizer with a few multi-letter merges, like SD-1.5's (offline)."""
    from transformers import CLIPTokenizer

    from models.tiny import _vocab

    vocab = dict(_vocab())
    merges = [("s", "k"), ("z", "q</w>"), ("sk", "s</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# ---- identifier, prompts, loss ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda b: b.tokenizer, lambda b: bpe_tokenizer()], ids=["char-level", "bpe"])
def test_identifier_is_one_rare_token_not_a_common_word(bundle, make):
    tok = make(bundle)
    ident = db.pick_identifier(tok)
    assert 1 <= len(ident) <= 3 and ident not in db.COMMON_WORDS
    assert len(tok(ident, add_special_tokens=False).input_ids) == 1
    n = len(tok("a dog", add_special_tokens=False).input_ids)
    assert len(tok(db.instance_prompt(ident, "dog"), add_special_tokens=False).input_ids) == n + 1
    assert db.pick_identifier(tok, avoid=[ident]) != ident
    ids = db.suggest_identifiers(tok, 3)
    assert ids[0] == ident and len(set(ids)) == len(ids)


def test_bpe_picker_prefers_the_rarest_multi_letter_token():
    tok = bpe_tokenizer()
    # "the"/"dog" are single tokens too, but common words; "sks" was merged after "zq" (rarer).
    assert db.suggest_identifiers(tok, 2) == ["sks", "zq"]


def test_user_identifier_is_checked(bundle):
    tok = bundle.tokenizer
    assert db.check_identifier(tok, "", "dog")[0] == db.pick_identifier(tok, avoid=["dog"])
    with pytest.raises(EditError, match="one word"):
        db.check_identifier(tok, "my dog", "dog")
    with pytest.raises(EditError, match="differ from the class noun"):
        db.check_identifier(tok, "dog", "dog")
    ident, notices = db.check_identifier(tok, "sks", "dog")  # 3 tokens in a char-level vocab
    assert ident == "sks" and "3 tokens" in notices[0]
    assert "common word" in db.check_identifier(tok, "cat", "dog")[1][-1]
    assert db.instance_prompt("sks", "dog") == "a sks dog" and db.class_prompt("dog") == "a dog"


def test_prior_preservation_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    pi, ei, pp, ep = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(4))
    total, inst, prior = db.prior_preservation_loss(pi, ei, pp, ep, weight=0.5)
    want_i = ((ei - pi) ** 2).mean()
    want_p = ((ep - pp) ** 2).mean()
    assert torch.allclose(inst, want_i) and torch.allclose(prior, want_p)
    assert torch.allclose(total, want_i + 0.5 * want_p)
    ones = torch.ones(1, 1, 2, 2)
    assert float(db.prior_preservation_loss(ones * 3, ones, ones * 2, ones, 2.0)[0]) == pytest.approx(4 + 2 * 1)
    total, _, prior = db.prior_preservation_loss(pi, ei, None, None, weight=1.0)
    assert float(prior) == 0 and torch.allclose(total, want_i)


# ---- training -----------------------------------------------------------------------------------------
def probe(bundle, prompt):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return unet_eps(bundle.unet, x, 300, bundle.encode_prompt(prompt))


def test_previews_reach_the_progress_callback_while_training(editor, photos):
    """Each preview is handed to the caller (``Run.preview`` -> the callback's ``preview``) as it is made."""
    class Stream:
        def __init__(self):
            self.seen = []  # ("progress", phase) / ("preview", step)

        def __call__(self, phase, frac, msg=""):
            self.seen.append(("progress", phase))

        def preview(self, step, image):
            self.seen.append(("preview", step, image.size))

    stream = Stream()
    r = editor.edit(db.PersonalizeRequest(photos[:2], "dog", name="streamed", **{**FAST, "steps": 2, "preview_every": 1}),
                    progress=stream)
    previews = [e for e in stream.seen if e[0] == "preview"]
    assert previews == [("preview", 1, (64, 64)), ("preview", 2, (64, 64))]
    assert stream.seen.index(previews[0]) < max(i for i, e in enumerate(stream.seen) if e == ("progress", "train"))
    assert r.extra["preview_steps"] == [1, 2]


def test_training_lowers_the_loss_and_the_lora_loads_back(editor, bundle, photos, lora_dir):
    base = probe(bundle, "a z dog")
    req = db.PersonalizeRequest(photos, "dog", **{**FAST, "steps": 30, "preview_every": 15})
    r = editor.edit(req)
    losses = r.extra["losses"]
    assert len(losses) == 30 and np.mean(losses[-10:]) < np.mean(losses[:10])
    path = lora_dir / f"{r.extra['lora_name']}.safetensors"
    card = json.loads(path.with_suffix(".json").read_text())
    assert r.extra["lora_path"] == str(path) and card["identifier"] == db.pick_identifier(bundle.tokenizer, ["dog"])
    assert card.items() >= {"class_noun": "dog", "base_model": "tiny", "steps": 30, "rank": 4, "prior_images": 2}.items()
    assert r.extra["preview_steps"] == [15, 30] and len(r.images) == 2 and r.image.size == (64, 64)
    assert sorted(p.name for p in (lora_dir / ".dreambooth" / path.stem / "previews").iterdir()) == \
        ["step-000015.png", "step-000030.png"]
    assert r.recipe["task"] == "personalize" and len(r.recipe["photos_png"]) == 3
    assert set(r.timings) >= {"priors", "train", "save"} and r.unet_calls["train"] == 30 * 2 + 2 * 2  # photo + prior each step; a 2-step CFG preview
    assert any("different sizes" in n for n in r.notices)
    # the model is untouched afterwards; the saved file loads back and changes outputs; unloading restores them
    assert torch.equal(probe(bundle, "a z dog"), base) and not getattr(bundle.unet, "peft_config", {})
    assert path.stem in [i.name for i in lib.list_loras()]
    with lib.activate(bundle, [(path.stem, 1.0)]):
        assert not torch.allclose(probe(bundle, "a z dog"), base)
    assert torch.equal(probe(bundle, "a z dog"), base)
    # class images are cached: a second run generates none
    again = editor.edit(db.PersonalizeRequest(photos[:2], "dog", name="second", **FAST))
    assert again.extra["priors_generated"] == 0 and "priors" not in again.unet_calls
    assert any("Reused 2 cached class image" in n for n in again.notices)


def test_cancel_saves_a_checkpoint_and_resume_finishes_the_same_lora(editor, bundle, photos, lora_dir, tmp_path):
    from safetensors.torch import load_file

    settings = {**FAST, "steps": 6, "prior_images": 1}
    ref = editor.edit(db.PersonalizeRequest(photos, "toy", name="ref", out_dir=str(tmp_path / "ref"), **settings))
    cancel = threading.Event()

    def progress(phase, frac, msg):
        if phase == "train" and frac >= 0.5:
            cancel.set()

    req = db.PersonalizeRequest(photos, "toy", name="cut", **settings)
    with pytest.raises(EditCancelled, match="Cancelled at step 3/6.*checkpoint"):
        editor.edit(req, progress=progress, cancel=cancel)
    assert not (lora_dir / "cut.safetensors").exists() and not getattr(bundle.unet, "peft_config", {})
    done = editor.edit(req)  # resume is on by default
    assert done.extra["resumed_from"] == 3 and any("Resumed" in n for n in done.notices)
    a, b = load_file(ref.extra["lora_path"]), load_file(done.extra["lora_path"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert done.extra["losses"] == pytest.approx(ref.extra["losses"], abs=1e-5)
    with pytest.raises(EditError, match="A LoRA named 'cut' already exists"):  # a taken name needs replace=True
        editor.edit(db.PersonalizeRequest(photos, "toy", name="cut", resume=False, **settings))
    fresh = editor.edit(db.PersonalizeRequest(photos, "toy", name="cut", resume=False, replace=True, **settings))
    assert fresh.extra["resumed_from"] == 0
    # the recipe replays to the same LoRA (it carries the photos as training saw them) once its name is free
    Path(ref.extra["lora_path"]).unlink()
    again = editor.replay(json.loads(json.dumps(ref.recipe)))
    c = load_file(again.extra["lora_path"])
    assert again.extra["lora_path"] == ref.extra["lora_path"] and all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_text_encoder_lora_round_trip_and_prompt_cache(editor, bundle, photos, lora_dir):
    r = editor.edit(db.PersonalizeRequest(photos[:2], "cat", train_text_encoder=True, prior_preservation=False,
                                          **{**FAST, "steps": 3, "lr": 1e-2}))
    from safetensors.torch import load_file

    keys = load_file(r.extra["lora_path"]).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    prompt = r.extra["card"]["instance_prompt"]
    before = bundle.encode_prompt(prompt).clone()
    with lib.activate(bundle, [(r.extra["lora_name"], 1.0)]):
        inside = bundle.encode_prompt(prompt)  # must not come from the cache filled before
    assert not torch.allclose(inside, before)
    assert torch.equal(bundle.encode_prompt(prompt), before)  # and the LoRA's embedding does not leak out
    assert not getattr(bundle.text_encoder, "peft_config", {})
    # the same LoRA in kohya/A1111 keys (lora_unet_*, lora_te_text_model_*, .alpha) loads to the same model
    from diffusers.utils import (
        convert_state_dict_to_kohya,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from safetensors.torch import save_file

    sd = load_file(r.extra["lora_path"])
    unet_part = convert_unet_state_dict_to_peft({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
    te_part = convert_state_dict_to_peft({k[13:]: v for k, v in sd.items() if k.startswith("text_encoder.")})
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet_part.items()}
                                        | {f"text_encoder.{k}": v for k, v in te_part.items()})
    kohya = {k.replace("lora_te1_encoder_", "lora_te_text_model_encoder_"): v for k, v in kohya.items()}
    assert any(k.startswith("lora_te_text_model_encoder_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    save_file(kohya, str(lora_dir / "a1111.safetensors"))
    with lib.activate(bundle, [("a1111", 1.0)]):
        assert torch.allclose(bundle.encode_prompt(prompt), inside, atol=1e-5)
    assert torch.equal(bundle.encode_prompt(prompt), before)


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_messages_then_training_still_works(editor, photos, tmp_path, lora_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with pytest.raises(EditError, match="No photos"):
        db.PersonalizeRequest((), "dog")
    with pytest.raises(EditError, match=r"No photos.*notes.txt"):
        db.PersonalizeRequest((str(notes),), "dog")
    for noun in ("", "   ", None):
        with pytest.raises(EditError, match="Class noun is empty"):
            db.PersonalizeRequest(photos, noun)
    with pytest.raises(EditError, match=r"steps=0 is outside"):
        db.PersonalizeRequest(photos, "dog", steps=0)
    one = db.PersonalizeRequest((photos[0],), "dog")
    assert any("Only 1 photo" in n for n in one.notices)
    folder = tmp_path / "photos"
    folder.mkdir()
    photos[0].save(folder / "a.png")
    photos[1].save(folder / "b.jpg")
    (folder / "readme.md").write_text("hi")
    mixed = db.PersonalizeRequest((str(folder),), "dog")
    assert len(mixed.photos) == 2 and any("Skipped 1 file" in n and "readme.md" in n for n in mixed.notices)
    assert any("different sizes (64×64, 96×64)" in n for n in mixed.notices)
    with pytest.raises(EditError, match="one word"):
        editor.edit(db.PersonalizeRequest(photos, "dog", identifier="two words", **FAST))
    r = editor.edit(db.PersonalizeRequest((str(folder),), "dog", name="after-errors", **{**FAST, "steps": 2}))
    assert r.extra["lora_name"] == "after-errors"


def test_cli_personalize(tmp_path, lora_dir, capsys, photos):
    from editing import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(photos[:2]):
        p.save(folder / f"{i}.png")
    (folder / "x.txt").write_text("skip me")
    out = tmp_path / "out"
    argv = ["personalize", "--images", str(folder), "--class-noun", "dog", "--model", "tiny", "--out", str(out),
            "--steps", "2", "--rank", "2", "--prior-images", "1", "--prior-steps", "2", "--preview-steps", "2",
            "--resolution", "64", "--name", "cli-dog", "--card", str(tmp_path / "card.json")]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert (out / "cli-dog.safetensors").is_file() and "Skipped 1 file" in err and "wrote" in err
    assert json.loads((tmp_path / "card.json").read_text())["steps"] == 2
    assert cli.main(argv[:1] + ["--images", str(tmp_path / "empty"), "--class-noun", "dog", "--model", "tiny"]) == 2
    assert "No photos" in capsys.readouterr().err
    assert cli.main(argv + ["--lora", "x"]) == 2 and "--lora is not used" in capsys.readouterr().err
    # the name is taken now: refused in one line unless --replace
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: A LoRA named 'cli-dog' already exists: choose another name, or ask to replace it."
    assert cli.main(argv + ["--replace"]) == 0
    # tiny photos are refused, saying the minimum
    (folder / "tiny.png").write_bytes(b"")
    Image.new("RGB", (7, 7)).save(folder / "tiny.png")
    assert cli.main(argv + ["--replace"]) == 2 and f"at least {db.MIN_PHOTO_SIDE} px" in capsys.readouterr().err
    (folder / "tiny.png").unlink()
    # the multi-GPU entry point is the same code path in one process
    from editing.cli import main

    assert main(["personalize", *argv[1:-2], "--name", "entry", "--steps", "1"]) == 0
    assert (out / "entry.safetensors").is_file()


def test_two_processes_train_one_lora(tmp_path, photos):
    """The multi-GPU entry (``accelerate launch -m editing personalize``) in 2 CPU processes (gloo):
    the same code path, DDP-averaged gradients, one LoRA written by the main process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(photos[:2]):
        p.save(folder / f"{i}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", lib.ENV_DIR: str(tmp_path / "lib")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "editing", "personalize", "--images", str(folder), "--class-noun", "dog", "--model", "tiny",
           "--steps", "2", "--rank", "2", "--prior-images", "2", "--prior-steps", "2", "--preview-steps", "2",
           "--resolution", "64", "--out", str(tmp_path / "out"), "--name", "ddp-dog"]
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    card = json.loads((tmp_path / "out" / "ddp-dog.json").read_text())
    assert card["processes"] == 2 and (tmp_path / "out" / "ddp-dog.safetensors").is_file()
    assert done.stderr.count("wrote ") == 1  # only the main process reports


# ---- issue 13: a cancelled run never reaches the library; names are not overwritten -------------------------
def _seeded_image(editor):
    from editing.generation import GenerateRequest

    r = editor.edit(GenerateRequest("a toy", width=64, height=64, n_inference_steps=2, seed=5))
    return np.asarray(r.image)


@pytest.mark.parametrize("when", ["train", "save"])
def test_cancelled_personalize_saves_nothing_and_restores_the_model(editor, bundle, photos, lora_dir, when):
    before = _seeded_image(editor)
    cancel = threading.Event()

    def progress(phase, frac, msg):
        if phase == when and (when == "save" or frac >= 0.5):
            cancel.set()  # "save": Cancel pressed while the final preview renders, after the last step

    req = db.PersonalizeRequest(photos[:2], "dog", name=f"cancelled-{when}", **FAST)
    with pytest.raises(EditCancelled, match="Cancelled at step"):
        editor.edit(req, progress=progress, cancel=cancel)
    assert not list(lora_dir.glob("*.safetensors")) and not list(lora_dir.glob("*.json"))  # nothing in the library
    assert [i.name for i in lib.list_loras()] == []
    work = lora_dir / ".dreambooth" / f"cancelled-{when}"
    metas = [json.loads(p.read_text()) for p in work.glob("step-*.json")]
    assert metas and all("resumable" in m["kind"] for m in metas)  # the only weights kept say what they are
    assert not getattr(bundle.unet, "peft_config", {}) and not getattr(bundle.text_encoder, "peft_config", {})
    np.testing.assert_array_equal(before, _seeded_image(editor))  # the shared model computes what it did


def test_a_taken_name_is_refused_before_training(editor, photos, lora_dir):
    lora_dir.mkdir(parents=True, exist_ok=True)
    (lora_dir / "taken.safetensors").write_bytes(b"someone else's")
    calls = []
    with pytest.raises(EditError, match="A LoRA named 'taken' already exists: choose another name"):
        editor.edit(db.PersonalizeRequest(photos[:2], "dog", name="taken", **FAST),
                    progress=lambda phase, frac, msg: calls.append(phase))
    assert "train" not in calls and "priors" not in calls
    assert (lora_dir / "taken.safetensors").read_bytes() == b"someone else's"
    done = editor.edit(db.PersonalizeRequest(photos[:2], "dog", name="taken", replace=True, **{**FAST, "steps": 2}))
    assert done.extra["lora_name"] == "taken" and lib.load_lora("taken").unet
    assert not [p for p in lora_dir.rglob("*.tmp")]  # atomic writes left no temp file
