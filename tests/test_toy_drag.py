"""The shapes drag benchmark's metric: a perfect drag scores ~0 px, the input scores the drag distance."""
import math

from bench import toy_drag
from models import toy_world as tw


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
