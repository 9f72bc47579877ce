"""``personalize``: train a DreamBooth LoRA from a folder of photos (editing/dreambooth.py).

    python -m editing personalize --images DIR --class-noun dog [--out LORA_DIR --steps N --rank R
                                  --prior-images N --model SPEC]
    accelerate launch -m editing.personalize --images DIR --class-noun dog ...   # one process per GPU

Both run ``cmd_personalize``: the trainer builds an ``accelerate.Accelerator`` itself, so a single
process just runs, and under ``accelerate launch`` each process loads the model on its own GPU and
gradients are averaged. Only the main process writes files and prints.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from editing.requests import EditError

DEFAULTS = {"steps": 400, "rank": 8, "lr": 1e-4, "prior_images": 50}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from editing.dreambooth import PERSONALIZE_FIELDS

    p.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="folder(s) or files with 3–10 photos of the subject (non-images are skipped)")
    p.add_argument("--class-noun", required=True, help="what the subject is, e.g. 'dog' (prompts: 'a [V] dog')")
    p.add_argument("--identifier", default="", help="rare token [V] (default: picked automatically)")
    p.add_argument("--name", default="", help="LoRA name (default: '<identifier>-<class>')")
    p.add_argument("--no-prior", dest="prior_preservation", action="store_false",
                   help="train without class-prior preservation")
    p.add_argument("--train-text-encoder", action="store_true", help="also put a LoRA on the text encoder")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal-flip augmentation")
    p.add_argument("--no-crop", dest="crop", action="store_false", help="no random-crop augmentation")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore earlier checkpoints")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="recompute activations in backward (auto: on for GPUs)")
    for name, (lo, hi, default, why) in PERSONALIZE_FIELDS.items():
        if name == "resolution":
            continue  # cli.common's --resolution is the training side here
        typ = int if isinstance(default, int) else float
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"{why} [{lo}..{hi}, default {default}]")
    p.add_argument("--card", help="also write the LoRA card JSON here")


def _request(args):
    from editing.dreambooth import PERSONALIZE_FIELDS, PersonalizeRequest

    fields = {k: getattr(args, k) for k in PERSONALIZE_FIELDS if getattr(args, k, None) is not None}
    if getattr(args, "resolution", None):
        fields["resolution"] = args.resolution
    gc = {"auto": None, "on": True, "off": False}[args.gradient_checkpointing]
    return PersonalizeRequest(tuple(args.images), args.class_noun, identifier=args.identifier, name=args.name,
                              out_dir=args.out or "", prior_preservation=args.prior_preservation,
                              train_text_encoder=args.train_text_encoder, flip=args.flip, crop=args.crop,
                              resume=args.resume, gradient_checkpointing=gc, **fields)


def _distributed() -> tuple[int, int]:
    """(local rank, world size) under ``accelerate launch`` / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def cmd_personalize(args) -> None:
    from editing import cli
    from editing.engine import Editor

    if cli.lora_specs(args):
        raise EditError("--lora is not used by personalize: subject LoRAs are trained on the base model.")
    req = _request(args)
    local_rank, world = _distributed()
    main = local_rank == 0 and int(os.environ.get("RANK", "0")) == 0
    if world > 1:  # one model per process, each on its own GPU
        import torch

        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"  # CPU: gloo, for tests
        ed = Editor(args.model, allow_pickle=args.allow_pickle, device=device)
    else:
        ed = cli.editor(args)
    for n in req.notices:
        if main:
            sys.stderr.write(f"note: {n}\n")
    cancel = threading.Event()

    def on_sigint(signum, frame):  # first Ctrl-C: checkpoint and stop at the next step; second: stop now
        cancel.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        result = ed.edit(req, progress=cli.progress() if main else None, cancel=cancel)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if not main:
        return
    for n in result.notices:
        if n not in req.notices:
            sys.stderr.write(f"note: {n}\n")
    card = result.extra["card"]
    if getattr(args, "card", None):
        with open(args.card, "w") as f:
            json.dump(card, f, indent=1)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    sys.stderr.write(f"wrote {result.extra['lora_path']} ({times}); prompt: “{card['instance_prompt']}”\n"
                     f"use it: python -m editing generate --prompt \"{card['instance_prompt']} on the beach\" "
                     f"--lora {result.extra['lora_name']}\n")


def add_commands(sub) -> None:
    """Add ``personalize`` to ``python -m editing`` (editing/cli.py)."""
    from editing import cli

    p = sub.add_parser("personalize", help="teach the model a subject from a few photos (DreamBooth LoRA)")
    _add_arguments(p)
    cli.common(p)
    p.set_defaults(fn=cmd_personalize, out=None)
    for a in p._actions:  # --out is the LoRA folder here, not an output PNG
        if a.dest == "out":
            a.help = "folder for NAME.safetensors + NAME.json (default: the LoRA library)"
            a.metavar = "LORA_DIR"


def main(argv=None) -> int:
    """``python -m editing.personalize`` / ``accelerate launch -m editing.personalize``: same code path."""
    from editing import cli

    ap = argparse.ArgumentParser(prog="python -m editing.personalize", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    _add_arguments(ap)
    cli.common(ap)
    ap.set_defaults(fn=cmd_personalize, out=None)
    args = ap.parse_args(argv)
    return cli.run_command(args, cancelled="cancelled (run again to resume from the last checkpoint)")


if __name__ == "__main__":
    sys.exit(main())
