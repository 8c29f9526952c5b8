"""A small training loop you can read in one sitting, with checkpoints that survive ``kill -9``.

What one optimizer step does (``optimizer_step``)::

    for each of gradient_accumulation_steps micro-batches:
        loss = causal_lm_loss(model, batch) / gradient_accumulation_steps   # = model(**batch).loss
        loss.backward()                     # gradients reach only trainable parameters
    clip_grad_norm_(trainable, max_grad_norm); optimizer.step(); scheduler.step(); zero_grad()

Checkpoints (``output_dir/checkpoints/step-000040/``) hold the trainable weights, the optimizer
and scheduler state, the random-number generators and the loss history. Each is written into a
temporary folder first, renamed into place with ``os.replace`` and only *then* named in the
``checkpoints/latest`` file (itself replaced atomically). A run killed at any instant leaves
``latest`` pointing at a complete checkpoint, and ``resume=True`` continues from it with the
same data order and dropout masks, so the result matches an uninterrupted run.

``cfg`` is any object with the training fields of ``qlora_helpers.ch03_sft.command.SFTConfig``.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from qlora_helpers.ch03_sft.data import SFTData, batch_order, collate
from qlora_helpers.ch03_sft.modes import trainable_4bit_layers
from qlora_helpers.ch03_sft.recipe import causal_lm_loss
from qlora_helpers.common.files import atomic_write_json, atomic_write_text, remove_folder, remove_leftovers
from qlora_helpers.common.widgets import LiveFigure

CHECKPOINTS = "checkpoints"
LATEST = "latest"


# --------------------------------------------------------------------------- pieces of a step
def trainable_parameters(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters; weight decay only on matrices (not biases or norms)."""

    params = list(trainable_parameters(model).values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate)

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optim]
    return cls(groups, lr=cfg.learning_rate)


def tensor_bytes(model) -> int:
    """Bytes held by a model's parameters and buffers as stored (a 4-bit weight counts its packed bytes)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():  # 4-bit block scales live beside the weight, not in a parameter
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def total_steps(cfg, n_examples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / cfg.per_device_train_batch_size)
    return max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))


def autocast(cfg, device: str):
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def evaluate(model, data: SFTData, batch_size: int, pad_id: int, device: str, cfg=None) -> float:
    """Mean cross-entropy over every assistant token of ``data`` (token-weighted, not batch-weighted)."""

    was_training = model.training
    model.eval()
    order = sorted(range(len(data.examples)), key=lambda i: len(data.examples[i].input_ids))
    total, count = 0.0, 0
    with torch.no_grad(), (autocast(cfg, device) if cfg else nullcontext()):
        for start in range(0, len(order), batch_size):
            batch = collate([data.examples[i] for i in order[start:start + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(causal_lm_loss(model, batch)) * n
                count += n
    model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or ``None``."""
    pointer = Path(output_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def save_checkpoint(output_dir, step: int, model, *, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    """Write a complete checkpoint, then point ``latest`` at it, then prune old ones (never the latest)."""

    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    weights = {k: p.detach().to("cpu").contiguous() for k, p in trainable_parameters(model).items()}
    save_file(weights, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
               tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", {**state, "step": step})
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = root / name
    remove_folder(final)           # a same-step checkpoint a killed run saved but never named latest
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            remove_folder(old)     # hidden by one rename first: a kill mid-delete leaves no half checkpoint
    return final


def check_fingerprint(path: Path, fingerprint: dict | None) -> dict:
    """The checkpoint's state; refuses one written with other settings than ``fingerprint``."""
    state = json.loads((Path(path) / "state.json").read_text())
    for key, value in (fingerprint or {}).items():
        old = state.get("fingerprint", {}).get(key)
        if old != value:
            raise ValueError(f"{path} was written with {key}={old!r}, this run has {key}={value!r}: "
                             "resume with the settings of the interrupted run")
    return state


def load_checkpoint(path: Path, model, *, optimizer, scheduler, fingerprint: dict | None = None) -> dict:
    """Restore a checkpoint into model, optimizer, scheduler and RNGs; refuses one written with other settings."""

    state = check_fingerprint(path, fingerprint)
    weights = load_file(path / "trainable.safetensors")
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(weights))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (first: {missing[0]}); "
                         "resume with the same mode and LoRA settings it was written with")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return state


def clean_partial_checkpoints(output_dir) -> int:
    """Remove what a killed run left behind: ``.tmp-*`` saves never named ``latest``, old checkpoints mid-removal."""
    root = Path(output_dir) / CHECKPOINTS
    return remove_leftovers(root, ".tmp-*") + remove_leftovers(root)


# --------------------------------------------------------------------------- one optimizer step
def optimizer_step(model, micro_batches, cfg, *, optimizer, device: str, scheduler=None, scaler=None) -> tuple:
    """One optimizer step over ``micro_batches``, an iterable of ``(batch, real tokens)`` pairs.

    Each micro-batch's loss is divided by ``cfg.gradient_accumulation_steps`` before ``backward``, so the
    gradients add up to those of one batch that large. Returns the step's loss (the sum of those divided
    losses) and the real tokens it saw. ``scaler``: fp16's ``GradScaler``; ``scheduler``: stepped after.
    """
    loss_sum, tokens = 0.0, 0
    for batch, n_tokens in micro_batches:
        tokens += n_tokens
        with autocast(cfg, device):
            loss = causal_lm_loss(model, batch) / cfg.gradient_accumulation_steps
        (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += float(loss.detach())
    if scaler:
        scaler.unscale_(optimizer)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(trainable_parameters(model).values()), cfg.max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return loss_sum, tokens


class MicroBatches:
    """The micro-batches of a run, on ``device``: epoch after epoch, each in ``batch_order``'s shuffle.

    Micro-batch ``i`` depends only on ``(cfg.seed, i)``, so a resumed run sees what the interrupted one would have.
    """

    def __init__(self, data: SFTData, cfg, pad_id: int, device: str):
        self.data, self.cfg, self.pad_id, self.device = data, cfg, pad_id, device
        self.per_epoch = math.ceil(len(data.examples) / cfg.per_device_train_batch_size)
        self.orders: dict[int, list] = {}

    def __getitem__(self, index: int) -> tuple[dict, int]:
        """The batch on ``device``, and its real tokens (padding not counted)."""
        epoch, j = divmod(index, self.per_epoch)
        if epoch not in self.orders:
            self.orders.clear()
            self.orders[epoch] = batch_order(len(self.data.examples), self.cfg.per_device_train_batch_size,
                                             seed=self.cfg.seed, epoch=epoch)
        examples = [self.data.examples[i] for i in self.orders[epoch][j]]
        batch = {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}
        return batch, sum(len(ex.input_ids) for ex in examples)

    def of_step(self, step: int):
        """The micro-batches of optimizer step ``step``, loaded one at a time as they are used."""
        accum = self.cfg.gradient_accumulation_steps
        return (self[step * accum + micro] for micro in range(accum))


# --------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """What one training run carries from step to step."""

    model: object
    cfg: object
    output_dir: object
    pad_id: int
    device: str
    steps: int
    optimizer: object
    scheduler: object
    scaler: object = None
    eval_data: SFTData | None = None
    callbacks: tuple = ()
    fingerprint: dict | None = None
    history: dict = field(default_factory=lambda: {"train": [], "eval": []})
    step_times: list = field(default_factory=list)

    def log(self, record: dict) -> None:
        for cb in self.callbacks:
            cb(record)

    def eval_loss(self, step: int) -> float:
        """The eval loss now, kept in the history at ``step``."""
        loss = evaluate(self.model, self.eval_data, self.cfg.per_device_eval_batch_size, self.pad_id, self.device,
                        self.cfg)
        self.history["eval"].append({"step": step, "eval_loss": loss})
        return loss


def train(model, data: SFTData, cfg, *, output_dir, pad_id: int, device: str, eval_data: SFTData | None = None,
          resume: bool = False, callbacks=(), progress: bool = True, fingerprint: dict | None = None,
          initial_eval: float | None = None) -> dict:
    """Train ``model`` in place; returns the loss history, step times and the final eval loss.

    ``callbacks`` are called with each log record (``{"step", "loss", "lr"}`` and, at eval
    points, ``"eval_loss"``); ``LiveLossPlot`` is one. ``fingerprint`` (the settings that must
    not change across a resume) is stored in each checkpoint and checked on resume.
    ``initial_eval``, the eval loss before training, is kept in the history as step 0.
    """
    with trainable_4bit_layers(model):
        steps = total_steps(cfg, len(data.examples))
        optimizer = make_optimizer(model, cfg)
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=steps)
        run = _Run(model, cfg, output_dir, pad_id, device, steps, optimizer, scheduler,
                   scaler=torch.amp.GradScaler("cuda") if cfg.fp16 else None, eval_data=eval_data,
                   callbacks=callbacks, fingerprint=fingerprint)
        start = _resume_or_seed(run, resume=resume, initial_eval=initial_eval)
        model.train()
        batches = MicroBatches(data, cfg, pad_id, device)
        bar = tqdm(total=steps, initial=start, desc="train", disable=not progress, leave=True)
        for step in range(start, steps):
            _train_step(run, batches, step, bar)
        bar.close()
        final_eval = None
        if eval_data is not None:
            final_eval = run.eval_loss(steps)
            run.log({"step": steps, "eval_loss": final_eval})
        model.eval()
        return _result(run, start, final_eval)


def _resume_or_seed(run: _Run, *, resume: bool, initial_eval: float | None) -> int:
    """The first step: the one ``checkpoints/latest`` reached (its weights, optimizer, RNGs and history
    restored) when resuming, else 0, with the seeds set and ``initial_eval`` kept and logged as step 0."""
    if resume:
        clean_partial_checkpoints(run.output_dir)
        ckpt = latest_checkpoint(run.output_dir)
        if ckpt is None:
            raise ValueError(f"nothing to resume in {run.output_dir}: no {CHECKPOINTS}/{LATEST}; drop --resume")
        state = load_checkpoint(ckpt, run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                fingerprint=run.fingerprint)
        run.history = state["history"]
        return state["step"]
    torch.manual_seed(run.cfg.seed)
    random.seed(run.cfg.seed)
    if initial_eval is not None:
        run.history["eval"].append({"step": 0, "eval_loss": initial_eval})
        run.log({"step": 0, "eval_loss": initial_eval})
    return 0


def _train_step(run: _Run, batches: MicroBatches, step: int, bar) -> None:
    """Optimizer step ``step``, then its record: history, eval loss and checkpoint when due, callbacks."""
    cfg, done = run.cfg, step + 1
    t0 = time.perf_counter()
    loss, tokens = optimizer_step(run.model, batches.of_step(step), cfg, optimizer=run.optimizer, device=run.device,
                                  scheduler=run.scheduler, scaler=run.scaler)
    run.step_times.append(time.perf_counter() - t0)
    record = {"step": done, "loss": round(loss, 5), "lr": run.scheduler.get_last_lr()[0], "tokens": tokens,
              "seconds": round(run.step_times[-1], 4)}
    run.history["train"].append(record)
    if run.eval_data is not None and cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done < run.steps:
        record["eval_loss"] = run.eval_loss(done)
    bar.set_postfix(loss=f"{loss:.3f}")
    bar.update(1)
    if done % max(cfg.logging_steps, 1) == 0 or "eval_loss" in record or done == run.steps:
        run.log(record)
    if cfg.save_steps > 0 and done % cfg.save_steps == 0 and done < run.steps:
        save_checkpoint(run.output_dir, done, run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        state={"history": run.history, "fingerprint": run.fingerprint or {}},
                        keep=cfg.save_total_limit)


def _result(run: _Run, start: int, final_eval: float | None) -> dict:
    """What ``train`` returns: steps, history, final eval loss, bytes of gradients and AdamW state, speed."""
    timed = run.step_times[1:] or run.step_times  # the first step pays one-off warm-up costs
    trainable = trainable_parameters(run.model).values()
    state_bytes = {"grads": sum(p.numel() * p.element_size() for p in trainable),
                   "optimizer": sum(t.numel() * t.element_size() for st in run.optimizer.state.values()
                                    for t in st.values() if torch.is_tensor(t))}
    history = run.history
    return {"steps": run.steps, "resumed_from": start, "history": history, "eval_loss": final_eval,
            "state_bytes": state_bytes,
            "step_seconds": sum(timed) / len(timed) if timed else None,
            "tokens_per_second": (sum(r["tokens"] for r in history["train"][-len(timed):]) / sum(timed))
            if timed else None}


class LiveLossPlot:
    """A callback that redraws the training and eval loss in the notebook as steps finish.

    Example:
        >>> plot = LiveLossPlot("LoRA")                      # doctest: +SKIP
        >>> run_sft(cfg, callbacks=[plot])                   # doctest: +SKIP
    """

    def __init__(self, title: str = "", every: int = 1):
        self.title, self.every = title, every
        self.steps, self.losses, self.eval_steps, self.eval_losses = [], [], [], []
        self._figure = LiveFigure()

    def __call__(self, record: dict) -> None:
        if "loss" in record:
            self.steps.append(record["step"])
            self.losses.append(record["loss"])
        if "eval_loss" in record:
            self.eval_steps.append(record["step"])
            self.eval_losses.append(record["eval_loss"])
        if len(self.steps) % self.every == 0 or "eval_loss" in record:
            self.draw()

    def draw(self):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(self.steps, self.losses, label="train loss (batch)")
        if self.eval_steps:
            ax.plot(self.eval_steps, self.eval_losses, "o-", label="eval loss (validation)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy")
        ax.set_title(self.title)
        ax.legend()
        fig.tight_layout()
        self._figure.show(fig)     # redrawn in place, in a cell or under a panel's button alike
        plt.close(fig)
