"""One method table (editing/drag/methods.py): the UI, the CLI and the benchmarks build the same request for the same
method and inputs, GoodDrag's preset included; names, labels and aliases resolve in any case."""
import numpy as np
import pytest
from PIL import Image

from bench import methods as bm
from editing.cli import build_parser
from editing.cli.common import flag
from editing.cli.drag import drag_request as cli_request
from editing.drag.methods import DEFAULT_METHOD, METHODS, lookup
from editing.images import load_mask
from models.errors import EditError
from tests.conftest import scene
from ui import drag_methods

POINTS = (((22.0, 30.0), (40.0, 28.0)),)
UI_PREFIX = {"instant": "instant_", "region": "region_", "inpaint": "inpaint_", "diffeditor": "guided_",
             "dragondiffusion": "guided_"}


def _changed(name: str) -> dict:
    """Two settings of the method's own table, at values other than their defaults (and GoodDrag's preset)."""
    m = METHODS[name]
    out = {}
    for field, spec in m.fields.items():
        if isinstance(spec.default, int) and not isinstance(spec.default, bool) and spec.hi > (spec.default or 0) + 1:
            out[field] = int(spec.default or spec.lo) + 1
            if out[field] == m.preset.get(field):
                out[field] += 1
        if len(out) == 2:
            return out
    raise AssertionError(f"{name}: no integer settings to vary")


def _same(a, b) -> None:
    assert type(a) is type(b)
    assert a.params() == b.params()
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize("name", list(METHODS))
def test_ui_cli_and_bench_build_the_same_request(name, tmp_path):
    image, mask = scene(64, 64), np.zeros((64, 64), bool)
    mask[10:50, 10:54] = True
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    settings = _changed(name)

    bench = bm.build_request(name, image, POINTS, load_mask(str(tmp_path / "mask.png")), "a red ball", settings)
    prefix = UI_PREFIX.get(name, "")
    ui = drag_methods.drag_request(str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "[[22, 30], [40, 28]]",
                                   "a red ball", {"method": METHODS[name].label, **{prefix + k: v
                                                                                      for k, v in settings.items()}})
    argv = ["drag", "--method", name, "--image", str(tmp_path / "in.png"), "--points", "22,30>40,28",
            "--mask", str(tmp_path / "mask.png"), "--prompt", "a red ball"]
    for k, v in settings.items():
        argv += [flag(k), str(v)]
    cli = cli_request(build_parser().parse_args(argv))
    _same(bench, ui)
    _same(bench, cli)
    for k, v in settings.items():
        assert getattr(bench, k) == v  # what was set wins over any preset
    for k, v in METHODS[name].preset.items():
        if k not in settings:
            assert getattr(bench, k) == v  # the preset fills the rest (GoodDrag)


def test_names_labels_and_aliases_in_any_case():
    assert lookup("GoodDrag").name == lookup("gooddrag").name == "gooddrag"
    assert lookup("FASTDRAG").name == "instant" and lookup("RegionDrag").name == "region"
    assert lookup(None).name == "dragdiffusion"  # API clients naming no method get what they always got
    assert lookup("default").name == DEFAULT_METHOD == drag_methods.METHODS[drag_methods.DEFAULT_METHOD]
    assert bm.lookup("default").name == DEFAULT_METHOD
    with pytest.raises(EditError, match="Unknown method 'magic'"):
        lookup("magic")
    assert all(m.cost and m.fields for m in METHODS.values())
    assert [m.name for m in METHODS.values() if m.trains] == ["dragdiffusion", "gooddrag"]


# ---- pins: a pair whose target is its handle ------------------------------------------------------------------
SHORT = {"lora_steps": 1, "n_inference_steps": 4, "inversion_strength": 0.5, "max_steps": 2, "n_steps": 4}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_takes_a_pin_beside_a_drag(name, editor):
    """A pin outside the mask is allowed (it just stays); the edit runs, and its recipe replays with the pin."""
    mask = np.zeros((64, 64), bool)
    mask[10:40, 10:40] = True
    points = (((20.0, 24.0), (30.0, 24.0)), ((52.0, 52.0), (52.0, 52.0)))
    settings = {k: v for k, v in SHORT.items() if k in METHODS[name].fields}
    req = lookup(name).request(scene(64, 64), points, mask, "", settings)
    assert req.points[1] == ((52.0, 52.0), (52.0, 52.0))
    result = editor.edit(req)
    assert result.image.size == (64, 64)
    again = editor.replay(result.recipe)
    assert again.recipe["params"]["points"] == result.recipe["params"]["points"]


def test_pins_in_points_text_and_their_limits():
    from editing.drag.common import check_points, parse_points

    assert parse_points("10,20>30,20; 5,5") == (((10.0, 20.0), (30.0, 20.0)), ((5.0, 5.0), (5.0, 5.0)))
    assert check_points((((10, 10), (10.4, 10.2)), ((3, 3), (9, 3))), (64, 64))[0] == ((10.0, 10.0), (10.0, 10.0))
    with pytest.raises(EditError, match="Every point is pinned"):
        check_points((((10, 10), (10, 10)),), (64, 64))
    mask = np.zeros((64, 64), bool)
    mask[:20, :20] = True
    with pytest.raises(EditError, match="Handle 1 .* is outside the mask"):
        lookup("instant").request(scene(64, 64), (((40, 40), (50, 40)),), mask)
    lookup("instant").request(scene(64, 64), (((10, 10), (15, 10)), ((40, 40), (40, 40))), mask)  # a pin may
