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
                              shape_weight=4.0, log_every=1)
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
