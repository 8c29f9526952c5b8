"""FSDP-QLoRA: train a model whose 4-bit base is too big for one GPU, sharded over several.

Data parallelism (chapter 05) needs the whole 4-bit model on every GPU. Qwen2.5-72B is about 40 GiB
in 4-bit: more than a V100-32GB. FSDP splits it instead: each of N GPUs keeps 1/N of every weight and
gathers one decoder layer at a time for its forward and backward. bitsandbytes makes the packed 4-bit
weights FSDP-compatible by storing them in a 16-bit container (``bnb_4bit_quant_storage``), so they can
be flattened and split with the norms and biases of the same layer.

What this script does, on every rank (start it with torchrun, one process per GPU):

1. caps PyTorch's allocator at ``--cap-gib`` (31: a V100-32GB less its CUDA context), before anything;
2. builds the model on the ``meta`` device (no memory), swaps its linears for bnb ``Linear4bit`` with a
   16-bit quant storage, and adds LoRA (peft);
3. wraps it in FSDP with a ``param_init_fn``: each unit (a decoder layer, a LoRA matrix, the embeddings,
   the head) gets its random weights on the GPU, quantised there, and is sharded at once, so no rank
   ever holds the whole 4-bit model, and the cap holds from the first byte;
4. trains ``--steps`` steps (fp16 compute with a sharded gradient scaler, LoRA weights fp32) on random
   tokens and records per-rank peak memory and step time.

    torchrun --nproc_per_node 2 -m benchmarks.fsdp_qlora                   # Qwen2.5-72B shape, 31 GiB cap
    torchrun --nproc_per_node 2 -m benchmarks.fsdp_qlora --preset qwen2.5-32b --steps 4
    torchrun --nproc_per_node 2 -m benchmarks.fsdp_qlora --cpu --preset tiny   # the logic on 2 CPU processes

Writes ``benchmarks/results/fsdp_qlora.json`` (rank 0) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import sys
import time

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.integrations.bitsandbytes import replace_with_bnb_linear

from qlora_helpers.ch01_memory.estimator import model_shape, quantized_bytes
from qlora_helpers.common.bench import write_benchmark
from qlora_helpers.common.files import state_digest
from qlora_helpers.common.models import bnb_config, enable_checkpointing, tiny_qwen2
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import OneLineParser, run_main

GIB = 2**30
QWEN25_72B = dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False,
                  bos_token_id=151643, eos_token_id=151645)   # Qwen/Qwen2.5-72B-Instruct config.json
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def get_shape(preset: str):
    if preset == "qwen2.5-72b":
        kw = dict(QWEN25_72B)
        return CONFIG_MAPPING[kw.pop("model_type")](**kw)
    if preset == "tiny":
        return tiny_qwen2(vocab_size=1024, hidden_size=64, layers=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return get_config(preset)


def _seeded(name: str, device):
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")   # same tensor on every rank
    return torch.Generator(device=device).manual_seed(seed)


def make_param_init_fn(model, device, dtype, quant_storage, std: float = 0.02):
    """FSDP calls the returned function on every still-meta module of a unit just before sharding it."""
    names = {id(m): n for n, m in model.named_modules()}

    def init(module):
        prefix = names.get(id(module), "")
        for p_name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            full = f"{prefix}.{p_name}"
            g = _seeded(full, device)
            if isinstance(module, bnb.nn.Linear4bit) and p_name == "weight":
                data = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype)
                data.normal_(0, std, generator=g)
                module.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                                  quant_storage=quant_storage, module=module).to(device)
                continue
            if "lora_A" in full:     # peft's default: kaiming-uniform A, zero B, fp32 (trainable)
                data = torch.empty(param.shape, device=device, dtype=torch.float32)
                bound = 1 / math.sqrt(param.shape[1])
                data.uniform_(-bound, bound, generator=g)
            elif "lora_B" in full or p_name == "bias":
                data = torch.zeros(param.shape, device=device, dtype=torch.float32 if "lora_" in full else dtype)
            elif "norm" in full:
                data = torch.ones(param.shape, device=device, dtype=dtype)
            else:
                data = torch.empty(param.shape, device=device, dtype=dtype).normal_(0, std, generator=g)
            module._parameters[p_name] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
        for b_name, buf in list(module.named_buffers(recurse=False)):
            if buf.device != device:
                module._buffers[b_name] = buf.to(device)

    return init


def wrap_policy(model):
    """Decoder layers, embeddings and head as units; each trainable LoRA matrix as its own fp32 unit."""
    layer_cls = {type(m) for n, m in model.named_modules() if n.endswith("layers.0")}
    head = model.get_output_embeddings()
    lora_or_head = lambda m: m is head or (len(list(m.children())) == 0 and getattr(m, "weight", None) is not None
                                           and m.weight.requires_grad)
    return functools.partial(_or_policy, policies=[
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls | {torch.nn.Embedding}),
        functools.partial(lambda_auto_wrap_policy, lambda_fn=lora_or_head)])


def base_4bit_gib(config) -> float:
    """The whole 4-bit base (linears in NF4, embeddings, head and norms in 16 bits): what one GPU would hold."""
    shape = model_shape(config)
    linears = sum(l.count * quantized_bytes(l.fan_in * l.fan_out) for l in shape.linears)
    return (linears + sum(n * 2 for n in shape.other.values())) / GIB


def start(args) -> tuple[int, int, torch.device]:
    """This rank's process group and device, the allocator capped first; (rank, world size, device)."""
    if "RANK" not in os.environ:
        raise SystemExit("error: start it with torchrun, one process per GPU: "
                         "torchrun --nproc_per_node 2 -m benchmarks.fsdp_qlora (add --cpu --preset tiny without GPUs)")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.cpu:
        dist.init_process_group("gloo")
        return rank, world, torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU visible; run it on GPUs, or check the logic with --cpu --preset tiny")
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    total = torch.cuda.get_device_properties(local).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), local)
    dist.init_process_group("nccl", device_id=device)
    return rank, world, device


def build_sharded(config, args, device, dtype):
    """The model on ``meta``, its linears swapped for bnb ``Linear4bit`` with 16-bit storage, LoRA, then FSDP,
    which materialises, quantises and shards one unit at a time (``make_param_init_fn``)."""
    qconfig = bnb_config("4bit", dtype, quant_storage=dtype)          # the FSDP-QLoRA switch: 16-bit storage
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qconfig)
    model.config.quantization_config = qconfig
    model.is_loaded_in_4bit = True
    enable_checkpointing(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
                           autocast_adapter_dtype=False)
    init = make_param_init_fn(model, device, dtype, dtype)
    return FSDP(model, auto_wrap_policy=wrap_policy(model), param_init_fn=init, device_id=device,
                use_orig_params=False, sync_module_states=False, limit_all_gathers=True)


def layout_of(model) -> dict:
    return {"fsdp_units": len(FSDP.fsdp_modules(model)),
            "linear4bit_modules": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
            "local_numel": sum(p.numel() for p in model.parameters()),
            "flat_param_dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def train(model, params, ids, args, device, dtype, rank: int) -> list[dict]:
    """``--steps`` steps on ``ids`` (fp16 with a sharded gradient scaler on GPUs); one record per step."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    scaler = ShardedGradScaler(init_scale=2.0**12, enabled=args.dtype == "fp16" and not args.cpu)
    steps = []
    model.train()
    for i in range(args.steps):
        if not args.cpu:
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=not args.cpu):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        model.clip_grad_norm_(1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        del logits
        rec = {"step": i + 1, "loss": round(float(loss), 4), "seconds": round(time.perf_counter() - t, 3)}
        if not args.cpu:
            torch.cuda.synchronize(device)
            rec.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 3),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 3))
        steps.append(rec)
        if rank == 0:
            print(rec, flush=True)
    return steps


def save_adapter(model, folder: str) -> dict:
    """Gather every LoRA shard (``summon_full_params``) and, on rank 0, write a peft adapter folder.

    Returns the whole model's parameter count and the sha256 of the LoRA tensors written, which a reader
    reloads with ``PeftModel.from_pretrained`` (tests/test_fsdp.py does).
    """
    with FSDP.summon_full_params(model, writeback=False):
        full_numel = sum(p.numel() for p in model.parameters())
        lora = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
    peft_model = model.module
    # the names save_pretrained writes (peft 0.21's get_peft_model_state_dict returns nothing under FSDP)
    state = {re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k): v for k, v in lora.items()}
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
        peft_model.peft_config["default"].save_pretrained(folder)
        save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"full_numel": full_numel, "adapter_tensors": len(state), "adapter_sha256": state_digest(state)}


def figures_of(args, per_rank: list[dict], base_gib: float, built: float) -> dict:
    """What rank 0 writes: the steady-state peaks and step time over all ranks (step 1 is a warm-up)."""
    steady = [s for r in per_rank for s in r["steps"][1:]] or [s for r in per_rank for s in r["steps"]]
    steps = per_rank[0]["steps"]
    return {"model": f"{args.preset} (random weights, real shape)", "world_size": len(per_rank),
            "cap_gib": args.cap_gib, "dtype": args.dtype, "quant_storage": args.dtype, "seq_len": args.seq_len,
            "lora_r": args.lora_r, "base_4bit_gib_estimate": round(base_gib, 2),
            "base_exceeds_cap": base_gib > args.cap_gib,
            "build_and_shard_seconds": round(built, 1),
            "peak_allocated_gib": max((s.get("peak_allocated_gib") or 0) for s in steady),
            "peak_reserved_gib": max((s.get("peak_reserved_gib") or 0) for s in steady),
            "seconds_per_step": sorted(s["seconds"] for s in steady)[len(steady) // 2],
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "lora_finite": all(r["lora_finite"] for r in per_rank), "per_rank": per_rank}


def parse_args(argv=None):
    parser = OneLineParser(prog="torchrun --nproc_per_node N -m benchmarks.fsdp_qlora",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-72b", help="qwen2.5-72b, a qlora_helpers preset, or tiny")
    parser.add_argument("--cap-gib", type=float, default=31.0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="compute and quant-storage dtype")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU processes (logic check, small presets)")
    parser.add_argument("--out", help="result file (default: benchmarks/results/fsdp_qlora.json)")
    parser.add_argument("--save-adapter", default="", metavar="DIR", help="gather the LoRA shards, save a peft adapter")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = start(args)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    config = get_shape(args.preset)
    model = build_sharded(config, args, device, dtype)
    built = time.perf_counter() - t0
    layout = layout_of(model)
    after_wrap = torch.cuda.memory_allocated(device) / GIB if not args.cpu else None
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=g).to(device)
    steps = train(model, params, ids, args, device, dtype, rank)
    per_rank = [None] * world
    saved = save_adapter(model, args.save_adapter) if args.save_adapter else {}
    dist.all_gather_object(per_rank, {"rank": rank, "after_wrap_gib": after_wrap, "steps": steps, **layout,
                                      "lora_finite": all(bool(torch.isfinite(p).all()) for p in params), **saved})
    if rank == 0:
        figures = figures_of(args, per_rank, base_4bit_gib(config), built)
        print({k: v for k, v in figures.items() if k != "per_rank"}, flush=True)
        if not args.cpu or args.out:
            write_benchmark("fsdp_qlora", figures, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_main(main))
