"""GPU result files are complete records written by their scripts, and say what they claim."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_result_file_is_a_full_record(path):
    record = json.loads(path.read_text())
    assert {"benchmark", "device", "versions", "command", "date", "figures"} <= set(record)
    assert record["benchmark"] == path.stem
    script = record["command"].split()[1]
    assert (ROOT / script).is_file(), f"{path.name} names a script that is not in the repo: {script}"


def test_build_random_never_holds_bf16_weights():
    record = json.loads((ROOT / "benchmarks" / "results" / "build_random.json").read_text())
    assert record["device"]["type"] == "cuda"
    rows = {(r["shape"], r["quantize"]): r for r in record["figures"]["rows"]}
    big = rows[("qwen2.5-32b", "4bit")]
    assert big["peak_allocated_gib"] < big["bf16_weights_gib"] / 3
    assert rows[("qwen2.5-32b", "8bit")]["peak_allocated_gib"] < big["bf16_weights_gib"] * 0.6


def test_chapter_00_ran_on_the_gpu():
    folder = ROOT / "benchmarks" / "results" / "setup_gpu"
    summary = json.loads((folder / "summary.json").read_text())
    assert [n["status"] for n in summary["notebooks"]] == ["ok"]
    results = json.loads((folder / "00_setup" / "00_setup.json").read_text())
    assert results["profile"] == "gpu" and results["device"]["type"] == "cuda"
    assert results["bitsandbytes"]["backend"] == "CUDA"
    assert {c["layer"] for c in results["bitsandbytes"]["checks"]} == {"Linear4bit", "Linear8bitLt"}


def test_memory_estimate_within_ten_percent_of_every_measured_peak():
    record = json.loads((ROOT / "benchmarks" / "results" / "memory_validation.json").read_text())
    assert record["device"]["type"] == "cuda"
    rows = [r for r in record["figures"]["rows"] if r.get("status", "ok") == "ok"]
    assert len(rows) >= 16 and len(rows) == len(record["figures"]["rows"])
    assert {r["config"]["method"] for r in rows} >= {"full", "lora", "qlora4", "qlora8"}
    assert {r["config"]["model"] for r in rows} >= {"qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-32b"}
    for row in rows:
        assert abs(row["error_pct"]) <= 10, row
