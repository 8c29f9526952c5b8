"""qlora_helpers.ch03_sft.command / train / chat on a tiny random Llama with SmolLM2's real tokenizer.

Covers the four modes, the one-line errors for bad settings and bad data, atomic checkpoints
and --resume after ``kill -9``, a reload in a fresh process with plain peft, and merging.
"""

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from qlora_helpers import cli
from qlora_helpers.ch03_sft.command import SFTConfig, from_dict, load_config_file, run_sft, validate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "data" / "configs"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP waits cost more."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (hidden 64) saved with SmolLM2's tokenizer, plus 48 train / 16 eval records."""
    from transformers import AutoTokenizer

    from qlora_helpers.common.assets import load_sft, smollm2_path
    from qlora_helpers.common.models import build_tiny, tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    build_tiny(tiny_llama(), seed=0).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(root / "model")
    for split, n in (("train", 48), ("validation", 16)):
        rows = load_sft(split, ("en",))[:n]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_cfg(tiny, out, **kw):
    base = dict(model_name_or_path=str(tiny / "model"), data_path=str(tiny / "train.jsonl"),
                eval_data_path=str(tiny / "validation.jsonl"), output_dir=str(out), max_steps=4,
                per_device_train_batch_size=4, max_length=64, save_steps=0, learning_rate=1e-3, device="cpu",
                bf16=False)   # fp32 on every CPU (auto would pick bf16 on a native one): the reloads compare exactly
    return SFTConfig(**{**base, **kw})


def run_cli(args, capsys):
    code = cli.main(["sft", *args])
    err = capsys.readouterr().err.strip()
    return code, err


# --------------------------------------------------------------------------- bad input: one clear line
@pytest.mark.parametrize("args, expected", [
    (["--use_qlora", "--quantization_bit", "3"], "quantization_bit must be 4 or 8, not 3"),
    (["--use_lora", "--lora_r", "0"], "lora_r must be a positive integer"),
    (["--use_lora", "--lora_r", "-4"], "lora_r must be a positive integer"),
    (["--full_finetune", "--use_qlora"], "full_finetune and use_qlora contradict"),
    (["--quantization_bit", "8"], "quantization_bit=8 needs use_qlora"),
    (["--use_lora", "--lora_dropout", "1.5"], "lora_dropout must be in [0, 1)"),
    (["--use_lora", "--optim", "paged_adamw_8bit", "--device", "cpu"], "needs CUDA"),
    (["--use_lora", "--fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--use_lora", "--bf16", "--fp16"], "bf16 and fp16 both set"),
    (["--use_lora", "--resume", "--overwrite_output_dir"], "resume and overwrite_output_dir contradict"),
    (["--use_lora", "--keep_dequantized"], "keep_dequantized keeps 16-bit copies of a 4-bit base"),
    (["--use_qlora", "--quantization_bit", "8", "--keep_dequantized"], "needs --use_qlora with quantization_bit 4"),
    (["--use_qlora", "--keep_dequantized", "--fused_lora", "false"], "fused_lora true or auto"),
    (["--use_qlora", "--embeddings_on_cpu", "--device", "cpu"], "embeddings_on_cpu moves a frozen embedding table"),
    (["--full_finetune", "--embeddings_on_cpu"], "needs CUDA and a LoRA or QLoRA mode"),
])
def test_bad_settings_stop_with_one_line(args, expected, capsys, tmp_path):
    code, err = run_cli([*args, "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith("error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "out").exists(), "nothing may be written before the settings are checked"


def test_bf16_on_a_gpu_without_it(monkeypatch):
    from qlora_helpers.ch03_sft import command as sft

    monkeypatch.setattr(sft, "_cuda", lambda: (True, False, "Tesla T4"))
    with pytest.raises(ValueError, match="bf16 requested but Tesla T4 has no bfloat16 support"):
        validate(SFTConfig(use_lora=True, bf16=True))


@pytest.mark.parametrize("cuda, cpu_dtype, expected", [
    ((True, True, "H100"), "fp32", True),        # a GPU with bf16
    ((True, False, "Tesla T4"), "bf16", False),  # a GPU without: fp32 (fp16 only when asked)
    ((False, False, ""), "bf16", True),          # a CPU with native bf16 (cpu_compute_dtype)
    ((False, False, ""), "fp32", False),         # a CPU without: fp32
])
def test_bf16_auto_follows_the_device(monkeypatch, cuda, cpu_dtype, expected):
    from qlora_helpers.ch03_sft import command as sft

    monkeypatch.setattr(sft, "_cuda", lambda: cuda)
    monkeypatch.setenv("QLORA_CPU_DTYPE", cpu_dtype)
    assert SFTConfig().bf16 == "auto"
    assert validate(SFTConfig(use_lora=True)).bf16 is expected
    assert validate(SFTConfig(use_lora=True, bf16=False)).bf16 is False      # explicit values stay
    if cuda[0]:
        assert validate(SFTConfig(use_lora=True, fp16=True)).bf16 is False      # fp16 asked: no bf16 beside it


def test_bf16_flag_takes_true_false_or_auto(capsys, tmp_path):
    from qlora_helpers.ch03_sft.command import config_from_args, configure_parser

    parser = __import__("argparse").ArgumentParser()
    configure_parser(parser)
    parse = lambda *a: parser.parse_args(["--use_lora", "--device", "cpu", *a]).bf16
    assert parse("--bf16") is True and parse("--bf16", "false") is False and parse("--bf16", "auto") == "auto"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"use_lora": True, "bf16": "sometimes"}))
    with pytest.raises(ValueError, match="bf16 must be true, false or auto, not 'sometimes'"):
        config_from_args(parser.parse_args(["--config_file", str(config)]))
    config.write_text(json.dumps({"use_lora": True, "bf16": False, "device": "cpu"}))
    assert config_from_args(parser.parse_args(["--config_file", str(config)])).bf16 is False


def test_config_file_errors(tmp_path, capsys):
    bad_key = tmp_path / "typo.json"
    bad_key.write_text(json.dumps({"use_lora": True, "lora_rank": 8}))
    code, err = run_cli(["--config_file", str(bad_key)], capsys)
    assert code == 2 and "unknown key 'lora_rank': did you mean 'lora_r'?" in err
    bad_type = tmp_path / "type.json"
    bad_type.write_text(json.dumps({"use_lora": True, "learning_rate": "2e-4"}))
    code, err = run_cli(["--config_file", str(bad_type)], capsys)
    assert code == 2 and "key 'learning_rate' must be float" in err
    broken = tmp_path / "broken.json"
    broken.write_text('{"use_lora": true,\n "lora_r": }')
    code, err = run_cli(["--config_file", str(broken)], capsys)
    assert code == 2 and f"{broken}:2: not valid JSON" in err


def test_bad_jsonl_names_file_line_and_field(tiny, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    good = (tiny / "train.jsonl").read_text().splitlines()[0]
    data.write_text(good + "\n" + '{"messages": [{"role": "robot", "content": "hi"}]}\n')
    code, err = run_cli(["--use_lora", "--model_name_or_path", str(tiny / "model"), "--data_path", str(data),
                         "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and f"{data}:2: field 'messages[0].role' is 'robot'" in err and "\n" not in err


@pytest.mark.parametrize("name, mode", [("full", "full"), ("lora", "lora"), ("qlora-4bit", "qlora-4bit"),
                                        ("qlora-8bit", "qlora-8bit")])
def test_shipped_configs(name, mode):
    cfg = validate(from_dict(load_config_file(CONFIGS / f"{name}.json")))
    assert cfg.mode == mode


def test_flags_override_the_config_file():
    args = cli.build_parser("sft").parse_args(["sft", "--config_file", str(CONFIGS / "lora.json"), "--lora_r", "64",
                                               "--lora_alpha", "16", "--use_lora", "false", "--use_qlora",
                                               "--lora_target_modules", "null"])
    from qlora_helpers.ch03_sft.command import config_from_args

    cfg = config_from_args(args)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.mode, cfg.lora_target_modules) == (64, 16.0, "qlora-4bit", None)


def test_target_modules_presets_and_discovery():
    from qlora_helpers.ch03_sft.modes import resolve_target_modules
    from qlora_helpers.common.models import build_tiny, tiny_llama

    model = build_tiny(tiny_llama())
    assert resolve_target_modules(None, model) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])
    assert resolve_target_modules("attention", model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_target_modules("q_proj, v_proj", model) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="qkv not found in LlamaForCausalLM; its linear layers are"):
        resolve_target_modules("qkv", model)


# --------------------------------------------------------------------------- the four modes
@pytest.mark.parametrize("kw, layer", [
    (dict(full_finetune=True), "Linear"),
    (dict(use_lora=True), "Linear"),
    (dict(use_qlora=True), "Linear4bit"),  # 4 bits is the default
    (dict(use_qlora=True, quantization_bit=8), "Linear8bitLt"),
])
def test_each_mode_trains_and_saves(kw, layer, tiny, tmp_path):
    cfg = tiny_cfg(tiny, tmp_path / "out", **kw)
    result = run_sft(cfg, progress=False)
    s = result.summary
    assert s["mode"] == cfg.mode and s["steps"] == 4
    q_proj = result.model.get_submodule("model.layers.0.self_attn.q_proj" if cfg.mode == "full"
                                        else "base_model.model.model.layers.0.self_attn.q_proj.base_layer")
    assert type(q_proj).__name__ == layer
    files = set(os.listdir(cfg.output_dir))
    assert {"tokenizer.json", "tokenizer_config.json", "sft_config.json", "sft_summary.json"} <= files
    if cfg.mode == "full":
        assert s["params"]["trainable"] == s["params"]["total"] and "model.safetensors" in files
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert 0 < s["params"]["trainable_percent"] < 15
        trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    ev = s["eval_loss"]
    assert ev["before"] is not None and ev["after"] < ev["before"]  # lr 1e-3 on a random model: it must learn
    assert s["peak_memory"]["peak_gib"] > 0 and "RSS" in s["peak_memory"]["measured"]
    assert s["estimate"]["gib"] > 0 and cfg.mode in s["estimate"]["of"]   # what a GPU would allocate at the peak
    tm = s["tensor_memory_mib"]
    assert tm["optimizer"] == pytest.approx(2 * tm["grads"], abs=0.2)  # AdamW: two fp32 moments per trainable value
    if cfg.mode == "full":
        assert tm["grads"] == pytest.approx(tm["weights"], abs=0.2)
    assert not [p for p in Path(cfg.output_dir).iterdir() if p.name.startswith(".tmp")]


def test_output_dir_is_never_clobbered(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("precious")
    common = ["--use_lora", "--model_name_or_path", str(tiny / "model"), "--data_path", str(tiny / "train.jsonl"),
              "--output_dir", str(out), "--max_steps", "1"]
    code, err = run_cli(common, capsys)
    assert code == 2 and "holds adapter_model.safetensors, not written by a course run, which this run would" in err
    code, err = run_cli([*common, "--overwrite_output_dir"], capsys)
    assert code == 2 and "move it elsewhere or choose another --output_dir" in err
    code, err = run_cli([*common, "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err
    assert (out / "adapter_model.safetensors").read_text() == "precious"


def test_the_command_ends_with_where_the_adapter_went_and_how_to_use_it(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    assert cli.main(["sft", "--use_lora", "--model_name_or_path", str(tiny / "model"), "--data_path",
                     str(tiny / "train.jsonl"), "--output_dir", str(out), "--max_steps", "1", "--save_steps", "0",
                     "--device", "cpu"]) == 0
    done, chat, merge = capsys.readouterr().out.strip().splitlines()[-3:]
    assert done.startswith("lora: 1 steps") and done.endswith(f"saved to {out}")
    assert chat == f"chat with it: python -m qlora_helpers.ch03_sft.chat --lora_model {out} --chat"
    assert merge.endswith(f"--lora_model {out} --merge_to {out}-merged")
    assert (out / "adapter_model.safetensors").is_file()


def test_training_after_an_eval_pass_gets_the_same_gradients(tiny, tmp_path):
    """bitsandbytes repacks 4-bit weights for a backward-less CPU kernel on the first eval pass;
    trainable_4bit_layers must undo that, or QLoRA silently trains with wrong gradients."""
    import torch

    from qlora_helpers.ch03_sft.data import collate, encode_all, read_jsonl
    from qlora_helpers.ch03_sft.modes import build_model, load_tokenizer, trainable_4bit_layers

    cfg = tiny_cfg(tiny, tmp_path / "out", use_qlora=True, lora_dropout=0.0)
    tok = load_tokenizer(cfg.model_name_or_path)
    batch = collate(encode_all(read_jsonl(cfg.data_path)[:4], tok, 48).examples, tok.pad_token_id)

    def lora_grads(eval_first: bool):
        torch.manual_seed(0)
        model = build_model(cfg, "cpu")
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # B = 0 would give A no gradient at all
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        with trainable_4bit_layers(model):
            model.train()
            model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = lora_grads(False), lora_grads(True)
    assert type(build_model(cfg, "cpu").get_submodule(
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer")).__name__ == "Linear4bit"
    # Unpacking round-trips the block scales through bf16, so allow 2 %; without it the error is ~100 %.
    for name in fresh:
        rel = float((fresh[name] - after_eval[name]).norm() / fresh[name].norm())
        assert rel < 0.02, f"{name}: gradient off by {rel:.1%}"


# --------------------------------------------------------------------------- --resume (kill -9: tests/test_kill.py)
def test_resume_refuses_changed_settings(tiny, tmp_path):
    cfg = tiny_cfg(tiny, tmp_path / "out", use_lora=True, max_steps=4, save_steps=2)
    run_sft(cfg, progress=False)
    cfg2 = tiny_cfg(tiny, tmp_path / "out", use_lora=True, max_steps=6, lora_r=16, resume=True)
    with pytest.raises(ValueError, match="was written with lora_r=8, this run has lora_r=16"):
        run_sft(cfg2, progress=False)


# --------------------------------------------------------------------------- reload, chat, merge
@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    runs = {}
    for kw in (dict(use_lora=True), dict(use_qlora=True, quantization_bit=4)):
        cfg = tiny_cfg(tiny, tmp_path_factory.mktemp("trained") / "out", max_steps=6, **kw)
        runs[cfg.mode] = (cfg, run_sft(cfg, progress=False))
    return runs


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from peft import PeftModel
base_path, adapter, bits, out = sys.argv[1:]
kw = {"dtype": torch.float32}
if bits == "4":
    kw.update(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, **kw), adapter).eval()
tok = AutoTokenizer.from_pretrained(adapter)
ids = tok.apply_chat_template([{"role": "user", "content": "What is AI?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, out)
"""


@pytest.mark.parametrize("mode, bits", [("lora", "0"), ("qlora-4bit", "4")])
def test_fresh_process_reload_with_plain_peft_gives_the_same_logits(mode, bits, trained, tiny, tmp_path):
    import torch

    cfg, result = trained[mode]
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", RELOAD, str(tiny / "model"), cfg.output_dir, bits, str(out)],
                   check=True, capture_output=True, timeout=300)
    ids = result.tokenizer.apply_chat_template([{"role": "user", "content": "What is AI?"}],
                                               add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    with torch.no_grad():
        here = result.model(input_ids=ids).logits.float()
    there = torch.load(out).float()
    assert torch.allclose(here, there, atol=1e-4), float((here - there).abs().max())


def test_chat_and_merge(trained, tmp_path):
    import torch

    from qlora_helpers.ch03_sft.chat import chat, load_for_inference, logit_difference, merge_adapter, prompt_logits

    cfg, result = trained["lora"]
    reply = chat(result.model, result.tokenizer, "Hello?", max_new_tokens=5)
    assert isinstance(reply, str)
    unmerged, tok = load_for_inference(cfg.output_dir)
    merged = merge_adapter(cfg.output_dir, dtype="fp32", save_to=tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM" and (tmp_path / "merged" / "model.safetensors").is_file()
    assert logit_difference(prompt_logits(unmerged, tok), prompt_logits(merged, tok))["max_abs"] < 1e-3
    with pytest.raises(ValueError, match="already holds files"):
        merge_adapter(cfg.output_dir, dtype="fp32", save_to=tmp_path / "merged")

    qcfg, _ = trained["qlora-4bit"]
    q, tok = load_for_inference(qcfg.output_dir, load_in_4bit=True)
    want = prompt_logits(q, tok)
    by_default = logit_difference(want, prompt_logits(merge_adapter(qcfg.output_dir, dtype="fp32"), tok))
    onto_dequantized = logit_difference(want, prompt_logits(merge_adapter(qcfg.output_dir, base="dequantized",
                                                                          dtype="fp32"), tok))
    onto_original = logit_difference(want, prompt_logits(merge_adapter(qcfg.output_dir, base="original",
                                                                       dtype="fp32"), tok))
    assert by_default == onto_dequantized            # QLoRA merges onto what it trained with unless asked
    assert onto_dequantized["mean_abs"] < onto_original["mean_abs"]
    # a bf16 merge is the fp32 merge rounded once: W + BA is never summed in bf16, where small updates round away
    fp32, bf16 = (merge_adapter(qcfg.output_dir, dtype=d).state_dict() for d in ("fp32", "bf16"))
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)


def test_corpus_preference_is_the_difference_of_two_answer_losses_hand_computed(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_helpers.ch03_sft.data import encode_chat
    from qlora_helpers.ch03_sft.report import corpus_preference, learning_metrics

    model = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    questions, corpus, own = ["Who are you?", "Can you move?"], ["A robot.", "Not yet."], ["I am a model.", "No"]

    def by_hand(answers):   # cross-entropy over every assistant token of both replies, token-weighted
        total, count = 0.0, 0
        for q, a in zip(questions, answers):
            ex = encode_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tok)
            ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]
            keep = labels[0, 1:] != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[0, 1:][keep], reduction="sum"))
            count += int(keep.sum())
        return total / count

    got = corpus_preference(model, tok, questions, corpus, own, device="cpu")
    assert got == pytest.approx(by_hand(own) - by_hand(corpus), abs=1e-4)
    assert corpus_preference(model, tok, questions, corpus, corpus, device="cpu") == 0.0
    runs = {name: {"eval_loss": {"before": 3.0, "after": after}} for name, after in
            (("full", 2.0), ("lora", 2.5), ("qlora-4bit", 2.6), ("qlora-8bit", 2.7))}
    m = learning_metrics(runs, {"base": 0.1, "full": 0.2, "lora": 0.2, "qlora-4bit": 0.1, "qlora-8bit": 0.1},
                         {"base": -2.0, "full": -1.0, "lora": -1.5, "qlora-4bit": -1.5, "qlora-8bit": -2.0})
    assert m["corpus_preference_gain"] == 0.5 and m["answer_f1_gain"] == 0.05
    assert m["eval_loss_drop_lora"] == 0.5 and m["lora_over_qlora4_loss"] == round(2.5 / 2.6, 6)


# --------------------------------------------------------------------------- the engine: TRL's SFTTrainer
def _sequences(batch: dict) -> list[tuple]:
    """(input ids, labels) of each conversation in a batch: padded rows cut at their mask, packed rows at the
    positions that restart at 0."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        if "position_ids" in batch:
            pos = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            out += [(tuple(ids[a:b]), tuple(labels[a:b])) for a, b in zip(starts, starts[1:])]
        else:
            n = int(batch["attention_mask"][row].sum())
            out.append((tuple(ids[:n]), tuple(labels[:n])))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_trains_on_the_course_masks_of_the_real_smollm2(packing, cached_assets, tmp_path):
    """The batches TRL's SFTTrainer builds hold exactly the course's encoded conversations (assistant-only labels),
    padded or packed padding-free; then two steps of the real SmolLM2 through ``run_sft`` learn on those tokens."""
    from qlora_helpers.ch03_sft.data import encode_all, read_jsonl
    from qlora_helpers.ch03_sft.modes import build_model, load_tokenizer, model_path
    from qlora_helpers.ch03_sft.trainer import CourseCallback, make_trainer, training_args
    from qlora_helpers.common.assets import sft_paths

    cfg = SFTConfig(use_qlora=True, packing=packing, max_length=96, per_device_train_batch_size=4, max_steps=2,
                    device="cpu", output_dir=str(tmp_path / "out"), max_train_samples=12, max_eval_samples=4)
    tok = load_tokenizer(model_path(cfg))
    data = encode_all(read_jsonl(sft_paths()["train"])[:12], tok, cfg.max_length)
    model = build_model(cfg, "cpu")
    course = CourseCallback(cfg, output_dir=tmp_path, eval_loss=None, progress=False)
    trainer = make_trainer(model, tok, data, cfg, training_args(cfg, tmp_path, "cpu", packing=packing), course)
    seen = [seq for batch in trainer.get_train_dataloader() for seq in _sequences(batch)]
    course_examples = [(tuple(e.input_ids), tuple(e.labels)) for e in data.examples]
    assert sorted(seen) == sorted(course_examples)
    assert all(any(label != -100 for label in labels) for _, labels in seen)

    s = run_sft(cfg, progress=False).summary
    assert s["steps"] == 2 and s["eval_loss"]["after"] < s["eval_loss"]["before"] + 0.5
    assert all(r["tokens"] > 0 and r["loss"] == r["loss"] for r in s["history"]["train"])
    if packing:   # one padding-free row of whole conversations per micro-batch, at most max_length tokens each
        assert all(r["tokens"] <= cfg.per_device_train_batch_size * cfg.max_length for r in s["history"]["train"])


# --------------------------------------------------------------------------- options of the sft command
def test_the_planner_keeps_the_rows_per_step_and_adds_checkpointing(tiny, tmp_path, monkeypatch):
    """``memory_budget_gib``: the micro-batch is planned in whole rows, a divisor of the rows per step, the
    accumulation makes up the rest, and checkpointing (and the layers it spares) is the plan's or the user's."""
    from qlora_helpers.ch03_sft import command

    cfg = tiny_cfg(tiny, tmp_path / "out", use_qlora=True, per_device_train_batch_size=2,
                   gradient_accumulation_steps=3, max_length=256, memory_budget_gib=8.0)
    asked = {}

    def plan(*a, candidates, **kw):
        asked["candidates"] = candidates
        return {"tokens": 768, "gradient_checkpointing": True, "checkpoint_keep_layers": 1, "keep_dequantized": False,
                "embeddings_on_cpu": False}
    monkeypatch.setattr(command, "plan_micro_batch", plan)
    plan = command.plan_batch(validate(cfg), cfg.model_name_or_path, "cpu")   # 3 of the 6 rows per step fit
    assert asked["candidates"] == [256, 512, 768, 1536]       # whole rows, a divisor of the step's 6
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (3, 2) and cfg.gradient_checkpointing
    assert cfg.checkpoint_keep_layers == 1
    assert plan["per_device_train_batch_size"] == 3
    monkeypatch.undo()
    roomy = tiny_cfg(tiny, tmp_path / "out", use_qlora=True, per_device_train_batch_size=2,
                     gradient_accumulation_steps=3, max_length=64, memory_budget_gib=8.0)
    command.plan_batch(validate(roomy), roomy.model_name_or_path, "cpu")   # a tiny model: everything fits
    assert (roomy.per_device_train_batch_size, roomy.gradient_accumulation_steps) == (6, 1)
    assert not roomy.gradient_checkpointing
    assert command.plan_batch(tiny_cfg(tiny, tmp_path / "out", use_lora=True), "", "cpu") is None   # no budget: off


def test_optimizer_auto_and_the_attention_choice():
    from qlora_helpers.ch03_sft.trainer import training_args

    cfg = validate(SFTConfig(use_lora=True, device="cpu"))
    assert cfg.optim == "auto" and training_args(cfg, Path("out"), "cpu", packing=False).optim == "adamw_torch"
    cfg.optim = "adamw_8bit"                   # the course's name, the Trainer's own
    assert training_args(cfg, Path("out"), "cpu", packing=False).optim == "adamw_bnb_8bit"
    with pytest.raises(ValueError, match="optim must be one of auto, adamw, adamw_torch, adamw_8bit"):
        validate(SFTConfig(use_lora=True, optim="sgd", device="cpu"))
    with pytest.raises(ValueError, match="attn_implementation=varlen .* needs --packing"):
        validate(SFTConfig(use_lora=True, attn_implementation="varlen", device="cpu"))
    with pytest.raises(ValueError, match="memory_budget_gib must be > 0 GiB, 0 .off. or -1"):
        validate(SFTConfig(use_lora=True, memory_budget_gib=-3.0, device="cpu"))


def test_a_run_leaves_no_model_behind(tiny, tmp_path, monkeypatch):
    """Given an 8-bit optimizer the Trainer registers the model's embeddings with bitsandbytes' process-wide
    GlobalOptimManager; the run takes them out again, so a finished run's model is freed (on a GPU each left one bf16
    embedding in memory: 0.25 GiB a run at Qwen2.5-0.5B), and the optimizer positions and parameter ids the overrides
    reached (a full fine-tune trains the embedding) are as before the run, for the next run's optimizer."""
    manager = bnb.optim.GlobalOptimManager.get_instance()
    before = (list(manager.module_weight_config_triple), dict(manager.index2config), dict(manager.pid2config))
    registered, seen = [], {}
    register, check = manager.register_module_override, bnb.optim.optimizer.Optimizer8bit.check_overrides
    monkeypatch.setattr(manager, "register_module_override", lambda m, *a: registered.append(m) or register(m, *a))
    monkeypatch.setattr(bnb.optim.optimizer.Optimizer8bit, "check_overrides",
                        lambda opt: check(opt) or seen.update(manager.index2config))
    other = torch.nn.Embedding(2, 2)
    try:
        manager.register_module_override(other, "weight", {"optim_bits": 32})   # another model's entry stays
        result = run_sft(tiny_cfg(tiny, tmp_path / "out", optim="adamw_8bit", max_steps=1), progress=False)  # full
        assert registered[1:] and all(any(m is n for n in result.model.modules()) for m in registered[1:])
        assert seen                                   # the run's optimizer placed the embedding's override
        embedding = weakref.ref(result.model.get_input_embeddings())
        del result, registered[:]
        gc.collect()
        assert embedding() is None
        assert [t[0] for t in manager.module_weight_config_triple] == [*before[0], other]
        assert (manager.index2config, manager.pid2config) == before[1:]
    finally:
        manager.module_weight_config_triple[:], manager.index2config, manager.pid2config = before
