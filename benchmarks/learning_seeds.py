"""What each chapter learns, over seeds: the spread behind the learning test's thresholds.

Runs notebooks under the ``course`` parameter set (``data/parameter_sets/course.yaml``, what the
learning test runs) once per seed, reads the ``learning`` metrics each one writes into its results
(every metric oriented so that higher is better), and records the values per seed with their
minimum, maximum and mean in ``tests/learning_seeds.json``, beside the test that reads them. By
default the seeds are the notebook's own default seed and the next two. Notebooks without a
``seed`` parameter run once. Entries of other notebooks already in the file are kept.

    python -m benchmarks.learning_seeds 02 05
    python -m benchmarks.learning_seeds 03_qwen_sft --seeds 42 43 44 45
"""

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from qlora_helpers.common.bench import command_line, environment
from qlora_helpers.common.files import atomic_write_json, repo_root
from qlora_helpers.common.runner import declared_parameters, discover, parameter_set, run_notebooks

SET = "course"


def seeds_path() -> Path:
    return repo_root() / "tests" / "learning_seeds.json"


def default_seeds(notebook: Path, count: int = 3) -> list[int | None]:
    declared = declared_parameters(notebook)
    if "seed" not in declared:
        return [None]
    first = int(declared["seed"]["default"])
    return list(range(first, first + count))


def run_seed(notebook: Path, seed: int | None, overrides: dict) -> tuple[dict, float]:
    """One run of ``notebook`` under the course set (and ``seed``): its learning metrics and seconds."""
    params = {**overrides, **({} if seed is None else {"seed": seed})}
    run_dir, runs = run_notebooks([str(notebook)], {"profile": "cpu"},
                                  notebook_parameters={notebook.stem: params})
    record = runs[0]
    if record.status != "ok":
        raise SystemExit(f"error: {notebook.stem} with seed {seed} failed: {record.error} (see {run_dir})")
    learning = record.results.get("learning")
    if not learning:
        raise SystemExit(f"error: {notebook.stem} wrote no 'learning' metrics into its results")
    return learning, record.seconds


def spread(per_seed: list[dict]) -> dict:
    names = sorted(set().union(*per_seed))
    out = {}
    for name in names:
        values = [float(m[name]) for m in per_seed]
        out[name] = {"values": values, "min": min(values), "max": max(values),
                     "mean": round(sum(values) / len(values), 6)}
    return out


def measure(notebook: Path, seeds: list[int | None], overrides: dict) -> dict:
    per_seed, seconds = [], []
    for seed in seeds:
        learning, secs = run_seed(notebook, seed, overrides)
        per_seed.append(learning)
        seconds.append(secs)
        print(f"{notebook.stem} seed {seed}: {json.dumps(learning)} ({secs:.0f} s)")
    return {"parameters": overrides, "seeds": seeds, "seconds": seconds, "metrics": spread(per_seed),
            "command": command_line(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_seeds", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK", help="e.g. 02 or 05_multi_gpu_32b (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds to run (default: the notebook's and the next two)")
    args = parser.parse_args()
    course = parameter_set(SET)
    if args.seeds and len(args.seeds) < 3:
        raise SystemExit("error: a spread needs at least three seeds: give --seeds with three or more")
    for notebook in discover(args.notebooks):
        seeds = args.seeds if args.seeds and "seed" in declared_parameters(notebook) else default_seeds(notebook)
        record(notebook.stem, measure(notebook, seeds, course.get(notebook.stem, {})))


def record(stem: str, entry: dict) -> None:
    """Put one notebook's entry into the file, re-read just before (other notebooks may have been added)."""
    path = seeds_path()
    entries = json.loads(path.read_text())["notebooks"] if path.is_file() else {}
    entries[stem] = entry
    atomic_write_json(path, {"benchmark": "learning_seeds", "parameter_set": SET, **environment(),
                             "notebooks": dict(sorted(entries.items()))})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
