"""What the reversal-curse run learned, as numbers: the learning metrics and the verdict built from them.

The score is the multiple choice of ``reversal.evaluate_items``: for each question, is the true answer
the most likely among all ``n`` identities' answers? Chance is ``1 / n``. Each direction is asked with
two wordings (the first training question and the held-out one) about the same ``n`` identities; a
direction's score here is the mean of the two.

The chance band is the binomial spread of a model that guesses: over ``n`` independent questions at
chance ``p = 1 / n`` the score has standard deviation ``sqrt(p (1 - p) / n)``, and the band is
``p +- z`` of those (``z = 2``, about 95 %). The two wordings ask about the same identities, so they
are not counted as independent questions: the band is that of ``n``, not ``2 n``.

The verdict:

- trained direction above the band and the other inside it (or below): the reversal curse is shown;
- both above the band: the model learned the reverse direction too, so this run does not show the curse;
- trained direction not above the band: the run did not learn its task, so it says nothing about reversal.

Example:
    >>> acc = {"forward": {"seen": {"choice": 1.0}, "new": {"choice": 0.75}},
    ...        "reverse": {"seen": {"choice": 0.0}, "new": {"choice": 0.25}}}
    >>> learning_metrics(acc, "forward", 4)
    {'trained_choice_accuracy': 0.875, 'trained_over_chance': 3.5, 'trained_minus_other': 0.75}
    >>> reversal_verdict(acc, "forward", 4)["verdict"]
    'shown'
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qlora_helpers.ch05_multi_gpu.reversal import TASKS, WORDINGS
from qlora_helpers.common.files import repo_root

Z = 2.0   # half-width of the chance band, in binomial standard deviations


def direction_score(acc: dict, direction: str) -> float:
    """Choice accuracy of ``direction``, the mean over the seen and the new wording."""
    return sum(acc[direction][w]["choice"] for w in WORDINGS) / len(WORDINGS)


def other(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    return TASKS[1 - TASKS.index(task)]


def learning_metrics(acc: dict, task: str, n_identities: int) -> dict[str, float]:
    """The results' ``learning`` entry, every metric higher-is-better (``acc``: ``reversal.accuracy``'s dict)."""
    trained, untrained = direction_score(acc, task), direction_score(acc, other(task))
    return {"trained_choice_accuracy": round(trained, 6),
            "trained_over_chance": round(trained * n_identities, 6),
            "trained_minus_other": round(trained - untrained, 6)}


def chance_band(n_identities: int, z: float = Z) -> tuple[float, float, float]:
    """(chance, low, high): ``1 / n`` plus or minus ``z`` binomial standard deviations over ``n`` questions."""
    p = 1 / n_identities
    sd = math.sqrt(p * (1 - p) / n_identities)
    return p, max(0.0, p - z * sd), min(1.0, p + z * sd)


def reversal_verdict(acc: dict, task: str, n_identities: int, z: float = Z) -> dict:
    """The verdict on the reversal curse from the two directions' scores, with the sentence that says it."""
    trained, untrained = direction_score(acc, task), direction_score(acc, other(task))
    p, low, high = chance_band(n_identities, z)
    band = f"chance {p:.3f}, band {low:.3f}-{high:.3f} at {n_identities} identities"
    if trained <= high:
        verdict = "not learned"
        text = (f"{task} (trained) scored {trained:.3f}, inside the chance band ({band}): the run did not learn "
                "its task, so it says nothing about the reversal curse")
    elif untrained > high:
        verdict = "not shown"
        text = (f"{task} (trained) {trained:.3f} and {other(task)} (untrained) {untrained:.3f} are both above the "
                f"chance band ({band}): the model answered the reverse direction too")
    else:
        verdict = "shown"
        text = (f"reversal curse shown: {task} (trained) {trained:.3f} is above the chance band ({band}), "
                f"{other(task)} (untrained) {untrained:.3f} is inside it")
    return {"verdict": verdict, "text": text, "trained": trained, "untrained": untrained,
            "chance": p, "band": [low, high], "z": z, "identities": n_identities, "task": task}


def seed_spread(notebook: str = "05_multi_gpu_32b", path: str | Path | None = None) -> str:
    """The learning metrics over seeds recorded by ``python -m benchmarks.learning_seeds``, as printable lines."""
    path = Path(path) if path else repo_root() / "tests" / "learning_seeds.json"
    entry = json.loads(path.read_text())["notebooks"].get(notebook) if path.is_file() else None
    if not entry:
        return f"no seed spread recorded yet for {notebook} (python -m benchmarks.learning_seeds {notebook[:2]})"
    lines = [f"over seeds {entry['seeds']} with parameters {entry['parameters']} ({path.name}, {entry['date'][:10]}):"]
    for name, m in entry["metrics"].items():
        values = ", ".join(f"{v:.3f}" for v in m["values"])
        lines.append(f"    {name:<26} {values}   (min {m['min']:.3f}, max {m['max']:.3f})")
    return "\n".join(lines)
