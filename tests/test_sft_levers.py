"""The ``sft`` command's levers off the GPU: the held-out loss without full logits (``trainer.causal_lm_loss``),
packed rows that change nothing but the layout, the planner of ``--memory_budget_gib``, no fp32 upcast."""

import pytest
import torch

from qlora_helpers.ch03_sft.command import plan_micro_batch
from qlora_helpers.ch03_sft.data import Example, collate, pack, pack_lengths
from qlora_helpers.ch03_sft.trainer import causal_lm_loss
from qlora_helpers.common.models import build_tiny, tiny_llama
from qlora_helpers.common.shapes import get_config


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


@pytest.mark.parametrize("chunk", [1, 5, 0])
def test_causal_lm_loss_equals_the_models_own_loss_and_gradients(tiny, chunk):
    batch = _batch()
    tiny.zero_grad()
    ref = tiny(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in tiny.named_parameters()}
    tiny.zero_grad()
    ours = causal_lm_loss(tiny, batch, chunk_rows=chunk)
    ours.backward()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    worst = max(float((ref_grads[n] - p.grad).abs().max()) for n, p in tiny.named_parameters())
    assert worst < 1e-5                                   # tied embeddings / lm_head included
    tiny.zero_grad()


def test_loss_without_labels_is_zero(tiny):
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with torch.no_grad():
        assert float(causal_lm_loss(tiny, batch)) == 0.0


def test_under_bf16_autocast_it_matches_the_models_loss(tiny):
    """fp32 weights under autocast: the output layer multiplies in bf16, the softmax runs in fp32."""
    batch = _batch(seed=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = causal_lm_loss(tiny, batch), tiny(**batch).loss
    assert float(ours) == pytest.approx(float(ref), rel=2e-2)


def test_packed_rows_give_the_same_loss_as_padded_rows(tiny):
    batch = _batch()
    examples = [Example(batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist(),
                        batch["labels"][i][batch["attention_mask"][i] == 1].tolist()) for i in range(3)]
    with torch.no_grad():
        padded = causal_lm_loss(tiny, batch)
        one_row = causal_lm_loss(tiny, collate(pack(examples, block_size=37), pad_id=0))
        two_blocks = causal_lm_loss(tiny, collate(pack(examples, block_size=28), pad_id=0))
    # attention stays inside each conversation: packing changes nothing but the layout
    for value in (one_row, two_blocks):
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
    roomy = plan_micro_batch(cfg, 47, lora_r=64, candidates=(4096, 8192, 16384))
    tight = plan_micro_batch(cfg, 9, lora_r=64)
    assert roomy["tokens"] >= 4096 and not roomy["gradient_checkpointing"]
    assert tight["gradient_checkpointing"] and tight["estimate_gib"] <= 9
    with pytest.raises(ValueError, match="memory_budget_gib=4: no micro-batch"):
        plan_micro_batch(cfg, 4, lora_r=64)
    # without Liger the Trainer takes the loss over full fp32 logits (152k a token): less of the budget is left
    full, chunked = plan_micro_batch(cfg, 20, lora_r=64, chunked=False), plan_micro_batch(cfg, 20, lora_r=64)
    mine = lambda plan: (plan["tokens"], plan["checkpoint_keep_layers"])
    assert mine(full) < mine(chunked) and full["estimate_gib"] <= 20


def test_the_plan_is_the_estimators_largest_phase_for_a_loss_in_chunks():
    """The planned peak is the estimator's own maximum over phases for Liger's chunked loss, not the full-logits
    peak phase with its logits taken out (which hid the recomputed layer under checkpointing)."""
    from qlora_helpers.ch01_memory.estimator import GIB, estimate, liger_loss_chunk
    from qlora_helpers.common.shapes import get_config

    cfg = get_config("qwen2.5-7b")
    plan = plan_micro_batch(cfg, 30, lora_r=64, candidates=(16384,))
    assert plan["tokens"] == 16384 and plan["gradient_checkpointing"]
    est = estimate(cfg, "qlora4", batch_size=1, seq_len=16384, lora_r=64, grad_ckpt=True,
                   loss_chunk=liger_loss_chunk(16384, cfg.vocab_size, cfg.hidden_size),
                   keep_layers=plan["checkpoint_keep_layers"], accumulate=False)   # 16k tokens: the whole step
    assert plan["estimate_gib"] == round(est.total_gib, 3) and est.total_gib == max(est.phases.values()) / GIB
    assert est.peak_phase == "backward (top layer)"


def test_the_planner_spends_leftover_memory_on_layers_that_keep_their_activations():
    """Checkpointed micro-batches stop at 4k tokens; what the budget leaves goes to selective checkpointing, the most
    layers the estimate allows, and a budget between two settings never gets the larger one."""
    from qlora_helpers.ch01_memory.estimator import estimate, liger_loss_chunk
    from qlora_helpers.common.shapes import get_config

    cfg = get_config("qwen2.5-7b")
    engine = {"lora_impl": "fused", "lora_dropout": 0.1, "liger": True}
    at = lambda keep: estimate(cfg, "qlora4", batch_size=1, seq_len=4096, lora_r=64, grad_ckpt=True, keep_layers=keep,
                               loss_chunk=liger_loss_chunk(4096, cfg.vocab_size, cfg.hidden_size), accumulate=True,
                               **engine).total_gib       # 4k of a 32k step: gradients held between micro-batches
    budget = (at(5) + at(6)) / 2
    plan = plan_micro_batch(cfg, budget, lora_r=64, engine=engine)
    assert (plan["tokens"], plan["gradient_checkpointing"], plan["checkpoint_keep_layers"]) == (4096, True, 5)
    assert plan["estimate_gib"] == round(at(5), 3) <= budget
    assert at(1) < at(2) < at(5)                         # each kept layer costs its activations (the first one
    assert at(1) - at(0) < at(2) - at(1)                 # also spares the top layer's recomputation)
    lean = plan_micro_batch(cfg, at(1) + 0.001, lora_r=64, engine=engine)
    assert lean["checkpoint_keep_layers"] == 1           # the top layer kept costs no more than recomputing it


def test_a_row_longer_than_4k_tokens_is_planned_as_it_runs():
    """With max_length 8192 the micro-batch is a whole row: the kept layers are chosen for the 8k tokens that run,
    not for a 4k micro-batch no row can make."""
    from qlora_helpers.ch03_sft.command import SFTConfig, plan_batch

    cfg = SFTConfig(use_qlora=True, quantization_bit=4, bf16=True, fused_lora=True, lora_r=64, lora_dropout=0.1,
                    max_length=8192,
                    per_device_train_batch_size=1, gradient_accumulation_steps=4, memory_budget_gib=16.0,
                    use_liger_kernel=True)
    config = get_config("qwen2.5-7b")
    import qlora_helpers.ch03_sft.command as command
    original = command.AutoConfig.from_pretrained
    command.AutoConfig.from_pretrained = lambda *a, **kw: config
    try:
        plan = plan_batch(cfg, "qwen2.5-7b", "cpu")
    finally:
        command.AutoConfig.from_pretrained = original
    assert plan["tokens"] == 8192 and cfg.per_device_train_batch_size == 1 and plan["estimate_gib"] <= 16.0
    assert cfg.checkpoint_keep_layers == plan["checkpoint_keep_layers"] and cfg.gradient_checkpointing


def test_engine_levers_in_the_estimate():
    """bf16 adapters halve the adapters, their gradients and AdamW's states; Liger's SwiGLU and RMSNorm keep less;
    offloading leaves little on the GPU; ``engine_levers`` reads them off a run's settings."""
    from qlora_helpers.ch01_memory.estimator import estimate
    from qlora_helpers.ch03_sft.command import SFTConfig, engine_levers, planned_levers

    est = lambda **kw: estimate("qwen2.5-7b", "qlora4", batch_size=1, seq_len=4096, lora_r=64, loss_chunk=128, **kw)
    fp32, bf16 = est(), est(lora_impl="peft-bf16")
    assert bf16.components["LoRA weights"] * 2 == pytest.approx(fp32.components["LoRA weights"], rel=1e-3)
    assert bf16.components["optimizer states"] * 2 == pytest.approx(fp32.components["optimizer states"], rel=1e-3)
    assert est(lora_impl="fused", liger=True).total_gib < est(lora_impl="fused").total_gib
    assert est(lora_impl="fused", lora_dropout=0.1).total_gib > est(lora_impl="fused").total_gib   # masks, copies
    offloaded, kept = est(lora_impl="fused", offload=True), est(lora_impl="fused")
    assert offloaded.components["activations"] < 0.05 * kept.components["activations"]   # a layer at a time
    assert est().inputs.get("lora_impl") is None and est(liger=True).inputs["liger"]   # old records stay as they were
    with pytest.raises(ValueError, match="unknown lora_impl 'triton'"):
        est(lora_impl="triton")
    with pytest.raises(ValueError, match="keep_layers must be a whole number >= 0"):
        est(keep_layers=-1)
    cfg = SFTConfig(use_qlora=True, bf16=True, fused_lora=True, lora_dropout=0.1, use_liger_kernel=True)
    assert engine_levers(cfg) == {"lora_impl": "fused", "lora_dropout": 0.1, "offload": False, "liger": True}
    cfg.keep_dequantized = True
    assert planned_levers(cfg) == {"dequant_cache": True, "cpu_embeddings": False}
    cfg.fused_lora = False
    assert engine_levers(cfg)["lora_impl"] == "peft-bf16"


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
    assert not any(p.requires_grad for n, p in kept.named_parameters() if "lora_" not in n)
    assert kept.attention_kernel == "sdpa (not asked)"


def test_an_unvalidated_bf16_auto_computes_in_fp32():
    """``bf16="auto"`` is decided by ``validate`` for the device; a config used before that gets no bf16."""
    from qlora_helpers.ch03_sft.command import SFTConfig
    from qlora_helpers.ch03_sft.modes import compute_dtype, wants_varlen
    from qlora_helpers.ch03_sft.trainer import autocast

    cfg = SFTConfig(use_lora=True, packing=True)
    assert cfg.bf16 == "auto" and compute_dtype(cfg) == torch.float32 and not wants_varlen(cfg)
    assert type(autocast(cfg, "cpu")).__name__ == "nullcontext"


def test_the_planner_moves_the_embedding_table_only_where_that_buys_a_better_plan():
    """Where a 4k micro-batch fits only with the input embedding table in CPU memory, a CUDA plan moves it (an untied
    table: Qwen2.5-0.5B's is the output layer's too, and stays); with memory to spare it stays on the GPU, and 16-bit
    copies of the 4-bit weights take what is left. Micro-batches below the step's tokens hold the earlier ones'
    gradients."""
    from qlora_helpers.ch01_memory.estimator import estimate, liger_loss_chunk
    from qlora_helpers.common.shapes import get_config

    cfg = get_config("qwen2.5-7b")
    engine = {"lora_impl": "fused", "lora_dropout": 0.1, "liger": True}
    rows = (4096, 8192, 16384)
    at = lambda **kw: estimate(cfg, "qlora4", batch_size=1, seq_len=4096, lora_r=64, grad_ckpt=True,
                               loss_chunk=liger_loss_chunk(4096, cfg.vocab_size, cfg.hidden_size), **engine,
                               **{"accumulate": True, **kw}).total_gib
    assert at() - at(accumulate=False) == pytest.approx(0.301, abs=0.01)          # bf16 LoRA gradients, r=64
    assert at() - at(cpu_embeddings=True) == pytest.approx(152064 * 3584 * 2 / 2**30, rel=1e-3)   # the table
    budget = at() - 0.05                                                           # 4k fits only with it moved
    plan = plan_micro_batch(cfg, budget, lora_r=64, engine=engine, candidates=rows, may_move_embeddings=True)
    assert (plan["tokens"], plan["gradient_checkpointing"], plan["embeddings_on_cpu"]) == (4096, True, True)
    assert plan["estimate_gib"] <= budget and plan["checkpoint_keep_layers"] >= 1
    with pytest.raises(ValueError, match="no micro-batch of 4096 tokens"):         # no CUDA: the table stays
        plan_micro_batch(cfg, budget, lora_r=64, engine=engine, candidates=rows)
    roomy = plan_micro_batch(cfg, 47.5, lora_r=64, engine=engine, candidates=rows, may_move_embeddings=True)
    assert not roomy["embeddings_on_cpu"] and not roomy["gradient_checkpointing"] and roomy["keep_dequantized"]
    tied = get_config("qwen2.5-0.5b")
    small = plan_micro_batch(tied, 1.0, lora_r=64, engine=engine, candidates=(1024, 2048, 4096),
                             may_move_embeddings=True)
    assert not small["embeddings_on_cpu"]
    copies = estimate(cfg, "qlora4", batch_size=1, seq_len=4096, lora_r=64, dequant_cache=True).components
    plain = estimate(cfg, "qlora4", batch_size=1, seq_len=4096, lora_r=64).components
    linears = 28 * (3584 * (3584 + 512 + 512 + 3584) + 3 * 3584 * 18944)          # the decoder's 4-bit weights
    assert copies["quantized weights"] - plain["quantized weights"] == pytest.approx(2 * linears, rel=1e-3)
