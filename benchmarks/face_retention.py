"""Chapter 05: does the face retention pool keep earlier identities? Two training stages on the CPU.

Stage 1 trains the forward task (face code -> name) on identities A with the chapter's worker and CPU config.
Stage 2 starts from stage 1's ``final/`` adapter (``init_adapter``) and trains on new identities B, twice, with
the same retained share (``--retention-ratio``): general chat, and A's own records (``face_retention_pool``).
Every adapter is then asked A's forward questions, and stage 2's adapters B's, with the ``evaluate`` command's
scoring (``qlora_helpers.ch05_multi_gpu.evaluate``): multiple choice and greedy answer, both wordings.
A and B are generated with different seeds and share no face and no name. Each run is one process holding
the global batch of the notebook's two ranks (``tests/test_ddp.py``: the same steps).

    python -m benchmarks.face_retention                           # SmolLM2-135M, 6 + 6 identities, seeds 0 1 2
    python -m benchmarks.face_retention --seeds 0 --max-steps 24

Writes ``benchmarks/results/face_retention.json`` after every seed (unless ``--out`` says otherwise);
notebook 05 shows it (``qlora_helpers.ch05_multi_gpu.tables.retention_report``).

The verdict, per score, over the seeds measured (``step`` = one question of the ``2 n`` asked about A):

- stage 1 did not lift A's choice score above the chance band (``learning.chance_band``): nothing was
  learned, so nothing can be retained;
- A's score without the pool stayed within one step of stage 1's: stage 2 did not make the model forget A,
  so the pool had nothing to prevent;
- A's score with the pool higher than without by at least one step in every seed: the pool kept A;
- otherwise: no consistent difference.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from qlora_helpers.ch05_multi_gpu.evaluate import evaluate
from qlora_helpers.ch05_multi_gpu.learning import chance_band
from qlora_helpers.ch05_multi_gpu.reversal import WORDINGS, generate_data, make_identities, shared_identities
from qlora_helpers.ch05_multi_gpu.worker import train_worker
from qlora_helpers.common.assets import load_images
from qlora_helpers.common.bench import write_benchmark
from qlora_helpers.common.files import repo_root
from qlora_helpers.errors import OneLineParser, run_main

CONFIG = "data/configs/multi_gpu_cpu.yaml"
CPU_RANKS = 2   # the notebook's processes on a CPU; one process here trains on their global batch
ARMS = {"chat": "stage 2, general chat retained", "faces": "stage 2, A's faces retained (the pool)"}
METRICS = ("choice", "generation")


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
    gains = [r["A"]["faces"][metric] - r["A"]["chat"][metric] for r in runs]
    where = (f"A's forward {metric} after stage 1 {a1:.3f}; after stage 2 {chat:.3f} without the pool, "
             f"{faces:.3f} with it (mean of {len(runs)} seed(s), {n} identities)")
    if mean([r["A"]["stage1"]["choice"] for r in runs]) <= chance_band(n)[2]:
        return {"verdict": "not learned", "text": f"{where}: stage 1 left A inside the chance band, nothing to retain"}
    if a1 - chat < step:
        return {"verdict": "no forgetting", "text": f"{where}: without the pool A did not drop, nothing to prevent"}
    if all(g >= step for g in gains):
        return {"verdict": "kept", "text": f"{where}: the pool kept A in every seed (+{mean(gains):.3f})"}
    return {"verdict": "no consistent difference",
            "text": f"{where}: the pool's gain per seed {', '.join(f'{g:+.3f}' for g in gains)} is not consistent"}


def other_seed(seed: int, n: int) -> int:
    """The first seed from ``seed + 1000`` whose identities share no face and no name with seed ``seed``'s."""
    images = load_images()
    faces = images["lfw"][images["lfw_is_face"]]
    first = make_identities(n, seed, faces=faces)
    for candidate in range(seed + 1000, seed + 1100):
        second = make_identities(n, candidate, faces=faces)
        if not shared_identities(first, second):
            return candidate
    raise ValueError(f"no seed in {seed + 1000}..{seed + 1099} gives {n} identities apart from seed {seed}'s")


def scores(adapter: Path, data_dir: Path, max_new_tokens: int) -> dict:
    """Forward choice and generation accuracy of ``adapter`` on ``data_dir``'s identities, mean of both wordings."""
    acc = evaluate(adapter, "forward", data_dir=str(data_dir), device_map="cpu",
                   max_new_tokens=max_new_tokens)["accuracy"]["forward"]
    return {m: round(mean([acc[w][m] for w in WORDINGS]), 6) for m in METRICS}


def train(run: dict, **changes) -> tuple[Path, dict]:
    """One worker run in this process; its output folder and history."""
    job = {**run, **changes}
    train_worker(job)
    out = Path(job["output_dir"]) / f"{job['name']}_{job['task']}"
    history = json.loads((out / "training_history.json").read_text())
    return out, {"steps": len(history["steps"]), "epochs": len(history["epochs"]),
                 "stop_reason": history["stop_reason"], "best_val_loss": min(e["val_loss"] for e in history["epochs"])}


def measure_seed(seed: int, *, model_id: str, identities: int, max_steps: int, retention_ratio: float,
                 work: Path, config: dict, max_new_tokens: int) -> dict:
    """Stage 1 on A, both stage 2 runs on B; A's scores after each, B's after stage 2."""
    started = time.perf_counter()
    a_dir = generate_data(work / "A", identities, seed)
    b_seed = other_seed(seed, identities)
    b_dir = generate_data(work / "B", identities, b_seed)
    cfg = {**config, "training": {**config["training"], "seed": seed,
                                  "batch_size": int(config["training"]["batch_size"]) * CPU_RANKS}}
    run = dict(profile="cpu", model_id=model_id, quantize="4bit", precision="auto", config=cfg, task="forward",
               output_dir=str(work / "outputs"), retention_ratio=retention_ratio, max_steps=max_steps,
               eval_before=False, eval_after=False)
    stage1, trained1 = train(run, data_dir=str(a_dir), name="stage1")
    row = {"seed": seed, "a_seed": seed, "b_seed": b_seed, "training": {"stage1": trained1},
           "A": {"stage1": scores(stage1 / "final", a_dir, max_new_tokens)}, "B": {}}
    for arm in ARMS:
        pool = str(a_dir) if arm == "faces" else None
        out, trained = train(run, data_dir=str(b_dir), name=f"stage2_{arm}", face_retention_pool=pool,
                             init_adapter=str(stage1 / "final"))
        row["training"][arm] = trained
        row["A"][arm] = scores(out / "final", a_dir, max_new_tokens)
        row["B"][arm] = scores(out / "final", b_dir, max_new_tokens)
    row["seconds"] = round(time.perf_counter() - started, 1)
    print(f"seed {seed}: A {row['A']}  B {row['B']}  ({row['seconds']:.0f} s)", flush=True)
    return row


def measure(seeds: list[int], *, model_id: str = "", identities: int = 6, max_steps: int = 36,
            retention_ratio: float = 0.3, config: str | Path = CONFIG, max_new_tokens: int = 24,
            out: str | Path | None = None, work_dir: str | Path | None = None) -> Path:
    """Every seed in turn; the result file is rewritten after each, so an interrupted run keeps the seeds done."""
    cfg = yaml.safe_load((repo_root() / config).read_text())
    if not 2 <= identities <= 12:
        raise ValueError(f"--identities must be between 2 and 12, not {identities}")
    if not 0 < retention_ratio < 1:
        raise ValueError(f"--retention-ratio must be in (0, 1): the pool is the retained share, not {retention_ratio}")
    figures = {"model": model_id or "SmolLM2-135M-Instruct (cached)", "config": str(config), "task": "forward",
               "identities": identities, "retention_ratio": retention_ratio, "max_steps": max_steps,
               "global_batch": int(cfg["training"]["batch_size"]) * CPU_RANKS, "max_new_tokens": max_new_tokens,
               "arms": ARMS, "seeds_planned": list(seeds), "runs": []}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for seed in seeds:
            figures["runs"].append(measure_seed(seed, model_id=model_id, identities=identities, max_steps=max_steps,
                                                retention_ratio=retention_ratio, work=Path(tmp) / f"seed{seed}",
                                                config=cfg, max_new_tokens=max_new_tokens))
            figures["summary"] = summary(figures)
            figures["verdict"] = {m: verdict(figures, m) for m in METRICS}
            path = write_benchmark("face_retention", figures, out)
    for m in METRICS:
        print(figures["verdict"][m]["text"])
    return path


def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m benchmarks.face_retention", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one A/B pair and three runs each")
    parser.add_argument("--model-id", default="", help="empty: the cached SmolLM2-135M-Instruct; or a model folder")
    parser.add_argument("--identities", type=int, default=6, help="per stage (2 to 12)")
    parser.add_argument("--max-steps", type=int, default=36, help="per stage; the schedule may stop first")
    parser.add_argument("--retention-ratio", type=float, default=0.3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", help="result file (default: benchmarks/results/face_retention.json)")
    a = parser.parse_args(argv)
    measure(a.seeds, model_id=a.model_id, identities=a.identities, max_steps=a.max_steps,
            retention_ratio=a.retention_ratio, max_new_tokens=a.max_new_tokens, out=a.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
