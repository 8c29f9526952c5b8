"""The finished tables of notebook 05: the V100 memory plan beside the write-up's budget, the GPU runs, the
saved ``best/`` adapter evaluated beside ``final/``, and the memory peak per accumulation setting.

Both return printable text (and ``gpu_summary`` the figures the notebook's results file keeps), so the
notebook prints tables without digging through estimator components or benchmark files by key.

Example:
    >>> runs = load_gpu_runs()                          # doctest: +SKIP
    >>> print(gpu_report(runs).splitlines()[0])         # doctest: +SKIP
    qlora_32b_v100 on 1 x NVIDIA H100 80GB HBM3 (2026-11-23):
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qlora_helpers.ch01_memory.gpus import fits
from qlora_helpers.common.files import optional_benchmark, repo_root

# What the 8 x V100 write-up this chapter follows budgeted per GPU, in GB: claimed, not measured here.
WRITEUP_GB = {"4-bit base model": 18.0, "LoRA weights (fp32)": 0.5, "optimizer states": 1.0,
              "gradients + activations + rest": 8.0}
WRITEUP_TOTAL_GB = 27.5
WRITEUP_ADAPTER_MB = 153      # its best/adapter_model.safetensors, "153MB" (Qwen3-VL-32B, r=8 on q/k/v/o)
V100_GB = 32
GPU_BENCHMARKS = ("qlora_32b_v100", "multi_gpu_notebook", "fsdp_qlora")   # scripts in benchmarks/


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
    lines = [f"{'per GPU':<32}{'estimate':>10}{'write-up':>10}"]
    rows = plan_rows(plan)
    for row, est in rows.items():
        lines.append(f"{row:<32}{est:>8.2f} G{WRITEUP_GB[row]:>9.1f} G")
    verdict = fits(plan.total_gib, V100_GB)
    lines.append(f"{'total':<32}{plan.total_gib:>8.2f} G{WRITEUP_TOTAL_GB:>9.1f} G   V100-{V100_GB}GB: {verdict}")
    gap = {row: WRITEUP_GB[row] - est * 2**30 / 1e9 for row, est in rows.items()}   # write-up GB vs GiB
    widest = max(gap, key=lambda row: abs(gap[row]))
    lines.append(f"estimate {'below' if plan.total_gib * 2**30 / 1e9 < WRITEUP_TOTAL_GB else 'above'} the write-up "
                 f"by {abs(WRITEUP_TOTAL_GB - plan.total_gib * 2**30 / 1e9):.1f} GB in all; "
                 f"the widest gap: {widest} ({gap[widest]:+.1f} GB in the write-up)")
    return "\n".join(lines)


def adapter_size(config: str = "data/configs/multi_gpu_32b.yaml", preset: str = "qwen2.5-32b",
                 dtype: str = "fp32") -> dict:
    """``adapter_size.adapter_size`` run in a child process: it imports peft, which this kernel must not."""
    return json.loads(_child(["qlora_helpers.ch05_multi_gpu.adapter_size", "--config", str(config), "--preset", preset,
                              "--dtype", dtype], "adapter size count").splitlines()[-1])


def _child(module_args: list[str], what: str) -> str:
    """The stdout of ``python -m MODULE ARGS`` in a child process (which may import peft; this kernel must not)."""
    done = subprocess.run([sys.executable, "-m", *module_args], capture_output=True, text=True, cwd=repo_root())
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed: {last}")
    return done.stdout.strip()


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


def load_gpu_runs(names: tuple[str, ...] = GPU_BENCHMARKS) -> dict[str, dict | None]:
    """Each GPU benchmark's result file (``benchmarks/results/NAME.json``); ``None`` where none exists yet."""
    return {name: optional_benchmark(name) for name in names}


def gpu_summary(runs: dict[str, dict | None]) -> dict[str, dict]:
    """Per benchmark found: the device name and the figures that are single values (lists and tables left out)."""
    return {name: {"device": record["device"].get("name"),
                   **{k: v for k, v in record["figures"].items() if not isinstance(v, (list, dict))}}
            for name, record in runs.items() if record is not None}


def _v100_rows(figures: dict) -> list[str]:
    """One line per ``qlora_32b_v100`` variant: measured memory beside the write-up's claims."""
    claim = figures["claimed"]
    return [f"{row['variant']:>6}: 4-bit model {row['model_gib']:.1f} GiB (claimed ~{claim['model_gb']:g} GB); "
            f"training peak {row['peak_allocated_gib']:.1f} GiB allocated, {row['peak_reserved_gib']:.1f} GiB reserved "
            f"over {len(row['steps'])} steps under a {row['cap_gib']:g} GiB cap "
            f"(claimed ~{claim['per_gpu_gb']:g} GB per GPU); {row['skipped_steps']} steps skipped by the loss scaler"
            for row in figures["rows"]]


def gpu_report(runs: dict[str, dict | None]) -> str:
    """What each GPU benchmark measured, on which device and when; a line saying how to make a missing one."""
    summary = gpu_summary(runs)
    lines = []
    for name, record in runs.items():
        if record is None:
            lines.append(f"{name}: no GPU result yet (run python -m benchmarks.{name} on a GPU machine)")
            continue
        device = record["device"]
        lines.append(f"{name} on {device.get('count', 1)} x {device.get('name')} ({record['date'][:10]}):")
        lines += [f"    {k}: {v}" for k, v in summary[name].items()]
    if runs.get("qlora_32b_v100"):      # the 8 x V100 write-up's budget, against what was measured
        lines += _v100_rows(runs["qlora_32b_v100"]["figures"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- a saved adapter, evaluated again
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
    lines = [f"{'':<18}{'best/ choice':>13}{'generation':>11}{'final/ choice':>15}{'generation':>11}"]
    for d, by_wording in best.items():
        for w, b in by_wording.items():
            f = final[d][w]
            gen = ["-" if x["generation"] is None else f"{x['generation']:.3f}" for x in (b, f)]
            lines.append(f"{d + ' ' + w:<18}{b['choice']:>13.3f}{gen[0]:>11}{f['choice']:>15.3f}{gen[1]:>11}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- gradient accumulation and the peak
def accumulation_peaks(data_dir, model_id: str = "tiny:llama") -> dict:
    """``peak.measure`` in a child process (it imports peft): the fixed bytes and each setting's activation peak."""
    return json.loads(_child(["qlora_helpers.ch05_multi_gpu.peak", "--data-dir", str(data_dir), "--model-id",
                              model_id], "peak measurement").splitlines()[-1])


def peak_table(result: dict) -> str:
    """One line per setting: sequences per optimizer step, activations held at the peak, and with the fixed bytes."""
    fixed = sum(result["fixed"].values())
    lines = [f"{result['model']}, 4-bit, LoRA r=8 q/k/v/o, {max(result['tokens'])} tokens per sequence; "
             f"weights, LoRA, gradients and AdamW states: {fixed / 1e6:.1f} MB in every row",
             f"{'micro-batch x accumulation':<42}{'sequences/step':>15}{'activations':>13}{'in all':>11}"]
    for row in result["rows"]:
        how = " (one backward of the summed loss)" if row["summed"] else ""
        lines.append(f"{str(row['micro_batch']) + ' x ' + str(row['accumulation']) + how:<42}"
                     f"{row['micro_batch'] * row['accumulation']:>15}{row['activations'] / 1e6:>10.1f} MB"
                     f"{(fixed + row['activations']) / 1e6:>8.1f} MB")
    return "\n".join(lines)
