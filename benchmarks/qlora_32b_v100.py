"""Does QLoRA of a 32B model fit a V100-32GB? Measured with PyTorch's allocator capped at 31 GiB.

The chapter-05 plan: Qwen2.5-32B shape in 4-bit NF4, fp16 compute with loss scaling (a V100 has no
bf16) and fp32 LoRA weights, r=8 on q/k/v/o, one sequence of 512 tokens, gradient checkpointing,
AdamW. A note on the 8 x V100 run budgets "~18 GB model, ~27.5 GB per GPU"; this script checks that
on any CUDA GPU by capping the allocator at 31 GiB (32 GiB less the CUDA context), building the model
with random weights at the real shape (``models.build_random``), and training >= 10 steps. With
``--vision`` the language model gets a Qwen2-VL vision tower (675 M parameters, kept in fp16, frozen)
and each sample one 336 x 336 image. Each variant runs in its own process, so no memory carries over.

    python -m benchmarks.qlora_32b_v100                       # text, then text + vision tower, 12 steps each
    python -m benchmarks.qlora_32b_v100 --variants text --steps 12 --out /tmp/q.json

Writes ``benchmarks/results/qlora_32b_v100.json``. Memory is the V100's story (the cap makes the
allocator fail exactly where 31 GiB would); seconds per step are this GPU's, not a V100's.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

import torch
from transformers import CONFIG_MAPPING, Qwen2VLForConditionalGeneration

from qlora_helpers.ch01_memory.estimator import estimate
from qlora_helpers.ch05_multi_gpu.model import add_lora
from qlora_helpers.ch05_multi_gpu.precision import choose, detect
from qlora_helpers.common.bench import WorkerError, cuda_peak_gib, emit, run_worker, write_benchmark
from qlora_helpers.common.models import build_random
from qlora_helpers.common.shapes import PRESETS, get_config
from qlora_helpers.errors import OneLineParser, run_main

GIB = 2**30
CLAIMED = {"model_gb": 18.0, "per_gpu_gb": 27.5}   # from the 8 x V100 write-up the chapter follows
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def config_for(variant: str):
    if variant == "text":
        return get_config("qwen2.5-32b")
    text = dict(PRESETS["qwen2.5-32b"][0])
    text.pop("model_type")
    vision = dict(PRESETS["qwen2-vl-7b"][0]["vision"], hidden_size=text["hidden_size"])   # projector out = LM width
    return CONFIG_MAPPING["qwen2_vl"](text_config=text, vision_config=vision, image_token_id=151655,
                                     video_token_id=151656)


def make_batch(config, seq_len: int, device):
    """Random token ids; for the VLM one random 336 x 336 image (144 image tokens after 2 x 2 merging)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_000, (1, seq_len), generator=g)
    kw = {}
    if config.model_type == "qwen2_vl":
        vc = config.vision_config
        grid = 336 // vc.patch_size
        n_img = grid * grid // vc.spatial_merge_size ** 2
        ids = torch.cat([ids[:, :1], torch.tensor([[config.vision_start_token_id] + [config.image_token_id] * n_img
                                                    + [config.vision_end_token_id]]), ids[:, 1:]], dim=1)
        patch = 3 * vc.temporal_patch_size * vc.patch_size ** 2
        kw["pixel_values"] = torch.randn(grid * grid, patch, generator=g).to(device, torch.float16)
        kw["image_grid_thw"] = torch.tensor([[1, grid, grid]], device=device)
        if "mm_token_type_ids" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters:
            kw["mm_token_type_ids"] = (ids == config.image_token_id).int().to(device)
    labels = ids.clone()
    if config.model_type == "qwen2_vl":
        labels[(labels == config.image_token_id) | (labels >= 151_643)] = -100
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), **kw), labels.to(device)


def build_with_lora(config, variant: str, r: int, row: dict):
    """The 4-bit model with random weights and fp32 LoRA on q/k/v/o; records its memory in ``row``."""
    t0 = time.perf_counter()
    model = build_random(config, quantize="4bit", device="cuda", dtype=torch.float16, progress=False)
    row["model_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
    row["build_seconds"] = round(time.perf_counter() - t0, 1)
    model = add_lora(model, {"r": r, "alpha": 2 * r, "dropout": 0.05, "target_modules": LORA_TARGETS}, True, 0)
    if variant != "text":   # peft would also match the vision tower's q/k/v names: keep it frozen
        for n, p in model.named_parameters():
            if "visual" in n:
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    row["lora_parameters"] = sum(p.numel() for p in params)
    row["lora_dtype"] = str(params[0].dtype)
    row["after_lora_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
    return model, params


def train_step(model, params, opt, scaler, inputs, labels) -> tuple[float, bool]:
    """One fp16 step with loss scaling and clipping; returns the loss and whether the scaler skipped it."""
    with torch.autocast("cuda", dtype=torch.float16):
        logits = model(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return float(loss), scaler.get_scale() < scale


def train(model, params, config, row: dict, steps: int, seq_len: int) -> None:
    """``steps`` training steps, each recorded in ``row["steps"]``; then the steady-state figures."""
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    inputs, labels = make_batch(config, seq_len, "cuda")
    row["tokens_per_step"] = int(inputs["input_ids"].numel())
    for i in range(steps):
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss, skipped = train_step(model, params, opt, scaler, inputs, labels)
        row["steps"].append({"step": i + 1, "loss": round(loss, 4), "seconds": round(time.perf_counter() - t, 3),
                             "skipped": skipped, **cuda_peak_gib()})
        print(row["variant"], row["steps"][-1], flush=True)
    steady = row["steps"][1:]
    row["peak_allocated_gib"] = max(s["allocated_gib"] for s in steady)
    row["peak_reserved_gib"] = max(s["reserved_gib"] for s in steady)
    row["skipped_steps"] = sum(s["skipped"] for s in row["steps"])
    row["seconds_per_step"] = round(sorted(s["seconds"] for s in steady)[len(steady) // 2], 3)
    free, total_now = torch.cuda.mem_get_info()
    row["device_used_gib"] = round((total_now - free) / GIB, 3)   # + CUDA context, outside the cap
    row["lora_finite"] = all(torch.isfinite(p).all().item() for p in params)


def measure(variant: str, steps: int, seq_len: int, cap_gib: float, r: int) -> dict:
    """Build and train one variant under the allocator cap (in its own process)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), 0)
    cap, bf16_ok, name = detect(0)
    prec = choose(cap, bf16_ok, "fp16")                     # the V100 path on whatever GPU this is
    config = config_for(variant)
    row = {"variant": variant, "cap_gib": cap_gib, "precision": prec.as_dict(), "seq_len": seq_len, "lora_r": r,
           "steps": [], "oom": False}
    t0 = time.perf_counter()
    try:
        model, params = build_with_lora(config, variant, r, row)
        train(model, params, config, row, steps, seq_len)
    except torch.OutOfMemoryError as err:
        row["oom"] = True
        row["error"] = str(err).splitlines()[0][:300]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def estimate_for(variant: str, seq_len: int, r: int) -> dict:
    est = estimate(config_for(variant), "qlora4", batch_size=1, seq_len=seq_len, lora_r=r,
                   targets=",".join(LORA_TARGETS), grad_ckpt=True, optimizer="adamw", dtype="fp16")
    return {"total_gib": round(est.total_gib, 3),
            "components_gib": {k: round(v, 3) for k, v in est.components_gib().items()}}


def run_variant(variant: str, args) -> dict:
    """One variant in a fresh process (nothing of the previous one stays allocated), with its estimate."""
    worker_args = ["--only", variant, "--steps", args.steps, "--seq-len", args.seq_len, "--cap-gib", args.cap_gib,
                   "--lora-r", args.lora_r]
    try:
        row = run_worker("benchmarks.qlora_32b_v100", worker_args, label=variant, echo=True)[-1]
    except WorkerError as err:   # a row emitted before the crash (at exit, say) still counts
        print(err, flush=True)
        row = err.rows[-1] if err.rows else {"variant": variant, "crashed": True, "error": str(err)[:300]}
    try:
        row["estimate"] = estimate_for(variant, args.seq_len, args.lora_r)
    except Exception as err:   # the estimator does not cover every variant
        row["estimate"] = {"error": str(err)[:200]}
    return row


def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m benchmarks.qlora_32b_v100", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["text", "vision"], choices=["text", "vision"])
    parser.add_argument("--steps", type=int, default=12, help="training steps (>= 10; the first is a warm-up)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--cap-gib", type=float, default=31.0, help="allocator cap: a V100-32GB less its CUDA context")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--out", help="result file (default: benchmarks/results/qlora_32b_v100.json)")
    parser.add_argument("--only", help=argparse.SUPPRESS)   # internal: the worker of one variant
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark measures CUDA memory: run it on a machine with a GPU")
    if args.only:
        emit(measure(args.only, args.steps, args.seq_len, args.cap_gib, args.lora_r))
        return
    rows = [run_variant(variant, args) for variant in args.variants]
    text = next((r for r in rows if r["variant"] == "text"), rows[0])
    figures = {"model": "qwen2.5-32b (random weights, real shape)", "cap_gib": args.cap_gib, "seq_len": args.seq_len,
               "fits_under_cap": all(not r.get("oom") and not r.get("crashed") for r in rows),
               "model_gib": text.get("model_gib"), "peak_allocated_gib": text.get("peak_allocated_gib"),
               "peak_reserved_gib": text.get("peak_reserved_gib"), "claimed": CLAIMED,
               "note": "memory as on a V100-32GB (allocator capped); seconds are this GPU's", "rows": rows}
    write_benchmark("qlora_32b_v100", figures, args.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
