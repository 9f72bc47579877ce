"""The Drag tab's ready examples land with the method each one names (the README points new users at them):
on the shipped toy model the dragged shape ends within 3 px of the target and keeps its colour and size."""
import json
import math

import pytest

from bench import methods as bm
from models import toy_world as tw
from ui.drag_methods import DEFAULT_METHOD, METHODS
from ui.examples import EXAMPLES_DIR, load_examples

EXAMPLES = load_examples()


def test_the_first_example_uses_the_default_method():
    assert EXAMPLES and EXAMPLES[0].method == DEFAULT_METHOD
    assert all(ex.method in METHODS for ex in EXAMPLES)


@pytest.mark.parametrize("ex", EXAMPLES, ids=[ex.name for ex in EXAMPLES])
def test_example_lands_and_keeps_its_colour(toy, ex):
    image, mask = ex.load()
    meta = json.loads((EXAMPLES_DIR / f"{ex.name}.json").read_text())
    shape = tw.make_scene(meta["scene_seed"]).shapes[0]  # the dragged shape (ui.examples.write_examples)
    handle, target = (tuple(p) for p in ex.points)
    assert math.dist(handle, shape.centroid) < 1.0
    out = bm.run_method(METHODS[ex.method], toy, image, ((handle, target),), mask, ex.prompt, {}).image
    blob = tw.largest_blob(tw.segment_colour(out, shape.colour))
    assert 0.7 * shape.mask.sum() <= blob.sum() <= 1.4 * shape.mask.sum()  # still there, in its colour, its size
    assert math.dist(tw.centroid(blob), target) <= 3.0
