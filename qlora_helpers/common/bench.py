"""What every GPU result file records, and how a benchmark hands rows from a worker process to its parent.

``write_benchmark("memory_validation", {...})`` writes ``benchmarks/results/memory_validation.json``
with the device, library versions, the exact command, the date, and the figures.

Benchmarks measure each configuration in a fresh worker process, so that no memory of one row counts
towards the next and a crash loses one row only. The worker calls ``emit(row)`` for each result (one
``ROW {json}`` line on its stdout); the parent gets the rows from ``run_worker``, or a ``WorkerError``
naming the row and the worker's last error line
(``adapter-cp: python -m benchmarks.tad_memory exited with status 1: RuntimeError: ...``)::

    rows = run_worker("benchmarks.tad_memory", ["--worker", "adapter-cp"], label="adapter-cp", timeout=150)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlora_helpers.common.device import device_info, versions
from qlora_helpers.common.files import atomic_write_json, repo_root

ROW = "ROW "   # the prefix of a result line on a worker's stdout


def command_line() -> str:
    """This process's command as one would type it again: ``python -m benchmarks.tad_memory --quick``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name.removesuffix(".__main__")] if spec else sys.argv[:1]
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *head, *sys.argv[1:]])


def environment() -> dict:
    return {"device": device_info(), "versions": versions(), "command": command_line(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_benchmark(name: str, figures: dict, out: str | Path | None = None) -> Path:
    """Write ``{environment..., "figures": figures}`` atomically and return the path."""
    path = Path(out) if out else repo_root() / "benchmarks" / "results" / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, **environment(), "figures": figures})
    print(f"wrote {path}")
    return path


def cuda_peak_gib(reset: bool = False) -> dict:
    """Peak allocated and reserved CUDA memory since the last reset, in GiB."""
    torch.cuda.synchronize()
    peak = {"allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    if reset:
        reset_cuda_peak()
    return peak


# --------------------------------------------------------------------------- a notebook's training cells on a GPU
GPU_SECTIONS: list[dict] = []     # this kernel's measured sections, in order: what a notebook's results file records
_OPEN: list[dict] = []            # sections being measured now, innermost last
SECTION_PREFIX = "GPU memory, "


def _size(gib: float) -> str:
    """``1.234 GiB``, or ``12.3 MiB`` below a tenth of a GiB (a one-layer example's count is a few KiB)."""
    return f"{gib * 1024:.1f} MiB" if gib < 0.1 else f"{gib:.3f} GiB"


def section_line(rec: dict) -> str:
    """How a measured section prints: ``GPU memory, <section>: peak allocated A GiB, reserved R GiB; estimate E GiB
    (<what the estimate counts>)``."""
    estimate = "no estimate" if rec["estimate_gib"] is None else f"estimate {_size(rec['estimate_gib'])}"
    held = "" if rec.get("start_gib") is None else f" ({_size(rec['start_gib'])} of it held when the section began)"
    return (f"{SECTION_PREFIX}{rec['section']}: peak allocated {_size(rec['peak_allocated_gib'])}{held}, reserved "
            f"{_size(rec['peak_reserved_gib'])}; {estimate} ({rec['estimate_of']})")


def _fold_peaks() -> None:
    for rec in _OPEN:
        rec["peak_allocated_gib"] = max(rec["peak_allocated_gib"], torch.cuda.max_memory_allocated() / 2**30)
        rec["peak_reserved_gib"] = max(rec["peak_reserved_gib"], torch.cuda.max_memory_reserved() / 2**30)


def reset_cuda_peak() -> None:
    """``torch.cuda.reset_peak_memory_stats()``, first folding the peak so far into every open ``gpu_memory``
    section: code that measures its own part of a cell (a step, a run) leaves the cell's peak whole."""
    torch.cuda.synchronize()
    _fold_peaks()
    torch.cuda.reset_peak_memory_stats()


class _Section(dict):
    def estimate(self, gib: float | None, of: str) -> None:
        """The chapter's estimate of this section's peak allocated memory (None: none could be made), and what it
        counts (or why there is none)."""
        self.update(estimate_gib=gib, estimate_of=of)      # report_section rounds it


def _require_estimate(rec: _Section) -> None:
    if "estimate_gib" not in rec:
        raise ValueError(f"gpu_memory section {rec['section']!r} ended without its estimate: call .estimate(gib, of)")


@contextmanager
def gpu_memory(section: str, device: str) -> Iterator[_Section]:
    """Around a training cell (or one run of it) on a GPU: the peak ``torch.cuda.max_memory_allocated`` and
    ``max_memory_reserved`` while the block ran, printed at its end beside the chapter's estimate (``.estimate(gib,
    of)`` inside the block) and kept in ``GPU_SECTIONS``. The peak counts all the GPU holds, so the line also says
    how much of it earlier cells left there when the block began (the estimate counts the section's run alone).
    On a CPU it measures and prints nothing (the estimate is still required)."""
    rec = _Section(section=section)
    if not str(device).startswith("cuda"):
        yield rec
        _require_estimate(rec)
        return
    reset_cuda_peak()
    rec.update(peak_allocated_gib=0.0, start_gib=torch.cuda.memory_allocated() / 2**30, peak_reserved_gib=0.0)
    _OPEN.append(rec)
    try:
        yield rec
        torch.cuda.synchronize()
        _fold_peaks()
    finally:
        _OPEN.remove(rec)
    _require_estimate(rec)
    report_section(**rec)


def report_section(section: str, peak_allocated_gib: float, peak_reserved_gib: float, estimate_gib: float | None,
                   estimate_of: str, start_gib: float | None = None) -> None:
    """Print and keep one measured section (``gpu_memory`` calls it; so does a notebook for peaks its worker
    processes measured). ``start_gib``: what the GPU held when the section began (earlier cells' tensors)."""
    rec = {"section": section, "peak_allocated_gib": round(peak_allocated_gib, 5),
           "start_gib": None if start_gib is None else round(start_gib, 5),
           "peak_reserved_gib": round(peak_reserved_gib, 5),
           "estimate_gib": None if estimate_gib is None else round(estimate_gib, 5), "estimate_of": estimate_of}
    GPU_SECTIONS.append(rec)
    print(section_line(rec))


# --------------------------------------------------------------------------- worker processes
def error_line(err: BaseException) -> str:
    """How a result file records a failure: the exception's type and the first line of its message."""
    first = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {first}"


def emit(row: dict) -> None:
    """In a worker process: hand one result row (a JSON-able dict) to the parent."""
    print(ROW + json.dumps(row), flush=True)


class WorkerError(RuntimeError):
    """A worker failed. ``str(err)`` is one line; ``rows`` are the rows it emitted first, ``stderr`` all it wrote,
    ``returncode`` its exit status (negative: killed by that signal, as after a timeout)."""

    def __init__(self, message: str, rows: list[dict], stderr: str, returncode: int):
        super().__init__(message)
        self.rows, self.stderr, self.returncode = rows, stderr, returncode

    @property
    def out_of_memory(self) -> bool:
        return "out of memory" in self.stderr.lower()


def run_worker(module: str, args: list, *, label: str, timeout: float | None = None, env: dict | None = None,
               on_row: Callable[[dict], None] | None = None, echo: bool = False) -> list[dict]:
    """Run ``python -m module *args`` in the repository root and return the rows it emitted.

    ``label`` names the row(s) in errors; ``timeout`` (seconds) kills the worker; ``env`` adds environment
    variables; ``on_row(row)`` sees each row as it arrives (to save after
    every row); ``echo`` prints the worker's other stdout lines. Raises ``WorkerError``.
    """
    cmd = [sys.executable, "-m", module, *map(str, args)]
    rows: list[dict] = []
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
            cmd, cwd=repo_root(), env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=err,
            text=True) as proc:
        timer = threading.Timer(timeout or 0, proc.kill)
        if timeout:
            timer.start()
        try:
            for line in proc.stdout:
                if line.startswith(ROW):
                    rows.append(json.loads(line[len(ROW):]))
                    if on_row:
                        on_row(rows[-1])
                elif echo:
                    print(line, end="", flush=True)
            code = proc.wait()
        except BaseException:    # the parent stopped reading (Ctrl-C, a failing on_row): stop the worker
            proc.kill()
            raise
        finally:
            timer.cancel()
        err.seek(0)
        stderr = err.read()
    timed_out = bool(timeout) and code < 0 and time.monotonic() - start >= timeout
    problem = (f"timed out after {timeout:g} s" if timed_out else f"exited with status {code}" if code
               else "exited without a row" if not rows else "")
    if problem:
        tail = next((ln.strip()[:300] for ln in reversed(stderr.splitlines()) if ln.strip()), "")
        message = f"{label}: python -m {module} {problem}" + (f" (after {len(rows)} row(s))" if rows else "")
        raise WorkerError(message + (f": {tail}" if tail else ""), rows, stderr, code)
    return rows
