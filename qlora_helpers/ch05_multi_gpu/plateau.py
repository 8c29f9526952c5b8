"""Chapter 05's learning-rate rule (``schedule.PlateauSchedule``) on the HF ``Trainer``, as a callback.

The Trainer keeps the warmup (``lr_scheduler_type="constant_with_warmup"``); at every epoch end
``PlateauCallback`` gives the validation loss to ``PlateauSchedule.end_epoch``, multiplies the rate of every
parameter group and the scheduler's base rates by ``lr_reduction_factor`` on a reduction, saves the adapter
to ``best/`` on a new lowest loss (main process, swapped in whole) and ends training on a stop.

Why not the Trainer's own options: ``lr_scheduler_type="reduce_lr_on_plateau"`` has no warmup, clamps at
``min_lr`` instead of stopping, and reads the Trainer's batch-mean ``eval_loss``; ``EarlyStoppingCallback``
measures an absolute threshold and needs ``load_best_model_at_end``; ``save_strategy="best"`` saves whole
checkpoints, not the adapter a reader loads from ``best/``.

``val_loss(model)`` must return the same number in every process (``worker.validation_loss``: each rank
scores its share, the sums are all-reduced), so every process decides alike. This module loads the
Trainer, and with it peft and bitsandbytes: a rank imports it, never the kernel before ``notebook_launcher``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from qlora_helpers.ch05_multi_gpu.schedule import Decision, PlateauSchedule
from qlora_helpers.common.files import atomic_folder, atomic_write_json

RESUMED = ("lr", "reference", "best", "bad_epochs", "epoch")   # what a checkpoint keeps of the rule


class PlateauCallback(TrainerCallback, ExportableState):
    """``PlateauSchedule``'s decision at each epoch end: lower the rate, save ``best/``, stop. The rule's state
    goes into every checkpoint's ``trainer_state.json`` (``ExportableState``) and comes back on a resume; the
    lowered rates come back with the optimizer's and the scheduler's saved states.

    Example:
        >>> rule = PlateauCallback(PlateauSchedule(learning_rate=3e-3, min_lr=1e-4), val_loss,   # doctest: +SKIP
        ...                        best_dir=out / "best")
        >>> SFTTrainer(..., args=SFTConfig(learning_rate=3e-3, lr_scheduler_type="constant_with_warmup",
        ...                                num_train_epochs=20), callbacks=[rule])                # doctest: +SKIP
    """

    def __init__(self, schedule: PlateauSchedule, val_loss: Callable, *, best_dir: str | Path | None = None):
        self.schedule, self.val_loss = schedule, val_loss
        self.best_dir = Path(best_dir) if best_dir else None
        self.decisions: list[Decision] = []

    def state(self) -> dict:
        return {"args": {}, "attributes": {k: getattr(self.schedule, k) for k in RESUMED}}

    def on_train_begin(self, args, state, control, **kw):
        saved = state.stateful_callbacks.get(type(self).__name__)   # this callback's own state on a fresh start
        for key, value in (saved.get("attributes", {}) if isinstance(saved, dict) else {}).items():
            setattr(self.schedule, key, value)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        decision = self.schedule.end_epoch(self.val_loss(model))
        self.decisions.append(decision)
        if decision.reduced:
            factor = self.schedule.lr_reduction_factor
            for group in optimizer.param_groups:      # the next step's rate
                group["lr"] *= factor
            if lr_scheduler is not None:              # and every rate the scheduler computes after it
                lr_scheduler.base_lrs = [lr * factor for lr in lr_scheduler.base_lrs]
                # get_last_lr(), the rate the Trainer logs for the next step, is read before the scheduler
                # steps again: without this the first step after a halving logs the old rate
                lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if decision.new_best and self.best_dir is not None and args.should_save:
            atomic_folder(self.best_dir, model.save_pretrained)
        if decision.stop:
            control.should_training_stop = True
        return control


class RunRecord(PlateauCallback):
    """The rule, and the run's record: every step's loss and rate and every epoch's decision in ``history``,
    written to ``out/training_history.json`` by the main process after each epoch (the notebook draws it while
    the ranks train); the steps the fp16 loss scaler skipped; ``before(model)`` once, before the first step."""

    def __init__(self, schedule: PlateauSchedule, val_loss: Callable, *, out: Path, history: dict,
                 before: Callable | None = None):
        super().__init__(schedule, val_loss, best_dir=Path(out) / "best")
        self.out, self.history, self.before = Path(out), history, before
        self.before_result, self.skipped, self.clock = None, 0, {}

    def write(self, state) -> None:
        if state.is_world_process_zero:
            atomic_write_json(self.out / "training_history.json", self.history)

    def on_train_begin(self, args, state, control, model=None, **kw):
        super().on_train_begin(args, state, control, **kw)
        started = time.perf_counter()
        self.before_result = self.before(model) if self.before else None
        self.clock.update(before=time.perf_counter() - started, train=time.perf_counter(), epoch=time.perf_counter())
        self.write(state)

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        self.skipped += int(bool(getattr(optimizer, "step_was_skipped", False)))

    def on_log(self, args, state, control, logs=None, **kw):
        if "loss" in (logs or {}):
            self.history["steps"].append({"step": state.global_step, "epoch": len(self.decisions) + 1,
                                          "loss": float(logs["loss"]), "lr": float(logs["learning_rate"])})

    def on_epoch_end(self, args, state, control, **kw):
        steps = [s for s in self.history["steps"] if s["epoch"] == len(self.decisions) + 1]
        control = super().on_epoch_end(args, state, control, **kw)
        d = self.decisions[-1]
        at_max = 0 < args.max_steps <= state.global_step
        seconds = round(time.perf_counter() - self.clock["epoch"], 2)
        record = {**asdict(d), "step": state.global_step, "train_loss": sum(s["loss"] for s in steps) / len(steps),
                  "lr": steps[-1]["lr"], "next_lr": d.lr, "seconds": seconds,
                  "stop_reason": d.reason or ("max_steps" if at_max else None)}
        self.history["epochs"].append(record)
        self.clock["epoch"] = time.perf_counter()
        self.write(state)
        if state.is_world_process_zero:
            s = self.schedule
            note = ("improved" if d.improved else f"no {s.improvement_threshold:.0%} gain") + \
                (f", next epoch's lr x{s.lr_reduction_factor}" if d.reduced else "") + \
                (f", stop: {record['stop_reason']}" if record["stop_reason"] else "")
            print(f"epoch {d.epoch:2d}  step {state.global_step:3d}  train {record['train_loss']:.4f}  "
                  f"val {d.val_loss:.4f}  lr {record['lr']:.2e}  ({note})  {record['seconds']:.1f} s", flush=True)
        return control
