"""Each lever of the ``sft`` command, measured on the command itself: speed, peak memory against the estimate, loss.

One process, one shape: the model (random weights at the shape, 4-bit NF4, LoRA r=64 alpha=16 dropout 0.1 on every
linear layer, as ``benchmarks.train_throughput``) is built once; every variant then resets the LoRA weights to the
same initialisation and trains through ``command.run_sft`` (TRL's SFTTrainer underneath) on the same conversations,
in the same order, with the same seed: ``trl-best``'s settings (packed padding-free rows of 4,096 tokens, 16,384
tokens a step, Liger's kernels, varlen attention, AdamW, bf16) and one lever changed at a time:

- ``peft``: peft's own LoRA layers (TRL's bf16 adapters), every layer checkpointed: ``trl-best`` run by the command;
- ``fused``: ``--fused_lora`` (``ch03_sft.fused_lora``), every layer checkpointed;
- ``fused-keepK``: ``--checkpoint_keep_layers K``: the last K layers keep their activations;
- ``fused-offload``: ``--activation_offloading`` (TRL's);
- ``fused-no-ckpt`` / ``peft-no-ckpt``: no checkpointing (memory to spare);
- ``fused-no-ckpt-dequantized``: no checkpointing, and each frozen 4-bit weight kept as a 16-bit copy
  (``--keep_dequantized``: no dequantisation in the passes);
- ``fused-no-ckpt-compile``: each decoder layer through ``torch.compile`` as well (regional compilation);
- ``fused-cpu-embeddings``: ``--embeddings_on_cpu``, the frozen input embedding table in CPU memory (what a
  micro-batch's look-up on the CPU and its copy to the GPU cost); it runs after the others, which keep the table
  on the GPU.

Per variant: tokens/s (steps after ``--skip``), peak allocated memory and the chapter-01 estimate for the same
setting, the loss of every step and the held-out loss. A lever's loss parity: its step losses and held-out loss
against those of the variant without it (``peft`` for ``fused``, ``fused`` for the others), within 0.5 %.

    python -m benchmarks.sft_levers --shape qwen2.5-7b --steps 6 --out benchmarks/results/sft_levers.json
    python -m benchmarks.sft_levers --shape tiny --device cpu --steps 2 --variants peft fused --out /tmp/l.json
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from benchmarks.train_throughput import LORA, LR, ROW_TOKENS, workload, write_plan
from qlora_helpers.ch01_memory.estimator import estimate, liger_loss_chunk
from qlora_helpers.ch03_sft import command as sft_command
from qlora_helpers.ch03_sft.data import read_jsonl
from qlora_helpers.ch03_sft.fast_kernels import use_varlen_attention
from qlora_helpers.ch03_sft.fused_lora import use_fused_lora
from qlora_helpers.ch03_sft.modes import keep_activations, linear_layer_names
from qlora_helpers.common import assets
from qlora_helpers.common.bench import error_line, write_benchmark
from qlora_helpers.common.models import build_random, embeddings_on_cpu, enable_checkpointing
from qlora_helpers.common.quant import keep_cpu_training_layout
from qlora_helpers.errors import OneLineParser, run_main

PARITY = 0.005
VARIANTS = {"peft": {"fused_lora": False},
            "fused": {},
            "fused-keep2": {"checkpoint_keep_layers": 2},
            "fused-keep8": {"checkpoint_keep_layers": 8},
            "fused-offload": {"activation_offloading": True},
            "fused-no-ckpt": {"gradient_checkpointing": False},
            "fused-no-ckpt-dequantized": {"gradient_checkpointing": False, "keep_dequantized": True},
            "peft-no-ckpt": {"fused_lora": False, "gradient_checkpointing": False},
            "fused-no-ckpt-compile": {"gradient_checkpointing": False, "compile": True},
            "fused-cpu-embeddings": {"embeddings_on_cpu": True}}
REFERENCE = {"fused": "peft", "peft-no-ckpt": "peft", "fused-no-ckpt-compile": "fused-no-ckpt",
             "fused-no-ckpt-dequantized": "fused-no-ckpt"}   # else "fused"


def loss_chunk(config, tokens: int) -> int:
    """The rows Liger's fused linear cross-entropy takes at a time (as ``command.plan_micro_batch`` assumes)."""
    text = config.get_text_config()
    return liger_loss_chunk(tokens, text.vocab_size, text.hidden_size)


class Model:
    """The one model of the run: built on first use, its LoRA weights reset for every variant."""

    def __init__(self, config):
        self.config, self.model, self.init = config, None, None

    def __call__(self, cfg, device):
        if self.model is None:
            cuda = device.startswith("cuda")
            base = build_random(self.config, quantize="4bit", device=device,
                                dtype=torch.bfloat16 if cuda else torch.float32, seed=0, progress=False)
            if not cuda:
                keep_cpu_training_layout(base)
            base.config.use_cache = False
            base.requires_grad_(False)
            torch.manual_seed(0)
            self.model = get_peft_model(base, LoraConfig(
                r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                target_modules=linear_layer_names(base), task_type="CAUSAL_LM"))
            self.init = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                         if p.requires_grad}        # on the CPU: nothing of it counts towards a variant's peak
            self.static_gib = round(torch.cuda.memory_allocated() / 2**30, 3) if cuda else None
        model, base = self.model, self.model.get_base_model()
        for name, p in model.named_parameters():
            if name in self.init:
                p.data = self.init[name].to(p.device, copy=True)   # the same start (fp32, as peft made it)
        if cfg.gradient_checkpointing:
            enable_checkpointing(base)
            model.checkpointing = keep_activations(base, cfg.checkpoint_keep_layers)
        else:
            (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
            model.checkpointing = "off"
        on_cpu = base.get_input_embeddings().weight.device.type == "cpu" and device.startswith("cuda")
        if cfg.embeddings_on_cpu and not on_cpu:
            embeddings_on_cpu(base, device)
        elif on_cpu and not cfg.embeddings_on_cpu:
            raise ValueError("the embedding table is in CPU memory since an earlier variant: run "
                             "--embeddings_on_cpu variants last")
        model.lora_kernel = use_fused_lora(model, on=cfg.fused_lora is True, dequantized=cfg.keep_dequantized)
        model.attention_kernel = use_varlen_attention(base) if device.startswith("cuda") else "sdpa"
        return model


def variant_config(name: str, folder: Path, plan_file: Path, eval_file: Path, steps: int, device: str):
    change = dict(VARIANTS[name])
    change.pop("compile", None)
    cuda = device.startswith("cuda")
    return sft_command.SFTConfig(**{
        "model_name_or_path": str(folder), "data_path": str(plan_file), "eval_data_path": str(eval_file),
        "output_dir": str(folder.parent / name), "use_qlora": True, "quantization_bit": 4, "lora_r": LORA["r"],
        "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"], "learning_rate": LR, "max_steps": steps,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "max_length": ROW_TOKENS,
        "packing": True, "gradient_checkpointing": True, "use_liger_kernel": cuda, "fused_lora": True,
        "attn_implementation": "auto", "bf16": cuda, "lr_scheduler_type": "constant", "max_grad_norm": 1.0,
        "seed": 0, "device": "cuda" if cuda else "cpu", "optim": "adamw_torch", "eval_before": False,
        "save_steps": 0, "per_device_eval_batch_size": 8, **change})


def compiled(model) -> None:
    """Regional compilation: each decoder layer's forward through ``torch.compile``."""
    for layer in model.get_base_model().model.layers:
        layer.compile(dynamic=True)


class StepProfile(TrainerCallback):
    """``torch.profiler`` over the last optimizer step: GPU time by operator, and how busy the GPU was."""

    def __init__(self):
        self.prof, self.t0, self.result = None, 0.0, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == state.max_steps - 1:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is None:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        kernels = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time_total for e in kernels) / 1e3
        ops = sorted(self.prof.key_averages(), key=lambda e: -e.self_device_time_total)[:20]
        self.result = {"wall_ms": round(wall * 1e3, 1), "device_busy_ms": round(busy, 1), "kernels": len(kernels),
                       "top_ops": [{"op": e.key[:80], "ms": round(e.self_device_time_total / 1e3, 1),
                                    "calls": e.count} for e in ops]}
        self.prof = None


def run_variant(name, model_factory, cfg, config, skip: int, profile: bool = False) -> dict:
    stamps = []
    profiler = StepProfile() if profile and cfg.device == "cuda" else None
    if VARIANTS[name].get("compile"):
        factory = lambda c, d: (m := model_factory(c, d), compiled(m))[0]
    else:
        factory = model_factory
    cuda = cfg.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = sft_command.run_sft(cfg, callbacks=[lambda r: "loss" in r and stamps.append(time.perf_counter())],
                                 progress=False, model_factory=factory,
                                 trainer_callbacks=[profiler] if profiler else ())
    train = result.summary["history"]["train"]
    timed = list(range(max(1, skip), len(train) - (profiler is not None)))
    secs = sum(stamps[i] - stamps[i - 1] for i in timed)
    tps = sum(train[i]["tokens"] for i in timed) / secs if secs else None
    est = estimate(config, "qlora4", batch_size=1, seq_len=ROW_TOKENS, lora_r=LORA["r"],
                   grad_ckpt=cfg.gradient_checkpointing,
                   loss_chunk=loss_chunk(config, ROW_TOKENS) if cfg.use_liger_kernel else None,
                   keep_layers=cfg.checkpoint_keep_layers, accumulate=cfg.gradient_accumulation_steps > 1,
                   **sft_command.engine_levers(cfg), **sft_command.planned_levers(cfg))
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None   # the model's weights included
    out = {"variant": name, "settings": VARIANTS[name], "kernels": result.summary.get("kernels"),
           "tokens_per_second": round(tps, 1) if tps else None,
           "steps": [{"loss": r["loss"], "tokens": r["tokens"], "seconds": r["seconds"]} for r in train],
           "eval_loss": result.summary["eval_loss"]["after"],
           "peak_allocated_gib": peak,
           "estimate_gib": round(est.total_gib, 3), "estimate_phase": est.peak_phase,
           "estimate_components_gib": {k: round(v / 2**30, 3) for k, v in est.components.items()}}
    if profiler is not None:
        out["profile_last_step"] = profiler.result
    del result
    return out


def parity(rows: dict) -> dict:
    """Each lever against the variant without it: the largest relative step-loss difference and the held-out one."""
    out = {}
    for name, row in rows.items():
        ref = rows.get(REFERENCE.get(name, "fused"))
        if name in ("peft",) or not ref or "steps" not in row or "steps" not in ref or ref is row:
            continue
        step = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(row["steps"], ref["steps"]))
        held = abs(row["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"]
        gain = row["tokens_per_second"] / ref["tokens_per_second"] if row.get("tokens_per_second") and \
            ref.get("tokens_per_second") else None
        out[name] = {"against": REFERENCE.get(name, "fused"), "step_loss_rel": round(step, 5),
                     "eval_loss_rel": round(held, 5), "met": step <= PARITY and held <= PARITY,
                     "speed_ratio": round(gain, 3) if gain else None}
    return out


def main(argv=None) -> None:
    p = OneLineParser(prog="python -m benchmarks.sft_levers", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-7b")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--step-tokens", type=int, default=16384)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="")
    p.add_argument("--profile", nargs="*", default=[], metavar="VARIANT",
                   help="variants whose last step runs under torch.profiler (its time excluded from tokens/s)")
    args = p.parse_args(argv)
    config, data, shape = workload(args)         # train_throughput's: the same tokenizer, conversations and steps
    rows, meta = {}, {"shape": args.shape, "steps": args.steps, "skip": args.skip, "step_tokens": args.step_tokens,
                      "n_params": shape["n_params"], "lora": LORA, "learning_rate": LR}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        config.save_pretrained(folder)
        data["tokenizer"].save_pretrained(folder)
        plan_file, eval_file = write_plan(Path(tmp) / "plan.jsonl", data), Path(tmp) / "eval.jsonl"
        eval_file.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n"
                                     for c in read_jsonl(assets.sft_paths()["validation"])[:64]), encoding="utf-8")
        factory = Model(config)
        for name in sorted(args.variants, key=lambda n: VARIANTS[n].get("embeddings_on_cpu", False)):
            cfg = variant_config(name, folder, plan_file, eval_file, args.steps, args.device)
            try:
                row = run_variant(name, factory, cfg, config, args.skip, name in args.profile)
            except Exception as err:  # noqa: BLE001  (a lever that fails records why; the next one runs)
                row = {"variant": name, "error": error_line(err)}
            rows[name] = row
            print(json.dumps({k: row.get(k) for k in ("variant", "tokens_per_second", "peak_allocated_gib",
                                                      "estimate_gib", "eval_loss", "error")}), flush=True)
            figures = {**meta, "static_gib": factory.static_gib if factory.model is not None else None,
                       "device_name": shape["device_name"], "peak_flops": shape["peak_flops"],
                       "variants": rows, "parity": parity(rows)}
            write_benchmark("sft_levers", figures, args.out or None)


if __name__ == "__main__":
    sys.exit(run_main(main))
