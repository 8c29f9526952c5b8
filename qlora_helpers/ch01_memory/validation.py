"""The estimate against the peaks measured on a GPU (``benchmarks/results/memory_validation.json``).

``benchmarks/memory_validation.py`` saves random weights at real width, loads them as a user does
(``from_pretrained``, 4-bit / 8-bit through ``BitsAndBytesConfig``), trains each configuration for a few
steps (``measurement.measure``) and records the measured peaks, allocated and reserved, next to the
estimate. ``VALIDATION`` is the table of that file for ``common.results.table``; ``validation_summary``
and ``validation_plot`` say how close the estimate came.

Example:
    >>> bench = optional_benchmark("memory_validation")     # doctest: +SKIP
    >>> display(Markdown(table(bench, VALIDATION))); print(validation_summary(bench))   # doctest: +SKIP
"""

from __future__ import annotations

from matplotlib.figure import Figure

from qlora_helpers.common.results import Table, plot, select

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
