"""Every course notebook runs end to end under papermill with the test parameters, and its
results file holds the values the chapter promises (values, not just "it ran")."""

import math

import pytest

from qlora_helpers import runner

TEST_PARAMETERS = {"profile": "cpu", "max_steps": 2}
NOTEBOOKS = [p.stem for p in runner.discover()]


def check_00_setup(r):
    assert r["profile"] == "cpu" and r["device"]["type"] == "cpu"
    assert all(v != "missing" for k, v in r["versions"].items())
    bits = {c["bits"]: c for c in r["bitsandbytes"]["checks"]}
    assert bits[4]["layer"] == "Linear4bit" and bits[4]["weight_bytes"] * 4 == bits[4]["bf16_bytes"]
    assert bits[8]["layer"] == "Linear8bitLt" and bits[8]["weight_bytes"] * 2 == bits[8]["bf16_bytes"]
    for c in bits.values():
        assert c["rel_error"] < 0.15 and c["lora_grad_norm"] > 0 and not c["quantized_weight_has_grad"]
        assert c["loss_last"] < c["loss_first"]
    assert r["weights"] == "pretrained" and "Paris" in r["answer"] and r["first_token"]["text"].strip() == "The"
    assert r["qwen_vocab_size"] == 151_665 and r["qwen_hello_ids"] == [9707, 11, 1879, 0]


def check_01_memory_math(r):
    walk = r["walkthrough"]
    assert walk["total_gib"] == pytest.approx(sum(walk["components"].values()), abs=0.01)
    assert walk["params"]["total"] == 494_032_768 and walk["params"]["lora"] == walk["params"]["trainable"]
    assert r["lora_dtypes"] == ["torch.float32"]  # peft creates LoRA weights in fp32
    assert r["lora_params"]["peft"] == r["lora_params"]["formula"]
    for row in r["autograd_check"]:  # saved-activation formula vs autograd's own count
        assert abs(row["formula"] - row["autograd"]) <= 8, row
    for grid in r["grid_gib"].values():
        assert grid["qlora4"] < grid["lora"] < grid["full"]
    assert r["benchmark"]["rows"] >= 16 and r["benchmark"]["within_10pct"] == r["benchmark"]["rows"]
    assert r["claims"] and {c["verdict"] for c in r["claims"]} <= {"holds", "refuted", "depends"}


def check_05_multi_gpu_32b(r):
    assert r["profile"] == "cpu" and r["num_processes"] == r["world_size"] == 2
    assert r["bitsandbytes_in_kernel_before_launch"] is False
    assert r["precision"]["compute_dtype"] == "fp32" and r["precision"]["lora_dtype"] == "fp32"
    assert r["ranks_identical"] and len(r["rank_digests"]) == 2 and len(set(r["rank_digests"])) == 1
    assert r["steps"] == 2 and r["stop_reason"] == "max_steps" and len(r["epochs"]) == 1
    e = r["epochs"][0]
    assert math.isfinite(e["train_loss"]) and math.isfinite(e["val_loss"]) and e["lr"] > 0 and e["new_best"]
    assert {"best", "final", "training_history.json", "run.json"} <= set(r["outputs"])
    plan = r["memory_plan_v100"]
    base = plan["components_gib"]["quantized weights"] + plan["components_gib"]["unquantized weights"]
    assert 17 < base < 19 and base < plan["total_gib"] < 27.5 and plan["fits_32gb"] == "fits"
    n = r["identities"]
    assert r["retention_records"] == round(3 * n * 0.3 / 0.7) and r["train_records"] == 3 * n + r["retention_records"]
    for when in ("accuracy_before", "accuracy"):
        for d in ("forward", "reverse"):
            for w in ("seen", "new"):
                a = r[when][d][w]
                assert a["n"] == n and a["chance"] == 1 / n and 0 <= a["choice"] <= 1
                assert (a["generation"] is None) == (when == "accuracy_before")


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


@pytest.fixture(scope="module")
def course_run(tmp_path_factory, cached_assets):
    run_dir, runs = runner.run_notebooks(None, TEST_PARAMETERS, tmp_path_factory.mktemp("course"), progress=False)
    return {r.notebook: r for r in runs}


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook(notebook, course_run):
    run = course_run[notebook]
    assert run.status == "ok", f"{notebook} failed at {run.error}; executed copy: {run.executed}"
    assert notebook in CHECKS, f"add check_{notebook}(results) to tests/test_notebooks.py"
    CHECKS[notebook](run.results)
