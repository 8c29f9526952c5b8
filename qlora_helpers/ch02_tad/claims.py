"""The seeds' numbers next to what this course counts and measures, each with a verdict, and the GPU memory table.

Parameter claims are checked by building the seed's backbones at ViT-S/16 shape on the CPU; memory claims
need ``benchmarks/results/tad_memory.json`` from ``benchmarks/tad_memory.py`` on a GPU. The seeds write "GB";
the benchmark measures GiB (2**30 bytes), a 7 % difference that no verdict below depends on. Verdicts use the
peak *allocated* memory; the reserved figure (closer to what ``nvidia-smi`` shows) is printed beside it, since
the seeds do not say how they measured.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from qlora_helpers.ch02_tad.adapters import backbone_counts
from qlora_helpers.ch02_tad.config import VIDEOMAE_S, build_backbone, strategy_config
from qlora_helpers.common.results import Table, plot, select


def seed_shape_counts() -> dict:
    """Parameter counts of the AdaTAD and seed-QLoRA backbones at ViT-S/16 shape (built on the meta
    device, adapters not quantized, so every weight counts at its logical size, as in OpenTAD's log line)."""
    out = {}
    for name in ("adapter", "seed_qlora"):
        with torch.device("meta"):   # shapes only: no memory, no time spent on initialisation
            c = backbone_counts(build_backbone(strategy_config(name, VIDEOMAE_S)["model"]["backbone"]))
        out[name] = {"vit_params": c["vit_params"], "adapter_params": c["adapter_params"],
                     "adapter_trainable": c["adapter_trainable"],
                     "adapter_ratio_pct": round(100 * c["adapter_params"] / c["vit_params"], 2),
                     "trainable_ratio_pct": round(100 * c["adapter_trainable"] / c["vit_params"], 2),
                     "quantized_params": c["quantized_params"]}
    return out


# The benchmark file as tables (``common.results.table``): every configuration with its peaks and step time,
# or its status; what the quantized weights themselves take, beside the peak, with checkpointing on.
TAD_MEMORY = Table("tad_memory", "figures.rows", columns=(
    ("configuration", "name", ""), ("peak allocated (GiB)", "peak_allocated_gib", ".2f"),
    ("peak reserved (GiB)", "peak_reserved_gib", ".2f"), ("s / step", "step_seconds", ".3f"), ("status", "status", "")))
QUANTIZED = Table("tad_memory", "figures.rows", columns=(
    ("configuration", "name", ""), ("quantized weights", "params.quantized_params", ","),
    ("stored (MiB)", lambda r: r["params"]["quantized_bytes"] / 2**20, ".2f"),
    ("in fp32 (MiB)", lambda r: r["params"]["quantized_params"] * 4 / 2**20, ".2f"),
    ("peak allocated (GiB)", "peak_allocated_gib", ".2f")),
    where=lambda r: r["status"] == "ok" and r["name"].endswith("-cp") and r["params"]["quantized_params"] > 0)
MEASURED = Table("tad_memory", "figures.rows", where=lambda r: r.get("status") == "ok")
CHECKPOINTING_COLUMNS = (("strategy", "strategy", ""), ("checkpointing on (GiB)", "on", ".3f"),
                         ("off (GiB)", "off", ".3f"), ("checkpointing saves (GiB)", "saved", ".2f"),
                         ("share", "saved_share", ".0%"), ("vs adapter, on (GiB)", "vs_adapter", "+.2f"))
STRATEGIES = ("full_ft", "adapter", "seed_qlora4", "seed_qlora8", "qlora_backbone")


def _peaks(benchmark: dict | None) -> dict:
    """Peak allocated GiB per configuration that ran ("adapter-cp": 12.1, ...); ``{}`` without a file."""
    return {r["name"]: r["peak_allocated_gib"] for r in select(benchmark, MEASURED)} if benchmark else {}


def _range_verdict(value, lo, hi, unit="GiB") -> str:
    if value is None:
        return "not measured"
    return f"{'holds' if lo <= value <= hi else 'does not hold'} ({value:.2f} {unit})"


def _parameter_claims(q: dict, a: dict) -> list[dict]:
    mib = q["quantized_params"] / 2**20
    return [
        {"seed": "001", "claim": "ViT 21,879,936 params, QLoRA adapters 1,185,420, ratio 5.4 %",
         "measured": f"{q['vit_params']:,} / {q['adapter_params']:,} = {q['adapter_ratio_pct']} %",
         "verdict": "holds as counted, but it counts the frozen quantized projections"
         if (q["vit_params"], q["adapter_params"]) == (21_879_936, 1_185_420) else "does not reproduce"},
        {"seed": "000", "claim": "QLoRA trains < 1 % of the parameters",
         "measured": f"{q['adapter_trainable']:,} trainable = {q['trainable_ratio_pct']} % of the ViT",
         "verdict": "holds" if q["trainable_ratio_pct"] < 1 else f"does not hold ({q['trainable_ratio_pct']} %)"},
        {"seed": "001", "claim": "original AdaTAD adapters: about 2-3 M trainable params",
         "measured": f"{a['adapter_params']:,} (all trainable)",
         "verdict": "holds" if 2e6 <= a["adapter_params"] <= 3e6
         else f"does not hold ({a['adapter_params'] / 1e6:.2f} M)"},
        {"seed": "001", "claim": "4-bit storage saves 75 % of the memory",
         "measured": f"{q['quantized_params']:,} quantized weights: {mib * 2:.2f} MiB in bf16 "
                     f"-> {mib / 2:.2f} MiB in 4 bits",
         "verdict": f"holds for those weights only: {mib * 1.5:.2f} MiB saved in all"},
    ]


def check_claims(counts: dict, benchmark: dict | None = None) -> list[dict]:
    """One row per seed claim: ``claim``, ``seed``, ``measured`` and ``verdict``."""
    rows = _parameter_claims(counts["seed_qlora"], counts["adapter"])
    if benchmark is None:
        return rows
    runs = {r["name"]: r for r in select(benchmark, MEASURED)}
    full, adapter, q4, q8, q4_nocp = (_peaks(benchmark).get(name) for name in (
        "full_ft-cp", "adapter-cp", "seed_qlora4-cp", "seed_qlora8-cp", "seed_qlora4-nocp"))

    def where(name: str, label: str) -> str:
        r = runs.get(name)
        return f"{label}: peak {r['peak_allocated_gib']:.2f} GiB allocated, {r['peak_reserved_gib']:.2f} GiB reserved" \
            if r else f"{label}: not measured"

    def saving(base):
        return None if q4 is None or not base else 100 * (1 - q4 / base)

    return rows + [
        {"seed": "000", "claim": "original adapter: about 12 GB", "verdict": _range_verdict(adapter, 10, 14),
         "measured": where("adapter-cp", "adapter, checkpointing on")},
        {"seed": "000", "claim": "QLoRA 4-bit: 6-8 GB", "verdict": _range_verdict(q4, 6, 8),
         "measured": where("seed_qlora4-cp", "seed QLoRA 4-bit, checkpointing on")},
        {"seed": "000", "claim": "QLoRA 8-bit: 8-10 GB", "verdict": _range_verdict(q8, 8, 10),
         "measured": where("seed_qlora8-cp", "seed QLoRA 8-bit, checkpointing on")},
        {"seed": "000", "claim": "QLoRA needs 50-75 % less memory than the original adapter",
         "measured": "1 - seed QLoRA 4-bit / adapter (checkpointing on)",
         "verdict": _range_verdict(saving(adapter), 50, 75, "%")},
        {"seed": "001", "claim": "QLoRA training takes about 16 GB",
         "measured": f"seed QLoRA 4-bit: {q4 if q4 is not None else '-'} GiB with, "
                     f"{q4_nocp if q4_nocp is not None else '-'} without checkpointing",
         "verdict": _range_verdict(q4, 13, 19)},
        {"seed": "001", "claim": "50-60 % less memory than full fine-tuning",
         "measured": "1 - seed QLoRA 4-bit / full fine-tuning (checkpointing on)",
         "verdict": _range_verdict(saving(full), 50, 60, "%")},
    ]


def memory_figure(benchmark: dict) -> Figure:
    """Bars of the peak allocated GiB per strategy, activation checkpointing on and off."""
    fig = plot(select(benchmark, MEASURED), x="strategy", y="peak_allocated_gib", size=(9, 3.4),
               series=lambda r: f"checkpointing {'on' if r['activation_checkpointing'] else 'off'}",
               title="ViT-S/16, 768 frames x 160 px, batch 2 (seed config shape)")
    fig.axes[0].set_ylabel("peak allocated, GiB")
    return fig


def checkpointing_rows(benchmark: dict) -> list[dict]:
    """Per strategy: peak GiB with (``on``) and without (``off``) activation checkpointing, what checkpointing
    saves, and the difference to the plain adapter (both with checkpointing); ``None`` where not measured."""
    peak, rows = _peaks(benchmark), []
    for strategy in STRATEGIES:
        on, off = peak.get(f"{strategy}-cp"), peak.get(f"{strategy}-nocp")
        both = on is not None and off is not None
        rows.append({"strategy": strategy, "on": on, "off": off, "saved": off - on if both else None,
                     "saved_share": 1 - on / off if both else None,
                     "vs_adapter": on - peak["adapter-cp"]
                     if on is not None and "adapter-cp" in peak and strategy != "adapter" else None})
    return rows


def benchmark_record(benchmark: dict | None) -> dict | None:
    """What a notebook's results keep of the benchmark file: device, date and every row."""
    if benchmark is None:
        return None
    return {"device": benchmark["device"], "date": benchmark["date"], "rows": select(benchmark, TAD_MEMORY)}


# --------------------------------------------------------------------------- learning and the 1 % claim
TRAINED = ("full_ft", "adapter", "seed_qlora", "qlora_backbone")


def learning_metrics(map05: dict, chance05: float) -> dict:
    """Higher-is-better learning figures from mAP@0.5 per run (``TRAINED`` plus ``adapter_random_backbone``).

    ``map05_over_chance_<strategy>`` is the strategy's mAP@0.5 over the chance mAP@0.5;
    ``adapter_over_random_backbone`` the adapter's over the same adapter's on a random frozen backbone,
    that control counted at chance when it falls below (as after the tests' two steps: below chance is chance).
    Example: ``learning_metrics({"adapter": 0.6, "adapter_random_backbone": 0.15, ...}, 0.04)``
    -> ``{"map05_over_chance_adapter": 15.0, ..., "adapter_over_random_backbone": 4.0}``.
    """
    if chance05 <= 0:
        raise ValueError(f"chance mAP@0.5 is {chance05}: nothing to divide by; evaluate on more validation videos")
    out = {f"map05_over_chance_{s}": round(map05[s] / chance05, 4) for s in TRAINED}
    out["adapter_over_random_backbone"] = round(map05["adapter"] / max(map05["adapter_random_backbone"], chance05), 4)
    return out


def within_one_point(map05: dict, *, tolerance: float = 0.01) -> dict:
    """Seed 000's "QLoRA adapter within 1 % mAP of the plain adapter", read as 1 point of mAP@0.5, in one run.

    One run is one draw of the seed: a difference beyond the tolerance leaves the claim "not supported" by it,
    not refuted (chapter 03's rule for its quality claims). Example: ``{"seed_qlora": 0.617, "adapter": 0.634}``
    -> difference -0.017, verdict "not supported by this run, one seed (-0.017 mAP@0.5, tolerance 0.01)".
    """
    diff = round(map05["seed_qlora"] - map05["adapter"], 4)
    verdict = "holds in" if abs(diff) <= tolerance else "not supported by"
    return {"claim": "QLoRA adapter within 1 % mAP of the plain adapter", "seed": "000",
            "seed_qlora_minus_adapter_map05": diff, "tolerance": tolerance,
            "verdict": f"{verdict} this run, one seed ({diff:+.3f} mAP@0.5, tolerance {tolerance:.2f})"}


# --------------------------------------------------------------------------- what helps when memory runs out
def eight_bit_advice(benchmark: dict | None) -> dict:
    """Seed 000's advice for CUDA out of memory, "use 8-bit quantization (quantize_bits=8)", against the
    measured peaks of the seed's adapter at 8 and at 4 bits (checkpointing on and off)."""
    peak = _peaks(benchmark)
    pairs = {cp: (peak.get(f"seed_qlora8-{cp}"), peak.get(f"seed_qlora4-{cp}")) for cp in ("cp", "nocp")}
    measured = {cp: p for cp, p in pairs.items() if None not in p}
    if not measured:
        verdict = "not measured"
    elif all(q8 > q4 for q8, q4 in measured.values()):
        verdict = "contradicted: 8-bit needs more memory than 4-bit"
    elif all(q8 < q4 for q8, q4 in measured.values()):
        verdict = "holds against 4-bit"
    else:
        verdict = "mixed"
    runs = {r["name"]: r for r in select(benchmark, MEASURED)} if benchmark else {}
    weights = [runs[f"seed_qlora{b}-cp"]["params"]["quantized_bytes"] / 2**20 if f"seed_qlora{b}-cp" in runs else None
               for b in (8, 4)]
    return {"claim": "out of memory: use 8-bit quantization (quantize_bits=8)", "seed": "000",
            "peak_gib_8bit_vs_4bit": {("checkpointing on" if cp == "cp" else "checkpointing off"): list(p)
                                      for cp, p in measured.items()},
            "quantized_weights_mib_8bit_vs_4bit": weights, "verdict": verdict}
