"""The estimate checked: against the seed documents' memory claims, and against the peaks measured on a GPU.

A claim holds when ``claimed / estimate`` is within the tolerance: 10 % for figures that follow from
arithmetic alone (weights, parameter counts), 25 % for whole-step totals. Where a seed gives no
batch or sequence length, ``claim_range`` checks it over 1 x 256 .. 8 x 1024 tokens, with and
without checkpointing, and the verdict is "depends" if some of those settings match.

``benchmarks/memory_validation.py`` saves random weights at real width, loads them as a user does
(``from_pretrained``, 4-bit / 8-bit through ``BitsAndBytesConfig``), trains each configuration for a few
steps (``measurement.measure``) and records the measured peaks, allocated and reserved, next to the
estimate (``benchmarks/results/memory_validation.json``). ``VALIDATION`` is the table of that file for
``common.results.table``; ``validation_summary`` and ``validation_plot`` say how close the estimate came.

Example:
    >>> claim("003", "LoRA r=8 adapter is 0.20 GB", 0.20, 0.19, 0.10)["why"]
    'claimed/estimate = 1.05'
    >>> bench = optional_benchmark("memory_validation")     # doctest: +SKIP
    >>> display(Markdown(table(bench, VALIDATION))); print(validation_summary(bench))   # doctest: +SKIP
"""

from __future__ import annotations

import yaml
from matplotlib.figure import Figure

from qlora_helpers.ch01_memory.estimator import GIB, estimate, quantized_bytes
from qlora_helpers.ch01_memory.gpus import CONTEXT_GIB, fits, verdict
from qlora_helpers.common.files import repo_root
from qlora_helpers.common.results import Table, plot, select
from qlora_helpers.common.shapes import get_config


def seen(e) -> float:
    """What nvidia-smi would show, roughly: the peak allocated plus the CUDA context (GiB)."""
    return e.total_gib + CONTEXT_GIB


def claim(seed: str, text: str, claimed: float, ours: float, tol: float = 0.25, why: str = "") -> dict:
    """A figure set against ``ours``: it holds when ``claimed / ours`` is within ``tol`` of 1."""
    ratio = claimed / ours
    return {"seed": seed, "claim": text, "claimed": claimed, "estimate": round(ours, 3),
            "verdict": "holds" if abs(ratio - 1) <= tol else "refuted",
            "why": f"claimed/estimate = {ratio:.2f}; {why}".strip("; ")}


def claim_range(seed: str, text: str, cfg, method: str, claimed: float, **kw) -> dict:
    """No batch or length given: find the settings under which the claim would hold."""
    pts = [(b, s, ck, seen(estimate(cfg, method, batch_size=b, seq_len=s, grad_ckpt=ck, **kw)))
           for b in (1, 2, 4, 8) for s in (256, 512, 1024) for ck in (False, True)]
    near = [p for p in pts if abs(claimed / p[3] - 1) <= 0.25]
    lo, hi = min(p[3] for p in pts), max(p[3] for p in pts)
    why = f"estimate spans {lo:.1f}-{hi:.1f} GiB over 1x256 .. 8x1024 tokens"
    if near:
        b, s, ck, g = min(near, key=lambda p: abs(claimed / p[3] - 1))
        why += f"; matches e.g. {b} x {s}{' + checkpointing' if ck else ''} ({g:.1f} GiB)"
    return {"seed": seed, "claim": text, "claimed": claimed, "estimate": f"{lo:.1f}-{hi:.1f}",
            "verdict": "depends" if near else "refuted", "why": why}


def qwen_05b_claims() -> list[dict]:
    """Seed 002: Qwen2.5-0.5B, four methods, and QLoRA's saving."""
    q05 = get_config("qwen2.5-0.5b")
    rows = [claim_range("002", f"Qwen2.5-0.5B {label} needs about {gb} GB", q05, method, gb,
                        **({} if method == "full" else {"lora_r": 64}))
            for method, label, gb in [("full", "full fine-tuning", 8), ("lora", "LoRA r=64", 6),
                                      ("qlora4", "QLoRA 4-bit r=64", 3), ("qlora8", "QLoRA 8-bit r=64", 4)]]
    size = lambda method, b, s, ck, **kw: estimate(q05, method, batch_size=b, seq_len=s, grad_ckpt=ck, **kw).total_bytes
    saving = [1 - size("qlora4", b, s, ck, lora_r=64) / size("full", b, s, ck)
              for b in (1, 4) for s in (512, 1024) for ck in (False, True)]
    rows.append({"seed": "002", "claim": "QLoRA 4-bit cuts memory by 50-75 % (Qwen2.5-0.5B)", "claimed": "50-75 %",
                 "estimate": f"{min(saving):.0%}-{max(saving):.0%}",
                 "verdict": "holds" if min(saving) >= 0.5 else ("depends" if max(saving) >= 0.5 else "refuted"),
                 "why": "logits and activations, untouched by quantisation, dominate a 0.5B model; without "
                        "checkpointing the fp32 copies LoRA keeps can even exceed full fine-tuning"})
    return rows


def llava_qlora_claims() -> list[dict]:
    """Seed 003's QLoRA breakdown: batch 1, 512 text tokens + 576 image tokens, r=8, checkpointing."""
    lq = estimate(get_config("llava-1.5-7b"), "qlora4", batch_size=1, seq_len=512, lora_r=8, grad_ckpt=True)
    lc = lq.components
    weights = (lc["quantized weights"] + lc["unquantized weights"]) / GIB
    return [
        claim("003", "LLaVA-1.5-7B in 4-bit is 3.4 GB", 3.4, weights, 0.10,
              "vision tower, projector, embeddings and lm_head stay 16-bit; quantisation constants"),
        claim("003", "LoRA r=8 adapter is 0.20 GB", 0.20, lc["LoRA weights"] / GIB, 0.10,
              f"{lq.params['lora']:,} parameters in fp32 on all linear layers"),
        claim("003", "optimizer states are 0.04 GB", 0.04, lc["optimizer states"] / GIB, 0.10,
              "AdamW: two fp32 states per LoRA weight"),
        claim("003", "activations are 0.5 GB (checkpointing, 1 x 512)", 0.5, lc["activations"] / GIB, 0.25),
        claim("003", "QLoRA total 4.2 GB", 4.2, seen(lq), 0.25,
              "the breakdown omits logits, constants and the CUDA context"),
        claim("003", "QLoRA peak measured 6.9 GB on an 8 GB RTX 4060", 6.9, seen(lq), 0.25),
        {"seed": "003", "claim": "QLoRA LLaVA-1.5-7B fits an 8 GB card", "claimed": "fits 8 GB",
         "estimate": round(lq.total_gib, 2), "verdict": "holds" if fits(lq, 8) == "fits" else "refuted",
         "why": f"fits() on 8 GB: {fits(lq, 8)}"},
    ]


def llava_other_claims(lora_dtypes: list[str]) -> list[dict]:
    """Seed 003 on plain LoRA, full fine-tuning, adapter dtype and checkpointing."""
    llava = get_config("llava-1.5-7b")
    ll = estimate(llava, "lora", batch_size=1, seq_len=512, lora_r=8, grad_ckpt=True)
    full = {opt: seen(estimate(llava, "full", batch_size=1, seq_len=512, grad_ckpt=True, optimizer=opt))
            for opt in ("adamw", "adamw_8bit")}
    ok = [opt for opt, g in full.items() if abs(50 / g - 1) <= 0.25]
    ln = estimate(llava, "qlora4", batch_size=1, seq_len=512, lora_r=8, grad_ckpt=False)
    return [
        claim("003", "LoRA (16-bit base) needs about 35 GB", 35, seen(ll), 0.25,
              "bf16 weights + small activations at 1 x 512"),
        {"seed": "003", "claim": "plain LoRA does not fit 8 GB, needs a 24 GB card", "claimed": "24 GB+",
         "estimate": round(ll.total_gib, 2),
         "verdict": "holds" if fits(ll, 8) == "no" and fits(ll, 16) != "fits" else "refuted", "why": verdict(ll)},
        {"seed": "003", "claim": "full fine-tuning needs about 50 GB", "claimed": 50,
         "estimate": " / ".join(f"{g:.1f}" for g in full.values()),
         "verdict": "holds" if len(ok) == 2 else ("depends" if ok else "refuted"),
         "why": "torch AdamW / 8-bit AdamW (bf16 weights, grads, states, temporary); holds with: "
                + (", ".join(ok) or "neither")},
        {"seed": "003/004", "claim": "LoRA adapters are kept in fp16", "claimed": "fp16",
         "estimate": ", ".join(lora_dtypes), "verdict": "refuted" if "torch.float16" not in lora_dtypes else "holds",
         "why": "peft creates adapters in fp32 by default (section 3): twice the bytes"},
        {"seed": "003", "claim": "without checkpointing QLoRA no longer fits 8 GB", "claimed": "needs ckpt",
         "estimate": round(ln.total_gib, 2), "verdict": "holds" if fits(ln, 8) == "no" else "refuted",
         "why": verdict(ln)},
    ]


def qwen_32b_claims() -> list[dict]:
    """Seed 004: Qwen3-VL-32B on a V100; Qwen2.5-32B's decoder is the closest preset (vision tower not counted).
    The optimizer is the one chapter 05's 32B config trains with (paged 8-bit AdamW)."""
    config = yaml.safe_load((repo_root() / "data" / "configs" / "multi_gpu_32b.yaml").read_text())
    e32 = estimate(get_config("qwen2.5-32b"), "qlora4", batch_size=1, seq_len=512, lora_r=8, targets="attention",
                   grad_ckpt=True, optimizer=config["training"]["optimizer"], dtype="fp16")
    c32 = e32.components
    states = (c32["optimizer states"] + e32.outside.get("paged optimizer states", 0)) / GIB
    return [
        claim("004", "32B model in 4-bit takes about 18 GB", 18,
              (c32["quantized weights"] + c32["unquantized weights"]) / GIB, 0.10),
        claim("004", "LoRA r=8 on q,k,v,o has ~200 M trainable parameters", 200e6, e32.params["lora"], 0.10),
        claim("004", "LoRA weights take about 0.5 GB", 0.5, c32["LoRA weights"] / GIB, 0.10),
        claim("004", "optimizer states take about 1 GB", 1.0, states, 0.10, "paged 8-bit AdamW"),
        claim("004", "gradients + activations take about 8 GB", 8.0,
              (c32["gradients"] + c32["activations"] + c32["logits and loss"]) / GIB, 0.25,
              "batch 1 x 512, checkpointing"),
        claim("004", "about 27.5 GB per V100", 27.5, seen(e32), 0.25),
        {"seed": "004", "claim": "fits a 32 GB V100 with ~4.5 GB to spare", "claimed": "fits 32 GB",
         "estimate": round(e32.total_gib, 2), "verdict": "holds" if fits(e32, 32) == "fits" else "refuted",
         "why": f"fits on 32 GB, ~{32 - seen(e32):.0f} GiB to spare (fp16 on V100)"},
    ]


def vit_claim() -> dict:
    """Seed 000: a VideoMAE-S backbone (ViT-S/16: 12 layers, hidden 384, MLP 1536), originally ~12 GB."""
    vit = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]
    bf16 = 12 * sum(2 * i * o for i, o in vit) / GIB
    nf4 = 12 * sum(quantized_bytes(i * o) for i, o in vit) / GIB
    return {"seed": "000", "claim": "4-bit QLoRA takes the 12 GB adapter run to 6-8 GB", "claimed": "-4 to -6 GB",
            "estimate": f"-{bf16 - nf4:.3f} GiB", "verdict": "refuted",
            "why": f"the backbone's linear weights are {bf16:.3f} GiB in bf16; quantising saves at most that "
                   "much, the rest is video activations, which quantisation does not shrink"}


def seed_claims(lora_dtypes: list[str]) -> list[dict]:
    """Every memory claim of the seeds with its verdict; ``lora_dtypes``: the adapter dtypes peft created."""
    return [*qwen_05b_claims(), *llava_qlora_claims(), *llava_other_claims(lora_dtypes), *qwen_32b_claims(),
            vit_claim()]


# The claims as a table (``common.results.markdown(seed_claims(...), CLAIM_COLUMNS)``).
CLAIM_COLUMNS = (("seed", "seed", ""), ("claim", "claim", ""), ("claimed", "claimed", ",.3g"),
                 ("estimate", "estimate", ",.3g"), ("verdict", "verdict", "**{}**"), ("why", "why", ""))


VALIDATION = Table("memory_validation", "figures.rows", where=lambda r: r["status"] == "ok", columns=(
    ("configuration", "name", ""),
    ("layers", lambda r: f"{r['config']['layers']} of {r['config']['real_layers']}", ""),
    ("allocated: estimate (GiB)", "predicted_gib", ".2f"), ("measured", "measured.peak_allocated_gib", ".2f"),
    ("error %", "error_pct", "+.1f"),
    ("reserved: estimate (GiB)", "predicted_reserved_gib", ".2f"), ("measured", "measured.peak_reserved_gib", ".2f"),
    ("error %", "reserved_error_pct", "+.1f")))


def validation_summary(bench: dict) -> str:
    """The worst errors, how far the reserve exceeded the peak allocated, and what the device held beyond it."""
    rows = select(bench, VALIDATION)
    m = [r["measured"] for r in rows]
    slack = [x["peak_reserved_gib"] / x["peak_allocated_gib"] - 1 for x in m]
    outside = [x["device_used_gib"] - x["reserved_now_gib"] for x in m]
    worst = (max(abs(r["error_pct"]) for r in rows), max(abs(r["reserved_error_pct"]) for r in rows))
    return (f"{len(rows)} configurations: worst error {worst[0]:.1f} % on the peak allocated, {worst[1]:.1f} % "
            f"on the peak reserved\nreserved exceeded the peak allocated by {min(slack):.0%} to {max(slack):.0%}; "
            f"the device held {min(outside):.2f} to {max(outside):.2f} GiB beyond PyTorch's reserve "
            "(CUDA context, paged states)")


def validation_plot(bench: dict, *, band: float = 0.10, label_above_pct: float = 2.0) -> Figure:
    """Estimate against measured peak, one point per configuration, with a +-``band`` area; the points off
    by more than ``label_above_pct`` are named."""
    rows = select(bench, VALIDATION)
    fig = plot(rows, x="measured.peak_allocated_gib", y="predicted_gib", kind="scatter", size=(5.5, 5),
               label=lambda r: r["name"] if abs(r["error_pct"]) > label_above_pct else "")
    ax = fig.axes[0]
    top = max(r["measured"]["peak_allocated_gib"] for r in rows) * 1.1
    ax.plot([0, top], [0, top], "k-", lw=0.8)
    ax.fill_between([0, top], [0, (1 - band) * top], [0, (1 + band) * top], color="grey", alpha=0.15,
                    label=f"±{band:.0%}")
    ax.set(xlabel=f"measured peak allocated, GiB ({bench['device']['name']})", ylabel="estimate, GiB")
    ax.legend()
    return fig


def benchmark_summary(bench: dict | None) -> dict | None:
    """What the notebook's results keep of the file: its summary (rows, errors, how many within 5 and 10 %)."""
    return None if bench is None else bench["figures"]["summary"]
