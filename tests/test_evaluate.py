"""``python -m qlora_helpers evaluate`` scores a saved chapter-05 adapter exactly as the worker scored it in the
run: one process trains a 2-layer Llama saved on disk for 2 steps (one epoch, so ``best/`` and ``final/`` hold
the same weights), then the command reloads ``best/`` on that base and must give the worker's answers."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from qlora_helpers import cli
from qlora_helpers.ch05_multi_gpu import tables, worker
from qlora_helpers.ch05_multi_gpu.evaluate import evaluate
from qlora_helpers.ch05_multi_gpu.reversal import generate_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, cached_assets):
    tmp = tmp_path_factory.mktemp("evaluate")
    data = generate_data(tmp / "data", num_identities=3, seed=0, pool_size=20)
    cfg = yaml.safe_load((ROOT / "data" / "configs" / "multi_gpu_cpu.yaml").read_text())
    cfg["training"].update(batch_size=2, gradient_accumulation_steps=1, num_epochs=1)
    run = dict(profile="cpu", model_id=str(tiny_llama_dir), config=cfg, data_dir=str(data), task="forward",
               name="ev", output_dir=str(tmp), precision="fp32", retention_ratio=0.3, max_steps=2,
               eval_before=False, max_new_tokens=8)
    threads = torch.get_num_threads()
    worker.train_worker(run)              # one process, in this one: it sets the thread count of a rank
    torch.set_num_threads(threads)
    return tmp / "ev_forward"


def test_evaluate_best_gives_the_workers_scores_and_answers(trained, capsys):
    examples = trained / "examples" / "best.json"
    assert cli.main(["evaluate", "--model_path", str(trained / "best"), "--task", "all", "--save_examples",
                     str(examples), "--max_new_tokens", "8", "--device_map", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "forward  seen wording  choice" in printed and "written to" in printed
    got = json.loads(examples.read_text())
    in_run = json.loads((trained / "run.json").read_text())["accuracy"]
    assert got["accuracy"] == {d: in_run[d] for d in ("forward", "reverse")}
    assert got["answers"] == in_run["answers"] and len(got["answers"]) == 2 * 2 * 3
    assert [p.name for p in examples.parent.iterdir()] == ["best.json"]   # nothing half-written beside it


def test_one_direction_by_multiple_choice_only(trained):
    result = evaluate(trained / "final", "reverse", device_map="auto", max_new_tokens=0)
    assert set(result["accuracy"]) == {"reverse"} and {a["direction"] for a in result["answers"]} == {"reverse"}
    assert result["trained_task"] == "forward" and result["identities"] == 3
    in_run = json.loads((trained / "run.json").read_text())["accuracy"]["reverse"]
    for wording, scores in result["accuracy"]["reverse"].items():
        assert scores["generation"] is None and scores["choice"] == in_run[wording]["choice"]
    assert all(a["answer"] is None for a in result["answers"])


def test_best_is_final_when_the_last_epoch_was_best(trained, tmp_path):
    assert tables.same_adapter(trained / "best", trained / "final")
    other = tmp_path / "other"
    other.mkdir()
    weights = bytearray((trained / "final" / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 1
    (other / "adapter_model.safetensors").write_bytes(bytes(weights))
    assert not tables.same_adapter(trained / "best", other)
