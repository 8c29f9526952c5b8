"""Chapter 05's learning-rate rule on the HF ``Trainer``: ``schedule.PlateauSchedule`` as a callback.

The first step of moving chapter 05 onto the course's ``sft`` command (TRL's ``SFTTrainer``, one process or
``accelerate launch``): the Trainer keeps the warmup (``lr_scheduler_type="constant_with_warmup"``) and
this callback applies the chapter's rule at the end of every epoch, exactly as ``worker.end_epoch`` does:

- the validation loss goes through ``PlateauSchedule.end_epoch`` (its tests are the rule's specification);
- a reduction multiplies the rate of every parameter group, and the scheduler's base rates, by
  ``lr_reduction_factor``, from the next step on;
- a new lowest validation loss saves the adapter to ``best/`` (main process only, swapped in whole);
- a stop (``val_loss < min_val_loss`` or ``lr < min_lr``) ends training there.

Why not the Trainer's own options: ``lr_scheduler_type="reduce_lr_on_plateau"`` has no warmup, clamps at
``min_lr`` instead of stopping, and reads the Trainer's batch-mean ``eval_loss``; ``EarlyStoppingCallback``
measures an absolute threshold and needs ``load_best_model_at_end``; ``save_strategy="best"`` saves whole
checkpoints, not the adapter a reader loads from ``best/``.

``val_loss(model)`` must return the same number in every process (each rank scoring its share of the
validation set and summing over ranks, as ``worker.validation_loss`` does), so that every process takes
the same decision. Importing this module loads transformers' Trainer, and with it peft and bitsandbytes:
a rank imports it, never the notebook's kernel before ``notebook_launcher``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from qlora_helpers.ch05_multi_gpu.schedule import Decision, PlateauSchedule
from qlora_helpers.common.files import atomic_folder


class PlateauCallback(TrainerCallback):
    """``PlateauSchedule``'s decision at each epoch end: lower the rate, save ``best/``, stop.

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

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        decision = self.schedule.end_epoch(self.val_loss(model))
        self.decisions.append(decision)
        if decision.reduced:
            factor = self.schedule.lr_reduction_factor
            for group in optimizer.param_groups:      # the next step's rate
                group["lr"] *= factor
            if lr_scheduler is not None:              # and every rate the scheduler computes after it
                lr_scheduler.base_lrs = [lr * factor for lr in lr_scheduler.base_lrs]
        if decision.new_best and self.best_dir is not None and args.should_save:
            atomic_folder(self.best_dir, model.save_pretrained)
        if decision.stop:
            control.should_training_stop = True
        return control
