"""Unit tests of the shared parts on the tiny model: inversion, hooks, attention, LoRA, drag math."""
import numpy as np
import pytest
import torch

from editing.drag import dragdiffusion as dd
from editing.features import FeatureCapture, run_for_features
from editing.geometry import points_to_grid, working_size
from editing.images import pil_to_tensor
from editing.kv_bank import BankAttnProcessor, BankControl, MemoryBank, Record, Replace, bank_attention, mutual_layers
from editing.lora import lora_adapter, train_identity_lora
from editing.sampling import NoisePredictor, Schedule, ddim_step, invert, unet_eps
from tests.conftest import scene


def _z0(bundle, w=64, h=64):
    x = pil_to_tensor(scene(w, h)).to(bundle.device, bundle.dtype)
    return bundle.vae.encode(x).latent_dist.mean.float() * bundle.vae.config.scaling_factor


def test_tiny_bundle_has_sd15_layout(bundle):
    assert bundle.vae_scale_factor == 8
    assert len(bundle.unet.down_blocks) == 4 and len(bundle.unet.up_blocks) == 4
    for i in (1, 2, 3):
        assert hasattr(bundle.unet.up_blocks[i], "attentions")
    assert bundle.tokenizer.model_max_length == 77
    assert bundle.encode_prompt("a red disk").shape[:2] == (1, 77)


def test_schedule_matches_dragdiffusion_default(bundle):
    s = Schedule.from_scheduler(bundle.scheduler, 50)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1
    assert s.timesteps[s.start_index(0.7)] == 681


def test_ddim_step_round_trip_is_exact():
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    up = ddim_step(x, eps, 0.9, 0.5)
    assert torch.allclose(ddim_step(up, eps, 0.5, 0.9), x, atol=1e-5)


@torch.no_grad()
def test_inversion_reconstruction_error_falls_with_more_steps(bundle):
    z0 = _z0(bundle)
    cond = bundle.encode_prompt("")
    errors = []
    for n in (4, 20):
        s = Schedule.from_scheduler(bundle.scheduler, n)
        inv = invert(NoisePredictor(bundle.unet, cond, 1), z0, s, 0)
        assert len(inv.latents) == n + 1
        x = inv.z_t
        for t in s.timesteps:
            x = ddim_step(x, unet_eps(bundle.unet, x, t, cond), s.alpha(t), s.alpha(t - s.stride))
        errors.append((x - z0).abs().mean().item())
    assert errors[1] < errors[0]


def test_feature_hooks_give_shapes_and_are_removed(bundle):
    z = torch.randn(1, 4, 8, 12)
    cond = bundle.encode_prompt("")
    eps, feats = run_for_features(bundle.unet, z, 500, cond, (1, 2), need_output=True)
    assert eps.shape == z.shape
    assert feats[2].shape == (1, bundle.unet.config.block_out_channels[1], 8, 12)  # up_blocks[2] at latent res
    assert feats[1].shape[-2:] == (4, 6)
    eps, feats = run_for_features(bundle.unet, z, 500, cond, (2,), need_output=False)
    assert eps is None and 2 in feats  # early stop: the last block never ran
    for blk in bundle.unet.up_blocks:
        assert not blk._forward_hooks
    with pytest.raises(RuntimeError):
        with FeatureCapture(bundle.unet, (2,)):
            raise RuntimeError("boom")
    assert not bundle.unet.up_blocks[2]._forward_hooks


def test_bank_attention_is_installed_then_restored(bundle):
    unet = bundle.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    names = mutual_layers(unet)
    assert names and all(".attn1." in n for n in names)
    with pytest.raises(ValueError):
        with bank_attention(unet, BankControl(MemoryBank("cpu"), Record()), names):
            assert isinstance(unet.attn_processors[names[0]], BankAttnProcessor)
            raise ValueError("error inside the edit")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


@torch.no_grad()
def test_mutual_attention_edited_branch_reads_original(bundle):
    """DragDiffusion's mutual self-attention through the bank: recording the original branch leaves it as it is;
    the edited branch reading it is steered; reading one's own recording is plain self-attention."""
    unet, cond = bundle.unet, bundle.encode_prompt("")
    a, b = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(1, 4, 8, 8)
    alone_a = unet_eps(unet, a, 400, cond)
    alone_b = unet_eps(unet, b, 400, cond)
    bank = MemoryBank("cpu")
    for strategy, x in ((Record(), a), (Replace(same_batch=True), b), (Replace(same_batch=True), a)):
        control = BankControl(bank, strategy)
        control.t, control.on = 400, True
        with bank_attention(unet, control, mutual_layers(unet)):
            out = unet_eps(unet, x, 400, cond)
        if isinstance(strategy, Record):
            assert torch.equal(out, alone_a)  # the original branch is untouched
        elif x is b:
            assert not torch.allclose(out, alone_b, atol=1e-4)  # the edited branch is steered
        else:
            assert torch.allclose(out, alone_a, atol=1e-5)


def test_identity_lora_loss_falls_and_adapter_is_removed(bundle):
    unet, cond = bundle.unet, bundle.encode_prompt("")
    z0 = _z0(bundle)
    probe = torch.randn(1, 4, 8, 8)
    base = unet_eps(unet, probe, 300, cond)
    losses = []
    state = train_identity_lora(unet, (z0, torch.zeros_like(z0)), cond, bundle.scheduler.alphas_cumprod,
                                steps=40, rank=4, lr=3e-3, batch=2, seed=0, losses=losses)
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert state and all("lora" in k for k in state)
    assert not getattr(unet, "peft_config", {})  # adapter deleted after training
    assert torch.equal(unet_eps(unet, probe, 300, cond), base)
    with lora_adapter(unet, state, rank=4):
        assert not torch.allclose(unet_eps(unet, probe, 300, cond), base)
    assert torch.equal(unet_eps(unet, probe, 300, cond), base)


def test_track_points_follows_a_shifted_feature_map():
    torch.manual_seed(0)
    feat0 = torch.randn(1, 8, 20, 20)
    shifted = torch.roll(feat0, shifts=(2, -1), dims=(2, 3))  # content moved down 2, left 1
    h0 = torch.tensor([[10.0, 10.0]])
    new = dd.track_points(feat0, shifted, h0, h0, r_p=3)
    assert new.tolist() == [[9.0, 12.0]]


def test_motion_supervision_gradient_pulls_content_toward_target():
    """One gradient step on the features makes the patch one step toward the target look like the handle's."""
    torch.manual_seed(0)
    feat = torch.randn(1, 4, 16, 16, requires_grad=True)
    h, g = torch.tensor([[5.0, 8.0]]), torch.tensor([[11.0, 8.0]])
    loss0 = dd.motion_supervision_loss(feat, h, g, r_m=1)
    loss0.backward()
    with torch.no_grad():
        feat2 = feat - 0.5 * feat.grad
    assert dd.motion_supervision_loss(feat2, h, g, r_m=1) < loss0
    arrived = dd.motion_supervision_loss(feat, h, h + 0.5, r_m=1)
    assert float(arrived) == 0.0


def _optimise(bundle, mask=None, steps=8):
    z0 = _z0(bundle, 128, 128)
    cond = bundle.encode_prompt("")
    s = Schedule.from_scheduler(bundle.scheduler, 10)
    start = s.start_index(0.7)
    z_t = invert(NoisePredictor(bundle.unet, cond, 1), z0, s, start).z_t
    grid = (64, 64)
    h = points_to_grid([(40, 64)], (128, 128), grid)
    g = points_to_grid([(80, 64)], (128, 128), grid)
    keep = None
    if mask is not None:
        keep = 1 - torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], z_t.shape[-2:])
    return z_t, dd.optimize_latent(bundle.unet, z_t, s.timesteps[start], cond, s, h, g, grid,
                                   _opts(max_steps=steps, lam=1.0), keep=keep)


def _opts(**changes) -> "dd.DragOptions":
    return dd.DragOptions(**{**dict(lr=0.01, max_steps=20, r_m=1, r_p=3, lam=0.1, step=1.0, preserve=False,
                                    steps_per_track=1, patience=0), **changes})


def test_motion_supervision_loss_falls_during_optimisation(bundle):
    _, out = _optimise(bundle)
    assert out.steps >= 2 and min(out.losses[1:]) < out.losses[0]


def test_unmasked_latent_stays_close(bundle):
    mask = np.zeros((128, 128), bool)
    mask[32:96, 16:112] = True
    z_t, out = _optimise(bundle, mask)
    change = (out.latent - z_t).abs()[0].mean(0)  # (h, w)
    inside = change[4:12, 2:14].mean()
    outside = torch.cat([change[:3].flatten(), change[13:].flatten()]).mean()
    assert outside < 0.5 * inside


def test_working_size_keeps_aspect_and_multiple():
    assert working_size((512, 341), 512, 64) == (512, 320)
    assert working_size((341, 512), 512, 64) == (320, 512)
    assert working_size((50, 2000), 256, 64) == (64, 256)


def test_lora_gradient_checkpointing_matches_plain_training(bundle):
    unet, cond = bundle.unet, bundle.encode_prompt("")
    z0 = _z0(bundle)
    runs = []
    for ckpt in (False, True):
        losses = []
        state = train_identity_lora(unet, (z0, torch.zeros_like(z0)), cond, bundle.scheduler.alphas_cumprod, steps=3,
                                    rank=2, lr=5e-4, batch=1, seed=1, grad_checkpointing=ckpt, losses=losses)
        runs.append((losses, state))
    assert np.allclose(runs[0][0], runs[1][0], rtol=1e-4)
    assert all(torch.allclose(runs[0][1][k], runs[1][1][k], atol=1e-5) for k in runs[0][1])
    assert not unet.is_gradient_checkpointing


def test_optimisation_stops_at_once_when_handles_have_arrived(bundle):
    z_t = torch.randn(1, 4, 8, 8)
    s = Schedule.from_scheduler(bundle.scheduler, 10)
    calls = []
    hook = bundle.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        h = torch.tensor([[10.0, 10.0]])
        out = dd.optimize_latent(bundle.unet, z_t, s.timesteps[3], bundle.encode_prompt(""), s, h, h + 1.0, (32, 32),
                                 _opts(), keep=None)
    finally:
        hook.remove()
    assert out.arrived and out.steps == 0 and out.losses == []
    assert len(calls) == 2  # the reference pass and the first check, nothing more
    assert torch.equal(out.latent, z_t)


def test_supervision_grid_keeps_four_cells_per_latent_cell():
    # SD-1.5: 64² latents of a 512² image -> the paper's 256² (half the image); a 4× VAE: the full image.
    assert dd.supervision_grid((64, 64)) == (256, 256)
    assert dd.supervision_grid((16, 24)) == (64, 96)
