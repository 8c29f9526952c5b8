"""The course's lean QLoRA training recipe: the same maths as plain peft + bitsandbytes, less waste.

What plain ``prepare_model_for_kbit_training`` + ``model(**batch).loss`` spends memory and time on,
and what this module does instead (each lever is measured on its own in
``benchmarks/train_throughput.py``; ``benchmarks/results/throughput.json`` holds the numbers):

==========================  ==============================================  ============================================
lever                       plain HF                                        here
==========================  ==============================================  ============================================
frozen embeddings, norms,   upcast to fp32                                  kept in the compute dtype (bf16): they are
lm_head                     (``prepare_model_for_kbit_...``): twice the     frozen, nothing needs fp32 there
                            bytes, fp32 activations stream
loss                        full ``[tokens, vocab]`` logits, upcast to      ``linear_cross_entropy``: only the trained
                            fp32, kept for backward (vocab 152k: 0.6 MB a   (assistant) positions, in chunks; each
                            token)                                          chunk's gradient is formed at once and its
                                                                            logits freed
batches                     right-padded to the longest member              ``pack``: conversations end to end in one
                                                                            row, positions restart per conversation,
                                                                            attention kept inside each (no padding at
                                                                            all)
activation checkpointing    always on                                       ``plan_micro_batch``: only when the estimate
                            (``use_gradient_checkpointing=True``)           says the micro-batch needs it; non-reentrant
micro-batch                 a fixed number of conversations                 a number of *tokens*, the largest that the
                                                                            chapter-01 estimator fits in a memory budget
attention, RMSNorm, SwiGLU  SDPA with a block mask over each packed row;    on a GPU (``fast_kernels``): varlen flash
                            PyTorch's element-wise ops                      attention inside each conversation only;
                                                                            Liger's fused RMSNorm and SwiGLU kernels
==========================  ==============================================  ============================================

The fused kernel of a maintained library (Liger's fused linear cross-entropy) is used on a GPU
when installed and asked for; everywhere else the chunked PyTorch version here runs (CPU included),
and both give the loss ``model(**batch).loss`` gives, to rounding (``tests/test_recipe.py``).

Example (how ``data.pack`` groups conversations of 5, 3, 4 and 2 tokens into rows of at most 8):
    >>> from qlora_helpers.ch03_sft.data import pack_lengths
    >>> pack_lengths([5, 3, 4, 2], max_tokens=8)
    [[0, 1], [2, 3]]
"""

from __future__ import annotations

import functools

import torch

from qlora_helpers.ch01_memory.estimator import estimate
from qlora_helpers.ch03_sft import fast_kernels as kernels
from qlora_helpers.ch03_sft.data import IGNORE_INDEX, collate, pack

MAX_ROW_TOKENS = 4096
KERNELS = ("auto", "chunked", "liger")      # what linear_cross_entropy runs


# --------------------------------------------------------------------------- the loss
@functools.cache
def _chunked_ce_function():
    """The autograd function, defined on first use so that importing this module needs no torch."""

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` without keeping the logits.

        Forward walks over chunks of rows; for each it computes the logits (in the weight's dtype,
        softmax in fp32), the loss, and at once the gradient with respect to ``hidden`` (and ``weight``
        when it trains), then frees the chunk. Backward only scales the stored gradients.
        """

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk_size):
            n = hidden.shape[0]
            count = max(int(labels.numel()), 1)
            need_h, need_w = hidden.requires_grad, weight.requires_grad
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                for start in range(0, n, chunk_size):
                    h = hidden[start:start + chunk_size].to(weight.dtype)
                    y = labels[start:start + chunk_size]
                    logits = (h @ weight.t()).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                    if need_h or need_w:
                        probs = logits.sub_(lse[:, None]).exp_()                 # softmax, in place
                        probs[torch.arange(len(y), device=y.device), y] -= 1.0  # d loss / d logits
                        probs = probs.to(weight.dtype)
                        if need_h:
                            grad_h[start:start + chunk_size] = (probs @ weight).to(hidden.dtype)
                        if need_w:
                            grad_w += (probs.t() @ h).float()
                    del logits
            ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
            ctx.count, ctx.weight_dtype = count, weight.dtype
            return total / count

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            scale = grad_out / ctx.count
            gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
            gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
            return gh, gw, None, None

    return ChunkedLinearCrossEntropy


def default_chunk_size(vocab_size: int, budget_bytes: int = 256 * 2**20) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about ``budget_bytes`` (256 MiB)."""
    return max(64, min(8192, budget_bytes // (4 * vocab_size)))


def linear_cross_entropy(hidden, weight, labels, *, impl: str = "auto", chunk_size: int | None = None):
    """Mean cross-entropy of ``hidden @ weight.T`` at the rows whose label is not ``-100``.

    ``hidden`` is ``[rows, hidden_size]`` already aligned with ``labels`` ``[rows]`` (shifted by the
    caller). Only labelled rows are multiplied by the output matrix. ``impl``: ``"chunked"`` (this
    module, any device), ``"liger"`` (Liger's fused Triton kernel; CUDA only), ``"auto"`` (chunked;
    Liger only when asked, as its gain was measured separately).
    """

    if impl not in KERNELS:
        raise ValueError(f"loss impl must be one of {', '.join(KERNELS)}, not {impl!r}")
    device_type = hidden.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        # fp32 master weights, 16-bit matmul (autograd casts the gradient back)
        weight = weight.to(torch.get_autocast_dtype(device_type))
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]
    if labels.numel() == 0:
        return hidden.sum() * 0.0
    if impl == "liger":
        if device_type != "cuda":
            raise ValueError("loss impl 'liger' is a CUDA kernel: use 'chunked' (or 'auto') on the CPU")
        try:   # optional: the `gpu` extra
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            raise ValueError("loss impl 'liger' needs liger-kernel: pip install -e '.[gpu]'") from None
        return LigerFusedLinearCrossEntropyLoss()(weight, hidden.to(weight.dtype), labels)
    return _chunked_ce_function().apply(hidden, weight, labels, chunk_size or default_chunk_size(weight.shape[0]))


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_fused_loss(model) -> bool:
    """True when the output layer is a plain frozen-or-trained ``nn.Linear`` (no adapter on it)."""

    base = _base_model(model)
    return type(base.get_output_embeddings()) is torch.nn.Linear and getattr(base, "model", None) is not None


def causal_lm_loss(model, batch: dict, impl: str = "auto", chunk_size: int | None = None):
    """The loss ``model(**batch).loss`` computes, without materialising ``[tokens, vocab]`` logits.

    Runs the decoder (``model.model``: text models and LLaVA/Qwen2-VL alike) for its last hidden
    states, shifts them against ``labels`` and hands the labelled rows to ``linear_cross_entropy``.
    ``impl="hf"``, or a model whose output layer carries an adapter, takes the plain path.
    """
    if impl == "hf" or not supports_fused_loss(model):
        return model(**batch).loss
    base = _base_model(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.model(**inputs, use_cache=False).last_hidden_state   # a cache would turn packing detection off
    labels = batch["labels"]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    return linear_cross_entropy(h, base.get_output_embeddings().weight, y, impl=impl, chunk_size=chunk_size)


def loss_module(model, impl: str = "auto"):
    """``model`` wrapped in an ``nn.Module`` whose forward is ``causal_lm_loss``: give *this* to
    ``DistributedDataParallel``, so the forward DDP sees is the one that runs (its gradient hooks
    depend on it) while the logits are still never materialised. Parameters are shared, not copied.
    """

    class CausalLMLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, **batch):
            return causal_lm_loss(self.model, batch, impl=impl)

    return CausalLMLoss(model)


def packed_micro_batches(examples, tokens: int, row_tokens: int = MAX_ROW_TOKENS, pad_id: int = 0) -> list[dict]:
    """Micro-batches of about ``tokens`` tokens: conversations packed into rows of at most ``row_tokens``.

    Rows are ``data.pack`` blocks (positions restart at each conversation, which never learns to
    predict the next) laid out by ``data.collate`` (no attention mask; a short row is filled with one
    unlabelled run of ``pad_id``). Rows are capped because the block-diagonal mask takes
    ``row_tokens**2`` bytes a row (16k tokens in one row: 256 MiB, plus temporaries of that size); a
    micro-batch stacks ``tokens // row_tokens`` rows.
    """

    row_tokens = min(tokens, row_tokens)
    rows = pack(examples, row_tokens)
    per = max(1, tokens // row_tokens)
    return [collate(rows[i:i + per], pad_id) for i in range(0, len(rows), per)]


# --------------------------------------------------------------------------- model and micro-batch
def prepare_model(model, gradient_checkpointing: bool = False, fast_kernels: bool | dict = True):
    """Freeze a (quantised) base for LoRA *without* ``prepare_model_for_kbit_training``'s fp32 upcast.

    Embeddings, norms and the output layer stay in the dtype they were loaded in; checkpointing,
    when asked, is the non-reentrant kind (no input-gradient hook needed). ``fast_kernels``: on a
    GPU, varlen flash attention for packed rows and Liger's RMSNorm/SwiGLU (``qlora_helpers.ch03_sft.fast_kernels``;
    a dict picks: ``{"attention": False}``); what was switched on is left in ``model.recipe_kernels``.
    """

    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    switches = fast_kernels if isinstance(fast_kernels, dict) else {"attention": fast_kernels, "liger": fast_kernels}
    model.recipe_kernels = kernels.enable(model, **switches)
    return model


def cast_adapters(model, dtype) -> int:
    """Store the trainable (LoRA) weights in ``dtype``, so their gradients and AdamW states follow.

    peft keeps adapters in fp32 on a 16-bit base (exact small updates); bf16 halves their weights and
    gradients and the optimizer's states, as TRL does for QLoRA. Returns the tensors cast.
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def estimate_gib(config, tokens: int, gradient_checkpointing: bool, method: str = "qlora4", lora_r: int = 16,
                 targets="all-linear", optimizer: str = "adamw") -> float:
    """Estimated peak (GiB) of one recipe micro-batch of ``tokens`` packed tokens:
    ``qlora_helpers.ch01_memory.estimator.estimate`` without ``prepare_kbit``, for this module's chunked loss.
    """

    chunk = default_chunk_size(config.get_text_config().vocab_size)
    return estimate(config, method, batch_size=1, seq_len=tokens, lora_r=lora_r, targets=targets,
                    grad_ckpt=gradient_checkpointing, optimizer=optimizer, loss_chunk=chunk).total_gib


def plan_micro_batch(config, budget_gib: float, method: str = "qlora4", lora_r: int = 16, targets="all-linear",
                     optimizer: str = "adamw", candidates=(512, 1024, 2048, 4096, 8192, 16384, 32768),
                     enough_tokens: int = 4096) -> dict:
    """The largest packed micro-batch (tokens) whose estimated peak (``estimate_gib``) fits
    ``budget_gib``, and whether it needs activation checkpointing.

    Checkpointing costs a second forward pass, so it is chosen only when no micro-batch of
    ``enough_tokens`` (4k: enough to keep a GPU's matrix units busy) fits without it, and it lets a
    larger one fit.
    """
    def need(tokens: int, ckpt: bool) -> float:
        return estimate_gib(config, tokens, ckpt, method, lora_r, targets, optimizer)

    fits = {ckpt: [t for t in candidates if need(t, ckpt) <= budget_gib] for ckpt in (False, True)}
    if not fits[True]:
        raise ValueError(f"no micro-batch of {candidates[0]} tokens or more fits {budget_gib} GiB even with "
                         "checkpointing: raise the budget or use a smaller model")
    best_plain, best_ckpt = max(fits[False], default=0), max(fits[True])
    ckpt = best_plain < min(enough_tokens, best_ckpt)
    tokens = best_ckpt if ckpt else best_plain
    return {"tokens": tokens, "gradient_checkpointing": ckpt, "estimate_gib": round(need(tokens, ckpt), 3),
            "budget_gib": budget_gib}
