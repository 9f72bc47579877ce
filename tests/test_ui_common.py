"""ui/common.py's error wrappers: the same one-line messages for plain and streaming handlers."""
import gradio as gr
import pytest

from editing.requests import EditCancelled, EditError
from ui.common import shows_errors, streams_errors


def _stream(exc):
    def handler():
        yield ("partial", 1)
        raise exc
    return handler


WRAPS = {"streaming": lambda h: streams_errors(2)(h), "plain": lambda h: shows_errors(lambda: list(h()))}


@pytest.mark.parametrize("kind", list(WRAPS))
def test_edit_errors_become_their_message_and_others_are_named(kind):
    with pytest.raises(gr.Error) as e:
        list(WRAPS[kind](_stream(EditError("Paint the mask first.")))())
    assert e.value.message == "Paint the mask first."
    with pytest.raises(gr.Error) as e:
        list(WRAPS[kind](_stream(ValueError("boom")))())
    assert e.value.message.startswith("Unexpected error (ValueError: boom). The app is still running")


def test_a_cancelled_stream_leaves_every_output_as_it_is():
    out = list(streams_errors(2)(_stream(EditCancelled("Cancelled.")))())
    assert out == [("partial", 1), (gr.skip(), gr.skip())]
