"""DragonDiffusion / DiffEditor guided editing on the tiny model: schedules, memory bank, energies, z_T
placement, every task end to end, and bad input."""
import threading

import numpy as np
import pytest
import torch

from editing.drag import GuidedDragRequest
from editing.drag.guided import cells_around
from editing.geometry import mask_centre, place
from editing.guidance import energies, sampler
from editing.guidance.schedule import GuidedSchedule
from editing.kv_bank import decoder_layers
from editing.requests import AppearanceRequest, MoveRequest, PasteRequest
from models.errors import EditCancelled, EditError
from tests.conftest import scene

STEPS = dict(n_inference_steps=10)


def _working_size(editor, size):
    from editing.geometry import working_size

    b = editor.bundle
    return working_size(size, editor.resolution or b.native_resolution, b.pixel_multiple)


def box(h=64, w=64, y0=20, y1=40, x0=12, x1=30):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---- schedules ----------------------------------------------------------------------------------------
def test_diffeditor_schedule_matches_the_paper():
    s = GuidedSchedule("diffeditor", 50)
    guided = [i for i in range(50) if s.guided(i)]
    assert guided == list(range(10)) + [10, 12, 14, 16, 18, 20, 22, 24, 26, 28]  # 20 guided steps
    assert [i for i in range(50) if s.sde(i)] == list(range(11, 20))
    assert {i: s.repeats(i) for i in range(50) if s.repeats(i) > 1} == {22: 3, 24: 3, 26: 3, 28: 3}
    assert [i for i in range(50) if s.image_prompt(i)] == list(range(10, 20))


def test_dragondiffusion_schedule_guides_every_early_step_without_sde_or_time_travel():
    s = GuidedSchedule("dragondiffusion", 50)
    assert [i for i in range(50) if s.guided(i)] == list(range(30))
    assert not any(s.sde(i) or s.repeats(i) > 1 or s.image_prompt(i) for i in range(50))
    assert s.bank_active("move", 5) and not s.bank_active("drag", 4)
    assert s.bank_active("paste", 35) and not s.bank_active("appearance", 36)


# ---- geometry -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_place_moves_and_resizes_about_the_object_centre(scale):
    m = box(64, 96, 20, 30, 20, 30)  # 10×10 object, centre (24.5, 24.5)
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    out = place(t, mask_centre(m), scale, (30, 10), (96, 64))[0, 0].numpy() > 0.5
    cx, cy = mask_centre(out)
    assert (cx, cy) == pytest.approx((54.5, 34.5), abs=1.0)
    assert out.sum() == pytest.approx(100 * scale**2, rel=0.25)
    # The same warp on a coarser grid (latents, features) lands on the same place.
    coarse = place(torch.nn.functional.interpolate(t, (16, 24)), mask_centre(m), scale, (30, 10), (96, 64))
    ys, xs = np.nonzero(coarse[0, 0].numpy() > 0.5)
    assert ((xs.mean() + 0.5) * 4 - 0.5, (ys.mean() + 0.5) * 4 - 0.5) == pytest.approx((54.5, 34.5), abs=4.0)  # one cell


# ---- energies -----------------------------------------------------------------------------------------------
def test_energy_formula_and_that_it_falls_along_its_gradient(bundle):
    torch.manual_seed(0)
    sim = torch.tensor([0.5, 1.0])
    assert float(energies.energy(sim, 4.0)) == pytest.approx(4 / (1 + 4 * 0.75))
    unet = bundle.unet
    x = torch.randn(1, 4, 8, 8)
    ref = torch.randn(1, 4, 8, 8)
    cond = bundle.encode_prompt("")
    grid = (16, 16)
    hc, tc = [cells_around(torch.tensor([4.0, 8.0]), grid)], [cells_around(torch.tensor([10.0, 8.0]), grid)]
    outside = torch.zeros(grid, dtype=torch.bool)
    outside[:, 13:] = True

    def drag_energy(cur, r):
        return energies.drag_energies(cur, r, hc, tc, outside, 4.0, 6.0, 0.2)

    def total(z):
        with torch.no_grad():
            f = sampler.guidance_features(unet, torch.cat([z, ref]), 501, cond.expand(2, -1, -1), grid)
            e, c = drag_energy([g[:1] for g in f], [g[1:] for g in f])
        return float(e + c)

    g_edit, g_con = sampler.energy_gradients(unet, x, ref, 501, cond.expand(2, -1, -1), grid, drag_energy)
    g = g_edit + g_con
    assert g.abs().sum() > 0
    before = total(x)
    after = total(x - 0.5 * g / g.norm())
    assert after < before


# ---- memory bank and processors ---------------------------------------------------------------------------
def test_memory_bank_covers_every_decoder_self_attention_layer_and_step(editor, bundle):
    editor.clear_caches()
    procs_before = dict(bundle.unet.attn_processors)
    r = editor.edit(MoveRequest(image=scene(64, 64), mask=box(), offset=(10, 0), **STEPS))
    inv = next(iter(editor.caches.task("guided_inversion").values()))
    layers = decoder_layers(bundle.unet)
    assert layers and all(n.startswith("up_blocks") and ".attn1." in n for n in layers)
    assert inv.bank.layers == set(layers)
    assert inv.bank.timesteps == set(inv.schedule.timesteps)
    assert r.extra["memory_bank_mb"] > 0 and r.extra["bank_layers"] == len(layers)
    assert dict(bundle.unet.attn_processors) == procs_before  # processors restored
    editor.clear_caches()
    assert not editor.caches.task("guided_inversion")  # the bank is freed with the caches


def test_processors_restored_after_a_cancelled_edit(editor, bundle):
    procs_before = dict(bundle.unet.attn_processors)
    cancel = threading.Event()
    calls = []

    def progress(phase, frac, msg):
        calls.append(phase)
        if phase == "edit" and frac > 0.3:
            cancel.set()

    with pytest.raises(EditCancelled):
        editor.edit(GuidedDragRequest(image=scene(64, 64), points=(((20, 32), (34, 32)),), **STEPS),
                    progress=progress, cancel=cancel)
    assert dict(bundle.unet.attn_processors) == procs_before
    assert not any(h for h in bundle.unet._forward_hooks.values())
    # The next request still works.
    r = editor.edit(GuidedDragRequest(image=scene(64, 64), points=(((20, 32), (34, 32)),), **STEPS))
    assert r.image.size == (64, 64)


# ---- z_T placement -----------------------------------------------------------------------------------------
def test_move_puts_the_objects_inverted_noise_at_the_new_place(editor, bundle, monkeypatch):
    seen = {}
    real = sampler.guided_sample

    def spy(unet, inv, plan, *a, **k):
        seen["plan"], seen["inv"] = plan, inv
        return real(unet, inv, plan, *a, **k)

    monkeypatch.setattr(sampler, "guided_sample", spy)
    m = box(64, 64, 16, 32, 8, 24)
    editor.edit(MoveRequest(image=scene(64, 64), mask=m, offset=(24, 16), **STEPS))
    plan, inv = seen["plan"], seen["inv"]
    c = bundle.vae_scale_factor * 64 / _working_size(editor, (64, 64))[0]  # image px per latent cell
    def L(v):
        return round(v / c)
    z_inv, z_T = inv.latents[-1][:1], plan.z_T.cpu()
    src = z_inv[..., L(16): L(32), L(8): L(24)]
    dst = z_T[..., L(16 + 16): L(32 + 16), L(8 + 24): L(24 + 24)]
    assert torch.allclose(src, dst)
    assert torch.equal(z_T[..., :, : L(8)], z_inv[..., :, : L(8)])  # far from the object: unchanged
    assert plan.edit_region.sum() == pytest.approx(L(16) ** 2, abs=4 * L(16))


# ---- every task end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["diffeditor", "dragondiffusion"])
def test_guided_drag_end_to_end_and_replay(editor, method):
    req = GuidedDragRequest(image=scene(64, 48), points=(((22, 24), (36, 24)),), mask=box(48, 64, 8, 40, 8, 50),
                            method=method, **STEPS)
    r = editor.edit(req)
    assert r.image.size == (64, 48)
    assert r.recipe["task"] == "guided_drag" and r.recipe["params"]["method"] == method
    assert r.unet_calls["edit"] > 2 * 10  # CFG pass per step plus the feature passes of the guided steps
    np.testing.assert_array_equal(np.asarray(editor.replay(r.recipe).image), np.asarray(r.image))


def test_move_resize_paste_appearance_end_to_end(editor):
    img, ref = scene(64, 64), scene(64, 64, seed=3)
    for req in (MoveRequest(image=img, mask=box(), offset=(8, -4), scale=1.25, **STEPS),
                PasteRequest(image=img, reference=ref, reference_mask=box(), offset=(20, 0), scale=0.75, **STEPS),
                AppearanceRequest(image=img, mask=box(), reference=ref, reference_mask=box(64, 64, 10, 30, 40, 60),
                                  **STEPS)):
        r = editor.edit(req)
        assert r.image.size == (64, 64)
        diff = np.abs(np.asarray(r.image, np.float32) - np.asarray(img, np.float32)).mean()
        assert diff > 0  # something was edited
        assert editor.replay(r.recipe).image.tobytes() == r.image.tobytes()


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_messages(editor):
    img = scene(64, 64)
    cases = [
        (lambda: MoveRequest(image=img, mask=np.zeros((64, 64), bool), offset=(5, 0)), "empty"),
        (lambda: MoveRequest(image=img, mask=None, offset=(5, 0)), "paint the object"),
        (lambda: MoveRequest(image=img, mask=box(), offset=(5, 0), scale=0), "positive"),
        (lambda: MoveRequest(image=img, mask=box(), offset=(5, 0), scale=50), "outside"),
        (lambda: MoveRequest(image=img, mask=box(), offset=(float("nan"), 0)), "not finite"),
        (lambda: MoveRequest(image=img, mask=box(), offset=(0, 0)), "Nothing to do"),
        (lambda: PasteRequest(image=img, reference=img, reference_mask=None, offset=(3, 0)), "needs a mask"),
        (lambda: AppearanceRequest(image=img, mask=box(), reference=None, reference_mask=box()), "No reference"),
        (lambda: GuidedDragRequest(image=img, points=(((5, 5), (90, 5)),)), "outside"),
        (lambda: GuidedDragRequest(image=img, points=(((5, 5), (9, 5)),), method="magic"), "Unknown method"),
        (lambda: GuidedDragRequest(image=img, points=(((5, 5), (9, 5)),), energy_scale=float("nan")), "finite"),
    ]
    for make, words in cases:
        with pytest.raises(EditError, match=words):
            make()
    with pytest.raises(EditError, match="leave the image"):
        editor.edit(MoveRequest(image=img, mask=box(), offset=(200, 0), **STEPS))
    r = editor.edit(MoveRequest(image=img, mask=box(), offset=(40, 0), **STEPS))  # partly outside: clipped
    assert any("clipped" in n for n in r.notices)
    r = editor.edit(PasteRequest(image=img, reference=scene(40, 30), reference_mask=np.ones((30, 40), bool),
                                 offset=(0, 0), scale=0.5, **STEPS))
    assert any("resized" in n for n in r.notices)


def test_missing_ip_adapter_runs_without_the_image_prompt_and_says_so(editor):
    r = editor.edit(GuidedDragRequest(image=scene(64, 64), points=(((20, 32), (30, 32)),), ip_adapter="/no/such/adapter",
                                      **STEPS))
    assert any("Image prompt skipped" in n for n in r.notices)


def test_diffeditor_image_prompt_through_the_tiny_ip_adapter(editor, bundle):
    procs = dict(bundle.unet.attn_processors)
    base = dict(image=scene(64, 64), points=(((20, 32), (30, 32)),), mask=box(), **STEPS)
    plain = editor.edit(GuidedDragRequest(**base))
    with_ip = editor.edit(GuidedDragRequest(**base, ip_adapter="tiny", ip_scale=1.0))
    assert not any("Image prompt skipped" in n for n in with_ip.notices)
    assert with_ip.image.tobytes() != plain.image.tobytes()  # the image prompt acted (steps 10–19 of 50)
    assert dict(bundle.unet.attn_processors) == procs and bundle.unet.encoder_hid_proj is None
    again = editor.edit(GuidedDragRequest(**base))  # and left the UNet as it was
    assert again.image.tobytes() == plain.image.tobytes()
