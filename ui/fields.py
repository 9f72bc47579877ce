"""Widgets built from the engine's field tables (``name -> (min, max, default, why)``), and the checks that make
every input of the app answer a bad API value in one line.

No default of a request field is written in ui/: sliders and fallbacks read them from those tables
(editing.requests, editing.generation), so the engine and the UI cannot disagree.
"""
from __future__ import annotations

import math

import gradio as gr

from editing.checks import check_number
from editing.requests import GUIDED_DEFAULTS, GUIDED_FIELDS
from models.errors import EditError
from ui import gradio_compat


# Gradio's own Number/Slider preprocess compares and rounds whatever an API client sent: text fails with the
# generic "upstream Gradio app has raised an exception", NaN passes or dies in int(). These widgets check the
# raw value first and answer in one line naming the field, its range and what was sent.
def checked_number(name: str, value, spec: tuple, precision: int | None = None):
    """``value`` checked against ``spec = (min, max, default, why)`` by the engine's own check
    (``editing.checks.check_number``: text holding a number is read; 'abc', NaN, ±inf, booleans, fractions for
    whole numbers and values out of range are one line naming the field, its range and what was sent), as
    gr.Error. Whole numbers when the default is an int or ``precision == 0``; ``None`` bounds: unbounded."""
    lo, hi, default, why = spec
    whole = precision == 0 or (isinstance(default, int) and not isinstance(default, bool))
    why = why or "see this endpoint on the app's API page"
    if lo is None or hi is None:  # no range of its own: only a finite number (the request checks its range)
        v = value.strip() if isinstance(value, str) else value
        try:
            ok = not isinstance(v, bool) and math.isfinite(float(v)) and (not whole or float(v) == int(float(v)))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            kind = "a finite whole number" if whole else "a finite number"
            raise gr.Error(f"{name} must be {kind}, got {_shown(value)}; {why}.")
        v = float(v)
        return int(v) if whole else (v if precision is None else round(v, precision))
    try:
        v = check_number(name, value, {name: (lo, hi, 0 if whole else 0.0, why)})
    except EditError as e:
        raise gr.Error(str(e)) from None
    return v if precision in (None, 0) or whole else round(v, precision)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked_preprocess(component, payload):
    """``preprocess`` of a checked gr.Number / gr.Slider (bound to the instance by ``checked``)."""
    name, spec = component.dragcanvas_check
    if payload is None and isinstance(component, gr.Number) and spec[2] is None:
        return None  # an empty number box: the handler's own default
    return checked_number(name, payload, spec, getattr(component, "precision", None))


def checked(component, name: str | None = None, spec: tuple | None = None):
    """Make a built gr.Number / gr.Slider check what API clients send (in place; returns it). ``name`` and
    ``spec`` default to the widget's label and minimum/maximum. (An instance attribute, not a subclass: Gradio's
    component metaclass writes a .pyi stub next to the module of every subclass.)"""
    if getattr(component, "dragcanvas_check", None) is None:
        component.dragcanvas_check = (name or component.label or component.elem_id or "value",
                                      spec or (component.minimum, component.maximum, None, component.info or ""))
        gradio_compat.replace_preprocess(component, _checked_preprocess)
    return component


def check_all_numbers(demo: gr.Blocks) -> int:
    """Every gr.Number / gr.Slider of the app checks its API value (those not built by ``field_input`` get their
    label and own bounds); returns how many were changed."""
    n = 0
    for block in list(gradio_compat.blocks_by_id(demo).values()):
        if isinstance(block, (gr.Number, gr.Slider)) and getattr(block, "dragcanvas_check", None) is None:
            checked(block)
            n += 1
    return n


def _expects(component) -> str:
    if isinstance(component, (gr.File, gr.Image, gr.Gallery)):
        return "a file (upload it first, e.g. with gradio_client.handle_file)"
    if isinstance(component, gr.Radio):
        return f"one of {', '.join(repr(c[1] if isinstance(c, tuple) else c) for c in component.choices)}"
    if isinstance(component, gr.Dropdown):
        return "a list of names"
    if isinstance(component, gr.Textbox):
        return "text"
    return f"a value for {type(component).__name__}"


def _guarded_preprocess(component, payload):
    """``preprocess`` of any input: Gradio's own, but a value it cannot read (False for a file, a number for a
    choice list) is one line naming the field instead of the generic "upstream Gradio app has raised an
    exception"."""
    try:
        return gradio_compat.original_preprocess(component, payload)
    except gr.Error:
        raise
    except Exception as e:  # whatever Gradio's reader raised, the client sent something unreadable
        raise gr.Error(f"{field_name(component)} must be {_expects(component)}, got {_shown(payload)} "
                       f"({type(e).__name__}).") from e


def _wrong_shape(component, value):
    """A value of the wrong shape for the component's data model (``False`` for a file), in one line."""
    raise gr.Error(f"{field_name(component)} must be {_expects(component)}, got {_shown(value)}.") from None


def field_name(component) -> str:
    """How a refusal names an input: its label (what the page shows), else its elem_id or kind."""
    return component.label or component.elem_id or type(component).__name__


def refused_file(component, api_name: str | None = None) -> str:
    """The one line for a file reference Gradio will not read (never uploaded here, outside its cache), naming the
    field as the API page does (else as the page shows it)."""
    name = api_name or (field_name(component) if component is not None else "A file")
    return (f"{name}: that file was not uploaded here; upload it first (gradio_client.handle_file does, "
            "or drop it on the page).")


def check_inputs(demo: gr.Blocks) -> int:
    """Every input of the app answers bad API values in one line: numbers are checked (``check_all_numbers``),
    and any other component's reader failing becomes a message naming the field. Returns how many inputs."""
    check_all_numbers(demo)
    inputs = {id(c): c for fn in gradio_compat.listeners(demo) for c in fn.inputs}
    n = 0
    for c in inputs.values():
        if getattr(c, "stateful", False) or isinstance(c, gr.BrowserState) or hasattr(c, "dragcanvas_preprocess"):
            continue
        gradio_compat.replace_preprocess(c, _guarded_preprocess)
        gradio_compat.replace_data_model(c, _wrong_shape)
        n += 1
    return n


def field_input(name: str, spec: tuple, value, elem_id: str, label: str | None = None) -> gr.components.Component:
    """A slider (or a number box for wide integer ranges, e.g. seeds) for a ``(min, max, default, why)`` entry;
    it checks what API clients send (``checked``)."""
    lo, hi, default, why = spec
    label = label or name.replace("_", " ").capitalize()
    if isinstance(default, int) and hi - lo > 10_000:  # seeds: a slider would be useless
        box = gr.Number(value=value, minimum=lo, maximum=hi, precision=0, label=label, info=why, elem_id=elem_id)
        return checked(box, name, tuple(spec))
    slider = gr.Slider(lo, hi, value=value, step=slider_step(spec), label=label, info=why, elem_id=elem_id)
    return checked(slider, name, tuple(spec))


def slider_step(spec: tuple) -> float:
    """1 for whole numbers; else one decade below the smallest meaningful value (the minimum, a hundredth of the
    range, a tenth of the default), e.g. 1e-5 for a learning rate in [1e-5, 1e-2]."""
    lo, hi, default, _ = spec
    if isinstance(default, int):
        return 1
    return 10 ** math.floor(math.log10(min(v for v in (lo, hi / 100, default / 10) if v > 0)))


def guided_input(name: str, task: str = "guided_drag") -> gr.components.Component:
    """A slider for a guided-method field, starting at ``task``'s published default (GUIDED_DEFAULTS); the API
    sends it as ``guided_<name>``."""
    lo, hi, default, why = GUIDED_FIELDS[name]
    value = GUIDED_DEFAULTS[task].get(name, default)
    step = 1 if isinstance(default, int) or isinstance(value, int) else 0.05
    slider = gr.Slider(lo, hi, value=value, step=step, label=name.replace("_", " ").capitalize(), info=why,
                       elem_id=f"guided-{name}")
    return checked(slider, f"guided_{name}", (lo, hi, value, why))
