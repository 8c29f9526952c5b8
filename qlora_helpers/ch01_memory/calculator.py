"""The chapter's calculator: pick a model and a configuration, read the breakdown and each card's verdict.

The model box takes a preset, a path to any decoder's ``config.json`` or, where the machine is online,
a hub id. For each card of the GPU table it prints fits / tight / does not fit and the largest batch
size that fits at the chosen sequence length. The panel sets its output's text directly when a
control changes, so nothing waits on a frontend (under papermill it is drawn once with its starting values).
"""

from __future__ import annotations

import ipywidgets as w

from qlora_helpers.ch01_memory.estimator import METHODS, OPTIMIZERS, estimate, largest_fit
from qlora_helpers.ch01_memory.gpus import GPUS, VERDICT_TEXT, fits
from qlora_helpers.common.shapes import get_config, preset_names

SEQ_LENS = [128, 256, 512, 1024, 2048, 4096, 8192]


def card_lines(config, e) -> list[str]:
    """One line per card of the table: the verdict and the largest batch size that fits there."""
    at = lambda gib: largest_fit(config, e.inputs["method"], gib, vary="batch_size", limit=4096,
                                 **e.setting() | {"batch_size": 1})
    return [f"  {g.name:<18} {VERDICT_TEXT[fits(e, g.memory_gib)]:<13} largest batch at {e.inputs['seq_len']} "
            f"tokens: {at(g.memory_gib)}" for g in GPUS]


def breakdown(model: str, method: str, *, lora_r: int, targets: str, batch_size: int, seq_len: int,
              grad_ckpt: bool, optimizer: str):
    """The estimate and its text: the components, the peak, what the card holds and each card's verdict."""
    config = get_config(model)
    e = estimate(config, method, batch_size=batch_size, seq_len=seq_len, lora_r=lora_r, targets=targets,
                 grad_ckpt=grad_ckpt, optimizer=optimizer)
    return e, "\n".join([e.table(), "", *card_lines(config, e)]) + "\n"


def controls(model: str, *, batch_size: int = 1, seq_len: int = 512, lora_r: int = 8) -> dict:
    return dict(
        model=w.Combobox(options=sorted({*preset_names(), model}), value=model, ensure_option=False,
                         placeholder="preset, path to a config.json, or hub id", description="model"),
        method=w.ToggleButtons(options=list(METHODS), value="qlora4", description="method"),
        lora_r=w.Dropdown(options=sorted({4, 8, 16, 32, 64, 128, lora_r}), value=lora_r, description="LoRA r"),
        targets=w.Dropdown(options=["all-linear", "attention", "mlp"], value="all-linear", description="targets"),
        batch_size=w.IntSlider(value=batch_size, min=1, max=max(32, batch_size), description="batch"),
        seq_len=w.Dropdown(options=sorted({*SEQ_LENS, seq_len}), value=seq_len, description="seq len"),
        grad_ckpt=w.Checkbox(value=True, description="gradient checkpointing"),
        optimizer=w.Dropdown(options=list(OPTIMIZERS), value="adamw", description="optimizer"),
    )


def calculator(model: str = "qwen2.5-0.5b", *, batch_size: int = 1, seq_len: int = 512, lora_r: int = 8):
    """(the panel to display, a function returning the estimate for the panel's current setting).

    ``model``: a preset, a ``config.json`` path or a hub id; ``batch_size``, ``seq_len`` and ``lora_r``
    are the starting setting (a notebook passes its parameters).
    """
    ctl, out = controls(model, batch_size=batch_size, seq_len=seq_len, lora_r=lora_r), w.Output()
    current = lambda: breakdown(**{k: c.value for k, c in ctl.items()})

    def update(_=None):
        try:
            text = current()[1]
        except ValueError as err:              # a model or setting the estimator cannot take: its one line
            text = f"error: {err}\n"
        out.outputs = ({"output_type": "stream", "name": "stdout", "text": text},)

    for c in ctl.values():
        c.observe(update, names="value")
    update()
    panel = w.VBox([w.HBox([ctl["model"], ctl["lora_r"], ctl["targets"]]), ctl["method"],
                    w.HBox([ctl["batch_size"], ctl["seq_len"]]), w.HBox([ctl["grad_ckpt"], ctl["optimizer"]]), out])
    return panel, lambda: current()[0]
