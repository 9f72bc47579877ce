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
UI_PREFIX = {"instant": "instant_", "region": "region_", "diffeditor": "guided_", "dragondiffusion": "guided_"}


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
