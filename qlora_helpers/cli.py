"""Command line: ``python -m qlora_helpers COMMAND ...``.

Each command lives in the module that does the work; that module provides
``configure_parser(parser)`` and ``cli(args) -> int``, and its entry in ``COMMANDS`` is all the rest
needs. Modules are imported only for the command being run, so ``--help`` stays fast. Bad input is one
line and exit status 2 (``qlora_helpers.errors``).
"""

from __future__ import annotations

import importlib

from qlora_helpers.errors import DEBUG_ENV, DEBUG_FLAG, OneLineParser, UserError, run_main

__all__ = ["COMMANDS", "UserError", "build_parser", "main"]

# command -> (module, one-line help)
COMMANDS = {
    "assets": ("qlora_helpers.common.assets", "fetch, convert and verify the offline assets (model, tokenizer, data)"),
    "run": ("qlora_helpers.common.runner", "execute notebooks with papermill into a run folder, with a summary"),
    "estimate": ("qlora_helpers.ch01_memory.estimator", "estimate GPU training memory for a model, method and batch"),
    "sft": ("qlora_helpers.ch03_sft.command",
            "supervised fine-tuning: full, LoRA, QLoRA 4-bit or 8-bit, from a config file or flags"),
    "vlm": ("qlora_helpers.ch04_vlm.command",
            "QLoRA on an image-text-to-text model (LLaVA, Qwen2-VL, Idefics3...) from image-chat JSONL"),
    "evaluate": ("qlora_helpers.ch05_multi_gpu.evaluate",
                 "score a saved chapter-05 adapter (best/ or final/) on the forward and reverse questions"),
}


def build_parser(command: str | None = None) -> OneLineParser:
    """The full parser; only ``command``'s module is imported to add its options."""
    parser = OneLineParser(
        prog="python -m qlora_helpers",
        description="Helpers for the QLoRA course: assets, notebook runs and memory estimates.",
    )
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the full traceback of an error (also {DEBUG_ENV}=1); allowed anywhere")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).configure_parser(sub_parser)
    return parser


def _main(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(importlib.import_module(COMMANDS[args.command][0]).cli(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input is one line on stderr and exit status 2 (see ``qlora_helpers.errors``)."""
    return run_main(_main, argv)
