"""GPU memory and step time of AdaTAD-style training at the seed config's real shape, four strategies.

Shape: ViT-S/16 as VideoMAE-S (384 dims, 12 blocks, 6 heads, adapters in all 12 blocks), 768 frames of
160 x 160 px per video in 48 attention chunks of 16 frames, batch 2 (the seed config's
``e2e_thumos_videomae_s_768x1_160``), an ActionFormer-style head (512 dims, 6 levels) on the 384
feature steps, bf16 autocast (the config's ``amp=True``), AdamW. Weights are random: no VideoMAE
checkpoint can be had offline, and memory and speed do not depend on the values.

Strategies: full fine-tuning, AdaTAD adapter (backbone frozen), the seed's QLoRA adapter at 4 and 8 bits,
and the textbook alternative (NF4 backbone + full-precision adapter); each with activation
checkpointing on and off. Every configuration runs in its own Python process, so an out-of-memory or a
crash loses that row only, and the JSON is rewritten atomically after every row.

    python -m benchmarks.tad_memory            # 10 configurations, about 3-4 min on one H100 80GB
    python -m benchmarks.tad_memory --quick    # the 4 strategies, checkpointing on, 2 steps (~1.5 min)
    python -m benchmarks.tad_memory --only adapter-cp seed_qlora4-cp --out /tmp/tad.json

Writes ``benchmarks/results/tad_memory.json`` through ``qlora_helpers.common.bench.write_benchmark``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from qlora_helpers.ch02_tad.adapters import parameter_report
from qlora_helpers.ch02_tad.config import VIDEOMAE_S, build_model, param_groups, strategy_config
from qlora_helpers.common.bench import WorkerError, cuda_peak_gib, emit, run_worker, write_benchmark
from qlora_helpers.errors import OneLineParser, run_main

STRATEGIES = {  # name -> (strategy of qlora_helpers.ch02_tad.config.strategy_config, extra arguments)
    "full_ft": ("full_ft", {}),
    "adapter": ("adapter", {}),
    "seed_qlora4": ("seed_qlora", {"quantize_bits": 4}),
    "seed_qlora8": ("seed_qlora", {"quantize_bits": 8}),
    "qlora_backbone": ("qlora_backbone", {}),
}
CONFIGS = {f"{s}-{'cp' if cp else 'nocp'}": (s, cp) for cp in (True, False) for s in STRATEGIES}
QUICK = ["full_ft-cp", "adapter-cp", "seed_qlora4-cp", "qlora_backbone-cp"]
HEAD = {"dims": 512, "levels": 6, "regression_ranges": ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10_000))}
CONVENTION = ("peak torch.cuda.max_memory_allocated / max_memory_reserved over training steps 2..N (step 1 is a "
              "warm-up, then the peak is reset); random weights at real shape; bf16 autocast; SDPA attention; "
              "AdamW; batch of random videos with 3 random action segments each")


def worker(name: str, steps: int, batch_size: int, frames: int) -> dict:
    """Runs in its own process: build one configuration on the GPU and train it for ``steps`` steps."""
    strategy, cp = CONFIGS[name]
    kind, extra = STRATEGIES[strategy]
    torch.manual_seed(0)
    cfg = strategy_config(kind, {**VIDEOMAE_S, "with_cp": cp}, head=HEAD, **extra)
    model = build_model(cfg, num_classes=20, device="cuda", compute_dtype=torch.bfloat16)
    report = parameter_report(model)
    opt = torch.optim.AdamW(param_groups(model, cfg["optimizer"]))
    static_gib = round(torch.cuda.memory_allocated() / 2**30, 3)
    rng = np.random.default_rng(0)
    segments = [np.sort(rng.uniform(0, frames, (3, 2)), axis=1).astype(np.float32) for _ in range(batch_size)]
    labels = [rng.integers(20, size=3) for _ in range(batch_size)]
    video = torch.randn(batch_size, 3, frames, 160, 160, device="cuda")
    times, row = [], {"params": report, "static_allocated_gib": static_gib}
    try:
        for step in range(steps):
            if step == 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(video, segments, labels)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = cuda_peak_gib()
        row.update(oom=False, peak_allocated_gib=peak["allocated_gib"], peak_reserved_gib=peak["reserved_gib"],
                   step_seconds=round(float(np.median(times[1:] or times)), 4), loss=round(loss.item(), 4))
    except torch.cuda.OutOfMemoryError as err:
        row.update(oom=True, error=str(err).splitlines()[0][:300])
    return row


def run_one(name: str, args) -> dict:
    """Measure one configuration in a worker process; a crash or a timeout becomes a row with ``status: error``."""
    strategy, cp = CONFIGS[name]
    row = {"name": name, "strategy": strategy, "activation_checkpointing": cp, "batch_size": args.batch_size,
           "frames": args.frames}
    t0 = time.perf_counter()
    try:
        row.update(run_worker("benchmarks.tad_memory", ["--worker", name, "--steps", args.steps, "--batch-size",
                                                        args.batch_size, "--frames", args.frames],
                              label=name, timeout=args.timeout, env={"PYTHONWARNINGS": "ignore"})[-1])
        row["status"] = "oom" if row["oom"] else "ok"
    except WorkerError as err:
        row.update(status="error", error=str(err)[:400])
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def outcome(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')[:80]}"
    return (f"peak {row['peak_allocated_gib']:6.2f} GiB allocated, {row['peak_reserved_gib']:6.2f} reserved, "
            f"{row['step_seconds']:.3f} s/step")


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m benchmarks.tad_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="default: benchmarks/results/tad_memory.json")
    parser.add_argument("--quick", action="store_true", help="4 strategies with checkpointing, 2 steps")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"some of: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration (default 3; quick 2)")
    parser.add_argument("--batch-size", type=int, default=2, help="videos per step (the seed config: 2)")
    parser.add_argument("--frames", type=int, default=768, help="frames per video (the seed config: 768)")
    parser.add_argument("--timeout", type=int, default=150, help="seconds allowed per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3)
    if args.worker:
        emit(worker(args.worker, args.steps, args.batch_size, args.frames))
        return 0
    if args.frames % 16 or args.steps < 2:
        print("error: --frames must be a multiple of 16 and --steps at least 2 (step 1 is a warm-up)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible; this benchmark measures GPU memory (the notebook counts bytes on a CPU)",
              file=sys.stderr)
        return 2
    names = args.only or (QUICK if args.quick else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    figures = {"convention": CONVENTION, "shape": {"backbone": "ViT-S/16 (VideoMAE-S)", "frames": args.frames,
               "pixels": 160, "chunk_frames": 16, "batch_size": args.batch_size, "head": HEAD, "steps": args.steps},
               "rows": []}
    for i, name in enumerate(names, 1):
        row = run_one(name, args)
        figures["rows"].append(row)
        write_benchmark("tad_memory", figures, out=args.out)
        print(f"[{i:2d}/{len(names)}] {name:<20} {outcome(row)}  ({row['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
