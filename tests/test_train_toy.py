"""The toy model's training helpers: the shape-weighted loss and the decoder-only fine-tune."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from models import toy_world
from models.train_toy import build_vae, finetune_decoder, images_to_tensor, shape_weight


def test_shape_weight_counts_saturated_shape_pixels_not_gray_background():
    scene = toy_world.render([toy_world.Shape("disk", "cyan", "medium", (32.0, 32.0), 9.0)], "gray")
    x = images_to_tensor(np.asarray(scene.image)[None])
    w = shape_weight(x, 4.0)[0, 0]
    inside, outside = w[torch.from_numpy(scene.shapes[0].mask)], w[:16, :16]  # the disk spans 23..41
    assert outside.max() < 1.05  # gray background: saturation ~0
    assert inside.median() > 3.5  # cyan (40, 205, 215): saturation 0.69 -> weight 3.7 (edges anti-aliased)
    assert torch.equal(shape_weight(x, 0.0), torch.ones_like(x[:, :1]))


@pytest.mark.timeout(120)
def test_decoder_finetune_keeps_the_encoder_so_the_unet_stays_valid(tmp_path):
    torch.manual_seed(0)
    build_vae().save_pretrained(tmp_path / "vae")
    (tmp_path / "card.json").write_text("{}")
    from diffusers import AutoencoderKL

    before = AutoencoderKL.from_pretrained(tmp_path / "vae")
    args = argparse.Namespace(out=tmp_path, seed=0, vae_steps=3, vae_batch=2, vae_lr=1e-3, bf16_vae=0,
                              shape_weight=4.0, log_every=1, world="v1")
    info = finetune_decoder(args)
    after = AutoencoderKL.from_pretrained(tmp_path / "vae")
    enc_b, enc_a = before.encoder.state_dict(), after.encoder.state_dict()
    # fp16 on disk: the encoder is the same up to that rounding, the decoder has moved
    assert all(torch.allclose(enc_b[k].half().float(), enc_a[k].float()) for k in enc_b)
    assert any(not torch.allclose(v.half().float(), after.decoder.state_dict()[k].float())
               for k, v in before.decoder.state_dict().items())
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["vae_decoder_finetune"]["steps"] == 3 and card["vae_decoder_finetune"]["shape_weight"] == 4.0
    assert np.isfinite(info["shapes_psnr_db"]) and np.isfinite(info["heldout_psnr_db"])


# ---- --resume: the whole training state, checkpointed in either phase --------------------------------------
TINY_RUN = ["--world", "v2", "--minutes", "30", "--vae-steps", "3", "--unet-steps", "3", "--unet-scenes", "8",
            "--vae-batch", "2", "--unet-batch", "2", "--checkpoint-minutes", "0", "--bf16-vae", "0", "--log-every", "1",
            "--warmup", "1", "--keep-checkpoints", "20", "--eval-scenes", "4"]


def _weights(folder, part):
    from safetensors.torch import load_file

    return load_file(str(next((folder / part).glob("*.safetensors"))))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_continues_a_stopped_run_exactly_from_either_phase(tmp_path):
    import shutil

    from models import train_toy

    full = tmp_path / "full"
    assert train_toy.main(["--out", str(full)] + TINY_RUN) == 0  # --checkpoint-minutes 0: a checkpoint every step
    names = sorted(p.name for p in (full / ".train-state").iterdir())
    assert names[0] == "1vae-0000001" and names[-1] == "2unet-0000003" and json.loads(
        (full / "card.json").read_text())["world"] == "v2"
    for stop in ("1vae-0000002", "2unet-0000002"):  # stopped mid-VAE, stopped mid-UNet
        run = tmp_path / stop
        shutil.copytree(full, run)
        for p in (run / ".train-state").iterdir():
            if p.name > stop:
                shutil.rmtree(p)
        shutil.rmtree(run / "unet")  # nothing of the finished run's result survives
        assert train_toy.main(["--out", str(run), "--resume"]) == 0
        for part in ("vae", "unet", "text_encoder"):
            a, b = _weights(full, part), _weights(run, part)
            assert all(torch.equal(a[k], b[k]) for k in a), (stop, part)
        card = json.loads((run / "card.json").read_text())
        assert card["resumes"][-1]["step"] == int(stop[-7:]) and card["unet"]["steps"] == 3


def test_resume_with_a_missing_or_corrupt_checkpoint_says_what_to_delete(tmp_path, caplog):
    from models import train_toy
    from models.toy_parts import CheckpointError, TrainState, load_state, save_state

    assert train_toy.main(["--out", str(tmp_path), "--resume"]) == 2
    assert "no training checkpoint" in caplog.text and "without --resume" in caplog.text
    for step in (1, 2):
        save_state(tmp_path, TrainState("vae", step, {"w": torch.full((2,), float(step))}, {"losses": [0.5]}))
    assert load_state(tmp_path).step == 2
    newest = tmp_path / ".train-state" / "1vae-0000002"
    (newest / "tensors.safetensors").write_bytes(b"not a safetensors file")
    caplog.clear()
    state = load_state(tmp_path)  # the older one, with a warning naming the broken one
    assert state.step == 1 and torch.equal(state.tensors["w"], torch.ones(2)) and "1vae-0000002" in caplog.text
    (tmp_path / ".train-state" / "1vae-0000001" / "meta.json").write_text("{trunc")
    with pytest.raises(CheckpointError, match="Delete .*train-state"):
        load_state(tmp_path)
    assert train_toy.main(["--out", str(tmp_path), "--resume"]) == 2
