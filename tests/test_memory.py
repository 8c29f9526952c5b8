"""The memory estimator: one hand-computed case per term, references where one exists, and the CLI.

Tiny shape used for the hand computations (``tiny_qwen2``): hidden 64, intermediate 256, 2 layers,
4 query heads and 2 KV heads of 16, tied embeddings; the vocabulary is set to 1024 here.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from qlora_helpers import cli
from qlora_helpers.ch01_memory.estimator import (
    CUBLAS_WORKSPACE,
    GIB,
    TARGET_PRESETS,
    estimate,
    model_shape,
    quantized_bytes,
)
from qlora_helpers.ch01_memory.gpus import fits, which_gpus
from qlora_helpers.ch01_memory.measurement import measure
from qlora_helpers.common.models import build_random, tiny_llama, tiny_qwen2
from qlora_helpers.common.shapes import get_config

V = 1024
TINY = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def r512(n):
    return math.ceil(n / 512) * 512


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2(**TINY)


# ---- weights -------------------------------------------------------------------------------

def test_4bit_bytes_by_hand():
    """4096 x 4096 NF4: 8,388,608 B of codes; 262,144 blocks of 64 -> one 8-bit absmax each; 1,024
    second-level fp32 absmax (one per 256); a 16-entry fp32 code table and an fp32 offset (512 B each)."""
    assert quantized_bytes(4096 * 4096) == 8_388_608 + 262_144 + 4 * 1_024 + 512 + 512
    assert quantized_bytes(4096 * 4096, double_quant=False) == 8_388_608 + 4 * 262_144 + 512
    assert quantized_bytes(4096 * 4096, bits=8, rows=4096) == 4096 * 4096 + 4 * 4096


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_bytes_match_bitsandbytes(double_quant):
    """Reference: quantise a real weight with bitsandbytes on the CPU and add up its tensors."""
    import bitsandbytes as bnb

    w = torch.randn(896, 4864, dtype=torch.bfloat16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant)._quantize("cpu")
    qs = p.quant_state
    parts = [p.data, qs.absmax, qs.code] + ([qs.state2.absmax, qs.offset] if qs.nested else [])
    stored = sum(r512(t.numel() * t.element_size()) for t in parts)
    assert stored == quantized_bytes(w.numel(), 4, double_quant=double_quant)


def test_weights_by_hand(qwen):
    """QLoRA 4-bit: 14 decoder linears quantised; embeddings (tied), 5 norms and q/k/v biases in bf16."""
    est = estimate(qwen, "qlora4", batch_size=2, seq_len=32, targets="q_proj")
    per_layer = [64 * 64, 64 * 32, 64 * 32, 64 * 64, 64 * 256, 64 * 256, 256 * 64]
    assert est.components["quantized weights"] == 2 * sum(quantized_bytes(n) for n in per_layer)
    biases = 2 * (r512(2 * 64) + 2 * r512(2 * 32))
    assert est.components["unquantized weights"] == r512(2 * V * 64) + r512(2 * 5 * 64) + biases
    kbit = estimate(qwen, "qlora4", batch_size=2, seq_len=32, targets="q_proj", prepare_kbit=True)     # upcast to fp32
    assert kbit.components["unquantized weights"] == r512(4 * V * 64) + r512(4 * 5 * 64) + 2 * (512 + 2 * 512)


def test_lora_gradients_and_adamw_by_hand(qwen):
    """r=8 on q_proj: A is 8 x 64 and B is 64 x 8 per layer, fp32 (peft's default), 2 layers."""
    est = estimate(qwen, "lora", batch_size=2, seq_len=32, lora_r=8, targets="q_proj")
    assert est.params["lora"] == 2 * (8 * 64 + 64 * 8) == 2048
    assert est.components["LoRA weights"] == 2048 * 4
    assert est.components["optimizer states"] == 2 * 2048 * 4          # exp_avg + exp_avg_sq, fp32
    lora, grads, states, sqrt_tmp = 2048 * 4, 2048 * 4, 2 * 2048 * 4, 2048 * 4     # sqrt(exp_avg_sq): foreach temp
    assert est.phases["optimizer step"] == (est.components["unquantized weights"] + lora + grads + states + sqrt_tmp
                                            + CUBLAS_WORKSPACE)


def test_full_finetune_states_follow_the_param_dtype(qwen):
    est = estimate(qwen, "full", batch_size=2, seq_len=32)
    n = est.params["trainable"]
    assert n == est.params["total"] == V * 64 + 5 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 256) + 2 * 128
    assert est.phases["optimizer step"] >= 2 * n * 4       # bf16 weights, grads, two bf16 states, sqrt temp


def test_8bit_adamw_keeps_small_tensors_in_fp32(qwen):
    """bnb: tensors under 4096 values keep fp32 states; larger ones 1 byte x 2 + fp32 absmax per 256."""
    small = estimate(qwen, "lora", batch_size=2, seq_len=32, targets="q_proj",
                     optimizer="adamw_8bit")   # 512-value tensors
    assert small.components["optimizer states"] == 4 * 2 * r512(4 * 512)
    big = estimate(get_config("qwen2.5-7b"), "qlora4", batch_size=1, seq_len=64, targets="down_proj",
                   optimizer="adamw_8bit")
    n = 8 * 18944                                                     # down_proj lora_A, 151,552 values
    state8 = lambda k: 2 * k + 2 * r512(4 * math.ceil(k / 256)) + 512    # 2 x uint8 + absmax + unorm
    assert big.components["optimizer states"] == 28 * (state8(n) + state8(3584 * 8))   # lora_A, lora_B
    paged = estimate(get_config("qwen2.5-7b"), "qlora4", batch_size=1, seq_len=64, targets="down_proj",
                     optimizer="paged_adamw_8bit")
    assert paged.outside["paged optimizer states"] == 28 * 2 * n      # >= 100k values: outside PyTorch


def test_logits_and_loss_by_hand(qwen):
    """N = 64 tokens, V = 1024: at the start of backward, log-softmax output, its incoming grad and
    its input grad are N x V fp32 each (12 N V bytes), plus the int64 shifted labels."""
    est = estimate(qwen, "lora", batch_size=2, seq_len=32)
    fwd, bwd = est.phases["forward (at the loss)"], est.phases["backward (at the loss)"]
    assert est.components["logits and loss"] == 12 * 64 * V + 8 * 64 and est.peak_phase == "backward (at the loss)"
    assert bwd - fwd == (12 - 10) * 64 * V     # forward: bf16 logits + fp32 copy + log-softmax = 10 N V


def test_chunked_loss_keeps_one_chunk_of_logits(qwen):
    """loss_chunk=C: C x V fp32 logits and softmax plus their 16-bit copy (6 C V), and the labelled
    rows' hidden states with their gradient (2 x 2 N h) instead of the 12 N V of full logits."""
    full = estimate(qwen, "qlora4", batch_size=2, seq_len=32, grad_ckpt=True)
    chunked = estimate(qwen, "qlora4", batch_size=2, seq_len=32, grad_ckpt=True, loss_chunk=8)
    h = qwen.hidden_size
    assert chunked.phases["forward (at the loss)"] - full.phases["forward (at the loss)"] == (
        6 * 8 * V + 4 * 64 * h) - (2 * 64 * V + 8 * 64 * V)
    assert chunked.phases["backward (top layer)"] == full.phases["backward (top layer)"]
    assert chunked.total_bytes < full.total_bytes and chunked.inputs["loss_chunk"] == 8
    chunk = lambda rows: estimate(qwen, "qlora4", batch_size=2, seq_len=32, loss_chunk=rows).phases
    assert chunk(10_000) == chunk(64)
    with pytest.raises(ValueError, match="loss_chunk"):
        estimate(qwen, "qlora4", batch_size=2, seq_len=32, loss_chunk=0)


def test_parameter_inventory_matches_the_model():
    """Reference: count the parameters of each preset's real transformers model (on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for name in ("qwen2.5-0.5b", "qwen2.5-7b", "llama-7b", "llava-1.5-7b", "qwen2-vl-7b"):
        config = get_config(name)
        cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        with init_empty_weights():
            model = cls.from_config(config)
        real = sum(p.numel() for n, p in model.named_parameters() if not (model_shape(config).tied and "lm_head" in n))
        assert estimate(config, "full", batch_size=1, seq_len=8).params["total"] == real, name


# ---- activations: compare with the tensors autograd really saves ---------------------------

def saved_bytes(config, method, targets="all-linear", grad_ckpt=False, prepare_kbit=False, B=2, S=32):
    """Bytes of distinct storages saved for backward in one forward pass (parameters excluded)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quantize = {"qlora4": "4bit"}.get(method)
    model = build_random(config, quantize=quantize, device="cpu", dtype=torch.bfloat16, progress=False)
    kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if prepare_kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt, **kw)
    elif grad_ckpt:
        model.gradient_checkpointing_enable(**kw)
    if method != "full":
        tm = targets if targets == "all-linear" else list(TARGET_PRESETS.get(targets) or targets.split(","))
        model = get_peft_model(model, LoraConfig(r=8, target_modules=tm, task_type="CAUSAL_LM"))
    model.train()
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


CASES = [("qwen", "full", "all-linear", False, False), ("qwen", "lora", "all-linear", False, False),
         ("qwen", "lora", "mlp", False, False), ("llama", "lora", "q_proj,v_proj", False, False),
         ("qwen", "lora", "all-linear", True, False), ("qwen", "qlora4", "attention", False, False),
         ("qwen-mha", "qlora4", "all-linear", False, True), ("llama-mha", "qlora4", "all-linear", True, True)]


@pytest.mark.parametrize("arch,method,targets,ckpt,kbit", CASES)
def test_saved_activations_match_autograd(arch, method, targets, ckpt, kbit):
    """CPU, tiny model: the bytes autograd keeps for backward equal the formula to within 0.1 %.

    With checkpointing the formula also counts RoPE's cos/sin, which the checkpoint closure holds
    rather than autograd. ``kbit`` cases use as many KV heads as query heads: with fp32 activations
    and grouped KV heads CUDA has only the math kernel (it keeps the S x S probabilities; the formula
    follows CUDA, checked by the GPU benchmark) while the CPU's flash kernel keeps no such matrix.
    """
    build = tiny_qwen2 if arch.startswith("qwen") else tiny_llama
    config = build(**TINY, **({"num_key_value_heads": 4} if arch.endswith("mha") else {}))
    got = saved_bytes(config, method, targets, ckpt, kbit)
    est = estimate(config, method, batch_size=2, seq_len=32, targets=targets, grad_ckpt=ckpt, prepare_kbit=kbit)
    expected = est.detail["saved for backward"] - (est.detail["rope"] if ckpt else 0)
    assert expected == pytest.approx(got, rel=1e-3)


def test_checkpointing_and_quantisation_shrink_the_estimate():
    cfg = get_config("qwen2.5-7b")
    lora = estimate(cfg, "lora", batch_size=2, seq_len=1024)
    ckpt = estimate(cfg, "lora", batch_size=2, seq_len=1024, grad_ckpt=True)
    q4, q8 = estimate(cfg, "qlora4", batch_size=2, seq_len=1024), estimate(cfg, "qlora8", batch_size=2, seq_len=1024)
    assert ckpt.components["activations"] < lora.components["activations"] / 5
    assert q4.components["quantized weights"] < q8.components["quantized weights"] < lora.components[
        "unquantized weights"]


# ---- GPUs, measure, CLI --------------------------------------------------------------------

def test_gpu_verdicts():
    assert fits(6.0, 8) == "fits" and fits(7.2, 8) == "tight" and fits(7.5, 8) == "no"
    assert [g.memory_gib for g in which_gpus(15.0)][0] == 24


def test_measure_refuses_without_cuda(qwen):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        measure(qwen, "lora", batch_size=1, seq_len=8)


def run_cli(capsys, *args):
    code = cli.main(["estimate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json(capsys):
    code, out, _ = run_cli(capsys, "--model", "qwen2.5-0.5b", "--method", "qlora4", "--batch-size", "4",
                           "--seq-len", "512", "--grad-ckpt", "--json")
    data = json.loads(out)
    assert code == 0 and data["total_gib"] == pytest.approx(sum(data["components"].values()), abs=1e-3)
    assert list(data["components"])[0] == "quantized weights" and "CUDA context" in data["not_in_total_gib"]


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "batch size"),
    (["--model", "qwen9-1t"], "unknown model 'qwen9-1t'"),
    (["--targets", "q_proj,wq"], "unknown LoRA target 'wq'"),
    (["--lora-r", "0"], "LoRA rank"),
])
def test_cli_bad_values_give_one_line_and_exit_2(capsys, args, needle):
    base = {"--model": "qwen2.5-0.5b", "--method": "lora", "--batch-size": "1", "--seq-len": "128"}
    base.update(dict(zip(args[::2], args[1::2])))
    code, out, err = run_cli(capsys, *[x for kv in base.items() for x in kv])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err


def test_cli_as_a_command():
    done = subprocess.run([sys.executable, "-m", "qlora_helpers", "estimate", "--model", "llama-7b", "--method",
                           "qlora4", "--batch-size", "1", "--seq-len", "512"], capture_output=True, text=True)
    assert done.returncode == 0 and "total (peak allocated)" in done.stdout and "GiB" in done.stdout
    total = float(done.stdout.split("total (peak allocated)")[1].split()[0])
    est = estimate(get_config("llama-7b"), "qlora4", batch_size=1, seq_len=512)
    assert total == pytest.approx(est.total_bytes / GIB, abs=1e-3)
