"""The ``vlm`` command's training loop: batch 1 x accumulation, validation, best/final adapters, resume.

One optimizer step is chapter 03's ``optimizer_step`` (``gradient_accumulation_steps`` examples of
one image-conversation each, each loss divided before ``backward``); checkpoints are chapter 03's
too (trainable weights, optimizer, scheduler, random generators and history, renamed into place,
then named in ``checkpoints/latest``). Example ``i`` of the run depends only on ``(seed, i)``, so
``resume=True`` continues the same loss curve.

What the output folder holds::

    best/                    the adapter with the lowest validation loss so far (peft format)
    final/                   the adapter after the last step
    checkpoints/step-NNNNNN  for --resume
    training_history.json    train loss per step, validation loss per evaluation, the best step

``best`` and ``final`` are replaced whole (``files.atomic_folder``): ``PeftModel.from_pretrained``
never sees half an adapter.
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import bitsandbytes as bnb
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from qlora_helpers.ch03_sft.data import batch_order
from qlora_helpers.ch03_sft.loop import (
    clean_partial_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    optimizer_step,
    save_checkpoint,
    trainable_parameters,
)
from qlora_helpers.ch03_sft.recipe import causal_lm_loss
from qlora_helpers.ch04_vlm.encode import answer_tokens
from qlora_helpers.common.files import atomic_folder, atomic_write_json

HISTORY = "training_history.json"


def make_optimizer(model, run, device: str):
    """AdamW over LoRA (``learning_rate``) and a trained projector (``projector_learning_rate``);
    the paged or 8-bit bitsandbytes kind on CUDA as ``training.optimizer`` says, torch's on the CPU."""
    t = run.settings.training
    params = trainable_parameters(model)
    groups = [{"params": [p for n, p in params.items() if "lora_" in n], "lr": t.learning_rate},
              {"params": [p for n, p in params.items() if "lora_" not in n], "lr": t.projector_learning_rate}]
    groups = [g for g in groups if g["params"]]
    if not device.startswith("cuda") or t.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=0.0)
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[t.optimizer]
    return cls(groups, weight_decay=0.0)


def _to(example: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in example.items()}


def evaluate(model, examples: list, device: str) -> float:
    """Mean cross-entropy over every answer token of ``examples`` (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            n = answer_tokens(example)
            total += float(causal_lm_loss(model, _to(example, device))) * n
            count += n
    model.train()
    return total / max(count, 1)


class Examples:
    """Micro-batch ``i`` of the run (one example), on ``device``: epoch after epoch, each reshuffled by the seed."""

    def __init__(self, examples: list, accumulation: int, seed: int, device: str):
        self.examples, self.accumulation, self.seed, self.device = examples, accumulation, seed, device
        self.orders: dict[int, list] = {}   # the current epoch's shuffle, drawn once per epoch

    def __getitem__(self, index: int) -> tuple[dict, int]:
        epoch, j = divmod(index, len(self.examples))
        if epoch not in self.orders:
            self.orders = {epoch: batch_order(len(self.examples), 1, seed=self.seed, epoch=epoch)}
        example = self.examples[self.orders[epoch][j][0]]
        return _to(example, self.device), answer_tokens(example)

    def of_step(self, step: int):
        return (self[step * self.accumulation + m] for m in range(self.accumulation))


def _save_adapter(model, folder) -> None:
    atomic_folder(folder, lambda tmp: model.save_pretrained(tmp))


def _start(model, run, out, *, optimizer, scheduler, fingerprint: dict) -> tuple[int, dict]:
    """The step to start from and the history: a checkpoint's when resuming, else step 0's."""
    if run.resume:
        clean_partial_checkpoints(out)
        state = load_checkpoint(latest_checkpoint(out), model, optimizer=optimizer, scheduler=scheduler,
                                fingerprint=fingerprint)
        return state["step"], state["history"]
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    return 0, {"train": [], "eval": [], "best": None}


def _validate(model, val: list, history: dict, step: int, out, device: str) -> float:
    """Validation loss at ``step``, kept in the history; a new best adapter is saved."""
    loss = round(evaluate(model, val, device), 6)
    history["eval"].append({"step": step, "val_loss": loss})
    if step > 0 and (history["best"] is None or loss < history["best"]["val_loss"]):
        history["best"] = {"step": step, "val_loss": loss}
        _save_adapter(model, out / "best")
    return loss


def train_vlm(model, train: list, val: list | None, run, *, out, device: str, fingerprint: dict,
              progress: bool = True, callbacks=()) -> dict:
    """Train ``model`` in place for ``run.max_steps`` steps; returns the history (also in ``training_history.json``).

    ``callbacks`` get each step's record (``{"step", "loss", "lr", "tokens", "seconds"}`` and
    ``"val_loss"`` where one was measured).
    """
    t = run.settings.training
    step_settings = SimpleNamespace(gradient_accumulation_steps=t.gradient_accumulation_steps,
                                    max_grad_norm=run.max_grad_norm, bf16=False, fp16=False)
    optimizer = make_optimizer(model, run, device)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=run.max_steps)
    start, history = _start(model, run, out, optimizer=optimizer, scheduler=scheduler, fingerprint=fingerprint)
    if val and start == 0:
        _validate(model, val, history, 0, out, device)
    batches = Examples(train, t.gradient_accumulation_steps, run.seed, device)
    bar = tqdm(total=run.max_steps, initial=start, desc="vlm train", disable=not progress)
    for step in range(start, run.max_steps):
        done, t0 = step + 1, time.perf_counter()
        loss, tokens = optimizer_step(model, batches.of_step(step), step_settings, optimizer=optimizer,
                                      device=device, scheduler=scheduler)
        record = {"step": done, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                  "seconds": round(time.perf_counter() - t0, 3)}
        history["train"].append(record)
        if val and (done == run.max_steps or (run.eval_steps > 0 and done % run.eval_steps == 0)):
            record["val_loss"] = _validate(model, val, history, done, out, device)
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
        if run.save_steps > 0 and done % run.save_steps == 0 and done < run.max_steps:
            save_checkpoint(out, done, model, optimizer=optimizer, scheduler=scheduler,
                            state={"history": history, "fingerprint": fingerprint}, keep=run.save_total_limit)
        atomic_write_json(out / HISTORY, history)
        for callback in callbacks:
            callback(record)
    bar.close()
    _save_adapter(model, out / "final")
    atomic_write_json(out / HISTORY, history)
    return history
