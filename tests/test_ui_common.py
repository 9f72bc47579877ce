"""ui/common.py: the error wrappers (same one-line messages for plain and streaming handlers), numbers as API
clients send them, per-run cancel, result names, and LoRA names from clients."""
import gradio as gr
import pytest

from models.errors import EditCancelled, EditError
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


# ---- numbers as API clients send them -------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("abc", r"seed must be a number \(a whole number from 0 to 100\), got 'abc'"),
    (float("nan"), "seed must be a finite number from 0 to 100"),
    (float("inf"), "seed must be a finite number"),
    (True, "got True"),
    (2.5, "whole number from 0 to 100 .got 2.5"),
    (1e12, r"seed=1e\+12 is outside \[0, 100\]"),
    (None, "got None"),
])
def test_checked_numbers_name_field_range_and_value(value, expected):
    from ui.fields import checked_number

    with pytest.raises(gr.Error, match=expected):
        checked_number("seed", value, (0, 100, 7, "random seed"))


def test_checked_widgets_keep_their_frontend_and_read_good_values():
    from ui.fields import check_all_numbers, field_input

    with gr.Blocks() as demo:
        steps = field_input("steps", (1, 50, 10, "DDIM steps"), 10, "steps")
        plain = gr.Number(value=3, precision=0, label="Seed")
    assert check_all_numbers(demo) == 1  # field_input's widget was checked already
    assert steps.get_block_name() == "slider" and type(steps) is gr.Slider  # no subclass (Gradio writes .pyi stubs)
    assert steps.preprocess(12) == 12 and steps.preprocess("12") == 12
    assert plain.preprocess(None) is None and plain.preprocess(4.0) == 4
    with pytest.raises(gr.Error, match="Seed must be a finite whole number, got nan"):
        plain.preprocess(float("nan"))


# ---- per-run cancel -------------------------------------------------------------------------------------------
def test_a_tripped_run_stops_only_itself():
    import threading

    from ui.common import GpuHandlers, _RunGuard
    from ui.history import BeforeAfter

    session = BeforeAfter()
    guard = _RunGuard((session,), {})
    with guard:
        cancel = GpuHandlers(None).cancel_of(session)
    assert not cancel.is_set()
    old = session.cancel
    guard.trip("cancelled")  # the client went away
    assert cancel.is_set() and old.is_set()
    assert isinstance(session.cancel, threading.Event) and not session.cancel.is_set()  # the next run is not cancelled
    with _RunGuard((session,), {}):
        assert not GpuHandlers(None).cancel_of(session).is_set()


def test_result_names_never_repeat():
    from ui.history import unique_name

    names = [unique_name("after") for _ in range(200)]
    assert len(set(names)) == 200 and names == sorted(names)


def test_clients_name_loras_by_library_name_only():
    from ui.lora_picker import to_specs

    assert to_specs(["zwx-dog@0.5", "style"]) == [("zwx-dog", 0.5), ("style", 1.0)]
    for bad in (["/etc/passwd"], ["/tmp/gradio/x/evil.pt"], ["../loras/x"], ["~/x.safetensors"]):
        with pytest.raises(EditError, match="not a library name"):
            to_specs(bad)
    with pytest.raises(EditError, match="at most 8"):
        to_specs(["a"] * 9)


def test_any_input_gradio_cannot_read_is_one_line_naming_the_field():
    from ui.fields import check_inputs

    with gr.Blocks() as demo:
        photo, out = gr.File(label="Photo"), gr.Textbox()
        photo.change(lambda p: p, photo, out)
    assert check_inputs(demo) == 1
    with pytest.raises(gr.Error, match=r"Photo must be a file \(upload it first.*got False"):
        photo.data_model.model_validate(False)
    assert photo.data_model.__name__ == "FileData"  # the API page still names it as before
