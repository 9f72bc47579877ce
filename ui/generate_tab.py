"""The Generate tab: text-to-image steered by ControlNet units, a T2I-Adapter unit and an IP-Adapter reference.

Handlers first, layout, wiring last. The Generate button calls the ``/text_to_image`` endpoint API clients use::

    from gradio_client import Client, handle_file
    units = [{"kind": "controlnet", "model": "tiny", "image": 0, "preprocessor": "canny", "scale": 0.8},
             {"kind": "ip_adapter", "model": "tiny", "images": [1], "scale": 0.6}]
    Client(url).predict("a cat", "", json.dumps(units), [handle_file("edges.png"), handle_file("ref.png")],
                        n_inference_steps=30, seed=1, api_name="/text_to_image")
    # prompt, negative prompt, units JSON ("image"/"images" index the files list), condition files,
    # then any GenerateRequest.FIELDS_UI value by name (width/height 0 = the model's native size).

A unit's ``model`` is a name the server lists (its dropdown's choices: ``tiny``, known Hub ids, the operator's
``--models-dir`` folders), never a path.
Unit keys: controlnet (model, image, preprocessor, options, scale, start, end, guess_mode),
t2i_adapter (model, image, preprocessor, options, weight, conditioning_factor), ip_adapter (model, images, scale).
Every result is drag-ready: "Send to Drag" opens it there and a drag starts at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import gradio as gr

from editing import conditions
from editing.generation import (
    ADAPTER_FIELDS,
    CONTROLNET_FIELDS,
    GENERATE_FIELDS,
    IP_FIELDS,
    AdapterUnit,
    ControlNetUnit,
    GenerateRequest,
    IPAdapterUnit,
)
from editing.images import load_image
from models.errors import EditError
from ui import examples
from ui.common import (
    GPU_SECONDS,
    GpuHandlers,
    details_of,
    lora_picker,
    lora_specs,
    model_names,
    model_spec,
    notify,
    pick_seed,
    request_cancel,
    results_gallery,
    run_controls,
    sender,
    shows_errors,
    status_line,
    streams_errors,
)
from ui.feedback import stream_to_gallery
from ui.fields import field_input
from ui.history import Results, on_select
from ui.zerogpu import gpu

N_CONTROLNETS = 2  # accordions in the UI; the API takes up to editing.generation.MAX_UNITS
UNIT_KEYS = {
    "controlnet": {"kind", "model", "image", "preprocessor", "options", "scale", "start", "end", "guess_mode"},
    "t2i_adapter": {"kind", "model", "image", "preprocessor", "options", "weight", "conditioning_factor"},
    "ip_adapter": {"kind", "model", "images", "scale"},
}


# ---- units JSON -> engine units --------------------------------------------------------------------
def parse_units(text: str | None, files: list | None):
    """The /text_to_image units JSON and its files -> (ControlNet units, T2I-Adapter units, IP-Adapter unit or None)."""
    try:
        units = json.loads(text or "[]")
    except json.JSONDecodeError:
        raise EditError('Units must be JSON like [{"kind": "controlnet", "image": 0, "preprocessor": "canny"}].') from None
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise EditError("Units must be a JSON list of objects.")
    files = [f if isinstance(f, str) else getattr(f, "name", f) for f in (files or [])]

    def picture(i, what):
        if not isinstance(i, int) or not 0 <= i < len(files):
            raise EditError(f"{what}: image {i!r} is not an index into the {len(files)} uploaded file(s).")
        return load_image(files[i])

    cns, ads, ip = [], [], None
    for n, u in enumerate(units, 1):
        kind = u.get("kind")
        if kind not in UNIT_KEYS:
            raise EditError(f"Unit {n}: kind must be one of {', '.join(UNIT_KEYS)}, got {kind!r}.")
        extra = set(u) - UNIT_KEYS[kind]
        if extra:
            raise EditError(f"Unit {n} ({kind}) has unknown key(s) {', '.join(sorted(extra))}.")
        args = {k: v for k, v in u.items() if k not in ("kind", "image", "images")}
        if "model" in args:  # a registry name from the web, never a path (models/registry.py)
            args["model"] = model_spec(kind, args["model"])
        if kind == "controlnet":
            cns.append(ControlNetUnit(picture(u.get("image"), f"ControlNet unit {n}"), **args))
        elif kind == "t2i_adapter":
            ads.append(AdapterUnit(picture(u.get("image"), f"T2I-Adapter unit {n}"), **args))
        else:
            if ip is not None:
                raise EditError("Only one IP-Adapter unit can be used (give it several reference images instead).")
            refs = u.get("images") if isinstance(u.get("images"), list) else [u.get("images")]
            ip = IPAdapterUnit(tuple(picture(i, f"IP-Adapter unit {n}") for i in refs), **args)
    return tuple(cns), tuple(ads), ip


# ---- unit widgets ----------------------------------------------------------------------------------
@dataclass
class UnitWidgets:
    kind: str
    enabled: gr.Checkbox
    model: gr.Dropdown
    image: gr.Image
    preprocessor: gr.Dropdown | None = None
    low: gr.Slider | None = None
    high: gr.Slider | None = None
    scale: gr.Slider | None = None
    start: gr.Slider | None = None
    end: gr.Slider | None = None
    guess: gr.Checkbox | None = None
    factor: gr.Slider | None = None
    preview: gr.Image | None = None

    def components(self) -> list:
        return [c for c in vars(self).values() if isinstance(c, gr.components.Component) and c is not self.preview]

    def unit(self, data: dict, files: list[str]) -> dict | None:
        """This accordion's values (``data``: component -> value) -> one units-JSON entry, or None when off."""
        if not data[self.enabled]:
            return None
        if not data[self.image]:
            raise EditError(f"The {self.kind.replace('_', ' ')} unit is on but has no image: add one or switch it off.")
        files.append(data[self.image])
        u = {"kind": self.kind, "model": data[self.model] or "tiny"}
        if self.kind == "ip_adapter":
            return u | {"images": [len(files) - 1], "scale": data[self.scale]}
        pre = data[self.preprocessor]
        u |= {"image": len(files) - 1, "preprocessor": pre}
        if pre == "canny":
            u["options"] = {"low_threshold": data[self.low], "high_threshold": data[self.high]}
        if self.kind == "controlnet":
            return u | {"scale": data[self.scale], "start": data[self.start], "end": data[self.end],
                        "guess_mode": data[self.guess]}
        return u | {"weight": data[self.scale], "conditioning_factor": data[self.factor]}


def default_spec(editor, kind: str) -> str:
    """'tiny' for the built-in models; the common SD-1.5 checkpoints otherwise."""
    if editor.model_spec in ("tiny", "cpu-small", "sd15-random") or editor.model_spec.startswith("toy"):
        return "tiny"
    return {"controlnet": "lllyasviel/sd-controlnet-canny", "t2i_adapter": "TencentARC/t2iadapter_color_sd14v1",
            "ip_adapter": "h94/IP-Adapter"}[kind]


def _slider(spec: tuple, label: str, step: float) -> gr.Slider:
    """A slider over a field-table entry's range (``(min, max, default, why)``), starting at its default."""
    lo, hi, default, _ = spec
    return gr.Slider(lo, hi, default, step=step, label=label)


def _unit_widgets(editor, kind: str, title: str, index: int) -> UnitWidgets:
    eid = f"gen-{kind}-{index}"
    with gr.Accordion(title, open=False, elem_id=eid):
        enabled = gr.Checkbox(False, label="Use this unit", elem_id=f"{eid}-on")
        # Names from the registry only (models/registry.py); typed Hub ids pass only with --allow-hub-models.
        model = gr.Dropdown(model_names().choices(kind), value=default_spec(editor, kind), allow_custom_value=True,
                            label="Model", elem_id=f"{eid}-model")
        with gr.Row():
            image = gr.Image(type="filepath", format="png", label="Reference image" if kind == "ip_adapter"
                             else "Condition image", sources=("upload", "clipboard"), height=200)
            preview = None if kind == "ip_adapter" else gr.Image(label="What the model sees", type="pil",
                                                                 interactive=False, height=200)
        if kind == "ip_adapter":
            return UnitWidgets(kind, enabled, model, image, scale=_slider(IP_FIELDS["scale"], "Scale", 0.05))
        w = UnitWidgets(kind, enabled, model, image, preview=preview)
        w.preprocessor = gr.Dropdown(list(conditions.NAMES), value="palette" if kind == "t2i_adapter" else "canny",
                                     label="Preprocessor")
        with gr.Row():
            canny = conditions.OPTIONS["canny"]
            w.low = _slider(canny["low_threshold"], "Canny low threshold", 1)
            w.high = _slider(canny["high_threshold"], "Canny high threshold", 1)
        if kind == "controlnet":
            _controlnet_widgets(w)
        else:
            w.scale = _slider(ADAPTER_FIELDS["weight"], "Weight", 0.05)
            w.factor = _slider(ADAPTER_FIELDS["conditioning_factor"], "Conditioning factor (fraction of early steps)",
                               0.05)
        show = gr.Button("Preview preprocessor", size="sm")
        show.click(preview_condition, [w.image, w.preprocessor, w.low, w.high], [w.preview],
                   show_progress="hidden", api_visibility="private")
    return w


def _controlnet_widgets(w: UnitWidgets) -> None:
    w.scale = _slider(CONTROLNET_FIELDS["scale"], "Scale", 0.05)
    with gr.Row():
        w.start = _slider(CONTROLNET_FIELDS["start"], "Guidance start", 0.05)
        w.end = _slider(CONTROLNET_FIELDS["end"], "Guidance end", 0.05)
    w.guess = gr.Checkbox(False, label="Guess mode (steer without a prompt)")


@shows_errors
def preview_condition(image, preprocessor, low, high):
    """The preprocessed condition image (OpenCV only: no model, no GPU queue)."""
    if not image:
        raise EditError("Add a condition image first.")
    options = {"low_threshold": low, "high_threshold": high} if preprocessor == "canny" else {}
    return conditions.preprocess(preprocessor, load_image(image), options)


def load_example(evt: gr.SelectData):
    """A ready prompt and seed (ui/examples.py) for the toy model."""
    ex = examples.picked("generate", evt.index)
    if ex is None:
        return gr.skip(), gr.skip(), gr.skip()
    return ex.values["prompt"], ex.values["seed"], False


# ---- engine handler ----------------------------------------------------------------------------------
class GenerateHandlers(GpuHandlers):
    def __init__(self, editor):
        super().__init__(editor)
        self._edit = gpu(GPU_SECONDS["text_to_image"])(editor.edit)

    @streams_errors(4)
    def generate(self, prompt, negative_prompt, units, files, results: Results, progress=gr.Progress(),
                 loras=None, **settings):
        """Text-to-image with units (see the module docstring); returns gallery, download, details, status."""
        cns, ads, ip = parse_units(units, files)
        req = GenerateRequest(prompt or "", negative_prompt or "", controlnets=cns, adapters=ads, ip_adapter=ip,
                              **settings)
        result = yield from stream_to_gallery(self._edit, req, results, self.cancel_of(results), progress,
                                              lora_specs(loras))
        notify(result.notices)
        kinds = [f"{len(cns)} ControlNet" if cns else "", "T2I-Adapter" if ads else "", "IP-Adapter" if ip else ""]
        results.add(result, ", ".join(["generated", *filter(None, kinds)]), details_of(result))
        yield results.gallery(), *results.shown(), status_line(result, "image")


# ---- layout and wiring -----------------------------------------------------------------------------
def _settings_column(w: SimpleNamespace, editor, can_cancel: bool, start: dict, links) -> None:
    """Prompts, seed, size/steps/guidance/batch, the unit accordions, the LoRA picker, Run / Cancel."""
    w.prompt = gr.Textbox(label="Prompt", elem_id="gen-prompt", placeholder="a photo of a cat on a sofa")
    w.examples = examples.example_table("generate", "gen-examples", "prompt and seed")
    w.negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality")
    with gr.Row():
        lo, hi, _, _ = GENERATE_FIELDS["seed"]
        w.seed = gr.Number(value=start["seed"], precision=0, minimum=lo, maximum=hi, label="Seed", elem_id="gen-seed")
        w.randomize = gr.Checkbox(False, label="Random seed each run (the seed used is shown)")
    w.fields = {"seed": w.seed}
    with gr.Accordion("Size, steps, guidance, batch", open=False):
        for name in ("width", "height", "n_inference_steps", "guidance_scale", "batch"):
            label = name.replace("n_inference_steps", "steps").replace("_", " ").capitalize()
            w.fields[name] = field_input(name, GENERATE_FIELDS[name], start[name], f"gen-{name}", label)
    w.widgets = [_unit_widgets(editor, "controlnet", f"ControlNet unit {i + 1}", i) for i in range(N_CONTROLNETS)]
    w.widgets.append(_unit_widgets(editor, "t2i_adapter", "T2I-Adapter unit", 0))
    w.widgets.append(_unit_widgets(editor, "ip_adapter", "IP-Adapter (image prompt)", 0))
    w.picker = lora_picker(links)
    run_controls(w, "Generate", "gen", can_cancel)


def _results_column(w: SimpleNamespace) -> None:
    results_gallery(w, "gen", 360)
    with gr.Row():
        w.to_drag = gr.Button("Send to Drag", size="sm", elem_id="gen-to-drag")
        w.to_sketch = gr.Button("Send to Sketch", size="sm", elem_id="gen-to-sketch")
    with gr.Accordion("Details: timings, UNet/ControlNet calls, settings", open=False):
        w.details = gr.JSON(label="Details")


def build_generate_tab(editor, settings: dict | None = None, links=None) -> None:
    h = GenerateHandlers(editor)
    start = {name: spec[2] for name, spec in GENERATE_FIELDS.items()}
    start.update({k: v for k, v in (settings or {}).items() if k in GENERATE_FIELDS})
    with gr.Tab("Generate", id="generate"):
        w = SimpleNamespace(results=gr.State(Results("generate"), delete_callback=Results.close))
        gr.Markdown("Text-to-image, optionally steered by structure (ControlNet, T2I-Adapter) and an image prompt "
                    "(IP-Adapter). Every result is drag-ready: send it to Drag and drag at once.")
        with gr.Row(equal_height=False):
            with gr.Column():
                _settings_column(w, editor, h.can_cancel, start, links)
            with gr.Column():
                _results_column(w)
        w.units_json = gr.Textbox(visible=False)
        w.unit_files = gr.File(file_count="multiple", visible=False)
    _wire(w, h, links)


def _wire(w: SimpleNamespace, h: GenerateHandlers, links) -> None:
    def prepare(data: dict):
        """Generate, step 1, instant: arm Cancel, pick the seed, turn the unit accordions into units JSON + files."""
        data[w.results].cancel.clear()
        files: list[str] = []
        units = [u for unit in w.widgets if (u := unit.unit(data, files)) is not None]
        return {w.units_json: json.dumps(units), w.unit_files: files or None,
                w.seed: pick_seed(data[w.randomize], data[w.seed], GENERATE_FIELDS["seed"])}

    instant = {"show_progress": "hidden", "api_visibility": "private"}
    w.gallery.select(on_select, [w.results], [w.download, w.details], **instant)
    w.examples.select(load_example, None, [w.prompt, w.seed, w.randomize], **instant)
    w.cancel_btn.click(request_cancel, [w.results], [w.status], queue=False, api_visibility="private")
    if links is not None:
        for button, tab in ((w.to_drag, "drag"), (w.to_sketch, "sketch")):
            fn, outputs = sender(links, tab)
            button.click(fn, [w.results], outputs, **instant)
        first = w.widgets[0]
        links.inboxes["generate"].change(lambda p: (p, True) if p else gr.skip(), [links.inboxes["generate"]],
                                         [first.image, first.enabled], **instant)
    if w.picker is not None:
        w.fields["loras"] = w.picker
    inputs = {w.results, w.randomize, w.seed, *(c for unit in w.widgets for c in unit.components())}
    w.run_btn.click(shows_errors(prepare), inputs, [w.units_json, w.unit_files, w.seed], queue=False,
                    api_visibility="private").success(
        h.generate, [w.prompt, w.negative, w.units_json, w.unit_files, w.results],
        [w.gallery, w.download, w.details, w.status], inputs_kwargs=w.fields, api_name="text_to_image", concurrency_id="gpu", show_progress_on=[w.status])
