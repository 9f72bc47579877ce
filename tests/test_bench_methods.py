"""One method table for every benchmark: each method runs on the tiny model through the same call, settings
go where they belong, and one toy_drag run scores several methods against noop on the same scenes.

Scores of the tiny model's random weights mean nothing: only sizes, call counts, routing and the
ratio bookkeeping are checked.
"""
import json
import math

import numpy as np
import pytest

from bench import dragbench, perf, toy_drag
from bench import methods as bm
from models.errors import EditError
from tests.conftest import scene

ISSUE_METHODS = {"dragdiffusion", "gooddrag", "diffeditor", "dragondiffusion", "instant", "region", "inpaint", "noop"}
# Short schedules, so each edit is a second or two on the tiny model; only fields the method's request has.
SHORT = {"lora_steps": 1, "n_inference_steps": 4, "inversion_strength": 0.5, "max_steps": 2, "n_steps": 2}


def _short(name: str) -> dict:
    table = bm.fields(name)
    return {k: v for k, v in SHORT.items() if k in table}




def test_both_benchmarks_know_every_method():
    assert set(bm.METHODS) == ISSUE_METHODS
    assert set(dragbench.METHODS) == ISSUE_METHODS  # DragBench's mask is the editable area: no move there
    assert set(toy_drag.METHODS) == ISSUE_METHODS | {"move"}
    for name in ("instant", "region", "gooddrag", "inpaint"):  # perf offers each newer method as a mode
        assert name in perf.MODES
    assert all(m.about for m in toy_drag.METHODS.values())


@pytest.mark.parametrize("name", sorted(ISSUE_METHODS))
def test_each_method_runs_through_the_shared_call(name, editor):
    img = scene(64, 64)
    mask = np.zeros((64, 64), bool)
    mask[12:52, 8:48] = True
    points = (((22.0, 32.0), (34.0, 30.0)),)
    out = bm.run_method(name, editor, img, points, mask, "a red ball and a blue box", _short(name))
    image, calls, seconds = out  # unpacks as the brief's (image, unet_calls, seconds)
    assert image.size == img.size
    if name == "noop":
        assert image is img and calls == 0 and seconds == 0 and out.result is None
    else:
        assert calls == sum(out.result.unet_calls.values()) > 0 and seconds > 0
        assert image.mode == "RGB"


def test_bad_input_is_an_edit_error_for_every_method(editor):
    img = scene(64, 64)
    for name in sorted(ISSUE_METHODS - {"noop"}):
        with pytest.raises(EditError, match="outside"):
            bm.run_method(name, editor, img, (((10.0, 10.0), (90.0, 10.0)),), None, "", _short(name))


def test_settings_go_to_the_methods_that_have_them():
    names = ["dragdiffusion", "diffeditor"]
    got = bm.parse_settings(["n_inference_steps=8", "dragdiffusion.max_steps=40", "latent_lr=0.02"], names)
    assert got == {"dragdiffusion": {"n_inference_steps": 8, "max_steps": 40, "latent_lr": 0.02},
                   "diffeditor": {"n_inference_steps": 8}}  # latent_lr is DragDiffusion's only
    assert isinstance(got["dragdiffusion"]["max_steps"], int)
    assert bm.parse_settings(["w_edit=3"], names)["diffeditor"] == {"w_edit": 3.0}  # a guided field (default None)
    with pytest.raises(EditError, match="no chosen method has a field 'stepz'"):
        bm.parse_settings(["stepz=3"], names)
    with pytest.raises(EditError, match="'instant' is not among the chosen methods"):
        bm.parse_settings(["instant.n_inference_steps=3"], names)
    with pytest.raises(EditError, match="max_steps"):
        bm.parse_settings(["max_steps=-1"], names)
    with pytest.raises(EditError, match="FIELD=VALUE"):
        bm.parse_settings(["max_steps"], names)
    with pytest.raises(EditError, match="Unknown method 'dragan'"):
        bm.lookup("dragan")


def test_toy_drag_scores_several_methods_and_noop_in_one_table(tmp_path, capsys):
    """One run, one table: noop first on the same scenes, every method's MD / noop from that noop."""
    js = tmp_path / "toy.json"
    args = ["--model", "tiny", "--n", "2", "--methods", "diffeditor", "--method", "move",
            "--set", "n_inference_steps=4", "--json", str(js)]
    assert toy_drag.main(args) == 0
    report = json.loads(js.read_text())
    runs = {r["method"]: r for r in report["runs"]}
    assert list(runs) == ["noop", "diffeditor", "move"] and report["methods"] == ["diffeditor", "move"]
    noop = runs["noop"]
    assert noop["md_vs_noop"] == 1.0 and noop["unet_calls"] == 0 and noop["lost"] == 0
    cases = toy_drag.make_cases(2)
    assert noop["md"] == pytest.approx(np.mean([math.dist(c.handle, c.target) for c in cases]), abs=1.0)
    for name in ("diffeditor", "move"):
        r = runs[name]
        assert r["n"] == 2 and r["unet_calls"] > 0 and r["settings"] == {"n_inference_steps": 4}
        assert r["md_vs_noop"] == pytest.approx(r["md"] / noop["md"])
        assert [c["seed"] for c in r["cases"]] == [c["seed"] for c in noop["cases"]]  # the same scenes
    table = capsys.readouterr().out
    assert table.count("| noop |") == 1 and "| diffeditor (n_inference_steps=4) |" in table

    # The map over cases is a seam: another evaluator (a pool would run jobs anywhere, in any order)
    # returning the rows in the jobs' order gives the same report.
    def backwards(jobs, model):
        return list(reversed(toy_drag.evaluate(list(reversed(jobs)), model)))

    again = toy_drag.run_all(["diffeditor"], 2, "tiny", {"diffeditor": {"n_inference_steps": 4}}, backwards)
    assert [r["md"] for r in again] == pytest.approx([runs["noop"]["md"], runs["diffeditor"]["md"]])


def test_toy_drag_refuses_unknown_methods_and_fields(capsys):
    with pytest.raises(SystemExit):
        toy_drag.main(["--methods", "diffeditor,dragan", "--n", "1"])
    assert "unknown method(s) dragan" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_drag.main(["--methods", "diffeditor", "--set", "latent_lr=0.02", "--n", "1"])
    assert "no chosen method has a field 'latent_lr'" in capsys.readouterr().err
