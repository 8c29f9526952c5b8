"""The course's optimizer names, in one map: what the HF ``Trainer`` calls each, and the class that runs it.

``adamw`` is torch's AdamW (``adamw_torch``, the Trainer's own name for it, is the same); the others are
bitsandbytes' 8-bit AdamW, plain or paged (its states paged out of GPU memory under pressure: CUDA only),
and the paged 32-bit one.

    >>> trainer_optim("adamw_8bit"), optimizer_name("auto", "cuda"), optimizer_name("auto", "cpu")
    ('adamw_bnb_8bit', 'paged_adamw_8bit', 'adamw_torch')
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import bitsandbytes as bnb
import torch

# course name -> (the Trainer's ``optim``, the optimizer class)
OPTIMIZERS = {
    "adamw": ("adamw_torch", torch.optim.AdamW),
    "adamw_torch": ("adamw_torch", torch.optim.AdamW),
    "adamw_8bit": ("adamw_bnb_8bit", bnb.optim.AdamW8bit),
    "paged_adamw_8bit": ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
    "paged_adamw_32bit": ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit),
}


def _check(name: str, setting: str) -> str:
    if name not in OPTIMIZERS:
        raise ValueError(f"{setting} must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    return name


def optimizer_name(name: str, device: str) -> str:
    """``auto``: the paged 8-bit AdamW on CUDA, torch's AdamW on the CPU; any other name as it is."""
    if name == "auto":
        return "paged_adamw_8bit" if str(device).startswith("cuda") else "adamw_torch"
    return name


def trainer_optim(name: str, *, setting: str = "optim") -> str:
    """The HF ``Trainer``'s ``optim`` for a course name (``setting`` names the key in the error)."""
    return OPTIMIZERS[_check(name, setting)][0]


def make_optimizer(name: str, params, *, setting: str = "optimizer", **kwargs):
    """The optimizer a course name stands for over ``params`` (tensors or param groups); ``kwargs`` (``lr``,
    ``weight_decay``) go to its class."""
    return OPTIMIZERS[_check(name, setting)][1](params, **kwargs)


@contextmanager
def scoped_bnb_overrides(model) -> Iterator[None]:
    """Around a ``Trainer`` run: on leaving, bitsandbytes' per-process optimizer settings are as they were before it.

    Given an 8-bit optimizer, the HF ``Trainer`` registers every ``nn.Embedding`` of the model with bitsandbytes'
    ``GlobalOptimManager`` (one per process) so that their optimizer states stay in 32 bits, and never removes
    them: each trained model's embeddings then stayed in memory until the process ended (0.25 GiB a run at
    Qwen2.5-0.5B's shape, six runs in one notebook kernel 1.5 GiB), and the positions the optimizer gave those
    overrides (``index2config``, and ``pid2config`` by the id of a parameter since freed) applied to whatever
    parameter a later run's optimizer holds there. The model's registrations (its own, too) are dropped, and the
    two maps restored."""
    manager = bnb.optim.GlobalOptimManager.get_instance()
    positions, ids = dict(manager.index2config), dict(manager.pid2config)
    try:
        yield
    finally:
        mine = {id(m) for m in model.modules()}
        manager.module_weight_config_triple[:] = [t for t in manager.module_weight_config_triple
                                                  if id(t[0]) not in mine]
        manager.index2config, manager.pid2config = positions, ids
