"""Bad input never shows a traceback: one line on stderr naming what is wrong and the fix, exit status 2.

Every case runs the command's own entry point in this process (``qlora_helpers.cli.main``, the chat
module's ``main``, a benchmark's ``main`` under ``run_main`` as its ``__main__`` block does); two
cases at the end go through ``python -m`` to show the real entry point, and ``--debug``.
"""

import json
import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
from PIL import Image

from benchmarks import course_time, memory_validation
from qlora_helpers import cli
from qlora_helpers.ch03_sft.chat import main as chat_main
from qlora_helpers.common import assets
from qlora_helpers.errors import DEBUG_ENV, run_main

GOOD = {"messages": [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field."}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir):
    """The files the cases refer to as {name}: bad data, configs, output folders, asset caches."""
    root = tmp_path_factory.mktemp("bad-input")
    files = {"tmp": root, "tiny": tiny_llama_dir}
    files["good"] = _jsonl(root / "good.jsonl", [GOOD] * 4)
    files["empty"] = root / "empty.jsonl"
    files["empty"].write_text("\n")
    files["latin1"] = root / "latin1.jsonl"
    files["latin1"].write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\xe9"}\n'.encode("latin-1"))
    files["no_assistant"] = _jsonl(root / "no_assistant.jsonl", [{"messages": GOOD["messages"][:1]}])
    files["bad_json"] = root / "bad_json.jsonl"
    files["bad_json"].write_text('{"messages": [\n')
    files["typo_cfg"] = root / "typo.json"
    files["typo_cfg"].write_text('{"use_lora": true, "learning_rat": 1e-4}')
    files["broken_cfg"] = root / "broken.json"
    files["broken_cfg"].write_text('{"use_lora": true,\n "lora_r": }')
    files["a_file"] = root / "a_file"
    files["a_file"].write_text("not a folder")
    files["used_out"] = root / "used"
    files["used_out"].mkdir()
    (files["used_out"] / "adapter_model.safetensors").write_text("an earlier run")
    other = root / "other" / "checkpoints"
    (other / "step-000002").mkdir(parents=True)
    (other / "step-000002" / "state.json").write_text(json.dumps({"step": 2, "fingerprint": {"mode": "full"}}))
    (other / "latest").write_text("step-000002\n")
    files["other_run"] = other.parent
    files["empty_cache"] = root / "empty-cache"
    files["empty_cache"].mkdir()
    files["adapter_lost_base"] = root / "adapter"
    files["adapter_lost_base"].mkdir()
    (files["adapter_lost_base"] / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(root / "deleted-base"), "peft_type": "LORA"}))
    random_run = root / "random_run"
    (random_run / "best").mkdir(parents=True)
    (random_run / "best" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (random_run / "identities.json").write_text("[]")
    history = {"model_id": "tiny:llama", "data_dir": str(random_run)}
    (random_run / "training_history.json").write_text(json.dumps(history))
    files["random_run"] = random_run / "best"
    files["old_results"] = root / "course_cpu.json"
    files["old_results"].write_text(json.dumps({"benchmark": "course_cpu", "figures": {"total_seconds": 912}}))
    _vlm_inputs(root, files)
    return files


def _vlm_inputs(root, files) -> None:
    """Image-chat lines for the vlm command: one good, and one of each mistake."""
    Image.new("RGB", (8, 8)).save(root / "face.png")
    (root / "broken.png").write_text("not an image")
    ask, answer = {"role": "user", "content": "Is this a face?"}, {"role": "assistant", "content": "Yes"}
    rows = {"vlm_good": {"image": "face.png", "messages": [ask, answer]},
            "vlm_missing": {"image": "nowhere.png", "messages": [ask, answer]},
            "vlm_unreadable": {"image": "broken.png", "messages": [ask, answer]},
            "vlm_no_answer": {"image": "face.png", "messages": [ask]},
            "vlm_empty_answer": {"image": "face.png", "messages": [ask, {"role": "assistant", "content": " "}]},
            "vlm_unknown_role": {"image": "face.png", "messages": [{"role": "human", "content": "Hi"}, answer]}}
    for name, row in rows.items():
        files[name] = _jsonl(root / f"{name}.jsonl", [row])
    files["vlm_typo_cfg"] = root / "vlm_typo.json"
    files["vlm_typo_cfg"].write_text('{"max_step": 5}')
    files["vlm_section_typo_cfg"] = root / "vlm_section_typo.json"
    files["vlm_section_typo_cfg"].write_text('{"lora": {"rnk": 8}}')


@pytest.fixture(scope="module")
def corrupt_cache(inputs, cached_assets):
    """A cache holding a copy of the chatterbot asset with one byte of its training file changed."""
    cache = inputs["tmp"] / "corrupt-cache"
    folder = cache / assets.ASSETS["chatterbot-sft"].folder
    shutil.copytree(assets.verify("chatterbot-sft"), folder)
    data = folder / "train.jsonl"
    data.write_bytes(data.read_bytes()[:-2] + b"!\n")
    return cache


SFT = ("cli", "sft", "--output_dir", "{tmp}/out", "--model_name_or_path", "{tiny}", "--data_path", "{good}")
LORA = SFT + ("--use_lora",)
VLM = ("cli", "vlm", "--model_id", "{tmp}/no-vlm", "--data_path", "{vlm_good}", "--output_dir", "{tmp}/vlm-out")
# (id, argv: entry point first, environment, substrings the line must hold: what is wrong, then the fix)
CASES = [
    ("unknown command", ("cli", "trian"), {}, ["invalid choice: 'trian'", "--help"]),
    ("unknown asset", ("cli", "assets", "weights"), {}, ["unknown asset 'weights'", "choose from smollm2"]),
    ("unknown notebook", ("cli", "run", "42_nothing"), {}, ["no notebook '42_nothing'", "choose from 00_setup"]),
    ("parameter of the wrong type", ("cli", "run", "00", "-p", "max_steps", "abc"), {},
     ["max_steps of 00_setup must be int", "-p max_steps 3"]),
    ("bool parameter given a number", ("cli", "run", "02", "-p", "resume", "3"), {},
     ["resume of 02_tad_quantized_adapters must be bool", "true or false"]),
    ("unknown parameter", ("cli", "run", "00", "-p", "max_step", "2"), {},
     ["no notebook declares parameter(s) max_step", "did you mean max_steps?"]),
    ("unknown profile", ("cli", "run", "00", "-p", "profile", "turbo"), {}, ["profile must be one of", "'turbo'"]),
    ("gpu profile on the CPU", ("cli", "run", "01", "-p", "profile", "gpu"), {},
     ["torch sees no CUDA device", "use profile='cpu' or 'auto'"]),
    ("-p without a value", ("cli", "run", "00", "-p", "max_steps"), {}, ["expected 2 arguments", "--help"]),
    ("estimate: unknown model", ("cli", "estimate", "--model", "qwen9-1t", "--method", "qlora4", "--batch-size", "1",
                                 "--seq-len", "512"), {}, ["unknown model 'qwen9-1t'", "qwen2.5-7b"]),
    ("estimate: unknown method", ("cli", "estimate", "--model", "qwen2.5-7b", "--method", "qlora3", "--batch-size",
                                  "1", "--seq-len", "512"), {}, ["invalid choice: 'qlora3'", "choose from"]),
    ("estimate: batch size not a number", ("cli", "estimate", "--model", "qwen2.5-7b", "--method", "qlora4",
                                           "--batch-size", "one", "--seq-len", "512"), {},
     ["--batch-size: invalid int value: 'one'", "estimate --help"]),
    ("estimate: LoRA rank 0", ("cli", "estimate", "--model", "qwen2.5-7b", "--method", "qlora4", "--batch-size", "1",
                               "--seq-len", "512", "--lora-r", "0"), {}, ["LoRA rank must be a whole number", "try 8"]),
    ("sft: quantization_bit 3", SFT + ("--use_qlora", "--quantization_bit", "3"), {},
     ["quantization_bit must be 4 or 8, not 3", "NF4"]),
    ("sft: LoRA rank 0", LORA + ("--lora_r", "0"), {}, ["lora_r must be a positive integer", "8-64 is typical"]),
    ("sft: paged optimizer on the CPU", LORA + ("--optim", "paged_adamw_8bit"), {},
     ["optim=paged_adamw_8bit", "needs CUDA", "use adamw_torch on the CPU"]),
    ("sft: bf16 on a CPU without it", LORA + ("--bf16",), {"QLORA_CPU_DTYPE": "fp32"},
     ["this CPU has no native bf16", "drop --bf16"]),
    ("sft: fp16 on the CPU", LORA + ("--fp16",), {}, ["fp16 needs a CUDA GPU", "use --bf16 or neither"]),
    ("sft: device cuda without one", LORA + ("--device", "cuda"), {}, ["no CUDA device", "use --device cpu"]),
    ("sft: contradictory modes", LORA + ("--full_finetune",), {},
     ["full_finetune and use_lora contradict", "keep one"]),
    ("sft: value of the wrong type", LORA + ("--max_steps", "abc"), {},
     ["--max_steps: invalid int value: 'abc'", "sft --help"]),
    ("sft: misspelt flag", LORA + ("--lerning_rate", "1e-4"), {},
     ["unrecognized arguments: --lerning_rate", "did you mean --learning_rate?"]),
    ("sft: misspelt config key", SFT + ("--config_file", "{typo_cfg}"), {},
     ["unknown key 'learning_rat'", "did you mean 'learning_rate'?"]),
    ("sft: config not JSON", SFT + ("--config_file", "{broken_cfg}"), {}, ["broken.json:2: not valid JSON", "fix"]),
    ("sft: no such data file", LORA + ("--data_path", "{tmp}/nothing.jsonl"), {},
     ["nothing.jsonl: no such data file", "give --data_path a JSONL file"]),
    ("sft: no such held-out file", LORA + ("--eval_data_path", "{tmp}/nothing.jsonl"), {},
     ["nothing.jsonl: no such data file", "give --eval_data_path a JSONL file"]),
    ("sft: a folder as the data file", LORA + ("--data_path", "{tmp}"), {},
     ["is a folder, not a data file", "give --data_path a JSONL file"]),
    ("vlm: no such validation file", VLM + ("--val_path", "{tmp}/nothing.jsonl"), {},
     ["nothing.jsonl: no such data file", "give --val_path a JSONL file"]),
    ("sft: empty data", LORA + ("--data_path", "{empty}"), {}, ["empty.jsonl: no records", "add one JSON object"]),
    ("sft: data not UTF-8", LORA + ("--data_path", "{latin1}"), {},
     ["latin1.jsonl:2: not UTF-8", "save the file as UTF-8"]),
    ("sft: no assistant turn", LORA + ("--data_path", "{no_assistant}"), {},
     ["no_assistant.jsonl:1: field 'messages' has no assistant turn", "fix or remove those lines"]),
    ("sft: data not JSON", LORA + ("--data_path", "{bad_json}"), {},
     ["bad_json.jsonl:1: not valid JSON", "fix or remove those lines"]),
    ("sft: data entirely cut by max_length", LORA + ("--max_length", "8"), {},
     ["lost every assistant token to max_length=8", "raise --max_length"]),
    ("sft: model folder that does not exist", LORA + ("--model_name_or_path", "{tmp}/no-model"), {},
     ["no-model': no model folder there", "leave it empty for the cached SmolLM2"]),
    ("sft: hub id unreachable offline", LORA + ("--model_name_or_path", "qlora-course/no-such-model"), {},
     ["'qlora-course/no-such-model': cannot load a tokenizer", "give a local model folder"]),
    ("sft: output_dir under a file", LORA + ("--output_dir", "{a_file}/out"), {},
     ["a_file is a file, not a folder", "choose another --output_dir"]),
    ("sft: output_dir holds an earlier run", LORA + ("--output_dir", "{used_out}"), {},
     ["holds adapter_model.safetensors, not written by a course run", "choose another --output_dir"]),
    ("sft: output_dir holds a different run", LORA + ("--output_dir", "{other_run}", "--resume"), {},
     ["holds a different run: step-000002 was written with mode='full', this run has mode='lora'",
      "resume with its settings"]),
    ("sft: nothing to resume", LORA + ("--resume",), {}, ["nothing to resume", "run without --resume"]),
    ("sft: model asset missing", LORA + ("--model_name_or_path", ""), {"QLORA_CACHE_DIR": "{empty_cache}"},
     ["asset 'smollm2' is missing", "python -m qlora_helpers assets"]),
    ("sft: bad data is found before a missing model", LORA + ("--model_name_or_path", "", "--data_path", "{latin1}"),
     {"QLORA_CACHE_DIR": "{empty_cache}"}, ["latin1.jsonl:2: not UTF-8", "save the file as UTF-8"]),
    ("sft: data asset corrupt", ("cli", "sft", "--use_lora", "--output_dir", "{tmp}/out2", "--model_name_or_path",
                                 "{tiny}"), {"QLORA_CACHE_DIR": "{corrupt}"},
     ["asset 'chatterbot-sft' is corrupt", "assets --force chatterbot-sft"]),
    ("vlm: image missing", VLM + ("--data_path", "{vlm_missing}"), {},
     ["vlm_missing.jsonl:1: image nowhere.png not found", "fix the path"]),
    ("vlm: image unreadable", VLM + ("--data_path", "{vlm_unreadable}"), {},
     ["vlm_unreadable.jsonl:1: image broken.png cannot be read", "replace it with a PNG or JPEG"]),
    ("vlm: no assistant turn", VLM + ("--data_path", "{vlm_no_answer}"), {},
     ["vlm_no_answer.jsonl:1: no assistant turn", "add {\"role\": \"assistant\""]),
    ("vlm: empty answer", VLM + ("--val_path", "{vlm_empty_answer}"), {},
     ["vlm_empty_answer.jsonl:1: message 1 is an empty assistant answer", "write the answer"]),
    ("vlm: unknown role", VLM + ("--data_path", "{vlm_unknown_role}"), {},
     ["vlm_unknown_role.jsonl:1: message 0 has unknown role 'human'", "use one of system, user, assistant"]),
    ("vlm: no model", ("cli", "vlm", "--data_path", "{vlm_good}"), {}, ["model_id is empty", "give --model_id"]),
    ("vlm: model folder without a processor", VLM, {}, ["no-vlm': no processor to load", "give a from_pretrained"]),
    ("vlm: a text model", VLM + ("--model_id", "{tiny}"), {}, ["has no vision part", "python -m qlora_helpers sft"]),
    ("vlm: misspelt config key", VLM + ("--config_file", "{vlm_typo_cfg}"), {},
     ["unknown key 'max_step'", "did you mean 'max_steps'?"]),
    ("vlm: misspelt section key", VLM + ("--config_file", "{vlm_section_typo_cfg}"), {},
     ["unknown field lora.rnk", "known fields are alpha, dropout, rank, targets"]),
    ("vlm: misspelt flag", VLM + ("--lora.rnk", "8"), {}, ["unrecognized arguments: --lora.rnk", "--lora.rank?"]),
    ("vlm: LoRA rank 0", VLM + ("--lora.rank", "0"), {}, ["lora.rank must be a whole number >= 1", "try 8 or 16"]),
    ("vlm: unknown preset", VLM + ("--preset", "tiny"), {}, ["unknown preset 'tiny'", "use one of ultra_low_memory"]),
    ("vlm: nothing to resume", VLM + ("--resume",), {}, ["nothing to resume", "run without --resume"]),
    ("evaluate: no such folder", ("cli", "evaluate", "--model_path", "{tmp}/nothing/best"), {},
     ["nothing/best: no such folder", "give the best/ or final/ folder"]),
    ("evaluate: not an adapter", ("cli", "evaluate", "--model_path", "{used_out}"), {},
     ["holds no adapter_config.json", "give the best/ or final/ folder"]),
    ("evaluate: unknown task", ("cli", "evaluate", "--model_path", "{adapter_lost_base}", "--task", "sideways"), {},
     ["invalid choice: 'sideways'", "evaluate --help"]),
    ("evaluate: no data beside the adapter", ("cli", "evaluate", "--model_path", "{adapter_lost_base}"), {},
     ["names no data_dir", "pass --data_dir"]),
    ("evaluate: random weights", ("cli", "evaluate", "--model_path", "{random_run}"), {},
     ["trained on random weights (tiny:llama)", "pass --base_model"]),
    ("evaluate: examples into a folder", ("cli", "evaluate", "--model_path", "{random_run}", "--save_examples",
                                          "{tmp}"), {}, ["is a folder", "give a file name"]),
    ("chat: no such folder", ("chat", "--lora_model", "{tmp}/nothing", "--prompt", "hi"), {},
     ["nothing: no such model folder", "train one with"]),
    ("chat: not a model folder", ("chat", "--lora_model", "{tmp}", "--prompt", "hi"), {},
     ["neither an adapter", "give the output_dir"]),
    ("chat: adapter whose base is gone", ("chat", "--lora_model", "{adapter_lost_base}", "--prompt", "hi"), {},
     ["deleted-base' cannot be loaded", "pass --base_model"]),
    ("chat: 4-bit and 8-bit", ("chat", "--lora_model", "{tiny}", "--load_in_4bit", "--load_in_8bit"), {},
     ["contradict", "choose one"]),
    ("chat: no model given", ("chat", "--prompt", "hi"), {},
     ["the following arguments are required: --lora_model", "chat --help"]),
    ("benchmark: unknown choice", ("course_time", "--modes", "turbo"), {},
     ["invalid choice: 'turbo'", "benchmarks.course_time --help"]),
    ("benchmark: results file of an older schema", ("course_time", "--only", "00", "--out", "{old_results}"), {},
     ["course_cpu.json is from an older schema (no 'figures.modes')", "python -m benchmarks.course_time"]),
    ("benchmark: unknown flag", ("memory_validation", "--quik"), {}, ["unrecognized arguments: --quik", "--quick"]),
]
ENTRY = {"cli": cli.main, "chat": chat_main,
         "course_time": lambda argv: run_main(course_time.main, argv),
         "memory_validation": lambda argv: run_main(memory_validation.main, argv)}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_the_fix(case, inputs, corrupt_cache, capfd, monkeypatch):
    _, argv, env, wanted = case
    values = {k: str(v) for k, v in {**inputs, "corrupt": corrupt_cache}.items()}
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**values))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # no retries against the hub
    try:
        code = ENTRY[argv[0]]([a.format(**values) for a in argv[1:]])
    except SystemExit as stop:   # argparse exits from inside the parser
        code = stop.code
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for text in wanted:
        assert text in err, f"{text!r} not in {err!r}"


def test_enough_cases_and_every_entry_point():
    assert len(CASES) >= 30
    assert {c[1][0] for c in CASES} == set(ENTRY)
    # every command has cases; a command added to COMMANDS fails here until it brings its own
    assert {c[1][1] for c in CASES if c[1][0] == "cli"} >= set(cli.COMMANDS)


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="no notebook '42_nothing'"):
        cli.main(["run", "42_nothing"])
    monkeypatch.delenv(DEBUG_ENV)
    with pytest.raises(ValueError, match="no notebook '42_nothing'"):
        cli.main(["run", "42_nothing", "--debug"])


def test_the_real_entry_point():
    run = lambda *a: subprocess.run([sys.executable, "-m", "qlora_helpers", "run", "00", "-p", "max_steps", "abc",
                                     *a], capture_output=True, text=True)
    plain, debug = run(), run("--debug")
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert "must be int" in plain.stderr
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_ctrl_c_is_one_line_that_says_how_to_go_on(capfd):
    def stopped(argv):
        raise KeyboardInterrupt

    assert run_main(stopped, []) == 130
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stopped (Ctrl-C): ") and "--resume" in err
    with pytest.raises(KeyboardInterrupt):
        run_main(stopped, ["--debug"])


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    from qlora_helpers.ch03_sft.data import read_jsonl

    notepad = tmp_path / "notepad.jsonl"
    notepad.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2)
    assert read_jsonl(notepad) == [GOOD["messages"]] * 2
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b"\xef\xbb\xbf" + b'{"a": "caf\xe9"}\n')                  # the byte after the mark is named
    with pytest.raises(Exception, match=r"latin.jsonl:1: not UTF-8 \(byte 0xe9 at offset 13\)"):
        read_jsonl(latin)
