"""What a user gives a command is checked before it is used, and never replaced: one line naming the file and the
fix, exit status 2, nothing printed before it, every file the user had left as it was (``refused`` in conftest).

The cases follow the robustness issue: a merge that must not replace the user's folders; model folders that are
cut, of the wrong kind or on another base; device names; files given for folders; negative counts; LoRA settings
with full fine-tuning; a data line too long to read; and what ``max_length`` cut, printed on the console.
"""

import json
import shutil
import subprocess
import sys
import tracemalloc

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_helpers import cli
from qlora_helpers.ch03_sft import data as d
from qlora_helpers.ch03_sft.chat import main as chat_main
from qlora_helpers.ch04_vlm.hub_model import write_tiny_vlm
from qlora_helpers.ch04_vlm.records import write_example_files
from qlora_helpers.common.files import COURSE_FILES, course_files
from qlora_helpers.common.models import build_tiny, tiny_llama, write_model_folder

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
