"""The GPU measurements chapter 03 shows: the specs of its tables (read by ``common.results``) and its figures.

Four result files of ``benchmarks/`` (written on a GPU, committed): ``sft_modes.json`` (the four
modes at Qwen2.5-0.5B shape, the seed guide's way), ``throughput.json`` (plain peft + bitsandbytes,
TRL and the recipe, with one lever switched at a time), ``throughput_peers.json`` (the fastest peers)
and ``recipe_profile.json`` (where the time of one recipe step goes). Each function takes a file as
``common.optional_benchmark`` returns it; a table of a missing file is the line saying so.

Example:
    >>> sft_modes = optional_benchmark("sft_modes")                              # doctest: +SKIP
    >>> display(Markdown(table(sft_modes, SFT_MODES))); print(stamp(sft_modes))  # doctest: +SKIP
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from qlora_helpers.common.results import Table, missing, plot, stamp

# The seed guide's claims for Qwen2.5-0.5B: memory (GB) and trainable share (%) of each mode.
SEED_TABLE = {"full": (8.0, 100.0), "lora": (6.0, 3.0), "qlora-4bit": (3.0, 3.0), "qlora-8bit": (4.0, 3.0)}
# The rows of throughput.json that the figure compares, and their labels.
THROUGHPUT_LABELS = {"hf": "(a) peft + bnb, the seed's way", "trl": "(b) TRL SFTTrainer, defaults",
                     "recipe": "(c) recipe, budget 0.7 x (a)", "recipe-max": "(c) recipe, large micro-batch"}
ABLATION = "recipe-max-"   # rows of throughput.json that switch one lever of the large-micro-batch recipe


# --------------------------------------------------------------------------- sft_modes.json
def seed_verdict(row: dict) -> str:
    """A mode's GPU measurement against the seed's claim: memory within 0.67-1.5x and share within 0.5-2x "match"."""
    memory_gb, share_pct = SEED_TABLE[row["mode"]]
    ratio = row["peak_memory_gib"] / memory_gb
    verdict = "matches" if 0.67 <= ratio <= 1.5 else ("lower than claimed" if ratio < 0.67 else "higher than claimed")
    share_ratio = row["trainable_percent"] / share_pct
    share = ("share matches" if 0.5 <= share_ratio <= 2 else ("share lower" if share_ratio < 0.5 else "share higher"))
    return f"memory {verdict}, trainable {share}"


SFT_MODES = Table("sft_modes", "figures.modes", key="mode", where=lambda r: r["mode"] in SEED_TABLE, columns=(
    ("mode", "mode", ""), ("seed: memory (GB)", lambda r: SEED_TABLE[r["mode"]][0], "~{:g}"),
    ("seed: trainable %", lambda r: SEED_TABLE[r["mode"]][1], "~{:g}"),
    ("GPU: peak memory (GiB)", "peak_memory_gib", ".2f"), ("GPU: trainable %", "trainable_percent", ".2f"),
    ("GPU: tokens/s", "tokens_per_second", ".0f"), ("verdict", seed_verdict, "")))


def sft_modes_setting(result: dict) -> str:
    """The shape, batch and rank the four modes ran with, and the command."""
    settings = result["figures"]["modes"]["lora"]["settings"]
    return (f"{result['figures']['shape']} shape, batch {settings['per_device_train_batch_size']}, "
            f"r {settings['lora_r']}: `{result['command']}`")


# --------------------------------------------------------------------------- throughput.json
def _targets(result: dict) -> list[dict]:
    return [{"shape": shape, "name": name, **t} for shape, entry in result["figures"]["shapes"].items()
            for name, t in entry["targets"].items()]


# The targets set for the recipe at each shape: wanted, measured, met or by how much not.
TARGETS = Table("throughput", _targets, script="train_throughput", columns=(
    ("shape", "shape", ""), ("target", "name", ""),
    ("wanted", lambda r: ("≤ " if r["name"] == "memory_vs_hf" else "≥ ") + f"{r['target']:g}", ""),
    ("measured", "value", ".3f"),
    ("met?", lambda r: "yes" if r["met"] else f"no, by {abs(r['value'] - r['target']):.3f}", "")))


def _not_measured(row: dict) -> str:
    """Why an ablation row has no figures: the error it recorded (type and first line), or, for an exception
    raised without a message (a bare ``assert``), that it had none."""
    error = row.get("error", "no row")
    kind, _, message = error.partition(": ")
    return f"not measured: {error[:100]}" if message.strip() or kind == error else \
        f"not measured: {kind} raised without a message"


def _ablation(result: dict) -> list[dict]:
    rows = []
    for shape, entry in result["figures"]["shapes"].items():
        base = entry["rows"]["recipe-max"]
        rows.append({"shape": shape, "lever": "recipe-max", **base})
        for name, row in entry["rows"].items():
            lever = {"shape": shape, "lever": name[len(ABLATION):]}
            if not name.startswith(ABLATION):
                continue
            if "tokens_per_second" not in row:
                rows.append({**lever, "kernels": _not_measured(row)})
                continue
            rows.append({**row, **lever, "speed": row["tokens_per_second"] / base["tokens_per_second"],
                         "memory": row["peak_allocated_gib"] - base["peak_allocated_gib"],
                         "loss": (row["eval_loss"] - base["eval_loss"]) / base["eval_loss"]})
    return rows


# Per shape: the large-micro-batch recipe, then each lever switched on its own, relative to it.
ABLATIONS = Table("throughput", _ablation, script="train_throughput", columns=(
    ("shape", "shape", ""), ("lever", "lever", ""), ("tokens/s", "tokens_per_second", ",.0f"),
    ("tokens/s vs recipe-max", "speed", "x{:.2f}"), ("peak allocated (GiB)", "peak_allocated_gib", ".1f"),
    ("memory vs recipe-max (GiB)", "memory", "+.1f"), ("MFU", "mfu", ".3f"), ("held-out loss", "loss", "+.2%"),
    ("kernels (or why not measured)", "kernels", "{}")))


def throughput_figure(result: dict | None) -> tuple[str, Figure | None]:
    """(what was measured where, a figure): tokens per second (log scale) and peak memory of (a), (b) and
    (c) at each model shape."""
    if not result:
        return missing(TARGETS), None
    tp = result["figures"]
    note = f"{stamp(result)}; LoRA {tp['lora']}; MFU: {tp['mfu_basis']}"
    fig = Figure(figsize=(6 * len(tp["shapes"]), 5.5))
    axes = fig.subplots(2, len(tp["shapes"]), squeeze=False)
    for col, (shape, entry) in enumerate(tp["shapes"].items()):
        rows = [{"stack": label, **entry["rows"][n]} for n, label in THROUGHPUT_LABELS.items()
                if "tokens_per_second" in entry["rows"].get(n, {})]
        plot(rows, x="stack", y="tokens_per_second", kind="barh", log="x", ax=axes[0][col], color="tab:blue",
             title=f"{shape}: tokens per second (log scale)")
        axes[0][col].xaxis.set_minor_formatter(NullFormatter())
        plot(rows, x="stack", y="peak_allocated_gib", kind="barh", ax=axes[1][col], color="tab:orange",
             title=f"{shape}: peak allocated GiB")
        for ax in axes[:, col]:
            ax.invert_yaxis()
            if col:
                ax.set_yticklabels([])
    fig.tight_layout()
    return note, fig


def throughput_targets(result: dict | None) -> dict:
    """The targets set for the recipe at each shape, with the measured value and whether it was met."""
    return {shape: entry["targets"] for shape, entry in result["figures"]["shapes"].items()} if result else {}


def _plans(result: dict) -> list[dict]:
    return [{"shape": shape, **entry["rows"]["recipe"]["spec"]["plan"], **(entry.get("loss_parity") or {}),
             "peak": entry["rows"]["recipe"]["peak_allocated_gib"]}
            for shape, entry in result["figures"]["shapes"].items()]


# Per shape: the micro-batch the recipe planned for its budget, the estimate against the measured peak, and how
# close the recipe's losses stayed to plain peft's (a).
PLANS = Table("throughput", _plans, script="train_throughput", columns=(
    ("shape", "shape", ""), ("tokens per micro-batch", "tokens", ","),
    ("checkpointing", "gradient_checkpointing", ""), ("budget (GiB)", "budget_gib", ".2f"),
    ("estimate (GiB)", "estimate_gib", ".2f"), ("measured peak (GiB)", "peak", ".2f"),
    ("per-step losses vs (a), at most", "max_rel_diff", ".2%"), ("held-out loss vs (a)", "eval_rel_diff", ".2%")))


def missed_targets(result: dict | None) -> list[str]:
    """Each target the recipe missed, with the benchmark's own account of why."""
    return [f"{shape} {name} missed, {t['why']}" for shape, targets in throughput_targets(result).items()
            for name, t in targets.items() if not t["met"]]


# --------------------------------------------------------------------------- throughput_peers.json
# The stacks of the peer comparison: TRL configured well, Unsloth, and the recipe at its two memory settings.
PEER_LABELS = {"trl-best": "TRL packed + Liger, checkpointing",
               "trl-best-no-ckpt": "TRL packed + Liger, no checkpointing", "unsloth": "Unsloth, its checkpointing",
               "sft-tight": "sft, planned for the fastest peer's peak", "sft-max": "sft, planned for 0.6 x the GPU",
               "sft": "sft command, trl-best's settings", "recipe": "recipe, budget 0.7 x (a)",
               "recipe-tight": "recipe, TRL's peak as budget", "recipe-max": "recipe, large micro-batch"}
PEER_COLORS = dict(zip(PEER_LABELS, ("tab:blue", "tab:cyan", "tab:green", "tab:red", "tab:orange", "tab:pink",
                                     "tab:gray", "tab:olive", "tab:brown")))
PEER_SHAPES = ("qwen2.5-0.5b", "qwen2.5-7b", "llama-3-8b")
PEER_ROWS = ("trl-best", "trl-best-no-ckpt", "unsloth", "sft-tight", "sft-max")


def peer_points(peers: dict | None, throughput: dict | None, file: str = "throughput_peers.json") -> list[dict]:
    """One point per stack and shape, fastest first within each shape: tokens/s, peak GiB and the run it comes
    from. Rows of ``throughput_peers.json`` first; a recipe row it lacks comes from ``throughput.json``, marked
    with that run's steps and tokens per step (a different protocol: fewer, smaller steps, all rows in one process).
    ``file``: the file ``peers`` was read from, as the table shows it."""
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
                               "file": file if result is peers else "throughput.json"})
    return sorted(points, key=lambda p: (p["shape"], -p["tokens_per_second"]))


# ``peer_points`` as a table: ``common.results.markdown(points, PEER_COLUMNS)``.
PEER_COLUMNS = (("shape", "shape", ""), ("stack", "label", ""), ("tokens/s", "tokens_per_second", ",.0f"),
                ("peak allocated (GiB)", "peak_gib", ".2f"), ("MFU", "mfu", ".3f"), ("run", "run", ""),
                ("file", "file", ""))


# The sft command and trl-best on one GPU, one run (benchmarks/results/throughput_sft.json): the same engine.
SFT_ROW = Table("throughput_sft", "figures.shapes.qwen2.5-7b.rows", script="train_throughput", columns=(
    ("row", "name", ""), ("tokens/s", "tokens_per_second", ",.0f"),
    ("peak allocated (GiB)", "peak_allocated_gib", ".2f"), ("MFU", "mfu", ".3f"),
    ("held-out loss", "eval_loss", ".4f")))


def peer_figure(points: list[dict]) -> Figure:
    """Speed against peak memory, one point per stack and shape (up and to the left is better)."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    colors = PEER_COLORS
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


def unmeasured_peer_rows(peers: dict | None, name: str = "throughput_peers.json") -> list[str]:
    """Per shape, the rows of the peer comparison ``throughput_peers.json`` does not hold yet (or holds as errors)."""
    shapes = peers["figures"]["shapes"] if peers else {}
    lines = []
    for shape in PEER_SHAPES:
        rows = shapes.get(shape, {}).get("rows", {})
        missing = [n for n in PEER_ROWS if not rows.get(n, {}).get("tokens_per_second")]
        errors = [f"{n} ({rows[n]['error'][:80]})" for n in missing if rows.get(n, {}).get("error")]
        if missing:
            absent = ", ".join(n for n in missing if n not in rows) or "-"
            lines.append(f"{shape}: not yet in {name}: {absent}"
                         + (f"; failed: {', '.join(errors)}" if errors else ""))
    return lines


def peer_targets(peers: dict | None) -> list[dict]:
    """The targets ``train_throughput`` computed for each shape of ``throughput_peers.json``: the value, the target,
    met or not, and where missed the reason it wrote."""
    names = {"vs_fastest_peer_tight": "tight: sft-tight / fastest peer, no more memory",
             "vs_fastest_peer_spare": "spare: sft-max / fastest peer at its best",
             "mfu": "MFU of sft-max (7B)", "plan_error_sft-tight": "sft-tight: |peak / estimate - 1|",
             "plan_error_sft-max": "sft-max: |peak / estimate - 1|"}
    rows = []
    for shape, entry in (peers["figures"]["shapes"] if peers else {}).items():
        for name, t in entry.get("targets", {}).items():
            if name in names:
                rows.append({"shape": shape, "target": names[name], "value": t["value"], "wanted": t["target"],
                             "met": "yes" if t["met"] else "no", "why": t.get("why", "")})
    return rows


def peer_plans(peers: dict | None) -> list[dict]:
    """What the planner chose for each ``sft-tight`` and ``sft-max`` row of ``throughput_peers.json``: the micro-batch,
    checkpointing and kept layers, where the embedding table waited, the 16-bit weight copies, and its estimate
    beside the budget and the measured peak; and the attention the row ran."""
    rows = []
    for shape, entry in (peers["figures"]["shapes"] if peers else {}).items():
        for name in ("sft-tight", "sft-max"):
            row = entry["rows"].get(name, {})
            plan = row.get("plan")
            if plan:
                rows.append({"shape": shape, "row": name, **plan, "peak_gib": row.get("peak_allocated_gib"),
                             "checkpointing": f"{plan['checkpoint_keep_layers']} kept"
                             if plan["gradient_checkpointing"] else "off",
                             "embeddings": "CPU" if plan.get("embeddings_on_cpu") else "GPU",
                             "copies": "yes" if plan.get("keep_dequantized") else "no",
                             "attention": (row.get("kernels") or {}).get("attention", "")})
    return rows


PLAN_COLUMNS = (("shape", "shape", ""), ("row", "row", ""), ("tokens per micro-batch", "tokens", ","),
                ("checkpointing", "checkpointing", ""), ("embedding table", "embeddings", ""),
                ("16-bit weight copies", "copies", ""), ("budget (GiB)", "budget_gib", ".2f"),
                ("estimate (GiB)", "estimate_gib", ".2f"), ("measured peak (GiB)", "peak_gib", ".2f"),
                ("attention", "attention", ""))


PEER_TARGET_COLUMNS = (("shape", "shape", ""), ("target", "target", ""), ("value", "value", ".3f"),
                       ("wanted", "wanted", "g"), ("met", "met", ""), ("why missed", "why", ""))


# --------------------------------------------------------------------------- sft_levers.json
LEVER_LABELS = {"peft": "peft's LoRA layers (TRL's bf16 adapters), all layers checkpointed",
                "fused": "--fused_lora", "fused-keep2": "--fused_lora, 2 layers keep their activations",
                "fused-keep8": "--fused_lora, 8 layers keep their activations",
                "fused-offload": "--fused_lora --activation_offloading",
                "fused-no-ckpt": "--fused_lora, no checkpointing", "peft-no-ckpt": "peft's layers, no checkpointing",
                "fused-no-ckpt-dequantized": "--fused_lora --keep_dequantized, no checkpointing",
                "fused-no-ckpt-compile": "--fused_lora, no checkpointing, each layer torch.compile'd"}


def lever_rows(levers: dict | None) -> list[dict]:
    """Each lever of ``sft_levers.json``: its speed against the variant without it, peak memory against the
    estimate, and whether its losses stayed within 0.5 % of that variant's."""
    if not levers:
        return []
    figures = levers["figures"]
    rows = []
    for name, row in figures["variants"].items():
        par = figures["parity"].get(name, {})
        rows.append({"variant": LEVER_LABELS.get(name, name), "tokens_per_second": row.get("tokens_per_second"),
                     "against": par.get("against", ""), "speed_ratio": par.get("speed_ratio"),
                     "peak_gib": row.get("peak_allocated_gib"), "estimate_gib": row.get("estimate_gib"),
                     "loss": (f"failed: {row['error']}" if row.get("error") else
                              ("within 0.5 %" if par.get("met") else "differ by more") if par else "the reference")})
    return rows


LEVER_COLUMNS = (("variant", "variant", ""), ("tokens/s", "tokens_per_second", ",.0f"),
                 ("against", "against", ""), ("speed x", "speed_ratio", ".2f"),
                 ("peak (GiB)", "peak_gib", ".2f"), ("estimate (GiB)", "estimate_gib", ".2f"),
                 ("losses", "loss", ""))


# --------------------------------------------------------------------------- recipe_profile.json
def step_profiles(result: dict | None) -> list[tuple[Figure, str]]:
    """Per profiled step: a figure of the GPU time of each kind of operator, and a line with the step time,
    MFU, the GPU's busy share of the step and the matrix products' share of the GPU time."""
    out = []
    for shape, entry in (result["figures"]["shapes"] if result else {}).items():
        for row in entry["time"]:
            if "kinds_ms" not in row:
                continue
            kinds = [{"kind": k, "ms": v} for k, v in row["kinds_ms"].items()]
            fig = plot(kinds, x="kind", y="ms", kind="barh", color="tab:purple", size=(7, 0.35 * len(kinds) + 1),
                       title=f"{shape}, {row['variant']}: {row['real_tokens']} tokens, kernels {row['kernels']}")
            fig.axes[0].invert_yaxis()
            fig.axes[0].set_xlabel("GPU milliseconds in one step")
            fig.tight_layout()
            line = (f"step {row['step_seconds']:.3f} s, MFU {row['mfu']:.3f}; GPU busy {row['device_busy_ms']:.0f} ms, "
                    f"{100 * row['device_busy_share']:.0f} % of the profiled step; matrix products "
                    f"{100 * row['kinds_ms'].get('matmul', 0) / row['device_busy_ms']:.0f} % of the GPU time")
            out.append((fig, line))
    return out
