"""Time the whole course as ``make course`` runs it (every notebook, default parameters).

Writes ``benchmarks/results/course_cpu.json`` (or ``course_gpu.json`` on a GPU) with the per-notebook
seconds; the README quotes the total from that file.

    python benchmarks/course_time.py
"""

import argparse

from qlora_helpers.bench import write_benchmark
from qlora_helpers.device import device_info
from qlora_helpers.runner import run_notebooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="result file (default: benchmarks/results/course_<cpu|gpu>.json)")
    args = parser.parse_args()
    run_dir, runs = run_notebooks(progress=True)
    failed = [r.notebook for r in runs if r.status != "ok"]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; see {run_dir}/summary.md")
    kind = "gpu" if device_info()["type"] == "cuda" else "cpu"
    write_benchmark(f"course_{kind}", {
        "total_seconds": round(sum(r.seconds for r in runs), 1),
        "notebooks": {r.notebook: r.seconds for r in runs}, "run_dir": str(run_dir)}, args.out)


if __name__ == "__main__":
    main()
