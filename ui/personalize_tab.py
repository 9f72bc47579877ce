"""The Personalize tab: photos of a subject + its class noun -> a DreamBooth LoRA in the library.

Read top to bottom: per-session state, helpers, handlers, layout, wiring. Train calls the same
``/personalize`` endpoint API clients use::

    from gradio_client import Client, handle_file
    Client(url).predict([handle_file("dog1.jpg"), handle_file("dog2.jpg")], "dog", "", "", True, False,
                        steps=400, api_name="/personalize")
    # photos, class noun, identifier ("" = automatic), LoRA name ("" = automatic), prior preservation,
    # train the text encoder, then any PersonalizeRequest.FIELDS_UI value by name.

Training runs in a worker thread while the handler streams progress and preview images; both reach it
through the run's progress callback (``TrainStream``: ``(phase, fraction, message)`` calls plus
``preview(step, image)``), never by watching files. When it ends the LoRA is in the library and every
LoRA picker (ui/lora_picker.py) lists it.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path

import gradio as gr

from editing.dreambooth import PERSONALIZE_FIELDS, PersonalizeRequest, names, suggest_identifiers
from models.errors import EditError
from ui import examples, gradio_compat, lora_picker
from ui.common import notify, shows_errors, streams_errors
from ui.fields import field_input
from ui.zerogpu import gpu, zero_gpu

MAIN_FIELDS = ("steps", "rank", "lr", "prior_images")
ADVANCED_FIELDS = ("prior_weight", "prior_steps", "batch", "resolution", "checkpoint_every", "preview_every",
                   "preview_steps", "seed")
LABELS = {"lr": "Learning rate", "prior_images": "Class images (prior preservation)",
          "prior_weight": "λ (prior-preservation weight)", "prior_steps": "DDIM steps per class image",
          "batch": "Photos per step", "resolution": "Training size (px, 0 = model's)",
          "checkpoint_every": "Checkpoint every N steps", "preview_every": "Preview every N steps",
          "preview_steps": "DDIM steps per preview"}
POLL_S = 0.5
GPU_SECONDS = 600  # ZeroGPU reservation: 400 steps at 512² plus class images
LIBRARY_HEADERS = ["name", "prompt", "base model", "steps", "rank", "file"]


# ---- per-session state ----------------------------------------------------------------------------
class TrainSession:
    """One browser tab's Cancel flag (models live in the engine)."""

    def __init__(self):
        self.cancel = threading.Event()

    def __deepcopy__(self, memo):  # gr.State deep-copies its initial value for every new tab
        return TrainSession()


# ---- helpers -------------------------------------------------------------------------------------------
def library_rows() -> list[list]:
    from editing.lora_library import list_loras

    rows = []
    for info in list_loras():
        c = info.card
        rows.append([info.name, c.get("instance_prompt", ""), c.get("base_model", "(unknown)"), c.get("steps", ""),
                     c.get("rank", ""), str(info.path)])
    return rows or [["(empty)", "", "", "", "", ""]]


def _paths(files) -> list[str]:
    out = []
    for f in files or []:
        path = f if isinstance(f, str) else getattr(f, "name", None) or (f.get("path") if isinstance(f, dict) else None)
        if path:
            out.append(path)
    return out


class TrainStream:
    """The run's progress callback: keeps the latest progress and every preview image it is handed.

    The Editor's Run calls it from the training thread: ``(phase, fraction, message)`` for progress, and
    ``preview(step, image)`` for each training preview (the engine calls it through ``Run.preview``); the
    handler's thread reads both to stream updates.
    """

    def __init__(self):
        self.progress: tuple[float, str] = (0.0, "starting")
        self.previews: list[tuple[object, str]] = []  # (PIL image, "step N"), oldest first

    def __call__(self, phase: str, frac: float, msg: str = "") -> None:
        self.progress = (frac, f"{phase}: {msg}" if msg else phase)

    def preview(self, step: int, image) -> None:
        self.previews = self.previews + [(image, f"step {step}")]  # a new list: the reader never sees it half-built


# ---- handlers ------------------------------------------------------------------------------------------
class PersonalizeHandlers:
    """Engine handlers; the Editor (and its models) is held here, never in gr.State."""

    def __init__(self, editor):
        self.editor = editor
        self.can_cancel = not zero_gpu()  # a ZeroGPU worker is another process: no Event or callback reaches it
        self._edit = gpu(GPU_SECONDS)(editor.edit)

    @streams_errors(6)
    def personalize(self, photos, class_noun, identifier, name, prior_preservation, train_text_encoder,
                    session: TrainSession, progress=gr.Progress(), **settings):
        """Train a subject LoRA from the photos; streams (previews, LoRA file, card, status, signal, library)."""
        arm(session)  # a Cancel pressed for an earlier run must not stop this one (API clients have no pre-run step)
        req = PersonalizeRequest(tuple(_paths(photos)), class_noun or "", identifier=identifier or "",
                                 name=name or "", prior_preservation=bool(prior_preservation),
                                 train_text_encoder=bool(train_text_encoder), **settings)
        notify(req.notices)
        bundle = self.editor.load()
        ident, lora_name, _ = names(bundle.tokenizer, req)
        stream, outcome = TrainStream(), {"result": None, "error": None}

        def work():
            try:
                outcome["result"] = self._edit(req, progress=stream if self.can_cancel else None,
                                               cancel=session.cancel if self.can_cancel else None)
            except BaseException as e:
                outcome["error"] = e

        worker = threading.Thread(target=work, name=f"personalize-{lora_name}", daemon=True)
        worker.start()
        shown = 0
        try:
            while worker.is_alive():
                worker.join(POLL_S)
                frac, desc = stream.progress
                progress(min(1.0, max(0.0, frac)) if math.isfinite(frac) else 0.0, desc=desc)
                previews = stream.previews
                if len(previews) != shown:
                    shown = len(previews)
                    yield previews, gr.skip(), gr.skip(), f"Training “a {ident} {req.class_noun}”: {desc}", \
                        gr.skip(), gr.skip()
        finally:
            if worker.is_alive():  # the browser went away: stop training at its next step (it checkpoints)
                session.cancel.set()
        if outcome["error"] is not None:
            raise outcome["error"]
        result = outcome["result"]
        notify(result.notices[len(req.notices):])
        card = result.extra["card"]
        status = (f"Saved LoRA **{result.extra['lora_name']}** ({result.total_s:.0f} s). Pick it in any tab's LoRA "
                  f"picker and prompt with “{card['instance_prompt']}”.")
        yield ([(img, f"step {s}") for img, s in zip(result.images, result.extra["preview_steps"])],
               result.extra["lora_path"], card, status, lora_picker.bump(), library_rows())

    @shows_errors
    def suggest(self, class_noun):
        """A few rare-token identifiers for this model's tokenizer (first = the automatic pick)."""
        ids = suggest_identifiers(self.editor.load().tokenizer, 5, avoid=(class_noun or "").split())
        if not ids:
            raise EditError("No single-token identifier found for this tokenizer; type one.")
        gr.Info(f"Rare-token identifiers: {', '.join(ids)}")
        return ids[0]

    @shows_errors
    def add_lora(self, file, replace=False):
        """Copy an uploaded LoRA file into the library: safetensors only whatever --allow-pickle says (a client's
        file), and an existing name only with the explicit "replace" tick."""
        paths = _paths([file] if file and not isinstance(file, list) else file)
        if not paths:
            raise EditError("No file: choose a LoRA .safetensors file to add.")
        return lora_picker.add_upload(paths[0], replace), lora_picker.bump(), library_rows()


def photos_received(files) -> str:
    """What the server has of the photos, e.g. "4 photos received: a.png, b.png, …" (the line a person, and a
    browser test, reads to know the upload finished before pressing Train)."""
    paths = _paths(files)
    if not paths:
        return "No photos yet."
    names_ = ", ".join(Path(p).name for p in paths[:4]) + (" …" if len(paths) > 4 else "")
    return f"{len(paths)} photo{'s' * (len(paths) != 1)} received: {names_}"


def load_example(evt: gr.SelectData):
    """Ready photos of a toy subject, its class noun and short-training settings (ui/examples.py)."""
    ex = examples.picked("personalize", evt.index)
    if ex is None:
        return (gr.skip(),) * 5
    v = ex.values
    photos = [examples.saved(p, f"personalize-{evt.index + 1}-photo-{i + 1}") for i, p in enumerate(v["photos"])]
    return photos, v["class_noun"], v["steps"], v["prior_images"], v["preview_every"]


def request_cancel(session: TrainSession) -> str:
    session.cancel.set()
    return "Cancelling: training stops at its next step and saves a checkpoint; Train again resumes from it."


def arm(session: TrainSession) -> None:
    session.cancel.clear()


# ---- layout and wiring ----------------------------------------------------------------------------------
def _field_input(name: str, value):
    return field_input(name, PERSONALIZE_FIELDS[name], value, f"pz-{name}", LABELS.get(name))


def build_personalize_tab(editor, settings: dict | None = None, links=None) -> None:
    """Add the Personalize tab. ``settings["personalize"]`` overrides slider start values."""
    h = PersonalizeHandlers(editor)
    start = {n: spec[2] for n, spec in PERSONALIZE_FIELDS.items()} | ((settings or {}).get("personalize") or {})

    with gr.Tab("Personalize", id="personalize"):
        session = gr.State(TrainSession())
        gr.Markdown("Teach the model a subject. **1.** Drop 3–10 photos of it. **2.** Say what it is (*dog*). "
                    "**3.** Train. The LoRA lands in the library; pick it in any tab and prompt with "
                    "“a [V] dog …”, where [V] is its identifier.")
        with gr.Row(equal_height=False):
            with gr.Column():
                photos = gr.File(label="Photos of the subject (3–10; other files are skipped)", file_count="multiple",
                                 elem_id="pz-photos")
                photos_info = gr.Markdown(photos_received(None), elem_id="pz-photos-info")
                class_noun = gr.Textbox(label="Class noun: what the subject is", placeholder="dog",
                                        elem_id="pz-class")
                with gr.Row():
                    identifier = gr.Textbox(label="Identifier [V] (empty = a rare token picked for you)",
                                            placeholder="automatic", elem_id="pz-identifier", scale=3)
                    suggest_btn = gr.Button("Suggest", size="sm", elem_id="pz-suggest", scale=1)
                name = gr.Textbox(label="LoRA name (empty = identifier-class)", elem_id="pz-name")
                prior = gr.Checkbox(value=True, label="Prior preservation (keeps other dogs looking like dogs)",
                                    elem_id="pz-prior")
                fields = {n: _field_input(n, start[n]) for n in MAIN_FIELDS}
                with gr.Accordion("Advanced", open=False):
                    text_encoder = gr.Checkbox(value=False, label="Also train a text-encoder LoRA",
                                               elem_id="pz-text-encoder")
                    fields |= {n: _field_input(n, start[n]) for n in ADVANCED_FIELDS}
                with gr.Row():
                    train_btn = gr.Button("Train", variant="primary", elem_id="pz-train")
                    cancel_btn = gr.Button("Cancel", variant="stop", visible=h.can_cancel, elem_id="pz-cancel")
                status = gr.Markdown("", min_height=48, elem_id="pz-status")
                table = examples.example_table("personalize", "pz-examples", "photos, class noun and a short training")
            with gr.Column():
                previews = gr.Gallery(label="Previews: “a [V] class” while training", format="png", columns=4,
                                      height=260, allow_preview=True, elem_id="pz-previews")
                lora_file = gr.File(label="LoRA file (diffusers safetensors)", interactive=False, elem_id="pz-lora")
                with gr.Accordion("Card", open=False):
                    card = gr.JSON(label="LoRA card")
                with gr.Accordion("LoRA library", open=True):
                    library = gr.Dataframe(value=library_rows(), headers=LIBRARY_HEADERS, interactive=False,
                                           wrap=True, elem_id="pz-library")
                    upload = gr.File(label="Add a LoRA file you own (.safetensors)", elem_id="pz-upload")
                    replace_lora = gr.Checkbox(False, label="Replace a LoRA of the same name", elem_id="pz-replace")
                    upload_status = gr.Markdown("", elem_id="pz-upload-status")
        signal = lora_picker.library_signal(links)

    engine = {"concurrency_id": "gpu", "show_progress_on": [status]}
    train_btn.click(arm, [session], None, queue=False, api_visibility="private").then(
        h.personalize, [photos, class_noun, identifier, name, prior, text_encoder, session],
        [previews, lora_file, card, status, signal, library], inputs_kwargs=fields, api_name="personalize", **engine)
    cancel_btn.click(request_cancel, [session], [status], queue=False, api_visibility="private")
    quiet = {"show_progress": "hidden", "api_visibility": "private"}
    for ev in (photos.upload, photos.change):
        ev(photos_received, [photos], [photos_info], trigger_mode="always_last", queue=False, **quiet)
    table.select(load_example, None, [photos, class_noun, fields["steps"], fields["prior_images"],
                                      fields["preview_every"]], queue=False, **quiet)
    suggest_btn.click(h.suggest, [class_noun], [identifier], api_name="suggest_identifier", concurrency_id="gpu")
    upload.upload(h.add_lora, [upload, replace_lora], [upload_status, signal, library], api_name="add_lora")
    signal.change(library_rows, None, library, show_progress="hidden", api_visibility="private", queue=False)
    root = gradio_compat.building()
    if root is not None and hasattr(root, "load"):
        root.load(library_rows, None, library, show_progress="hidden", api_visibility="private", queue=False)
