"""What ``benchmarks/vlm_8gb.py`` and ``benchmarks/vlm_hf_7b.py`` measured on a GPU: the specs of the tables
chapter 04 shows (read by ``common.results``), and the seed's speed claim judged by the step times.

Each function takes the file as ``common.optional_benchmark`` returns it, ``None`` when the benchmark has
not been run, and then answers with empty values, never an error.

Example:
    >>> measured_methods(None)
    {'qlora': None, 'lora': None}
    >>> display(Markdown(table(optional_benchmark("vlm_8gb"), PROOFS)))   # doctest: +SKIP
"""

from __future__ import annotations

from qlora_helpers.ch04_vlm.config import preset
from qlora_helpers.ch04_vlm.vram import ANSWER_TOKENS, estimate_vlm, with_changes
from qlora_helpers.common.results import Table

LORA_ROW = "knob: 16-bit base (LoRA, no 4-bit)"     # the 8 GB preset with its 4-bit base off: LoRA in 16 bits
# QLoRA runs that do the baseline's work per step: 512 text tokens, rank 8, checkpointing on (the optimizer
# knob changes only the update of 20 M adapter values)
SAME_WORK = {"8gb-s512": "the 8 GB proof", "knob: torch AdamW (32-bit states)": "the optimizer knob"}
SEED_SLOWDOWN_PCT = (30, 40)                        # the seed: QLoRA 30-40 % slower than LoRA
SEED_SPEED = [{"card": card, "vs_a100": rel, "hours": hours} for card, rel, hours in (
    ("A100 80GB", 1.0, "1 h"), ("RTX 4090", 0.7, "1.5 h"), ("RTX 3060 12GB", 0.3, "3-4 h"),
    ("RTX 4060 8GB", 0.25, "4-5 h"))]
SEED_SPEED_COLUMNS = (("seed: card", "card", ""), ("seed: speed vs A100", "vs_a100", "{:.2f}x"),
                      ("seed: 1000 steps", "hours", ""))


def _figures(bench: dict | None) -> dict:
    return (bench or {}).get("figures", {})


def _ok(fn):
    return lambda p: fn(p) if p["status"] == "ok" else None


# The runs under a memory cap (an 8 GB card less its CUDA context: 7.5 GiB; the seed's 12 GB rows: 11.5 GiB).
PROOFS = Table("vlm_8gb", "figures.proofs", columns=(
    ("run", "name", ""), ("cap (GiB)", "cap_gib", ""), ("tokens", "lm_tokens", ""), ("steps", "steps_completed", ""),
    ("peak allocated (GiB)", "peak_allocated_gib", ".2f"), ("reserved (GiB)", "peak_reserved_gib", ".2f"),
    ("estimate (GiB)", "estimate_gib", ".2f"),
    ("estimate off", _ok(lambda p: p["estimate_gib"] / p["peak_allocated_gib"] - 1), "+.1%"),
    ("cap to spare (GiB)", _ok(lambda p: p["cap_gib"] - p["peak_reserved_gib"]), ".2f"),
    ("status", "status", ""), ("fits instead", "what_fits_instead", "")))

COMMAND_IMAGE_SIZE = 336      # benchmarks/vlm_hf_7b.py's images (Qwen2-VL: 144 image tokens)


def command_estimate(row: dict) -> float:
    """The estimate (GiB) of one ``vlm_hf_7b`` run, recomputed from its command line: the preset with the
    command's accumulation and ``--hardware.embeddings_on_cpu``, its longest example, the vlm command's
    fused loss (``loss_rows``). The file's own ``estimate_gib`` is what the estimator said on the day.

    Example: the Qwen2-VL-7B row measured at 7.59 GiB -> 7.62.
    """
    flags = row["command"].split()
    flag = lambda name, default: flags[flags.index(name) + 1] if name in flags else default
    cfg = with_changes(preset(flag("--preset", "ultra_low_memory")), {
        "training": {"gradient_accumulation_steps": int(flag("--training.gradient_accumulation_steps", 1))},
        "hardware": {"embeddings_on_cpu": "--hardware.embeddings_on_cpu" in flags}})
    return estimate_vlm(row["shape"], cfg, max_length=max(row["text_tokens"]), image_size=COMMAND_IMAGE_SIZE,
                        loss_rows=ANSWER_TOKENS).total_gib


# The vlm command on 7B-shape LLaVA and Qwen2-VL folders under allocator caps, each peak beside the estimate,
# with the options beyond the benchmark's usual flags.
COMMAND_RUNS = Table("vlm_hf_7b", "figures.runs", columns=(
    ("shape", "shape", ""), ("cap (GiB)", "cap_gib", ""),
    ("text tokens", lambda r: min(r.get("text_tokens") or [0]), ""), ("steps", lambda r: r.get("steps", 0), ""),
    ("peak allocated (GiB)", "peak_allocated_gib", ".2f"),
    ("reserved (GiB)", "peak_reserved_gib", ".2f"), ("estimate (GiB)", command_estimate, ".2f"),
    ("estimate off", _ok(lambda r: command_estimate(r) / r["peak_allocated_gib"] - 1), "+.1%"),
    ("status", "status", ""),
    ("options", lambda r: " ".join(f for f in r.get("command", "").split() if f == "--hardware.embeddings_on_cpu")
     or None, "")))

# The seconds per step of ``speed_verdict``'s runs (after the first step, a warm-up).
SPEED_COLUMNS = (("run", "what", ""), ("steps timed", "steps", ""), ("seconds per step", "qlora_s", ".3f"),
                 ("against LoRA", "slowdown_pct", "{:+.1f} %"))


def measured_methods(bench: dict | None) -> dict:
    """Peak allocated GiB of QLoRA (run ``8gb-s512``) and LoRA on a 16-bit base (the knob run), or ``None``."""
    rows = {r["name"]: r for r in _figures(bench).get("rows", [])}
    return {"qlora": rows.get("8gb-s512", {}).get("peak_allocated_gib"),
            "lora": rows.get(LORA_ROW, {}).get("peak_allocated_gib")}


def measured_knobs(bench: dict | None) -> dict:
    """``{knob name: {"knob", "peak_allocated_gib", "delta_gib", "estimate_delta_gib"}}`` of the knob runs."""
    return {k["knob"]: k for k in _figures(bench).get("knobs", [])}


def gpu_benchmark_summary(bench: dict | None) -> dict:
    """What the notebook's results keep: whether the file exists, the capped runs and the knob runs."""
    return {"present": bench is not None, "proofs": _figures(bench).get("proofs", {}),
            "knobs_measured": list(measured_knobs(bench).values())}


def _mean_step(row: dict) -> tuple[float, int]:
    seconds = [s["seconds"] for s in row["steps"][1:]]     # the first step is a warm-up
    return sum(seconds) / len(seconds), len(seconds)


def speed_verdict(bench: dict | None, claim: tuple = SEED_SLOWDOWN_PCT) -> dict:
    """The seed's "QLoRA is 30-40 % slower than LoRA" against LoRA on a 16-bit base (``LORA_ROW``) and each
    QLoRA run of the same work (``SAME_WORK``), from the step seconds of ``benchmarks/vlm_8gb.py``.

    ``verdict``: ``holds`` when every slowdown lies inside the claimed band, ``refuted`` when none does,
    ``mixed`` otherwise, ``no verdict`` (with ``missing``, why) when the file lacks what it takes.
    """
    rows = {r["name"]: r for r in _figures(bench).get("rows", []) if r.get("status") == "ok" and r.get("steps", [])[1:]}
    judged = {"verdict": "no verdict", "claim_pct": list(claim)}
    if not bench:
        return {"missing": "no benchmarks/results/vlm_8gb.json: run python -m benchmarks.vlm_8gb on a GPU", **judged}
    if LORA_ROW not in rows:
        return {"missing": f"benchmarks/results/vlm_8gb.json has no 16-bit LoRA baseline (row {LORA_ROW!r}): "
                           "run python -m benchmarks.vlm_8gb --only knobs", **judged}
    lora, lora_steps = _mean_step(rows[LORA_ROW])
    runs = []
    for name, what in SAME_WORK.items():
        if name in rows:
            q, steps = _mean_step(rows[name])
            runs.append({"run": name, "what": what, "steps": steps, "qlora_s": round(q, 3),
                         "accum": rows[name].get("gradient_accumulation_steps", 1),
                         "slowdown_pct": round(100 * (q / lora - 1), 1)})
    if not runs:
        return {"missing": "benchmarks/results/vlm_8gb.json has no QLoRA run of the same work as the baseline",
                **judged}
    inside = [claim[0] <= r["slowdown_pct"] <= claim[1] for r in runs]
    return {"lora_s": round(lora, 3), "lora_steps": lora_steps, "runs": runs,
            "jobs_at_a_time": _figures(bench).get("jobs_at_a_time", 1), "device": bench["device"]["name"],
            "verdict": "holds" if all(inside) else "refuted" if not any(inside) else "mixed", "claim_pct": list(claim)}


def speed_rows(verdict: dict) -> list[dict]:
    """The LoRA baseline and each QLoRA run of ``speed_verdict``, the rows of ``SPEED_COLUMNS``."""
    if "missing" in verdict:
        return []
    return [{"what": "LoRA, 16-bit base", "steps": verdict["lora_steps"], "qlora_s": verdict["lora_s"]},
            *({**r, "what": f"QLoRA, {r['what']}"} for r in verdict["runs"])]


def speed_report(verdict: dict) -> str:
    """The verdict on the seed's claim, what 1000 steps of the 8 GB preset take at the measured pace, and
    a caveat when the benchmark shared its GPU."""
    low, high = verdict["claim_pct"]
    if "missing" in verdict:
        return f"the seed's {low}-{high} % slower: no verdict: {verdict['missing']}"
    first = verdict["runs"][0]
    lines = [f"measured on one {verdict['device']}, LLaVA-1.5-7B shape, 512 + 576 tokens, batch 1 x {first['accum']} "
             f"accumulation; the seed's {low}-{high} % slower: {verdict['verdict']} (measured "
             + ", ".join(f"{r['slowdown_pct']:+.1f} %" for r in verdict["runs"]) + ")",
             f"the seed's cards were not measured, so its table gets no verdict; for scale (estimate): 1000 steps "
             f"of the 8 GB preset (1 x 32 accumulation) at the pace of {first['what']} take "
             f"{1000 * 32 * first['qlora_s'] / first['accum'] / 3600:.1f} h on this GPU"]
    if verdict["jobs_at_a_time"] > 1:
        lines.append(f"caveat: the benchmark ran {verdict['jobs_at_a_time']} runs at a time on the one GPU, so each "
                     f"step shared it with others; python -m benchmarks.vlm_8gb --only knobs --jobs 1 times them alone")
    return "\n".join(lines)
