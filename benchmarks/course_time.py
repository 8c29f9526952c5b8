"""Time the whole course as ``make course`` runs it (every notebook, default parameters).

Writes ``benchmarks/results/course_cpu.json`` (or ``course_gpu.json`` on a GPU) with the seconds of
each notebook and their total; the README quotes the total from that file. ``--only`` re-times some
notebooks and keeps the other entries of an existing file (each entry says when it was measured).

    python benchmarks/course_time.py
    python benchmarks/course_time.py --only 03_qwen_sft
"""

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from qlora_helpers.bench import write_benchmark
from qlora_helpers.device import device_info
from qlora_helpers.results import repo_root
from qlora_helpers.runner import run_notebooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="re-time these, keep the other entries")
    parser.add_argument("--out", help="result file (default: benchmarks/results/course_<cpu|gpu>.json)")
    args = parser.parse_args()
    kind = "gpu" if device_info()["type"] == "cuda" else "cpu"
    out = Path(args.out or repo_root() / "benchmarks" / "results" / f"course_{kind}.json")
    entries = json.loads(out.read_text())["figures"]["notebooks"] if args.only and out.is_file() else {}
    run_dir, runs = run_notebooks(args.only, progress=True)
    failed = [r.notebook for r in runs if r.status != "ok"]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; see {run_dir}/summary.md")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries.update({r.notebook: {"seconds": r.seconds, "measured": now} for r in runs})
    entries = dict(sorted(entries.items()))
    write_benchmark(f"course_{kind}", {
        "total_seconds": round(sum(e["seconds"] for e in entries.values()), 1),
        "notebooks": entries}, out)


if __name__ == "__main__":
    main()
