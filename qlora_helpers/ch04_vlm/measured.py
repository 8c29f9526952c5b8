"""What ``benchmarks/vlm_8gb.py`` and ``benchmarks/vlm_hf_7b.py`` measured on a GPU, in the shapes the chapter shows.

Each function takes the loaded result file (``common.load_benchmark("vlm_8gb")``) or ``None`` when
the benchmark has not been run, and then answers with empty values, never an error:

- ``measured_methods``: the peak of QLoRA (the 8 GB preset) and of LoRA (its 16-bit-base knob run);
- ``measured_knobs``: the knob runs by name, each with its change against the 8 GB preset;
- ``proof_table``: the runs under the 7.5 GiB cap, as printed lines;
- ``gpu_benchmark_summary``: what the notebook's results keep of the file;
- ``speed_verdict`` / ``speed_report``: QLoRA's step seconds against LoRA's on a 16-bit base, and the
  seed's "30-40 % slower" judged by them;
- ``command_proof_table``: the ``vlm`` command on 7B-shape LLaVA and Qwen2-VL folders under allocator caps
  (``vlm_hf_7b.json``), each peak beside the estimate.

Example:
    >>> measured_methods(None)
    {'qlora': None, 'lora': None}
    >>> proof_table(None)
    'no GPU measurement yet: run python -m benchmarks.vlm_8gb on a CUDA machine'
"""

from __future__ import annotations


def _figures(bench: dict | None) -> dict:
    return (bench or {}).get("figures", {})


def measured_methods(bench: dict | None) -> dict:
    """Peak allocated GiB of QLoRA (run ``8gb-s512``) and LoRA on a 16-bit base (the knob run), or ``None``."""
    rows = {r["name"]: r for r in _figures(bench).get("rows", [])}
    return {"qlora": rows.get("8gb-s512", {}).get("peak_allocated_gib"),
            "lora": rows.get("knob: 16-bit base (LoRA, no 4-bit)", {}).get("peak_allocated_gib")}


def measured_knobs(bench: dict | None) -> dict:
    """``{knob name: {"knob", "peak_allocated_gib", "delta_gib", "estimate_delta_gib"}}`` of the knob runs."""
    return {k["knob"]: k for k in _figures(bench).get("knobs", [])}


def proofs(bench: dict | None) -> dict:
    """The runs under a memory cap by name: status, cap, tokens, steps, peaks, estimate, what fits instead."""
    return _figures(bench).get("proofs", {})


def _proof_line(name: str, p: dict) -> str:
    line = (f"{name:<16}{p['cap_gib']:>5}G{p['lm_tokens'] or '-':>8}{p['steps_completed']:>7}"
            f"{p['peak_allocated_gib'] or '-':>11}G{p['peak_reserved_gib'] or '-':>9}G{p['estimate_gib'] or '-':>9}G  "
            f"{p['status']}")
    return line + (f"; fits instead: {p['what_fits_instead']}" if p.get("what_fits_instead") else "")


def proof_table(bench: dict | None) -> str:
    """Where it ran, one line per capped run, then for each that succeeded the room left under its cap
    and how far the estimate was off; the seed's rank-16 row if it ran."""
    if not bench:
        return "no GPU measurement yet: run python -m benchmarks.vlm_8gb on a CUDA machine"
    d, v, runs = bench["device"], bench["versions"], proofs(bench)
    lines = [f"measured on {d['name']} ({bench['date']}), torch {v['torch']}, bitsandbytes {v['bitsandbytes']}",
             f"{'run':<16}{'cap':>6}{'tokens':>8}{'steps':>7}{'peak alloc':>12}{'reserved':>10}{'estimate':>10}"
             "  status"]
    lines += [_proof_line(name, p) for name, p in runs.items()]
    for name, p in runs.items():
        if p["status"] == "ok":
            off = 100 * (p["estimate_gib"] - p["peak_allocated_gib"]) / p["peak_allocated_gib"]
            lines.append(f"{name}: {p['steps_completed']} steps at {p['lm_tokens']} tokens, "
                         f"{p['cap_gib'] - p['peak_reserved_gib']:.2f} GiB of the {p['cap_gib']} GiB cap to spare; "
                         f"estimate off by {off:+.1f} %")
    r16 = runs.get("8gb-r16-s512", {})
    if r16.get("status") == "ok":
        lines.append(f"the seed's rank-16 row (7.5 GB on a 12 GB card): {r16['peak_reserved_gib']:.2f} GiB reserved, "
                     "and it ran under the 8 GB cap too")
    return "\n".join(lines)


def gpu_benchmark_summary(bench: dict | None) -> dict:
    """What the notebook's results keep: whether the file exists, the capped runs and the knob runs."""
    return {"present": bench is not None, "proofs": proofs(bench),
            "knobs_measured": list(measured_knobs(bench).values())}


# The seed's speed claims: QLoRA 30-40 % slower than LoRA, and its table of cards against an A100
SEED_SLOWDOWN_PCT = (30, 40)
SEED_SPEED = (("A100 80GB", 1.0, "1 h"), ("RTX 4090", 0.7, "1.5 h"), ("RTX 3060 12GB", 0.3, "3-4 h"),
              ("RTX 4060 8GB", 0.25, "4-5 h"))
LORA_ROW = "knob: 16-bit base (LoRA, no 4-bit)"     # the 8 GB preset with its 4-bit base off: LoRA in 16 bits
SAME_WORK = {"8gb-s512": "the 8 GB proof", "knob: torch AdamW (32-bit states)": "the optimizer knob"}


def step_seconds(row: dict) -> list[float]:
    """Seconds of each optimizer step after the first (a warm-up), the steps the benchmark averages."""
    return [s["seconds"] for s in row.get("steps", [])[1:]]


def speed_comparisons(bench: dict | None) -> dict:
    """QLoRA against LoRA on a 16-bit base, from the step seconds of ``benchmarks/vlm_8gb.py``.

    The baseline is the knob run that turns the 8 GB preset's 4-bit base off. It is compared with
    every QLoRA run that does the same work per step (``SAME_WORK``: 512 text tokens, rank 8,
    checkpointing on; the optimizer knob changes only the update of 20 M adapter values).
    Returns ``{"lora_s", "runs": [{"run", "what", "qlora_s", "slowdown_pct"}], "jobs_at_a_time"}``,
    or ``{"missing": why}`` when the file lacks the baseline or every QLoRA run.
    """

    figures = _figures(bench)
    rows = {r["name"]: r for r in figures.get("rows", []) if r.get("status") == "ok" and step_seconds(r)}
    if not bench:
        return {"missing": "no benchmarks/results/vlm_8gb.json: run python -m benchmarks.vlm_8gb on a GPU"}
    if LORA_ROW not in rows:
        return {"missing": f"benchmarks/results/vlm_8gb.json has no 16-bit LoRA baseline (row {LORA_ROW!r}): "
                           "run python -m benchmarks.vlm_8gb --only knobs"}
    lora = sum(step_seconds(rows[LORA_ROW])) / len(step_seconds(rows[LORA_ROW]))
    runs = []
    for name, what in SAME_WORK.items():
        if name in rows:
            q = sum(step_seconds(rows[name])) / len(step_seconds(rows[name]))
            runs.append({"run": name, "what": what, "steps": len(step_seconds(rows[name])), "qlora_s": round(q, 3),
                         "accum": rows[name].get("gradient_accumulation_steps", 1),
                         "slowdown_pct": round(100 * (q / lora - 1), 1)})
    if not runs:
        return {"missing": "benchmarks/results/vlm_8gb.json has no QLoRA run of the same work as the baseline"}
    return {"lora_s": round(lora, 3), "lora_steps": len(step_seconds(rows[LORA_ROW])), "runs": runs,
            "jobs_at_a_time": figures.get("jobs_at_a_time", 1), "device": bench["device"]["name"]}


def speed_verdict(bench: dict | None, claim: tuple = SEED_SLOWDOWN_PCT) -> dict:
    """The seed's "QLoRA is 30-40 % slower" against every comparison of ``speed_comparisons``.

    ``holds`` when every measured slowdown lies inside the claimed band, ``refuted`` when every one
    lies outside it, ``mixed`` otherwise, ``no verdict`` when the file lacks what it takes.
    """
    comp = speed_comparisons(bench)
    if "missing" in comp:
        return {**comp, "verdict": "no verdict", "claim_pct": list(claim)}
    inside = [claim[0] <= r["slowdown_pct"] <= claim[1] for r in comp["runs"]]
    verdict = "holds" if all(inside) else "refuted" if not any(inside) else "mixed"
    return {**comp, "verdict": verdict, "claim_pct": list(claim)}


def speed_report(verdict: dict) -> str:
    """The seed's speed table, then what the benchmark file measured and the verdict, as printed lines."""
    lines = [f"{'seed: card':<16}{'speed vs A100':>14}{'1000 steps':>12}"]
    lines += [f"{card:<16}{rel:>13.2f}x{hours:>12}" for card, rel, hours in SEED_SPEED]
    low, high = verdict["claim_pct"]
    lines.append(f"seed: QLoRA is {low}-{high} % slower than LoRA")
    if "missing" in verdict:
        return "\n".join(lines + [f"no verdict: {verdict['missing']}"])
    first = verdict["runs"][0]
    lines.append(f"\nmeasured on one {verdict['device']}, LLaVA-1.5-7B shape, 512 + 576 tokens, batch 1 x "
                 f"{first['accum']} accumulation,\nseconds per step after the first:")
    lines.append(f"  {'LoRA, 16-bit base':<27}{verdict['lora_s']:.3f} s  ({verdict['lora_steps']} steps)")
    for r in verdict["runs"]:
        lines.append(f"  {'QLoRA, ' + r['what']:<27}{r['qlora_s']:.3f} s  ({r['steps']} steps): "
                     f"{r['slowdown_pct']:+.1f} % against LoRA")
    measured = ", ".join(f"{r['slowdown_pct']:+.1f} %" for r in verdict["runs"])
    lines.append(f"the seed's {low}-{high} % slower: {verdict['verdict']} (measured {measured})")
    lines.append(f"the seed's cards were not measured, so its table gets no verdict; for scale (estimate): 1000 steps "
                 f"of the 8 GB preset (1 x 32 accumulation) at the pace of {first['what']} take "
                 f"{1000 * 32 * first['qlora_s'] / first['accum'] / 3600:.1f} h on this GPU")
    if verdict["jobs_at_a_time"] > 1:
        lines.append(f"caveat: the benchmark ran {verdict['jobs_at_a_time']} runs at a time on the one GPU, so each "
                     f"step shared it with others; python -m benchmarks.vlm_8gb --only knobs --jobs 1 times them alone")
    return "\n".join(lines)


def _options(command: str) -> str:
    extra = [flag for flag in command.split() if flag == "--hardware.embeddings_on_cpu"]
    return f" ({', '.join(extra)})" if extra else ""


def command_proof_table(bench: dict | None) -> str:
    """One line per run of ``benchmarks/vlm_hf_7b.py``: shape, cap, text tokens, steps, peaks, estimate, status,
    and the options beyond the benchmark's usual flags (``--hardware.embeddings_on_cpu``)."""
    if not bench:
        return "no GPU measurement yet: run python -m benchmarks.vlm_hf_7b on a CUDA machine"
    d, v = bench["device"], bench["versions"]
    lines = [f"measured on {d['name']} ({bench['date'][:10]}), torch {v['torch']}, transformers "
             f"{v['transformers']}, bitsandbytes {v['bitsandbytes']}",
             f"{'shape':<14}{'cap':>6}{'text tokens':>13}{'steps':>7}{'peak alloc':>12}{'reserved':>10}"
             f"{'estimate':>10}  status"]
    for r in _figures(bench).get("runs", []):
        tokens = min(r.get("text_tokens") or [0])
        lines.append(f"{r['shape']:<14}{r['cap_gib']:>5}G{tokens:>13}{r.get('steps', 0):>7}"
                     f"{r.get('peak_allocated_gib', 0):>11.2f}G{r.get('peak_reserved_gib', 0):>9.2f}G"
                     f"{r.get('estimate_gib', 0):>9.2f}G  {r['status']}{_options(r.get('command', ''))}")
    return "\n".join(lines)
