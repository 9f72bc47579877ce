"""The shapes drag benchmark's metric: a perfect drag scores ~0 px, the input scores the drag distance."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from bench import toy_drag
from models import toy_world as tw
from models.errors import EditError


def test_metric_rewards_a_perfect_drag_and_not_the_input():
    cases = toy_drag.make_cases(6)
    for case in cases:
        d = math.dist(case.handle, case.target)
        assert 6 <= d <= 20 and case.mask[int(case.handle[1]), int(case.handle[0])]
        assert case.mask[int(case.target[1]), int(case.target[0])]
        noop = toy_drag.measure(case, case.scene.image)
        assert abs(noop["md"] - d) < 1.0 and not noop["success"]
        dx, dy = case.target[0] - case.handle[0], case.target[1] - case.handle[1]
        others = [s for s in case.scene.shapes if s is not case.shape]
        ideal = tw.render(others + [case.shape.moved(dx, dy)], case.scene.background).image
        good = toy_drag.measure(case, ideal)
        assert good["md"] < 1.5 and good["success"] and good["kept"] and not good["lost"]
        assert good["bg_psnr"] > 30  # the background outside the mask is untouched
        swapped = tw.render(others + [case.shape.moved(dy, dx)], case.scene.background).image
        if abs(dx - dy) > 4:  # an (x, y) <-> (row, col) mix-up is caught
            assert not toy_drag.measure(case, swapped)["success"]


def test_the_tuning_split_shares_no_scene_with_the_benchmark_or_training():
    bench = {c.scene.seed for c in toy_drag.make_cases(50)}
    tune = {c.scene.seed for c in toy_drag.make_cases(50, toy_drag.SPLITS["tune"])}
    assert not bench & tune and min(bench | tune) >= tw.HELDOUT_SEED  # training seeds stay below HELDOUT_SEED
    assert max(bench) < tw.TUNE_SEED
    rows = toy_drag.evaluate([toy_drag.Job("noop", 0, 1, {}, toy_drag.SPLITS["tune"])], "toy")
    assert rows[0]["seed"] in tune


# ---- the deformation families ---------------------------------------------------------------------------
def test_deformation_metric_passes_the_truth_and_fails_the_input_and_the_wrong_edit():
    for family in tw.FAMILIES:
        for case in tw.make_deform_cases(family, 5):
            start = np.mean([math.dist(*case.points[i]) for i in case.drags])
            noop = toy_drag.measure_case(case, case.scene.image)
            assert not noop["success"] and noop["kept"] and not noop["lost"] and noop["bg_psnr"] == 99.0
            assert noop["handle_md"] == pytest.approx(start, abs=1.0)  # nothing moved: the feature is at its handle
            good = toy_drag.measure_case(case, case.truth.image)
            assert good["success"] and good["iou"] > 0.9 and good["handle_md"] < 1.5 and good["kept"], family
            if family == "move":
                continue
            # the opposite edit (shrink for grow, the other way round, the other direction) is caught
            wrong = _opposite(case)
            bad = toy_drag.measure_case(case, tw.render([wrong, *case.scene.shapes[1:]], case.scene.background).image)
            assert not bad["success"] and bad["handle_md"] > 2 * good["handle_md"] + 1.0, family


def _opposite(case) -> tw.Shape:
    """The dragged shape deformed the other way: scaled by 1/s, stretched by -Δ, turned by -α."""
    old = case.shape
    if case.family == "scale":
        return replace(old, radius=old.radius / case.amount, mask=None, centroid=None)
    if case.family == "stretch":
        (pin,) = case.pins
        ux, uy = tw.axis(old)
        sign = 1.0 if (case.handle[0] - pin[0]) * ux + (case.handle[1] - pin[1]) * uy > 0 else -1.0
        h = old.radius - case.amount / 2
        return replace(old, radius=h, center=(pin[0] + sign * h * ux, pin[1] + sign * h * uy), mask=None, centroid=None)
    (pin,) = case.pins
    return replace(old, center=tw._turn(old.center, pin, -case.amount), angle=old.angle - case.amount, mask=None,
                      centroid=None)


def test_benchmark_scores_every_family_with_noop_and_instant_and_never_crashes_on_a_refusal(tmp_path, capsys):
    js = tmp_path / "toy.json"
    assert toy_drag.main(["--methods", "instant", "--family", "move,stretch", "--n", "1", "--set", "n_steps=4",
                          "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    rows = {(r["family"], r["method"]): r for r in report["runs"]}
    assert list(rows) == [("move", "noop"), ("move", "instant"), ("stretch", "noop"), ("stretch", "instant")]
    assert report["families"] == ["move", "stretch"]
    for r in rows.values():
        assert {"family", "method", "n", "success_rate", "iou", "handle_md", "bg_psnr", "kept_rate", "wall_s",
                "unet_calls", "refused"} <= set(r) and r["n"] == 1
    assert rows["move", "instant"]["unet_calls"] > 0 and rows["move", "instant"]["refused"] == 0
    assert rows["stretch", "noop"]["success_rate"] == 0 and rows["stretch", "noop"]["md_vs_noop"] == 1.0
    stretch = rows["stretch", "instant"]  # a pin: refused until the methods take pins, then really edited
    assert stretch["refused"] == 1 or stretch["unet_calls"] > 0
    out = capsys.readouterr().out
    assert "| success (≤3 px) |" in out and "### toy drag benchmark, stretch" in out


def test_a_refused_case_is_a_failure_with_its_message_not_a_crash():
    case = tw.make_deform_cases("scale", 1)[0]
    outside = replace(case, points=(case.points[0], (case.points[1][0], (70.0, -5.0))))  # a target off the image
    row = toy_drag.run_case(None, "instant", outside, {})
    assert row["refused"] and not row["success"] and row["unet_calls"] == 0 and row["error"]
    summary = toy_drag.summarize("instant", [row], family="scale")
    assert summary["refused"] == 1 and summary["success_rate"] == 0 and summary["family"] == "scale"


def test_family_flag_and_default_name_resolution(capsys):
    with pytest.raises(SystemExit):
        toy_drag.main(["--methods", "instant", "--family", "twist", "--n", "1"])
    assert "unknown family twist" in capsys.readouterr().err
    assert toy_drag.table_for("instant") is toy_drag.METHODS
    with pytest.raises(EditError):
        toy_drag.table_for("dragan")
