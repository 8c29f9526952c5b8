"""Where a recipe training step spends GPU time and memory: the evidence behind throughput.json's "why".

For one model shape (random weights at the real shape, 4-bit NF4, bf16 compute, the seed's LoRA
r=64 on every linear layer) and packed micro-batches of the chatterbot SFT data, two measurements:

* **memory**: the steady-state peak (``max_memory_allocated`` of a second optimizer step) of one
  micro-batch of T tokens, with and without activation checkpointing, next to what
  ``recipe.estimate_gib`` (the chapter-01 estimator, which ``plan_micro_batch`` budgets with) predicts;
* **time**: one step under ``torch.profiler``: GPU time per kind of work (4-bit dequantisation,
  matrix multiplies, attention, LoRA dropout, dtype casts, other element-wise work, optimizer), the
  GPU's busy share of the wall clock, and the top operators; with the MFU of that step.

Each ``--variants`` entry changes one lever of the recipe's maximal configuration (``recipe-max`` in
``train_throughput.py``, with ``qlora_helpers.ch03_sft.fast_kernels`` on): ``base``, ``sdpa`` (block-masked SDPA
instead of varlen attention), ``no-liger`` (PyTorch's RMSNorm and SwiGLU instead of Liger's),
``no-dropout`` (LoRA dropout 0 instead of the seed's 0.1), ``bf16-adapters`` (``recipe.cast_adapters``),
``ckpt`` (checkpointing on).

    python -m benchmarks.recipe_profile --shapes qwen2.5-0.5b qwen2.5-7b          # ~4 min on an H100
    python -m benchmarks.recipe_profile --shapes tiny --device cpu --memory-tokens 256 --tokens 256 --out /tmp/p.json

Writes ``benchmarks/results/recipe_profile.json``. Needs the same packages as ``benchmarks.train_throughput``
(``liger-kernel`` for the recipe's RMSNorm/SwiGLU kernels: ``pip install -e ".[gpu]"``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer

from benchmarks.train_throughput import (
    LORA,
    LR,
    build,
    cleanup,
    load_data,
    matmul_params,
    optimizer_step,
    peak_flops,
    trained_tokens,
)
from qlora_helpers.ch03_sft.recipe import cast_adapters, estimate_gib, packed_micro_batches
from qlora_helpers.common import assets
from qlora_helpers.common.bench import WorkerError, emit, error_line, run_worker, write_benchmark
from qlora_helpers.common.models import tiny_qwen2
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import OneLineParser, run_main

VARIANTS = ("base", "sdpa", "no-liger", "no-dropout", "bf16-adapters", "ckpt")
# operator name -> kind of work (the first pattern that matches wins)
KINDS = (("4-bit dequantise", r"dequant"),
         ("attention", r"attention|flash|fmha|sdpa"),
         ("matmul", r"^aten::(mm|addmm|bmm|baddbmm|_scaled_mm)$"),
         ("LoRA dropout", r"dropout|bernoulli"),
         ("dtype casts and copies", r"^aten::(copy_|_to_copy|to|clone|contiguous)$"),
         ("optimizer", r"_foreach|adam|clip|norm_"),
         ("element-wise and reductions", r"^aten::"),
         ("other", r""))


def kind_of(name: str) -> str:
    return next(k for k, pat in KINDS if re.search(pat, name))


def build_variant(config, device, variant: str, ckpt: bool):
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kernels = {"attention": variant != "sdpa", "liger": variant != "no-liger"}
    dropout = 0.0 if variant == "no-dropout" else LORA["dropout"]
    model = build(config, device, dtype, upcast=False, ckpt=ckpt, dropout=dropout, kernels=kernels)
    if variant == "bf16-adapters":
        cast_adapters(model, torch.bfloat16)
    return model


def one_step(model, opt, batch, device) -> float:
    return optimizer_step(model, opt, [batch], trained_tokens([batch]), device)


def batch_of(train, tokens: int, pad_id: int, offset: int = 0):
    """One packed micro-batch of ``tokens`` tokens (conversations taken in order from ``offset``)."""
    chosen, used, i = [], 0, offset
    while used < tokens:
        e = train[i % len(train)]
        if used + len(e.input_ids) > tokens:
            break
        chosen.append(e)
        used += len(e.input_ids)
        i += 1
    return packed_micro_batches(chosen, tokens, pad_id=pad_id)[0], used


def memory_rows(config, device, train, pad_id, token_list, lora_r) -> list[dict]:
    rows = []
    for ckpt in (False, True):
        model = build_variant(config, device, "base", ckpt)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        for tokens in token_list:
            row = {"tokens": tokens, "gradient_checkpointing": ckpt,
                   "estimate_gib": round(estimate_gib(config, tokens, ckpt, lora_r=lora_r), 3)}
            try:
                batch, _ = batch_of(train, tokens, pad_id)
                one_step(model, opt, batch, device)          # optimizer states now exist
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                one_step(model, opt, batch, device)
                if device.startswith("cuda"):
                    row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                    row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
                    row["measured_over_estimate"] = round(row["peak_allocated_gib"] / row["estimate_gib"], 3)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                opt.zero_grad(set_to_none=True)
            rows.append(row)
            emit({"memory": row})
        del model, opt
        cleanup()
    return rows


def time_row(config, device, train, pad_id, tokens: int, variant: str, n_params: int, flops) -> dict:
    model = build_variant(config, device, variant, ckpt=variant == "ckpt")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    batches = [batch_of(train, tokens, pad_id, offset=k * 40) for k in range(4)]
    real = batches[3][1]                                   # conversation tokens, the filler not counted
    batches = [b for b, _ in batches]
    for b in batches[:3]:                                  # warm-up: allocator, cuBLAS heuristics, Triton
        one_step(model, opt, b, device)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    one_step(model, opt, batches[3], device)
    wall_plain = time.perf_counter() - t0
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        one_step(model, opt, batches[3], device)
        wall_prof = time.perf_counter() - t0
    kinds, ops = {}, []
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    for evt in prof.key_averages():
        us = getattr(evt, attr, 0) or 0
        if us <= 0 or (cuda and evt.device_type != torch.autograd.DeviceType.CPU):
            continue
        kinds[kind_of(evt.key)] = kinds.get(kind_of(evt.key), 0.0) + us / 1e3
        ops.append((us / 1e3, evt.key, evt.count))
    busy = sum(kinds.values())
    ops.sort(reverse=True)
    tps = real / wall_plain
    kernels = getattr(model.get_base_model(), "recipe_kernels", {})
    out = {"variant": variant, "kernels": kernels, "tokens": tokens, "real_tokens": real,
           "step_seconds": round(wall_plain, 4),
           "profiled_step_seconds": round(wall_prof, 4), "tokens_per_second": round(tps, 1),
           "mfu": round(tps * 4 * n_params / flops, 4) if flops else None,
           "device_busy_ms": round(busy, 1), "device_busy_share": round(busy / 1e3 / wall_prof, 3),
           "kinds_ms": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
           "top_ops": [{"op": k, "ms": round(ms, 1), "calls": c} for ms, k, c in ops[:15]]}
    if cuda:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del model, opt
    cleanup()
    return out


def worker(args) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.verify("qwen-tokenizer", only=assets.TOKENIZER_FILES))
    config = tiny_qwen2(vocab_size=len(tokenizer)) if args.shape == "tiny" else get_config(args.shape)
    train, _, _ = load_data(tokenizer)
    pad_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    n_params = matmul_params(config)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    flops = peak_flops(name)
    emit({"meta": {"n_params": n_params, "peak_flops": flops, "device_name": name}})
    if args.memory_tokens:
        memory_rows(config, args.device, train, pad_id, args.memory_tokens, LORA["r"])
    for variant in [v for v in VARIANTS if v in args.variants]:
        try:
            row = time_row(config, args.device, train, pad_id, args.tokens, variant, n_params, flops)
        except Exception as err:  # one lever failing must not lose the others
            row = {"variant": variant, "error": error_line(err)}
            cleanup()
        emit({"time": row})


def profile_shape(shape: str, args, shapes: dict) -> dict:
    """One shape in a worker process; the file is rewritten after every row it sends."""
    entry = {"memory": [], "time": [], "tokens": args.tokens}

    def on_row(row: dict) -> None:
        if "meta" in row:
            entry.update(row["meta"])
        else:
            kind, value = next(iter(row.items()))          # "memory" or "time"
            entry[kind].append(value)
            print(shape, kind, json.dumps(value)[:400], flush=True)
        shapes[shape] = entry
        write_benchmark("recipe_profile", {"shapes": shapes}, args.out or None)

    worker_args = ["--shape", shape, "--device", args.device, "--tokens", args.tokens, "--variants", *args.variants,
                   "--memory-tokens", *args.memory_tokens]
    try:
        run_worker("benchmarks.recipe_profile", worker_args, label=shape, on_row=on_row)
        entry["worker_exit"] = 0
    except WorkerError as err:
        print(err, flush=True)
        entry["worker_exit"] = err.returncode
    shapes[shape] = entry
    write_benchmark("recipe_profile", {"shapes": shapes}, args.out or None)
    return entry


def main(argv=None) -> None:
    p = OneLineParser(prog="python -m benchmarks.recipe_profile", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-7b"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the profiled micro-batch")
    p.add_argument("--memory-tokens", type=int, nargs="*", default=[2048, 4096, 8192, 16384])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="")
    p.add_argument("--shape", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shape:
        worker(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: benchmarks.recipe_profile profiles a GPU: run it on a CUDA machine "
                 "(or --shapes tiny --device cpu)")
    shapes = {}
    for shape in args.shapes:
        shapes[shape] = profile_shape(shape, args, shapes)


if __name__ == "__main__":
    sys.exit(run_main(main))
