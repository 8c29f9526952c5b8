"""Data-parallel QLoRA really synchronises gradients: 2 CPU processes (gloo) started with accelerate's
notebook_launcher end with bit-identical LoRA weights, equal to one process trained on the same global
batches. Each launch runs in a fresh interpreter, as in a notebook kernel that has not imported
bitsandbytes (the launcher refuses to fork after that import)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from qlora_helpers.ch05_multi_gpu import worker
from qlora_helpers.ch05_multi_gpu.worker import free_port, resolve_launch, steps_per_epoch

ROOT = Path(__file__).resolve().parent.parent

LAUNCH = textwrap.dedent("""
    import json, sys
    from accelerate import notebook_launcher
    from qlora_helpers.ch05_multi_gpu import worker as ddp
    run = json.loads(sys.argv[1])
    notebook_launcher(ddp.train_worker, (run,), num_processes=int(sys.argv[2]), use_port=ddp.free_port())
    print("heavy modules in the launching process:", [m for m in ("bitsandbytes", "peft") if m in sys.modules])
""")


def run_dict(tmp: Path, data_dir: Path, name: str, batch_size: int, accum: int) -> dict:
    cfg = yaml.safe_load((ROOT / "data" / "configs" / "multi_gpu_cpu.yaml").read_text())
    cfg["lora"]["dropout"] = 0.0                       # dropout masks would differ between the two runs
    # fp32 on every CPU: the test compares gradient synchronisation, which bf16 rounding would blur
    cfg["training"].update(batch_size=batch_size, gradient_accumulation_steps=accum, num_epochs=1)
    return dict(profile="cpu", model_id="tiny:llama", config=cfg, data_dir=str(data_dir), task="forward",
                name=name, output_dir=str(tmp), precision="fp32", retention_ratio=0.3, max_steps=3,
                save_rank_states=True, eval_before=False, eval_after=False)


def launch(tmp: Path, data_dir: Path, processes: int, batch_size: int, accum: int) -> Path:
    run = run_dict(tmp, data_dir, f"p{processes}", batch_size, accum)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LAUNCH, json.dumps(run), str(processes)], capture_output=True,
                          text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    if processes > 1:
        assert "heavy modules in the launching process: []" in done.stdout
    return tmp / f"p{processes}_forward"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cached_assets):
    from qlora_helpers.ch05_multi_gpu.reversal import generate_data

    tmp = tmp_path_factory.mktemp("ddp")
    data = generate_data(tmp / "data", num_identities=3, seed=0, pool_size=20)
    # the same global batch of 4 sequences: 2 ranks x 1 x 2 micro-steps, and 1 process x 2 x 2
    return launch(tmp, data, 2, 1, 2), launch(tmp, data, 1, 2, 2)


def test_steps_per_epoch_keep_the_last_partial_batch():
    """The Trainer's count: each rank's share of the examples, in batches, the last one partial."""
    assert steps_per_epoch(13, world=2, batch_size=4, accum=1) == 2          # 7 examples per rank: 4 + 3
    assert steps_per_epoch(17, world=2, batch_size=4, accum=1) == 3          # 9 per rank: 4 + 4 + 1
    assert steps_per_epoch(16, world=1, batch_size=2, accum=3) == 3          # 8 batches: 3 + 3 + 2
    assert steps_per_epoch(1, world=2, batch_size=4, accum=1) == 1


def test_resolve_launch():
    assert resolve_launch("auto", 0, gpus=2) == ("gpu", 2) and resolve_launch("auto", 0, gpus=0) == ("cpu", 2)
    with pytest.raises(ValueError, match="only 2 GPU"):
        resolve_launch("gpu", 4, gpus=2)
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_launch("gpu", 0, gpus=0)


def test_two_ranks_end_identical_and_equal_to_one_process(runs):
    import torch
    from safetensors.torch import load_file

    two, one = runs
    r0, r1 = (load_file(str(two / f"rank{r}_lora.safetensors")) for r in range(2))
    single = load_file(str(one / "rank0_lora.safetensors"))
    assert set(r0) == set(r1) == set(single) and len(r0) > 0
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks disagree: gradients were not synchronised"
    moved = max(float(r0[k].abs().max()) for k in r0 if "lora_B" in k)
    assert moved > 1e-4, "lora_B starts at zero: training must have moved it"
    diff = max(float((r0[k] - single[k]).abs().max()) for k in r0)
    assert diff < 1e-5, f"2 ranks and 1 process differ by {diff}"

    info = json.loads((two / "run.json").read_text())
    assert info["world_size"] == 2 and info["ranks_identical"] and info["steps"] == 3
    assert info["precision"]["compute_dtype"] == "fp32" and info["quantize"] == "4bit"
    losses = [[s["loss"] for s in json.loads((d / "training_history.json").read_text())["steps"]] for d in (two, one)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_two_machines_train_the_model_of_one(runs, tmp_path):
    """2 machines x 1 process on localhost, each started by accelerate launch with its node config (the file a
    user writes for real nodes): the same global batches give the ranks of one machine's 2 processes."""
    import torch
    from safetensors.torch import load_file

    from qlora_helpers.ch05_multi_gpu.nodes import run_machines

    two, one = runs
    run = run_dict(tmp_path, two.parent / "data", "m2", 1, 2)
    out = run_machines(run, tmp_path / "launch", machines=2, port=free_port(), timeout=240)
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["ranks_identical"] and info["steps"] == 3
    m0, m1 = (load_file(str(out / f"rank{r}_lora.safetensors")) for r in range(2))
    assert all(torch.equal(m0[k], m1[k]) for k in m0), "the machines disagree: gradients were not synchronised"
    for reference in (two, one):   # one machine's 2 ranks, and one process
        ref = load_file(str(reference / "rank0_lora.safetensors"))
        diff = max(float((m0[k] - ref[k]).abs().max()) for k in ref)
        assert set(m0) == set(ref) and diff < 1e-5, f"2 machines and {reference.name} differ by {diff}"
    assert {"machine0.yaml", "machine1.yaml", "run.json"} <= {p.name for p in (tmp_path / "launch").iterdir()}


def test_outputs_are_peft_adapters_and_a_history(runs):
    two, _ = runs
    for name in ("best", "final"):
        files = {p.name for p in (two / name).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    history = json.loads((two / "training_history.json").read_text())
    assert history["status"] == "done" and history["stop_reason"] == "max_steps"
    assert history["global_batch"] == 4 and [s["step"] for s in history["steps"]] == [1, 2, 3]
    assert not list(two.glob("*.tmp")) and not list(two.glob("*.old"))


def test_precision_by_device():
    from qlora_helpers.ch05_multi_gpu.precision import check_quantize, choose

    v100, h100 = choose((7, 0), bf16_supported=True), choose((9, 0), bf16_supported=True)
    assert (v100.compute_dtype, v100.grad_scaling, v100.lora_dtype, v100.mixed_precision) == \
        ("fp16", True, "fp32", "fp16")
    assert (h100.compute_dtype, h100.grad_scaling) == ("bf16", False)
    assert choose((9, 0), True, "fp16").grad_scaling            # the V100 path, run on a newer GPU
    with pytest.raises(ValueError, match="needs compute capability 8.0"):
        choose((7, 0), True, "bf16")
    with pytest.raises(ValueError, match="8-bit weights need int8 tensor cores .* "
                                         "Tesla V100 has compute capability 7.0: use quantize='4bit'"):
        check_quantize("8bit", (7, 0), "Tesla V100")
    check_quantize("8bit", (7, 5))
    check_quantize("4bit", (7, 0))


def test_qlora_gradients_on_cpu_are_exact(cached_assets):
    """LoRA gradients through bitsandbytes' CPU 4-bit layers equal those through the same weights dequantised."""
    import copy

    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_helpers.ch05_multi_gpu.model import add_lora, load_model
    from qlora_helpers.ch05_multi_gpu.reversal import collate, encode, make_identities, task_records

    q4, tok = load_model("tiny:llama", "4bit", dtype=torch.float32, device="cpu")
    config = copy.deepcopy(q4.config)
    del config.quantization_config
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        mods = dict(q4.named_modules())
        for name, p in ref.named_parameters():
            owner, leaf = name.rsplit(".", 1)
            if isinstance(mods[owner], bnb.nn.Linear4bit) and leaf == "weight":
                w = mods[owner].weight
                p.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state).float())
            else:
                p.copy_(dict(q4.named_parameters())[name])
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    models = [add_lora(m, lora, False, seed=0) for m in (q4, ref)]
    for m in models:   # lora_B starts at zero: give it values so that lora_A gets a gradient too
        torch.manual_seed(1)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
    recs = task_records(make_identities(2), "forward", "train")
    batch = collate([encode(r["messages"], tok, 64) for r in recs], tok.pad_token_id)
    grads = []
    for m in models:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3 * 2
    errors = {n: float((grads[0][n] - grads[1][n]).norm() / grads[1][n].norm()) for n in grads[0]}
    assert max(errors.values()) < 1e-5, errors      # float32 rounding only
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in q4.modules() if isinstance(m, bnb.nn.Linear4bit)), "weights were repacked to bf16"


def test_the_run_becomes_the_sft_commands_settings():
    """The YAML config of a run as ``SFTConfig``: QLoRA 4-bit, its LoRA, batches and rates, the warmup of the
    run's length, the configured optimizer (paged 8-bit on a GPU, plain 8-bit on a CPU) and the precision."""
    from qlora_helpers.ch05_multi_gpu.precision import choose
    from qlora_helpers.ch05_multi_gpu.worker import sft_config

    configs = {n: yaml.safe_load((ROOT / "data" / "configs" / f"{n}.yaml").read_text())
               for n in ("multi_gpu_32b", "multi_gpu_cpu")}
    run = dict(config=configs["multi_gpu_32b"], output_dir="o", name="n", task="forward", max_steps=0)
    v100 = choose((7, 0), bf16_supported=False)
    cfg, rule, per_epoch = sft_config(run, v100, model="m", n_train=130, world=8, cuda=True)
    assert (cfg.mode, cfg.lora_r, cfg.lora_target_modules) == ("qlora-4bit", 8, ["q_proj", "k_proj", "v_proj",
                                                                                 "o_proj"])
    assert (cfg.optim, cfg.fp16, cfg.bf16, cfg.lr_scheduler_type) == ("paged_adamw_8bit", True, False,
                                                                      "constant_with_warmup")
    assert per_epoch == 3 and cfg.warmup_steps == 1 == rule.warmup_steps      # 17 rows per rank: 8 + 8 + 1
    assert cfg.learning_rate == 1e-4 and rule.min_lr == 6e-5 and cfg.output_dir == str(Path("o", "n_forward", "final"))
    assert sft_config(run, v100, model="m", n_train=130, world=8, cuda=False)[0].optim == "adamw_8bit"
    cpu = {**run, "config": configs["multi_gpu_cpu"], "max_steps": 36}
    cfg, rule, _ = sft_config(cpu, choose(None, False), model="m", n_train=13, world=2, cuda=False)
    assert (cfg.optim, cfg.fp16, cfg.bf16, cfg.max_steps, cfg.warmup_steps) == ("adamw", False, False, 36, 2)
    cpu["config"] = {**cpu["config"], "training": {**cpu["config"]["training"], "optimizer": "sgd"}}
    with pytest.raises(ValueError, match="training.optimizer must be one of adamw, adamw_torch, adamw_8bit"):
        sft_config(cpu, choose(None, False), model="m", n_train=13, world=2, cuda=False)


def test_random_weights_at_a_presets_shape_train_through_the_model_factory(tmp_path, cached_assets):
    """``random:<preset>`` (the GPU benchmark's 32B shape): the folder run_sft loads holds the preset's config and
    tokenizer only, the factory builds random 4-bit weights layer by layer; one process, in this one."""
    import torch

    from qlora_helpers.ch05_multi_gpu import worker
    from qlora_helpers.ch05_multi_gpu.reversal import generate_data

    data = generate_data(tmp_path / "data", num_identities=2, seed=0, pool_size=20)
    run = {**run_dict(tmp_path, data, "rnd", 2, 1), "model_id": "random:smollm2-135m", "max_steps": 1}
    threads = torch.get_num_threads()
    worker.train_worker(run)
    torch.set_num_threads(threads)
    out = tmp_path / "rnd_forward"
    info = json.loads((out / "run.json").read_text())
    assert info["steps"] == 1 and info["world_size"] == 1 and info["lora_parameters"] > 0
    assert json.loads((out / "training_history.json").read_text())["model_id"] == "random:smollm2-135m"
    assert (out / "final" / "adapter_model.safetensors").is_file()
    base = tmp_path / "models" / "random-smollm2-135m"
    assert sorted(p.name for p in base.iterdir()) == ["chat_template.jinja", "config.json", "tokenizer.json",
                                                      "tokenizer_config.json"]


def test_a_ranks_kept_peak_reaches_the_kernels_record(tmp_path, capsys, monkeypatch):
    """``keep_peak`` writes nothing for a CPU rank (whatever CUDA state the process has); each GPU rank's file is
    printed by ``report_kept_peaks`` as a section of the record, beside the estimate, in rank order, and the launch's
    folder is removed."""
    from qlora_helpers.common import bench

    monkeypatch.setattr(bench, "GPU_SECTIONS", [])
    folder = tmp_path / "peaks"
    folder.mkdir()
    worker.keep_peak(folder, 0, "cpu")
    assert list(folder.iterdir()) == []
    for rank, allocated in ((10, 0.625), (2, 0.5)):
        (folder / f"rank{rank}.json").write_text(json.dumps({"allocated": allocated, "reserved": 0.75}))
    worker.report_kept_peaks(folder, "4. one step", {"gib": 0.4, "of": "a count"})
    assert capsys.readouterr().out.splitlines() == [
        "GPU memory, 4. one step, rank 2: peak allocated 0.500 GiB, reserved 0.750 GiB; estimate 0.400 GiB (a count)",
        "GPU memory, 4. one step, rank 10: peak allocated 0.625 GiB, reserved 0.750 GiB; estimate 0.400 GiB (a count)"]
    assert [s["section"] for s in bench.GPU_SECTIONS] == ["4. one step, rank 2", "4. one step, rank 10"]
    assert not folder.exists()
