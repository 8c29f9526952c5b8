"""Bad settings in the files a user owns (chapter 05's YAML config, a config.json, a run folder) stop with one line,
exit status 2, naming the file and the fix, and change nothing; the runner's summary stays one row per notebook."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from qlora_helpers import cli
from qlora_helpers.ch01_memory.estimator import estimate
from qlora_helpers.ch04_vlm.records import write_example_files
from qlora_helpers.ch05_multi_gpu import load_config, worker
from qlora_helpers.ch05_multi_gpu.config import OPTIMIZERS, check_config
from qlora_helpers.common import runner
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import run_main

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


def test_every_declared_int_parameter_is_a_count():
    """The rule the runner applies (an ``int`` parameter is never negative) holds for every course notebook."""
    for book in runner.discover():
        for name, spec in runner.declared_parameters(book).items():
            if spec["inferred_type_name"] == "int":
                assert int(spec["default"]) >= 0, (book.stem, name)
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


def test_the_example_files_never_replace_a_users_file(tmp_path, refused):
    (tmp_path / "train.jsonl").write_text('{"mine": true}\n')
    refused(lambda: run_main(lambda argv: write_example_files(tmp_path, n_train=4, n_val=2, size=16), []),
            names=[str(tmp_path), "train.jsonl", "new or empty folder"], keep=[tmp_path])
    ours = tmp_path / "examples"
    first = write_example_files(ours, n_train=4, n_val=2, size=16)
    again = write_example_files(ours, n_train=6, n_val=2, size=20)      # the course's own files: replaced
    assert first == again and len(again["train"].read_text().splitlines()) == 6
