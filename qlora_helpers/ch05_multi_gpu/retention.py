"""What the face retention pool does to earlier identities, read from ``benchmarks/face_retention.py``'s record.

The measurement trains in two stages. Stage 1: the forward task on identities A. Stage 2 starts from stage 1's
``final/`` adapter and trains on new identities B, twice, with the same share of retained records: general
chat (``chat``, no pool) or A's own training records (``faces``, ``face_retention_pool``). Each adapter is then
asked A's forward questions (and stage 2's, B's): the multiple choice among the stage's identities and the
greedy answer, both wordings, as ``reversal.accuracy`` scores them.

The verdict, per score, over the seeds measured (``step`` = one question of the ``2 n`` asked about A):

- stage 1 did not lift A's choice score above the chance band (``learning.chance_band``): nothing was
  learned, so nothing can be retained;
- A's score without the pool stayed within one step of stage 1's: stage 2 did not make the model forget A,
  so the pool had nothing to prevent;
- A's score with the pool higher than without by at least one step in every seed: the pool kept A;
- otherwise: no consistent difference.

Example:
    >>> verdict({"identities": 4, "runs": [{"A": {"stage1": {"choice": 1.0}, "chat": {"choice": 0.25},
    ...                                           "faces": {"choice": 0.875}}}]}, "choice")["verdict"]
    'kept'
"""

from __future__ import annotations

from qlora_helpers.ch05_multi_gpu.learning import chance_band
from qlora_helpers.common.files import optional_benchmark

ARMS = {"chat": "stage 2, general chat retained", "faces": "stage 2, A's faces retained (the pool)"}
METRICS = ("choice", "generation")


def load() -> dict | None:
    """``benchmarks/results/face_retention.json``, or ``None`` before ``python -m benchmarks.face_retention`` ran."""
    return optional_benchmark("face_retention")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summary(figures: dict) -> dict:
    """Mean over seeds of each score: A after stage 1 and after either stage 2, B after either stage 2."""
    runs = figures["runs"]
    out = {"seeds": [r["seed"] for r in runs], "identities": figures["identities"]}
    for group, stages in (("A", ("stage1", *ARMS)), ("B", tuple(ARMS))):
        out[group] = {s: {m: round(mean([r[group][s][m] for r in runs]), 6) for m in METRICS} for s in stages}
    return out


def verdict(figures: dict, metric: str = "choice") -> dict:
    """The pool's effect on A's ``metric`` (choice or generation), decided as the module docstring says."""
    n, runs = figures["identities"], figures["runs"]
    step = 1 / (2 * n)
    a1, chat, faces = (mean([r["A"][s][metric] for r in runs]) for s in ("stage1", "chat", "faces"))
    high = chance_band(n)[2]
    gains = [r["A"]["faces"][metric] - r["A"]["chat"][metric] for r in runs]
    where = (f"A's forward {metric} after stage 1 {a1:.3f}; after stage 2 {chat:.3f} without the pool, "
             f"{faces:.3f} with it (mean of {len(runs)} seed(s), {n} identities)")
    if mean([r["A"]["stage1"]["choice"] for r in runs]) <= high:
        return {"verdict": "not learned", "text": f"{where}: stage 1 left A inside the chance band, nothing to retain"}
    if a1 - chat < step:
        return {"verdict": "no forgetting", "text": f"{where}: without the pool A did not drop, nothing to prevent"}
    if all(g >= step for g in gains):
        return {"verdict": "kept", "text": f"{where}: the pool kept A in every seed (+{mean(gains):.3f})"}
    return {"verdict": "no consistent difference",
            "text": f"{where}: the pool's gain per seed {', '.join(f'{g:+.3f}' for g in gains)} is not consistent"}


def table(figures: dict) -> str:
    """One line per adapter and group of identities: the two scores, mean over seeds."""
    s = summary(figures)
    rows = [("A", "stage1", "stage 1 (trained on A)"), *(("A", k, v) for k, v in ARMS.items()),
            *(("B", k, v) for k, v in ARMS.items())]
    lines = [f"{'identities':<11}{'adapter':<42}{'choice':>8}{'generation':>12}"]
    for group, stage, label in rows:
        lines.append(f"{group:<11}{label:<42}{s[group][stage]['choice']:>8.3f}{s[group][stage]['generation']:>12.3f}")
    return "\n".join(lines)


def report(record: dict) -> str:
    """Where and how the result was measured, then ``table``."""
    f, d = record["figures"], record["device"]
    where = f"{d['count']} x {d['name']}" if d["type"] == "cuda" else f"CPU {d['name']} ({d['count']} cores)"
    done = [r["seed"] for r in f["runs"]]
    stopped = f" (of {f['seeds_planned']} planned: stopped early)" if len(done) < len(f["seeds_planned"]) else ""
    head = (f"{f['model']}, {f['identities']} + {f['identities']} identities, retained share {f['retention_ratio']}, "
            f"at most {f['max_steps']} steps per stage; seeds {done}{stopped}; "
            f"{where}, torch {record['versions'].get('torch')}, "
            f"{record['date'][:10]}")
    return head + "\n" + table(f)


def plot(figures: dict, ax) -> None:
    """A's forward scores after each stage, bars = mean over seeds, dots = each seed."""
    stages = ("stage1", *ARMS)
    labels = ["after stage 1", "stage 2\nwithout pool", "stage 2\nwith pool"]
    for k, metric in enumerate(METRICS):
        xs = [i + (k - 0.5) * 0.4 for i in range(len(stages))]
        ax.bar(xs, [mean([r["A"][s][metric] for r in figures["runs"]]) for s in stages], 0.4, label=metric)
        for x, s in zip(xs, stages):
            ax.plot([x] * len(figures["runs"]), [r["A"][s][metric] for r in figures["runs"]], "k.", ms=4)
    ax.axhline(1 / figures["identities"], color="0.5", ls="--", lw=1, label="choice chance")
    ax.set_xticks(range(len(stages)), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("A's forward accuracy")
    ax.legend(fontsize=8)
