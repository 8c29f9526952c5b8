"""Varlen flash attention for packed, padding-free rows (CUDA only): the ``sft`` command's
``--attn_implementation varlen`` (and ``auto`` on packed bf16 rows).

A packed row holds many conversations end to end. transformers' SDPA path keeps each conversation to
itself with a ``[rows, 1, T, T]`` block mask, and a masked SDPA call computes all ``T x T`` scores of a
row before throwing away those outside the blocks: with conversations of about 50 tokens in 4096-token
rows that is almost all of them. ``varlen_attention_forward`` hands PyTorch's variable-length flash
attention (``torch.nn.attention.varlen``) the conversation boundaries instead, read from the position ids
(they restart at 0 for each conversation), so only the scores inside each conversation are computed. It
is registered with transformers under ``ATTENTION`` together with the SDPA mask builder, and answers
through plain SDPA (with that mask) whenever it is not a packed training step (position ids given for
every row, each row starting at 0): evaluation, generation with a cache, padded batches, sliding-window
layers, fp32. Liger's RMSNorm, SwiGLU and fused loss come through the Trainer's ``use_liger_kernel``.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "qlora_varlen"
TEXT_MODELS = ("qwen2", "llama", "mistral")


@functools.cache
def varlen_kernel():
    """PyTorch's variable-length flash attention, or None where this PyTorch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _parameters(kernel) -> frozenset:
    return frozenset(inspect.signature(kernel).parameters)


@functools.cache
def grouped_heads(device) -> bool:
    """Whether this PyTorch's varlen kernel takes fewer key/value heads than query heads without being told (flash
    attention's own grouped-query support; PyTorch 2.11's ``varlen_attn`` has no ``enable_gqa`` but passes them
    through). Tried once, forward and backward, on a few values: where it refuses, keys and values are repeated to
    every query head, as many copies kept for backward as there are query heads per key head."""
    q = torch.zeros(4, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.zeros(4, 1, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 4], device=device, dtype=torch.int32)
    try:      # its own graph: what it saves stays out of a checkpointed layer's count (a hook of its own)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            varlen_kernel()(q, kv, kv, cu, cu, 4, 4, window_size=(-1, 0)).sum().backward()
    except (RuntimeError, ValueError):
        return False
    return kv.grad is not None and kv.grad.shape == kv.shape


_last = {"position_ids": None, "bounds": None}


def boundaries(position_ids):
    """``(cu_seqlens, max_len)`` of the conversations in packed rows (one starts wherever the position
    is 0), or None when a row does not start at 0 (left padding: not a packed batch).

        >>> import torch
        >>> cu, longest = boundaries(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]))
        >>> cu.tolist(), longest
        ([0, 3, 5, 9, 10], 4)
        >>> boundaries(torch.tensor([[1, 1, 0, 1]])) is None
        True
    """

    if _last["position_ids"] is position_ids:    # every layer of a forward (and its recomputation) asks again
        return _last["bounds"]
    bounds = None
    if bool((position_ids[:, 0] == 0).all()):
        flat = position_ids.reshape(-1)
        starts = torch.nonzero(flat == 0).flatten()
        cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
        bounds = (cu, int((cu[1:] - cu[:-1]).max()))
    _last.update(position_ids=position_ids, bounds=bounds)
    return bounds


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             position_ids=None, **kwargs):
    """transformers attention function: ``query`` ``[B, heads, T, d]``, ``key``/``value`` ``[B, kv_heads, T, d]``;
    returns ``([B, T, heads, d], None)``."""

    packed_step = (module.training and position_ids is not None and position_ids.shape == query.shape[::2]
                   and query.shape[2] == key.shape[2] and not dropout and not kwargs.get("sliding_window")
                   and query.dtype in (torch.bfloat16, torch.float16))   # position ids given per row: packed
    kernel = varlen_kernel() if packed_step else None
    bounds = boundaries(position_ids) if kernel is not None else None
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, heads, d)
    k = key.transpose(1, 2).reshape(b * t, kv_heads, d)
    v = value.transpose(1, 2).reshape(b * t, kv_heads, d)
    extra = {}
    if kv_heads != heads:
        if "enable_gqa" in _parameters(kernel):
            extra["enable_gqa"] = True
        elif not grouped_heads(query.device):
            k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    if scaling is not None:
        extra["scale"] = scaling
    cu, longest = bounds
    out = kernel(q, k, v, cu, cu, longest, longest, window_size=(-1, 0), **extra)   # (-1, 0): causal
    return out.view(b, t, heads, d), None


def register() -> None:
    """Make ``ATTENTION`` a transformers attention implementation (idempotent)."""

    AttentionInterface.register(ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def compute_device(model) -> torch.device:
    """Where ``model``'s layers compute: the device of its first parameter outside the input embedding table.
    ``model.device`` is the table's, which ``--embeddings_on_cpu`` keeps in CPU memory."""
    table = model.get_input_embeddings()
    skip = {id(p) for p in table.parameters()} if table is not None else set()
    return next((p.device for p in model.parameters() if id(p) not in skip), model.device)


def use_varlen_attention(model) -> str:
    """Switch a Qwen2/Llama/Mistral decoder on CUDA to ``ATTENTION``; returns what it now uses, or why not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in TEXT_MODELS:
        return "sdpa (not a Qwen2/Llama/Mistral text model)"
    device = compute_device(base)
    if device.type != "cuda":
        return "sdpa (varlen attention needs CUDA)"
    if varlen_kernel() is None:
        return "sdpa (this PyTorch has no torch.nn.attention.varlen)"
    register()
    base.set_attn_implementation(ATTENTION)
    grouped_heads(device)           # asked now, not inside the first (checkpointed) forward pass
    return "varlen"
