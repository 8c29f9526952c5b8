"""GPU kernels the training recipe switches on for packed, padding-free micro-batches (CUDA only).

* **Attention.** A packed row holds many conversations end to end. transformers' SDPA path keeps each
  conversation to itself with a ``[rows, 1, T, T]`` block mask, and a masked SDPA call computes all
  ``T x T`` scores of a row before throwing away those outside the blocks: with conversations of
  about 50 tokens in 4096-token rows that is almost all of them. ``varlen_attention_forward`` hands
  PyTorch's variable-length flash attention (``torch.nn.attention.varlen``) the conversation
  boundaries instead, read from the position ids (they restart at 0 for each conversation), so only
  the scores inside each conversation are computed. It is registered with transformers under
  ``ATTENTION`` together with the SDPA mask builder, and answers through plain SDPA (with that mask)
  whenever it is not a packed training step (position ids given for every row, each row starting at
  0): evaluation, generation with a cache, padded batches, sliding-window layers, fp32.
* **RMSNorm and SwiGLU.** Liger's fused Triton kernels (``liger-kernel``), patched into one model
  instance (the classes, and so other models, are left alone): fewer element-wise passes, and the
  SwiGLU product is recomputed in the backward pass instead of kept.

``enable(model)`` switches on what this machine supports and says what it did; on the CPU it
changes nothing. ``benchmarks/train_throughput.py`` measures each lever on its own.
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
    options = _parameters(kernel)
    extra = {}
    if kv_heads != heads:
        if "enable_gqa" in options:
            extra["enable_gqa"] = True
        else:
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


def _text_model(model):
    """``(base model, None)``, or ``(None, why these kernels do not apply)``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in TEXT_MODELS:
        return None, "not a Qwen2/Llama/Mistral text model"
    if base.device.type != "cuda":
        return None, "the kernels need CUDA"
    return base, None


def use_varlen_attention(model) -> str:
    """Switch a text decoder on CUDA to ``ATTENTION``; returns what it now uses, or why not."""
    base, why_not = _text_model(model)
    if why_not or varlen_kernel() is None:
        return f"sdpa ({why_not or 'this PyTorch has no torch.nn.attention.varlen'})"
    register()
    base.set_attn_implementation(ATTENTION)
    return "varlen"


def use_liger_kernels(model) -> str:
    """Patch Liger's RMSNorm and SwiGLU kernels into this model instance; returns what it did, or why not."""
    base, why_not = _text_model(model)
    if why_not:
        return f"off ({why_not})"
    try:
        from liger_kernel.transformers.monkey_patch import (
            _patch_rms_norm_module,
            _patch_swiglu_module,
        )
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return "off (liger-kernel is not installed)"
    decoder = base.model
    _patch_rms_norm_module(decoder.norm)
    for layer in decoder.layers:
        _patch_rms_norm_module(layer.input_layernorm)
        _patch_rms_norm_module(layer.post_attention_layernorm)
        _patch_swiglu_module(layer.mlp, LigerSwiGLUMLP)
    return "liger"


def enable(model, attention: bool = True, liger: bool = True) -> dict:
    """Switch on the kernels this machine supports: ``{"attention": ..., "norm_and_mlp": ...}``."""
    return {"attention": use_varlen_attention(model) if attention else "sdpa (not asked)",
            "norm_and_mlp": use_liger_kernels(model) if liger else "off (not asked)"}
