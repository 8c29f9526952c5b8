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

In code: ``setup_rank`` (steps 1-3), ``run_epoch`` and ``end_epoch`` (steps 4-5), ``finish_run``
(evaluation, the ``final/`` adapter, ``run.json``); ``train_worker`` calls them in that order.

On a CPU the same code runs with the gloo backend and 2 processes, which is how the tests check that
gradients really synchronise.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers.utils import logging as hf_logging

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
from qlora_helpers.common.files import atomic_folder, atomic_open, atomic_write_json, state_digest
from qlora_helpers.errors import OneLineParser, run_main

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


def resolve_launch(profile: str, num_processes: int = 0, *, gpus: int | None = None) -> tuple[str, int]:
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


def global_batches(n_examples: int, epoch: int, seed: int, *, world: int, rank: int, batch_size: int,
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


# --------------------------------------------------------------------------- collectives (identity with one process)
def _dist():

    return dist if dist.is_available() and dist.is_initialized() else None


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks (identity with one process)."""

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist():
        _dist().all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` with one process)."""
    if not _dist():
        return [obj]
    out = [None] * _dist().get_world_size()
    _dist().all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- weights and adapters
def lora_state(model) -> dict:
    """The trainable tensors by name, as float32 CPU copies."""
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, folder: Path) -> None:
    """``save_pretrained`` into a new version of the folder, swapped in at once (``common.files.atomic_folder``):
    a reader, or a run killed at any instant, never sees half an adapter."""
    atomic_folder(folder, model.save_pretrained)


# --------------------------------------------------------------------------- setting up one rank
@dataclass
class Rank:
    """One process of the run: where it computes, in which precision, and what it trains."""

    rank: int
    world: int
    device: torch.device
    device_name: str
    capability: tuple[int, int] | None
    precision: P.Precision
    model: Any                 # the peft model: evaluation, saving and generation
    tokenizer: Any
    loss_fn: Any               # recipe.loss_module(model): the recipe's loss, never the [tokens, vocab] logits
    ddp: Any                   # loss_fn in DistributedDataParallel (loss_fn itself with one process)
    params: list               # the LoRA tensors, the only ones trained
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    started: float             # time.perf_counter() once the libraries were imported: the run's clock starts here

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """The compute dtype's autocast context; none for fp32."""
        if self.precision.compute_dtype == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=P.torch_dtype(self.precision.compute_dtype))


def _quiet_libraries() -> None:
    """Silence what every rank would print alike: transformers' progress bars and two known warnings."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # bitsandbytes' CPU 4-bit op warns that it has no autograd kernel; LoRA gradients through the layer equal
    # those through the dequantised fp32 weights (tests/test_ddp.py::test_qlora_gradients_on_cpu_are_exact)
    warnings.filterwarnings("ignore", message=r"bitsandbytes::gemv_4bit: an autograd kernel")


def _join(profile: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from the launcher's environment; joins the process group when world > 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    gpu = profile == "gpu"
    if gpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1 and not _dist():
        dist.init_process_group("nccl" if gpu else "gloo", **({"device_id": device} if gpu else {}))
    return rank, world, device


def _wrap_ddp(loss_fn, world: int, device: torch.device):
    """``loss_fn`` in DDP told to skip the frozen 4-bit weights: only LoRA gradients travel (none with one rank)."""
    if world == 1:
        return loss_fn
    frozen = [n for n, p in loss_fn.named_parameters() if not p.requires_grad] + [n for n, _ in loss_fn.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(loss_fn, frozen)
    return DDP(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)


def setup_rank(run: dict) -> Rank:
    """This rank's device and precision, its 4-bit model with LoRA, DDP around the loss, optimizer and scaler."""

    # lazy: these load transformers' models, peft and bitsandbytes, which must be imported in each rank,
    # after notebook_launcher has forked it, never in the notebook's kernel (the launcher refuses then)
    from qlora_helpers.ch03_sft.recipe import loss_module
    from qlora_helpers.ch05_multi_gpu.model import add_lora, load_initial_adapter, load_model, make_optimizer

    started = time.perf_counter()
    rank, world, device = _join(run["profile"])
    cap, bf16_ok, device_name = P.detect(device.index if device.type == "cuda" else None)
    prec = P.choose(cap, bf16_ok, run.get("precision", "auto"))
    quantize = run.get("quantize", "4bit")
    P.check_quantize(quantize, cap, device_name)
    lora, tr = run["config"]["lora"], run["config"]["training"]
    model, tokenizer = load_model(run["model_id"], quantize, dtype=P.torch_dtype(prec.compute_dtype),
                                  device=device.index if device.type == "cuda" else "cpu")
    model = add_lora(model, lora, bool(tr.get("gradient_checkpointing", False)), int(tr.get("seed", 0)))
    if run.get("init_adapter"):   # a later stage: continue an earlier run's adapter (the same file on every rank)
        load_initial_adapter(model, run["init_adapter"], lora)
    loss_fn = loss_module(model)   # forward = the course recipe's loss (no full logits)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tr, cuda=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, init_scale=float(tr.get("init_loss_scale", 2 ** 12)),
                                  enabled=prec.grad_scaling)
    return Rank(rank=rank, world=world, device=device, device_name=device_name, capability=cap, precision=prec,
                model=model, tokenizer=tokenizer, loss_fn=loss_fn, ddp=_wrap_ddp(loss_fn, world, device),
                params=params, optimizer=optimizer, scaler=scaler, started=started)


def load_examples(run: dict, tokenizer, *, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation) token ids of the run's task, and the identities the evaluation asks about."""
    train_recs, val_recs = training_set(run["data_dir"], run["task"], float(run.get("retention_ratio", 0.0)), seed=seed,
                                        face_pool=run.get("face_retention_pool"))
    max_len = int(run["config"]["training"]["max_length"])
    train = [encode(r["messages"], tokenizer, max_len) for r in train_recs]
    val = [encode(r["messages"], tokenizer, max_len) for r in val_recs]
    identities = json.loads((Path(run["data_dir"]) / "identities.json").read_text())
    return train, val, identities


# --------------------------------------------------------------------------- the run's plan and its history
@dataclass
class Progress:
    """The plan of the run (batches, limits, schedule) and what it has done so far; rank 0 writes ``history``."""

    out: Path
    seed: int
    batch_size: int
    accum: int
    epochs: int
    max_steps: int             # 0: no limit but the schedule's
    max_grad_norm: float | None
    schedule: PlateauSchedule
    history: dict
    step: int = 0
    skipped: int = 0           # optimizer steps the fp16 loss scaler skipped (inf/nan gradients)
    stop_reason: str | None = None
    clock: dict = field(default_factory=dict)   # time.perf_counter() at the run's milestones

    @property
    def at_max_steps(self) -> bool:
        return bool(self.max_steps) and self.step >= self.max_steps


def plan_run(run: dict, r: Rank, n_train: int) -> Progress:
    """Batches per step and epoch, the schedule over the run's length, and an empty history."""
    tr = run["config"]["training"]
    seed, bs, accum = int(tr.get("seed", 0)), int(tr["batch_size"]), int(tr["gradient_accumulation_steps"])
    epochs, max_steps = int(tr["num_epochs"]), int(run.get("max_steps") or 0)
    per_epoch = len(global_batches(n_train, 0, seed, world=r.world, rank=r.rank, batch_size=bs, accum=accum))
    total = min(per_epoch * epochs, max_steps) if max_steps > 0 else per_epoch * epochs
    schedule = PlateauSchedule.from_config(tr, total)
    history = {"task": run["task"], "name": run["name"], "model_id": run["model_id"] or "SmolLM2-135M-Instruct",
               "data_dir": str(Path(run["data_dir"]).resolve()), "quantize": run.get("quantize", "4bit"),
               "init_adapter": str(Path(run["init_adapter"]).resolve()) if run.get("init_adapter") else None,
               "optimizer": type(r.optimizer).__name__, "world_size": r.world, "precision": r.precision.as_dict(),
               "global_batch": r.world * bs * accum,
               "steps_per_epoch": per_epoch, "warmup_steps": schedule.warmup_steps, "status": "running",
               "epochs": [], "steps": []}
    return Progress(out=Path(run["output_dir"]) / f"{run['name']}_{run['task']}", seed=seed, batch_size=bs,
                    accum=accum, epochs=epochs, max_steps=max_steps, max_grad_norm=tr.get("max_grad_norm"),
                    schedule=schedule, history=history)


def _announce(r: Rank, p: Progress, *, n_train: int, n_val: int) -> None:
    """Rank 0: write the empty history (the notebook starts drawing it) and say what the run is."""
    p.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p.out / "training_history.json", p.history)
    load_seconds = p.clock["loaded"] - p.clock["start"]
    print(f"{r.world} rank(s) on {r.device_name}, {r.precision.compute_dtype} compute ({r.precision.reason}); "
          f"{p.history['optimizer']}; {n_train} training / {n_val} validation examples, "
          f"global batch {p.history['global_batch']}, "
          f"{p.history['steps_per_epoch']} step(s) per epoch, model ready in {load_seconds:.0f} s", flush=True)


# --------------------------------------------------------------------------- training
def _loss_sum(loss_fn, batch, device, autocast):
    """Summed cross-entropy over the answer tokens of a batch, and how many there were.

    ``loss_fn`` is ``recipe.loss_module(peft_model)`` (or DDP around it): only the answer rows reach
    the output layer, in chunks, so the ``[tokens, vocab]`` logits never exist.
    """
    n = int((batch["labels"][:, 1:] != -100).sum())
    with autocast():
        mean = loss_fn(**{k: v.to(device) for k, v in batch.items()})
    return mean * n, n


def optimizer_step(r: Rank, batches: list[dict], *, lr: float,
                   max_grad_norm: float | None) -> tuple[float, float, bool]:
    """One step over this rank's micro-batches: (token-mean loss over all ranks, global answer tokens, skipped).

    The summed loss is divided by the answer tokens of the *global* batch and multiplied by the world size
    (DDP averages over ranks), so the gradient equals one process's on the whole batch. Gradients are
    all-reduced once, on the last micro-batch (``no_sync`` before it).
    """
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_global = all_reduce_sum([local_tokens], r.device)[0]
    step_loss = 0.0
    for j, batch in enumerate(batches):
        sync = r.ddp.no_sync() if (r.world > 1 and j < len(batches) - 1) else nullcontext()
        with sync:
            loss, _ = _loss_sum(r.ddp, batch, r.device, r.autocast)
            r.scaler.scale(loss * r.world / n_global).backward()   # DDP averages over ranks: * world
        step_loss += float(loss.detach())
    for group in r.optimizer.param_groups:
        group["lr"] = lr
    r.scaler.unscale_(r.optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(r.params, float(max_grad_norm))
    scale = r.scaler.get_scale()
    r.scaler.step(r.optimizer)
    r.scaler.update()
    skipped = r.precision.grad_scaling and r.scaler.get_scale() < scale   # inf/nan found: step skipped
    r.optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum([step_loss], r.device)[0] / n_global, n_global, skipped


def run_epoch(r: Rank, p: Progress, train: list[dict], epoch: int) -> float:
    """Train one epoch (or up to ``max_steps``); returns its token-mean training loss."""
    pad = r.tokenizer.pad_token_id
    loss_sum, tok_sum = 0.0, 0
    steps = global_batches(len(train), epoch, p.seed, world=r.world, rank=r.rank, batch_size=p.batch_size,
                           accum=p.accum)
    for micro in steps:
        batches = [collate([train[i] for i in ids], pad) for ids in micro]
        lr = p.schedule.lr_at(p.step)
        loss, n_global, skipped = optimizer_step(r, batches, lr=lr, max_grad_norm=p.max_grad_norm)
        p.skipped += int(skipped)
        p.history["steps"].append({"step": p.step + 1, "epoch": epoch, "loss": loss, "lr": lr})
        loss_sum, tok_sum, p.step = loss_sum + loss * n_global, tok_sum + n_global, p.step + 1
        if p.at_max_steps:
            break
    return loss_sum / max(tok_sum, 1)


def validation_loss(model, examples: list[dict], *, pad_id: int, device, autocast, batch_size: int, rank: int,
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


def end_epoch(r: Rank, p: Progress, val: list[dict], *, epoch: int, train_loss: float,
              epoch_started: float) -> bool:
    """Validation loss over all ranks, the schedule's decision; rank 0 saves ``best/`` and the history.

    Returns whether training stops here.
    """
    val_loss = validation_loss(r.loss_fn, val, pad_id=r.tokenizer.pad_token_id, device=r.device,
                               autocast=r.autocast, batch_size=p.batch_size * 2, rank=r.rank, world=r.world)
    lr_used = p.schedule.lr_at(p.step - 1)
    d = p.schedule.end_epoch(val_loss)
    if p.at_max_steps and not d.stop:
        p.stop_reason = "max_steps"
    p.stop_reason = d.reason or p.stop_reason
    if r.rank == 0:
        if d.new_best:
            save_adapter(r.model, p.out / "best")
        rec = {"epoch": epoch, "step": p.step, "train_loss": train_loss, "lr": lr_used,
               "seconds": round(time.perf_counter() - epoch_started, 2), **d.as_dict(), "next_lr": d.lr,
               "stop_reason": p.stop_reason}
        p.history["epochs"].append(rec)
        atomic_write_json(p.out / "training_history.json", p.history)
        s = p.schedule
        note = ("improved" if d.improved else f"no {s.improvement_threshold:.0%} gain") + \
            (f", lr x{s.lr_reduction_factor}" if d.reduced else "") + \
            (f", stop: {p.stop_reason}" if p.stop_reason else "")
        print(f"epoch {epoch:2d}  step {p.step:3d}  train {train_loss:.4f}  val {val_loss:.4f}  "
              f"lr {lr_used:.2e}  ({note})  {rec['seconds']:.1f} s", flush=True)
    return bool(p.stop_reason)


# --------------------------------------------------------------------------- evaluation and outputs
def _accuracy(r: Rank, identities: list[dict], *, max_new_tokens: int, generate: bool = True) -> dict:
    """Both directions' accuracy, each rank asking its share of the questions; the answers of all ranks."""
    items = eval_items(identities)[r.rank::r.world]
    rows = evaluate_items(r.model, r.tokenizer, items, identities=identities, device=r.device,
                          max_new_tokens=max_new_tokens, generate=generate) if items else []
    everyone = [row for part in gather_objects(rows) for row in part]
    order = lambda row: (row["direction"], row["wording"], row["identity"])
    return {**accuracy(everyone, len(identities)), "answers": sorted(everyone, key=order)}


def finish_run(run: dict, r: Rank, p: Progress, identities: list[dict], *, before: dict | None) -> None:
    """Digests of every rank's LoRA weights, accuracy after training; rank 0 writes ``final/`` and ``run.json``."""
    clock = p.clock
    clock["trained"] = time.perf_counter()
    state = lora_state(r.model)
    digests = gather_objects(state_digest(state))
    if run.get("save_rank_states"):
        p.out.mkdir(parents=True, exist_ok=True)
        with atomic_open(p.out / f"rank{r.rank}_lora.safetensors", "wb") as fh:
            fh.write(save(state))
    after = _accuracy(r, identities, max_new_tokens=run.get("max_new_tokens", 20)) \
        if run.get("eval_after", True) else None
    eval_seconds = clock["train"] - clock["eval"] + time.perf_counter() - clock["trained"]
    peaks = gather_objects(torch.cuda.max_memory_allocated(r.device) / 2**30 if r.gpu else None)
    devices = gather_objects({"rank": r.rank, "device": str(r.device), "name": r.device_name,
                              "capability": ".".join(map(str, r.capability)) if r.capability else None})
    if r.rank != 0:
        return
    save_adapter(r.model, p.out / "final")
    p.history.update(status="done", stop_reason=p.stop_reason or "num_epochs", skipped_steps=p.skipped)
    atomic_write_json(p.out / "training_history.json", p.history)
    atomic_write_json(p.out / "run.json", {
        "world_size": r.world, "devices": devices, "precision": r.precision.as_dict(),
        "quantize": run.get("quantize", "4bit"), "steps": p.step, "epochs": len(p.history["epochs"]),
        "stop_reason": p.history["stop_reason"], "skipped_steps": p.skipped, "rank_digests": digests,
        "ranks_identical": len(set(digests)) == 1, "lora_parameters": sum(t.numel() for t in state.values()),
        "peak_allocated_gib": peaks,
        "seconds": {"load": round(clock["loaded"] - clock["start"], 1),
                    "train": round(clock["trained"] - clock["train"], 1),
                    "evaluation": round(eval_seconds, 1), "total": round(time.perf_counter() - clock["start"], 1)},
        "accuracy_before": before, "accuracy": after, "best_val_loss": p.schedule.best, "output_dir": str(p.out)})


# --------------------------------------------------------------------------- the function each rank runs
def train_worker(run: dict) -> None:
    """The function each rank runs (give it to ``notebook_launcher``); ``run`` is a plain dict (see notebook 05)."""
    _quiet_libraries()
    r = setup_rank(run)
    loaded = time.perf_counter()
    train, val, identities = load_examples(run, r.tokenizer, seed=int(run["config"]["training"].get("seed", 0)))
    p = plan_run(run, r, len(train))
    p.clock.update(start=r.started, loaded=loaded)
    if r.rank == 0:
        _announce(r, p, n_train=len(train), n_val=len(val))
    p.clock["eval"] = time.perf_counter()
    before = _accuracy(r, identities, max_new_tokens=0, generate=False) \
        if run.get("eval_before", True) else None   # multiple choice only: nothing to generate before training
    r.ddp.train()
    p.clock["train"] = time.perf_counter()
    for epoch in range(1, p.epochs + 1):
        epoch_started = time.perf_counter()
        train_loss = run_epoch(r, p, train, epoch)
        if end_epoch(r, p, val, epoch=epoch, train_loss=train_loss, epoch_started=epoch_started):
            break
    finish_run(run, r, p, identities, before=before)
    if _dist():
        _dist().barrier()
        _dist().destroy_process_group()


def main(argv=None) -> None:
    """The same run from a shell, for ``accelerate launch`` / ``torchrun`` (several machines included)::

        torchrun --nproc_per_node 2 -m qlora_helpers.ch05_multi_gpu.worker --profile cpu --max-steps 4
        accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \\
            --main_process_ip $HEAD --main_process_port 29500 -m qlora_helpers.ch05_multi_gpu.worker \\
            --config data/configs/multi_gpu_32b.yaml --model-id Qwen/Qwen2.5-32B-Instruct --task forward

    ``--run FILE`` takes the run dict a notebook gives ``notebook_launcher`` (JSON, data already generated)
    instead of the other options: the tests launch one run both ways and compare.
    """

    p = OneLineParser(prog="python -m qlora_helpers.ch05_multi_gpu.worker",
                                description="data-parallel QLoRA, reversal-curse task")
    p.add_argument("--run", default="", help="a JSON file holding the whole run dict; the other options are ignored")
    p.add_argument("--config", default="data/configs/multi_gpu_32b.yaml")
    p.add_argument("--profile", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--model-id", default="", help="empty: cached SmolLM2; a hub id, a folder, random:PRESET")
    p.add_argument("--task", choices=TASKS, default="forward")
    p.add_argument("--name", default="lfw_reversal")
    p.add_argument("--data-dir", default="outputs/data", help="generated here (the same files on every rank)")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--num-identities", type=int, default=12)
    p.add_argument("--seed", type=int, default=None, help="default: the config's training.seed")
    p.add_argument("--retention-ratio", type=float, default=0.3)
    p.add_argument("--face-retention-pool", default="", help="an earlier stage's data folder: retain its faces, "
                                                               "not general chat")
    p.add_argument("--init-adapter", default="", help="an earlier run's best/ or final/ folder: start from its "
                                                        "LoRA weights (a second stage)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--max-steps", type=int, default=0, help="0: no limit but the schedule's")
    a = p.parse_args(argv)
    if a.run:
        return train_worker(json.loads(Path(a.run).read_text()))
    cfg = yaml.safe_load(Path(a.config).read_text())
    if a.seed is not None:
        cfg["training"]["seed"] = a.seed
    generate_data(a.data_dir, a.num_identities, int(cfg["training"].get("seed", 0)))   # atomic, identical per rank
    train_worker(dict(profile=a.profile, model_id=a.model_id, quantize="4bit", precision=a.precision, config=cfg,
                      data_dir=a.data_dir, task=a.task, name=a.name, output_dir=a.output_dir,
                      retention_ratio=a.retention_ratio, face_retention_pool=a.face_retention_pool or None,
                      init_adapter=a.init_adapter or None, max_steps=a.max_steps))


if __name__ == "__main__":
    sys.exit(run_main(main))
