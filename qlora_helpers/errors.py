"""Bad input stops with one line and exit status 2; ``--debug`` (or ``QLORA_DEBUG=1``) shows the traceback.

Every command of the course (``python -m qlora_helpers ...``, ``python -m qlora_helpers.ch03_sft.chat``,
``python -m benchmarks.NAME``) parses its arguments with ``OneLineParser`` and runs under ``run_main``::

    error: lora_r must be a positive integer (8-64 is typical for models under 1B), not 0

The line says what is wrong and how to fix it. ``USER_ERRORS`` are the exceptions that mean bad input
(a value, a file, a missing asset); anything else is a bug and is reported, also in one line, with
exit status 1 and the hint to rerun with ``--debug``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable

DEBUG_ENV = "QLORA_DEBUG"
DEBUG_FLAG = "--debug"
INTERRUPTED = ("a training run continues from its last checkpoint when the same command is given again with "
               "--resume")


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit status 2."""


# AssetError is a RuntimeError; it is matched by name so this module imports nothing heavy.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
USER_ERROR_NAMES = ("AssetError",)


def one_line(text: str) -> str:
    """``text`` with its lines joined by ``; `` (a message must never spill over several lines)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def did_you_mean(word: str, known, otherwise: str, quote: str = "") -> str:
    """``"did you mean X?"`` with the closest of ``known`` to a misspelt ``word``, else ``otherwise``."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"did you mean {quote}{close[0]}{quote}?" if close else otherwise


def check_keys(values, known, source: str, command: str) -> None:
    """Refuse the first key of ``values`` not in ``known`` in one line, with the closest known one."""
    for key in values:
        if key not in known:
            hint = did_you_mean(key, known, f"see `python -m qlora_helpers {command} --help`", quote="'")
            raise ValueError(f"{source}: unknown key '{key}': {hint}")


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (no usage block) naming the fix, exit status 2.

    A misspelt option gets the closest real one: ``unrecognized arguments: --lerning_rate 1e-4;
    did you mean --learning_rate?``.
    """

    def error(self, message: str):
        hint, prog = "", self.prog
        if "unrecognized arguments" in message:
            word = next((w for w in message.split(":", 1)[1].split() if w.startswith("-")), "")
            owner = {s: self.prog for a in self._actions for s in a.option_strings}
            for sub in self._subparsers._group_actions if self._subparsers else []:
                for parser in getattr(sub, "choices", {}).values():   # a command's options: only its own is built
                    owner.update({s: parser.prog for a in parser._actions for s in a.option_strings if s != "-h"})
            close = difflib.get_close_matches(word, owner, n=1)
            if close:
                hint, prog = f"did you mean {close[0]}? ", owner[close[0]]
        self.exit(2, f"error: {one_line(message)}; {hint}see `{prog} --help`\n")


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; turn an exception into one line on stderr (2: bad input, 1: a bug, 130: Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"stopped (Ctrl-C): {INTERRUPTED}", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, USER_ERRORS) or type(err).__name__ in USER_ERROR_NAMES:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
        print(f"error: {type(err).__name__}: {one_line(err)} (unexpected; rerun with {DEBUG_FLAG} or "
              f"{DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
