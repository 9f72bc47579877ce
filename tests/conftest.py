"""Shared fixtures. Tests never touch the network: the Hub is forced offline for the whole session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch
from PIL import Image

# One thread: the tiny models gain nothing from two, and OpenMP threads spin-waiting for each other
# on oversubscribed cores (browser, server, CLI subprocesses) made runs up to 30x slower.
torch.set_num_threads(1)

# Few steps, tiny model: each drag takes a second or two on 2 CPU cores.
FAST = dict(lora_steps=3, n_inference_steps=10, max_steps=4)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def scene(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic photo-like test image: smooth gradient background and two shapes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([xx / w * 200 + 30, yy / h * 150 + 50, (xx + yy) / (w + h) * 100 + 80], -1)
    rng = np.random.RandomState(seed)
    cx, cy = w * 0.35, h * 0.5
    a[(xx - cx) ** 2 + (yy - cy) ** 2 < (min(w, h) * 0.18) ** 2] = (220, 40, 40)
    a[int(h * 0.2): int(h * 0.45), int(w * 0.65): int(w * 0.85)] = (30, 60, 200)
    a += rng.normal(0, 3, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def editor():
    from editing.engine import Editor

    ed = Editor("tiny")
    ed.load()
    return ed


@pytest.fixture(scope="module")
def toy():
    """The trained toy model (models/toy), one Editor per test module: its caches never leak between modules."""
    from editing.engine import Editor

    ed = Editor("toy")
    ed.load()
    return ed


@pytest.fixture(scope="session")
def bundle(editor):
    return editor.load()
