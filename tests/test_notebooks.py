"""Every course notebook runs end to end under papermill (once, with the ``course`` parameter set: the
``course_run`` fixture of conftest.py), and its results file holds the values the chapter promises
(values, not just "it ran"). What the models learned is asserted by test_learning.py on the same runs."""

import ast
import math

import pytest
import torch

from qlora_helpers.common import runner
from qlora_helpers.common.device import cpu_compute_dtype

NOTEBOOKS = [p.stem for p in runner.discover()]
COURSE = runner.parameter_set("course")


def course_value(notebook: str, name: str):
    """The value of a parameter in the course run: the course set's, else the notebook's default."""
    if name in COURSE.get(notebook, {}):
        return COURSE[notebook][name]
    declared = runner.declared_parameters(runner.discover([notebook])[0])[name]
    return ast.literal_eval(declared["default"])


def check_00_setup(r):
    assert r["profile"] == "cpu" and r["device"]["type"] == "cpu"
    assert all(v != "missing" for k, v in r["versions"].items())
    bits = {c["bits"]: c for c in r["bitsandbytes"]["checks"]}
    assert bits[4]["layer"] == "Linear4bit" and bits[4]["weight_bytes"] * 4 == bits[4]["bf16_bytes"]
    assert bits[8]["layer"] == "Linear8bitLt" and bits[8]["weight_bytes"] * 2 == bits[8]["bf16_bytes"]
    for c in bits.values():
        assert c["rel_error"] < 0.15 and c["lora_grad_norm"] > 0 and not c["quantized_weight_has_grad"]
        assert c["loss_last"] < c["loss_first"]
    assert r["weights"] == "pretrained" and "Paris" in r["answer"] and r["first_token"]["text"].strip() == "The"
    assert r["qwen_vocab_size"] == 151_665 and r["qwen_hello_ids"] == [9707, 11, 1879, 0]


def check_01_memory_math(r):
    walk = r["walkthrough"]
    assert walk["total_gib"] == pytest.approx(sum(walk["components"].values()), abs=0.01)
    assert walk["params"]["total"] == 494_032_768 and walk["params"]["lora"] == walk["params"]["trainable"]
    assert r["lora_dtypes"] == ["torch.float32"]  # peft creates LoRA weights in fp32
    assert r["lora_params"]["peft"] == r["lora_params"]["formula"]
    for row in r["autograd_check"]:  # saved-activation formula vs autograd's own count
        assert abs(row["formula"] - row["autograd"]) <= 8, row
    for grid in r["grid_gib"].values():
        assert grid["qlora4"] < grid["lora"] < grid["full"]
    assert r["benchmark"]["rows"] >= 16 and r["benchmark"]["within_10pct"] == r["benchmark"]["rows"]
    assert r["claims"] and {c["verdict"] for c in r["claims"]} <= {"holds", "refuted", "depends"}


def check_05_multi_gpu_32b(r):
    assert r["profile"] == "cpu" and r["num_processes"] == r["world_size"] == 2
    assert r["bitsandbytes_in_kernel_before_launch"] is False
    cpu = {torch.bfloat16: "bf16", torch.float32: "fp32"}[cpu_compute_dtype()]   # bf16 only where native
    assert r["precision"]["compute_dtype"] == cpu and r["precision"]["lora_dtype"] == "fp32"
    assert r["ranks_identical"] and len(r["rank_digests"]) == 2 and len(set(r["rank_digests"])) == 1
    assert 0 < r["steps"] <= course_value("05_multi_gpu_32b", "max_steps") and len(r["epochs"]) >= 1
    assert r["stop_reason"] in {"max_steps", "lr < min_lr", "val_loss < min_val_loss"}
    e = r["epochs"][0]
    assert math.isfinite(e["train_loss"]) and math.isfinite(e["val_loss"]) and e["lr"] > 0 and e["new_best"]
    assert {"best", "final", "training_history.json", "run.json"} <= set(r["outputs"])
    plan = r["memory_plan_v100"]
    base = plan["components_gib"]["quantized weights"] + plan["components_gib"]["unquantized weights"]
    assert 17 < base < 19 and base < plan["total_gib"] < 27.5 and plan["fits_32gb"] == "fits"
    n = r["identities"]
    assert n == course_value("05_multi_gpu_32b", "num_identities")
    assert r["retention_records"] == round(3 * n * 0.3 / 0.7) and r["train_records"] == 3 * n + r["retention_records"]
    for when in ("accuracy_before", "accuracy"):
        for d in ("forward", "reverse"):
            for w in ("seen", "new"):
                a = r[when][d][w]
                assert a["n"] == n and a["chance"] == 1 / n and 0 <= a["choice"] <= 1
                assert (a["generation"] is None) == (when == "accuracy_before")
    assert r["optimizer"] == "adamw"            # multi_gpu_cpu.yaml: torch's AdamW, as the config names it
    best = r["best_evaluation"]
    assert 1 <= best["epoch"] <= len(r["epochs"]) and best["accuracy"]["forward"]["new"]["n"] == n
    assert not best["same_as_final"] or best["accuracy"] == r["accuracy"]
    two = r["two_machines"]
    assert two["world_size"] == 2 and two["steps"] == 3 and two["ranks_identical"]
    held = {(row["micro_batch"], row["accumulation"], row["summed"]): row["activations"]
            for row in r["accumulation_peaks"]["rows"]}
    assert held[1, 8, False] == held[1, 4, False] < held[2, 4, False] < held[1, 8, True]
    kept = r["face_retention"]                                # read from benchmarks/results/face_retention.json
    assert kept["seeds"] and 2 <= kept["identities"] <= 12
    assert set(kept["A"]) == {"stage1", "chat", "faces"} and set(kept["B"]) == {"chat", "faces"}
    for scores in [*kept["A"].values(), *kept["B"].values()]:
        assert set(scores) == {"choice", "generation"} and all(0 <= v <= 1 for v in scores.values())
    assert set(kept["verdict"]) == {"choice", "generation"} and set(kept["verdict"].values()) <= {
        "not learned", "no forgetting", "kept", "no consistent difference"}


def check_05b_multi_gpu_measured(r):
    assert r["profile"] == "cpu"
    v100 = r["gpu_results"]["qlora_32b_v100"]      # benchmarks/results/qlora_32b_v100.json is committed
    assert v100["cap_gib"] == 31.0 and v100["fits_under_cap"] and v100["peak_reserved_gib"] <= v100["cap_gib"]
    assert 17 < v100["model_gib"] < v100["peak_allocated_gib"] <= v100["peak_reserved_gib"]


def check_02_tad_quantized_adapters(r):
    nb = "02_tad_quantized_adapters"
    assert r["profile"] == "cpu" and r["max_steps"] == course_value(nb, "max_steps")
    assert r["pretrain"]["steps"] == course_value(nb, "pretrain_steps")
    assert r["data"]["train_videos"] == 192 and r["data"]["val_videos"] == 64 and len(r["data"]["classes"]) == 4
    assert 0.03 < r["chance_map"]["average"] < 0.06           # 0.0442 at seed 0
    s = r["strategies"]
    assert set(s) == {"full_ft", "adapter", "seed_qlora", "qlora_backbone", "adapter_random_backbone"}
    for v in s.values():
        assert v["steps"] == r["max_steps"] and 0 <= v["map"]["average"] <= 1 and v["quantized_requiring_grad"] == 0
        assert v["loss_last"] < v["loss_first"] and v["bytes"]["activations"] > v["bytes"]["weights"] > 0
    assert s["full_ft"]["trainable_params"] == s["full_ft"]["vit_params"] + s["full_ft"]["head_params"]
    assert s["adapter"]["quantized_params"] == 0 and s["adapter"]["adapter_trainable"] == s["adapter"]["adapter_params"]
    assert 0 < s["seed_qlora"]["adapter_trainable"] < s["seed_qlora"]["adapter_params"]
    assert s["seed_qlora"]["quantized_params"] > 0
    assert s["qlora_backbone"]["quantized_params"] > s["qlora_backbone"]["vit_params"] // 2
    assert s["qlora_backbone"]["bytes"]["weights"] < s["adapter"]["bytes"]["weights"]
    for v in s.values():   # the detection loss is classification + regression, both falling to the end
        f = v["final_losses"]
        assert f["cls_loss"] > 0 and f["reg_loss"] > 0 and math.isclose(f["loss"], f["cls_loss"] + f["reg_loss"],
                                                                           abs_tol=1e-3)
    assert r["written_out_adapter_max_abs_diff"] == 0.0       # the seed's adapter written out == QLoRAAdapter
    resume = r["resume_from_epoch"]                           # an epoch is 192 videos / batch 4 = 48 steps
    assert resume["file"] == "epoch_2.pth" and resume["step"] == 96 and resume["steps_trained"] == r["max_steps"] - 96
    assert resume["same_losses"] is True and resume["map"] == resume["map_uninterrupted"]
    tries = r["try_this"]
    assert set(tries) == {"quantize_bits_8", "lora_r_32"}
    assert all(0 <= t["map"] <= 1 and t["step_seconds"] > 0 for t in tries.values())
    assert tries["lora_r_32"]["trainable"] > s["seed_qlora"]["trainable_params"]
    assert tries["quantize_bits_8"]["trainable"] == s["seed_qlora"]["trainable_params"]


def check_02b_tad_memory_claims(r):
    assert r["profile"] == "cpu"
    q = r["seed_counts"]["seed_qlora"]
    assert (q["vit_params"], q["adapter_params"], q["adapter_trainable"]) == (21_879_936, 1_185_420, 300_684)
    assert r["seed_counts"]["adapter"]["adapter_params"] == 1_006_860
    verdicts = {c["claim"]: c["verdict"] for c in r["claims"]}
    assert verdicts["QLoRA trains < 1 % of the parameters"].startswith("does not hold")
    assert len(r["claims"]) == (10 if r["gpu_benchmark"] else 4)
    assert r["eight_bit_advice"]["verdict"] == ("contradicted: 8-bit needs more memory than 4-bit"
                                                if r["gpu_benchmark"] else "not measured")
    assert r["int8_layer_bytes"] == {"has_fp16_weights=True": 4 * 16 * 64, "has_fp16_weights=False": 16 * 64}


def check_03_qwen_sft(r):
    assert r["profile"] == "cpu" and r["max_steps"] == course_value("03_qwen_sft", "max_steps")
    assert r["model"] == "SmolLM2-135M-Instruct (cached)" and r["data"]["languages"] == ["en"]
    assert r["data"]["train"] > 1000 and r["data"]["validation"] > 0
    modes = r["modes"]
    assert set(modes) == {"full", "lora", "qlora-4bit", "qlora-8bit"}
    assert modes["full"]["trainable_percent"] == 100.0
    adapter = modes["lora"]["trainable_params"]
    assert 0 < adapter < modes["full"]["trainable_params"] / 10
    assert modes["qlora-4bit"]["trainable_params"] == modes["qlora-8bit"]["trainable_params"] == adapter
    for m in modes.values():
        assert math.isfinite(m["eval_loss_before"]) and math.isfinite(m["eval_loss_after"])
        assert m["step_seconds"] > 0 and m["peak_memory_gib"] > 0
    assert set(r["answers"]) >= {"questions", "base", "full", "lora", "qlora-4bit", "qlora-8bit"}
    # plain peft reload in a fresh process gives the same logits (bit for bit with equal thread counts)
    assert all(v <= 1e-5 for v in r["reload_logit_diff"].values())
    merge = r["merge"]
    assert merge["lora → fp32 base"]["max_abs_logit_diff"] < 1e-3 < merge["lora → bf16 base"]["max_abs_logit_diff"]
    assert r["merge_logit_diff"] == merge["lora → bf16 base"]["max_abs_logit_diff"]
    # the dequantised-base merge moves the logits about as far as bf16 rounding moves LoRA's (the notebook's sentence)
    assert merge["qlora-4bit → dequantized bf16 base"]["max_abs_logit_diff"] <= 2 * r["merge_logit_diff"]
    assert merge["qlora-4bit → dequantized bf16 base"]["top1_agree"] > merge["qlora-4bit → 4-bit layers"]["top1_agree"]
    # the sum formed in fp32 and rounded once is nearer the trained model than the sum formed in bf16
    in_bf16 = merge["qlora-4bit → dequantized bf16 base, summed in bf16"]
    assert merge["qlora-4bit → dequantized bf16 base"]["mean_abs_logit_diff"] < in_bf16["mean_abs_logit_diff"]
    share = r["qlora_lora_share_qwen05b_r64"]
    assert 7.0 < share["all linear layers"] < 7.2 and 1.7 < share["attention only"] < 1.8   # 7.12 and 1.75
    plain = r["plain_qlora"]   # the short loop in plain transformers + peft + bitsandbytes (section 3)
    assert plain["trainable_params"] == adapter
    assert plain["unquantised_params"] == 49_152 * 576 + 61 * 576   # SmolLM2's tied embedding and its 61 RMSNorms
    assert len(plain["losses"]) == min(r["max_steps"], 5) and all(math.isfinite(x) for x in plain["losses"])
    # the loss of a step depends on its conversations (seeds 0-3 and 42: it rose from step 1 to 5 once), but the
    # first batch, scored again after the steps, is lower every time (by 0.6 to 1.4)
    assert plain["first_batch_after"] < plain["losses"][0]
    assert plain["peak_gib"] is None                                 # a GPU run records its peaks there
    t = r["trl"]
    assert t["steps"] == 2 and len(t["losses"]) == 2 and all(math.isfinite(x) for x in t["losses"])
    assert t["trainable_params"] == adapter and t["same_tokens_as_plain"]
    # TRL labels what encode_chat labels, and the newline the chat template puts after the end-of-turn marker
    assert t["labels_only_plain"] == "" and t["labels_only_trl"] == "\n"
    resume = r["resume"]           # interrupted after the checkpoint, resumed: the uninterrupted curve, exactly
    assert resume["steps"] == r["max_steps"] and resume["max_abs_loss_diff"] < 1e-6
    assert set(r["answer_f1"]) == {"base", *modes} and all(0 <= v <= 1 for v in r["answer_f1"].values())
    assert r["quality_vs_full"]["full"] == 1.0 and len(r["quality_claims"]) == 3
    assert all(c["verdict"] in {"holds", "not supported"} for c in r["quality_claims"])
    # the course run is the one tests/learning_seeds.json repeated over seeds: the QLoRA claim is judged on them
    assert r["quality_claims"][0]["evidence"] == f"this run: one seed, {r['max_steps']} steps"
    assert r["quality_claims"][2]["evidence"].startswith("3 seeds (42, 43, 44)")
    # the memory in use after each step: the run's callback saw every step of every mode
    memory = r["memory_after_steps_mib"]
    assert set(memory) == set(modes) and all(len(m["mib"]) == r["max_steps"] for m in memory.values())
    # a loop-stopping decoding setting repeats no more word 3-grams than greedy decoding of the same model
    d = r["decoding"]
    assert d["mode"] in modes and set(d) == {"mode", "greedy", "repetition_penalty=1.3", "no_repeat_ngram_size=3"}
    assert d["no_repeat_ngram_size=3"]["repeated_3grams"] <= d["greedy"]["repeated_3grams"]
    # the merged QLoRA-4 model, reloaded in a new process, streamed an answer to two questions
    assert len(r["streamed_answers"]) == 2 and all(a.strip() for a in r["streamed_answers"].values())
    # bf16 emulated by AVX2 kernels is slower than fp32 (chapter 00: ~50x); natively it is not (AVX512-BF16/AMX)
    bf16 = r["cpu_bf16_over_fp32"]
    assert bf16["AVX2 kernels only"] > 3 and (bf16["as it is"] < 1.5 or not r["device"]["bf16"])


def check_03b_speed_and_memory(r):
    nb = "03b_speed_and_memory"
    assert r["profile"] == "cpu" and r["max_steps"] == course_value(nb, "max_steps")
    assert r["model"] == "SmolLM2-135M-Instruct (cached)" and r["eval_samples"] == course_value(nb, "eval_samples")
    targets = {"attention": (576 + 576) * 2 + (576 + 192) * 2, "mlp": (576 + 1536) * 3}   # fan_in + fan_out, a block
    targets["all-linear"] = targets["attention"] + targets["mlp"]
    r16 = course_value(nb, "lora_r")
    for name, per_rank_and_block in targets.items():   # what peft wrapped = r x (fan_in + fan_out) x 30 blocks
        t = r["targets"][name]
        assert t["trainable"] == 30 * r16 * per_rank_and_block
        assert t["percent"] == pytest.approx(100 * t["trainable"] / 134_515_008)   # LoRA over SmolLM2's parameters
        assert 0 < t["after"] < 10 and t["before"] == r["targets"]["all-linear"]["before"]
    trained = {name: t["trainable"] for name, t in r["targets"].items()}
    assert trained["attention"] < trained["mlp"] < trained["all-linear"]
    shares = {row["model"]: row for row in r["rank_shares"]}
    assert list(shares) == ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-32b"]
    assert shares["smollm2-135m"]["params"] == 134_515_008 and shares["qwen2.5-0.5b"]["params"] == 494_032_768
    assert shares["smollm2-135m"]["r=8"] == 30 * 8 * targets["all-linear"] / 134_515_008
    for rank in ("r=8", "r=16", "r=32", "r=64"):       # the same rank is a smaller share of a wider model
        column = [row[rank] for row in r["rank_shares"]]
        assert column == sorted(column, reverse=True) and 0 < column[-1]
    low, high = (course_value(nb, name) for name in ("low_rank", "high_rank"))
    ranks = r["ranks"]
    assert set(ranks) == {str(low), str(high)} and ranks[str(high)]["trainable_params"] * low == \
        ranks[str(low)]["trainable_params"] * high
    assert all(0 < v["eval_loss_after"] < 10 and v["lora_alpha"] == 2 * int(k) for k, v in ranks.items())
    q = r["quantization"]
    err = {(e["quant_type"], e["double_quant"]): e for e in q["errors"]}
    assert set(err) == {("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)}
    for dq in (True, False):                            # NF4's levels fit normal-shaped weights better
        assert 0 < err["nf4", dq]["rel_error"] < err["fp4", dq]["rel_error"] < 0.2
    for qt in ("nf4", "fp4"):                           # 4 + 32/64 bits without, 4 + 8/64 + 32/(64 x 256) with
        assert err[qt, False]["bits_per_weight"] == 4.5
        assert err[qt, True]["bits_per_weight"] == pytest.approx(4 + 8 / 64 + 32 / 64 / 256, abs=1e-3)
        assert err[qt, True]["rel_error"] == pytest.approx(err[qt, False]["rel_error"], rel=0.01)
    assert 3 < q["level_entropy_bits"]["fp4"] < q["level_entropy_bits"]["nf4"] <= 4
    losses = r["quant_type_losses"]                     # quantising costs held-out loss, before any training
    unquantised = losses["unquantised"]["before"]
    assert 0 < unquantised < losses["nf4"]["before"] and unquantised < losses["fp4"]["before"]
    seed_run = r["targets"]["all-linear"]                # the NF4 run is section 2's all-linear one
    assert losses["nf4"] == {"before": seed_run["before"], "after": seed_run["after"]}
    assert set(r["throughput_targets"]) == {"qwen2.5-0.5b", "qwen2.5-7b"}   # the committed GPU file was read
    assert r["seconds"] > 0


def check_04_vlm_8gb(r):
    assert r["profile"] == "cpu" and r["preset"]["name"] == "ultra_low_memory" and r["preset"]["budget_gb"] == 8
    p = r["plan"]
    assert p["model"] == "llava-1.5-7b" and p["lm_tokens"] == 512 + 576 and p["verdicts"]["8 GB"] == "fits"
    assert set(p["groups_gib"]) == {"model", "adapter", "optimizer", "gradients", "activations"}
    reg = r["registry"]
    assert set(reg) == {"qwen2-vl-7b", "llava-1.5-7b", "instructblip-7b", "llava-1.5-13b"}
    assert reg["llava-1.5-7b"]["verdicts"]["8 GB"] == "fits" and reg["qwen2-vl-7b"]["verdicts"]["8 GB"] == "no"
    assert reg["llava-1.5-13b"]["verdicts"]["8 GB"] == "no" and reg["llava-1.5-13b"]["verdicts"]["12 GB"] == "fits"
    methods = {m["method"]: m for m in r["methods"]}
    assert methods["qlora"]["with_knobs"]["verdicts"]["8 GB"] == "fits"
    assert methods["lora"]["with_knobs"]["verdicts"]["8 GB"] == "no"
    knobs = {k["knob"]: k["delta_gib"] for k in r["knobs_estimated"]}
    assert knobs["no gradient checkpointing"] > 4 and knobs["16-bit base (LoRA, no 4-bit)"] > 8
    assert knobs["224-px images instead of 336"] < 0 < knobs["no double quantisation"]
    g = r["gpu_benchmark"]
    assert g["present"], "benchmarks/results/vlm_8gb.json is committed: the notebook must find it"
    for name in ("8gb-s512", "8gb-s1024"):
        proof = g["proofs"][name]
        assert proof["cap_gib"] == 7.5 and proof["status"] == "ok" and proof["steps_completed"] >= 10
        assert proof["peak_reserved_gib"] <= 7.5 and abs(proof["estimate_gib"] / proof["peak_allocated_gib"] - 1) < 0.1
    assert {k["knob"] for k in g["knobs_measured"]} >= {"no gradient checkpointing", "16-bit base (LoRA, no 4-bit)"}
    t = r["training"]
    steps = course_value("04_vlm_8gb", "max_steps")
    assert t["steps"] == steps and t["micro_batch"] == 1 and t["images_seen"] == steps * t["grad_accum"]
    # section 6 trains through the vlm command: SmolLM2's linear layers 4-bit, the tower and projector not
    layers = t["linear_layers"]
    assert layers["language model: Linear4bit"] == 30 * 7 and "vision + rest: Linear4bit" not in layers
    lora = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))   # r=8 on SmolLM2's 7 linears a layer
    assert lora == 2_442_240 and lora < t["params"]["trainable"] < lora + 400_000   # + the projector (~0.37M)
    assert t["params"]["trainable"] < t["params"]["total"] / 30
    assert len(t["loss"]) == steps and all(math.isfinite(x) for x in t["loss"])
    val = t["val_loss"]
    assert [e["step"] for e in val] == [0, steps] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert t["tower"]["held_out_accuracy"] > 0.8 and t["held_out_images"] == 40
    for acc in (t["accuracy_before"], t["accuracy_after"]):
        assert set(acc) == {"face", "digit", "all"} and all(0 <= v <= 1 for v in acc.values())
    assert t["accuracy_before"]["face"] <= 0.6 and t["accuracy_before"]["digit"] <= 0.3   # random projector
    assert len(t["answers"]) == 4 and all({"expected", "before", "after"} <= set(a) for a in t["answers"])
    p = r["plain_recipe"]          # from_pretrained + BitsAndBytesConfig, LoRA on the language model, one step
    assert p["linear_layers"] == {"vision_tower: Linear": 12, "multi_modal_projector: Linear": 2,
                                  "language_model: Linear4bit": 14, "lm_head: Linear": 1}
    assert 0 < p["trainable_params"] < p["all_params"] / 100 and math.isfinite(p["loss"])
    assert p["lora_b_moved"] == p["lora_b"] > 0 and p["compute_dtype"] == str(cpu_compute_dtype())
    v = r["vlm_command"]           # section 7: the vlm command on tiny LLaVA and Qwen2-VL folders
    assert {run["model_type"] for run in v["runs"].values()} == {"llava", "qwen2_vl"}
    for run in v["runs"].values():
        q = run["quantization_config"]
        assert q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]
        assert run["linear_layers"]["language model: Linear4bit"] > 0
        assert "vision + rest: Linear4bit" not in run["linear_layers"]
        h = run["history"]
        assert len(h["train"]) == course_value("04_vlm_8gb", "vlm_steps") and h["best"] in h["eval"]
        assert all(math.isfinite(e["val_loss"]) for e in h["eval"])
    best = v["runs"][v["reloaded"]["model"]]["history"]["best"]["val_loss"]
    assert abs(v["reloaded"]["val_loss"] - best) < 0.01


def check_04b_vlm_gpu_measured(r):
    assert r["profile"] == "cpu" and r["gpu_benchmark"]["present"]
    assert r["gpu_benchmark"]["proofs"]["8gb-s512"]["status"] == "ok"
    cards = {g["gpu"]: g for g in r["gpu_table"]}
    assert set(cards) >= {"RTX 4060 8GB", "RTX 3060 12GB", "RTX 2060 Super 8GB"}
    assert cards["RTX 4060 8GB"]["llava-1.5-7b"] == "fits" and cards["RTX 3050 4GB"]["llava-1.5-7b"] == "no"
    assert r["speed_verdict"]["verdict"] in {"holds", "refuted", "mixed"}
    gpu = {(row["shape"], row["cap_gib"], "--hardware.embeddings_on_cpu" in row["command"]): row for row in r["gpu_7b"]}
    assert gpu[("llava-1.5-7b", 7.5, False)]["status"] == "ok", "benchmarks/results/vlm_hf_7b.json is committed"
    assert gpu[("qwen2-vl-7b", 7.5, True)]["status"] == "ok" and gpu[("qwen2-vl-7b", 7.5, False)]["status"] != "ok"
    for row in r["gpu_7b"]:        # the vlm command's estimate (its fused loss) within 10 % of each completed run
        if row["status"] == "ok":
            assert abs(row["estimate_gib"] / row["peak_allocated_gib"] - 1) < 0.1, row["command"]


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook(notebook, course_run):
    run = course_run[notebook]
    assert run.status == "ok", f"{notebook} failed at {run.error}; executed copy: {run.executed}"
    assert notebook in CHECKS, f"add check_{notebook}(results) to tests/test_notebooks.py"
    CHECKS[notebook](run.results)
