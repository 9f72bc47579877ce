"""Every drag method on the SDXL and SD-2 (v-prediction) layouts (issue 16): output size, determinism,
replay, and the UNet's attention processors and hooks restored afterwards. Tiny random weights, CPU."""
import numpy as np
import pytest

from editing.drag import DragRequest, GuidedDragRequest
from editing.drag.instant import InstantDragRequest
from editing.drag.region import RegionDragRequest
from tests.conftest import scene

PAIR = (((20.0, 32.0), (32.0, 30.0)),)


def _mask(h=64, w=64):
    m = np.zeros((h, w), bool)
    m[16:48, 10:46] = True
    return m


REQUESTS = {
    "dragdiffusion": lambda img: DragRequest(img, PAIR, _mask(), lora_steps=2, max_steps=3, n_inference_steps=10),
    "gooddrag": lambda img: DragRequest(img, PAIR, _mask(), lora_steps=2, max_steps=2, n_inference_steps=10,
                                        drag_timesteps=2, preserve_handle=1),
    "diffeditor": lambda img: GuidedDragRequest(image=img, points=PAIR, mask=_mask(), n_inference_steps=10),
    "dragondiffusion": lambda img: GuidedDragRequest(image=img, points=PAIR, mask=_mask(), n_inference_steps=10,
                                                     method="dragondiffusion"),
    "instant": lambda img: InstantDragRequest(img, PAIR, _mask(), n_steps=6, inversion_strength=0.5),
    "region": lambda img: RegionDragRequest(image=img, points=PAIR, mask=_mask(), n_steps=6, radius=6),
}


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd2-v"])
def editor(request):
    from editing.engine import Editor

    e = Editor(request.param, resolution=64)
    e.load()
    return e


def _state(unet):
    procs = {n: type(p) for n, p in unet.attn_processors.items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return procs, hooks


@pytest.mark.parametrize("method", list(REQUESTS))
def test_drag_method_runs_on_the_family(editor, method):
    img = scene(64, 64, seed=3)
    unet = editor.bundle.unet
    before = _state(unet)
    a = editor.edit(REQUESTS[method](img))
    assert a.image.size == img.size
    assert _state(unet) == before, "processors or hooks left on the UNet"
    editor.clear_caches()  # the second run recomputes everything: determinism, not a cache hit
    b = editor.edit(REQUESTS[method](img))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    r = editor.replay(a.recipe)
    assert np.array_equal(np.asarray(a.image), np.asarray(r.image))
    assert np.asarray(a.image).std() > 0  # decoded, not blank


def test_an_image_far_below_the_native_size_is_upscaled_with_a_notice(editor):
    from editing.engine import Editor

    native = Editor(editor.model_spec)  # no resolution override: the family's own native size
    native._bundle = editor.bundle
    r = native.edit(REQUESTS["instant"](scene(64, 64, seed=3)))
    assert r.image.size == (64, 64)
    assert any("far below the model's" in n and editor.bundle.family.name in n for n in r.notices)
