"""Command line: ``python -m qlora_helpers COMMAND ...``.

Each command lives in the module that does the work; that module provides
``configure_parser(parser)`` and ``cli(args) -> int``. Modules are imported only for the
command being run, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "assets": ("qlora_helpers.common.assets", "fetch, convert and verify the offline assets (model, tokenizer, data)"),
    "run": ("qlora_helpers.common.runner", "execute notebooks with papermill into a run folder, with a summary"),
    "estimate": ("qlora_helpers.ch01_memory.estimator", "estimate GPU training memory for a model, method and batch"),
    "sft": ("qlora_helpers.ch03_sft.command",
            "supervised fine-tuning: full, LoRA, QLoRA 4-bit or 8-bit, from a config file or flags"),
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported to add its options."""
    parser = argparse.ArgumentParser(
        prog="python -m qlora_helpers",
        description="Helpers for the QLoRA course: assets, notebook runs and memory estimates.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).configure_parser(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.cli(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
