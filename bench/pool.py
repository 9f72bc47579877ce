"""``--ray ADDRESS`` for the benchmarks: the same jobs spread over a Ray Serve deployment's replicas.

Each benchmark's ``evaluate`` is a seam (one row per job, in order); ``pooled`` builds a replacement that
runs the jobs on a ``RemoteEditor`` (editing/serve/client.py) from as many threads as the pool takes at once.
Edits are deterministic per request, so the rows and the report equal the single-process run's (the
wall times are the pool's).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from models.errors import EditError

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")


def connect(address: str, model: str):
    """A RemoteEditor on the deployment at ``address`` ("auto" = this machine's cluster); EditError when the
    deployment serves another model than the benchmark asks for (its numbers would not be comparable)."""
    try:
        from editing.serve.client import RemoteEditor
    except ImportError:
        raise EditError("--ray needs Ray Serve: pip install -r requirements-ray.txt") from None
    remote = RemoteEditor(address)
    if model not in ("auto", remote.model_spec):
        raise EditError(f"The deployment at {address} serves {remote.model_spec!r}, not {model!r}: start it with "
                        f"`python -m editing.serve --model {model}` or pass --model {remote.model_spec}.")
    return remote


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]`` from ``workers`` threads, results in the items' order."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="bench-pool") as pool:
        return list(pool.map(fn, items))
