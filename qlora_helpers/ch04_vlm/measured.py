"""What ``benchmarks/vlm_8gb.py`` measured on a GPU, in the shapes the chapter shows.

Each function takes the loaded result file (``common.load_benchmark("vlm_8gb")``) or ``None`` when
the benchmark has not been run, and then answers with empty values, never an error:

- ``measured_methods``: the peak of QLoRA (the 8 GB preset) and of LoRA (its 16-bit-base knob run);
- ``measured_knobs``: the knob runs by name, each with its change against the 8 GB preset;
- ``proof_table``: the runs under the 7.5 GiB cap, as printed lines;
- ``gpu_benchmark_summary``: what the notebook's results keep of the file.

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
