"""CUDA-only checks: graph replay gives the eager results, and a drag runs end to end in fp16."""
import numpy as np
import pytest
import torch

from editing import cuda_graphs
from editing.drag import dragdiffusion as dd
from editing.geometry import points_to_grid
from editing.images import pil_to_tensor
from editing.lora import train_identity_lora
from editing.sampling import NoisePredictor, Schedule, invert
from tests.conftest import FAST, scene

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def no_capture_failures():
    before = dict(cuda_graphs.stats)
    yield
    assert cuda_graphs.stats["failed"] == before["failed"], "a CUDA graph capture fell back to eager"


@pytest.fixture(scope="module")
def cuda_bundle():
    from models.loader import load_bundle

    return load_bundle("tiny", device="cuda")


def _z0(b):
    x = pil_to_tensor(scene(128, 128)).to(b.device, b.dtype)
    return b.vae.encode(x).latent_dist.mean.float() * b.vae.config.scaling_factor


def test_graphed_inversion_matches_eager(cuda_bundle, monkeypatch):
    b, cond = cuda_bundle, cuda_bundle.encode_prompt("")
    s = Schedule.from_scheduler(b.scheduler, 10)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("DRAGCANVAS_CUDA_GRAPHS", flag)
        runs.append(invert(NoisePredictor(b.unet, cond, 1, device="cuda"), _z0(b), s, 3).z_t)
    assert torch.allclose(runs[0], runs[1], atol=1e-2)
    assert cuda_graphs.stats["captured"] >= 1


def test_graphed_drag_and_lora_match_eager(cuda_bundle, monkeypatch):
    b, cond = cuda_bundle, cuda_bundle.encode_prompt("")
    s = Schedule.from_scheduler(b.scheduler, 10)
    z_t = invert(NoisePredictor(b.unet, cond, 1, device="cuda"), _z0(b), s, 3).z_t
    h, g = points_to_grid([(40, 64)], (128, 128), (64, 64)), points_to_grid([(80, 64)], (128, 128), (64, 64))
    keep = torch.ones(1, 1, 16, 16, device="cuda")
    keep[..., 4:12, 4:12] = 0
    opts = dd.DragOptions(lr=0.01, max_steps=5, r_m=1, r_p=3, lam=0.1, step=1.0, preserve=False, steps_per_track=1,
                          patience=0)
    outs = [dd.optimize_latent(b.unet, z_t, s.timesteps[3], cond, s, h, g, (64, 64), opts, keep=keep, use_graphs=flag)
            for flag in (False, True)]
    assert np.allclose(outs[0].losses, outs[1].losses, rtol=5e-2, atol=1e-3)
    assert torch.allclose(outs[0].latent, outs[1].latent, atol=5e-2)
    z0 = _z0(b)
    losses = []
    for flag in ("0", "1"):
        monkeypatch.setenv("DRAGCANVAS_CUDA_GRAPHS", flag)
        got = []
        train_identity_lora(b.unet, (z0, torch.zeros_like(z0)), cond, b.scheduler.alphas_cumprod, steps=5, rank=4,
                            lr=5e-4, seed=0, losses=got)
        losses.append(got)
    assert np.allclose(losses[0], losses[1], rtol=5e-2, atol=1e-3)
    assert not getattr(b.unet, "peft_config", {})


def test_drag_end_to_end_on_cuda_counts_unet_calls():
    from editing.drag import DragRequest
    from editing.engine import Editor

    ed = Editor("tiny", device="cuda")
    m = np.zeros((64, 96), bool)
    m[10:50, 10:80] = True
    r = ed.drag(DragRequest(scene(), (((30, 30), (45, 30)),), m, **FAST))
    assert r.image.size == (96, 64)
    assert r.unet_calls["inversion"] == 7 and r.unet_calls["denoise"] == 14 and r.unet_calls["lora"] == 3 * 4
    assert ed.load().dtype == torch.float16
