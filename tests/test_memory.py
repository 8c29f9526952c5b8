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
from qlora_helpers.ch01_memory.architectures import ArchitectureError
from qlora_helpers.ch01_memory.calculator import calculator, card_lines
from qlora_helpers.ch01_memory.estimator import (
    CUBLAS_WORKSPACE,
    GIB,
    estimate,
    largest_fit,
    model_shape,
    quantized_bytes,
    resolve_targets,
)
from qlora_helpers.ch01_memory.gpus import (
    CONTEXT_GIB,
    GPUS,
    MARGIN,
    RECOMPUTE_SLACK,
    VERDICT_TEXT,
    find_gpu,
    fits,
    which_gpus,
)
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

    for name in ("qwen2.5-0.5b", "qwen2.5-7b", "llama-7b", "llava-1.5-7b", "qwen2-vl-7b", "gemma-2-2b", "phi-3-medium",
                 "mistral-nemo-12b", "llama-3-8b", "smollm2-1.7b", "olmo-7b", "granite-3-8b", "starcoder2-3b"):
        config = get_config(name)
        cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        with init_empty_weights():
            model = cls.from_config(config)
        real = sum(p.numel() for n, p in model.named_parameters() if not (model_shape(config).tied and "lm_head" in n))
        assert estimate(config, "full", batch_size=1, seq_len=8).params["total"] == real, name


# ---- reading any decoder's config.json -------------------------------------------------------

# config.json files as published (the fields that matter, plus some that do not)
PUBLISHED = {
    "gemma-2-9b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
                   "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "hidden_act": "gelu_pytorch_tanh",
                   "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                   "torch_dtype": "float32", "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1},
    "phi-3-mini-4k": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
                      "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 32, "vocab_size": 32064, "hidden_act": "silu",
                      "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                      "sliding_window": 2047, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
                      "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
                      "eos_token_id": 32000, "pad_token_id": 32000},
    "mistral-nemo": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 5120,
                     "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072, "hidden_act": "silu",
                     "max_position_embeddings": 1024000, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                     "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "olmo-7b": {"architectures": ["OlmoForCausalLM"], "model_type": "olmo", "hidden_size": 4096,
                "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 32, "vocab_size": 50304, "hidden_act": "silu", "clip_qkv": 8.0,
                "attention_bias": False, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                "tie_word_embeddings": False, "pad_token_id": 1, "eos_token_id": 50279},
    "granite-3-8b": {"architectures": ["GraniteForCausalLM"], "model_type": "granite", "hidden_size": 4096,
                     "intermediate_size": 12800, "num_hidden_layers": 40, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 49155, "hidden_act": "silu",
                     "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                     "logits_scaling": 16.0, "attention_bias": False, "mlp_bias": False,
                     "tie_word_embeddings": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05},
}


def write_config(tmp_path, data) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def meta_linears(config) -> dict:
    """Reference: {name suffix: (in, out, bias)} of the first decoder layer's nn.Linear modules in transformers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[0]
    return {n.rsplit(".", 1)[-1]: (m.in_features, m.out_features, m.bias is not None)
            for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}, model


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_config_json_is_read_like_transformers_builds_it(tmp_path, name):
    """Each published config.json: the modules LoRA targets and the parameter count equal the model's."""
    config = get_config(write_config(tmp_path, PUBLISHED[name]))
    shape = model_shape(config)
    layer, model = meta_linears(config)
    assert {l.name: (l.fan_in, l.fan_out, l.bias) for l in shape.linears} == layer
    real = sum(p.numel() for n, p in model.named_parameters() if not (shape.tied and "lm_head" in n))
    assert estimate(config, "full", batch_size=1, seq_len=8).params["total"] == real
    assert resolve_targets(shape, "all-linear") == set(layer)


def test_what_each_family_brings():
    gemma = model_shape(get_config("gemma-2-9b"))
    assert gemma.head_dim == 256 and gemma.block.post_norms and gemma.block.logit_softcap == 30.0
    assert gemma.sliding_window == 4096 and gemma.sliding_layers == 21 and gemma.tied
    phi = model_shape(get_config("phi-3-mini"))
    assert resolve_targets(phi, "attention") == {"qkv_proj", "o_proj"} and phi.block.gated
    assert [l.fan_out for l in phi.linears if l.name in ("qkv_proj", "gate_up_proj")] == [3 * 3072, 2 * 8192]
    nemo = model_shape(get_config("mistral-nemo-12b"))
    assert nemo.head_dim == 128 and nemo.heads * nemo.head_dim == 4096 != nemo.hidden
    assert model_shape(get_config("olmo-7b")).block.clip_qkv == 8.0
    assert model_shape(get_config("olmo-7b")).other["norms"] == 0             # LayerNorm without weights
    star = model_shape(get_config("starcoder2-3b"))
    assert not star.block.gated and resolve_targets(star, "mlp") == {"c_fc", "c_proj"}
    capped = estimate(get_config("gemma-2-2b"), "qlora4", batch_size=1, seq_len=256, attention="sdpa")
    plain = estimate(get_config("gemma-2-2b", final_logit_softcapping=None), "qlora4", batch_size=1, seq_len=256,
                     attention="sdpa")
    assert capped.components["logits and loss"] - plain.components["logits and loss"] == 2 * 256 * 256000


@pytest.mark.parametrize("change,field", [
    ({"model_type": "gpt_neox"}, "'model_type'"),
    ({"hidden_size": None}, "'hidden_size'"),             # refused by transformers while reading the file
    ({"intermediate_size": 0}, "'intermediate_size'"),
    ({"num_local_experts": 8}, "'num_local_experts'"),
    ({"num_attention_heads": 24}, "'head_dim'"),
])
def test_a_config_it_cannot_model_names_the_field(tmp_path, change, field):
    data = {**PUBLISHED["olmo-7b"], **change}
    if change.get("model_type") == "gpt_neox":
        data = {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 512}
    path = write_config(tmp_path, data)
    with pytest.raises(ValueError, match=field) as err:
        estimate(get_config(path), "qlora4", batch_size=1, seq_len=64)
    assert isinstance(err.value, ArchitectureError) or "hidden_size" in field
    assert len(str(err.value).splitlines()) == 1
    base = ["estimate", "--model", path, "--method", "qlora4", "--batch-size", "1", "--seq-len", "64"]
    done = subprocess.run([sys.executable, "-m", "qlora_helpers", *base], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "" and field in done.stderr
    assert len([ln for ln in done.stderr.splitlines() if ln.startswith("error:")]) == 1


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
        tm = targets if targets == "all-linear" else sorted(resolve_targets(model_shape(config), targets))
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


SMALL = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             **TINY)
ARCH_CASES = [  # (preset, config changes, attention, method, targets, checkpointing, relative tolerance)
    ("gemma-2-2b", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16), "eager", "lora", "all-linear",
     False, 1e-3),
    ("gemma-2-2b", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16), "eager", "full", "all-linear",
     False, 1e-3),
    ("gemma-2-2b", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16), "eager", "qlora4", "attention",
     False, 1e-3),
    ("gemma-2-2b", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16), "eager", "lora", "all-linear",
     True, 1e-3),
    ("phi-3-mini", dict(sliding_window=None), "sdpa", "lora", "all-linear", False, 1e-3),
    ("phi-3-mini", dict(sliding_window=None), "sdpa", "lora", "all-linear", True, 1e-3),
    ("mistral-nemo-12b", dict(head_dim=32), "sdpa", "lora", "all-linear", False, 1e-3),
    ("mistral-nemo-12b", dict(head_dim=32), "sdpa", "qlora4", "attention", False, 1e-3),
    ("granite-3-8b", {}, "sdpa", "full", "all-linear", False, 1e-3),
    ("granite-3-8b", {}, "sdpa", "lora", "all-linear", False, 1e-3),
    ("starcoder2-3b", dict(sliding_window=None), "sdpa", "lora", "all-linear", False, 3e-3),
    ("starcoder2-3b", dict(sliding_window=None), "sdpa", "full", "all-linear", False, 3e-3),
    ("olmo-7b", {}, "sdpa", "lora", "all-linear", False, 5e-3),
    ("olmo-7b", {}, "sdpa", "qlora4", "attention", False, 5e-3),
]


@pytest.mark.parametrize("preset,changes,attention,method,targets,ckpt,rel", ARCH_CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4]}{'-ckpt' if c[5] else ''}" for c in ARCH_CASES])
def test_saved_activations_of_other_families(preset, changes, attention, method, targets, ckpt, rel):
    """The same check on tiny versions of the other families: Gemma-2's post-norms, eager soft-capped
    scores and capped logits, Phi-3's fused projections, Nemo's head_dim, Granite's multipliers,
    StarCoder2's LayerNorm and plain MLP, OLMo's weightless LayerNorm and clipped q/k/v. Under
    checkpointing the masks, like RoPE's cos/sin, are held by the checkpoint rather than autograd.
    (OLMo and StarCoder2 on the CPU keep a few hundred bytes per layer more than the formula.)"""
    config = get_config(preset, **SMALL, **changes)
    config._attn_implementation = attention
    got = saved_bytes(config, method, targets, ckpt, False)
    est = estimate(config, method, batch_size=2, seq_len=32, targets=targets, grad_ckpt=ckpt, attention=attention)
    expected = est.detail["saved for backward"] - (est.detail["rope"] + est.detail["masks"] if ckpt else 0)
    assert expected == pytest.approx(got, rel=rel)


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
    """A bare number of GiB: 20 % slack and the context added for "fits", the context alone for "tight"."""
    assert fits(5.5, 8) == "fits" and fits(6.5, 8) == "tight" and fits(7.2, 8) == "no"
    assert [g.memory_gib for g in which_gpus(15.0)][0] == 24


def test_reserved_and_device_memory_by_hand(qwen):
    """reserved = allocated + the fp32 logits block (16-bit lm_head) + RECOMPUTE_SLACK x the recomputed layer;
    on the card: + the CUDA context (+ paged optimizer states)."""
    est = estimate(qwen, "lora", batch_size=2, seq_len=32, grad_ckpt=True)
    logits, layer = 4 * 64 * V, est.detail["recomputed layer"]
    assert layer > 0 and est.reserved_gib == pytest.approx((est.total_bytes + logits + RECOMPUTE_SLACK * layer) / GIB)
    assert est.device_gib == pytest.approx(est.reserved_gib + CONTEXT_GIB)
    kbit = estimate(qwen, "qlora4", batch_size=2, seq_len=32, prepare_kbit=True)      # fp32 lm_head: no 16-bit logits
    assert kbit.reserved_gib == kbit.total_gib


def test_fit_verdict_on_an_estimate():
    """fits: MARGIN of headroom over device_gib; tight: within MARGIN of the card; else no."""
    est = estimate(get_config("qwen2.5-7b"), "qlora4", batch_size=1, seq_len=1024, grad_ckpt=True)
    need = est.device_gib
    assert fits(est, need * (1 + MARGIN)) == "fits" and fits(est, need) == "tight"
    assert fits(est, need * (1 - MARGIN) * 0.99) == "no"
    assert VERDICT_TEXT[fits(est, 8)] == "does not fit" and VERDICT_TEXT[fits(est, 80)] == "fits"
    assert find_gpu("4090").memory_gib == 24 and find_gpu("rtx 3060 12gb").name == "RTX 3060 12GB"
    with pytest.raises(ValueError, match="more than one GPU"):
        find_gpu("4060")


@pytest.mark.parametrize("vary", ["batch_size", "seq_len"])
def test_largest_fit_is_the_edge(vary):
    cfg = get_config("qwen2.5-7b")
    kw = dict(batch_size=2, seq_len=512, grad_ckpt=True)
    best = largest_fit(cfg, "qlora4", 16, vary=vary, **kw)
    step = 128 if vary == "seq_len" else 1
    assert best > 0
    assert fits(estimate(cfg, "qlora4", **{**kw, vary: best}), 16) == "fits"
    assert fits(estimate(cfg, "qlora4", **{**kw, vary: best + step}), 16) != "fits"
    assert largest_fit(cfg, "full", 8, vary=vary, **kw) == 0


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


def test_calculator_takes_a_config_path_and_the_notebook_setting(tmp_path):
    """The chapter's calculator: a config.json path, the notebook's batch and sequence length, a verdict
    and the largest batch for each card of the table; an unreadable model is one line in its output."""
    path = write_config(tmp_path, PUBLISHED["phi-3-mini-4k"])
    panel, current = calculator(path, batch_size=3, seq_len=700, lora_r=16)
    est = current()
    assert (est.inputs["batch_size"], est.inputs["seq_len"], est.inputs["lora_r"]) == (3, 700, 16)
    assert "qkv_proj" in est.inputs["targets"]
    text = panel.children[-1].outputs[0]["text"]
    lines = card_lines(get_config(path), est)
    assert len(lines) == len(GPUS) and all(line in text for line in lines)
    assert all(any(v in line for v in VERDICT_TEXT.values()) for line in lines)
    panel.children[0].children[0].value = str(tmp_path / "missing.json")
    assert panel.children[-1].outputs[0]["text"].startswith("error: unknown model")


def test_cli_json_has_reserved_device_and_the_fit(capsys):
    code, out, _ = run_cli(capsys, "--model", "gemma-2-2b", "--method", "qlora4", "--batch-size", "1",
                           "--seq-len", "1024", "--grad-ckpt", "--gpu", "RTX 3060 12GB", "--json")
    data = json.loads(out)
    assert code == 0 and data["total_gib"] < data["reserved_gib"] < data["device_gib"]
    fit = data["fit"]
    assert fit["gpu"] == "RTX 3060 12GB" and fit["gpu_gib"] == 12
    assert fit["verdict"] in ("fits", "tight", "does not fit")
    est = estimate(get_config("gemma-2-2b"), "qlora4", batch_size=1, seq_len=1024, grad_ckpt=True)
    assert data["device_gib"] == pytest.approx(est.device_gib, abs=1e-3)
    assert fit["largest_batch_size"] == largest_fit(get_config("gemma-2-2b"), "qlora4", 12, vary="batch_size",
                                                    batch_size=1, seq_len=1024, grad_ckpt=True)


def test_cli_fit_line_on_any_card(capsys):
    code, out, _ = run_cli(capsys, "--model", "qwen2.5-7b", "--method", "qlora4", "--batch-size", "2",
                           "--seq-len", "2048", "--grad-ckpt", "--lora-r", "16", "--gpu-gib", "8")
    line = out.strip().splitlines()[-1]
    assert code == 0 and line.startswith("8 GiB card: ") and "largest batch size that fits at 2048 tokens" in line
    assert any(v in line for v in ("fits", "tight", "does not fit")) and "longest sequence that fits" in line
    assert "reserved (estimate)" in out and "on the card" in out


@pytest.mark.parametrize("args,needle", [
    (["--gpu", "4060"], "more than one GPU in the table matches '4060'"),
    (["--gpu", "B200"], "no GPU in the table matches 'B200'"),
    (["--gpu-gib", "-3"], "--gpu-gib must be a positive number"),
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
