"""The chapter's calculator: pick a model and a configuration, read the breakdown and each card's verdict.

The panel sets its output's text directly when a control changes, so nothing waits on a frontend
(under papermill it is drawn once with its starting values).
"""

from __future__ import annotations

import ipywidgets as w

from qlora_helpers.ch01_memory.estimator import METHODS, OPTIMIZERS, estimate
from qlora_helpers.ch01_memory.gpus import gpu_table
from qlora_helpers.common.shapes import get_config, preset_names


def breakdown(model: str, method: str, *, lora_r: int, targets: str, batch_size: int, seq_len: int,
              grad_ckpt: bool, optimizer: str):
    """The estimate and its text: the components, the peak, and the verdict for each GPU of the table."""
    e = estimate(get_config(model), method, batch_size=batch_size, seq_len=seq_len, lora_r=lora_r, targets=targets,
                 grad_ckpt=grad_ckpt, optimizer=optimizer)
    cards = "\n".join(f"  {row['gpu']:<18} {row['verdict']}" for row in gpu_table(e))
    return e, f"{e.table()}\n\n{cards}\n"


def controls(model: str) -> dict:
    return dict(
        model=w.Dropdown(options=preset_names(), value=model if model in preset_names() else "qwen2.5-0.5b",
                         description="model"),
        method=w.ToggleButtons(options=list(METHODS), value="qlora4", description="method"),
        lora_r=w.Dropdown(options=[4, 8, 16, 32, 64, 128], value=8, description="LoRA r"),
        targets=w.Dropdown(options=["all-linear", "attention", "mlp"], value="all-linear", description="targets"),
        batch_size=w.IntSlider(value=1, min=1, max=32, description="batch"),
        seq_len=w.Dropdown(options=[128, 256, 512, 1024, 2048, 4096, 8192], value=512, description="seq len"),
        grad_ckpt=w.Checkbox(value=True, description="gradient checkpointing"),
        optimizer=w.Dropdown(options=list(OPTIMIZERS), value="adamw", description="optimizer"),
    )


def calculator(model: str = "qwen2.5-0.5b"):
    """(the panel to display, a function returning the estimate for the panel's current setting)."""
    ctl, out = controls(model), w.Output()
    current = lambda: breakdown(**{k: c.value for k, c in ctl.items()})

    def update(_=None):
        out.outputs = ({"output_type": "stream", "name": "stdout", "text": current()[1]},)

    for c in ctl.values():
        c.observe(update, names="value")
    update()
    panel = w.VBox([w.HBox([ctl["model"], ctl["lora_r"], ctl["targets"]]), ctl["method"],
                    w.HBox([ctl["batch_size"], ctl["seq_len"]]), w.HBox([ctl["grad_ckpt"], ctl["optimizer"]]), out])
    return panel, lambda: current()[0]
