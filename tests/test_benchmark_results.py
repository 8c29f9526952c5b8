"""GPU result files are complete records written by their scripts, and say what they claim; the scripts are
modules of the ``benchmarks`` package and hand rows from worker processes through one protocol."""

import ast
import importlib
import json
import math
import re
from pathlib import Path

import pytest

from benchmarks.course_gpu import error_line, section_lines, write_record
from benchmarks.memory_validation import prediction
from qlora_helpers.ch01_memory.gpus import CONTEXT_GIB
from qlora_helpers.common import bench
from qlora_helpers.common.bench import WorkerError, run_worker, section_line
from qlora_helpers.common.runner import NotebookRun, discover

ROOT = Path(__file__).resolve().parent.parent
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "__init__.py")
# records kept as history whose script went with what it measured (``git log -- SCRIPT`` shows it)
RETIRED = {"benchmarks/recipe_profile.py": "the recipe's hand-written training loop, replaced by the sft command"}


def script_of(command: str) -> str:
    """The script a recorded command ran: ``python -m benchmarks.x ...`` (or, in older records,
    ``python benchmarks/x.py ...``) -> ``benchmarks/x.py``."""
    words = command.split()
    return words[2].replace(".", "/") + ".py" if words[1] == "-m" else words[1]


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_result_file_is_a_full_record(path):
    record = json.loads(path.read_text())
    assert {"benchmark", "device", "versions", "command", "date", "figures"} <= set(record)
    assert record["benchmark"] == path.stem
    script = script_of(record["command"])
    assert (ROOT / script).is_file() or script in RETIRED, f"{path.name} names a script not in the repo: {script}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_runs_as_a_module_of_the_package(path):
    text = path.read_text()
    usage = ast.get_docstring(ast.parse(text)) or ""
    assert f"-m benchmarks.{path.stem}" in usage, f"{path.name}: its docstring shows python -m benchmarks.{path.stem}"
    assert not re.search(r"python3? benchmarks/", text), f"{path.name}: run it as python -m benchmarks.{path.stem}"
    assert "sys.path" not in text, f"{path.name}: the package needs no sys.path edits"
    assert callable(importlib.import_module(f"benchmarks.{path.stem}").main)   # every name it imports exists


# --------------------------------------------------------------------------- the worker protocol
TINY_WORKER = """
import sys
import time

from qlora_helpers.common.bench import command_line, emit

mode = sys.argv[1]
if mode != "silent":
    emit({"name": "a", "loss": 1.0})
    emit({"name": "b", "loss": 0.5, "command": command_line()})
print("a progress line, not a row")
if mode == "fail":
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
if mode == "hang":
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def tiny_worker(tmp_path_factory):
    """``env`` that makes ``python -m tiny_worker MODE`` importable from the repository root."""
    folder = tmp_path_factory.mktemp("worker")
    (folder / "tiny_worker.py").write_text(TINY_WORKER)
    return {"PYTHONPATH": str(folder)}


def test_a_worker_hands_its_rows_to_the_parent(tiny_worker):
    seen = []
    rows = run_worker("tiny_worker", ["ok"], label="tiny", env=tiny_worker, on_row=seen.append)
    assert [r["name"] for r in rows] == ["a", "b"] and seen == rows
    assert rows[1]["loss"] == 0.5
    assert rows[1]["command"].split()[1:] == ["-m", "tiny_worker", "ok"]     # what a result file records


def test_a_failing_worker_raises_one_line_naming_the_row_and_its_last_error(tiny_worker):
    with pytest.raises(WorkerError) as caught:
        run_worker("tiny_worker", ["fail"], label="7b-qlora4", env=tiny_worker)
    err = caught.value
    assert "\n" not in str(err)
    assert str(err).startswith("7b-qlora4: python -m tiny_worker exited with status 1 (after 2 row(s)): ")
    assert str(err).endswith("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert [r["name"] for r in err.rows] == ["a", "b"] and err.returncode == 1 and err.out_of_memory


def test_a_worker_that_emits_nothing_is_an_error(tiny_worker):
    with pytest.raises(WorkerError, match="^silent: python -m tiny_worker exited without a row"):
        run_worker("tiny_worker", ["silent"], label="silent", env=tiny_worker)


def test_a_worker_past_its_timeout_is_killed(tiny_worker):
    with pytest.raises(WorkerError, match="^hang: python -m tiny_worker timed out after 5 s") as caught:
        run_worker("tiny_worker", ["hang"], label="hang", env=tiny_worker, timeout=5)
    assert caught.value.returncode < 0                  # killed by a signal


def test_build_random_never_holds_bf16_weights():
    record = json.loads((ROOT / "benchmarks" / "results" / "build_random.json").read_text())
    assert record["device"]["type"] == "cuda"
    rows = {(r["shape"], r["quantize"]): r for r in record["figures"]["rows"]}
    big = rows[("qwen2.5-32b", "4bit")]
    assert big["peak_allocated_gib"] < big["bf16_weights_gib"] / 3
    assert rows[("qwen2.5-32b", "8bit")]["peak_allocated_gib"] < big["bf16_weights_gib"] * 0.6


# the notebooks that train: each has measured sections in the record
TRAINING_NOTEBOOKS = ("00_setup", "01_memory_math", "02_tad_quantized_adapters", "03_qwen_sft", "03b_speed_and_memory",
                      "04_vlm_8gb", "05_multi_gpu_32b")


def test_the_whole_course_ran_on_one_gpu():
    """``benchmarks/results/course_gpu``: every notebook ok under profile=gpu on one GPU, each training notebook with
    its measured sections (peaks and the chapter's estimate), and the summary's figures the executed notebooks'."""
    folder = ROOT / "benchmarks" / "results" / "course_gpu"
    summary = json.loads((folder / "summary.json").read_text())
    rows = {r["notebook"]: r for r in summary["figures"]["notebooks"]}
    assert list(rows) == [book.stem for book in discover()]           # core and companion notebooks, in order
    assert summary["figures"]["ok"] == len(rows)
    assert summary["device"]["type"] == "cuda" and script_of(summary["command"]) == "benchmarks/course_gpu.py"
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["error"])
        assert row["device"] == summary["device"]["name"], name        # one GPU for every notebook
        assert row["parameters"]["profile"] == "gpu" and script_of(row["command"]) == "benchmarks/course_gpu.py"
        executed = (folder / f"{name}.ipynb").read_text(encoding="utf-8")
        results = json.loads((folder / f"{name}.json").read_text())
        assert results["profile"] == "gpu" and "widgets" not in json.loads(executed)["metadata"], name
        assert row["gpu_memory"] == results.get("gpu_memory", []), name
        assert section_lines(executed) == [section_line(s) for s in row["gpu_memory"]], name
        for s in row["gpu_memory"]:
            assert 0 < s["peak_allocated_gib"] <= s["peak_reserved_gib"] and s["estimate_gib"] >= 0, (name, s)
            assert s["estimate_of"], (name, s)
    assert all(rows[name]["gpu_memory"] for name in TRAINING_NOTEBOOKS)


def test_gpu_memory_sections_on_a_cpu_and_the_record_they_make(tmp_path, capsys, monkeypatch):
    """On a CPU a section measures and prints nothing, but wants its estimate; a section a worker measured prints the
    line the record's test reads back; ``--only`` keeps the record's other notebooks, in the course's order."""
    monkeypatch.setattr(bench, "GPU_SECTIONS", [])
    with bench.gpu_memory("a CPU cell", "cpu") as peak:
        peak.estimate(1.0, "anything")
    assert bench.GPU_SECTIONS == [] and capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="without its estimate"), bench.gpu_memory("no estimate", "cpu"):
        pass
    bench.report_section("4. the run, rank 0", 19.51234, 20.2, 19.38, "chapter 01's estimate")
    line = capsys.readouterr().out.strip()
    section = bench.GPU_SECTIONS.pop()
    assert line == section_line(section) and "19.512 GiB" in line
    bench.report_section("x", 1.0, 1.5, None, "no estimate: unknown LoRA target", start_gib=0.25)
    assert capsys.readouterr().out.strip() == ("GPU memory, x: peak allocated 1.000 GiB (0.250 GiB of it held when the "
                                               "section began), reserved 1.500 GiB; no estimate (no estimate: "
                                               "unknown LoRA target)")
    bench.GPU_SECTIONS.pop()
    bench.report_section("one layer", 0.0625, 0.09, 0.00013, "a count")      # small sections read in MiB
    assert "peak allocated 64.0 MiB, reserved 92.2 MiB; estimate 0.1 MiB" in capsys.readouterr().out
    bench.GPU_SECTIONS.pop()

    def run(stem: str) -> NotebookRun:
        folder = tmp_path / "run" / stem
        folder.mkdir(parents=True)
        nb = {"cells": [{"cell_type": "code", "metadata": {"papermill": {}}, "source": "", "outputs": [
                  {"output_type": "stream", "name": "stdout", "text": [line + "\n"]}]}],
              "metadata": {"widgets": {}, "papermill": {}, "kernelspec": {}}, "nbformat": 4, "nbformat_minor": 5}
        (folder / f"{stem}.ipynb").write_text(json.dumps(nb))
        results = {"profile": "gpu", "device": {"name": "GPU X"}, "gpu_memory": [section]}
        (folder / f"{stem}.json").write_text(json.dumps(results))
        return NotebookRun(stem, "ok", 1.0, str(folder / f"{stem}.ipynb"), results)

    out = tmp_path / "record"
    write_record([run("03_qwen_sft")], tmp_path / "run", out, {"profile": "gpu"})
    write_record([run("00_setup")], tmp_path / "run", out, {"profile": "gpu"}, keep=True)
    rows = json.loads((out / "summary.json").read_text())["figures"]["notebooks"]
    assert [r["notebook"] for r in rows] == ["00_setup", "03_qwen_sft"]
    assert rows[1]["parameters"]["model_id"] == "random:qwen2.5-0.5b" and rows[0]["device"] == "GPU X"
    kept = (out / "00_setup.ipynb").read_text()
    assert section_lines(kept) == [line] and "widgets" not in json.loads(kept)["metadata"]
    assert "| 00_setup | 4. the run, rank 0 | 19.5123 |" in (out / "summary.md").read_text()
    failed = "cell 12 (execution count 8): ChildFailedError: \n=====\n  traceback: ...\n  RuntimeError: Cannot fork\n"
    assert error_line(failed) == "cell 12 (execution count 8): ChildFailedError: ... RuntimeError: Cannot fork"
    assert "papermill" not in json.loads(kept)["cells"][0]["metadata"]


FAMILIES = {"qwen2.5": "Qwen2.5", "llama-3": "Llama-3", "mistral": "Mistral", "gemma-2": "Gemma-2", "phi-3": "Phi-3",
            "smollm2": "SmolLM2"}


def test_memory_estimate_within_bounds_of_every_measured_peak():
    """From_pretrained-loaded rows on a GPU: 6 families, 24+ rows, checkpointing on and off, every method;
    the estimate within 5 % of the peak allocated and 10 % of the peak reserved, on every row."""
    record = json.loads((ROOT / "benchmarks" / "results" / "memory_validation.json").read_text())
    assert record["device"]["type"] == "cuda" and record["device"]["name"].startswith(("NVIDIA H100", "NVIDIA H200"))
    figures = record["figures"]
    rows = [r for r in figures["rows"] if r.get("status") == "ok"]
    assert len(rows) >= 24 and len(rows) == len(figures["rows"]) and "from_pretrained" in figures["convention"]
    families = {FAMILIES[k] for r in rows for k in FAMILIES if r["config"]["model"].startswith(k)}
    assert families == set(FAMILIES.values())
    assert {r["config"]["method"] for r in rows} == {"full", "lora", "qlora4", "qlora8"}
    assert {bool(r["config"].get("grad_ckpt")) for r in rows} == {True, False}
    for row in rows:
        assert row["measured"]["training"] is True, row["name"]          # model.train() after from_pretrained
        assert row["config"]["layers"] <= row["config"]["real_layers"]
        assert abs(row["error_pct"]) <= 5, row["name"]
        assert abs(row["reserved_error_pct"]) <= 10, row["name"]
    worst = max(abs(r["error_pct"]) for r in rows), max(abs(r["reserved_error_pct"]) for r in rows)
    assert worst == (figures["summary"]["max_abs_error_pct"], figures["summary"]["max_abs_reserved_error_pct"])


def test_memory_validation_scores_are_the_current_estimator():
    """The recorded estimates are what the estimator predicts now (else: python -m benchmarks.memory_validation
    --rescore), and the CUDA context it adds covers every context measured."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "memory_validation.json").read_text())["figures"]["rows"]
    for row in rows:
        now = prediction(row["name"], row["measured"]["attention"])
        assert now["predicted_gib"] == pytest.approx(row["predicted_gib"], abs=1e-3), row["name"]
        assert now["predicted_reserved_gib"] == pytest.approx(row["predicted_reserved_gib"], abs=1e-3), row["name"]
        m = row["measured"]
        assert m["device_used_gib"] - m["reserved_now_gib"] <= CONTEXT_GIB


def _record(name: str) -> dict:
    record = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    assert record["device"]["type"] == "cuda", f"{name}.json was not measured on a GPU"
    return record


def test_sft_modes_measured_all_four_modes_through_the_course_entry_point():
    figures = _record("sft_modes")["figures"]
    modes = figures["modes"]
    assert set(modes) == {"full", "lora", "qlora-4bit", "qlora-8bit"} and not figures["failures"]
    assert modes["full"]["trainable_percent"] == 100
    lora_share = {modes[m]["trainable_percent"] for m in ("lora", "qlora-4bit", "qlora-8bit")}
    assert len(lora_share) == 1 and 0 < lora_share.pop() < 20       # same adapters on the same shape
    # full fine-tuning keeps fp32 weights, gradients and two AdamW moments: by far the largest
    assert modes["full"]["peak_memory_gib"] > 2 * max(modes[m]["peak_memory_gib"] for m in ("lora", "qlora-4bit"))
    for row in modes.values():
        assert row["tokens_per_second"] > 0 and row["peak_reserved_gib"] >= row["peak_memory_gib"]
        assert row["settings"]["bf16"] is True


def test_tad_memory_has_every_strategy_with_checkpointing_on_and_off():
    rows = _record("tad_memory")["figures"]["rows"]
    by = {(r["strategy"], r["activation_checkpointing"]): r for r in rows}
    assert len(rows) == 10 and len(by) == 10
    for (strategy, ckpt), row in by.items():
        if ckpt:   # activation checkpointing trades recomputation for memory, for every strategy
            assert row["peak_allocated_gib"] < by[(strategy, False)]["peak_allocated_gib"]


def test_qlora_32b_fits_a_v100_32gb_allocator_cap():
    figures = _record("qlora_32b_v100")["figures"]
    assert figures["cap_gib"] <= 31 and figures["fits_under_cap"]
    for row in figures["rows"]:
        assert not row["oom"] and row["lora_finite"] and len(row["steps"]) >= 10
        assert row["peak_allocated_gib"] < row["cap_gib"]
        assert row["precision"]["compute_dtype"] == "fp16" and row["precision"]["grad_scaling"]
        assert row["steps"][-1]["loss"] < row["steps"][0]["loss"]


def test_throughput_compares_hf_trl_and_the_recipe_on_both_shapes():
    record = _record("throughput")
    shapes = record["figures"]["shapes"]
    assert set(shapes) == {"qwen2.5-0.5b", "qwen2.5-7b"}
    for shape, entry in shapes.items():
        rows = entry["rows"]
        assert entry["runs"] and all(script_of(r["command"]) == "benchmarks/train_throughput.py" for r in entry["runs"])
        for name in ("hf", "trl", "recipe", "recipe-max", "recipe-max-sdpa", "recipe-max-no-liger",
                     "recipe-max-liger-loss", "recipe-max-upcast", "recipe-max-ckpt-flipped",
                     "recipe-max-bf16-adapters", "recipe-max-no-dropout"):
            assert rows[name]["tokens_per_second"] > 0 and rows[name]["peak_allocated_gib"] > 0, (shape, name)
        assert rows["hf"]["spec"]["upcast"] and not rows["recipe"]["spec"]["upcast"]
        assert rows["recipe"]["spec"]["loss"] == "chunked" and rows["recipe"]["spec"]["packed"]
        assert rows["recipe-max"]["kernels"] == {"attention": "varlen", "norm_and_mlp": "liger"}
        assert rows["recipe-max-sdpa"]["kernels"]["attention"].startswith("sdpa")
        # the same optimizer steps over the same conversations: the recipe learns what (a) learns
        assert len(rows["recipe"]["steps"]) == len(rows["hf"]["steps"]) == entry["steps"]
        assert all(s["tokens"] <= entry["step_tokens"] for s in rows["recipe"]["steps"])
        parity = entry["loss_parity"]
        assert parity["max_rel_diff"] < 0.02 and parity["eval_rel_diff"] < 0.02
        for name, row in rows.items():   # every lever trains the same model: held-out losses agree
            if "eval_loss" in row:
                assert abs(row["eval_loss"] - rows["hf"]["eval_loss"]) / rows["hf"]["eval_loss"] < 0.02, (shape, name)
        targets = entry["targets"]
        assert {"speedup_vs_hf", "memory_vs_hf"} <= set(targets)
        for t in targets.values():       # a missed target says by how much and why
            lower_is_better = t is targets["memory_vs_hf"]
            assert t["met"] == (t["value"] <= t["target"] if lower_is_better else t["value"] >= t["target"])
            assert t["met"] or "why" in t
        plan = rows["recipe"]["spec"]["plan"]   # the estimator sized the budgeted micro-batch to within 15 %
        assert abs(rows["recipe"]["peak_allocated_gib"] / plan["estimate_gib"] - 1) < 0.15
    assert shapes["qwen2.5-7b"]["rows"]["recipe-max"]["spec"]["tokens"] >= 4096   # the MFU figure's micro-batch
    assert "mfu" in shapes["qwen2.5-7b"]["targets"]
    ablations = {n for n in shapes["qwen2.5-0.5b"]["rows"] if n.startswith("recipe-max-")}
    assert ablations >= {"recipe-max-hf-loss", "recipe-max-padded", "recipe-max-compile"}


def test_throughput_peers_rows_each_in_a_fresh_process_with_six_timed_steps():
    record = _record("throughput_peers")
    shapes = record["figures"]["shapes"]
    assert {"trl-best", "unsloth"} <= set(shapes["qwen2.5-0.5b"]["rows"]) and "trl-best" in shapes["qwen2.5-7b"]["rows"]
    pids = [row["pid"] for entry in shapes.values() for row in entry["rows"].values()]
    assert len(set(pids)) == len(pids)
    for shape, entry in shapes.items():
        assert entry["step_tokens"] >= 16384 and entry["runs"][-1]["order"]
        assert all(script_of(r["command"]) == "benchmarks/train_throughput.py" for r in entry["runs"])
        for name, row in entry["rows"].items():
            assert "error" in row or len(row["steps"]) - 2 >= 6, (shape, name)   # warm-up 2, then >= 6 timed
            if "error" in row:
                continue
            assert all(0 < s["tokens"] <= entry["step_tokens"] and math.isfinite(s["loss"]) for s in row["steps"])
            assert row["tokens_per_second"] > 0 and row["peak_allocated_gib"] > 0 and math.isfinite(row["eval_loss"])
            if name.startswith("trl-best"):
                s = row["settings"]
                assert s["packing"] and s["padding_free"] and s["use_liger_kernel"] and s["bf16"]
                assert row["kernels"]["attention"] == "varlen"
            if name == "unsloth":
                assert row["versions"]["unsloth"] and row["versions"]["trl"]
            if name.startswith("sft-"):                 # the command, planned, with its own levers
                assert row["plan"]["estimate_gib"] <= row["plan"]["budget_gib"]
                assert row["kernels"]["lora"].startswith("fused") and row["kernels"]["attention"] == "varlen"


def test_recipe_profile_splits_a_7b_step_by_kind_of_work():
    entry = _record("recipe_profile")["figures"]["shapes"]["qwen2.5-7b"]
    base = next(r for r in entry["time"] if r["variant"] == "base")
    assert base["kernels"] == {"attention": "varlen", "norm_and_mlp": "liger"}
    assert 0 < base["device_busy_share"] <= 1 and base["real_tokens"] <= base["tokens"]
    assert abs(sum(base["kinds_ms"].values()) - base["device_busy_ms"]) < 1
    assert max(base["kinds_ms"], key=base["kinds_ms"].get) == "matmul"


def test_vlm_command_trained_7b_shapes_under_an_allocator_cap():
    record = _record("vlm_hf_7b")
    runs = {(r["shape"], r["cap_gib"]): r for r in record["figures"]["runs"]}
    assert {shape for shape, _ in runs} == {"llava-1.5-7b", "qwen2-vl-7b"}
    assert record["device"]["type"] == "cuda"
    for (shape, cap), run in runs.items():
        assert run["command"].startswith("python -m qlora_helpers vlm ") and min(run["text_tokens"]) >= 1024
        assert run["peak_reserved_gib"] <= cap and run["estimate_gib"] > 0
        if run["status"] == "ok":
            assert run["steps"] >= 10 and all(math.isfinite(x) for x in run["val_loss"])
        else:
            assert run["status"] == "out of memory" and runs.get((shape, 11.5), {}).get("status") == "ok"
    assert runs[("llava-1.5-7b", 7.5)]["status"] == "ok"
