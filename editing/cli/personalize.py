"""``personalize``: train a DreamBooth LoRA from a folder of photos (editing/dreambooth/).

    python -m editing personalize --images DIR --class-noun dog [--out LORA_DIR --steps N --rank R
                                  --prior-images N --model SPEC]
    accelerate launch -m editing personalize --images DIR --class-noun dog ...   # one process per GPU

Both run ``cmd_personalize``: the trainer builds an ``accelerate.Accelerator`` itself, so a single
process just runs, and under ``accelerate launch`` each process loads the model on its own GPU and
gradients are averaged. Only the main process writes files and prints. Flags and their defaults come
from ``PersonalizeRequest``: numbers from its ``FIELDS_UI`` table, switches from its dataclass fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading

from editing.cli.common import add_common, add_fields, editor, lora_specs, notes, progress
from models.errors import EditError

# request field -> (flag, help); ``--no-*`` turns a field off, any other flag turns it on
SWITCHES = {
    "prior_preservation": ("--no-prior", "train without class-prior preservation"),
    "train_text_encoder": ("--train-text-encoder", "also put a LoRA on the text encoder"),
    "flip": ("--no-flip", "no horizontal-flip augmentation"),
    "crop": ("--no-crop", "no random-crop augmentation"),
    "resume": ("--no-resume", "ignore earlier checkpoints"),
    "replace": ("--replace", "overwrite a LoRA of the same name (without it an existing name is refused)"),
}
CHECKPOINTING = {"auto": None, "on": True, "off": False}  # --gradient-checkpointing -> request value
NOT_FLAGS = ("resolution",)  # add_common's --resolution is the training side here
OUT_HELP = "folder for NAME.safetensors + NAME.json (default: the LoRA library)"


def _request_defaults() -> dict:
    from editing.dreambooth import PersonalizeRequest

    return {f.name: f.default for f in dataclasses.fields(PersonalizeRequest)}


def _add_switches(p: argparse.ArgumentParser, defaults: dict) -> None:
    for name, (flag, help_) in SWITCHES.items():
        action = "store_false" if flag.startswith("--no-") else "store_true"
        p.add_argument(flag, dest=name, action=action, default=defaults[name], help=help_)
    auto = next(k for k, v in CHECKPOINTING.items() if v == defaults["gradient_checkpointing"])
    p.add_argument("--gradient-checkpointing", choices=tuple(CHECKPOINTING), default=auto,
                   help="recompute activations in backward (auto: on for GPUs)")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from editing.dreambooth import PersonalizeRequest

    defaults = _request_defaults()
    p.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="folder(s) or files with 3–10 photos of the subject (non-images are skipped)")
    p.add_argument("--class-noun", required=True, help="what the subject is, e.g. 'dog' (prompts: 'a [V] dog')")
    p.add_argument("--identifier", default=defaults["identifier"],
                   help="rare token [V] (default: picked automatically)")
    p.add_argument("--name", default=defaults["name"], help="LoRA name (default: '<identifier>-<class>')")
    _add_switches(p, defaults)
    table = PersonalizeRequest.FIELDS_UI
    add_fields(p, table, [n for n in table if n not in NOT_FLAGS])
    p.add_argument("--card", help="also write the LoRA card JSON here")
    add_common(p, recipe=False, out_default=None, out_help=OUT_HELP, out_metavar="LORA_DIR")
    p.set_defaults(fn=cmd_personalize)


def _request(args):
    from editing.dreambooth import PersonalizeRequest

    numbers = [n for n in PersonalizeRequest.FIELDS_UI if n not in NOT_FLAGS]
    fields = {k: getattr(args, k) for k in (*numbers, *SWITCHES, "identifier", "name")}
    if args.resolution:
        fields["resolution"] = args.resolution
    if args.out:
        fields["out_dir"] = args.out
    return PersonalizeRequest(tuple(args.images), args.class_noun,
                              gradient_checkpointing=CHECKPOINTING[args.gradient_checkpointing], **fields)


def _distributed() -> tuple[int, int, bool]:
    """(local rank, world size, main process?) under ``accelerate launch`` / torchrun; (0, 1, True) otherwise."""
    local_rank, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return local_rank, world, local_rank == 0 and int(os.environ.get("RANK", "0")) == 0


def _editor(args, local_rank: int, world: int):
    if world == 1:
        return editor(args)
    import torch  # one model per process, each on its own GPU

    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"  # CPU: gloo, for tests
    from editing.engine import Editor

    return Editor(args.model, allow_pickle=args.allow_pickle, device=device)


def _train(ed, req, is_main: bool):
    """``ed.edit(req)``; the first Ctrl-C checkpoints and stops at the next step, a second stops now."""
    cancel = threading.Event()

    def on_sigint(signum, frame):
        cancel.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    in_main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    try:
        return ed.edit(req, progress=progress() if is_main else None, cancel=cancel)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _report(args, req, result) -> None:
    notes(n for n in result.notices if n not in req.notices)
    card = result.extra["card"]
    if getattr(args, "card", None):
        with open(args.card, "w") as f:
            json.dump(card, f, indent=1)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    sys.stderr.write(f"wrote {result.extra['lora_path']} ({times}); prompt: “{card['instance_prompt']}”\n"
                     f"use it: python -m editing generate --prompt \"{card['instance_prompt']} on the beach\" "
                     f"--lora {result.extra['lora_name']}\n")


def cmd_personalize(args) -> None:
    if lora_specs(args):
        raise EditError("--lora is not used by personalize: subject LoRAs are trained on the base model.")
    req = _request(args)
    local_rank, world, is_main = _distributed()
    ed = _editor(args, local_rank, world)
    if is_main:
        notes(req.notices)
    result = _train(ed, req, is_main)
    if is_main:
        _report(args, req, result)


def add_commands(sub) -> None:
    """Add ``personalize`` to ``python -m editing``."""
    p = sub.add_parser("personalize", help="teach the model a subject from a few photos (DreamBooth LoRA)")
    _add_arguments(p)
    p.set_defaults(cancelled="cancelled (run again to resume from the last checkpoint)")
