"""Check ``qlora_helpers.ch01_memory.estimator.estimate`` against peaks measured on a GPU.

Configurations of one model shape run one after another in a worker process, each measured from a
clean allocator (everything of the previous one freed); the worker stops after an out-of-memory
error or a crash, and the configurations it did not finish are retried, each in a fresh process.
So no peak leaks from one row into another and one failure loses only its own row. The JSON is
rewritten atomically after every row: a run cut short still leaves every finished row.

    python -m benchmarks.memory_validation            # all configurations (~6 min on one H100 80GB)
    python -m benchmarks.memory_validation --quick    # the 0.5B rows only (~1 min)
    python -m benchmarks.memory_validation --only 7b-qlora4 32b-qlora4-ckpt --out /tmp/mem.json

Writes ``benchmarks/results/memory_validation.json``: device, versions, command, date and one row
per configuration with the prediction, the measurement and the error in percent of measured peak
allocated (the quantity the estimator predicts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qlora_helpers.ch01_memory.estimator import GIB, estimate
from qlora_helpers.ch01_memory.measurement import measure
from qlora_helpers.common.bench import WorkerError, emit, environment, run_worker
from qlora_helpers.common.files import atomic_write_json, repo_root
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import OneLineParser, run_main

M05, M7, M32 = "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-32b"
# name -> (preset, method, batch, seq, extra estimate/measure arguments)
CONFIGS = {
    "0.5b-full": (M05, "full", 4, 512, {}),
    "0.5b-full-ckpt": (M05, "full", 4, 512, {"grad_ckpt": True}),
    "0.5b-lora": (M05, "lora", 4, 512, {}),
    "0.5b-lora-ckpt": (M05, "lora", 4, 512, {"grad_ckpt": True}),
    "0.5b-lora-b8": (M05, "lora", 8, 512, {}),
    "0.5b-lora-attn-r64": (M05, "lora", 4, 512, {"targets": "attention", "lora_r": 64}),
    "0.5b-qlora4": (M05, "qlora4", 4, 512, {}),
    "0.5b-qlora4-kbit": (M05, "qlora4", 4, 512, {"prepare_kbit": True}),
    "0.5b-qlora4-kbit-ckpt": (M05, "qlora4", 4, 512, {"prepare_kbit": True, "grad_ckpt": True}),
    "0.5b-qlora4-ckpt-s4096": (M05, "qlora4", 1, 4096, {"grad_ckpt": True}),
    "0.5b-qlora8": (M05, "qlora8", 4, 512, {}),
    "0.5b-qlora8-kbit-ckpt": (M05, "qlora8", 4, 512, {"prepare_kbit": True, "grad_ckpt": True}),
    "7b-full-adam8-ckpt": (M7, "full", 1, 512, {"grad_ckpt": True, "optimizer": "adamw_8bit"}),
    "7b-lora": (M7, "lora", 2, 1024, {}),
    "7b-lora-ckpt": (M7, "lora", 2, 1024, {"grad_ckpt": True}),
    "7b-qlora4": (M7, "qlora4", 2, 1024, {}),
    "7b-qlora4-kbit-ckpt": (M7, "qlora4", 2, 1024, {"prepare_kbit": True, "grad_ckpt": True}),
    "7b-qlora4-ckpt-b4-s2048": (M7, "qlora4", 4, 2048, {"grad_ckpt": True}),
    "7b-qlora4-paged8": (M7, "qlora4", 2, 1024, {"grad_ckpt": True, "optimizer": "paged_adamw_8bit"}),
    "7b-qlora8": (M7, "qlora8", 2, 1024, {}),
    "llama7b-qlora4-ckpt": ("llama-7b", "qlora4", 2, 1024, {"grad_ckpt": True}),
    "32b-qlora4-ckpt": (M32, "qlora4", 1, 1024, {"grad_ckpt": True}),
    "32b-qlora4-kbit-ckpt": (M32, "qlora4", 1, 1024, {"prepare_kbit": True, "grad_ckpt": True}),
    "32b-qlora8-ckpt": (M32, "qlora8", 1, 512, {"grad_ckpt": True}),
    "llava7b-qlora4-ckpt": ("llava-1.5-7b", "qlora4", 1, 512, {"grad_ckpt": True, "targets": "attention"}),
    "qwen2vl7b-qlora4-ckpt": ("qwen2-vl-7b", "qlora4", 1, 512, {"grad_ckpt": True, "targets": "attention"}),
}
QUICK = [k for k in CONFIGS if k.startswith("0.5b")]


def predict_and_measure(name: str, steps: int) -> dict:
    """Predict, then measure one configuration (in the worker process)."""
    preset, method, batch, seq, extra = CONFIGS[name]
    config = get_config(preset)
    est = estimate(config, method, batch_size=batch, seq_len=seq, **extra)
    got = measure(config, method, batch_size=batch, seq_len=seq, steps=steps, **extra)
    row = {"predicted_gib": round(est.total_gib, 4), "predicted_phase": est.peak_phase,
           "predicted_components_gib": {k: round(v, 4) for k, v in est.components_gib().items()},
           "predicted_phases_gib": {k: round(v / GIB, 4) for k, v in est.phases.items()},
           "predicted_not_in_total_gib": {k: round(v / GIB, 4) for k, v in est.outside.items()},
           "measured": got, "status": "oom" if got["oom"] else "ok"}
    if not got["oom"]:
        row["error_pct"] = round(100 * (est.total_gib - got["peak_allocated_gib"]) / got["peak_allocated_gib"], 2)
    return row


def worker(names: list[str], steps: int) -> int:
    """Measure ``names`` one after another; stop after the first row that is not ``ok`` (the parent runs the
    names left in a fresh process)."""
    for name in names:
        try:
            row = predict_and_measure(name, steps)
        except Exception as err:  # one broken configuration must not take the others with it
            row = {"status": "error", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        emit({"name": name, **row})
        if row["status"] != "ok":
            break
    return 0


def run_group(names: list[str], steps: int, timeout: int) -> list[dict]:
    """Run ``names`` in one worker process; return one row per name that finished there."""
    try:
        return run_worker("benchmarks.memory_validation", ["--steps", steps, "--worker", *names],
                          label=", ".join(names), timeout=timeout * len(names),
                          env={"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"})
    except WorkerError as err:     # the rows before the crash count; a lone name that crashed gets an error row
        return err.rows or ([{"name": names[0], "status": "error", "error": str(err)[:400]}] if len(names) == 1 else [])


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("status") == "ok"]
    errs = [abs(r["error_pct"]) for r in ok]
    return {"rows": len(rows), "ok": len(ok), "oom": sum(r.get("status") == "oom" for r in rows),
            "errors": sum(r.get("status") == "error" for r in rows),
            "max_abs_error_pct": max(errs) if errs else None,
            "within_10pct": sum(e <= 10 for e in errs)}


def outcome(row: dict) -> str:
    m = row.get("measured", {})
    got = f"{m['peak_allocated_gib']:7.2f}" if row["status"] == "ok" else f"{row['status']:>7}"
    err = f"{row['error_pct']:+6.1f}%" if "error_pct" in row else row.get("error", "")[:70]
    return f"{row['name']:<26} predicted {row.get('predicted_gib', float('nan')):7.2f} GiB  measured {got} GiB  {err}"


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m benchmarks.memory_validation", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(repo_root() / "benchmarks" / "results" / "memory_validation.json"))
    parser.add_argument("--quick", action="store_true", help="only the 0.5B configurations")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"some of: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration (first = warm-up)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds allowed per configuration")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.steps)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible; this benchmark measures GPU memory (estimates alone: "
              "python -m qlora_helpers estimate ...)", file=sys.stderr)
        return 2
    names = args.only or (QUICK if args.quick else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    figures = {"convention": "peak torch.cuda.max_memory_allocated over steps 2..N (step 1 is a warm-up); "
                             "random weights at real shape; labels = input ids; SDPA; no autocast",
               "rows": []}
    result = {"benchmark": "memory_validation", **environment(), "figures": figures}
    groups: dict[str, list[str]] = {}
    for name in names:                                 # one worker per model shape, in the listed order
        groups.setdefault(CONFIGS[name][0], []).append(name)
    t0 = time.perf_counter()
    for group in groups.values():
        pending = list(group)
        while pending:
            rows = run_group(pending, args.steps, args.timeout)
            if not rows:                               # the worker died before its first row: go one by one
                rows = run_group(pending[:1], args.steps, args.timeout) or [
                    {"name": pending[0], "status": "error", "error": "worker produced no row"}]
            for row in rows:
                pending.remove(row["name"])
                row["config"] = dict(zip(("model", "method", "batch_size", "seq_len"), CONFIGS[row["name"]][:4]),
                                     **CONFIGS[row["name"]][4])
                figures["rows"].append(row)
                figures["summary"] = summary(figures["rows"])
                atomic_write_json(args.out, result)
                print(f"[{len(figures['rows']):2d}/{len(names)}] {outcome(row)}  ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    print(json.dumps(figures["summary"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
