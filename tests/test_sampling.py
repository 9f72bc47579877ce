"""The one denoise loop and its hook points (editing/sampling.py), and the diffusers pipelines that stay:
their DDIM trajectory equals ours step for step, since drag-ready images reuse it."""
import torch

from editing.generation import GenerateRequest
from editing.sampling import Hook, NoisePredictor, Schedule, Trajectory, ddim_step, denoise, invert


def test_pipeline_trajectory_equals_the_shared_loop_step_for_step(editor):
    b = editor.load()
    req = GenerateRequest("a red disk", seed=4, width=64, height=64, n_inference_steps=6, guidance_scale=5.0)
    r = editor.edit(req)
    pipeline = list(reversed(editor.generation_of(r.image).inversion.latents))  # z_T … z_0
    f = b.vae_scale_factor
    x = torch.randn((1, b.unet.config.in_channels, 64 // f, 64 // f), generator=torch.Generator("cpu").manual_seed(4))
    schedule = Schedule.from_scheduler(b.scheduler, 6)
    ours = Trajectory(x)
    predict = NoisePredictor(b.unet, b.encode_prompt("a red disk"), 1, uncond=b.encode_prompt(""), guidance_scale=5.0)
    denoise(predict, x, schedule, hooks=[ours])
    assert len(pipeline) == len(ours.latents) == 7
    for k, (p, o) in enumerate(zip(pipeline, ours.latents)):
        assert torch.allclose(p.float().cpu(), o, atol=1e-4), f"step {k}: max diff {(p.float().cpu() - o).abs().max()}"


class _Count(Hook):
    def __init__(self, travel_at=None):
        self.calls, self.travel_at = [], travel_at

    def repeats(self, s):
        return 3 if s.i == self.travel_at else 1

    def before_unet(self, s):
        self.calls.append((s.i, s.stage))


def test_hook_points_run_in_order_and_time_travel_repeats_a_step(bundle):
    schedule = Schedule.from_scheduler(bundle.scheduler, 4)
    predict = NoisePredictor(bundle.unet, bundle.encode_prompt(""), 1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, travel = _Count(), _Count(travel_at=1)
    a = denoise(predict, x, schedule, hooks=[plain])
    denoise(predict, x, schedule, hooks=[travel], renoise=predict)
    assert plain.calls == [(i, "step") for i in range(4)]
    assert travel.calls == [(0, "step"), (1, "step"), (1, "renoise"), (1, "step"), (1, "renoise"), (1, "step"),
                            (2, "step"), (3, "step")]
    manual = x.clone()
    for t in schedule.timesteps:  # no hooks: exactly the DDIM recursion
        manual = ddim_step(manual, predict(manual, t), schedule.alpha(t), schedule.alpha(t - schedule.stride))
    assert torch.equal(a, manual)


def test_inversion_round_trip_error_falls_with_more_steps(bundle):
    cond = bundle.encode_prompt("")
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    errs = []
    for n in (4, 20):
        s = Schedule.from_scheduler(bundle.scheduler, n)
        start = s.start_index(0.5)
        predict = NoisePredictor(bundle.unet, cond, 1)
        inv = invert(predict, z0, s, start)
        errs.append((denoise(predict, inv.z_t, s, start) - z0).abs().mean().item())
    assert errs[1] < errs[0]
