"""``--fused_lora``: one autograd step for a frozen layer and its LoRA branch computes what peft computes, draws the
same dropout masks, and steps aside wherever it would not (no gradients, DoRA, merged adapters); selective
checkpointing spares the last layers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from qlora_helpers.ch03_sft.fused_lora import use_fused_lora
from qlora_helpers.ch03_sft.modes import keep_activations
from qlora_helpers.common.models import build_random, enable_checkpointing, tiny_qwen2
from qlora_helpers.common.quant import keep_cpu_training_layout


def peft_model(quant, dropout, seed=0, **lora):
    base = build_random(tiny_qwen2(), quantize=quant, device="cpu", dtype=torch.float32, seed=seed, progress=False)
    if quant:
        keep_cpu_training_layout(base)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                            **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:                # B starts at zero: give the branch something to add
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def loss_and_grads(model, ids, autocast=False):
    torch.manual_seed(1)                    # the same random numbers for the dropout of both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quant", ["4bit", None])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_layers_give_peft_s_loss_and_gradients(quant, dropout):
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = loss_and_grads(peft_model(quant, dropout), ids)
    fused = peft_model(quant, dropout)
    assert use_fused_lora(fused) == "fused (14 of 14 LoRA layers)"
    loss, grads = loss_and_grads(fused, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6) and set(grads) == set(ref) and len(grads) == 28
    for name, g in grads.items():           # the dropout masks are peft's own: the same values dropped
        assert torch.allclose(g, ref[name], rtol=1e-4, atol=1e-7), name


def test_kept_16_bit_copies_give_the_same_numbers_and_go_after_training():
    """``dequantized=True``: each 4-bit layer's weight dequantised once and kept; the loss and gradients are those
    of dequantising at every product, and ``release_dequantized`` leaves nothing behind."""
    from qlora_helpers.ch03_sft.fused_lora import release_dequantized

    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    plain = peft_model("4bit", 0.1)
    use_fused_lora(plain)
    ref_loss, ref = loss_and_grads(plain, ids)
    kept = peft_model("4bit", 0.1)
    assert use_fused_lora(kept, dequantized=True) == "fused (14 of 14 LoRA layers, 14 weights kept 16-bit)"
    copies = [m for m in kept.modules() if getattr(m, "_dequantized", None) is not None]
    assert len(copies) == 14 and all(not m._dequantized.requires_grad for m in copies)
    loss, grads = loss_and_grads(kept, ids)
    assert loss == ref_loss and all(torch.equal(g, ref[n]) for n, g in grads.items())
    assert not any("_dequantized" in n for n in kept.state_dict())       # nothing saved sees the copies
    release_dequantized(kept)
    assert not any(getattr(m, "_dequantized", None) is not None for m in kept.modules())


def test_under_bf16_autocast_and_checkpointing_it_stays_within_bf16_rounding():
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    runs = []
    for fused in (False, True):
        model = peft_model("4bit", 0.1)
        enable_checkpointing(model.get_base_model())
        use_fused_lora(model, on=fused)
        runs.append(loss_and_grads(model, ids, autocast=True))
    (ref_loss, ref), (loss, grads) = runs
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    worst = max(float((grads[n] - ref[n]).norm() / ref[n].norm()) for n in ref)
    assert worst < 0.05                     # the products round to bf16 in another order


def test_it_steps_aside_where_peft_computes_something_else():
    model = peft_model("4bit", 0.1)
    use_fused_lora(model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():                   # evaluation and generation: peft's own forward, its output unchanged
        outputs = [(torch.manual_seed(2), f(x))[1] for f in (layer, layer._peft_forward)]
    assert torch.equal(*outputs)
    assert use_fused_lora(model, on=False) == "peft" and "forward" not in vars(layer)
    dora = peft_model("4bit", 0.0, use_dora=True)
    assert use_fused_lora(dora).startswith("peft (no layer it fuses")
    biased = peft_model(None, 0.0, bias="all")          # q, k, v train their bias: those gradients are peft's
    assert use_fused_lora(biased) == "fused (8 of 14 LoRA layers)"
    assert "forward" not in vars(biased.get_base_model().model.layers[0].self_attn.q_proj)


def test_switching_keeps_a_wrapper_that_was_on_the_layer():
    model = peft_model("4bit", 0.0)
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    calls = []
    peft_own = layer.forward

    def wrapped(*a, **kw):                  # what a hook library sets on an instance
        calls.append(1)
        return peft_own(*a, **kw)
    layer.forward = wrapped
    use_fused_lora(model)
    with torch.no_grad():                   # not fused without gradients: through the wrapper
        layer(torch.randn(1, 3, layer.in_features))
    assert calls == [1]
    use_fused_lora(model, on=False)
    assert layer.forward is wrapped


def test_keep_activations_spares_the_last_layers_the_second_pass():
    model = build_random(tiny_qwen2(), device="cpu", dtype=torch.float32, seed=0, progress=False)
    enable_checkpointing(model)
    assert keep_activations(model, 1) == "1 of 2 layers"
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    assert keep_activations(model, 5) == "0 of 2 layers"
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [False, False]


def test_what_a_fused_layer_keeps_for_backward_is_what_the_estimator_counts():
    """Every tensor autograd saves in one decoder layer (bf16, 4-bit base, LoRA with dropout on every linear layer,
    SDPA), counted by storage, against ``estimate``'s ``one layer saved`` for the fused path: equal."""
    from transformers import Qwen2Config

    from qlora_helpers.ch01_memory.estimator import estimate

    cfg = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    base = build_random(cfg, quantize="4bit", device="cpu", dtype=torch.bfloat16, seed=0, progress=False)
    keep_cpu_training_layout(base)
    base.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16) if p.requires_grad else p.data    # TRL's bf16 adapters
    use_fused_lora(model)
    model.train()
    tokens, layer = 512, model.get_base_model().model.layers[1]
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    position_ids = torch.arange(tokens)[None]
    rope = model.get_base_model().model.rotary_emb(x, position_ids)
    known = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *rope, x)}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=rope, attention_mask=None, position_ids=position_ids)
    kept = sum(n for ptr, n in saved.items() if ptr not in known)
    est = estimate(cfg, "qlora4", batch_size=1, seq_len=tokens, lora_r=8, lora_impl="fused", lora_dropout=0.1,
                   attention="sdpa")
    assert kept == est.detail["one layer saved"]
