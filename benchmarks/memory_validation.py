"""Check ``qlora_helpers.ch01_memory.estimator.estimate`` against peaks measured on a GPU.

Each model shape is saved once with random weights (``save_pretrained``) and every row loads it as a
user does: ``from_pretrained`` with ``BitsAndBytesConfig`` for 4-bit and 8-bit, plain bf16 for LoRA and
full training, then ``model.train()``. Real widths and vocabularies; the larger shapes keep fewer
layers (the row's ``layers`` against ``real_layers``). Rows of one shape run one after another in a
worker process, each measured from a clean allocator (everything of the previous one freed); the
worker stops after an out-of-memory error or a crash, and the rows it did not finish are retried,
each in a fresh process. The JSON is rewritten atomically after every row: a run cut short still
leaves every finished row.

    python -m benchmarks.memory_validation            # all rows (about 5 min on one H200)
    python -m benchmarks.memory_validation --quick    # the Qwen2.5-0.5B and SmolLM2-135M rows
    python -m benchmarks.memory_validation --only gemma2b-qlora4 phi3mini-qlora8 --out /tmp/mem.json
    python -m benchmarks.memory_validation --rescore  # estimates again against the recorded peaks (CPU)

Writes ``benchmarks/results/memory_validation.json``: device, versions, command, date and one row
per configuration with the prediction (peak allocated, reserved and on the device), the measurement
and the errors in percent of the measured peaks allocated and reserved.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from qlora_helpers.ch01_memory.estimator import GIB, estimate
from qlora_helpers.ch01_memory.measurement import measure, save_random
from qlora_helpers.common.bench import WorkerError, command_line, emit, environment, error_line, run_worker
from qlora_helpers.common.files import atomic_write_json, repo_root
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import OneLineParser, run_main

# name -> (preset, layers (None: the real depth), method, batch, seq, extra estimate/measure arguments).
# Real widths and vocabularies; the larger shapes keep fewer layers so that every row loads in seconds.
CONFIGS = {
    "qwen0.5b-full": ("qwen2.5-0.5b", None, "full", 4, 512, {}),
    "qwen0.5b-lora-ckpt": ("qwen2.5-0.5b", None, "lora", 4, 512, {"grad_ckpt": True}),
    "qwen0.5b-qlora8": ("qwen2.5-0.5b", None, "qlora8", 4, 512, {}),
    "qwen0.5b-qlora4-kbit-ckpt": ("qwen2.5-0.5b", None, "qlora4", 4, 512, {"prepare_kbit": True, "grad_ckpt": True}),
    "qwen7b-qlora4": ("qwen2.5-7b", 4, "qlora4", 2, 1024, {}),
    "qwen7b-qlora4-ckpt-b4-s2048": ("qwen2.5-7b", 4, "qlora4", 4, 2048, {"grad_ckpt": True}),
    "qwen7b-lora": ("qwen2.5-7b", 4, "lora", 2, 1024, {}),
    "llama3-8b-qlora4": ("llama-3-8b", 4, "qlora4", 2, 1024, {}),
    "llama3-8b-qlora4-ckpt-s2048": ("llama-3-8b", 4, "qlora4", 2, 2048, {"grad_ckpt": True}),
    "llama3-8b-qlora8-ckpt": ("llama-3-8b", 4, "qlora8", 2, 1024, {"grad_ckpt": True}),
    "llama3-8b-full-adam8-ckpt": ("llama-3-8b", 4, "full", 1, 1024, {"grad_ckpt": True, "optimizer": "adamw_8bit"}),
    "mistral7b-qlora4-ckpt": ("mistral-7b", 4, "qlora4", 4, 1024, {"grad_ckpt": True}),
    "mistral7b-lora": ("mistral-7b", 4, "lora", 2, 1024, {}),
    "mistral7b-qlora8": ("mistral-7b", 4, "qlora8", 2, 1024, {}),
    "nemo12b-qlora4": ("mistral-nemo-12b", 4, "qlora4", 2, 1024, {}),
    "nemo12b-qlora4-paged8-ckpt": ("mistral-nemo-12b", 4, "qlora4", 2, 2048,
                                   {"grad_ckpt": True, "optimizer": "paged_adamw_8bit"}),
    "gemma2b-qlora4": ("gemma-2-2b", 8, "qlora4", 2, 1024, {}),
    "gemma2b-qlora4-ckpt": ("gemma-2-2b", 8, "qlora4", 2, 1024, {"grad_ckpt": True}),
    "gemma2b-lora": ("gemma-2-2b", 8, "lora", 2, 1024, {}),
    "gemma2b-qlora8-ckpt": ("gemma-2-2b", 8, "qlora8", 2, 1024, {"grad_ckpt": True}),
    "gemma2b-full-ckpt": ("gemma-2-2b", 8, "full", 1, 1024, {"grad_ckpt": True}),
    "gemma9b-qlora4-ckpt": ("gemma-2-9b", 4, "qlora4", 2, 1024, {"grad_ckpt": True}),
    "phi3mini-qlora4": ("phi-3-mini", 4, "qlora4", 2, 1024, {}),
    "phi3mini-qlora4-ckpt": ("phi-3-mini", 4, "qlora4", 4, 1024, {"grad_ckpt": True}),
    "phi3mini-lora-attn-r64": ("phi-3-mini", 4, "lora", 2, 1024, {"targets": "attention", "lora_r": 64}),
    "phi3mini-qlora8": ("phi-3-mini", 4, "qlora8", 2, 1024, {}),
    "phi3mini-full-ckpt": ("phi-3-mini", 4, "full", 1, 1024, {"grad_ckpt": True}),
    "phi3medium-qlora4-ckpt": ("phi-3-medium", 4, "qlora4", 2, 1024, {"grad_ckpt": True}),
    "smol135m-full": ("smollm2-135m", None, "full", 8, 512, {}),
    "smol135m-lora-ckpt": ("smollm2-135m", None, "lora", 8, 512, {"grad_ckpt": True}),
    "smol135m-qlora4": ("smollm2-135m", None, "qlora4", 8, 512, {}),
    "smol1.7b-qlora4-kbit-ckpt": ("smollm2-1.7b", 8, "qlora4", 4, 1024, {"prepare_kbit": True, "grad_ckpt": True}),
    "smol1.7b-qlora8": ("smollm2-1.7b", 8, "qlora8", 2, 1024, {}),
}
QUICK = [k for k in CONFIGS if k.startswith(("qwen0.5b", "smol135m"))]
MODELS = Path(tempfile.gettempdir()) / "memory_validation_models"


def config_of(name: str):
    """The transformers config of a row: its preset, at the row's depth."""
    preset, layers = CONFIGS[name][:2]
    return get_config(preset, **({"num_hidden_layers": layers} if layers else {}))


def folder_of(name: str) -> Path:
    """The saved random-weight folder of a row's shape, written on first use (shared by the shape's rows)."""
    preset, layers = CONFIGS[name][:2]
    folder = MODELS / f"{preset}-{layers or 'all'}"
    if not (folder / "config.json").is_file():
        save_random(config_of(name), folder)
    return folder


def prediction(name: str, attention: str | None = None) -> dict:
    """The estimate of one row (for the attention that ran): peak allocated, reserved and on the device (GiB)."""
    _, _, method, batch, seq, extra = CONFIGS[name]
    est = estimate(config_of(name), method, batch_size=batch, seq_len=seq, attention=attention, **extra)
    return {"predicted_gib": round(est.total_gib, 4), "predicted_reserved_gib": round(est.reserved_gib, 4),
            "predicted_device_gib": round(est.device_gib, 4), "predicted_phase": est.peak_phase,
            "predicted_components_gib": {k: round(v, 4) for k, v in est.components_gib().items()},
            "predicted_phases_gib": {k: round(v / GIB, 4) for k, v in est.phases.items()},
            "predicted_not_in_total_gib": {k: round(v / GIB, 4) for k, v in est.outside.items()}}


def score(row: dict) -> dict:
    """The row with the current estimate and its errors in percent of the measured peaks."""
    try:
        row.update(prediction(row["name"], row.get("measured", {}).get("attention")), predict_error=None)
    except Exception as err:                   # a measurement is kept even where the estimate fails
        row.update(predict_error=str(err))
        return row
    if row.get("status") == "ok":
        m = row["measured"]
        pct = lambda est, got: round(100 * (est - got) / got, 2)
        row["error_pct"] = pct(row["predicted_gib"], m["peak_allocated_gib"])
        row["reserved_error_pct"] = pct(row["predicted_reserved_gib"], m["peak_reserved_gib"])
    return row


def predict_and_measure(name: str, steps: int) -> dict:
    """Measure one configuration from its saved folder (in the worker process), then score it."""
    _, _, method, batch, seq, extra = CONFIGS[name]
    got = measure(config_of(name), method, batch_size=batch, seq_len=seq, steps=steps, folder=folder_of(name),
                  **extra)
    return score({"name": name, "measured": got, "status": "oom" if got["oom"] else "ok"})


def worker(names: list[str], steps: int) -> int:
    """Measure ``names`` one after another; stop after the first row that is not ``ok`` (the parent runs the
    names left in a fresh process)."""
    for name in names:
        try:
            row = predict_and_measure(name, steps)
        except Exception as err:  # one broken configuration must not take the others with it
            row = {"status": "error", "error": error_line(err)}
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
    scored = [r for r in ok if "error_pct" in r]
    worst = lambda key: max((abs(r[key]) for r in scored), default=None)
    return {"rows": len(rows), "ok": len(ok), "oom": sum(r.get("status") == "oom" for r in rows),
            "errors": sum(r.get("status") == "error" for r in rows), "not_estimated": len(ok) - len(scored),
            "max_abs_error_pct": worst("error_pct"), "max_abs_reserved_error_pct": worst("reserved_error_pct"),
            "within_5pct": sum(abs(r["error_pct"]) <= 5 for r in scored),
            "within_10pct": sum(abs(r["error_pct"]) <= 10 for r in scored)}


def row_config(name: str) -> dict:
    preset, layers, method, batch, seq, extra = CONFIGS[name]
    real = get_config(preset).get_text_config().num_hidden_layers
    return {"model": preset, "layers": layers or real, "real_layers": real, "method": method, "batch_size": batch,
            "seq_len": seq, **extra}


def outcome(row: dict) -> str:
    m = row.get("measured", {})
    got = f"{m['peak_allocated_gib']:7.2f}" if row["status"] == "ok" else f"{row['status']:>7}"
    err = (f"{row['error_pct']:+6.1f}%  reserved {m['peak_reserved_gib']:6.2f} {row['reserved_error_pct']:+6.1f}%"
           if "error_pct" in row else (row.get("error") or row.get("predict_error") or "")[:70])
    return f"{row['name']:<28} predicted {row.get('predicted_gib', float('nan')):7.2f} GiB  measured {got} GiB  {err}"


def measure_all(names: list[str], args, result: dict) -> None:
    """Measure ``names``, one worker per model shape, saving the JSON after every row."""
    figures = result["figures"]
    groups: dict[tuple, list[str]] = {}
    for name in names:                                 # one worker per model shape, in the listed order
        groups.setdefault(CONFIGS[name][:2], []).append(name)
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
                row["config"] = row_config(row["name"])
                figures["rows"] = [r for r in figures["rows"] if r["name"] != row["name"]] + [row]
                figures["summary"] = summary(figures["rows"])
                atomic_write_json(args.out, result)
                print(f"[{len(figures['rows']):2d}] {outcome(row)}  ({time.perf_counter() - t0:.0f} s)", flush=True)


def rescore(path: str) -> dict:
    """Recompute every row's estimate against its recorded measurement (CPU only; measurements untouched)."""
    result = json.loads(Path(path).read_text())
    figures = result["figures"]
    figures["rows"] = [score(row) for row in figures["rows"]]
    figures["summary"] = summary(figures["rows"])
    figures["scored"] = {"command": command_line(), "date": environment()["date"],
                         "qlora-helpers": environment()["versions"].get("qlora-helpers")}
    atomic_write_json(path, result)
    return result


CONVENTION = ("peak torch.cuda.max_memory_allocated and max_memory_reserved over steps 2..N (step 1 is a warm-up), "
              "counters reset after loading; random weights at real width and vocabulary, saved with save_pretrained "
              "and loaded with from_pretrained (BitsAndBytesConfig for 4-bit / 8-bit), model.train(); rows whose "
              "'layers' is below 'real_layers' keep fewer decoder layers than the checkpoint; labels = input ids; "
              "the model's default attention (SDPA; eager for Gemma-2); no autocast")


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m benchmarks.memory_validation", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(repo_root() / "benchmarks" / "results" / "memory_validation.json"))
    parser.add_argument("--quick", action="store_true", help="only the Qwen2.5-0.5B and SmolLM2-135M rows")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"some of: {', '.join(CONFIGS)}")
    parser.add_argument("--append", action="store_true", help="add the rows to --out instead of starting anew")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute the estimates in --out against its measurements (no GPU needed)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration (first = warm-up)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds allowed per configuration")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.steps)
    if args.rescore:
        print(json.dumps(rescore(args.out)["figures"]["summary"]))
        return 0
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible; this benchmark measures GPU memory (estimates alone: "
              "python -m qlora_helpers estimate ...)", file=sys.stderr)
        return 2
    names = args.only or (QUICK if args.quick else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    result = {"benchmark": "memory_validation", **environment(), "figures": {"convention": CONVENTION, "rows": []}}
    if args.append and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        result["figures"]["rows"] = old["figures"]["rows"]
        result["runs"] = old.get("runs", []) + [{k: old[k] for k in ("command", "date")}]
    measure_all(names, args, result)
    print(json.dumps(result["figures"]["summary"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
