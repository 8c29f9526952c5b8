"""The ``vlm`` command on tiny random LLaVA, Qwen2-VL and Idefics3 folders with real tokenizers and processors.

The promises of ``python -m qlora_helpers vlm``: the language model is NF4 while the vision tower
stays 16-bit, the loss is on the answer only, the saved adapter loads in a fresh process with plain
``PeftModel.from_pretrained`` and gives the same logits, and a run interrupted after a checkpoint ends,
resumed, on the same losses as an uninterrupted one (LoRA dropout on: the random generators resume too).
The training is TRL's ``SFTTrainer``; checkpoints are chapter 03's (``checkpoints/checkpoint-N`` complete once
its ``state.json`` is written, named in ``checkpoints/latest``), ``best/`` the adapter of the lowest validation loss.
"""

import json
import re
import subprocess
import sys
from dataclasses import replace

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from qlora_helpers import cli
from qlora_helpers.ch04_vlm.command import build_run, run_vlm
from qlora_helpers.ch04_vlm.config import preset
from qlora_helpers.ch04_vlm.hub_model import load_vlm, takes_images, write_tiny_vlm
from qlora_helpers.ch04_vlm.records import encode_all, read_records, write_example_files
from qlora_helpers.ch04_vlm.trainer import evaluate
from qlora_helpers.ch04_vlm.vram import estimate_vlm, model_config
from qlora_helpers.common.models import embeddings_on_cpu

FAMILIES = ("llava", "qwen2_vl", "idefics3")
RELOAD = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
dtype, jobs = getattr(torch, sys.argv[1]), sys.argv[2:]
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head", ".*vision_tower",
                         ".*visual", ".*multi_modal_projector", ".*vision_model", ".*connector"])
for i in range(0, len(jobs), 4):
    base_id, adapter, batch, out = jobs[i:i + 4]
    base = AutoModelForImageTextToText.from_pretrained(base_id, quantization_config=bnb, dtype=dtype, device_map="cpu")
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        torch.save(model(**torch.load(batch)).logits, out)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, cached_assets):
    root = tmp_path_factory.mktemp("vlm-command")
    return {"data": write_example_files(root / "data", n_train=6, n_val=2),
            **{family: write_tiny_vlm(root / family, family) for family in FAMILIES}, "root": root}


def _run(files, family: str, name: str, **flags):
    data = files["data"]
    base = {"model_id": str(files[family]), "data_path": str(data["train"]), "val_path": str(data["val"]),
            "output_dir": str(files["root"] / name), "max_steps": 4, "eval_steps": 2, "save_steps": 1,
            "lora.dropout": 0.1, "training.learning_rate": 0.01, "training.gradient_accumulation_steps": 2}
    return build_run({}, {**base, **flags})


@pytest.fixture(scope="module")
def trained(files):
    return {family: run_vlm(_run(files, family, f"{family}-full"), progress=False) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_4bit_tower_16bit(trained, family):
    model = trained[family].model
    kinds = {name: type(m) for name, m in model.named_modules()}
    lm = [k for n, k in kinds.items() if re.search(r"\.(language|text)_model\.", n) and n.endswith("q_proj.base_layer")]
    tower = [k for n, k in kinds.items() if re.search(r"\.(vision_tower|visual|vision_model)\.", n)
             and issubclass(k, torch.nn.Linear)]
    assert lm and all(k is bnb.nn.Linear4bit for k in lm)
    assert tower and not any(k is bnb.nn.Linear4bit for k in tower)
    assert model.config.quantization_config.bnb_4bit_use_double_quant
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_on_the_answer_only(trained, family):
    example, tokenizer = trained[family].val[0], trained[family].processor.tokenizer
    labelled = example["labels"][0][example["labels"][0] != -100]
    answer = tokenizer.decode(labelled, skip_special_tokens=True).strip()
    prompt = tokenizer.decode(example["input_ids"][0][:len(example["input_ids"][0]) - len(labelled)])
    assert answer in ("Yes", "No") or answer.isdigit()
    assert prompt.rstrip().endswith(("ASSISTANT:", "<|im_start|>assistant", "Assistant:"))


@pytest.mark.parametrize("family", FAMILIES)
def test_history_and_adapters(trained, files, family):
    out = files["root"] / f"{family}-full"
    history = json.loads((out / "training_history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2, 3, 4]
    assert [e["step"] for e in history["eval"]] == [0, 2, 4]
    best = min(history["eval"][1:], key=lambda e: e["val_loss"])
    assert history["best"] == best
    assert history["eval"][-1]["val_loss"] < history["eval"][0]["val_loss"]
    for folder in ("best", "final"):
        assert json.loads((out / folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # best/ is the adapter of the best step: the one the Trainer checkpointed then, or final/ if it was the last
    same = out / "final" if best["step"] == 4 else out / "checkpoints" / f"checkpoint-{best['step']}"
    saved, expected = (load_file(f / "adapter_model.safetensors") for f in (out / "best", same))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)


def test_checkpoints_are_whole_named_in_latest_and_pruned(trained, files):
    root = files["root"] / "llava-full" / "checkpoints"
    kept = sorted(p.name for p in root.glob("checkpoint-*"))   # every step but the last (final/), the newest 2
    assert kept == ["checkpoint-2", "checkpoint-3"] and (root / "latest").read_text().strip() == "checkpoint-3"
    for name in kept:
        state = json.loads((root / name / "state.json").read_text())
        assert state["step"] == int(name.split("-")[1]) and state["fingerprint"]["max_steps"] == 4
        assert [r["step"] for r in state["history"]["train"]] == list(range(1, state["step"] + 1))


def _inference_logits(model, batch: dict) -> tuple:
    """Logits with and without the adapter, in bitsandbytes' CPU inference layout (as a fresh load uses)."""
    model.eval()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = bnb.nn.modules.has_avx512bf16()
    with torch.no_grad():
        with model.disable_adapter():
            untrained = model(**batch).logits
        return model(**batch).logits, untrained


@pytest.fixture(scope="module")
def reloaded(trained, files, tmp_path_factory):
    """Each family's final adapter loaded by one fresh Python process: its logits on a validation example."""
    tmp = tmp_path_factory.mktemp("reload")
    jobs = []
    for family in FAMILIES:
        batch = {k: v for k, v in trained[family].val[0].items() if k != "labels"}
        torch.save(batch, tmp / f"{family}.pt")
        jobs += [str(files[family]), str(files["root"] / f"{family}-full" / "final"), str(tmp / f"{family}.pt"),
                 str(tmp / f"{family}-logits.pt")]
    subprocess.run([sys.executable, "-c", RELOAD, trained["llava"].summary["dtype"], *jobs], check=True)
    return {family: torch.load(tmp / f"{family}-logits.pt") for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_process_reload_gives_same_logits(trained, reloaded, family):
    batch = {k: v for k, v in trained[family].val[0].items() if k != "labels"}
    expected, untrained = _inference_logits(trained[family].model, batch)
    torch.testing.assert_close(reloaded[family], expected, rtol=0, atol=0)
    assert not torch.allclose(untrained, expected)      # the adapter is what the logits come from


class Stop(Exception):
    pass


def _stop_after(step: int):
    def callback(record):
        if record["step"] == step:
            raise Stop
    return callback


def test_resume_continues_the_same_loss_curve(trained, files):
    with pytest.raises(Stop):
        run_vlm(_run(files, "llava", "llava-cut"), progress=False, callbacks=[_stop_after(3)])
    root = files["root"] / "llava-cut" / "checkpoints"
    assert (root / "latest").read_text().strip() == "checkpoint-2"
    (root / "checkpoint-3").mkdir()             # as a kill mid-save leaves it: no state.json, never loaded
    (root / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"half")
    (root / ".checkpoint-1.removing-1").mkdir()  # as a kill mid-prune leaves it
    resumed = run_vlm(_run(files, "llava", "llava-cut", resume=True), progress=False).summary["history"]
    full = trained["llava"].summary["history"]
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed["train"]] == pytest.approx([r["loss"] for r in full["train"]], abs=1e-4)
    assert [e["step"] for e in resumed["eval"]] == [e["step"] for e in full["eval"]]
    assert [e["val_loss"] for e in resumed["eval"]] == pytest.approx([e["val_loss"] for e in full["eval"]], abs=1e-4)
    assert resumed["best"]["step"] == full["best"]["step"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3", "latest"]
    again = run_vlm(_run(files, "llava", "llava-cut", resume=True), progress=False).summary["history"]
    assert [r["loss"] for r in again["train"]] == pytest.approx([r["loss"] for r in resumed["train"]], abs=1e-4)
    assert again["best"] == resumed["best"]     # a finished run resumed: its last step again, the same end


@pytest.mark.parametrize("family", ("llava", "qwen2_vl"))
def test_a_steps_loss_weighs_every_answer_token_alike(files, family):
    """One step of 6 micro-batches whose answers are 1 to 11 words long: its loss is the mean over all their
    answer tokens (as the validation loss is), not the mean of the 6 examples' means."""
    data = files["data"]["train"]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["messages"][-1]["content"] += " and more" * 5 * i
    path = data.parent / "long-answers.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = _run(files, family, f"{family}-weights", data_path=str(path), val_path="", max_steps=1, save_steps=0,
               **{"lora.dropout": 0.0, "training.gradient_accumulation_steps": 6})
    result = run_vlm(run, progress=False)
    examples = encode_all(read_records(path), result.processor, run.settings.data.max_length)
    with result.model.disable_adapter():          # LoRA's B starts at zero: the model before the step
        tokens, means = evaluate(result.model, examples, "cpu"), [evaluate(result.model, [e], "cpu") for e in examples]
    assert result.summary["history"]["train"][0]["loss"] == pytest.approx(tokens, abs=1e-4)
    assert abs(tokens - sum(means) / len(means)) > 2e-4      # the two weightings differ by twice the tolerance


def _one_line_error(run) -> str:
    with pytest.raises(ValueError) as err:
        run_vlm(run, progress=False)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_output_folder_errors_name_the_folder_and_the_fix(trained, files):
    """Refused before any model loads, and nothing in the folder changes."""
    out = files["root"] / "llava-full"
    before = sorted(p.name for p in out.rglob("*"))
    assert "holds a finished run (vlm_summary.json) with checkpoints up to checkpoint-3: pass --resume with a " \
           "larger --max_steps" in _one_line_error(_run(files, "llava", "llava-full"))
    message = _one_line_error(_run(files, "llava", "llava-full", resume=True, **{"training.learning_rate": 0.02}))
    assert "holds a different run: checkpoint-3 was written with training.learning_rate=0.01, this run has " \
           "training.learning_rate=0.02" in message and "a resume may change only max_steps" in message
    message = _one_line_error(_run(files, "llava", "llava-nothing", resume=True))
    assert "nothing to resume in" in message and "llava-nothing: no course run there; run without --resume" in message
    assert sorted(p.name for p in out.rglob("*")) == before


def test_the_command_line_trains_with_dotted_flags(files, capsys):
    data, out = files["data"], files["root"] / "cli"
    code = cli.main(["vlm", "--model_id", str(files["qwen2_vl"]), "--data_path", str(data["train"]),
                     "--val_path", str(data["val"]), "--output_dir", str(out), "--max_steps", "2", "--eval_steps", "1",
                     "--save_steps", "0", "--lora.rank", "4", "--lora.targets", "q_proj,v_proj",
                     "--training.gradient_accumulation_steps", "1"])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("qwen2_vl qlora: 2 steps") and str(out) in line
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and "q_proj|v_proj" in config["target_modules"]
    assert not (out / "checkpoints").exists()


def test_the_projector_trains_on_request_and_is_saved_with_the_adapter(files):
    result = run_vlm(_run(files, "llava", "llava-projector", max_steps=1, eval_steps=0, save_steps=0,
                          train_projector=True), progress=False)
    trained = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n for n in trained) and not any("vision_tower" in n for n in trained)
    saved = load_file(files["root"] / "llava-projector" / "final" / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in saved)


def test_only_a_model_with_a_vision_part_is_taken_for_the_chapter(files, tiny_llama_dir):
    assert all(takes_images(str(files[family])) for family in FAMILIES)
    assert not takes_images(str(tiny_llama_dir)) and not takes_images(str(files["root"] / "nothing"))


def test_input_embeddings_on_the_cpu_train_the_same_adapter(trained, files):
    run = _run(files, "qwen2_vl", "qwen2_vl-cpu-embeddings", **{"hardware.embeddings_on_cpu": True})
    result = run_vlm(run, progress=False)
    table = result.model.get_input_embeddings()
    assert table.weight.device.type == "cpu" and table._forward_hooks and table._forward_pre_hooks
    losses = [r["loss"] for r in result.summary["history"]["train"]]
    assert len(losses) == 4 and losses == [r["loss"] for r in trained["qwen2_vl"].summary["history"]["train"]]
    final = files["root"] / "qwen2_vl-cpu-embeddings" / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    expected = load_file(files["root"] / "qwen2_vl-full" / "final" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys() and all(torch.equal(adapter[k], expected[k]) for k in expected)
    base = load_vlm(str(files["qwen2_vl"]), quantization=run.settings.quantization, dtype=result.model.dtype,
                    device="cpu")
    reloaded = PeftModel.from_pretrained(base, final)
    lora = {n: p for n, p in reloaded.named_parameters() if "lora_A" in n}
    assert lora and all(torch.equal(p, dict(result.model.named_parameters())[n]) for n, p in lora.items())


class _Tables(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def get_input_embeddings(self):
        return self.table


def test_the_looked_up_rows_go_to_the_training_device_and_only_a_plain_table_moves():
    model = embeddings_on_cpu(_Tables(torch.nn.Embedding(10, 4)), "meta",     # "meta" stands in for cuda
                              "hardware.embeddings_on_cpu")
    rows = model.table(torch.tensor([[1, 2, 3]]))
    assert model.table.weight.device.type == "cpu" and rows.device.type == "meta" and rows.shape == (1, 3, 4)
    model.to("meta")             # as the Trainer (accelerate) places a model on one device
    assert model.table.weight.device.type == "cpu"
    with pytest.raises(ValueError, match="hardware.embeddings_on_cpu: _Tables's input embeddings are a Linear"):
        embeddings_on_cpu(_Tables(torch.nn.Linear(4, 4)), "cpu", "hardware.embeddings_on_cpu")


def test_the_estimate_takes_an_untied_table_off_the_gpu():
    cfg = preset("ultra_low_memory")
    on = replace(cfg, hardware=replace(cfg.hardware, embeddings_on_cpu=True))
    text = model_config("qwen2-vl-7b").get_text_config()
    saved = estimate_vlm("qwen2-vl-7b", cfg).total_gib - estimate_vlm("qwen2-vl-7b", on).total_gib
    assert saved == pytest.approx(text.vocab_size * text.hidden_size * 2 / 2**30)
    assert estimate_vlm("qwen2-vl-7b", on).outside["input embeddings (CPU)"] == text.vocab_size * text.hidden_size * 2
