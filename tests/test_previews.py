"""Feedback while a run goes (editing/previews.py, Run.trail): x̂₀ previews during sampling, the handle trail of
the drag optimisation; neither changes a pixel of the result, and a run nobody watches does no extra work."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from editing.drag import DragRequest
from editing.runtime import Run
from models.errors import EditError
from tests.conftest import FAST, scene

PAIR = (((30.0, 32.0), (45.0, 30.0)),)


class Plain:
    """A progress callback without images or trail (as the CLI's)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, phase, frac, msg):
        self.calls += 1


class Watching(Plain):
    """A progress callback that shows previews and the trail (what ui.feedback.LiveProgress offers)."""

    def __init__(self):
        super().__init__()
        self.previews, self.trails, self.phases = [], [], []

    def __call__(self, phase, frac, msg):
        super().__call__(phase, frac, msg)
        self.phase = phase

    def preview(self, step, image):
        self.previews.append((step, image))
        self.phases.append(self.phase)

    def trail(self, points):
        self.trails.append(points)


def _mask(w=96, h=64):
    m = np.zeros((h, w), bool)
    m[10:55, 15:70] = True
    return m


def test_run_forwards_trail_and_previews_only_to_callbacks_that_take_them(bundle):
    watch = Watching()
    run = Run(bundle.unet, watch, None)
    assert run.wants_trail and run.wants_previews
    run.trail([(1, 2.5), (3, 4)])
    assert watch.trails == [[(1.0, 2.5), (3.0, 4.0)]]
    plain = Run(bundle.unet, Plain(), None)
    assert not plain.wants_trail and not plain.wants_previews
    plain.trail([(1, 2)])  # nobody listens: nothing happens, nothing fails
    none = Run(bundle.unet, None, None)
    none.trail([(1, 2)]) or none.preview(1, None)
    for r in (run, plain, none):
        r.close()


def test_drag_previews_and_trail_do_not_change_the_result(editor):
    req = DragRequest(scene(seed=31), PAIR, _mask(), **{**FAST, "n_inference_steps": 16})
    editor.clear_caches()
    plain = editor.drag(req, progress=Plain())
    editor.clear_caches()
    watch = Watching()
    seen = editor.drag(req, progress=watch)
    editor.clear_caches()
    none = editor.drag(req)
    assert np.array_equal(np.asarray(plain.image), np.asarray(seen.image))
    assert np.array_equal(np.asarray(none.image), np.asarray(seen.image))
    assert plain.unet_calls == seen.unet_calls  # previews decode with the VAE; the UNet does no extra work
    # previews: during the edited branch's sampling, before the result, working-image sized
    n = round(0.7 * 16)
    assert 1 <= len(watch.previews) < n
    steps = [s for s, _ in watch.previews]
    assert steps == sorted(steps) and all(1 <= s < n for s in steps)
    assert set(watch.phases) == {"denoise"}
    from editing.geometry import working_size

    b = editor.load()
    work = working_size((96, 64), editor.options.resolution or b.native_resolution, b.pixel_multiple)
    assert all(im.size == work for _, im in watch.previews)  # the working image's size
    # trail: the start, then one entry per tracking update, each a point per pair in image pixels
    assert watch.trails[0] == [pytest.approx(PAIR[0][0], abs=1e-4)]
    assert all(len(t) == 1 and len(t[0]) == 2 for t in watch.trails)
    assert len(watch.trails) >= 2


def test_trail_moves_toward_the_target_on_toy():
    from bench.toy_drag import make_cases
    from editing.engine import Editor

    ed = Editor("toy")
    case = make_cases(1)[0]
    watch = Watching()
    r = ed.drag(DragRequest(case.scene.image, ((case.handle, case.target),), case.mask, prompt=case.scene.caption,
                            lora_steps=0, n_inference_steps=20, max_steps=60), progress=watch)
    dists = [math.dist(t[0], case.target) for t in watch.trails]
    assert dists[0] == pytest.approx(math.dist(case.handle, case.target), abs=1e-3)
    assert dists[-1] < dists[0] - 4, dists  # pixels closer, step by step
    assert sum(b < a for a, b in zip(dists, dists[1:])) > sum(b > a for a, b in zip(dists, dists[1:])), dists
    assert math.dist(r.final_points[0], watch.trails[-1][0]) < 1e-6
    assert len(watch.previews) >= 1


def _tiny_taesd(folder):
    """A random-weight AutoencoderTiny of the toy/tiny latent layout, saved like a downloaded TAESD."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                    latent_channels=4).save_pretrained(folder)


def test_preview_decoder_uses_a_local_taesd_and_refuses_a_bad_folder(editor, tmp_path):
    from editing.context import EditContext
    from editing.previews import PreviewDecoder, SamplePreviews, preview_decoder

    _tiny_taesd(tmp_path / "taesd")
    b = editor.load()
    dec = PreviewDecoder(b, str(tmp_path / "taesd"))
    assert dec.kind == "taesd"
    z = torch.randn(1, 4, 8, 16)
    f = b.vae_scale_factor
    assert dec(z).size == (16 * f, 8 * f)
    own = PreviewDecoder(b)
    assert own.kind == "vae-half" and own(z).size == (16 * f, 8 * f)
    with pytest.raises(EditError, match="preview decoder"):
        PreviewDecoder(b, str(tmp_path / "missing"))
    # through the engine's options, cached once
    ctx = EditContext(b, Run(b.unet, Watching(), None), editor.caches,
                      dataclasses.replace(editor.options, preview_decoder=str(tmp_path / "taesd")))
    assert preview_decoder(ctx) is preview_decoder(ctx) and preview_decoder(ctx).kind == "taesd"
    assert isinstance(SamplePreviews(ctx.run, dec).decoder, PreviewDecoder)
    ctx.run.close()
    editor.caches.task("preview_decoder").clear()


def test_sample_previews_on_the_shared_loop_every_k_steps(bundle):
    """Any ``sampling.denoise`` call takes the hook: previews every ``every`` steps (never the last), same z₀."""
    from editing.previews import PreviewDecoder, SamplePreviews
    from editing.sampling import NoisePredictor, Schedule, denoise

    s = Schedule.from_scheduler(bundle.scheduler, 8)
    cond = bundle.encode_prompt("a red disk")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    watch = Watching()
    watch.phase = "sample"
    run = Run(bundle.unet, watch, None)
    predict = NoisePredictor(bundle.unet, cond, 1, device=x.device)
    plain = denoise(predict, x, s)
    hook = SamplePreviews(run, PreviewDecoder(bundle), every=3)
    seen = denoise(predict, x, s, hooks=[hook], run=run)
    run.close()
    assert torch.equal(plain, seen)
    assert [step for step, _ in watch.previews] == [3, 6] and hook.shown == 2
    f = bundle.vae_scale_factor
    assert all(im.size == (8 * f, 8 * f) for _, im in watch.previews)


def test_guided_previews_appear_while_sampling_and_do_not_change_the_result(editor):
    from editing.drag import GuidedDragRequest

    req = GuidedDragRequest(image=scene(seed=32), points=PAIR, mask=_mask(), n_inference_steps=12)
    editor.clear_caches()
    plain = editor.edit(req, progress=Plain())
    editor.clear_caches()
    watch = Watching()
    seen = editor.edit(req, progress=watch)
    assert np.array_equal(np.asarray(plain.image), np.asarray(seen.image))
    assert plain.unet_calls == seen.unet_calls
    assert watch.previews and set(watch.phases) == {"edit"}
