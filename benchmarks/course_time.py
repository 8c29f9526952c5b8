"""Time the whole course as ``make course`` runs it (every notebook, default parameters).

On the CPU the course is timed twice: as this CPU runs it (bf16 where it computes bf16 natively) and
as an AVX2 laptop runs it, with torch and oneDNN held to their AVX2 kernels
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), so that the course computes in fp32 and
any bf16 left in it runs as slowly as on such a laptop. ``total_seconds`` is the AVX2 run's, the laptop the
course is written for (``quoted_mode``): the time the README and each notebook's opening tell a learner to expect;
``core_seconds`` the same run without the companion notebooks (``03b_...``: the measurement-heavy sections),
the chapters' core path. The native run is kept beside it.

Writes ``benchmarks/results/course_cpu.json`` (on a GPU, ``python -m benchmarks.course_gpu`` runs and records the
course instead). ``--only`` re-times some notebooks and keeps the other entries of an existing file (each says
when it was measured); a mode not timed now keeps its entry. ``--write-back`` also writes the native run's
executed notebooks into ``notebooks/``: the committed outputs and the timing come from one run.

    python -m benchmarks.course_time
    python -m benchmarks.course_time --only 03_qwen_sft --modes avx2
    python -m benchmarks.course_time --modes native --write-back
"""

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from qlora_helpers.common.bench import emit, run_worker, write_benchmark
from qlora_helpers.common.device import device_info
from qlora_helpers.common.files import read_result_file, repo_root
from qlora_helpers.common.runner import is_companion, run_notebooks, write_back_run
from qlora_helpers.errors import OneLineParser, run_main

# how each CPU mode is run: extra environment of the notebook kernels
MODES = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def cpu_facts(env: dict) -> dict:
    """What the notebook kernels will see of the CPU under ``env`` (a fresh interpreter reads it)."""
    return run_worker("benchmarks.course_time", ["--cpu-facts"], label=f"CPU facts under {env or 'no change'}",
                      env=env, timeout=120)[0]


def time_notebooks(only, env: dict, entries: dict) -> tuple[dict, list]:
    """Run the notebooks with ``env`` added; return ``entries`` updated with their seconds, and the runs."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                      # the papermill kernels inherit the environment
    try:
        run_dir, runs = run_notebooks(only, progress=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    failed = [r.notebook for r in runs if r.status != "ok"]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; see {run_dir}/summary.md")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries.update({r.notebook: {"seconds": r.seconds, "measured": now} for r in runs})
    return dict(sorted(entries.items())), runs


def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m benchmarks.course_time", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="re-time these, keep the other entries")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=sorted(MODES),
                        help="CPU modes to time (default: both)")
    parser.add_argument("--out", help="result file (default: benchmarks/results/course_cpu.json)")
    parser.add_argument("--write-back", action="store_true",
                        help="also write the native run's outputs back into notebooks/ (the committed outputs)")
    parser.add_argument("--cpu-facts", action="store_true", help=argparse.SUPPRESS)   # internal: cpu_facts' worker
    args = parser.parse_args(argv)
    if args.cpu_facts:
        facts = device_info()
        emit({k: facts[k] for k in ("capability", "bf16", "compute_dtype")})
        return
    if device_info()["type"] == "cuda":
        raise ValueError("course_time times the course on a CPU (hide the GPU: CUDA_VISIBLE_DEVICES= python -m "
                         "benchmarks.course_time); on a GPU, python -m benchmarks.course_gpu runs and records it")
    out = Path(args.out or repo_root() / "benchmarks" / "results" / "course_cpu.json")
    old = {}
    if out.is_file():   # modes not timed now, and with --only the other notebooks, keep their entries
        old = read_result_file(out, keys=("figures.modes",), rewrite="python -m benchmarks.course_time (no --only)")
        old = old["figures"]["modes"]
    modes = {m: MODES[m] for m in args.modes}
    if args.write_back and "native" not in modes:
        raise SystemExit("error: --write-back takes the native CPU run: run on a CPU with --modes native")
    results = {m: old[m] for m in old if m not in modes}     # modes not timed now keep their entries
    for mode, env in modes.items():
        kept = dict(old.get(mode, {}).get("notebooks", {})) if args.only else {}
        entries, runs = time_notebooks(args.only, env, kept)
        if args.write_back and mode == "native":
            for path in write_back_run(runs):
                print(f"outputs written back to {path}")
        results[mode] = {"environment": env, "cpu": cpu_facts(env),
                         "total_seconds": round(sum(e["seconds"] for e in entries.values()), 1),
                         "core_seconds": round(sum(e["seconds"] for n, e in entries.items() if not is_companion(n)), 1),
                         "notebooks": entries}
    quoted = "avx2" if "avx2" in results else "native"
    write_benchmark("course_cpu", {"total_seconds": results[quoted]["total_seconds"],
                                       "core_seconds": results[quoted].get("core_seconds"), "quoted_mode": quoted,
                                       "modes": results}, out)


if __name__ == "__main__":
    sys.exit(run_main(main))
