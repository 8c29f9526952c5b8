"""Chapter 05 executed by papermill on a multi-GPU machine: one process and one 4-bit model per GPU.

The notebook launches ``qlora_helpers.ch05_multi_gpu.worker.train_worker`` on every visible GPU with accelerate's
``notebook_launcher`` (NCCL between them). Real weights cannot reach the GPU machine, so the default
model is ``random:qwen2.5-32b``: random weights at the real 32B shape, which makes memory, speed and
the gradient exchange real and the accuracies meaningless. ``--precision fp16`` takes the V100 path
(fp16 compute, loss scaling, fp32 LoRA weights) on any GPU.

    python -m benchmarks.multi_gpu_notebook                                  # all visible GPUs, V100 precision path
    python -m benchmarks.multi_gpu_notebook --run-dir $OUT/run --out $OUT/multi_gpu_notebook.json

Writes the run folder (executed notebook, its results JSON, summary) and
``benchmarks/results/multi_gpu_notebook.json`` with the figures the chapter reads back.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qlora_helpers.ch05_multi_gpu.worker import visible_gpus
from qlora_helpers.common.bench import write_benchmark
from qlora_helpers.common.files import repo_root
from qlora_helpers.common.runner import run_notebooks
from qlora_helpers.errors import OneLineParser, run_main

ROOT = repo_root()

KEEP = ("profile", "num_processes", "model", "config", "task", "world_size", "precision", "ranks_identical",
        "rank_digests", "steps", "stop_reason", "best_val_loss", "seconds", "bitsandbytes_in_kernel_before_launch",
        "memory_plan_v100")


def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m benchmarks.multi_gpu_notebook",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default="random:qwen2.5-32b")
    parser.add_argument("--precision", default="fp16", choices=("auto", "bf16", "fp16"))
    parser.add_argument("--num-processes", type=int, default=0, help="0: one per visible GPU")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--run-dir", default=str(ROOT / "benchmarks" / "results" / "multi_gpu_notebook"))
    parser.add_argument("--out", help="result file (default: benchmarks/results/multi_gpu_notebook.json)")
    args = parser.parse_args(argv)
    if visible_gpus() < 2:
        raise SystemExit("error: this benchmark shows data parallelism across GPUs: run it where 2 or more are visible")
    params = {"profile": "gpu", "model_id": args.model_id, "precision": args.precision,
              "num_processes": args.num_processes, "max_steps": args.max_steps}
    run_dir, runs = run_notebooks(["05"], params, args.run_dir, progress=False)
    run = runs[0]
    results = run.results
    per_rank = [{"rank": d["rank"], "name": d["name"], "capability": d["capability"]}
                for d in results.get("devices", [])]
    figures = {"status": run.status, "error": run.error, "notebook_seconds": run.seconds, "parameters": params,
               "run_dir": str(Path(run_dir).relative_to(ROOT)) if Path(run_dir).is_relative_to(ROOT) else str(run_dir),
               **{k: results.get(k) for k in KEEP}, "peak_allocated_gib": results.get("peak_allocated_gib"),
               "epochs": [{k: e.get(k) for k in ("epoch", "step", "train_loss", "val_loss", "lr", "improved", "reduced",
                                                 "stop_reason")} for e in results.get("epochs", [])],
               "devices": per_rank}
    write_benchmark("multi_gpu_notebook", figures, args.out)
    if run.status != "ok":
        raise SystemExit(f"notebook failed: {run.error}; executed copy: {run.executed}")


if __name__ == "__main__":
    sys.exit(run_main(main))
