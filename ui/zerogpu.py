"""``@gpu(seconds)``: Hugging Face ZeroGPU support that is a no-op everywhere else.

On a ZeroGPU Space (env ``SPACES_ZERO_GPU`` set and the ``spaces`` package importable) the function
runs in a forked GPU worker that receives its arguments pickled, so decorated functions must take
plain values and requests only (no gr.State objects, no threading.Event), and only gr.Error messages
survive the trip back, so EditError is converted to gr.Error inside the worker.
"""
from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)


@functools.cache
def _spaces():
    if not os.environ.get("SPACES_ZERO_GPU"):
        return None
    try:
        import spaces
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the 'spaces' package is missing; running without ZeroGPU")
        return None
    return spaces


def zero_gpu() -> bool:
    """True when GPU calls run in a ZeroGPU worker process (a threading.Event cannot reach them)."""
    return _spaces() is not None


def gpu(duration_s: int):
    """Decorator: ``spaces.GPU(duration=duration_s)`` on ZeroGPU, identity otherwise."""
    spaces = _spaces()
    if spaces is None:
        return lambda fn: fn

    def decorate(fn):
        import gradio as gr

        from models.errors import EditError

        @functools.wraps(fn)
        def with_user_errors(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except EditError as e:
                raise gr.Error(str(e)) from None

        return spaces.GPU(duration=duration_s)(with_user_errors)

    return decorate
