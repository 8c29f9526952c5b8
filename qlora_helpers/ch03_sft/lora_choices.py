"""LoRA's and QLoRA's choices in numbers: which layers, which rank, which 4-bit data type.

``lora_share`` counts the trainable parameters of a target set and rank at a real model's shape (chapter 01's
``model_shape``: no weights needed); ``quantization_error`` quantises one real weight with bitsandbytes and
measures what comes back; ``level_use`` and ``levels_figure`` show why NF4 fits weights better than FP4.

Example:
    >>> row = lora_share("smollm2-135m", 8)                  # r=8 on the 7 linear layers of 30 blocks
    >>> row["lora"], round(100 * row["share"], 2)
    (2442240, 1.82)
    >>> lora_share("smollm2-135m", 8, "attention")["lora"]   # q, k, v, o only
    921600
"""

from __future__ import annotations

import math

import torch
from bitsandbytes import functional as bnbf
from matplotlib.figure import Figure

from qlora_helpers.ch01_memory.estimator import model_shape, resolve_targets
from qlora_helpers.common.shapes import get_config

BLOCK = 64   # values per absmax block, the default of bitsandbytes' 4-bit layers


def lora_share(preset: str, r: int, targets: str = "all-linear") -> dict:
    """LoRA parameters (r x (fan_in + fan_out) per targeted linear layer) at ``preset``'s shape, and their share
    of the base model's parameters. ``targets``: ``all-linear``, ``attention``, ``mlp`` or module names."""
    shape = model_shape(get_config(preset))
    wanted = resolve_targets(shape, targets)
    lora = sum(lin.count * r * (lin.fan_in + lin.fan_out) for lin in shape.linears if lin.name in wanted)
    base = sum(lin.count * (lin.fan_in * lin.fan_out + lin.fan_out * lin.bias) for lin in shape.linears)
    base += sum(shape.other.values())
    return {"model": preset, "hidden": shape.hidden, "params": base, "r": r, "targets": targets, "lora": lora,
            "share": lora / base}


def rank_rows(presets, ranks) -> list[dict]:
    """One row per model: its width, size and the all-linear LoRA share at each rank (keys ``r=8`` ...)."""
    rows = []
    for preset in presets:
        shares = {r: lora_share(preset, r) for r in ranks}
        first = shares[ranks[0]]
        rows.append({"model": preset, "hidden": first["hidden"], "params": first["params"],
                     **{f"r={r}": s["share"] for r, s in shares.items()}})
    return rows


def quantized_weights(preset: str) -> int:
    """How many weights QLoRA stores in 4 bits at ``preset``'s shape: those of every linear layer of the decoder."""
    return sum(lin.count * lin.fan_in * lin.fan_out for lin in model_shape(get_config(preset)).linears)


def target_rows(runs: dict, names) -> list[dict]:
    """One row per run of ``names`` (``run_sft`` summaries in ``runs``): trainable parameters, their share of the
    base model, held-out loss before (the one run that scored the untrained model: LoRA starts at ``B = 0``, so
    it is every run's) and after, and the fall between them."""
    before = next(s["eval_loss"]["before"] for s in runs.values() if s["eval_loss"]["before"] is not None)
    rows = []
    for name in names:
        s = runs[name]
        trainable, after = s["params"]["trainable"], s["eval_loss"]["after"]
        base = s["params"]["total"] - trainable
        rows.append({"name": name, "trainable": trainable, "percent": 100 * trainable / base,
                     "before": before, "after": after, "fall": (before - after) / before})
    return rows


def targets_sentence(rows: list[dict]) -> str:
    """What ``target_rows`` shows, in one sentence: the lowest loss, and the others against it and their size."""
    best = min(rows, key=lambda r: r["after"])
    others = [f"{r['name']} {r['after'] / best['after'] - 1:+.2%} with {r['trainable'] / best['trainable']:.2f}x its "
              f"trainable parameters" for r in rows if r is not best]
    return f"lowest held-out loss: {best['name']} ({best['after']:.4f}); against it: " + "; ".join(others)


def quantization_error(weight: torch.Tensor, quant_type: str, double_quant: bool) -> dict:
    """Quantise ``weight`` to 4 bits as ``Linear4bit`` does (blocks of 64, one absmax each, quantised again with
    double quantisation), dequantise it, and measure: the relative error ||W' - W|| / ||W||, the largest error,
    and the bits stored per weight (codes, absmax and, with double quantisation, its own absmax and offset; the
    16- and 256-entry code tables, shared by every layer, are left out)."""
    w = weight.float()
    packed, state = bnbf.quantize_4bit(w, blocksize=BLOCK, quant_type=quant_type, compress_statistics=double_quant)
    back = bnbf.dequantize_4bit(packed, state)
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        stored += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4   # + the fp32 offset
    return {"quant_type": quant_type, "double_quant": double_quant,
            "rel_error": float((back - w).norm() / w.norm()), "max_abs_error": float((back - w).abs().max()),
            "bits_per_weight": 8 * stored / w.numel()}


def level_use(weight: torch.Tensor, quant_type: str) -> dict:
    """How evenly the 16 levels of a 4-bit type are used on ``weight``: the share of weights at each level and
    the entropy of those shares in bits (4.0: every level equally often, the most a 4-bit code can carry)."""
    packed, state = bnbf.quantize_4bit(weight.float(), blocksize=BLOCK, quant_type=quant_type)
    codes = torch.cat([packed.flatten() >> 4, packed.flatten() & 15]).long()
    share = torch.bincount(codes, minlength=16).double() / codes.numel()
    entropy = -sum(float(p) * math.log2(p) for p in share.tolist() if p > 0)
    return {"levels": state.code.tolist(), "share": share.tolist(), "entropy_bits": entropy}


def levels_figure(weight: torch.Tensor, quant_types=("nf4", "fp4")) -> Figure:
    """A histogram of ``weight`` divided by the absmax of its block of 64 (what a 4-bit code stores), with the
    16 levels of each data type drawn under it."""
    blocks = weight.float().flatten().reshape(-1, BLOCK)
    scaled = (blocks / blocks.abs().amax(dim=1, keepdim=True)).flatten()
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    ax.hist(scaled.numpy(), bins=120, range=(-1, 1), density=True, color="0.75", label="weights / block absmax")
    for i, qt in enumerate(quant_types):
        levels = level_use(weight, qt)["levels"]
        ax.plot(levels, [-0.15 - 0.2 * i] * len(levels), "|", markersize=14, mew=2, label=f"{qt} levels")
    ax.set_xlabel("weight / absmax of its block of 64")
    ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
