"""qlora_helpers.ch03_sft.fast_kernels: the varlen attention path computes what the block-masked SDPA path computes.

The CUDA kernel is not on this machine, so a reference varlen kernel (SDPA run separately on each
conversation) stands in for it: what is checked is the wiring (boundaries from the position ids,
head layout, grouped key/value heads, the fall-back to SDPA outside packed training steps).
"""

import inspect

import pytest
import torch

from qlora_helpers.ch03_sft import fast_kernels
from qlora_helpers.ch03_sft.data import Example, collate, pack
from qlora_helpers.ch03_sft.trainer import causal_lm_loss
from qlora_helpers.common.models import build_tiny, tiny_qwen2


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """torch.nn.attention.varlen.varlen_attn's signature (PyTorch 2.11, no ``enable_gqa``): [tokens, heads, d]
    in and out, causal attention inside each [cu[i], cu[i+1]); fewer key/value heads than query heads are taken as
    flash attention takes them (each serves a group of query heads)."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and tuple(window_size) == (-1, 0)
    assert q.shape[1] % k.shape[1] == 0 and scale in (None, q.shape[-1] ** -0.5)
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))   # [1, heads, len, d]
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])[0].transpose(0, 1)
    return out


def ungrouped_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """A kernel that refuses fewer key/value heads than query heads, as a build without grouped heads would."""
    if k.shape[1] != q.shape[1]:
        raise RuntimeError("Number of heads in key/value must equal the number of heads in query")
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=return_aux, scale=scale,
                            window_size=window_size)


def _packed_batch(vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in (5, 9, 3, 7, 6, 4):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * 2 + ids[2:]))
    return collate(pack(examples, 16), pad_id=0)


def _model():
    config = tiny_qwen2(vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return build_tiny(config, seed=3).to(torch.bfloat16)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    loss = causal_lm_loss(model, batch)
    loss.backward()
    return loss.detach().float(), [p.grad.float() for p in model.parameters() if p.grad is not None]


def test_boundaries_start_a_conversation_wherever_the_position_is_zero():
    cu, longest = fast_kernels.boundaries(torch.tensor([[0, 1, 0, 1, 2], [0, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 2, 5, 6, 10] and longest == 4
    assert fast_kernels.boundaries(torch.tensor([[2, 3, 0, 1]])) is None   # left padding: not packed


@pytest.mark.parametrize("grouped", [True, False])
def test_varlen_path_matches_block_masked_sdpa_in_loss_and_gradients(monkeypatch, grouped):
    """Whether the kernel takes the model's grouped key/value heads as they are or is handed copies for every query
    head (``grouped_heads``), the loss and gradients are those of the block-masked SDPA path."""
    batch = _packed_batch()
    assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]   # several conversations a row
    model = _model().train()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ref_loss, ref_grads = _loss_and_grads(model, batch)

    calls = []
    base = reference_varlen if grouped else ungrouped_varlen
    kernel = lambda *a, **k: calls.append(a[1].shape[1]) or base(*a, **k)
    kernel.__signature__ = inspect.signature(reference_varlen)
    monkeypatch.setattr(fast_kernels, "varlen_kernel", lambda: kernel)
    monkeypatch.setattr(fast_kernels, "grouped_heads", lambda device: grouped)
    fast_kernels.register()
    model.set_attn_implementation(fast_kernels.ATTENTION)
    loss, grads = _loss_and_grads(model, batch)
    assert len(calls) == model.config.num_hidden_layers                  # every layer went through varlen
    heads = model.config.num_key_value_heads if grouped else model.config.num_attention_heads
    assert set(calls) == {heads}                                         # no copies where the kernel groups
    assert torch.allclose(loss, ref_loss, rtol=1e-2)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=5e-2, atol=5e-3)


def test_grouped_heads_asks_the_kernel_once(monkeypatch):
    """The probe runs the kernel forward and backward on grouped heads: a kernel that refuses them gets copies."""
    for kernel, expected in ((reference_varlen, True), (ungrouped_varlen, False)):
        monkeypatch.setattr(fast_kernels, "varlen_kernel", lambda kernel=kernel: kernel)
        fast_kernels.grouped_heads.cache_clear()
        with torch.no_grad():                      # as in an evaluation: the probe takes its own gradients
            assert fast_kernels.grouped_heads(torch.device("cpu")) is expected
    fast_kernels.grouped_heads.cache_clear()


def test_outside_a_packed_training_step_it_answers_through_masked_sdpa(monkeypatch):
    monkeypatch.setattr(fast_kernels, "varlen_kernel", lambda: pytest.fail("varlen must not run in eval mode"))
    batch = _packed_batch(seed=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = _model().eval()
    with torch.no_grad():
        ref = model(**inputs).logits
        fast_kernels.register()
        model.set_attn_implementation(fast_kernels.ATTENTION)
        ours = model(**inputs).logits
    assert torch.equal(ours, ref)


def test_padded_training_batches_keep_the_masked_sdpa_path(monkeypatch):
    monkeypatch.setattr(fast_kernels, "varlen_kernel", lambda: pytest.fail("a padded batch is not packed"))
    batch = _packed_batch(seed=2)
    ids = batch["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0                                    # right padding, positions left to the model
    padded = {"input_ids": ids, "attention_mask": mask, "labels": batch["labels"].masked_fill(mask == 0, -100)}
    model = _model().train()
    ref_loss, _ = _loss_and_grads(model, padded)
    fast_kernels.register()
    model.set_attn_implementation(fast_kernels.ATTENTION)
    loss, _ = _loss_and_grads(model, padded)
    assert torch.equal(loss, ref_loss)


def test_varlen_attention_changes_nothing_on_the_cpu():
    model = _model()
    assert fast_kernels.use_varlen_attention(model) == "sdpa (varlen attention needs CUDA)"
    assert model.config._attn_implementation == "sdpa"


def test_the_attention_is_chosen_by_where_the_layers_compute_not_where_the_embedding_table_waits():
    """``--embeddings_on_cpu`` leaves the table, the model's first parameter and so ``model.device``, in CPU memory
    while every layer computes on the GPU; the attention was once chosen by ``model.device`` (SDPA over packed rows
    on the GPU). Here the table is on the meta device and the layers on the CPU."""
    model = _model()
    table = model.get_input_embeddings()
    table.weight = torch.nn.Parameter(torch.empty_like(table.weight, device="meta"), requires_grad=False)
    assert model.device.type == "meta" and fast_kernels.compute_device(model).type == "cpu"


def test_use_varlen_attention_asks_compute_device(monkeypatch):
    model = _model()
    monkeypatch.setattr(fast_kernels, "compute_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(fast_kernels, "varlen_kernel", lambda: None)
    assert fast_kernels.use_varlen_attention(model) == "sdpa (this PyTorch has no torch.nn.attention.varlen)"
