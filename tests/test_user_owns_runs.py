"""The output folder of ``sft`` and ``vlm`` (``common.run_folder``): nothing a user owns is lost, no folder traps.

Each case reproduces one way a run folder used to go wrong: ``--overwrite_output_dir`` deleting the old run
before a bad setting refused the new one; a run that failed before its first checkpoint, or whose
``checkpoints/latest`` is stale, that neither ``--resume`` nor a plain start would take; truncated checkpoint
files and a full disk failing with raw errors; a resume silently taking other settings or other data. Refusals go
through the ``refused`` fixture (exit 2, one line naming the file and the fix, nothing changed); recoveries are
plain asserts on what the folder holds afterwards. The model is the 2-layer random Llama, 2-4 steps a run.
"""

import errno
import json
import os
import shutil

import pytest
import torch
from conftest import folder_state
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from qlora_helpers import cli
from qlora_helpers.ch03_sft import trainer as sft_trainer
from qlora_helpers.ch03_sft.command import SFTConfig, run_sft
from qlora_helpers.common.run_folder import MANIFEST, aside_name, latest_checkpoint

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(8)]


@pytest.fixture(autouse=True)
def quiet_and_one_thread(monkeypatch):
    """No progress bars on stderr (a refusal is one line), one thread (tiny models, a busy machine)."""
    monkeypatch.setattr(sft_trainer, "tqdm", lambda *a, **kw: tqdm(*a, **{**kw, "disable": True}))
    bars, threads = hf_logging.is_progress_bar_enabled(), torch.get_num_threads()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if bars:
        hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def flags(model, data, out, **kw) -> list[str]:
    """The sft command line of a tiny LoRA run: 3 steps, a checkpoint after each but the last."""
    values = dict(use_lora=True, model_name_or_path=model, data_path=data, output_dir=out, max_steps=3,
                  per_device_train_batch_size=2, max_length=64, save_steps=1, device="cpu", bf16=False) | kw
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def sft(*args) -> int:
    return cli.main(["sft", *args])


@pytest.fixture(scope="module")
def first_run(tiny_llama_dir, data, tmp_path_factory):
    """One finished run (checkpoint-1 and checkpoint-2, the adapter, the summary); each case works on a copy."""
    out = tmp_path_factory.mktemp("first") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sft(SFTConfig(use_lora=True, model_name_or_path=str(tiny_llama_dir), data_path=str(data),
                          output_dir=str(out), max_steps=3, per_device_train_batch_size=2, max_length=64,
                          save_steps=1, device="cpu", bf16=False), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def run_copy(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out, symlinks=True)
    return out


def summary(out) -> dict:
    return json.loads((out / "sft_summary.json").read_text())


# --------------------------------------------------------------------------- 1. nothing a user owns is deleted
def test_overwrite_with_a_bad_target_module_keeps_the_old_run(run_copy, tiny_llama_dir, data, refused, tmp_path):
    (run_copy / "notes.txt").write_text("my notes")
    (run_copy / "config.json").write_text('{"mine": true}')      # a LoRA run writes no config.json: it stays
    bad = flags(tiny_llama_dir, data, run_copy, lora_target_modules="qkv", overwrite_output_dir=True)
    refused(lambda: sft(*bad), names=["lora_target_modules: qkv not found", "its linear layers are"], keep=[run_copy])
    fresh = tmp_path / "fresh"
    refused(lambda: sft(*flags(tiny_llama_dir, data, fresh, lora_target_modules="qkv")), names=["qkv"], keep=[])
    assert not fresh.exists(), "a refused run created its output folder"

    users = folder_state(run_copy / "notes.txt", run_copy / "config.json")
    assert sft(*flags(tiny_llama_dir, data, run_copy, overwrite_output_dir=True, save_steps=0, max_steps=2)) == 0
    assert folder_state(run_copy / "notes.txt", run_copy / "config.json") == users
    assert not (run_copy / "checkpoints").exists(), "the old run's checkpoints were kept"
    assert summary(run_copy)["steps"] == 2
    assert {"notes.txt", "config.json"}.isdisjoint(json.loads((run_copy / MANIFEST).read_text()))


def test_a_users_file_with_a_name_the_run_writes_is_refused_not_replaced(run_copy, tiny_llama_dir, data, refused):
    (run_copy / MANIFEST).write_text(json.dumps(["checkpoints", "sft_config.json"]))   # the adapter is not the course's
    refused(lambda: sft(*flags(tiny_llama_dir, data, run_copy, overwrite_output_dir=True)),
            names=["adapter_config.json", "not written by a course run", "move it elsewhere"], keep=[run_copy])


# --------------------------------------------------------------------------- 2. no trap
def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tiny_llama_dir, data, tmp_path, refused,
                                                                      capfd):
    out = tmp_path / "killed"

    def killed(record):
        raise KeyboardInterrupt         # stopped at step 1, before the first save (save_steps 2)

    with pytest.raises(KeyboardInterrupt):
        run_sft(SFTConfig(use_lora=True, model_name_or_path=str(tiny_llama_dir), data_path=str(data),
                          output_dir=str(out), max_steps=3, per_device_train_batch_size=2, max_length=64,
                          save_steps=2, device="cpu", bf16=False), callbacks=[killed], progress=False)
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)      # as SIGKILL during the first save leaves it
    (out / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"half")
    (out / "checkpoints" / "latest").write_text("checkpoint-2\n")       # and a pointer to it, stale
    args = flags(tiny_llama_dir, data, out, save_steps=2)
    refused(lambda: sft(*args), names=["stopped before its first checkpoint", "pass --resume to start it again"],
            keep=[out])
    capfd.readouterr()
    assert sft(*args, "--resume") == 0
    said = capfd.readouterr().out
    assert "--resume starts it from step 0" in said and "latest named checkpoint-2, which is not a whole" in said
    assert summary(out)["resumed_from"] == 0 and summary(out)["steps"] == 3
    assert latest_checkpoint(out).name == "checkpoint-2"


def test_a_stale_latest_is_pointed_at_the_newest_whole_checkpoint(run_copy, tiny_llama_dir, data, capfd):
    (run_copy / "checkpoints" / "latest").write_text("checkpoint-7\n")
    assert sft(*flags(tiny_llama_dir, data, run_copy), "--resume") == 0
    said = capfd.readouterr().out
    assert "latest named checkpoint-7, not a whole checkpoint: pointed it at checkpoint-2" in said
    assert summary(run_copy)["resumed_from"] == 2


# --------------------------------------------------------------------------- 3. one line, the file, the fix
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt"])
def test_a_truncated_checkpoint_file_falls_back_to_the_last_whole_checkpoint(name, run_copy, tiny_llama_dir, data,
                                                                             capfd, refused):
    damaged = run_copy / "checkpoints" / "checkpoint-2" / name
    damaged.write_bytes(damaged.read_bytes()[:len(damaged.read_bytes()) // 2])
    assert sft(*flags(tiny_llama_dir, data, run_copy), "--resume") == 0
    said = capfd.readouterr().out
    assert str(damaged) in said and "resuming from checkpoint-1, the last whole checkpoint" in said
    assert summary(run_copy)["resumed_from"] == 1 and (run_copy / "checkpoints" / "damaged-checkpoint-2").is_dir()
    assert aside_name(run_copy / "checkpoints" / "checkpoint-2").name == "damaged-checkpoint-2.2"   # never over one

    only = run_copy / "checkpoints" / "checkpoint-2" / name            # now the only whole checkpoint: damage it
    shutil.rmtree(run_copy / "checkpoints" / "checkpoint-1", ignore_errors=True)
    only.write_bytes(only.read_bytes()[:100])
    refused(lambda: sft(*flags(tiny_llama_dir, data, run_copy), "--resume"),
            names=[str(only), "no earlier one is whole", "--overwrite_output_dir"], keep=[run_copy])


def test_a_full_disk_while_saving_is_one_line_and_removes_the_partial_checkpoint(run_copy, tiny_llama_dir, data,
                                                                                  monkeypatch, capfd):
    """A resume (to step 4) whose disk fills while it writes checkpoint-3: the line names the folder and the
    --resume that continues; checkpoint-3 is gone, every earlier file (sft_config.json too) as it was."""
    real_save = torch.save

    def full_disk(obj, path, *a, **kw):
        if "checkpoint-3" in str(path):
            with open(path, "wb") as fh:
                fh.write(b"\0" * 1000)            # the part that fitted
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **kw)

    kept = [run_copy / "sft_config.json", run_copy / "checkpoints" / "checkpoint-1"]
    before = folder_state(*kept)
    monkeypatch.setattr(torch, "save", full_disk)
    capfd.readouterr()
    code = sft(*flags(tiny_llama_dir, data, run_copy, max_steps=4), "--resume")
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no space left on the disk of"), err
    assert str(run_copy) in err[0] and "checkpoint-3 cut short: removed" in err[0]
    assert "pass --resume (continues from checkpoint-2)" in err[0]
    assert folder_state(*kept) == before
    assert not (run_copy / "checkpoints" / "checkpoint-3").exists()
    assert not [p for p in run_copy.rglob("*") if ".tmp" in p.name]
    monkeypatch.undo()
    assert sft(*flags(tiny_llama_dir, data, run_copy, max_steps=4), "--resume") == 0
    assert summary(run_copy)["resumed_from"] == 2 and summary(run_copy)["steps"] == 4
    assert json.loads((run_copy / "sft_config.json").read_text())["max_steps"] == 4   # written once it ended


# --------------------------------------------------------------------------- 5. a resume changes nothing that matters
@pytest.mark.parametrize("key, old, new", [("lr_scheduler_type", "linear", "cosine"), ("weight_decay", 0.0, 0.1),
                                           ("max_grad_norm", 1.0, 0.5), ("warmup_steps", 0, 1)])
def test_resume_refuses_a_changed_setting(key, old, new, first_run, tiny_llama_dir, data, refused):
    line = refused(lambda: sft(*flags(tiny_llama_dir, data, first_run, **{key: new}), "--resume"),
                   names=[f"was written with {key}={old!r}, this run has {key}={new!r}", "resume with its settings"],
                   keep=[first_run])
    assert "a resume may change only max_steps" in line


def test_resume_names_the_changes_it_allows(run_copy, tiny_llama_dir, data, capfd):
    assert sft(*flags(tiny_llama_dir, data, run_copy, max_steps=4, save_total_limit=3), "--resume") == 0
    assert "resuming checkpoint-2 with max_steps 3 -> 4, save_total_limit 2 -> 3" in capfd.readouterr().out
    assert summary(run_copy)["steps"] == 4


def test_resume_refuses_a_changed_data_file(run_copy, tiny_llama_dir, data, tmp_path, refused):
    changed = tmp_path / "train.jsonl"
    changed.write_text(data.read_text().replace("It is 4.", "It is 5."))
    refused(lambda: sft(*flags(tiny_llama_dir, changed, run_copy), "--resume"),
            names=[f"data_path {changed} has changed since checkpoint-2 was written", "--overwrite_output_dir"],
            keep=[run_copy])


# --------------------------------------------------------------------------- the vlm command: the same rules
@pytest.fixture(scope="module")
def vlm_files(tmp_path_factory, cached_assets):
    from qlora_helpers.ch04_vlm.hub_model import write_tiny_vlm
    from qlora_helpers.ch04_vlm.records import write_example_files

    root = tmp_path_factory.mktemp("vlm")
    return {"data": write_example_files(root / "data", n_train=4, n_val=2),
            "model": write_tiny_vlm(root / "llava", "llava"), "root": root}


def vlm_flags(files, out, **kw) -> list[str]:
    values = {"model_id": files["model"], "data_path": files["data"]["train"], "val_path": files["data"]["val"],
              "output_dir": out, "max_steps": 3, "eval_steps": 0, "save_steps": 1, "device": "cpu",
              "training.gradient_accumulation_steps": 1} | kw
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def vlm(*args) -> int:
    return cli.main(["vlm", *args])


@pytest.fixture(scope="module")
def vlm_run(vlm_files):
    out = vlm_files["root"] / "first"
    assert vlm(*vlm_flags(vlm_files, out)) == 0
    return out


def test_vlm_overwrite_keeps_the_users_files_and_refuses_before_anything_changes(vlm_run, vlm_files, tiny_llama_dir,
                                                                                 refused, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(vlm_run, out, symlinks=True)
    (out / "notes.txt").write_text("my notes")
    refused(lambda: vlm(*vlm_flags(vlm_files, out, model_id=tiny_llama_dir, overwrite_output_dir=True)),
            names=["has no vision part", "python -m qlora_helpers sft"], keep=[out])
    assert vlm(*vlm_flags(vlm_files, out, overwrite_output_dir=True, max_steps=1, save_steps=0)) == 0
    assert (out / "notes.txt").read_text() == "my notes" and not (out / "checkpoints").exists()
    current = {MANIFEST, *(os.readlink(out / name) for name in ("best", "final"))}   # the old versions went
    assert {p.name for p in out.iterdir() if p.name.startswith(".")} == current
    assert [r["step"] for r in json.loads((out / "training_history.json").read_text())["train"]] == [1]


@pytest.mark.parametrize("flag, old, new", [("training.warmup_ratio", 0.0, 0.5), ("max_grad_norm", 1.0, 0.5),
                                            ("lora.rank", 8, 4)])
def test_vlm_resume_refuses_a_changed_setting_and_keeps_its_config(flag, old, new, vlm_run, vlm_files, refused):
    refused(lambda: vlm(*vlm_flags(vlm_files, vlm_run, **{flag: new}), "--resume"),
            names=[f"was written with {flag}={old!r}, this run has {flag}={new!r}", "resume with its settings"],
            keep=[vlm_run])


def test_vlm_resume_refuses_a_changed_data_file(vlm_run, vlm_files, tmp_path, refused):
    train = vlm_files["data"]["train"]
    changed = train.parent / "changed.jsonl"
    changed.write_text(train.read_text().replace('"Yes"', '"No"', 1))
    refused(lambda: vlm(*vlm_flags(vlm_files, vlm_run, data_path=changed), "--resume"),
            names=[f"data_path {changed} has changed since checkpoint-2", "--overwrite_output_dir"], keep=[vlm_run])


def test_vlm_run_stopped_before_its_first_checkpoint_resumes_from_step_0(vlm_files, refused, capfd, tmp_path):
    from qlora_helpers.ch04_vlm.command import build_run, run_vlm

    out = tmp_path / "stopped"
    args = dict(zip(["model_id", "data_path", "val_path", "output_dir"],
                    map(str, [vlm_files["model"], vlm_files["data"]["train"], vlm_files["data"]["val"], out])))

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_vlm(build_run({}, {**args, "max_steps": 3, "eval_steps": 0, "save_steps": 2, "device": "cpu",
                               "training.gradient_accumulation_steps": 1}), progress=False, callbacks=[stop])
    refused(lambda: vlm(*vlm_flags(vlm_files, out, save_steps=2)), names=["stopped before its first checkpoint"],
            keep=[out])
    capfd.readouterr()
    assert vlm(*vlm_flags(vlm_files, out, save_steps=2), "--resume") == 0
    assert "--resume starts it from step 0" in capfd.readouterr().out
    history = json.loads((out / "training_history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2, 3] and latest_checkpoint(out).name == "checkpoint-2"
