"""The finished tables of notebook 05, read from result files with ``common.results``: the V100 memory plan
beside the write-up's budget, the GPU runs, the face retention measurement, ``best/`` beside ``final/``, the
adapter's size at the 32B shape and the memory peak per accumulation setting.

The measurements that import peft (``model``) run in a child process: this kernel must not load it before
``notebook_launcher`` forks the ranks.

Example:
    >>> print(gpu_report(load_gpu_runs()).splitlines()[0])         # doctest: +SKIP
    qlora_32b_v100, measured on NVIDIA H100 80GB HBM3, 2026-11-23:
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qlora_helpers.ch01_memory.gpus import fits
from qlora_helpers.common.files import optional_benchmark, repo_root
from qlora_helpers.common.results import Table, markdown, missing, plot, stamp, table

# What the 8 x V100 write-up this chapter follows budgeted per GPU, in GB: claimed, not measured here.
WRITEUP_GB = {"4-bit base model": 18.0, "LoRA weights (fp32)": 0.5, "optimizer states": 1.0,
              "gradients + activations + rest": 8.0}
WRITEUP_TOTAL_GB = 27.5
WRITEUP_ADAPTER_MB = 153      # its best/adapter_model.safetensors, "153MB" (Qwen3-VL-32B, r=8 on q/k/v/o)
V100_GB = 32
GPU_BENCHMARKS = ("qlora_32b_v100", "multi_gpu_notebook", "fsdp_qlora")   # scripts in benchmarks/
V100_ROWS = Table("qlora_32b_v100", "figures.rows", columns=(
    ("variant", "variant", ""), ("4-bit model (GiB)", "model_gib", ".1f"),
    ("peak allocated (GiB)", "peak_allocated_gib", ".1f"), ("peak reserved (GiB)", "peak_reserved_gib", ".1f"),
    ("cap (GiB)", "cap_gib", "g"), ("steps", lambda r: len(r["steps"]), "d"),
    ("skipped by the loss scaler", "skipped_steps", "d")))


def plan_rows(plan) -> dict[str, float]:
    """The estimate of ``plan`` (``ch01_memory.estimate``) in GiB, grouped as the write-up groups its budget."""
    gib = plan.components_gib()
    base = gib["quantized weights"] + gib["unquantized weights"]
    rest = plan.total_gib - sum(gib[k] for k in ("quantized weights", "unquantized weights", "LoRA weights",
                                                 "optimizer states"))
    return {"4-bit base model": base, "LoRA weights (fp32)": gib["LoRA weights"],
            "optimizer states": gib["optimizer states"], "gradients + activations + rest": rest}


def plan_against_writeup(plan) -> str:
    """Per-GPU table: the estimate of ``plan`` beside the write-up's budget, and whether it fits a V100-32GB."""
    rows = plan_rows(plan)
    shown = [*({"name": k, "estimate": v, "writeup": WRITEUP_GB[k]} for k, v in rows.items()),
             {"name": "total", "estimate": plan.total_gib, "writeup": WRITEUP_TOTAL_GB}]
    text = markdown(shown, (("per GPU", "name", ""), ("estimate (GiB)", "estimate", ".2f"),
                            ("write-up (GB)", "writeup", ".1f")))
    gap = {row: WRITEUP_GB[row] - est * 2**30 / 1e9 for row, est in rows.items()}   # write-up GB vs GiB
    widest, total_gb = max(gap, key=lambda row: abs(gap[row])), plan.total_gib * 2**30 / 1e9
    return (f"{text}\n\nV100-{V100_GB}GB: {fits(plan.total_gib, V100_GB)}; estimate "
            f"{'below' if total_gb < WRITEUP_TOTAL_GB else 'above'} the write-up by "
            f"{abs(WRITEUP_TOTAL_GB - total_gb):.1f} GB in all; the widest gap: {widest} "
            f"({gap[widest]:+.1f} GB in the write-up)")


# --------------------------------------------------------------------------- the GPU runs
def load_gpu_runs(names: tuple[str, ...] = GPU_BENCHMARKS) -> dict[str, dict | None]:
    """Each GPU benchmark's result file (``benchmarks/results/NAME.json``); ``None`` where none exists yet."""
    return {name: optional_benchmark(name) for name in names}


def gpu_summary(runs: dict[str, dict | None]) -> dict[str, dict]:
    """Per benchmark found: the device name and the figures that are single values (lists and tables left out)."""
    return {name: {"device": record["device"].get("name"),
                   **{k: v for k, v in record["figures"].items() if not isinstance(v, (list, dict))}}
            for name, record in runs.items() if record is not None}


def gpu_report(runs: dict[str, dict | None]) -> str:
    """What each GPU benchmark measured, where and when (or how to make it); the V100 run beside the write-up."""
    summary, parts = gpu_summary(runs), []
    for name, record in runs.items():
        if record is None:
            parts.append(missing(Table(name, "")))
            continue
        figures = markdown(summary[name], (("figure", "name", ""), ("value", "value", "")))
        parts += [f"{name}, {stamp(record)}:", figures]
        if name == "qlora_32b_v100":
            claim = record["figures"]["claimed"]
            parts += [table(record, V100_ROWS), f"the write-up claims ~{claim['model_gb']:g} GB for the 4-bit model "
                                                f"and ~{claim['per_gpu_gb']:g} GB per GPU"]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- the face retention pool
def _retention_rows(record: dict) -> list[dict]:
    s, arms = record["figures"]["summary"], record["figures"]["arms"]
    return [{"group": g, "adapter": label, **s[g][stage]}
            for g, stage, label in [("A", "stage1", "stage 1 (trained on A)"),
                                    *(("A", k, v) for k, v in arms.items()), *(("B", k, v) for k, v in arms.items())]]


RETENTION = Table("face_retention", _retention_rows, columns=(
    ("identities", "group", ""), ("adapter", "adapter", ""), ("choice", "choice", ".3f"),
    ("generation", "generation", ".3f")))


def retention_report(record: dict) -> str:
    """``benchmarks/face_retention.py``'s record: how it was measured, then the mean scores per adapter."""
    f = record["figures"]
    done = f["summary"]["seeds"]
    stopped = f" (of {f['seeds_planned']} planned: stopped early)" if len(done) < len(f["seeds_planned"]) else ""
    return (f"{f['model']}, {f['identities']} + {f['identities']} identities, retained share {f['retention_ratio']}, "
            f"at most {f['max_steps']} steps per stage; seeds {done}{stopped}; {stamp(record, ('torch',))}\n\n"
            + table(record, RETENTION))


def retention_plot(record: dict):
    """A's forward scores after stage 1 and after either stage 2 (mean over seeds), with the choice's chance."""
    rows = [{**r, "metric": m, "value": r[m]} for r in _retention_rows(record)[:3] for m in ("choice", "generation")]
    fig = plot(rows, x=lambda r: r["adapter"].replace(", ", "\n"), y="value", series="metric", size=(7, 3),
               title="A's forward accuracy (dashed: the choice's chance)")
    fig.axes[0].axhline(1 / record["figures"]["identities"], color="0.5", ls="--", lw=1)
    fig.axes[0].set_ylim(0, 1.05)
    return fig


# --------------------------------------------------------------------------- a saved adapter, evaluated again
def _child(module_args: list[str], what: str) -> str:
    """The stdout of ``python -m MODULE ARGS`` in a child process (which may import peft; this kernel must not)."""
    done = subprocess.run([sys.executable, "-m", *module_args], capture_output=True, text=True, cwd=repo_root())
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed: {last}")
    return done.stdout.strip()


def evaluate_saved(model_path, examples, task: str = "all", *, max_new_tokens: int = 24) -> dict:
    """``python -m qlora_helpers evaluate`` on ``model_path`` as a child: prints its report, returns its file."""
    print(_child(["qlora_helpers", "evaluate", "--model_path", str(model_path), "--task", task,
                  "--save_examples", str(examples), "--max_new_tokens", str(max_new_tokens)], "evaluate"))
    return json.loads(Path(examples).read_text())


def same_adapter(a, b) -> bool:
    """Whether two adapter folders hold byte-identical weights (``best/`` is ``final/`` when the last epoch is best)."""
    weights = [Path(folder) / "adapter_model.safetensors" for folder in (a, b)]
    return weights[0].read_bytes() == weights[1].read_bytes()


def best_beside_final(best: dict, final: dict) -> str:
    """Choice and generation accuracy per direction and wording: ``best/`` (evaluated again) beside ``final/``."""
    rows = [{"name": f"{d} {w}", "best": b, "final": final[d][w]} for d, by in best.items() for w, b in by.items()]
    return markdown(rows, (("", "name", ""), ("best/ choice", "best.choice", ".3f"),
                           ("generation", "best.generation", ".3f"), ("final/ choice", "final.choice", ".3f"),
                           ("generation", "final.generation", ".3f")))


# --------------------------------------------------------------------------- measured in a child process
def adapter_size(config: str = "data/configs/multi_gpu_32b.yaml", preset: str = "qwen2.5-32b",
                 dtype: str = "fp32") -> dict:
    """``model.adapter_size`` of ``config``'s LoRA at ``preset``, counted in a child process."""
    return json.loads(_child(["qlora_helpers.ch05_multi_gpu.model", "adapter-size", "--config", str(config),
                              "--preset", preset, "--dtype", dtype], "adapter size count").splitlines()[-1])


def adapter_verdict(size: dict, claim_mb: float = WRITEUP_ADAPTER_MB, tolerance: float = 0.1) -> dict:
    """The write-up's adapter size against the one counted: ``holds`` within ``tolerance`` (10 %), else ``refuted``."""
    mb, share = size["bytes"] / 1e6, size["parameters"] / size["base_parameters"]
    verdict = "holds" if abs(mb - claim_mb) <= tolerance * claim_mb else "refuted"
    text = (f"claim: {claim_mb:g} MB adapter checkpoint; counted at {size['preset']} (r={size['r']}, "
            f"{'/'.join(t.removesuffix('_proj') for t in size['targets'])}, {size['dtype']}): "
            f"{size['parameters']:,} parameters, {size['bytes']:,} bytes = {mb:.1f} MB "
            f"({share:.3%} of {size['base_parameters'] / 1e9:.1f} B) -> {verdict}")
    return {"claim_mb": claim_mb, "counted_mb": round(mb, 3), "ratio": round(claim_mb / mb, 3),
            "verdict": verdict, "text": text}


def accumulation_peaks(data_dir, model_id: str = "tiny:llama") -> dict:
    """``model.measure_peaks`` in a child process: the fixed bytes and each setting's activation peak."""
    return json.loads(_child(["qlora_helpers.ch05_multi_gpu.model", "peaks", "--data-dir", str(data_dir),
                              "--model-id", model_id], "peak measurement").splitlines()[-1])


def peak_table(result: dict) -> str:
    """One row per setting: sequences per optimizer step, activations held at the peak, and with the fixed bytes."""
    fixed = sum(result["fixed"].values())
    rows = [{"name": f"{r['micro_batch']} x {r['accumulation']}" + (" (one backward of the summed loss)"
                                                                     if r["summed"] else ""),
             "sequences": r["micro_batch"] * r["accumulation"], "mb": r["activations"] / 1e6,
             "all": (fixed + r["activations"]) / 1e6} for r in result["rows"]]
    return (f"{result['model']}, 4-bit, LoRA r=8 q/k/v/o, {max(result['tokens'])} tokens per sequence; "
            f"weights, LoRA, gradients and AdamW states: {fixed / 1e6:.1f} MB in every row\n\n"
            + markdown(rows, (("micro-batch x accumulation", "name", ""), ("sequences/step", "sequences", "d"),
                              ("activations (MB)", "mb", ".1f"), ("in all (MB)", "all", ".1f"))))
