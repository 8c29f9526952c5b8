"""Learning rate by epochs: warm up, halve on a plateau of the validation loss, stop early.

The rule chapter 05 trains with, in the order it is applied at the end of every epoch:

1. the epoch *improved* when its validation loss is below the reference loss by more than
   ``improvement_threshold`` (relative: 0.05 means at least 5 % lower). The first epoch always
   improves; the reference moves only on an improvement, so three epochs 2 % apart add up to one;
2. after ``lr_patience`` epochs in a row without improvement the learning rate is multiplied by
   ``lr_reduction_factor`` (0.5: halved) and the count starts again;
3. training stops when the validation loss is below ``min_val_loss`` (good enough), or when the
   learning rate has fallen below ``min_lr`` (the plateau outlasted every reduction).

Before it the Trainer warms the rate up (``constant_with_warmup``) for ``warmup_steps``; ``plateau.PlateauCallback``
applies the rule on the Trainer. No torch here: the rule is plain arithmetic, tested on scripted loss sequences.

Example (the config of chapter 05: 1e-4, halve after 1 flat epoch, stop below 6e-5):
    >>> s = PlateauSchedule(learning_rate=1e-4, min_lr=6e-5, lr_reduction_factor=0.5,
    ...                     lr_patience=1, improvement_threshold=0.05, min_val_loss=0.2)
    >>> [(d.improved, d.lr, d.reason) for d in map(s.end_epoch, [2.0, 1.5, 1.48])]
    [(True, 0.0001, None), (True, 0.0001, None), (False, 5e-05, 'lr < min_lr')]
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

from IPython.display import display
from matplotlib.figure import Figure

KEYS = ("learning_rate", "min_lr", "lr_reduction_factor", "lr_patience", "improvement_threshold", "min_val_loss")


@dataclass
class Decision:
    """What the end of one epoch decided."""
    epoch: int
    val_loss: float
    improved: bool        # beat the reference by more than the threshold
    new_best: bool        # lowest validation loss so far (save the ``best/`` adapter)
    bad_epochs: int       # epochs in a row without improvement, after this one (0 after a reduction)
    reduced: bool         # the learning rate was just multiplied by the factor
    lr: float             # the learning rate for the next epoch
    stop: bool
    reason: str | None    # "val_loss < min_val_loss", "lr < min_lr" or None


@dataclass
class PlateauSchedule:
    learning_rate: float
    min_lr: float = 0.0
    lr_reduction_factor: float = 0.5
    lr_patience: int = 1
    improvement_threshold: float = 0.0
    min_val_loss: float = 0.0
    warmup_steps: int = 0
    lr: float = field(init=False)
    reference: float = field(init=False, default=math.inf)   # the loss an improvement is measured from
    best: float = field(init=False, default=math.inf)        # lowest validation loss seen
    bad_epochs: int = field(init=False, default=0)
    epoch: int = field(init=False, default=0)

    def __post_init__(self):
        checks = [("learning_rate", self.learning_rate > 0, "a positive number such as 1e-4"),
                  ("min_lr", 0 <= self.min_lr < self.learning_rate, "0 or more, and below learning_rate"),
                  ("lr_reduction_factor", 0 < self.lr_reduction_factor < 1, "between 0 and 1, e.g. 0.5"),
                  ("lr_patience", isinstance(self.lr_patience, int) and self.lr_patience >= 1, "a whole number >= 1"),
                  ("improvement_threshold", 0 <= self.improvement_threshold < 1, "a fraction in [0, 1), e.g. 0.05"),
                  ("min_val_loss", self.min_val_loss >= 0, "0 or more (0 never stops)"),
                  ("warmup_steps", isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
                   "a whole number >= 0")]
        for name, ok, fix in checks:
            if not ok:
                raise ValueError(f"training.{name} = {getattr(self, name)!r} is not valid: use {fix}")
        self.lr = float(self.learning_rate)

    @classmethod
    def from_config(cls, training: dict, total_steps: int) -> PlateauSchedule:
        """From the ``training:`` section of the YAML config; warmup is ``warmup_ratio`` of ``total_steps``."""
        missing = [k for k in KEYS if k not in training]
        if missing:
            raise ValueError(f"training section lacks {', '.join(missing)}: "
                             "add them (see data/configs/multi_gpu_32b.yaml)")
        values = {k: number(training[k], f"training.{k}") for k in KEYS}
        values["lr_patience"] = int(values["lr_patience"])
        ratio = number(training.get("warmup_ratio", 0.0), "training.warmup_ratio")
        return cls(**values, warmup_steps=warmup_steps(total_steps, ratio))

    def end_epoch(self, val_loss: float) -> Decision:
        """Apply the rule to one epoch's validation loss; returns the decision (see module doc)."""
        self.epoch += 1
        val_loss = float(val_loss)
        finite = math.isfinite(val_loss)
        improved = finite and val_loss < self.reference * (1 - self.improvement_threshold)
        new_best = finite and val_loss < self.best
        if new_best:
            self.best = val_loss
        if improved:
            self.reference = val_loss
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        reduced = self.bad_epochs >= self.lr_patience
        if reduced:
            self.lr *= self.lr_reduction_factor
            self.bad_epochs = 0
        reason = None
        if finite and val_loss < self.min_val_loss:
            reason = "val_loss < min_val_loss"
        elif self.lr < self.min_lr:
            reason = "lr < min_lr"
        return Decision(self.epoch, val_loss, improved, new_best, self.bad_epochs, reduced, self.lr,
                        reason is not None, reason)


def number(value, where: str = "value") -> float:
    """A config number; PyYAML reads ``1e-4`` (no dot) as the string ``"1e-4"``, so strings are converted.

    >>> number("1e-4"), number(8)
    (0.0001, 8.0)
    """
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} = {value!r} is not a number: write it like 1e-4 or 0.05") from None


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps: ``warmup_ratio`` of the run, rounded up (0 stays 0).

    >>> warmup_steps(1000, 0.02), warmup_steps(10, 0.02), warmup_steps(10, 0.0)
    (20, 1, 0)
    """
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"training.warmup_ratio = {warmup_ratio!r} is not valid: use a fraction in [0, 1), e.g. 0.02")
    return math.ceil(total_steps * warmup_ratio - 1e-9) if warmup_ratio > 0 else 0


# --------------------------------------------------------------------------- the history, drawn
def plot_history(history: dict, fig=None):
    """Loss per step and per epoch (left) and the learning rate (right) of a ``training_history.json``.

    Returns a matplotlib ``Figure`` (made without pyplot, so a background thread may draw it).
    """
    fig = fig or Figure(figsize=(10, 3.4))
    fig.clear()
    ax_loss, ax_lr = fig.subplots(1, 2)
    steps, epochs = history.get("steps", []), history.get("epochs", [])
    if steps:
        ax_loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="0.75", lw=1, label="train (step)")
        ax_lr.plot([s["step"] for s in steps], [s["lr"] for s in steps], color="tab:purple")
    if epochs:
        at = [e["step"] for e in epochs]
        ax_loss.plot(at, [e["train_loss"] for e in epochs], "o-", color="tab:blue", label="train (epoch)")
        ax_loss.plot(at, [e["val_loss"] for e in epochs], "s-", color="tab:orange", label="validation")
        for e in epochs:
            if e["reduced"]:
                ax_lr.axvline(e["step"], color="tab:red", ls=":", lw=1)
    ax_loss.set(xlabel="optimizer step", ylabel="loss (token mean)", title=f"{history.get('task', '')} task: loss")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate (dotted: halved)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if steps or epochs:
        ax_loss.legend(fontsize=8)
    status = history.get("stop_reason") or history.get("status", "")
    fig.suptitle(f"{len(epochs)} epoch(s), {len(steps)} step(s): {status}", fontsize=10)
    fig.tight_layout()
    return fig


class LiveHistory:
    """Redraw ``training_history.json`` every ``every`` seconds while the cell's main thread trains.

    Used as ``with LiveHistory(path): notebook_launcher(...)``: the worker processes write the file
    after every epoch, this kernel's thread reads it and updates one displayed figure in place.
    Until the file appears the thread only sleeps, so the launcher forks while it holds no lock.
    """

    def __init__(self, path, every: float = 2.0):
        self.path, self.every, self.seen = Path(path), every, None
        self.handle = self.fig = self.thread = self.stop = None

    def update(self) -> None:
        try:
            stamp = self.path.stat().st_mtime_ns
            if stamp == self.seen:
                return
            history = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return   # not written yet
        self.seen = stamp
        self.fig = plot_history(history, self.fig)
        if self.handle is None:
            self.handle = display(self.fig, display_id=True)
        else:
            self.handle.update(self.fig)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            self.update()

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.update()
        return False
