"""The estimate against the peaks measured on a GPU (``benchmarks/results/memory_validation.json``).

``benchmarks/memory_validation.py`` saves random weights at real width, loads them as a user does
(``from_pretrained``, 4-bit / 8-bit through ``BitsAndBytesConfig``), trains each configuration for a few
steps (``measurement.measure``) and records the measured peaks, allocated and reserved, next to the
estimate; this module reads that file for the notebook.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from qlora_helpers.common.files import optional_benchmark

NAME = "memory_validation"


def validation() -> dict | None:
    """``{"source", "rows", "summary", "slack", "outside"}`` from the result file, or None if there is none.

    ``rows``: one per configuration that ran (name, layers, predicted and measured allocated and reserved,
    errors %); ``slack``: the (min, max) share by which reserved exceeded the peak allocated; ``outside``:
    the (min, max) GiB the device held beyond PyTorch's reserve (CUDA context, paged optimizer states);
    ``worst``: the largest absolute errors, allocated and reserved, in percent.
    """
    bench = optional_benchmark(NAME)
    if bench is None:
        return None
    ok = [r for r in bench["figures"]["rows"] if r["status"] == "ok"]
    rows = [{"name": r["name"], "layers": (r["config"]["layers"], r["config"]["real_layers"]),
             "predicted_gib": r["predicted_gib"], "predicted_reserved_gib": r["predicted_reserved_gib"],
             "allocated_gib": r["measured"]["peak_allocated_gib"], "reserved_gib": r["measured"]["peak_reserved_gib"],
             "outside_gib": r["measured"]["device_used_gib"] - r["measured"]["reserved_now_gib"],
             "error_pct": r["error_pct"], "reserved_error_pct": r["reserved_error_pct"]} for r in ok]
    slack = [r["reserved_gib"] / r["allocated_gib"] - 1 for r in rows]
    outside = [r["outside_gib"] for r in rows]
    source = (f"measured on {bench['device']['name']}, torch {bench['versions']['torch']}, transformers "
              f"{bench['versions']['transformers']}, {bench['date']}")
    worst = (max(abs(r["error_pct"]) for r in rows), max(abs(r["reserved_error_pct"]) for r in rows))
    return {"source": source, "device": bench["device"]["name"], "rows": rows, "summary": bench["figures"]["summary"],
            "slack": (min(slack), max(slack)), "outside": (min(outside), max(outside)), "worst": worst,
            "families": len({r["config"]["model"].split("-")[0] for r in ok})}


def validation_table(v: dict) -> str:
    lines = [v["source"], f"{'':<30}{'layers':>8}   allocated: estimate measured error   "
                          "reserved: estimate measured error (GiB, %)"]
    lines += [f"  {r['name']:<28}{r['layers'][0]:>3} of {r['layers'][1]:<3} {r['predicted_gib']:17.2f}"
              f"{r['allocated_gib']:9.2f}{r['error_pct']:+7.1f}{r['predicted_reserved_gib']:20.2f}"
              f"{r['reserved_gib']:9.2f}{r['reserved_error_pct']:+7.1f}" for r in v["rows"]]
    lines.append(f"{len(v['rows'])} configurations: worst error {v['worst'][0]:.1f} % on the peak allocated, "
                 f"{v['worst'][1]:.1f} % on the peak reserved")
    lines.append(f"reserved exceeded the peak allocated by {v['slack'][0]:.0%} to {v['slack'][1]:.0%}; the device "
                 f"held {v['outside'][0]:.2f} to {v['outside'][1]:.2f} GiB beyond PyTorch's reserve "
                 "(CUDA context, paged states)")
    return "\n".join(lines)


def validation_plot(v: dict, *, band: float = 0.10, label_above_pct: float = 2.0):
    """Estimate against measured peak, one point per configuration, with a +-``band`` area."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    xs = [r["allocated_gib"] for r in v["rows"]]
    ax.scatter(xs, [r["predicted_gib"] for r in v["rows"]], s=18)
    top = max(xs) * 1.1
    ax.plot([0, top], [0, top], "k-", lw=0.8)
    ax.fill_between([0, top], [0, (1 - band) * top], [0, (1 + band) * top], color="grey", alpha=0.15,
                    label=f"±{band:.0%}")
    for r in v["rows"]:
        if abs(r["error_pct"]) > label_above_pct:
            ax.annotate(r["name"], (r["allocated_gib"], r["predicted_gib"]), fontsize=7)
    ax.set_xlabel(f"measured peak allocated, GiB ({v['device']})")
    ax.set_ylabel("estimate, GiB")
    ax.legend()
    return fig
