"""The outputs committed with the notebooks: the canonical CPU run, written back and kept honest.

``python -m qlora_helpers run --write-back`` executes the notebooks at their default parameters and
copies each executed notebook into ``notebooks/``, cleaned by ``clean_executed``:

- papermill's per-cell bookkeeping (timings, status) and the run's paths are dropped;
- widget views (progress bars, panels) are dropped with the notebook's widget state: a committed
  widget only shows "model not found" until its kernel runs;
- consecutive chunks of one stream (a streamer's pieces, text printed on both sides of a dropped bar) become one
  output, as Jupyter shows them;
- every code cell records the sha1 of its source (``metadata.qlora_helpers.source``).

``stale_cells`` compares that record with the source: a cell edited since the run, or added without
running, is stale, and the tests fail until the run is written back again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qlora_helpers.common.files import atomic_write_text

KEY = "qlora_helpers"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def source_digest(cell: dict) -> str:
    text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _keep_output(output: dict) -> bool:
    return WIDGET_VIEW not in output.get("data", {})


def merge_streams(outputs: list[dict]) -> list[dict]:
    """``outputs`` with consecutive chunks of one stream joined into one output, its text as a list of lines."""
    merged = []
    for o in outputs:
        last = merged[-1] if merged else {}
        if o.get("output_type") == "stream" == last.get("output_type") and o.get("name") == last.get("name"):
            merged[-1] = {**last, "text": "".join(last["text"]) + "".join(o["text"])}
        else:
            merged.append(o)
    return [{**o, "text": "".join(o["text"]).splitlines(keepends=True)} if o.get("output_type") == "stream" else o
            for o in merged]


def _clean_cell(cell: dict) -> dict:
    meta = {k: v for k, v in cell.get("metadata", {}).items() if k not in ("papermill", "execution", KEY)}
    cell = {**cell, "metadata": meta}
    if cell["cell_type"] == "code":
        cell["outputs"] = merge_streams([o for o in cell["outputs"] if _keep_output(o)])
        meta[KEY] = {"source": source_digest(cell)}
    return cell


def clean_executed(nb: dict, *, run_info: dict) -> dict:
    """An executed notebook as committed: see the module docstring. Refuses a run with parameters set."""
    injected = [c for c in nb["cells"] if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    if injected:
        raise ValueError("this run set parameters (papermill injected a cell): write back only a run at the "
                         "notebook's defaults, e.g. python -m qlora_helpers run --write-back")
    meta = {k: v for k, v in nb["metadata"].items() if k not in ("papermill", "widgets", KEY)}
    meta[KEY] = {"outputs": run_info}
    return {**nb, "metadata": meta, "cells": [_clean_cell(c) for c in nb["cells"]]}


def stale_cells(nb: dict) -> list[str]:
    """One line per code cell whose committed output does not belong to its source (empty: all current)."""
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        recorded = cell.get("metadata", {}).get(KEY, {}).get("source")
        first = "".join(cell["source"]).strip().splitlines()[:1]
        where = f"cell {i} ({first[0][:50] if first else 'empty'!r})"
        if cell.get("execution_count") is None or recorded is None:
            problems.append(f"{where} has not been run")
        elif recorded != source_digest(cell):
            problems.append(f"{where} was edited after its outputs were made")
    return problems


def widget_state(nb: dict) -> list[str]:
    """Committed widget state or widget views (empty: none)."""
    found = ["notebook metadata holds widget state"] if "widgets" in nb.get("metadata", {}) else []
    for i, cell in enumerate(nb["cells"]):
        if any(not _keep_output(o) for o in cell.get("outputs", [])):
            found.append(f"cell {i} holds a widget view")
    return found


def _sources(nb: dict) -> list[tuple[str, str]]:
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def write_back(executed_path: Path, notebook: Path, *, run_info: dict) -> Path:
    """Copy one executed notebook over ``notebook`` (atomically), once its sources are checked unchanged."""
    executed = json.loads(Path(executed_path).read_text(encoding="utf-8"))
    committed = json.loads(notebook.read_text(encoding="utf-8"))
    if _sources(executed) != _sources(committed):
        raise ValueError(f"{notebook.name} changed while it ran: run it again before writing it back")
    cleaned = clean_executed(executed, run_info=run_info)
    return atomic_write_text(notebook, json.dumps(cleaned, indent=1, ensure_ascii=False) + "\n")
