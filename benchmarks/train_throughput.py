"""QLoRA training speed and memory: plain HF peft + bitsandbytes, TRL's SFTTrainer, Unsloth, the course's ``sft``.

Same model shape (random weights at Qwen2.5-0.5B / 7B shape, 4-bit NF4 base, bf16 compute), same
data (the chatterbot SFT conversations tokenized with the real Qwen2.5 tokenizer and chat template,
their real length distribution, truncated at 512 tokens), same LoRA (the seed's r=64, alpha=16,
dropout 0.1 on every linear layer), same optimizer (AdamW, lr 2e-4) and the same number of optimizer
steps, over the same conversations (about ``--step-tokens`` tokens a step):

(a) ``hf``: what the seed guide does: ``prepare_model_for_kbit_training`` (fp32 upcast of the frozen
    embeddings, norms and lm_head; gradient checkpointing on), micro-batches of 4 conversations
    right-padded to the longest, ``model(**batch).loss`` (token-weighted over the accumulation).
(b) ``trl``: ``trl.SFTTrainer`` with a ``LoraConfig`` and its defaults otherwise (batch 4, the
    accumulation that gives the same conversations per step).

The peers, each configured as its users would at their best, on the same conversations, LoRA and tokens per
optimizer step: ``trl-best`` is TRL's SFTTrainer with best-fit packing into padding-free 4,096-token rows,
Liger's kernels, bf16 and non-reentrant checkpointing (``trl-best-no-ckpt`` without it), attention through
PyTorch's varlen flash attention (what ``flash_attention_2`` would do; flash-attn is not installed);
``unsloth`` is Unsloth's ``FastLanguageModel`` in 4-bit with its own checkpointing and kernels, trained by the
same SFTTrainer (``benchmarks/unsloth_row.py``: Unsloth is imported before transformers, in its own process).

``sft`` is the course's own command (``qlora_helpers.ch03_sft.command``, TRL's SFTTrainer underneath), not a peer:
at ``trl-best``'s settings (with ``--fused_lora``, its default on a GPU) it should come at least within 5 % of its
tokens/s and peak (target ``sft_vs_trl_best``). It is
given what a user gives it: the same random weights saved as a model folder with the tokenizer (bf16; fp32 on the
CPU smoke test, the dtype the other rows build in) and the plan's conversations, in order, as a chat JSONL; it
loads both itself (``from_pretrained`` with its 4-bit ``BitsAndBytesConfig``). At 16,384 tokens a step::

    python -m qlora_helpers sft --model_name_or_path FOLDER --data_path PLAN.jsonl --use_qlora --quantization_bit 4 \
        --lora_r 64 --lora_alpha 16 --lora_dropout 0.1 --learning_rate 2e-4 --max_steps 10 \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 4 --max_length 4096 --packing \
        --gradient_checkpointing --bf16 --lr_scheduler_type constant --seed 0 --eval_before false --save_steps 0

The command's levers (``--fused_lora``, Liger's kernels through the Trainer, varlen attention over the packed rows,
the chapter-01 estimator's planner) race the peers at two memory settings: ``sft-tight`` is the command with
``--memory_budget_gib`` the peak of the fastest tight peer (``trl-best`` or ``unsloth``), ``sft-max`` with 0.6 x
the GPU's memory; the planner chooses the micro-batch (rows per step kept), whether to checkpoint and how many
layers keep their activations (``benchmarks/sft_levers.py`` measures each lever on its own). Every row runs in a
fresh process; ``hf`` first, then the peers, then the command's rows (a budget is a peer's peak), shuffled within
each group (``--order-seed``).
Every row of a shape reads the same token ids: the Qwen2.5 tokenizer's, or at Llama-3-8B (128k ids, fewer than
Qwen's 151k) SmolLM2's (``shapes.tokenizer_asset``), so the command, given the folder, tokenizes as the peers do.

Reported per row: non-padding tokens per second (steps after the first two), peak allocated and
reserved memory, MFU = tokens/s x 4N / peak bf16 FLOP/s, with N the parameters every token is
multiplied by (decoder linears + output layer; 2N forward, 2N backward for the input gradients:
the frozen base gets no weight gradient; attention scores and recomputation are not counted), and
the loss per step. Loss parity compares the held-out losses of ``sft`` and ``hf``.

    python -m benchmarks.train_throughput --shapes qwen2.5-0.5b --rows hf trl sft --out /tmp/t.json
    python -m benchmarks.train_throughput --shapes tiny --device cpu --steps 3 --out /tmp/t.json   # smoke test
    # the peer comparison (one H100 or H200 for throughput_peers.json; Unsloth's wheels carried, see unsloth_row.py):
    python -m benchmarks.train_throughput --shapes qwen2.5-0.5b qwen2.5-7b --steps 8 --skip 2 --step-tokens 16384 \
        --rows trl-best trl-best-no-ckpt unsloth sft-tight sft-max --row-timeout 150 --out /tmp/peers.json
    python -m benchmarks.train_throughput --shapes llama-3-8b --steps 8 --skip 2 --step-tokens 16384 \
        --rows trl-best trl-best-no-ckpt unsloth sft-tight sft-max --row-timeout 150 --merge /tmp/peers.json \
        --out /tmp/peers.json
    # the course's sft command beside trl-best, one GPU, one run (the model folder, ~15 GB at 7B, lives in the
    # row's temp dir): benchmarks/results/throughput_sft.json (H100)
    python -m benchmarks.train_throughput --shapes qwen2.5-7b --steps 8 --skip 2 --step-tokens 16384 \
        --rows trl-best sft --row-timeout 300 --out benchmarks/results/throughput_sft.json

``benchmarks/results/throughput.json`` and ``throughput_peers.json`` hold earlier runs, with the rows of the
hand-written recipe loop this script measured then (``recipe*``; the loop is gone: ``sft`` with its options
replaced it); without ``--out`` a run writes ``throughput_sft.json``. ``liger-kernel`` for the Liger rows:
``pip install -e ".[gpu]"`` (measured with trl 1.16.0, datasets 5.2.0 and liger-kernel 0.8.5).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoTokenizer, TrainerCallback

from qlora_helpers.ch01_memory.estimator import model_shape
from qlora_helpers.ch03_sft import command as sft_command
from qlora_helpers.ch03_sft.data import IGNORE_INDEX, SFTData, collate, encode_all, read_jsonl
from qlora_helpers.ch03_sft.fast_kernels import use_varlen_attention
from qlora_helpers.ch03_sft.trainer import evaluate
from qlora_helpers.common import assets
from qlora_helpers.common.bench import WorkerError, emit, environment, error_line, run_worker, write_benchmark
from qlora_helpers.common.files import atomic_write_json
from qlora_helpers.common.models import build_random, tiny_qwen2, write_model_folder
from qlora_helpers.common.quant import keep_cpu_training_layout
from qlora_helpers.common.shapes import get_config, tokenizer_asset
from qlora_helpers.errors import OneLineParser, run_main

try:                    # row (b) only: the GPU extra (pip install -e ".[gpu]")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl import __version__ as trl_version
except ImportError:
    Dataset = SFTConfig = SFTTrainer = trl_version = None

LORA = {"r": 64, "alpha": 16, "dropout": 0.1}       # seed 002's example configuration
LR = 2e-4
HF_BATCH = 4                                       # conversations per micro-batch in (a) and (b)
MAX_LENGTH = 512
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165.2e12}
ROW_TOKENS = 4096                                  # the packed rows of trl-best and the sft command
PEERS = ("trl", "trl-best", "trl-best-no-ckpt", "unsloth")   # other stacks; the fastest tight one's peak: sft-tight's
COMMANDS = ("sft", "sft-tight", "sft-max")   # the course's own command (not a peer): at trl-best's settings, planned
ROWS = ("hf", *PEERS, *COMMANDS)
TARGETS = {"speedup_vs_hf": 1.5, "memory_vs_hf": 0.7, "mfu_7b": 0.40, "vs_fastest_peer": 1.2, "plan_error": 0.05,
           "sft_vs_trl_best": 0.05}
# the two memory settings of the peer comparison: the command's row of each, and the peer rows it races
SETTINGS = {"tight": ("sft-tight", ("trl-best", "unsloth")),
            "spare": ("sft-max", ("trl-best-no-ckpt", "trl-best", "unsloth"))}
MAX_SHARE = 0.6          # sft-max's budget: this share of the GPU's memory
CPU_BUDGET_GIB = 1.0     # the CPU smoke test has no peak to budget with: the planned rows get this
UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_SPEC = {"upcast": True, "ckpt": True, "packed": False, "loss": "hf"}   # (a): the seed's way


# --------------------------------------------------------------------------- the shared workload
def load_data(tokenizer, n_eval: int = 64):
    paths = assets.sft_paths()
    conversations = read_jsonl(paths["train"])
    train = encode_all(conversations, tokenizer, MAX_LENGTH).examples
    evald = encode_all(read_jsonl(paths["validation"]), tokenizer, MAX_LENGTH).examples[:n_eval]
    return train, evald, conversations


def step_plan(examples, step_tokens: int, steps: int, seed: int = 0) -> list[list[int]]:
    """Indices of the conversations of each optimizer step: a fixed shuffle, cut every ~step_tokens tokens."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    plan, cur, used, k = [], [], 0, 0
    while len(plan) < steps:
        i = order[k % len(order)]
        n = len(examples[i].input_ids)
        if cur and used + n > step_tokens:    # at most step_tokens: a packed step can be one micro-batch
            plan.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
        k += 1
    return plan


def matmul_params(config) -> int:
    """N: parameters each token is multiplied by (decoder linears + output layer)."""
    s = model_shape(config)
    return sum(l.count * l.fan_in * l.fan_out for l in s.linears) + s.vocab * s.hidden


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


# --------------------------------------------------------------------------- row (a): plain peft + bitsandbytes
def build_hf(config, device, dtype):
    """The seed's model: 4-bit base, ``prepare_model_for_kbit_training`` (fp32 upcast, checkpointing), LoRA."""
    model = build_random(config, quantize="4bit", device=device, dtype=dtype, seed=0, progress=False)
    if device == "cpu":
        keep_cpu_training_layout(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=HF_SPEC["ckpt"])
    torch.manual_seed(0)   # the same LoRA initialisation in every row
    return get_peft_model(model, lora_config(LORA["dropout"]))


def trained_tokens(batches) -> list[int]:
    """Trained (labelled, shifted) tokens of each micro-batch: the weights of their losses in a step."""
    return [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]


def optimizer_step(model, opt, batches, counts, device) -> float:
    """One optimizer step over ``batches`` (token-weighted by ``counts``, bf16 autocast on the GPU),
    clipped at 1.0, synchronised; returns the step's loss."""
    cuda = device.startswith("cuda")
    n_step = sum(counts)
    loss_sum = 0.0
    for b, n in zip(batches, counts):
        b = {k: v.to(device) for k, v in b.items()}
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**b).loss
        (loss * (n / n_step)).backward()
        loss_sum += float(loss.detach()) * n / n_step
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return loss_sum


def run_hf(config, data, device) -> dict:
    """(a): the seed guide's loop, micro-batches of ``HF_BATCH`` conversations right-padded to the longest."""
    train, pad_id, cuda = data["train"], data["pad_id"], device.startswith("cuda")
    model = build_hf(config, device, torch.bfloat16 if cuda else torch.float32)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = []
    for indices in data["plan"]:
        chosen = [train[i] for i in indices]
        batches = [collate(chosen[i:i + HF_BATCH], pad_id) for i in range(0, len(chosen), HF_BATCH)]
        t0 = time.perf_counter()
        loss_sum = optimizer_step(model, opt, batches, trained_tokens(batches), device)
        steps.append({"loss": round(loss_sum, 5), "tokens": sum(len(e.input_ids) for e in chosen),
                      "micro_batches": len(batches), "positions": sum(b["input_ids"].numel() for b in batches),
                      "seconds": round(time.perf_counter() - t0, 4)})
    out = {"spec": HF_SPEC, "steps": steps}
    if cuda:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    out["eval_loss"] = held_out_loss(model, data, device)
    del model, opt
    return out


def held_out_loss(model, data, device) -> float:
    """The same held-out loss for every row: ``trainer.evaluate``, token-weighted, bf16 autocast on the GPU."""
    cuda = device.startswith("cuda")
    return round(evaluate(model, SFTData(data["eval"], len(data["eval"])), 8, data["pad_id"], device,
                          types.SimpleNamespace(bf16=cuda, fp16=False)), 5)


SETTING_KEYS = ("gradient_checkpointing", "packing", "packing_strategy", "padding_free", "max_length",
                "per_device_train_batch_size", "gradient_accumulation_steps", "use_liger_kernel", "bf16")


def train_with_sft_trainer(model, dataset, data, device, tmp: Path, *, peft_config=None, **settings) -> dict:
    """Train with TRL's SFTTrainer for the plan's number of optimizer steps: per step its loss, the
    non-padding tokens it saw and its seconds; the peak memory; the held-out loss every row reports."""
    if SFTTrainer is None:
        raise ModuleNotFoundError('the TRL rows need trl and datasets: pip install -e ".[gpu]"')
    cuda = device.startswith("cuda")
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            tokens.append(int(state.num_input_tokens_seen))

    args = SFTConfig(output_dir=str(tmp / "trl"), max_steps=len(data["plan"]), learning_rate=LR, logging_steps=1,
                     save_strategy="no", report_to="none", bf16=cuda, use_cpu=not cuda, seed=0,
                     include_num_input_tokens_seen="non_padding", **settings)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=data["tokenizer"],
                         peft_config=peft_config, callbacks=[Clock()])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    stamps, toks = [start] + times, [0] + tokens
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [{"loss": round(float(l), 5) if l is not None else None, "tokens": toks[i + 1] - toks[i],
              "seconds": round(stamps[i + 1] - stamps[i], 4)} for i, l in enumerate(losses[:len(times)])]
    out = {"steps": steps, "settings": {k: getattr(args, k, None) for k in SETTING_KEYS}}
    if cuda:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    try:            # a stack whose model does not take the plain forward pass keeps its timing
        out["eval_loss"] = held_out_loss(trainer.model, data, device)
    except Exception as err:  # noqa: BLE001
        out["eval_error"] = error_line(err)
    out["versions"] = {"trl": trl_version}
    del trainer
    return out


def run_trl(config, data, device, tmp: Path) -> dict:
    """(b): TRL's SFTTrainer with a peft LoraConfig, its defaults otherwise."""
    per_step = len(data["plan"][0])
    convs = [data["conversations"][i] for step in data["plan"] for i in step]
    model = build_random(config, quantize="4bit", device=device,
                         dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32, seed=0, progress=False)
    dataset = Dataset.from_list([{"messages": c} for c in convs]) if Dataset else None
    out = train_with_sft_trainer(model, dataset, data, device, tmp, peft_config=lora_config(LORA["dropout"]),
                                 per_device_train_batch_size=HF_BATCH, max_length=MAX_LENGTH,
                                 gradient_accumulation_steps=max(1, round(per_step / HF_BATCH)))
    out["note"] = "TRL's default loss covers every token of the conversation, not only the answers"
    return out


def lora_config(dropout: float) -> LoraConfig:
    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def peer_dataset(data):
    """The plan's conversations as every row sees them (token ids, answer-only labels), in the processed form
    TRL takes as it is: its packing then lays them into rows of ``max_length`` tokens."""
    examples = [data["train"][i] for step in data["plan"] for i in step]
    return Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])


def peer_settings(data, ckpt: bool, device: str) -> dict:
    """SFTTrainer at its best: packed padding-free rows (best-fit decreasing) of ``ROW_TOKENS``, the benchmark's
    tokens per optimizer step, a constant learning rate, Liger's kernels on a GPU."""
    row = min(ROW_TOKENS, data["step_tokens"])
    return dict(per_device_train_batch_size=1, gradient_accumulation_steps=max(1, data["step_tokens"] // row),
                packing=True, packing_strategy="bfd", padding_free=True, max_length=row,
                gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
                use_liger_kernel=device.startswith("cuda"), lr_scheduler_type="constant", max_grad_norm=1.0)


def run_trl_best(config, data, device, tmp: Path, ckpt: bool) -> dict:
    """``trl-best``: SFTTrainer configured well (``peer_settings``). Attention: PyTorch's varlen flash attention
    through the course's registration, the stand-in for ``flash_attention_2`` (flash-attn is not installed)."""
    cuda = device.startswith("cuda")
    model = build_random(config, quantize="4bit", device=device, dtype=torch.bfloat16 if cuda else torch.float32,
                         seed=0, progress=False)
    kernels = {"attention": use_varlen_attention(model) if cuda else "sdpa (CPU)"}
    torch.manual_seed(0)
    out = train_with_sft_trainer(model, peer_dataset(data), data, device, tmp, peft_config=lora_config(LORA["dropout"]),
                                 **peer_settings(data, ckpt, device))
    return {**out, "kernels": kernels}


def run_sft_command(config, data, device, tmp: Path, budget_gib: float = 0.0, row_tokens: int | None = None) -> dict:
    """``sft``: the course's command at ``trl-best``'s settings, given a model folder and a JSONL file as a user would;
    with ``budget_gib`` (``sft-tight``, ``sft-max``) its ``--memory_budget_gib``, which plans the micro-batch and
    checkpointing (the tokens per step kept); ``row_tokens``: packed rows of that many tokens instead of the peers'.

    The folder holds ``trl-best``'s random weights (the same seed, device and dtype, so the same 4-bit model once
    the command quantises it) and the benchmark's tokenizer: the shape's shared folder (``data["model_dir"]``, written
    by the first row that needs it), or one of its own, deleted once the command returns.
    Step seconds run from one step's end to the next, as ``train_with_sft_trainer`` times them."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model_dir = data.get("model_dir")
    folder = write_model_folder(Path(model_dir) if model_dir else tmp / "model",     # an existing one is kept
                                lambda tok: build_random(config, device=device, dtype=dtype, seed=0, progress=False),
                                data["tokenizer_asset"])
    plan_file = write_plan(tmp / "plan.jsonl", data)
    peer = peer_settings(data, True, device)
    if row_tokens and row_tokens < peer["max_length"]:    # the same tokens a step, in more, shorter rows
        peer["gradient_accumulation_steps"] *= peer["max_length"] // row_tokens
        peer["max_length"] = row_tokens
    cfg = sft_command.SFTConfig(
        model_name_or_path=str(folder), data_path=str(plan_file), output_dir=str(tmp / "sft"),
        use_qlora=True, quantization_bit=4, lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        lora_target_modules=None, learning_rate=LR, max_steps=len(data["plan"]), per_device_train_batch_size=1,
        gradient_accumulation_steps=peer["gradient_accumulation_steps"], max_length=peer["max_length"], packing=True,
        gradient_checkpointing=not budget_gib, memory_budget_gib=budget_gib, use_liger_kernel=cuda,
        attn_implementation="auto", bf16=cuda,
        lr_scheduler_type="constant", max_grad_norm=1.0, seed=0, device="cuda" if cuda else "cpu",
        optim="adamw_torch",   # trl-best's optimizer (the command's own default on CUDA is paged 8-bit AdamW)
        eval_before=False, save_steps=0)
    stamps = []

    def stamp(record: dict) -> None:      # called with each step's record, right after the step has synchronised
        if "loss" in record:
            stamps.append(time.perf_counter())

    cleanup()      # the folder's model is gone: nothing of it counts towards the command's peak
    result = sft_command.run_sft(cfg, callbacks=[stamp], progress=False)
    if not model_dir:
        shutil.rmtree(folder)
    out = command_row(result.summary, stamps, cuda)
    out["settings"] = {k: getattr(cfg, k) for k in (*SETTING_KEYS, "attn_implementation", "memory_budget_gib")
                       if hasattr(cfg, k)}
    out["command"] = sft_command_line(cfg)
    out["eval_loss"] = held_out_loss(result.model, data, device)
    out["versions"] = {"trl": trl_version}
    return out


def write_plan(path: Path, data) -> Path:
    """The plan's conversations, step by step in order, as the chat JSONL a user gives the ``sft`` command."""
    path.write_text("".join(json.dumps({"messages": data["conversations"][i]}, ensure_ascii=False) + "\n"
                            for step in data["plan"] for i in step), encoding="utf-8")
    return path


def command_row(summary: dict, stamps: list[float], cuda: bool) -> dict:
    """The row's fields from ``run_sft``'s summary: per step its loss, tokens and seconds (end to end from the
    ``stamps`` taken at each step's record; the command's own in-step time beside them), and its peak memory."""
    train = summary["history"]["train"]
    ends = stamps if len(stamps) == len(train) else []     # the first step has no end before it: its own time
    steps = [{"loss": r["loss"], "tokens": r["tokens"],
              "seconds": round(ends[i] - ends[i - 1], 4) if i and ends else r["seconds"],
              "command_seconds": r["seconds"]} for i, r in enumerate(train)]
    out = {"steps": steps, "peak_memory": summary.get("peak_memory"), "kernels": summary.get("kernels"),
           "data": summary.get("data"), **({"plan": summary["plan"]} if summary.get("plan") else {})}
    if cuda:      # the command's own reading; the reserved peak, where it gives none, from the counter it reset
        mem = summary.get("peak_memory") or {}
        out["peak_allocated_gib"] = mem.get("peak_allocated_gib", mem.get("peak_gib"))
        out["peak_reserved_gib"] = mem.get("peak_reserved_gib", round(torch.cuda.max_memory_reserved() / 2**30, 3))
    return out


def sft_command_line(cfg) -> str:
    """``cfg`` as the ``python -m qlora_helpers sft`` line that runs it: the flags that differ from the defaults."""
    default = type(cfg)().to_dict()
    flags = [f"--{k}" if v is True else f"--{k} {str(v).lower() if isinstance(v, bool) else v}"
             for k, v in cfg.to_dict().items() if v != default[k]]
    return " ".join(["python -m qlora_helpers sft", *flags])


def summarise(result: dict, n_params: int, flops: float | None, skip: int) -> dict:
    if "steps" not in result:
        return result
    timed = result["steps"][skip:] or result["steps"]
    secs = sum(s["seconds"] for s in timed)
    tps = sum(s["tokens"] for s in timed) / secs if secs else None
    result["tokens_per_second"] = round(tps, 1) if tps else None
    result["mfu"] = round(tps * 4 * n_params / flops, 4) if tps and flops else None
    return result


# --------------------------------------------------------------------------- one row, in a worker process
def command_budget(row: str, device: str, peaks: dict) -> float | None:
    """``--memory_budget_gib`` of a command row: none for ``sft``, the fastest tight peer's peak for ``sft-tight``, a
    share of the GPU for ``sft-max`` (on the CPU smoke test, ``CPU_BUDGET_GIB``); None while the peak it needs is
    unknown."""
    if row == "sft":
        return 0.0
    if not device.startswith("cuda"):
        return CPU_BUDGET_GIB
    if row == "sft-max":
        return round(MAX_SHARE * torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
    return peaks.get("tight") or None


def measure_row(config, data, device, tmp: Path, *, row: str, peaks: dict) -> dict:
    """One row (the worker records a failure)."""
    if row == "hf":
        return run_hf(config, data, device)
    if row == "trl":
        return run_trl(config, data, device, tmp)
    if row in ("trl-best", "trl-best-no-ckpt"):
        return run_trl_best(config, data, device, tmp, ckpt=row == "trl-best")
    budget = command_budget(row, device, peaks)
    if budget is None:
        return {"error": "not planned: its budget is the peak of the fastest tight peer (trl-best, unsloth); "
                         "measure one of them too"}
    # sft-tight in rows of half the peers': its planner may take one (2k tokens) where a 4k micro-batch would not fit
    return run_sft_command(config, data, device, tmp, budget_gib=budget,
                           row_tokens=ROW_TOKENS // 2 if row == "sft-tight" else None)


def workload(args) -> tuple:
    """(config, data, meta) of one shape: the conversations, the plan of optimizer steps, the FLOP basis."""
    asset = "qwen-tokenizer" if args.shape == "tiny" else tokenizer_asset(args.shape)   # its ids fit the shape
    tokenizer = AutoTokenizer.from_pretrained(assets.verify(asset, only=assets.TOKENIZER_FILES))
    config = tiny_qwen2(vocab_size=len(tokenizer)) if args.shape == "tiny" else get_config(args.shape)
    train, evald, conversations = load_data(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = step_plan(train, args.step_tokens, args.steps)
    data = {"train": train, "eval": evald, "plan": plan, "pad_id": pad_id, "conversations": conversations,
            "tokenizer": tokenizer, "tokenizer_asset": asset, "step_tokens": args.step_tokens}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"n_params": matmul_params(config), "peak_flops": peak_flops(name), "device_name": name,
            "steps": len(plan), "step_tokens": args.step_tokens, "conversations_per_step": [len(s) for s in plan]}
    return config, data, meta


def worker(args, measure=None) -> None:
    """One row of one shape, in a process of its own: the shared workload, the row, then the shape's facts.

    ``measure(config, data, device, tmp)`` gives the row's result (``benchmarks/unsloth_row.py`` passes its own);
    by default ``measure_row`` of ``args.rows[0]``."""
    config, data, meta = workload(args)
    data["model_dir"] = args.model_dir
    peaks = {"tight": args.tight_peak}
    measure = measure or functools.partial(measure_row, row=args.rows[0], peaks=peaks)
    try:           # a missing kernel, an OOM, a stack that does not load: the row records it, the others go on
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(config, data, args.device, Path(tmp))
    except Exception as err:
        result = {"error": error_line(err)}
    result = summarise(result, meta["n_params"], meta["peak_flops"], args.skip)
    emit({"row": args.rows[0], "pid": os.getpid(), **result})
    emit({"meta": meta})


def cleanup() -> None:
    """Free the last model before the next in one process: cached blocks and the peak counter."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------- parity, targets, the file
def parity(hf: dict, sft: dict) -> dict:
    """The held-out losses of ``hf`` and ``sft`` after the same steps over the same conversations (TRL orders
    and packs them its own way, so the step losses are not compared one by one)."""
    return {"eval_loss_hf": hf["eval_loss"], "eval_loss_sft": sft["eval_loss"],
            "eval_rel_diff": round(abs(sft["eval_loss"] - hf["eval_loss"]) / hf["eval_loss"], 5)}


def hf_verdicts(rows: dict) -> dict:
    """The ``sft`` command against the seed's way (``hf``): tokens/s at least 1.5 x, peak at most 0.7 x."""
    hf, sft, out = rows.get("hf", {}), rows.get("sft", {}), {}
    if hf.get("tokens_per_second") and sft.get("tokens_per_second"):
        speed = sft["tokens_per_second"] / hf["tokens_per_second"]
        out["speedup_vs_hf"] = {"value": round(speed, 3), "target": TARGETS["speedup_vs_hf"],
                                "met": speed >= TARGETS["speedup_vs_hf"]}
    if hf.get("peak_allocated_gib") and sft.get("peak_allocated_gib"):
        mem = sft["peak_allocated_gib"] / hf["peak_allocated_gib"]
        out["memory_vs_hf"] = {"value": round(mem, 3), "target": TARGETS["memory_vs_hf"],
                               "met": mem <= TARGETS["memory_vs_hf"]}
    for t in out.values():
        if not t["met"]:
            t["why"] = (f"sft {sft['tokens_per_second']:.0f} tokens/s at {sft.get('peak_allocated_gib')} GiB, "
                        f"hf {hf['tokens_per_second']:.0f} tokens/s at {hf.get('peak_allocated_gib')} GiB")
    return out


def verdicts(shape: str, rows: dict) -> dict:
    """Each target against the rows: value, wanted, met, and where missed what the rows say about why."""
    out = hf_verdicts(rows)
    mfu = rows.get("sft-max", {}).get("mfu")
    if "7b" in shape and mfu:
        out["mfu"] = {"value": mfu, "target": TARGETS["mfu_7b"], "met": mfu >= TARGETS["mfu_7b"]}
        if mfu < TARGETS["mfu_7b"]:
            plan = rows["sft-max"].get("plan") or {}
            dequantised = ("the 4-bit weights kept 16-bit copies, so none is dequantised in the passes"
                           if plan.get("keep_dequantized") else
                           "each 4-bit weight is dequantised for every product (twice a micro-batch)")
            out["mfu"]["why"] = (
                f"short by {TARGETS['mfu_7b'] - mfu:.3f} at {plan.get('tokens', '?')}-token micro-batches: "
                f"{dequantised}; besides the frozen base's matrix products, each of the seven LoRA branches of a "
                "layer adds a dropout and two thin products, and attention, norms and the loss are not counted")
    out.update(peer_verdicts(rows))
    out.update(plan_verdicts(rows))
    out.update(command_verdicts(rows))
    return out


def command_verdicts(rows: dict) -> dict:
    """The ``sft`` command against ``trl-best``, whose settings it runs: tokens/s at least 95 % of the peer's and
    a peak at most 5 % above it (on the CPU, where the rows have no peak, speed alone)."""
    sft, peer = rows.get("sft", {}), rows.get("trl-best", {})
    if not sft.get("tokens_per_second") or not peer.get("tokens_per_second"):
        return {}
    speed = sft["tokens_per_second"] / peer["tokens_per_second"]
    mem, peer_mem = sft.get("peak_allocated_gib"), peer.get("peak_allocated_gib")
    memory = mem / peer_mem if mem and peer_mem else None
    tol = TARGETS["sft_vs_trl_best"]
    verdict = {"value": round(speed, 3), "memory": round(memory, 3) if memory else None, "target": tol,
               "met": speed >= 1 - tol and (memory is None or memory <= 1 + tol)}
    if not verdict["met"]:
        verdict["why"] = (f"sft ran {sft['tokens_per_second']:.0f} tokens/s in {mem} GiB, trl-best "
                          f"{peer['tokens_per_second']:.0f} tokens/s in {peer_mem} GiB")
    return {"sft_vs_trl_best": verdict}


def peer_verdicts(rows: dict) -> dict:
    """At each memory setting: the planned command's tokens/s over the fastest peer's, met at >= 1.2 (and, where
    memory is tight, no more memory than that peer)."""
    out = {}
    for setting, (mine, peers) in SETTINGS.items():
        ours = rows.get(mine, {})
        measured = [(rows[p]["tokens_per_second"], p) for p in peers if (rows.get(p) or {}).get("tokens_per_second")]
        if not ours.get("tokens_per_second") or not measured:
            continue
        speed, fastest = max(measured)
        ratio = ours["tokens_per_second"] / speed
        mem, peer_mem = ours.get("peak_allocated_gib"), rows[fastest].get("peak_allocated_gib")
        leaner = setting != "tight" or mem is None or peer_mem is None or mem <= peer_mem   # tight: no more memory
        verdict = {"value": round(ratio, 3), "target": TARGETS["vs_fastest_peer"], "peer": fastest,
                   "peak_gib": mem, "peer_peak_gib": peer_mem, "met": ratio >= TARGETS["vs_fastest_peer"] and leaner}
        if not verdict["met"]:
            attention = (ours.get("kernels") or {}).get("attention", "varlen")
            verdict["why"] = (f"{mine} ran {ours['tokens_per_second']:.0f} tokens/s in {mem} GiB, {fastest} "
                              f"{speed:.0f} tokens/s in {peer_mem} GiB"
                              + ("" if leaner else ": more memory than the peer")
                              + ("" if attention == "varlen" else f"; its attention was {attention}"))
        out[f"vs_fastest_peer_{setting}"] = verdict
    return out


def plan_verdicts(rows: dict) -> dict:
    """The planner against the GPU: each planned row's measured peak within 5 % of the peak the estimator predicted
    for the setting it chose (and no more than its ``--memory_budget_gib``)."""
    out = {}
    for name in ("sft-tight", "sft-max"):
        row = rows.get(name, {})
        plan = row.get("plan") or {}
        if not plan.get("estimate_gib") or not row.get("peak_allocated_gib"):
            continue
        peak = row["peak_allocated_gib"]
        err = peak / plan["estimate_gib"] - 1
        verdict = {"value": round(abs(err), 4), "target": TARGETS["plan_error"], "peak_gib": peak,
                   "estimate_gib": plan["estimate_gib"], "budget_gib": plan["budget_gib"],
                   "met": abs(err) <= TARGETS["plan_error"] and peak <= plan["budget_gib"]}
        if not verdict["met"]:
            verdict["why"] = (f"peak {peak:.2f} GiB against an estimate of {plan['estimate_gib']:.2f} GiB "
                              f"({'over' if err > 0 else 'under'}) for {plan['tokens']} tokens a micro-batch, "
                              f"checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, "
                              f"{plan.get('checkpoint_keep_layers', 0)} layers kept"
                              + (", inputs offloaded" if plan.get("activation_offloading") else "")
                              + (", 16-bit weight copies" if plan.get("keep_dequantized") else "") + "; "
                              f"budget {plan['budget_gib']:.2f} GiB")
        out[f"plan_error_{name}"] = verdict
    return out


def resummarise(path: Path) -> None:
    """Recompute loss parity and targets from the rows of an existing file; the measurements are untouched."""
    data = json.loads(path.read_text())
    if not any(set(COMMANDS) & set(e["rows"]) for e in data["figures"]["shapes"].values()):
        raise ValueError(f"{path} holds no row of the sft command (a record of the earlier recipe path): its targets "
                         "stay as written")
    for shape, entry in data["figures"]["shapes"].items():
        rows = entry["rows"]
        if has_parity(rows):
            entry["loss_parity"] = parity(rows["hf"], rows["sft"])
        entry["targets"] = verdicts(shape, rows)
    data["figures"]["summarised"] = environment_stamp()
    data["benchmark"] = path.stem         # a record is named by its file (--out names another than throughput)
    atomic_write_json(path, data)
    print(f"rewrote the parity and targets of {path}")


def parse_args(argv=None):
    p = OneLineParser(prog="python -m benchmarks.train_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-7b"],
                   help="presets of qlora_helpers.common.shapes, or 'tiny' (CPU smoke test)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per row")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the timing (warm-up)")
    p.add_argument("--step-tokens", type=int, default=16384, help="about this many tokens per optimizer step")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="")
    p.add_argument("--resummarise", default="", metavar="JSON",
                   help="recompute parity and targets of an existing throughput.json from its rows (no GPU)")
    p.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                   help="earlier throughput.json files: their shapes, and the rows of this shape not redone, are kept")
    p.add_argument("--shape", default="", help=argparse.SUPPRESS)   # internal: the worker's shape
    p.add_argument("--order-seed", type=int, default=0, help="the shuffle of the rows within their groups")
    p.add_argument("--row-timeout", type=float, default=0, help="seconds a row may take before it is killed")
    p.add_argument("--tight-peak", type=float, default=0.0, help=argparse.SUPPRESS)   # internal: sft-tight's budget
    p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)   # internal: the shape's model folder, shared
    return p.parse_args(argv)


def load_previous(paths: list[str]) -> dict:
    """shape -> entry of earlier throughput.json files, each with the commands that measured it."""
    previous = {}
    for path in reversed(paths):                       # the first file named wins a shape
        earlier = json.loads(Path(path).read_text())
        for name, entry in earlier["figures"]["shapes"].items():
            runs = entry.get("runs") or [{"command": earlier["command"], "date": earlier["date"]}]
            previous[name] = {**entry, "runs": runs}   # which commands measured the rows kept
    return previous


def progress(shape: str, name: str, row: dict) -> str:
    if "error" in row or not row.get("steps"):
        return f"{shape:>13} {name:<24} error: {row.get('error')}"
    return (f"{shape:>13} {name:<24} {row.get('tokens_per_second') or 0:>9.0f} tok/s  "
            f"peak {row.get('peak_allocated_gib', 0):6.2f} GiB  MFU {row.get('mfu') or 0:.3f}  "
            f"loss {row['steps'][-1]['loss']}")


def row_order(rows: list[str], seed: int) -> list[str]:
    """``hf`` first, then the peers, then the course's command (``sft-tight``'s budget is a peer's peak), shuffled
    within each group so that no row always runs on a GPU warmed by the same neighbour."""
    rng = random.Random(seed)
    groups = [[r for r in rows if r == "hf"], [r for r in rows if r in PEERS], [r for r in rows if r in COMMANDS]]
    for group in groups:
        rng.shuffle(group)
    return [r for group in groups for r in group]


def run_shape(shape: str, args, previous: dict, shapes: dict) -> None:
    """Measure one shape, each row in a fresh worker process, rewriting the file after every row (a cut run
    keeps what it has)."""
    old = previous.get(shape, {})
    # rows of an earlier run of this shape that this one does not redo are kept (same --steps and
    # --step-tokens, or the conversations per step differ)
    rows = {k: v for k, v in old.get("rows", {}).items() if k not in args.rows}
    if rows and (old.get("steps"), old.get("step_tokens")) != (args.steps, args.step_tokens):
        sys.exit(f"--merge: {shape} was run with --steps {old.get('steps')} --step-tokens "
                 f"{old.get('step_tokens')}: use the same to add rows to it")
    order = row_order([r for r in ROWS if r in args.rows], args.order_seed)
    runs = (old.get("runs", []) if rows else []) + [{**environment_stamp(), "order": order}]
    meta = {k: v for k, v in old.items() if k in ("n_params", "peak_flops", "device_name", "steps", "step_tokens",
                                                  "conversations_per_step")}
    t0 = time.perf_counter()

    def on_row(row: dict) -> None:
        if "row" in row:
            name = row.pop("row")
            rows[name] = row
            print(progress(shape, name, row), flush=True)
        else:
            meta.clear()
            meta.update(row["meta"])
        shapes[shape] = shape_entry(shape, rows, meta, None, t0, runs)
        write_figures(shapes, args)

    shared = tempfile.mkdtemp(prefix="qlora-throughput-")     # the command rows' model folder, written once
    try:
        for row in order:
            worker_args = ["--shape", shape, "--device", args.device, "--steps", args.steps, "--skip", args.skip,
                           "--step-tokens", args.step_tokens, "--rows", row, "--tight-peak", tight_budget(rows),
                           "--model-dir", Path(shared) / "model"]
            module = "benchmarks.unsloth_row" if row == "unsloth" else "benchmarks.train_throughput"
            try:
                run_worker(module, worker_args, label=f"{shape} {row}", on_row=on_row,
                           timeout=args.row_timeout or None, env=worker_env(row))
            except WorkerError as err:      # a crash or a timeout: the row records it, the next row runs
                on_row({"row": row, "error": str(err), "worker_exit": err.returncode})
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    shapes[shape] = shape_entry(shape, rows, meta, 0, t0, runs)
    write_figures(shapes, args)


def tight_budget(rows: dict) -> float:
    """``sft-tight``'s budget: the peak of the fastest tight peer measured so far, the one its target races at no
    more memory (0: none yet)."""
    measured = [(rows[p]["tokens_per_second"], rows[p].get("peak_allocated_gib") or 0.0)
                for p in SETTINGS["tight"][1] if (rows.get(p) or {}).get("tokens_per_second")]
    return max(measured)[1] if measured else 0.0


def worker_env(row: str) -> dict:
    """The ``unsloth`` row's worker sees ``$QLORA_UNSLOTH_SITE`` first: Unsloth's own packages (it pins an older
    TRL than the other rows use), installed apart with ``pip install --target``."""
    site = os.environ.get("QLORA_UNSLOTH_SITE")
    if row != "unsloth" or not site:
        return {}
    return {"PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.shape:
        worker(args)
        return
    if args.resummarise:
        resummarise(Path(args.resummarise))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: benchmarks.train_throughput measures a GPU: run it on a CUDA machine "
                 "(or --shapes tiny --device cpu)")
    previous = load_previous(args.merge)
    shapes = {k: v for k, v in previous.items() if k not in args.shapes}   # an earlier run's other shapes
    for shape in args.shapes:
        run_shape(shape, args, previous, shapes)


def environment_stamp() -> dict:
    env = environment()
    return {"command": env["command"], "date": env["date"]}


def has_parity(rows: dict) -> bool:
    return all("eval_loss" in rows.get(name, {}) for name in ("hf", "sft"))


def shape_entry(shape, rows, meta, exit_code, t0, runs) -> dict:
    entry = {"rows": rows, **meta, "worker_exit": exit_code, "seconds": round(time.perf_counter() - t0, 1),
             "runs": runs}
    if has_parity(rows):
        entry["loss_parity"] = parity(rows["hf"], rows["sft"])
    entry["targets"] = verdicts(shape, rows)
    return entry


def write_figures(shapes, args) -> None:
    figures = {"shapes": shapes, "lora": LORA, "learning_rate": LR, "hf_micro_batch": HF_BATCH,
               "max_length": MAX_LENGTH, "mfu_basis": "tokens/s x 4N / peak dense bf16 FLOP/s; N = decoder "
               "linears + output layer (2N forward, 2N input gradients; no weight gradients for the frozen "
               "base; attention scores and recomputation not counted)",
               "data": "chatterbot SFT train split, Qwen2.5 tokenizer and chat template, <= 512 tokens",
               "weights": "random at the real shape, 4-bit NF4 with double quantisation, bf16 compute"}
    # throughput.json and throughput_peers.json hold the rows of the earlier recipe path (history shown by chapter
    # 03): a run of this script writes its own record unless --out names one
    write_benchmark(Path(args.out).stem if args.out else "throughput_sft", figures, args.out or None)


if __name__ == "__main__":
    sys.exit(run_main(main))
