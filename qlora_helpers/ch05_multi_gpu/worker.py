"""Data-parallel QLoRA started from a notebook: one 4-bit copy of the model per rank, DDP over LoRA.

The notebook calls ``accelerate.notebook_launcher(train_worker, args=(run,), num_processes=N)``.
The launcher forks N processes; each runs ``train_worker``, which does everything that touches
CUDA, bitsandbytes, peft or the model *inside* the child (a parent that has initialised CUDA or
imported bitsandbytes cannot fork workers: the launcher refuses). Each rank then:

1. picks its device (GPU ``LOCAL_RANK``, or the CPU) and precision (``qlora_helpers.ch05_multi_gpu.precision``);
2. loads its own 4-bit copy of the model on that device (``device_map={"": local_rank}``) and adds LoRA;
3. wraps it in ``DistributedDataParallel``, which all-reduces only the LoRA gradients (the frozen
   4-bit base is excluded, so it is never broadcast);
4. trains on its share of every global batch; the loss of each step is divided by the number of
   answer tokens in the *global* batch, so the averaged gradient equals a single process's on
   the same batch, however the tokens fall across ranks;
5. at each epoch end computes the validation loss over all ranks (so every rank takes the same
   schedule decision), and rank 0 writes ``training_history.json`` and the ``best/`` adapter.

On a CPU the same code runs with the gloo backend and 2 processes, which is how the tests check that
gradients really synchronise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import socket
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from qlora_helpers.ch05_multi_gpu import precision as P
from qlora_helpers.ch05_multi_gpu.reversal import (
    TASKS,
    accuracy,
    collate,
    encode,
    eval_items,
    evaluate_items,
    generate_data,
    training_set,
)
from qlora_helpers.ch05_multi_gpu.schedule import PlateauSchedule
from qlora_helpers.common.files import atomic_write_json

CPU_PROCESSES = 2


# --------------------------------------------------------------------------- the parent: no CUDA here
def visible_gpus() -> int:
    """CUDA devices visible to this process, counted through NVML: CUDA stays uninitialised, so fork is safe."""
    old = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    finally:
        if old is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK")
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = old


def resolve_launch(profile: str, num_processes: int = 0, gpus: int | None = None) -> tuple[str, int]:
    """(profile, processes): ``auto`` is ``gpu`` when a GPU is visible; 0 processes = one per GPU, 2 on a CPU.

    >>> resolve_launch("auto", 0, gpus=8), resolve_launch("auto", 0, gpus=0), resolve_launch("cpu", 3, gpus=2)
    (('gpu', 8), ('cpu', 2), ('cpu', 3))
    """
    gpus = visible_gpus() if gpus is None else gpus
    if profile not in ("auto", "cpu", "gpu"):
        raise ValueError(f"profile must be auto, cpu or gpu, not {profile!r}")
    if profile == "gpu" and not gpus:
        raise ValueError("profile='gpu' but no CUDA device is visible: use profile='cpu' or 'auto'")
    profile = ("gpu" if gpus else "cpu") if profile == "auto" else profile
    n = num_processes or (gpus if profile == "gpu" else CPU_PROCESSES)
    if profile == "gpu" and n > gpus:
        raise ValueError(f"num_processes={n} but only {gpus} GPU(s) are visible: one process per GPU, use 0 for all")
    if n < 1:
        raise ValueError(f"num_processes must be 0 (automatic) or more, not {n}")
    return profile, n


def free_port() -> str:
    """A free TCP port for the rendezvous, so two runs on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def global_batches(n_examples: int, epoch: int, seed: int, world: int, rank: int, batch_size: int,
                   accum: int) -> list[list[list[int]]]:
    """This rank's micro-batches for each optimizer step of one epoch (lists of example indices).

    Every rank shuffles with the same seed, cuts the order into global batches of
    ``world * batch_size * accum`` examples, and takes micro-batch ``j`` of rank ``r`` from slot
    ``j * world + r``. Any split of the same global batch gives the same gradient, which is what the
    test compares. A data set smaller than one global batch is repeated to fill it.

    >>> global_batches(8, 0, 0, world=2, rank=1, batch_size=1, accum=2)   # 2 steps of 2 micro-batches
    [[[1], [2]], [[3], [6]]]
    """
    order = list(range(n_examples))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    size = world * batch_size * accum
    if n_examples < size:
        order = (order * math.ceil(size / n_examples))[:size]
    steps = []
    for s in range(len(order) // size):
        chunk = order[s * size:(s + 1) * size]
        steps.append([chunk[(j * world + rank) * batch_size:(j * world + rank + 1) * batch_size] for j in range(accum)])
    return steps


# --------------------------------------------------------------------------- inside each rank
def _dist():

    return dist if dist.is_available() and dist.is_initialized() else None


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks (identity with one process)."""

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist():
        _dist().all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    if not _dist():
        return [obj]
    out = [None] * _dist().get_world_size()
    _dist().all_gather_object(out, obj)
    return out


def lora_state(model) -> dict:
    """The trainable tensors by name, as float32 CPU copies."""
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def state_digest(state: dict) -> str:
    """sha256 of the tensors' bytes in name order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def save_adapter(model, folder: Path) -> None:
    """``save_pretrained`` into a temporary folder, then swap it in: a reader never sees half an adapter."""

    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _loss_sum(loss_fn, batch, device, autocast):
    """Summed cross-entropy over the answer tokens of a batch, and how many there were.

    ``loss_fn`` is ``recipe.loss_module(peft_model)`` (or DDP around it): only the answer rows reach
    the output layer, in chunks, so the ``[tokens, vocab]`` logits never exist.
    """
    n = int((batch["labels"][:, 1:] != -100).sum())
    with autocast():
        mean = loss_fn(**{k: v.to(device) for k, v in batch.items()})
    return mean * n, n


def validation_loss(model, examples: list[dict], pad_id: int, device, autocast, batch_size: int, rank: int,
                    world: int) -> float:
    """Token-mean loss over all of ``examples``, each rank scoring its share."""


    mine = examples[rank::world]
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            loss, n = _loss_sum(model, collate(mine[i:i + batch_size], pad_id), device, autocast)
            total, count = total + float(loss), count + n
    model.train()
    total, count = all_reduce_sum([total, count], device)
    return total / max(count, 1)


def _accuracy(model, tokenizer, identities, device, rank, world, max_new_tokens, generate=True) -> dict:

    items = eval_items(identities)[rank::world]
    rows = evaluate_items(model, tokenizer, identities, items, device, max_new_tokens, generate) if items else []
    everyone = [r for part in gather_objects(rows) for r in part]
    order = lambda r: (r["direction"], r["wording"], r["identity"])
    return {**accuracy(everyone, len(identities)), "answers": sorted(everyone, key=order)}


def train_worker(run: dict) -> None:
    """The function each rank runs (give it to ``notebook_launcher``); ``run`` is a plain dict (see notebook 05)."""

    # lazy: these load transformers' models, peft and bitsandbytes, which must be imported in each rank,
    # after notebook_launcher has forked it, never in the notebook's kernel (the launcher refuses then)
    from transformers.utils import logging as hf_logging

    from qlora_helpers.ch03_sft.recipe import loss_module
    from qlora_helpers.ch05_multi_gpu.model import add_lora, load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # bitsandbytes' CPU 4-bit op warns that it has no autograd kernel; LoRA gradients through the layer equal
    # those through the dequantised fp32 weights (tests/test_ddp.py::test_qlora_gradients_on_cpu_are_exact)
    warnings.filterwarnings("ignore", message=r"bitsandbytes::gemv_4bit: an autograd kernel")
    t_start = time.perf_counter()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    gpu = run["profile"] == "gpu"
    if gpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1 and not _dist():
        dist.init_process_group("nccl" if gpu else "gloo", **({"device_id": device} if gpu else {}))
    cap, bf16_ok, device_name = P.detect(local if gpu else None)
    prec = P.choose(cap, bf16_ok, run.get("precision", "auto"))
    P.check_quantize(run.get("quantize", "4bit"), cap, device_name)
    dtype = P.torch_dtype(prec.compute_dtype)
    lora, tr = run["config"]["lora"], run["config"]["training"]
    seed = int(tr.get("seed", 0))

    model, tokenizer = load_model(run["model_id"], run.get("quantize", "4bit"), dtype, local if gpu else "cpu")
    model = add_lora(model, lora, bool(tr.get("gradient_checkpointing", False)), seed)
    t_loaded = time.perf_counter()
    train_recs, val_recs = training_set(run["data_dir"], run["task"], float(run.get("retention_ratio", 0.0)), seed)
    max_len = int(tr["max_length"])
    train = [encode(r["messages"], tokenizer, max_len) for r in train_recs]
    val = [encode(r["messages"], tokenizer, max_len) for r in val_recs]
    identities = json.loads((Path(run["data_dir"]) / "identities.json").read_text())
    pad = tokenizer.pad_token_id

    loss_fn = loss_module(model)   # forward = the course recipe's loss (no full logits)
    if world > 1:

        frozen = [n for n, p in loss_fn.named_parameters() if not p.requires_grad] + [n for n, _ in loss_fn.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(loss_fn, frozen)
        ddp = DDP(loss_fn, device_ids=[local] if gpu else None)
    else:
        ddp = loss_fn
    core = model   # the peft model itself: for evaluation, saving and generation
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(tr["learning_rate"]), weight_decay=float(tr.get("weight_decay", 0.0)))
    use_autocast = prec.compute_dtype != "fp32"
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if use_autocast else nullcontext
    scaler = torch.amp.GradScaler(device.type, init_scale=float(tr.get("init_loss_scale", 2 ** 12)),
                                  enabled=prec.grad_scaling)

    bs, accum, epochs = int(tr["batch_size"]), int(tr["gradient_accumulation_steps"]), int(tr["num_epochs"])
    per_epoch = len(global_batches(len(train), 0, seed, world, rank, bs, accum))
    max_steps = int(run.get("max_steps") or 0)
    total = min(per_epoch * epochs, max_steps) if max_steps > 0 else per_epoch * epochs
    schedule = PlateauSchedule.from_config(tr, total)
    out = Path(run["output_dir"]) / f"{run['name']}_{run['task']}"
    history = {"task": run["task"], "name": run["name"], "model_id": run["model_id"] or "SmolLM2-135M-Instruct",
               "world_size": world, "precision": prec.as_dict(), "global_batch": world * bs * accum,
               "steps_per_epoch": per_epoch, "warmup_steps": schedule.warmup_steps, "status": "running",
               "epochs": [], "steps": []}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "training_history.json", history)
        print(f"{world} rank(s) on {device_name}, {prec.compute_dtype} compute ({prec.reason}); "
              f"{len(train)} training / {len(val)} validation examples, global batch {world * bs * accum}, "
              f"{per_epoch} step(s) per epoch, model ready in {t_loaded - t_start:.0f} s", flush=True)
    t_eval = time.perf_counter()
    before = _accuracy(core, tokenizer, identities, device, rank, world, 0, generate=False) \
        if run.get("eval_before", True) else None   # multiple choice only: nothing to generate before training
    step, skipped, stop_reason = 0, 0, None
    ddp.train()
    t_train = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t_epoch, loss_sum, tok_sum = time.perf_counter(), 0.0, 0
        for micro in global_batches(len(train), epoch, seed, world, rank, bs, accum):
            batches = [collate([train[i] for i in ids], pad) for ids in micro]
            local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            n_global = all_reduce_sum([local_tokens], device)[0]
            step_loss = 0.0
            for j, batch in enumerate(batches):
                sync = ddp.no_sync() if (world > 1 and j < len(batches) - 1) else nullcontext()
                with sync:
                    loss, _ = _loss_sum(ddp, batch, device, autocast)
                    scaler.scale(loss * world / n_global).backward()   # DDP averages over ranks: * world
                step_loss += float(loss.detach())
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            scaler.unscale_(optimizer)
            if tr.get("max_grad_norm"):
                torch.nn.utils.clip_grad_norm_(params, float(tr["max_grad_norm"]))
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped += int(prec.grad_scaling and scaler.get_scale() < scale)   # inf/nan found: step skipped
            optimizer.zero_grad(set_to_none=True)
            total_loss = all_reduce_sum([step_loss], device)[0] / n_global
            history["steps"].append({"step": step + 1, "epoch": epoch, "loss": total_loss, "lr": schedule.lr_at(step)})
            loss_sum, tok_sum, step = loss_sum + total_loss * n_global, tok_sum + n_global, step + 1
            if max_steps and step >= max_steps:
                break
        val_loss = validation_loss(loss_fn, val, pad, device, autocast, bs * 2, rank, world)
        lr_used = schedule.lr_at(step - 1)
        d = schedule.end_epoch(val_loss)
        if max_steps and step >= max_steps and not d.stop:
            stop_reason = "max_steps"
        stop_reason = d.reason or stop_reason
        if rank == 0:
            if d.new_best:
                save_adapter(core, out / "best")
            rec = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(tok_sum, 1), "lr": lr_used,
                   "seconds": round(time.perf_counter() - t_epoch, 2), **d.as_dict(), "next_lr": d.lr,
                   "stop_reason": stop_reason}
            history["epochs"].append(rec)
            atomic_write_json(out / "training_history.json", history)
            note = ("improved" if d.improved else f"no {schedule.improvement_threshold:.0%} gain") + \
                (f", lr x{schedule.lr_reduction_factor}" if d.reduced else "") + (f", stop: {stop_reason}" if stop_reason else "")
            print(f"epoch {epoch:2d}  step {step:3d}  train {rec['train_loss']:.4f}  val {val_loss:.4f}  "
                  f"lr {lr_used:.2e}  ({note})  {rec['seconds']:.1f} s", flush=True)
        if stop_reason:
            break
    t_trained = time.perf_counter()
    eval_seconds = t_train - t_eval
    state = lora_state(core)
    digests = gather_objects(state_digest(state))
    if run.get("save_rank_states"):
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / f"rank{rank}_lora.safetensors"))
    after = _accuracy(core, tokenizer, identities, device, rank, world, run.get("max_new_tokens", 20)) \
        if run.get("eval_after", True) else None
    eval_seconds += time.perf_counter() - t_trained
    peaks = gather_objects(torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None)
    devices = gather_objects({"rank": rank, "device": str(device), "name": device_name,
                              "capability": ".".join(map(str, cap)) if cap else None})
    if rank == 0:
        save_adapter(core, out / "final")
        history.update(status="done", stop_reason=stop_reason or "num_epochs", skipped_steps=skipped)
        atomic_write_json(out / "training_history.json", history)
        atomic_write_json(out / "run.json", {
            "world_size": world, "devices": devices, "precision": prec.as_dict(), "quantize": run.get("quantize", "4bit"),
            "steps": step, "epochs": len(history["epochs"]), "stop_reason": history["stop_reason"],
            "skipped_steps": skipped, "rank_digests": digests, "ranks_identical": len(set(digests)) == 1,
            "lora_parameters": sum(t.numel() for t in state.values()), "peak_allocated_gib": peaks,
            "seconds": {"load": round(t_loaded - t_start, 1), "train": round(t_trained - t_train, 1),
                        "evaluation": round(eval_seconds, 1),
                        "total": round(time.perf_counter() - t_start, 1)},
            "accuracy_before": before, "accuracy": after, "best_val_loss": schedule.best,
            "output_dir": str(out)})
    if _dist():
        _dist().barrier()
        _dist().destroy_process_group()


def main(argv=None) -> None:
    """The same run from a shell, for ``accelerate launch`` / ``torchrun`` (several machines included)::

        torchrun --nproc_per_node 2 -m qlora_helpers.ch05_multi_gpu.worker --profile cpu --max-steps 4
        accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \\
            --main_process_ip $HEAD --main_process_port 29500 -m qlora_helpers.ch05_multi_gpu.worker \\
            --config data/configs/multi_gpu_32b.yaml --model-id Qwen/Qwen2.5-32B-Instruct --task forward
    """



    p = argparse.ArgumentParser(prog="python -m qlora_helpers.ch05_multi_gpu.worker", description="data-parallel QLoRA, reversal-curse task")
    p.add_argument("--config", default="data/configs/multi_gpu_32b.yaml")
    p.add_argument("--profile", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--model-id", default="", help="empty: cached SmolLM2; a hub id, a folder, random:PRESET")
    p.add_argument("--task", choices=TASKS, default="forward")
    p.add_argument("--name", default="lfw_reversal")
    p.add_argument("--data-dir", default="outputs/data", help="generated here (the same files on every rank)")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--num-identities", type=int, default=4)
    p.add_argument("--retention-ratio", type=float, default=0.3)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--max-steps", type=int, default=0, help="0: no limit but the schedule's")
    a = p.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    generate_data(a.data_dir, a.num_identities, int(cfg["training"].get("seed", 0)))   # atomic, identical per rank
    train_worker(dict(profile=a.profile, model_id=a.model_id, quantize="4bit", precision=a.precision, config=cfg,
                      data_dir=a.data_dir, task=a.task, name=a.name, output_dir=a.output_dir,
                      retention_ratio=a.retention_ratio, max_steps=a.max_steps))


if __name__ == "__main__":
    main()
