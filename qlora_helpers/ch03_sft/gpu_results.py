"""The GPU measurements chapter 03 shows, as finished tables, lines and figures.

Three result files of ``benchmarks/`` (written on a GPU, committed): ``sft_modes.json`` (the four
modes at Qwen2.5-0.5B shape, the seed guide's way), ``throughput.json`` (plain peft + bitsandbytes,
TRL and the recipe, with one lever switched at a time) and ``recipe_profile.json`` (where the time
of one recipe step goes). Each function takes a file as ``common.optional_benchmark`` returns it, ``None``
when it is missing, and says so instead of failing.

Example:
    >>> note, table = sft_modes_vs_seed(optional_benchmark("sft_modes"))   # doctest: +SKIP
    >>> print(note); display(Markdown(table))                              # doctest: +SKIP
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

# The seed guide's claims for Qwen2.5-0.5B: memory (GB) and trainable share (%) of each mode.
SEED_TABLE = {"full": (8.0, 100.0), "lora": (6.0, 3.0), "qlora-4bit": (3.0, 3.0), "qlora-8bit": (4.0, 3.0)}
# The rows of throughput.json that the figure compares, and their labels.
THROUGHPUT_LABELS = {"hf": "(a) peft + bnb, the seed's way", "trl": "(b) TRL SFTTrainer, defaults",
                     "recipe": "(c) recipe, budget 0.7 x (a)", "recipe-max": "(c) recipe, large micro-batch"}
ABLATION = "recipe-max-"   # rows of throughput.json that switch one lever of the large-micro-batch recipe


SCRIPTS = {"throughput": "train_throughput"}   # result files whose script has another name


def _missing(name: str) -> str:
    script = SCRIPTS.get(name, name)
    return (f"no GPU measurement yet (benchmarks/results/{name}.json is missing: "
            f"run python -m benchmarks.{script} on a GPU)")


def _stamp(result: dict) -> str:
    return f"{result['device']['name']}, {result['date'][:10]}"


# --------------------------------------------------------------------------- sft_modes.json
def _verdicts(measured: dict, memory_gb: float, share_pct: float) -> str:
    ratio = measured["peak_memory_gib"] / memory_gb
    verdict = "matches" if 0.67 <= ratio <= 1.5 else ("lower than claimed" if ratio < 0.67 else "higher than claimed")
    share_ratio = measured["trainable_percent"] / share_pct
    share = ("share matches" if 0.5 <= share_ratio <= 2 else ("share lower" if share_ratio < 0.5 else "share higher"))
    return f"memory {verdict}, trainable {share}"


def sft_modes_vs_seed(result: dict | None) -> tuple[str, str]:
    """(what was measured where, a markdown table): the seed's memory and trainable share of each mode next
    to the GPU measurement, with a verdict (memory within 0.67-1.5x, share within 0.5-2x: "matches")."""
    rows = ["| mode | seed: memory (GB) | seed: trainable % | GPU: peak memory (GiB) | GPU: trainable % "
            "| GPU: tokens/s | verdict |", "|---|---:|---:|---:|---:|---:|---|"]
    modes = result["figures"]["modes"] if result else {}
    for name, (mem, pct) in SEED_TABLE.items():
        g = modes.get(name)
        if g is None:
            rows.append(f"| {name} | ~{mem:g} | ~{pct:g} | – | – | – | not measured |")
            continue
        rows.append(f"| {name} | ~{mem:g} | ~{pct:g} | {g['peak_memory_gib']:.2f} | {g['trainable_percent']:.2f} | "
                    f"{g.get('tokens_per_second', float('nan')):.0f} | {_verdicts(g, mem, pct)} |")
    if not result:
        return _missing("sft_modes"), "\n".join(rows)
    settings = modes["lora"]["settings"]
    note = (f"measured on {result['device']['name']} ({result['date'][:10]}), {result['figures']['shape']} shape, "
            f"batch {settings['per_device_train_batch_size']}, r {settings['lora_r']}: `{result['command']}`")
    return note, "\n".join(rows)


# --------------------------------------------------------------------------- throughput.json
def throughput_figure(result: dict | None) -> tuple[str, Figure | None]:
    """(what was measured where, a figure): tokens per second (log scale) and peak memory of (a), (b) and
    (c) at each model shape."""
    if not result:
        return _missing("throughput"), None
    tp = result["figures"]
    note = f"{_stamp(result)}; LoRA {tp['lora']}; MFU: {tp['mfu_basis']}"
    fig = Figure(figsize=(6 * len(tp["shapes"]), 5.5))
    axes = fig.subplots(2, len(tp["shapes"]), squeeze=False)
    for col, (shape, entry) in enumerate(tp["shapes"].items()):
        rows = {n: entry["rows"][n] for n in THROUGHPUT_LABELS if "tokens_per_second" in entry["rows"].get(n, {})}
        names = [THROUGHPUT_LABELS[n] for n in rows]
        speed, memory = axes[0][col], axes[1][col]
        speed.barh(names, [r["tokens_per_second"] for r in rows.values()], color="tab:blue")
        speed.set_xscale("log")
        speed.xaxis.set_minor_formatter(NullFormatter())
        speed.set_title(f"{shape}: tokens per second (log scale)")
        memory.barh(names, [r["peak_allocated_gib"] for r in rows.values()], color="tab:orange")
        memory.set_title(f"{shape}: peak allocated GiB")
        for ax in (speed, memory):
            ax.invert_yaxis()
            if col:
                ax.set_yticklabels([])
    fig.tight_layout()
    return note, fig


def throughput_targets(result: dict | None) -> dict:
    """The targets set for the recipe at each shape, with the measured value and whether it was met."""
    return {shape: entry["targets"] for shape, entry in result["figures"]["shapes"].items()} if result else {}


def targets_table(result: dict | None) -> str:
    """A markdown table of ``throughput_targets``: wanted, measured, met or by how much not."""
    if not result:
        return _missing("throughput")
    lines = ["| shape | target | wanted | measured | met? |", "|---|---|---:|---:|---|"]
    for shape, targets in throughput_targets(result).items():
        for name, t in targets.items():
            wanted = ("≤ " if name == "memory_vs_hf" else "≥ ") + f"{t['target']:g}"
            gap = "yes" if t["met"] else f"no, by {abs(t['value'] - t['target']):.3f}"
            lines.append(f"| {shape} | {name} | {wanted} | {t['value']:.3f} | {gap} |")
    return "\n".join(lines)


def plan_lines(result: dict | None) -> list[str]:
    """Per shape: the micro-batch the recipe planned for its budget, the estimate against the measured
    peak, and how close the recipe's losses stayed to plain peft's."""
    lines = []
    for shape, entry in (result["figures"]["shapes"] if result else {}).items():
        recipe = entry["rows"]["recipe"]
        plan = recipe["spec"]["plan"]
        lines.append(f"{shape}: the recipe row planned {plan['tokens']} tokens per micro-batch"
                     f"{' with' if plan['gradient_checkpointing'] else ' without'} checkpointing for "
                     f"{plan['budget_gib']:.2f} GiB; the estimate was {plan['estimate_gib']:.2f} GiB, "
                     f"the measured peak {recipe['peak_allocated_gib']:.2f} GiB")
        par = entry.get("loss_parity")
        if par:
            lines.append(f"    loss parity (c) vs (a): per-step losses differ by at most "
                         f"{100 * par['max_rel_diff']:.2f} %, held-out loss after training by "
                         f"{100 * par['eval_rel_diff']:.2f} %")
    return lines


def missed_targets(result: dict | None) -> list[str]:
    """Each target the recipe missed, with the benchmark's own account of why."""
    return [f"{shape} {name} missed, {t['why']}" for shape, targets in throughput_targets(result).items()
            for name, t in targets.items() if not t["met"]]


def _ablation_line(name: str, row: dict, base: dict) -> str:
    lever = name[len(ABLATION):]
    if "tokens_per_second" not in row:
        return f"    {lever:<15} not measured: {row.get('error', 'no row')[:100]}"
    loss_change = 100 * (row["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
    return (f"    {lever:<15} tokens/s x{row['tokens_per_second'] / base['tokens_per_second']:.2f}, "
            f"memory {row['peak_allocated_gib'] - base['peak_allocated_gib']:+5.1f} GiB, MFU {row['mfu']:.3f}, "
            f"held-out loss {loss_change:+.2f} %")


def ablation_lines(result: dict | None) -> list[str]:
    """Per shape: the large-micro-batch recipe, then each lever switched on its own, relative to it."""
    lines = []
    for shape, entry in (result["figures"]["shapes"] if result else {}).items():
        base = entry["rows"]["recipe-max"]
        lines.append(f"{shape}: recipe-max {base['tokens_per_second']:.0f} tokens/s, "
                     f"{base['peak_allocated_gib']:.1f} GiB, MFU {base['mfu']:.3f}, kernels {base.get('kernels')}")
        lines += [_ablation_line(n, r, base) for n, r in entry["rows"].items() if n.startswith(ABLATION)]
    return lines


# --------------------------------------------------------------------------- throughput_peers.json
# The stacks of the peer comparison: TRL configured well, Unsloth, and the recipe at its two memory settings.
PEER_LABELS = {"trl-best": "TRL packed + Liger, checkpointing",
               "trl-best-no-ckpt": "TRL packed + Liger, no checkpointing", "unsloth": "Unsloth, its checkpointing",
               "recipe": "recipe, budget 0.7 x (a)",
               "recipe-tight": "recipe, TRL's peak as budget", "recipe-max": "recipe, large micro-batch"}
PEER_SHAPES = ("qwen2.5-0.5b", "qwen2.5-7b", "llama-3-8b")
PEER_ROWS = ("trl-best", "trl-best-no-ckpt", "unsloth", "recipe-tight", "recipe-max")


def peer_points(peers: dict | None, throughput: dict | None) -> list[dict]:
    """One point per stack and shape: tokens/s, peak GiB and the run it comes from. Rows of
    ``throughput_peers.json`` first; a recipe row it lacks comes from ``throughput.json``, marked with that
    run's steps and tokens per step (a different protocol: fewer, smaller steps, all rows in one process)."""
    points = []
    for result in (peers, throughput):
        for shape, entry in (result["figures"]["shapes"] if result else {}).items():
            for name, label in PEER_LABELS.items():
                row = entry["rows"].get(name, {})
                if not row.get("tokens_per_second") or any(p["shape"] == shape and p["stack"] == name for p in points):
                    continue
                points.append({"shape": shape, "stack": name, "label": label,
                               "tokens_per_second": row["tokens_per_second"],
                               "peak_gib": row.get("peak_allocated_gib"), "mfu": row.get("mfu"),
                               "run": f"{entry['steps']} steps of ~{entry['step_tokens']:,} tokens",
                               "file": "throughput_peers.json" if result is peers else "throughput.json"})
    return points


def peer_table(points: list[dict]) -> str:
    """A markdown table of ``peer_points``, fastest first within each shape."""
    lines = ["| shape | stack | tokens/s | peak allocated (GiB) | MFU | run | file |",
             "|---|---|---:|---:|---:|---|---|"]
    for p in sorted(points, key=lambda p: (p["shape"], -p["tokens_per_second"])):
        lines.append(f"| {p['shape']} | {p['label']} | {p['tokens_per_second']:,.0f} | {p['peak_gib']:.2f} | "
                     f"{p['mfu'] or 0:.3f} | {p['run']} | {p['file']} |")
    return "\n".join(lines)


def peer_figure(points: list[dict]) -> Figure:
    """Speed against peak memory, one point per stack and shape (up and to the left is better)."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    colors = dict(zip(PEER_LABELS, ("tab:blue", "tab:cyan", "tab:green", "tab:gray", "tab:orange", "tab:red")))
    markers = dict(zip(PEER_SHAPES, "osD"))
    for p in points:
        hollow = p["file"] == "throughput.json"
        ax.scatter(p["peak_gib"], p["tokens_per_second"], s=70, marker=markers.get(p["shape"], "^"),
                   facecolors="none" if hollow else colors[p["stack"]], edgecolors=colors[p["stack"]])
        ax.annotate(f"{p['shape']}: {p['label']}", (p["peak_gib"], p["tokens_per_second"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.35, y=0.1)
    ax.set_xlabel("peak allocated GiB (log)")
    ax.set_ylabel("tokens per second (log)")
    ax.set_title("QLoRA stacks: speed against memory (hollow: throughput.json's earlier protocol)")
    fig.tight_layout()
    return fig


def unmeasured_peer_rows(peers: dict | None) -> list[str]:
    """Per shape, the rows of the peer comparison ``throughput_peers.json`` does not hold yet (or holds as errors)."""
    shapes = peers["figures"]["shapes"] if peers else {}
    lines = []
    for shape in PEER_SHAPES:
        rows = shapes.get(shape, {}).get("rows", {})
        missing = [n for n in PEER_ROWS if not rows.get(n, {}).get("tokens_per_second")]
        errors = [f"{n} ({rows[n]['error'][:80]})" for n in missing if rows.get(n, {}).get("error")]
        if missing:
            absent = ", ".join(n for n in missing if n not in rows) or "-"
            lines.append(f"{shape}: not yet in throughput_peers.json: {absent}"
                         + (f"; failed: {', '.join(errors)}" if errors else ""))
    return lines


# --------------------------------------------------------------------------- recipe_profile.json
def _profile_figure(shape: str, row: dict) -> Figure:
    kinds = row["kinds_ms"]
    fig = Figure(figsize=(7, 0.35 * len(kinds) + 1))
    ax = fig.subplots()
    ax.barh(list(kinds), list(kinds.values()), color="tab:purple")
    ax.invert_yaxis()
    ax.set_xlabel("GPU milliseconds in one step")
    ax.set_title(f"{shape}, {row['variant']}: {row['real_tokens']} tokens, kernels {row['kernels']}")
    fig.tight_layout()
    return fig


def step_profiles(result: dict | None) -> list[tuple[Figure, str]]:
    """Per profiled step: a figure of the GPU time of each kind of operator, and a line with the step time,
    MFU, the GPU's busy share of the step and the matrix products' share of the GPU time."""
    out = []
    for shape, entry in (result["figures"]["shapes"] if result else {}).items():
        for row in entry["time"]:
            if "kinds_ms" not in row:
                continue
            line = (f"step {row['step_seconds']:.3f} s, MFU {row['mfu']:.3f}; GPU busy {row['device_busy_ms']:.0f} ms, "
                    f"{100 * row['device_busy_share']:.0f} % of the profiled step; matrix products "
                    f"{100 * row['kinds_ms'].get('matmul', 0) / row['device_busy_ms']:.0f} % of the GPU time")
            out.append((_profile_figure(shape, row), line))
    return out
