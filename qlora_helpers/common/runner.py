"""Execute the course notebooks with papermill, the way CI and ``make course`` do.

``python -m qlora_helpers run`` executes every ``notebooks/NN_*.ipynb`` in order (or the ones
named) into a run folder::

    runs/20261123-101500/
        00_setup/00_setup.ipynb      the executed copy, outputs included
        00_setup/00_setup.json       the notebook's results (written by ``save_results``)
        summary.json, summary.md     one row per notebook: status, seconds, key figures

``-p name value`` sets a parameter in every notebook whose ``parameters`` cell declares it
(values are read as YAML: ``2`` is an int, ``true`` a bool, ``cpu`` a string). From Python,
``run_notebooks(..., notebook_parameters={"03_qwen_sft": {"model_id": path}})`` adds parameters
for one notebook only, over the common ones (the tests give chapter 03 a tiny model this way).
Every value is checked against the type its parameters cell declares (``max_steps: int = 20``
refuses ``abc``; an ``int`` parameter counts something, steps, sizes or a seed, so it refuses ``-5``
too), and ``profile`` against the profiles this machine can run, before any notebook starts; so is the
run folder (a new one, an empty one or an earlier run's, never a file or a folder of other files).
A failing notebook is reported by name, cell and error, and the others still run.

``jobs=2`` (``--jobs 2``) runs two notebooks at a time, each kernel held to its share of the CPU's
threads (``OMP_NUM_THREADS``), the longest first by the last timing in ``course_cpu.json``: on a small
CPU two one-thread kernels finish sooner than one two-thread kernel after another (the tests do this).
"""

from __future__ import annotations

import difflib
import json
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from unittest.mock import patch

import papermill
import yaml
from papermill.exceptions import PapermillExecutionError
from tqdm.auto import tqdm

from qlora_helpers.common import outputs
from qlora_helpers.common.device import device_info, resolve_profile, versions
from qlora_helpers.common.files import (
    RESULTS_ENV,
    atomic_write_json,
    atomic_write_text,
    optional_benchmark,
    repo_root,
)
from qlora_helpers.common.results import markdown

SUMMARY_FILES = ("summary.json", "summary.md")


@dataclass
class NotebookRun:
    notebook: str
    status: str = "pending"          # ok | failed
    seconds: float = 0.0
    executed: str = ""
    results: dict = field(default_factory=dict)
    error: str = ""


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def is_companion(notebook: Path | str) -> bool:
    """Whether ``notebook`` is a chapter's companion (``03b_speed_and_memory``) rather than its core path."""
    return re.fullmatch(r"\d\d[a-z]_.+", Path(notebook).stem) is not None


def discover(names: list[str] | None = None) -> list[Path]:
    """The course notebooks in order, or the named ones (``00_setup``, ``00_setup.ipynb`` or a path).

    A chapter's core notebook is ``NN_name.ipynb``; its companions (``NNb_name.ipynb``, ``NNc_...``) hold
    the measurement-heavy sections and run after it."""
    all_books = sorted(notebooks_dir().glob("[0-9][0-9]*_*.ipynb"))
    if not names:
        return all_books
    chosen = []
    for name in names:
        path = Path(name)
        if path.suffix == ".ipynb" and path.is_file():
            chosen.append(path.resolve())
            continue
        match = [p for p in all_books if p.stem == path.stem or p.stem.startswith(path.stem + "_")]
        if not match:
            known = ", ".join(p.stem for p in all_books)
            raise ValueError(f"no notebook {name!r} in {notebooks_dir()}: choose from {known}")
        chosen.extend(match)
    return chosen


READING_WPM = 150   # words of prose and code a minute, for a reader who runs each cell and reads its output


def chapter_time(notebook: str) -> str:
    """How long ``notebook`` takes a learner, as its opening cell says it: reading (its words at
    ``READING_WPM``) and running on the 2-core CPU of ``benchmarks/results/course_cpu.json``, in its quoted
    timing (held to AVX2 kernels as a laptop without native bf16, computing in fp32)."""
    book = discover([notebook])[0]
    words = sum(len("".join(c["source"]).split()) for c in json.loads(book.read_text(encoding="utf-8"))["cells"])
    reading = f"about {max(1, round(words / READING_WPM))} minutes of reading"
    timing = optional_benchmark("course_cpu")
    mode = timing and timing["figures"]["modes"].get(timing["figures"].get("quoted_mode"), {})
    entry = (mode or {}).get("notebooks", {}).get(book.stem)
    if not entry:
        return f"{reading}; its running time is not measured yet (python -m benchmarks.course_time --only {book.stem})"
    cores, seconds = timing["device"].get("count", "?"), entry["seconds"]
    running = f"{seconds / 60:.0f} minutes" if seconds >= 90 else f"{seconds:.0f} seconds"
    kind = "without" if not mode.get("cpu", {}).get("bf16") else "with"
    return (f"{reading}, and {running} of running on a {cores}-core CPU {kind} native bf16 "
            f"(measured {entry['measured'][:10]}, benchmarks/results/course_cpu.json)")


def parameter_set(name: str) -> dict[str, dict]:
    """A named set of per-notebook parameters, ``data/parameter_sets/<name>.yaml`` (notebook stem -> overrides)."""
    folder = repo_root() / "data" / "parameter_sets"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise ValueError(f"no parameter set {name!r} in {folder}: choose from {known}")
    return {stem: dict(values or {}) for stem, values in (yaml.safe_load(path.read_text()) or {}).items()}


def declared_parameters(notebook: Path) -> dict:
    """The parameters cell of ``notebook``, as papermill reads it: name -> type, default and comment."""
    return papermill.inspect_notebook(str(notebook))


def check_value(stem: str, name: str, value, declared: dict):
    """``value`` as the type the parameters cell of ``stem`` declares for ``name``; one-line error if it is not.

    An ``int`` parameter is a count (steps, sizes, a seed) and a ``float`` one a rate, scale or share: every one the
    course declares is never negative, a float is finite, and a dropout or a ratio is at most 1.

    >>> check_value("03_qwen_sft", "lr_lora", 1, {"lr_lora": {"inferred_type_name": "float", "default": "2e-4"}})
    1.0
    """
    kind, default = declared[name].get("inferred_type_name"), declared[name].get("default")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not {"int": number and isinstance(value, int), "float": number, "bool": isinstance(value, bool)}.get(kind, True):
        example = "true or false" if kind == "bool" else default
        raise ValueError(f"parameter {name} of {stem} must be {kind} (its parameters cell: {name}: {kind} = "
                         f"{default}), not {value!r}: pass e.g. -p {name} {example}")
    cell = f"its parameters cell: {name}: {kind} = {default}  # {declared[name].get('help', '')}"
    if kind in ("int", "float") and not value >= 0:     # also NaN
        what = "a count" if kind == "int" else "a rate, scale or share"
        raise ValueError(f"parameter {name} of {stem} is {what} and cannot be negative ({cell}), not {value}: "
                         f"pass 0 or more, e.g. -p {name} {default}")
    share = kind == "float" and ("dropout" in name or "ratio" in name)      # at most 1
    if kind == "float" and (value == float("inf") or share and value > 1):
        raise ValueError(f"parameter {name} of {stem} is out of range ({cell}), not {value}: "
                         f"pass {'0 to 1' if share else 'a finite number'}, e.g. -p {name} {default}")
    value = {"float": float, "str": str}.get(kind, lambda v: v)(value)
    if name == "profile":
        resolve_profile(value)      # unknown profile, or gpu without CUDA: refused here, not in cell 3
    return value


def parse_value(text: str):
    """``"2"`` -> 2, ``"0.5"`` -> 0.5, ``"true"`` -> True, anything else stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, list, dict)) else text


def _failure(err: Exception) -> str:
    if isinstance(err, PapermillExecutionError):
        return f"cell {err.cell_index} (execution count {err.exec_count}): {err.ename}: {err.evalue}".strip()
    return f"{type(err).__name__}: {err}"


def run_one(notebook: Path, out_dir: Path, parameters: dict, *, kernel: str = "python3",
            progress: bool = True) -> NotebookRun:
    """Execute one notebook into ``out_dir``, where its ``save_results`` writes (the kernel runs in ``notebooks/``,
    so the folder is made absolute first)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    declared = declared_parameters(notebook)
    params = {k: check_value(notebook.stem, k, v, declared) for k, v in parameters.items() if k in declared}
    record = NotebookRun(notebook=notebook.stem, executed=str(out_dir / notebook.name))
    start = time.perf_counter()
    try:
        with patch.dict(os.environ, {RESULTS_ENV: str(out_dir)}):   # the kernel inherits it
            papermill.execute_notebook(notebook, record.executed, parameters=params, kernel_name=kernel,
                                       cwd=notebook.parent, progress_bar=progress, log_output=False)
        record.status = "ok"
    except Exception as err:  # a failing notebook must not stop the others
        record.status, record.error = "failed", _failure(err)
    record.seconds = round(time.perf_counter() - start, 1)
    results = out_dir / f"{notebook.stem}.json"
    if results.is_file():
        record.results = json.loads(results.read_text())
    elif record.status == "ok":
        record.status, record.error = "failed", f"ran, but wrote no {results.name} (end it with save_results)"
    if record.status != "ok":   # said as it happens, above the progress bars
        tqdm.write(f"FAILED {record.notebook}.ipynb: {record.error}\n       executed copy: {record.executed}")
    return record


def _figures(results: dict, limit: int = 4) -> str:
    flat = [(k, v) for k, v in results.items() if isinstance(v, (int, float, str, bool)) and len(str(v)) < 40]
    return ", ".join(f"{k}={v}" for k, v in flat[:limit])


def _one_line(text: str) -> str:
    """An error's lines joined by ``; ``: one table row per notebook, whatever the error says (``|`` is escaped)."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def summary_markdown(runs: list[NotebookRun]) -> str:
    rows = [{**asdict(r), "detail": _one_line(r.error) if r.status != "ok" else _figures(r.results)} for r in runs]
    columns = (("notebook", "notebook"), ("status", "status"), ("seconds", "seconds", ".1f"), ("key figures", "detail"))
    done = f"{sum(r.status == 'ok' for r in runs)} of {len(runs)} notebooks ok in {sum(r.seconds for r in runs):.0f} s"
    return f"{markdown(rows, columns)}\n\n{done}\n"


def _run_alone(book: Path, out_dir: Path, params: dict, kernel: str, threads: int) -> NotebookRun:
    """``run_one`` in a worker process of its own, the kernel it starts held to ``threads`` threads."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return run_one(book, out_dir, params, kernel=kernel, progress=False)


def longest_first(books: list[Path]) -> list[Path]:
    """``books`` ordered by their seconds in the last course timing (``course_cpu.json``), unknown ones last."""
    path = repo_root() / "benchmarks" / "results" / "course_cpu.json"
    timed = json.loads(path.read_text())["figures"]["modes"]["native"]["notebooks"] if path.is_file() else {}
    return sorted(books, key=lambda b: -timed.get(b.stem, {}).get("seconds", 0.0))


def run_parallel(books: list[Path], run_dir: Path, params_of, *, kernel: str, jobs: int,
                 progress: bool) -> list[NotebookRun]:
    """Run ``books`` ``jobs`` at a time (the longest first); the records come back in ``books``' order."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_alone, b, run_dir / b.stem, params_of(b), kernel, threads): b
                   for b in longest_first(books)}
        done = {futures[f]: f.result() for f in tqdm(as_completed(futures), total=len(futures),
                                                            desc="notebooks", unit="nb", disable=not progress)}
    return [done[b] for b in books]


def _check_parameters(books: list[Path], parameters: dict, notebook_parameters: dict[str, dict]) -> None:
    """Refuse, before any notebook starts, a parameter no notebook declares or a value of the wrong type."""
    declared = {b.stem: declared_parameters(b) for b in books}
    names = set().union(*declared.values())
    if unknown := sorted(set(parameters) - names):
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {close[0]}?" if close else f"these notebooks take {', '.join(sorted(names))}"
        raise ValueError(f"no notebook declares parameter(s) {', '.join(unknown)}: {hint}")
    known = sorted({b.stem for b in discover()} | set(declared))
    for stem, extra in notebook_parameters.items():
        if stem not in known:
            raise ValueError(f"notebook_parameters: no notebook {stem!r}: choose from {', '.join(known)}")
        if stem in declared and (missing := set(extra) - set(declared[stem])):
            raise ValueError(f"{stem} declares no parameter(s) {', '.join(sorted(missing))}: "
                             f"check its parameters cell")
    for stem, names in declared.items():
        for name, value in {**parameters, **notebook_parameters.get(stem, {})}.items():
            if name in names:
                check_value(stem, name, value, names)


def check_run_dir(run_dir: str | Path, books: list[Path]) -> Path:
    """``run_dir`` made absolute, refused in one line when it is (or lies under) a file, or holds anything the
    runner did not write (its files go there: one folder per notebook, ``summary.json``, ``summary.md``)."""
    path, probe = Path(run_dir).resolve(), Path(run_dir).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--run-dir {run_dir}: {probe} is a file, not a folder; give a folder (a new one is created)")
    ours = {*SUMMARY_FILES, *(b.stem for b in discover()), *(b.stem for b in books)}
    if path.is_dir() and (other := sorted(p.name for p in path.iterdir() if p.name not in ours)):
        raise ValueError(f"--run-dir {run_dir} already holds {', '.join(other[:3])}, which the runner did not write: "
                         "give a new or empty folder, or an earlier run's")
    return path


def run_notebooks(names: list[str] | None = None, parameters: dict | None = None,
                  run_dir: str | Path | None = None, *, kernel: str = "python3",
                  progress: bool = True, notebook_parameters: dict[str, dict] | None = None,
                  jobs: int = 1) -> tuple[Path, list[NotebookRun]]:
    """Execute notebooks in order into ``run_dir`` (relative: to the current folder) and write ``summary.json``
    and ``summary.md`` there; parameters and ``jobs`` as the module's docstring says."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: run at least one notebook at a time (jobs >= 1)")
    books = discover(names)
    parameters = dict(parameters or {})
    notebook_parameters = {k: dict(v) for k, v in (notebook_parameters or {}).items()}
    _check_parameters(books, parameters, notebook_parameters)
    run_dir = check_run_dir(run_dir or repo_root() / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S"), books)
    run_dir.mkdir(parents=True, exist_ok=True)

    def params_of(book: Path) -> dict:
        return {**parameters, **notebook_parameters.get(book.stem, {})}

    if jobs > 1:
        runs = run_parallel(books, run_dir, params_of, kernel=kernel, jobs=jobs, progress=progress)
    else:
        runs = []
        for book in (bar := tqdm(books, desc="notebooks", unit="nb", disable=not progress)):
            bar.set_postfix_str(book.stem)
            runs.append(run_one(book, run_dir / book.stem, params_of(book), kernel=kernel, progress=progress))
    atomic_write_json(run_dir / "summary.json", {
        "created": datetime.now().isoformat(timespec="seconds"), "parameters": parameters,
        "notebook_parameters": notebook_parameters, "versions": versions(), "notebooks": [asdict(r) for r in runs],
        "total_seconds": round(sum(r.seconds for r in runs), 1)})
    atomic_write_text(run_dir / "summary.md", summary_markdown(runs))
    return run_dir, runs


def configure_parser(parser) -> None:
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                        help="notebooks to run, e.g. 00_setup or 00 (default: all, in order)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set a parameter in every notebook that declares it (repeatable)")
    parser.add_argument("--run-dir", help="where to write executed notebooks and results (default: runs/<time>)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--set", dest="parameter_set", metavar="NAME",
                        help="a named parameter set from data/parameter_sets/ (course: the learning test's run)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks run at once, each with its share of the CPU threads (default: 1)")
    parser.add_argument("--write-back", action="store_true",
                        help="copy each executed notebook, outputs included, into notebooks/ (the committed "
                             "canonical CPU run: default parameters only)")


def write_back_run(runs: list[NotebookRun]) -> list[Path]:
    """Copy the executed notebooks of a run at default parameters into ``notebooks/`` (see ``outputs``)."""
    if device_info()["type"] != "cpu":
        raise ValueError("the committed outputs are the CPU run: hide the GPU (CUDA_VISIBLE_DEVICES=) and run again")
    info = {"command": "python -m qlora_helpers run --write-back", "device": device_info()}
    written = []
    for record in runs:
        if record.status != "ok":
            raise ValueError(f"{record.notebook} failed ({record.error}): nothing of it was written back")
        notebook = notebooks_dir() / f"{record.notebook}.ipynb"
        run_info = {**info, "date": datetime.now().isoformat(timespec="seconds"), "seconds": record.seconds}
        written.append(outputs.write_back(Path(record.executed), notebook, run_info=run_info))
    return written


def cli(args) -> int:
    params = {name: parse_value(value) for name, value in args.parameter}
    if args.write_back and (params or args.parameter_set):
        raise ValueError("--write-back commits the run at the notebooks' default parameters: drop -p and --set")
    if args.write_back and args.jobs > 1:
        raise ValueError("--write-back commits the canonical run, one notebook at a time: drop --jobs")
    per_notebook = parameter_set(args.parameter_set) if args.parameter_set else None
    run_dir, runs = run_notebooks(args.notebooks, params, args.run_dir, kernel=args.kernel,
                                  progress=not args.no_progress, notebook_parameters=per_notebook, jobs=args.jobs)
    print(summary_markdown(runs))
    print(f"run folder: {run_dir}")
    if args.write_back:
        for path in write_back_run([r for r in runs if r.status == "ok"]):
            print(f"outputs written back to {path}")
    return 0 if all(r.status == "ok" for r in runs) else 1
