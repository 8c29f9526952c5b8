"""Nothing a user owns is ever deleted, no run state traps the user, and every failure names its file.

Every case reproduces one way the commands went wrong for a new user, and asserts through the ``refused``
fixture (tests/conftest.py) exit status 2, one line on stderr naming the file and the fix, nothing printed before
it, and every file present before the command present and unchanged after it; recoveries are plain asserts on
what the folder holds afterwards. Three parts:

- run folders of ``sft`` and ``vlm`` (``common.run_folder``): ``--overwrite_output_dir`` removes only what the
  course wrote, and only once the new run is checked; a run killed before its first checkpoint, a stale
  ``checkpoints/latest``, damaged checkpoint files and a full disk; a resume with other settings or other data;
- what a user gives a command: a merge into the user's folders, model folders cut, of the wrong kind or on another
  base, device names, files given for folders, negative counts, LoRA settings with full fine-tuning, a data line
  too long to read, and what ``max_length`` cut, printed on the console;
- chapter 05's YAML config, the runner (negative counts, ``--run-dir``, one summary row per notebook),
  ``estimate`` (impossible lengths, assumed config fields) and the example files of chapter 04.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nbformat
import pytest
import torch
from conftest import folder_state
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from qlora_helpers import cli
from qlora_helpers.ch01_memory.estimator import estimate
from qlora_helpers.ch03_sft import data as d
from qlora_helpers.ch03_sft import trainer as sft_trainer
from qlora_helpers.ch03_sft.chat import main as chat_main
from qlora_helpers.ch03_sft.command import SFTConfig, run_sft
from qlora_helpers.ch04_vlm.hub_model import write_tiny_vlm
from qlora_helpers.ch04_vlm.records import write_example_files
from qlora_helpers.ch05_multi_gpu import load_config, reversal, worker
from qlora_helpers.ch05_multi_gpu.config import OPTIMIZERS, check_config
from qlora_helpers.common import runner
from qlora_helpers.common.files import COURSE_FILES, course_files
from qlora_helpers.common.models import build_tiny, tiny_llama, write_model_folder
from qlora_helpers.common.run_folder import MANIFEST, aside_name, latest_checkpoint
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import run_main

# ---------------------------------------- Run folders of sft and vlm ----------------------------------


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


def test_what_a_run_writes_has_the_users_permissions(first_run):
    """The adapter, the summary and the checkpoints get what the umask allows, as the user's own files do
    (safetensors writes 0600: a model copied to a server or read by a colleague would be unreadable)."""
    mask = os.umask(0o022)
    os.umask(mask)
    wrong = {str(p.relative_to(first_run)): oct(p.stat().st_mode & 0o777) for p in first_run.rglob("*")
             if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o777 != 0o666 & ~mask}
    assert not wrong, wrong
    assert {"adapter_model.safetensors", "sft_summary.json"} <= {p.name for p in first_run.iterdir()}


def test_safetensors_and_temporary_files_get_the_umasks_mode(tmp_path):
    from safetensors.torch import save_file

    from qlora_helpers.common import files

    old = os.umask(0o022)
    files._umask.cache_clear()
    try:
        folder = tmp_path / "new"
        folder.mkdir()
        save_file({"w": torch.zeros(2)}, folder / "adapter_model.safetensors")     # safetensors writes 0600
        files.settle_tree(folder)
        written = files.atomic_write_text(tmp_path / "summary.json", "{}")          # mkstemp makes 0600
        assert [oct(p.stat().st_mode & 0o777) for p in (folder / "adapter_model.safetensors", written)] == ["0o644"] * 2
    finally:
        os.umask(old)
        files._umask.cache_clear()
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


def test_a_users_file_among_the_checkpoints_is_refused_not_removed(run_copy, tiny_llama_dir, data, refused):
    """--overwrite_output_dir removes the course's checkpoints/ whole: a file of the user's there stops it first."""
    (run_copy / "checkpoints" / "mine.txt").write_text("mine")
    refused(lambda: sft(*flags(tiny_llama_dir, data, run_copy, overwrite_output_dir=True)),
            names=["checkpoints holds mine.txt", "not written by a course run", "move it elsewhere"], keep=[run_copy])
    assert (run_copy / "checkpoints" / "mine.txt").read_text() == "mine"


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
    assert "resuming checkpoint-2 (step 2) with max_steps 3 -> 4, save_total_limit 2 -> 3" in capfd.readouterr().out
    assert summary(run_copy)["steps"] == 4


def test_a_finished_run_is_named_finished_with_how_to_train_it_further(run_copy, tiny_llama_dir, data, refused):
    refused(lambda: sft(*flags(tiny_llama_dir, data, run_copy)),
            names=["holds a finished run (sft_summary.json) with checkpoints up to checkpoint-2",
                   "pass --resume with a larger --max_steps"], keep=[run_copy])


def test_a_plain_resume_says_where_it_starts(run_copy, tiny_llama_dir, data, capfd):
    assert sft(*flags(tiny_llama_dir, data, run_copy), "--resume") == 0
    assert "resuming checkpoint-2 (step 2)\n" in capfd.readouterr().out


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


# ---------------------------------------- What a user gives a command ---------------------------------


GOOD = {"messages": [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field."}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _adapter(base, folder):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def _copy(source, folder):
    shutil.copytree(source, folder)
    return folder


def _run_folder(root, base):
    """A chapter-05 run's best/ whose adapter names ``base``, with the data folder beside it."""
    (root / "best").mkdir(parents=True)
    (root / "best" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                                   "base_model_name_or_path": str(base)}))
    (root / "identities.json").write_text("[]")
    (root / "training_history.json").write_text(json.dumps({"data_dir": str(root)}))
    return root / "best"


@pytest.fixture(scope="module")
def f(tmp_path_factory, tiny_llama_dir, cached_assets):
    """The user's files: an adapter in a folder of other work, broken model folders, a VLM, data files."""
    root = tmp_path_factory.mktemp("user-inputs")
    files = {"tiny": tiny_llama_dir, "root": root, "work": root / "work"}
    (root / "work" / "other-run").mkdir(parents=True)
    (root / "work" / "other-run" / "notes.txt").write_text("a week of results")
    files["adapter"] = _adapter(tiny_llama_dir, root / "work" / "adapter")
    files["narrow"] = write_model_folder(root / "narrow", lambda tok: build_tiny(tiny_llama(len(tok), 32)), "smollm2")
    files["truncated"] = _copy(tiny_llama_dir, root / "truncated")
    weights = files["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    files["sharded"] = _copy(tiny_llama_dir, root / "sharded")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (files["sharded"] / "model.safetensors").rename(files["sharded"] / shards[0])
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shards[0], "lm_head.weight": shards[1]}}
    (files["sharded"] / "model.safetensors.index.json").write_text(json.dumps(index))
    files["cut_config"] = _copy(tiny_llama_dir, root / "cut-config")
    (files["cut_config"] / "config.json").write_text((tiny_llama_dir / "config.json").read_text()[:150])
    files["vlm"] = write_tiny_vlm(root / "llava", "llava")
    files["good"] = _jsonl(root / "good.jsonl", [GOOD] * 4)
    files["vlm_data"] = write_example_files(root / "vlm-data", n_train=1, n_val=1)["train"]
    files["a_file"] = tiny_llama_dir / "config.json"
    files["vlm_run"] = _run_folder(root / "vlm-run", files["vlm"])
    files["cut_run"] = _run_folder(root / "cut-run", files["cut_config"])
    return files


def _call(entry, *argv):
    return lambda: (chat_main if entry == "chat" else cli.main)([str(a) for a in argv])


def _sft(f, *extra):
    return _call("sft", "sft", "--model_name_or_path", f["tiny"], "--data_path", f["good"], "--output_dir",
                 f["root"] / "sft-out", "--device", "cpu", *extra)


# --------------------------------------------------------------------------- 1. merging
@pytest.mark.parametrize("key", [EOFError, KeyboardInterrupt], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_or_ctrl_c_at_the_chat_prompt_ends_the_chat(f, monkeypatch, key):
    def typed(prompt):
        raise key

    monkeypatch.setattr("builtins.input", typed)
    assert chat_main(["--lora_model", str(f["adapter"]), "--chat"]) == 0


def test_merge_into_a_folder_holding_the_adapter_is_refused_even_with_overwrite(f, refused):
    refused(_call("chat", "--lora_model", f["adapter"], "--merge_to", f["work"], "--overwrite"),
            names=[str(f["work"]), "holds the adapter being merged", "choose a new folder"], keep=[f["root"]])


def test_merge_into_the_adapters_own_folder_is_refused_even_with_overwrite(f, refused):
    refused(_call("chat", "--lora_model", f["adapter"], "--merge_to", f["adapter"], "--overwrite"),
            names=[str(f["adapter"]), "is the adapter being merged", "adapter-merged"], keep=[f["root"]])


def test_merge_into_the_base_model_is_refused(f, refused):
    refused(_call("chat", "--lora_model", f["adapter"], "--merge_to", f["tiny"], "--overwrite"),
            names=[str(f["tiny"]), "is its base model", "choose a new folder"], keep=[f["tiny"], f["work"]])


def test_merge_with_overwrite_into_a_folder_of_user_files_is_refused(f, refused):
    refused(_call("chat", "--lora_model", f["adapter"], "--merge_to", f["work"] / "other-run", "--overwrite"),
            names=["other-run holds files this command did not write (notes.txt)", "choose another --merge_to"],
            keep=[f["root"]])


def test_overwrite_replaces_only_an_earlier_merge_which_stays_a_real_folder(f, refused, tmp_path):
    out = tmp_path / "merged"
    assert chat_main(["--lora_model", str(f["adapter"]), "--merge_to", str(out)]) == 0
    listed = course_files(out)
    assert out.is_dir() and not out.is_symlink() and listed == {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", COURSE_FILES} <= listed
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777
    refused(_call("chat", "--lora_model", f["adapter"], "--merge_to", out),
            names=["already holds files of an earlier merge", "pass --overwrite"], keep=[out])
    assert chat_main(["--lora_model", str(f["adapter"]), "--merge_to", str(out), "--overwrite"]) == 0
    assert out.is_dir() and not out.is_symlink() and course_files(out) == listed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]          # no hidden version left beside it
    (out / "my-eval.json").write_text("{}")                                   # the user adds a file: now it is theirs
    refused(_call("chat", "--lora_model", f["adapter"], "--merge_to", out, "--overwrite"),
            names=["did not write (my-eval.json)"], keep=[out, f["work"]])


# --------------------------------------------------------------------------- 3. one line naming the file and the fix
def test_truncated_weights(f, refused):
    refused(_call("chat", "--lora_model", f["truncated"], "--prompt", "hi"),
            names=[str(f["truncated"] / "model.safetensors"), "is truncated (100,000 of", "download the model"],
            keep=[f["truncated"]])


def test_missing_shard(f, refused):
    refused(_sft(f, "--use_lora", "--model_name_or_path", f["sharded"]),
            names=["model-00002-of-00002.safetensors is missing", "model.safetensors.index.json", "download"],
            keep=[f["sharded"]])


def test_cut_config(f, refused):
    refused(_call("evaluate", "evaluate", "--model_path", f["cut_run"], "--device_map", "cpu"),
            names=[str(f["cut_config"] / "config.json"), "is cut or not JSON", "download the model folder again"],
            keep=[f["cut_config"], f["cut_run"].parent])


def test_adapter_on_another_base_names_both(f, refused):
    line = refused(_call("chat", "--lora_model", f["adapter"], "--base_model", f["narrow"], "--prompt", "hi"),
                   names=[f"trained on base {f['tiny']}", f"do not fit base {f['narrow']}",
                          f"pass --base_model {f['tiny']}"], keep=[f["work"], f["narrow"]])
    assert len(line) < 500


@pytest.mark.parametrize("command", ["sft", "chat", "evaluate"])
def test_a_vlm_given_to_a_text_command(f, refused, command):
    call = {"sft": _sft(f, "--use_lora", "--model_name_or_path", f["vlm"]),
            "chat": _call("chat", "--lora_model", f["vlm"], "--prompt", "hi"),
            "evaluate": _call("evaluate", "evaluate", "--model_path", f["vlm_run"], "--device_map", "cpu")}[command]
    refused(call, names=[str(f["vlm"]), "is an image-text-to-text model (llava)", "python -m qlora_helpers vlm"],
            keep=[f["vlm"]])


def _vlm(f, model, *extra):
    return _call("vlm", "vlm", "--model_id", model, "--data_path", f["vlm_data"], "--output_dir",
                 f["root"] / "vlm-out", "--device", "cpu", *extra)


def test_a_text_model_given_to_vlm(f, refused):
    refused(_vlm(f, f["tiny"]), names=[str(f["tiny"]), "has no vision part", "python -m qlora_helpers sft"],
            keep=[f["tiny"], f["vlm_data"].parent])


@pytest.mark.parametrize("call", ["evaluate", "chat"])
def test_bad_device_names(f, refused, call):
    if call == "evaluate":
        refused(_call("evaluate", "evaluate", "--model_path", f["vlm_run"], "--device_map", "tpu"),
                names=["--device_map 'tpu' is not a device", "use auto, cpu, cuda or cuda:N"])
    else:
        refused(_call("chat", "--lora_model", f["adapter"], "--device", "tpu", "--prompt", "hi"),
                names=["--device 'tpu' is not a device", "use cpu, cuda or cuda:N"], keep=[f["work"]])


@pytest.mark.parametrize("command", ["chat", "sft", "evaluate", "vlm", "merge"])
def test_a_file_where_a_folder_is_expected(f, refused, command):
    file = f["a_file"]
    call = {"chat": _call("chat", "--lora_model", file, "--prompt", "hi"),
            "sft": _sft(f, "--use_lora", "--model_name_or_path", file),
            "evaluate": _call("evaluate", "evaluate", "--model_path", file, "--device_map", "cpu"),
            "vlm": _vlm(f, file),
            "merge": _call("chat", "--lora_model", f["adapter"], "--merge_to", f["good"], "--overwrite")}[command]
    file = f["good"] if command == "merge" else file
    refused(call, names=[str(file), "is a file"], keep=[f["tiny"], file])


def test_no_warning_before_the_error_line_in_a_fresh_process(f):
    """Imports print notes in a fresh process (runpy, bitsandbytes): none may come before the error."""
    run = subprocess.run([sys.executable, "-m", "qlora_helpers.ch03_sft.chat", "--lora_model", str(f["vlm"]),
                          "--prompt", "hi"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr


# --------------------------------------------------------------------------- 5. counts, modes, data
SFT_COUNTS = [("save_steps", "-1"), ("max_train_samples", "-3"), ("max_eval_samples", "-1"), ("eval_steps", "-2"),
              ("warmup_steps", "-1"), ("save_total_limit", "-1"), ("logging_steps", "0"), ("max_steps", "-5"),
              ("num_train_epochs", "-1"), ("max_grad_norm", "-1")]


@pytest.mark.parametrize("key,value", SFT_COUNTS, ids=[k for k, _ in SFT_COUNTS])
def test_negative_counts_of_sft(f, refused, key, value):
    refused(_sft(f, "--use_lora", f"--{key}", value), names=[key, value], keep=[f["good"]])


def test_negative_counts_of_evaluate_chat_and_vlm(f, refused):
    refused(_call("evaluate", "evaluate", "--model_path", f["vlm_run"], "--max_new_tokens", "-3"),
            names=["--max_new_tokens must be >= 0", "-3"])
    refused(_call("chat", "--lora_model", f["adapter"], "--max_new_tokens", "-3", "--prompt", "hi"),
            names=["--max_new_tokens must be >= 1", "-3"])
    refused(_vlm(f, f["vlm"], "--max_grad_norm", "-1"), names=["max_grad_norm must be >= 0", "-1"])


def test_lora_settings_with_full_fine_tuning(f, refused, tmp_path):
    refused(_sft(f, "--lora_r", "16"), names=["lora_r is a LoRA setting", "full fine-tuning", "add --use_lora"])
    config = tmp_path / "full.json"
    config.write_text(json.dumps({"full_finetune": True, "lora_alpha": 32}))
    refused(_sft(f, "--config_file", config), names=["lora_alpha is a LoRA setting", "drop lora_alpha"],
            keep=[tmp_path])


def test_an_overlong_data_line_is_refused_without_reading_it_whole(f, refused, tmp_path):
    data = tmp_path / "huge.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(GOOD) + "\n")
        fh.write(json.dumps({"messages": [{"role": "user", "content": "x" * 8 * 2**20}]}) + "\n")
    refused(_sft(f, "--use_lora", "--data_path", data), names=[f"{data}:2", "longer than 1 MiB", "split it"],
            keep=[tmp_path])
    tracemalloc.start()
    with pytest.raises(d.DataError):
        d.read_jsonl(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * 2**20, f"{peak:,} bytes held to refuse an 8 MiB line"


def test_cut_and_dropped_conversations_are_printed(f, tmp_path, capfd):
    tokenizer = AutoTokenizer.from_pretrained(f["tiny"])
    short = len(d.encode_chat(GOOD["messages"], tokenizer).input_ids)
    long_question = [{"role": "user", "content": "why " * 200}, GOOD["messages"][1]]
    long_answer = [GOOD["messages"][0], {"role": "assistant", "content": "because " * 200}]
    data = _jsonl(tmp_path / "mixed.jsonl", [GOOD, GOOD, {"messages": long_question}, {"messages": long_answer}])
    argv = ["sft", "--use_lora", "--model_name_or_path", str(f["tiny"]), "--data_path", str(data), "--output_dir",
            str(tmp_path / "out"), "--device", "cpu", "--max_steps", "1", "--save_steps", "0",
            "--max_length", str(short + 2), "--per_device_train_batch_size", "2"]
    capfd.readouterr()
    assert cli.main(argv) == 0
    out = capfd.readouterr().out
    assert f"data: 1 of 4 conversations are longer than max_length={short + 2} tokens and were cut" in out
    assert "data: 1 of 4 conversations were dropped" in out and "raise --max_length" in out


# ---------------------------------------- Chapter 05's YAML config, the runner, estimate and example files ---


ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "data" / "configs" / "multi_gpu_cpu.yaml"


def yaml_config(tmp_path, old: str = "", new: str = "", name: str = "run.yaml") -> Path:
    """The CPU config of chapter 05 with ``old`` replaced by ``new`` (once), written to ``tmp_path/name``."""
    text = CPU_CONFIG.read_text()
    assert not old or text.count(old) == 1
    path = tmp_path / name
    path.write_text(text.replace(old, new) if old else text)
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# ---- chapter 05's YAML config ------------------------------------------------------------------------------

def test_the_course_configs_pass_with_numbers_as_numbers():
    for name in ("multi_gpu_cpu", "multi_gpu_32b"):
        cfg = load_config(ROOT / "data" / "configs" / f"{name}.yaml")
        assert isinstance(cfg["training"]["learning_rate"], float) and cfg["lora"]["r"] == 8   # "1e-4" read as text


@pytest.mark.parametrize("old,new,line,needles", [
    ("  r: 8", "  rank: 8", "rank:", ["unknown key lora.rank", "did you mean lora.r?"]),                 # renamed
    ("  seed: 0 ", "  seed: 0\n  lerning_rate: 1e-3 ", "lerning_rate:",
     ["training.lerning_rate", "did you mean training.learning_rate?"]),
    ("  r: 8", "  learning_rate: 8", "  learning_rate:",                                       # wrong section
     ["lora.learning_rate", "did you mean training.learning_rate?"]),
    ("batch_size: 4 ", "batch_size: four ", "batch_size:", ["batch_size must be a whole number", "not 'four'"]),
    ("batch_size: 4 ", "batch_size: -4 ", "batch_size:", ["training.batch_size must be a whole number >= 1, not -4"]),
    ("gradient_checkpointing: false", "gradient_checkpointing: maybe", "gradient_checkpointing:",
     ["training.gradient_checkpointing must be true or false"]),
    ("optimizer: adamw ", "optimizer: adam ", "optimizer:", ["training.optimizer must be one of adamw"]),
    ("min_lr: 1e-4", "min_lr: 1e-2", "min_lr:", ["training.min_lr = 0.01 is not valid", "below learning_rate"]),
])
def test_a_wrong_key_or_value_names_file_line_and_fix(tmp_path, old, new, line, needles):
    path = yaml_config(tmp_path, old, new)
    with pytest.raises(ValueError) as err:
        load_config(path)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{path}:{line_of(path, line)}: "), message
    assert all(n in message for n in needles), message


def test_a_missing_key_a_malformed_file_and_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"section lora lacks r \(a whole number >= 1\): add it"):
        load_config(yaml_config(tmp_path, "  r: 8\n", ""))
    broken = yaml_config(tmp_path, "  alpha: 16", "  alpha: [16")
    with pytest.raises(ValueError) as err:
        load_config(broken)
    assert re.fullmatch(rf"{re.escape(str(broken))}:\d+: not valid YAML \(.+\); fix that line", str(err.value))
    assert "<unicode string>" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"config .*nowhere.yaml: not found \(looked in .*nowhere.yaml\)"):
        load_config(tmp_path / "nowhere.yaml")
    with pytest.raises(ValueError, match="must hold the sections lora, training"):
        check_config(["lora"], "x.yaml")


def test_the_optimizer_names_are_the_course_map():
    from qlora_helpers.common.optim import OPTIMIZERS as COURSE  # imports bitsandbytes: here, not in the module

    assert set(OPTIMIZERS) == set(COURSE)


def test_notebook_05_reads_its_config_through_the_check():
    """The cell that reads ``config`` checks it in the notebook's kernel, before any cell launches a worker."""
    nb = nbformat.read(ROOT / "notebooks" / "05_multi_gpu_32b.ipynb", as_version=4)
    code = ["".join(c.source) for c in nb.cells if c.cell_type == "code"]
    reads = next(i for i, src in enumerate(code) if "config_path" in src and "cfg = " in src)
    assert "cfg = load_config(config_path)" in code[reads] and "yaml.safe_load" not in "".join(code)
    assert reads < next(i for i, src in enumerate(code) if "notebook_launcher(" in src)


def test_the_worker_command_refuses_a_bad_config_before_writing(tmp_path, refused):
    path = yaml_config(tmp_path, "  r: 8", "  rank: 8")
    argv = ["--config", str(path), "--profile", "cpu", "--output-dir", str(tmp_path / "out"),
            "--data-dir", str(tmp_path / "data")]
    refused(lambda: run_main(worker.main, argv), names=[str(path), "lora.rank", "lora.r"], keep=[tmp_path])
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_the_summary_stays_one_row_per_notebook(tmp_path):
    """A notebook whose config is wrong fails at that cell, named in one row; a multi-line error with '|' too."""
    bad = yaml_config(tmp_path, "  seed: 0 ", "  seed: 0\n  a|b: 1 ")
    books = []
    reads = f"from qlora_helpers.ch05_multi_gpu import load_config\nload_config({str(bad)!r})"
    for stem, cell in (("07_config", reads), ("08_lines", "raise ValueError('first | part\\nsecond line')")):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        params = nbformat.v4.new_code_cell("max_steps: int = 2")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(cell)]
        nbformat.write(nb, tmp_path / f"{stem}.ipynb")
        books.append(str(tmp_path / f"{stem}.ipynb"))
    run_dir, runs = runner.run_notebooks(books, {}, tmp_path / "run", progress=False)
    assert [r.status for r in runs] == ["failed", "failed"]
    assert f"{bad}:" in runs[0].error and "unknown key training.a|b" in runs[0].error
    rows = (run_dir / "summary.md").read_text().split("\n\n")[0].splitlines()
    assert len(rows) == 4 and rows[2].startswith("| 07_config | failed |") and rows[3].startswith("| 08_lines |")
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 5 for row in rows)    # four columns, '|' in the text escaped
    assert "first \\| part; second line" in rows[3]


# ---- the runner: counts and the run folder ---------------------------------------------------------------

def test_a_negative_count_is_refused_up_front(tmp_path, refused):
    line = refused(lambda: cli.main(["run", "00", "-p", "max_steps", "-5", "--run-dir", str(tmp_path / "run")]),
                   names=["max_steps", "00_setup", "cannot be negative", "not -5", "-p max_steps 3"], keep=[tmp_path])
    assert not (tmp_path / "run").exists(), line


@pytest.mark.parametrize("name, value, says", [("lr_lora", "-0.0002", "cannot be negative"),
                                               ("lora_dropout", "1.5", "pass 0 to 1"),
                                               ("lr_full", ".inf", "a finite number")])
def test_a_negative_or_out_of_range_float_is_refused_up_front(tmp_path, refused, name, value, says):
    refused(lambda: cli.main(["run", "03", "-p", name, value, "--run-dir", str(tmp_path / "run")]),
            names=[name, "03_qwen_sft", says, f"-p {name} "], keep=[tmp_path])
    assert not (tmp_path / "run").exists()


def test_every_declared_number_parameter_keeps_the_rule():
    """The rule the runner applies (an ``int`` or ``float`` parameter is never negative; a dropout or ratio at most
    1) holds for every course notebook's defaults, and 0 passes."""
    for book in runner.discover():
        for name, spec in runner.declared_parameters(book).items():
            if spec["inferred_type_name"] in ("int", "float"):
                default = (int if spec["inferred_type_name"] == "int" else float)(spec["default"])
                assert runner.check_value(book.stem, name, default, {name: spec}) == default, (book.stem, name)
                assert runner.check_value(book.stem, name, 0, {name: spec}) == 0


def test_a_run_dir_that_is_a_file_or_holds_other_files_is_refused(tmp_path, refused):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    for run_dir in (str(mine), str(mine / "run")):
        refused(lambda folder=run_dir: cli.main(["run", "00", "--run-dir", folder]), names=[run_dir, "is a file"],
                keep=[tmp_path])
    refused(lambda: cli.main(["run", "00", "--run-dir", str(tmp_path)]), names=[str(tmp_path), "notes.txt"],
            keep=[tmp_path])


# ---- estimate: impossible lengths and config.json fields -----------------------------------------------------

def test_a_length_beyond_the_model_is_refused(refused):
    refused(lambda: cli.main(["estimate", "--model", "qwen2.5-7b", "--method", "qlora4", "--batch-size", "1",
                              "--seq-len", "100000000000"]),
            names=["--seq-len 100000000000", "max_position_embeddings, 32768", "--seq-len 32768 or less"])


@pytest.mark.parametrize("rope, longest", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 2048),   # Qwen2.5's 128K recipe
    ({"type": "linear", "factor": 2.0}, 1024),                                              # the older key name
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}, 512),                                                          # already stretched
])
def test_a_rope_scaling_that_stretches_the_positions_is_read(tmp_path, capfd, rope, longest):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**DECODER, "rope_scaling": {"rope_theta": 10000.0, **rope}}))
    base = ["estimate", "--model", str(path), "--method", "qlora4", "--batch-size", "1"]
    assert cli.main([*base, "--seq-len", str(longest)]) == 0
    capfd.readouterr()
    assert cli.main([*base, "--seq-len", str(longest + 1)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"{longest}, the longest sequence" in err
    assert ("rope scaling factor" in err) == (longest > DECODER["max_position_embeddings"])


DECODER = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 1000, "tie_word_embeddings": False, "max_position_embeddings": 512}


def test_a_config_json_without_its_size_is_refused(tmp_path, refused):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in DECODER.items()
                                if k not in ("num_hidden_layers", "intermediate_size", "vocab_size")}))
    refused(lambda: cli.main(["estimate", "--model", str(path), "--method", "qlora4", "--batch-size", "1",
                              "--seq-len", "64"]),
            names=[str(path), "no intermediate_size, num_hidden_layers, vocab_size", "copy them"], keep=[tmp_path])


def test_each_field_taken_from_the_config_class_is_named(tmp_path, capfd):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in DECODER.items()
                                if k not in ("tie_word_embeddings", "max_position_embeddings")}))
    base = ["estimate", "--model", str(path), "--method", "qlora4", "--batch-size", "1"]
    assert cli.main([*base, "--seq-len", "64"]) == 0
    notes = capfd.readouterr().err.splitlines()
    assert [n.split(";")[0] for n in notes] == [f"note: {path}: no tie_word_embeddings",
                                               f"note: {path}: no max_position_embeddings"]
    assert "taken as False, LlamaConfig's default" in notes[0] and "taken as 2048" in notes[1]
    assert cli.main([*base, "--seq-len", "4096"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "2048 (its config class's default: the file states none)" in err


def test_a_vlm_config_relying_on_its_language_models_defaults_is_named_and_read_as_transformers_does(tmp_path):
    """llava-1.5-7b-hf's config.json gives its language model only a vocabulary and a length: LlamaConfig's
    defaults are Llama-2-7B's, which it is built from, so the estimate equals the preset's, each field named."""
    text = {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064}
    vision = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
              "hidden_act": "quick_gelu"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
                                "text_config": text, "vision_config": vision, "tie_word_embeddings": False,
                                "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}))
    with pytest.warns(UserWarning) as notes:
        config = get_config(path)
    named = {str(w.message).split(";")[0].rsplit(" ", 1)[-1] for w in notes}
    assert named == {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}
    kw = dict(batch_size=1, seq_len=512, grad_ckpt=True)
    preset = estimate(get_config("llava-1.5-7b"), "qlora4", **kw)
    assert estimate(config, "qlora4", **kw).total_bytes == preset.total_bytes


# ---- what chapter 05 and chapter 04 write into a folder a user names ---------------------------------------

def test_the_worker_leaves_a_users_final_and_best_alone(tmp_path, refused):
    out = tmp_path / "outputs" / "mine_forward"
    (out / "final").mkdir(parents=True)
    (out / "final" / "adapter_model.safetensors").write_bytes(b"a user's adapter")
    argv = ["--config", str(CPU_CONFIG), "--profile", "cpu", "--output-dir", str(tmp_path / "outputs"), "--name",
            "mine", "--data-dir", str(tmp_path / "data")]
    refused(lambda: run_main(worker.main, argv), names=[str(out), "final", "choose another output_dir or name"],
            keep=[tmp_path])
    (out / "final" / "adapter_model.safetensors").unlink()
    (out / "final").rmdir()
    (out / "best").mkdir()
    (out / "best" / "notes.txt").write_text("mine")
    refused(lambda: run_main(worker.main, argv), names=[str(out), "best"], keep=[tmp_path])
    run = dict(output_dir=str(tmp_path / "outputs"), name="../elsewhere", task="forward")
    with pytest.raises(ValueError, match="plain folder name"):
        worker.check_run_folder(run)


def test_the_worker_reuses_an_earlier_runs_folder(tmp_path):
    out = tmp_path / "lfw_forward"
    (out / "final").mkdir(parents=True)
    (out / "final" / "sft_config.json").write_text("{}")     # what the sft command writes first
    (out / "run.json").write_text("{}")
    assert worker.check_run_folder(dict(output_dir=str(tmp_path), name="lfw", task="forward")) == out
    (out / "final" / "sft_config.json").unlink()
    (out / "training_history.json").write_text(json.dumps({"task": "forward", "steps": []}))
    assert worker.check_run_folder(dict(output_dir=str(tmp_path), name="lfw", task="forward")) == out


def test_the_worker_data_never_replaces_a_users_file(tmp_path, refused, cached_assets):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    (data / "forward_train.jsonl").write_text('{"mine": true}\n')
    argv = ["--config", str(CPU_CONFIG), "--profile", "cpu", "--output-dir", str(tmp_path / "outputs"),
            "--data-dir", str(data)]
    refused(lambda: run_main(worker.main, argv), names=[str(data / "forward_train.jsonl"), "--data-dir", "move"],
            keep=[tmp_path])
    assert sorted(p.name for p in data.iterdir()) == ["forward_train.jsonl", "notes.txt"]   # nothing written
    (data / "forward_train.jsonl").unlink()
    reversal.generate_data(data, num_identities=4, seed=0)
    again = reversal.generate_data(data, num_identities=6, seed=1)       # the course's own files: replaced
    assert len(json.loads((again / "identities.json").read_text())) == 6 and (data / "notes.txt").read_text() == "mine"


def test_the_example_files_never_replace_a_users_file(tmp_path, refused):
    (tmp_path / "train.jsonl").write_text('{"mine": true}\n')
    refused(lambda: run_main(lambda argv: write_example_files(tmp_path, n_train=4, n_val=2, size=16), []),
            names=[str(tmp_path), "train.jsonl", "new or empty folder"], keep=[tmp_path])
    ours = tmp_path / "examples"
    first = write_example_files(ours, n_train=4, n_val=2, size=16)
    again = write_example_files(ours, n_train=6, n_val=2, size=20)      # the course's own files: replaced
    assert first == again and len(again["train"].read_text().splitlines()) == 6
