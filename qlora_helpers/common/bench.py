"""What every GPU result file records, so that anyone can re-run it and compare.

``write_benchmark("memory_validation", {...})`` writes ``benchmarks/results/memory_validation.json``
with the device, library versions, the exact command, the date, and the figures.
"""

from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlora_helpers.common.device import device_info, versions
from qlora_helpers.common.files import atomic_write_json, repo_root


def environment() -> dict:
    return {"device": device_info(), "versions": versions(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
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
        torch.cuda.reset_peak_memory_stats()
    return peak
