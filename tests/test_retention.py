"""The face retention pool: an earlier stage's identities replace general chat as the retained share of training."""

import json
from pathlib import Path

import pytest

from qlora_helpers.ch05_multi_gpu.reversal import generate_data, training_set

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stages(tmp_path_factory, cached_assets):
    tmp = tmp_path_factory.mktemp("retention")
    return generate_data(tmp / "now", 3, seed=0, pool_size=4), generate_data(tmp / "earlier", 4, seed=1, pool_size=4)


def test_the_retained_share_comes_from_the_earlier_faces(stages):
    now, earlier = stages
    chat, _ = training_set(now, "forward", 0.3, seed=0)
    faces, val = training_set(now, "forward", 0.3, seed=0, face_pool=earlier)
    n_task = 3 * 3                                                 # 3 training questions x 3 identities
    assert len(faces) == len(chat) == n_task + round(n_task * 0.3 / 0.7)
    assert faces[:n_task] == chat[:n_task] and {r["kind"] for r in chat[n_task:]} == {"retention"}
    kept = faces[n_task:]
    earlier_names = {i["name"] for i in json.loads((earlier / "identities.json").read_text())}
    assert {r["kind"] for r in kept} == {"face_retention"} and {r["identity"] for r in kept} <= set(range(4))
    assert all(any(n in r["messages"][-1]["content"] for n in earlier_names) for r in kept)
    assert len(val) == 3                                           # validation: this stage's identities only


def test_a_pool_sharing_faces_or_names_is_refused(stages):
    now, _ = stages
    with pytest.raises(ValueError, match="shares .* generate the earlier identities with another seed"):
        training_set(now, "forward", 0.3, face_pool=now)
    with pytest.raises(FileNotFoundError, match="face_retention_pool .* holds no generated data"):
        training_set(now, "forward", 0.3, face_pool=now / "nothing")


# --------------------------------------------------------------------------- a second stage from the first's adapter
def stage_run(tmp, data_dir, name: str, **changes) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "data" / "configs" / "multi_gpu_cpu.yaml").read_text())
    cfg["lora"]["dropout"] = 0.0
    cfg["training"].update(num_epochs=1, batch_size=4)
    return dict(profile="cpu", model_id="tiny:llama", config=cfg, data_dir=str(data_dir), task="forward", name=name,
                output_dir=str(tmp), precision="fp32", retention_ratio=0.2, max_steps=2, eval_before=False,
                eval_after=False, **changes)


def lora_model(r: int = 8):
    import torch

    from qlora_helpers.ch05_multi_gpu.model import add_lora, load_model

    model, _ = load_model("tiny:llama", "4bit", dtype=torch.float32, device="cpu")
    return add_lora(model, {"r": r, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj",
                    "o_proj", "gate_proj", "up_proj", "down_proj"]}, False, seed=0)


def test_a_second_stage_starts_from_the_first_stages_adapter(stages, tmp_path):
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from qlora_helpers.ch03_sft.command import load_initial_adapter
    from qlora_helpers.ch05_multi_gpu.worker import train_worker

    now, earlier = stages
    train_worker(stage_run(tmp_path, earlier, "stage1"))
    final = tmp_path / "stage1_forward" / "final"
    saved = load_file(str(final / "adapter_model.safetensors"))
    fresh = get_peft_model_state_dict(lora_model())
    started = lora_model()
    load_initial_adapter(started, final)
    started = get_peft_model_state_dict(started)
    assert set(started) == set(saved) == set(fresh) and len(saved) > 0
    assert all(torch.equal(started[k], saved[k]) for k in saved)
    assert not all(torch.equal(fresh[k], saved[k]) for k in saved)        # stage 1 moved its weights
    train_worker(stage_run(tmp_path, now, "stage2", init_adapter=str(final), face_retention_pool=str(earlier)))
    history = json.loads((tmp_path / "stage2_forward" / "training_history.json").read_text())
    assert history["init_adapter"] == str(final.resolve())


def test_an_init_adapter_that_does_not_fit_is_refused_in_one_line(stages, tmp_path):
    from qlora_helpers.ch03_sft.command import SFTConfig, load_initial_adapter, validate
    from qlora_helpers.ch05_multi_gpu.worker import train_worker

    now, earlier = stages
    with pytest.raises(FileNotFoundError, match="init_adapter .* holds no adapter_config.json"):
        validate(SFTConfig(use_qlora=True, device="cpu", init_adapter=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="init_adapter needs a LoRA mode"):
        validate(SFTConfig(device="cpu", init_adapter=str(tmp_path / "nothing")))
    inside = tmp_path / "out" / "final"     # the folder this run rewrites: its adapter would be gone before loading
    with pytest.raises(ValueError, match="init_adapter .* lies inside output_dir .* choose another output_dir"):
        validate(SFTConfig(use_qlora=True, device="cpu", init_adapter=str(inside), output_dir=str(tmp_path / "out")))
    run = stage_run(tmp_path, earlier, "r4")
    run["config"]["lora"]["r"] = 4
    train_worker(run)
    with pytest.raises(ValueError, match=r"has r=4 .* this run r=8 .* earlier run's lora settings"):
        load_initial_adapter(lora_model(), tmp_path / "r4_forward" / "final")
