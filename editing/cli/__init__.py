"""Command line: ``python -m editing drag|replay|move|paste|appearance|sketch|generate|personalize``.

One module per command group adds its subcommands with ``add_commands(sub)``; they share only
``editing.cli.common`` and never import each other. Every numeric flag, its default, range and
reason comes from the engine's request tables (``--help`` lists them). Progress goes to stderr;
bad input exits with status 2 and one ``error:`` line.
"""
from __future__ import annotations

import argparse

from editing.cli import drag, generate, guided, personalize
from editing.cli.common import run_command

COMMAND_MODULES = (drag, guided, generate, personalize)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m editing", description="DragCanvas: diffusion-based drag editing.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args, cancelled=getattr(args, "cancelled", "cancelled"))
