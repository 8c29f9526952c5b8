"""qlora_helpers.ch03_sft.recipe: the lean loss and packing compute exactly what the plain HF path computes."""

import pytest
import torch

from qlora_helpers.ch03_sft import recipe
from qlora_helpers.ch03_sft.data import Example, collate, pack, pack_lengths
from qlora_helpers.common.models import build_tiny, tiny_llama


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny(tiny_llama(vocab_size=300), seed=0)


def _batch(vocab=300, rows=3, width=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0                                     # a shorter conversation, right-padded
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :4] = -100                                # the prompt is not trained on
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_cross_entropy_matches_torch_in_value_and_gradients(chunk):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    y[::4] = -100
    ours = recipe.linear_cross_entropy(h, w, y, impl="chunked", chunk_size=chunk)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y)
    ref.backward()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


def test_loss_without_labels_is_zero_with_a_gradient_path():
    h = torch.randn(4, 8, requires_grad=True)
    loss = recipe.linear_cross_entropy(h, torch.randn(10, 8), torch.full((4,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(h.grad) == 0


def test_causal_lm_loss_equals_the_models_own_loss_and_gradients(tiny):
    batch = _batch()
    tiny.zero_grad()
    ref = tiny(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in tiny.named_parameters()}
    tiny.zero_grad()
    ours = recipe.causal_lm_loss(tiny, batch)
    ours.backward()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    worst = max(float((ref_grads[n] - p.grad).abs().max()) for n, p in tiny.named_parameters())
    assert worst < 1e-5                                   # tied embeddings / lm_head included
    tiny.zero_grad()


def test_packed_rows_give_the_same_loss_as_padded_rows(tiny):
    batch = _batch()
    examples = [Example(batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist(),
                        batch["labels"][i][batch["attention_mask"][i] == 1].tolist()) for i in range(3)]
    with torch.no_grad():
        padded = recipe.causal_lm_loss(tiny, batch)
        one_row = recipe.causal_lm_loss(tiny, collate(pack(examples, block_size=37), pad_id=0))
        rows = recipe.packed_micro_batches(examples[1:], tokens=28, row_tokens=23, pad_id=0) + \
            recipe.packed_micro_batches(examples, tokens=42, row_tokens=14, pad_id=0)
        assert [r["input_ids"].shape for r in rows] == [(1, 23), (3, 14)]
        both = recipe.causal_lm_loss(tiny, rows[1])
        two_blocks = recipe.causal_lm_loss(tiny, collate(pack(examples, block_size=28), pad_id=0))
    # attention stays inside each conversation: packing changes nothing but the layout
    for value in (one_row, both, two_blocks):
        assert float(value) == pytest.approx(float(padded), rel=1e-5)


def test_packed_rows_never_train_across_conversations():
    a, b, c = Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5]), Example([6] * 7, [6] * 7)
    batch = collate(pack([a, b, c], block_size=7), pad_id=0)   # rows [a b] and [c]: the first is filled up to 7
    row = {k: v[:1] for k, v in batch.items()}
    assert row["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0]]
    assert row["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert "attention_mask" not in batch


def test_pack_lengths_keeps_order_and_refuses_what_cannot_fit():
    assert pack_lengths([5, 3, 4, 2, 8], 8) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="more than max_tokens=4"):
        pack_lengths([3, 5], 4)


def test_plan_micro_batch_checkpoints_only_when_memory_needs_it():
    from qlora_helpers.common.shapes import get_config

    cfg = get_config("qwen2.5-7b")
    roomy = recipe.plan_micro_batch(cfg, 47, lora_r=64, candidates=(4096, 8192, 16384))
    tight = recipe.plan_micro_batch(cfg, 9, lora_r=64)
    assert roomy["tokens"] >= 4096 and not roomy["gradient_checkpointing"]
    assert tight["gradient_checkpointing"] and tight["estimate_gib"] <= 9
    with pytest.raises(ValueError, match="no micro-batch"):
        recipe.plan_micro_batch(cfg, 4, lora_r=64)


def test_recipe_estimate_is_the_largest_phase_once_the_logits_are_chunked():
    """The recipe's peak is the estimator's own maximum over phases for the chunked loss, not the
    full-logits peak phase with its logits taken out (which hid the recomputed layer under checkpointing)."""
    from qlora_helpers.ch01_memory.estimator import GIB, estimate
    from qlora_helpers.common.shapes import get_config

    cfg = get_config("qwen2.5-7b")
    got = recipe.estimate_gib(cfg, 16384, True, lora_r=64)
    est = estimate(cfg, "qlora4", batch_size=1, seq_len=16384, lora_r=64, grad_ckpt=True,
                   loss_chunk=recipe.default_chunk_size(cfg.vocab_size))
    assert got == est.total_gib == max(est.phases.values()) / GIB
    assert est.peak_phase == "backward (top layer)"


def test_liger_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match="CUDA kernel"):
        recipe.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), impl="liger")


def test_qlora_mode_keeps_frozen_weights_in_the_compute_dtype(tmp_path):
    """The course default skips peft's fp32 upcast; ``kbit_upcast=True`` restores it."""
    from qlora_helpers.ch03_sft.command import SFTConfig
    from qlora_helpers.ch03_sft.modes import build_model
    from qlora_helpers.common.models import write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny")
    kept = build_model(SFTConfig(model_name_or_path=str(folder), use_qlora=True, bf16=True), "cpu")
    upcast = build_model(SFTConfig(model_name_or_path=str(folder), use_qlora=True, bf16=True, kbit_upcast=True), "cpu")
    emb = lambda m: m.get_base_model().get_input_embeddings().weight.dtype
    assert emb(kept) == torch.bfloat16 and emb(upcast) == torch.float32


def test_cast_adapters_moves_only_trainable_weights_and_training_still_steps(tiny):
    from peft import LoraConfig, get_peft_model

    base = build_tiny(tiny_llama(vocab_size=300), seed=1)
    model = get_peft_model(recipe.prepare_model(base), LoraConfig(r=4, target_modules="all-linear"))
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert recipe.cast_adapters(model, torch.bfloat16) > 0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    assert {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad} == frozen
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = recipe.causal_lm_loss(model, _batch())
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
