"""GPU memory of a training step: estimated from the config, and measured on random weights.

``estimate`` predicts ``torch.cuda.max_memory_allocated()`` in steady-state training (optimizer
states already exist) under one convention: transformers 5.x, SDPA attention, ``labels=input_ids``,
no autocast (the model runs in its ``dtype``), peft defaults (``LoraConfig(r, target_modules)``),
torch AdamW or bitsandbytes' 8-bit AdamW, and ``batch_size * seq_len`` tokens per micro-step.
``measure`` runs exactly that on a GPU. The CUDA context and paged optimizer states live outside
PyTorch's allocator: they are reported, but not in ``total_gib``.

Example (Qwen2.5-0.5B, QLoRA 4-bit, r=8 on all linear layers, 1 x 512 tokens):
    >>> from qlora_helpers.common.shapes import get_config
    >>> est = estimate(get_config("qwen2.5-0.5b"), "qlora4", batch_size=1, seq_len=512)
    >>> list(est.components)[:3]
    ['quantized weights', 'unquantized weights', 'LoRA weights']
    >>> est.params["lora"]    # 24 layers x r * (in + out) summed over the 7 projections
    4399104
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass, field, replace

from qlora_helpers.ch01_memory.architectures import (
    ArchitectureError,
    Block,
    Linear,
    Shape,
    int8_outlier_share,
    text_shape,
    with_attention,
)
from qlora_helpers.ch01_memory.gpus import CONTEXT_GIB, VERDICT_TEXT, find_gpu, fits, reserved_gib, verdict
from qlora_helpers.common.shapes import AssumedField, get_config

METHODS = ("full", "lora", "qlora4", "qlora8")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
# How the LoRA branch runs: peft with its fp32 adapters (peft's default), peft with the adapters in bf16 (what TRL's
# SFTTrainer does to a quantized model's), the course's fused layer (ch03_sft.fused_lora, bf16 adapters)
LORA_IMPLS = ("peft-fp32", "peft-bf16", "fused")
ENGINE_DEFAULTS = dict(lora_impl="peft-fp32", lora_dropout=0.0, keep_layers=0, offload=False, liger=False,
                       accumulate=False, dequant_cache=False, cpu_embeddings=False)
DTYPES = ("bf16", "fp16")
TARGET_PRESETS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# (the Llama names; resolve_targets takes a model's own names from its block layout)
GIB = 2**30
BLOCK_4BIT, BLOCK_ABSMAX, BLOCK_OPT8 = 64, 256, 256   # bitsandbytes block sizes
MIN_8BIT, MIN_PAGED = 4096, 100_000                   # bnb: smaller tensors keep fp32 / non-paged states
CUBLAS_WORKSPACE = 80 * 2**20                         # cuBLAS(Lt) workspaces (seen on an H100, torch 2.11)
COMPONENTS = ("quantized weights", "unquantized weights", "LoRA weights", "gradients", "optimizer states",
              "activations", "logits and loss", "temporary buffers")


def _r512(nbytes: float) -> int:
    """PyTorch's CUDA allocator hands out blocks in multiples of 512 bytes."""
    return int(math.ceil(nbytes / 512) * 512) if nbytes > 0 else 0


def model_shape(config) -> Shape:
    """Parameter inventory and block layout of a decoder (``architectures.text_shape``), or a LLaVA /
    Qwen2-VL VLM (vision tower and projector added).

    Example:
        >>> from qlora_helpers.common.shapes import get_config
        >>> s = model_shape(get_config("qwen2.5-0.5b"))
        >>> s.hidden, s.kv_heads * s.head_dim, s.tied, sum(l.fan_in * l.fan_out * l.count for l in s.linears)
        (896, 128, True, 357826560)
    """
    text = config.get_text_config()
    base = text_shape(text)
    h, lin, other = base.hidden, list(base.linears), dict(base.other)
    vision = None
    vc = getattr(config, "vision_config", None)
    if vc is not None and config.model_type == "llava":
        hv, iv, lv, p = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.patch_size
        grid = (vc.image_size // p) ** 2
        lin += [Linear(nm, "vision", hv, hv, True, lv) for nm in ("q_proj", "k_proj", "v_proj", "out_proj")]
        lin += [Linear("fc1", "vision", hv, iv, True, lv), Linear("fc2", "vision", iv, hv, True, lv),
                Linear("linear_1", "projector", hv, h, True, 1), Linear("linear_2", "projector", h, h, True, 1)]
        other.update(vision_embeddings=3 * p * p * hv + hv + (grid + 1) * hv, vision_norms=(4 * lv + 4) * hv)
        drop_cls = getattr(config, "vision_feature_select_strategy", "default") == "default"
        vision = dict(hidden=hv, inter=iv, layers=lv, heads=vc.num_attention_heads, tokens=grid + 1,
                      lm_tokens=grid if drop_cls else grid + 1, names=CLIP_BLOCK)
    elif vc is not None and config.model_type == "qwen2_vl":
        hv, lv, p, m = vc.embed_dim, vc.depth, vc.patch_size, vc.spatial_merge_size
        iv = int(hv * vc.mlp_ratio)
        grid = (336 // p) ** 2   # one 336 x 336 image per sample
        lin += [Linear("qkv", "vision", hv, 3 * hv, True, lv), Linear("proj", "vision", hv, hv, True, lv),
                Linear("fc1", "vision", hv, iv, True, lv), Linear("fc2", "vision", iv, hv, True, lv),
                Linear("0", "projector", hv * m * m, hv * m * m, True, 1),
                Linear("2", "projector", hv * m * m, vc.hidden_size, True, 1)]
        other.update(vision_embeddings=3 * vc.temporal_patch_size * p * p * hv, vision_norms=(4 * lv + 2) * hv)
        vision = dict(hidden=hv, inter=iv, layers=lv, heads=vc.num_heads, tokens=grid, lm_tokens=grid // (m * m),
                      names=QWEN2VL_BLOCK)
    elif vc is not None:
        raise ArchitectureError(f"field 'model_type' is {config.model_type!r}, a vision-language model the "
                                "estimator does not know; it reads llava and qwen2_vl")
    return replace(base, linears=tuple(lin), other=other, vision=vision)


def resolve_targets(shape: Shape, targets) -> set[str]:
    """Module-name suffixes LoRA wraps: ``"all-linear"`` (peft: every linear but lm_head, vision tower
    and projector of a VLM included), ``"attention"``, ``"mlp"`` or a comma-separated list."""
    names = {l.name for l in shape.linears}
    if targets == "all-linear":
        return names
    blk = shape.block
    presets = {"attention": (*blk.qkv, blk.o), "mlp": (*blk.mlp_in, blk.mlp_out)}
    wanted = presets.get(targets) if isinstance(targets, str) else None
    if wanted is None:
        wanted = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    bad = [t for t in wanted if t not in names]
    if bad or not wanted:
        raise ValueError(f"unknown LoRA target {(bad or [targets])[0]!r}: use all-linear, attention, mlp or names from "
                         f"{', '.join(sorted(names))}")
    return set(wanted)


def quantized_bytes(numel: int, bits: int = 4, *, rows: int = 1, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes weight of ``numel`` values (``rows`` = out_features for 8-bit).

    4-bit NF4: half a byte per value plus one absmax per block of 64, stored as fp32 or, with double
    quantisation, as 8-bit codes with one fp32 absmax per 256 of them (and a 16-value code table).
    8-bit LLM.int8: one byte per value plus one fp32 scale per output row.
        >>> quantized_bytes(4096 * 4096)    # 8388608 codes + 262144 absmax + 4096 second level + 1024
        8655872
        >>> quantized_bytes(4096 * 4096, double_quant=False)    # 8388608 + 512 + 4 * 262144
        9437696
        >>> quantized_bytes(4096 * 4096, bits=8, rows=4096)
        16793600
    """
    if bits == 8:
        return _r512(numel) + _r512(4 * rows)
    blocks = math.ceil(numel / BLOCK_4BIT)
    packed = _r512(numel / 2) + _r512(16 * 4)                     # codes + NF4 table
    if not double_quant:
        return packed + _r512(4 * blocks)
    return packed + _r512(blocks) + _r512(4 * math.ceil(blocks / BLOCK_ABSMAX)) + _r512(4)   # + offset


def state_bytes(numel: int, param_bytes: int, optimizer: str) -> tuple[int, int]:
    """AdamW state bytes of one tensor: (in PyTorch's allocator, paged outside it)."""
    if optimizer == "adamw":                                       # exp_avg, exp_avg_sq in the param dtype
        return 2 * _r512(numel * param_bytes), 0
    if numel < MIN_8BIT:                                           # bnb keeps small tensors in fp32
        return 2 * _r512(4 * numel), 0
    states = 2 * _r512(numel)
    extra = 2 * _r512(4 * math.ceil(numel / BLOCK_OPT8)) + _r512(4)
    if optimizer == "paged_adamw_8bit" and numel >= MIN_PAGED:
        return extra, states
    return states + extra, 0


@dataclass
class MemoryEstimate:
    """Predicted peak, split into named components (bytes), plus what lies outside PyTorch's count."""
    components: dict                   # name -> bytes at the peak, in COMPONENTS order; sums to total
    phases: dict                       # phase -> total bytes; the peak is the largest
    peak_phase: str
    outside: dict                      # name -> bytes not in max_memory_allocated
    params: dict                       # parameter counts
    inputs: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)   # intermediate terms in bytes, for tests and the notebook

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def reserved_gib(self) -> float:
        """Predicted peak ``max_memory_reserved``: the peak allocated plus the allocator's slack (``gpus``)."""
        return reserved_gib(self.total_gib, self.detail.get("logits block", 0) / GIB,
                            self.detail.get("recomputed layer", 0) / GIB)

    @property
    def device_gib(self) -> float:
        """What the card must hold: reserved memory, the CUDA context and paged optimizer states."""
        return self.reserved_gib + sum(self.outside.values()) / GIB

    def components_gib(self) -> dict:
        return {k: v / GIB for k, v in self.components.items()}

    def setting(self) -> dict:
        """The keyword arguments of ``estimate`` that give this estimate again (to vary one of them)."""
        i = self.inputs
        return dict(batch_size=i["batch_size"], seq_len=i["seq_len"], lora_r=i["lora_r"] or 8,
                    targets=i["targets"] or "all-linear", grad_ckpt=i["grad_ckpt"], prepare_kbit=i["prepare_kbit"],
                    optimizer=i["optimizer"], dtype=i["dtype"], loss_chunk=i["loss_chunk"], attention=i["attention"],
                    **{k: i.get(k, v) for k, v in ENGINE_DEFAULTS.items()})

    def as_dict(self) -> dict:
        return {"total_gib": round(self.total_gib, 4), "reserved_gib": round(self.reserved_gib, 4),
                "device_gib": round(self.device_gib, 4),
                "components": {k: round(v, 4) for k, v in self.components_gib().items()},
                "components_bytes": dict(self.components), "peak_phase": self.peak_phase,
                "phases_gib": {k: round(v / GIB, 4) for k, v in self.phases.items()},
                "not_in_total_gib": {k: round(v / GIB, 4) for k, v in self.outside.items()},
                "params": dict(self.params), "inputs": dict(self.inputs), "verdict": verdict(self)}

    def table(self) -> str:
        rows = [f"{k:<22}{v / GIB:>9.3f} GiB" for k, v in self.components.items()]
        rows += ["-" * 35, f"{'total (peak allocated)':<22}{self.total_gib:>9.3f} GiB   at: {self.peak_phase}"]
        rows += [f"{'reserved (estimate)':<22}{self.reserved_gib:>9.3f} GiB   (allocator slack added)"]
        rows += [f"{'+ ' + k:<22}{v / GIB:>9.3f} GiB" for k, v in self.outside.items()]
        rows += [f"{'on the card':<22}{self.device_gib:>9.3f} GiB"]
        return "\n".join(rows + [verdict(self)])

    __str__ = table


LLAMA_BLOCK = Block()
CLIP_BLOCK = Block(qkv=("q_proj", "k_proj", "v_proj"), o="out_proj", mlp_in=("fc1",), mlp_out="fc2", gated=False)
QWEN2VL_BLOCK = Block(qkv=("qkv",), o="proj", mlp_in=("fc1",), mlp_out="fc2", gated=False)


def _norm_saved(saved: dict, key: str, req: bool, *, kind: str, N: int, h: int, a: int, full: bool,
                liger: bool = False) -> bool:
    """What one norm keeps for backward; returns whether its output requires grad.

    rms: an fp32 copy of the input and 1/rms per token (+ the cast output when the weight trains);
    gemma: the same, the fp32 ``1 + weight`` and, when the weight trains, the fp32 normed output;
    layer_no_weight (OLMo): the fp32 input, mean and 1/std per token; layer: the input itself, mean and 1/std.
    ``liger``: Liger's RMSNorm keeps the input as it is (16-bit) and 1/rms.
    """
    if req:
        if kind == "layer" or (liger and kind == "rms"):
            saved[key + ".in"], saved[key + ".stats"] = a * N * h, 8 * N
        else:
            saved[key + ".in"] = 4 * N * h
            saved[key + ".rms"] = 8 * N if kind == "layer_no_weight" else 4 * N
        if kind == "gemma":
            saved[key + ".w1"] = 4 * h
    if full and kind in ("rms", "gemma"):
        saved[key + ".cast"] = (4 if kind == "gemma" else a) * N * h
    return req or full


def _attention_saved(saved: dict, blk: Block, *, N, B, S, q, kv, heads, a) -> None:
    """What attention keeps: SDPA's q, k, v, output and log-sum-exp, or eager attention's S x S scores."""
    if blk.attention == "eager":                       # scores (+ tanh-capped copy), fp32 softmax, its 16-bit copy
        rep = kv if kv == q else q                     # repeat_kv copies k and v to every query head
        saved.update(q=a * N * q, k=a * N * rep, v=a * N * rep)
        saved["scores"] = B * heads * S * S * ((a if blk.attn_softcap else 0) + 4 + (a if a != 4 else 0))
    elif a == 4 and kv < q:                            # fp32 + grouped KV heads: only the math kernel runs;
        saved.update(q=4 * N * q, k=4 * N * q, v=4 * N * q, probs=4 * B * heads * S * S)   # keeps S x S probs
    else:                                              # flash / cuDNN / mem-efficient: q, k, v, out + logsumexp
        saved.update(q=a * N * q, k=a * N * kv, v=a * N * kv, out=a * N * q, lse=4 * B * heads * S)
    if blk.clip_qkv:                                   # OLMo: clamp_ keeps the values it clipped from
        saved.update(clip_q=a * N * q, clip_k=a * N * kv, clip_v=a * N * kv)


def _block_saved(N, B, S, h, q, kv, inter, heads, r, *, full, lora, a, g_in, q8, blk: Block = LLAMA_BLOCK,
                 outliers: tuple = (0.0, 0.0), lora_impl: str = "peft-fp32", dropout: bool = False,
                 liger: bool = False):
    """Bytes one transformer block keeps for backward without checkpointing: ``(all, kept by bnb)``.

    ``a``: bytes per activation value (2 = bf16; 4 when prepare_model_for_kbit_training upcast the
    norms and embeddings, which makes the whole residual stream fp32). ``g_in``: whether the block's
    input requires grad. ``lora``: set of wrapped module names. A LoRA module casts its input to
    fp32 (its weights are fp32), so with ``a == 2`` every wrapped module keeps its own fp32 copy.
    bitsandbytes' 8-bit matmul keeps its input, and a copy of the input columns that hold a value above
    its 6.0 threshold (``outliers``: the share of such columns in the normed inputs and in the MLP output
    projection's input), on ``ctx`` rather than through autograd, so those tensors survive gradient
    checkpointing: they are also returned separately.
    With 16-bit adapters (``lora_impl`` peft-bf16 or fused) there is no fp32 copy: LoRA A's input is kept as it is
    (shared by the layers that read it) or, with ``dropout``, each layer's dropped copy and its one-byte mask; the
    fused layer keeps the shared input and each layer's mask (it makes the dropped copy again in backward).
    ``liger``: Liger's RMSNorm (``_norm_saved``) and SwiGLU, which keeps gate and up and recomputes act(gate) in the
    backward pass.
    """
    saved, pinned = {}, set()

    def readers(key, width, names, x_req):
        for m in names:                               # LoRA A saves its (fp32) input, B saves A's output
            if m not in lora:
                continue
            if lora_impl == "peft-fp32":
                saved[key if a == 4 else f"{key}>{m}"] = 4 * N * width
                saved[f"{m}.A"] = 4 * N * r
                continue
            saved[f"{key}>{m}" if dropout and lora_impl != "fused" else key] = a * N * width
            saved.update({f"{m}.mask": N * width} if dropout else {})
            saved[f"{m}.A"] = a * N * r
        if full or (q8 and x_req):                    # full: for weight grads; 8-bit: bnb keeps its input
            saved[key] = a * N * width
            pinned.update([key] if q8 else [])

    norm = lambda key, req: _norm_saved(saved, key, req, kind=blk.norm, N=N, h=h, a=a, full=full, liger=liger)
    x1 = norm("norm1", g_in)
    readers("x1", h, blk.qkv, x1)
    att = x1 or full or bool(set(blk.qkv) & lora)
    if att:
        _attention_saved(saved, blk, N=N, B=B, S=S, q=q, kv=kv, heads=heads, a=a)
    readers("out", q, (blk.o,), att)
    o_req = att or blk.o in lora
    x2 = norm("norm2", (norm("post1", o_req) if blk.post_norms else o_req) or g_in)
    readers("x2", h, blk.mlp_in, x2)
    g = x2 or full or bool(set(blk.mlp_in) & lora)
    if g and blk.gated:                               # act(gate) * up keeps gate, act(gate), up
        saved.update(gate=a * N * inter, up=a * N * inter, **({} if liger else {"act": a * N * inter}))
    elif g:                                           # gelu keeps its input; fc2 reads gelu's output
        saved.update(fc1=a * N * inter)
    readers("p", inter, (blk.mlp_out,), g)
    for width, names, req, share in ((h, blk.qkv, x1, outliers[0]), (h, blk.mlp_in, x2, outliers[0]),
                                     (inter, (blk.mlp_out,), g, outliers[1])):
        for m in names if q8 and req and share else ():   # each 8-bit module keeps its own copy
            saved[f"{m}.outliers"] = int(a * N * width * share)
            pinned.add(f"{m}.outliers")
    if blk.post_norms:
        norm("post2", g or blk.mlp_out in lora)
    return sum(saved.values()), sum(saved[k] for k in pinned)


def _check(method, batch_size, seq_len, lora_r, prepare_kbit, optimizer, dtype, loss_chunk,
           lora_impl: str = "peft-fp32", keep_layers: int = 0) -> None:
    """One line for the first input ``estimate`` cannot take."""
    if lora_impl not in LORA_IMPLS:
        raise ValueError(f"unknown lora_impl {lora_impl!r}: use one of {', '.join(LORA_IMPLS)}")
    if not isinstance(keep_layers, int) or keep_layers < 0:
        raise ValueError(f"keep_layers must be a whole number >= 0 (0: every layer checkpointed), not {keep_layers!r}")
    for value, allowed, what in ((method, METHODS, "method"), (optimizer, OPTIMIZERS, "optimizer"),
                                 (dtype, DTYPES, "dtype")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
    for value, what in ((batch_size, "batch size"), (seq_len, "sequence length")):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    if method != "full" and (not isinstance(lora_r, int) or lora_r < 1):
        raise ValueError(f"LoRA rank must be a whole number >= 1, got {lora_r!r}: try 8, 16 or 64")
    if prepare_kbit and method not in ("qlora4", "qlora8"):
        raise ValueError("prepare_kbit applies to quantized models only: use method qlora4 or qlora8, or drop it")
    if loss_chunk is not None and (not isinstance(loss_chunk, int) or loss_chunk < 1):
        raise ValueError(f"loss_chunk must be a whole number of rows >= 1 (or None for full logits), "
                         f"got {loss_chunk!r}")


@dataclass
class _Run:
    """The quantities the terms below share. Legend: B batch, S sequence length (text + image tokens),
    N = B * S tokens, h hidden size, r LoRA rank, V vocabulary."""
    shape: Shape
    full: bool                 # full fine-tuning: every weight trains
    quant: int | None          # 4 or 8 bits for the decoder's linear layers, None for 16-bit
    lora: set                  # names of the LoRA-wrapped modules
    r: int
    weight_bytes: int          # bytes per 16-bit weight (bf16 / fp16)
    act_bytes: int             # bytes per activation value: 4 after prepare_kbit's fp32 upcast, else 2
    B: int
    S: int                     # tokens per sample seen by the language model
    grad_ckpt: bool
    prepare_kbit: bool
    outliers: tuple = (0.0, 0.0)   # share of 8-bit input columns bnb copies in 16-bit: (normed inputs, MLP output)
    lora_impl: str = "peft-fp32"   # LORA_IMPLS
    dropout: bool = False          # LoRA dropout > 0: a one-byte mask per LoRA layer (16-bit adapters)
    keep_layers: int = 0           # under checkpointing, layers that keep their activations
    offload: bool = False          # saved activations wait in CPU memory (TRL's activation_offloading)
    liger: bool = False            # Liger's RMSNorm and SwiGLU (the Trainer's use_liger_kernel)
    accumulate: bool = False       # gradient accumulation: earlier micro-batches' gradients live through the next
    dequant_cache: bool = False    # fused LoRA: each frozen quantized weight also kept as its 16-bit copy
    cpu_embeddings: bool = False   # the frozen input embedding table in CPU memory (an untied one frees the GPU)

    @property
    def lora_bytes(self) -> int:
        return 4 if self.lora_impl == "peft-fp32" else 2

    @property
    def N(self) -> int:
        return self.B * self.S


def _weights(run: _Run) -> tuple[int, int, int, list]:
    """(quantized bytes, unquantized bytes, LoRA bytes, LoRA tensors as (count, numel))."""
    s, a, w, quant = run.shape, run.act_bytes, run.weight_bytes, run.quant
    qbytes = unq = 0
    for l in s.linears:
        wn = l.fan_in * l.fan_out
        if quant and l.part == "lm":
            qbytes += l.count * quantized_bytes(wn, quant, rows=l.fan_out)
            qbytes += l.count * _r512(2 * wn) if run.dequant_cache and l.name in run.lora else 0
        else:
            unq += l.count * _r512(wn * (a if quant else w))
        unq += l.count * _r512(l.fan_out * (a if quant else w)) if l.bias else 0
    unq += sum(_r512(n * (a if quant else w)) for k, n in s.other.items()
               if not (k == "embed_tokens" and run.cpu_embeddings and not s.tied))
    lora_tensors = [(l.count, run.r * l.fan_in) for l in s.linears if l.name in run.lora]
    lora_tensors += [(l.count, run.r * l.fan_out) for l in s.linears if l.name in run.lora]
    lora_w = sum(c * _r512(run.lora_bytes * n) for c, n in lora_tensors)   # peft's default: fp32
    return qbytes, unq, lora_w, lora_tensors


def _optimizer(run: _Run, lora_tensors, optimizer: str) -> dict:
    """Gradients, optimizer states (on the device and paged out) and the step's temporary, in bytes."""
    s = run.shape
    if run.full:
        trainable = [(l.count, l.fan_in * l.fan_out) for l in s.linears]
        trainable += [(l.count, l.fan_out) for l in s.linears if l.bias] + [(1, n) for n in s.other.values()]
        pbytes = run.weight_bytes
    else:
        trainable, pbytes = lora_tensors, run.lora_bytes
    states = [(c, state_bytes(n, pbytes, optimizer)) for c, n in trainable]
    temp = 0                                       # foreach AdamW: sqrt(exp_avg_sq) as one temporary
    if optimizer == "adamw":
        temp = sum(c * _r512(n * pbytes) for c, n in trainable)
    return {"grads": sum(c * _r512(n * pbytes) for c, n in trainable), "trainable": trainable,
            "on_device": sum(c * d for c, (d, _) in states), "paged": sum(c * p for c, (_, p) in states),
            "temporary": temp}


def _activations(run: _Run) -> dict:
    """Bytes saved for backward (``saved``), one layer recomputed under checkpointing, and parts."""
    s, a, N, blk = run.shape, run.act_bytes, run.N, run.shape.block
    kw = dict(full=run.full, lora=run.lora, a=a, q8=run.quant == 8, blk=blk, outliers=run.outliers,
              lora_impl=run.lora_impl, dropout=run.dropout, liger=run.liger)
    qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    layer = lambda g_in: _block_saved(N, run.B, run.S, s.hidden, qd, kvd, s.inter, s.heads, run.r, g_in=g_in,
                                      **kw)[0]
    pinned = _block_saved(N, run.B, run.S, s.hidden, qd, kvd, s.inter, s.heads, run.r, g_in=True, **kw)[1]
    first_g = run.full or (run.prepare_kbit and run.grad_ckpt)   # peft's input-grad hook: kbit + checkpointing
    rope = 2 * run.S * s.head_dim * a                             # cos / sin, shared by all layers
    final = {}
    _norm_saved(final, "final", True, kind=blk.norm, N=N, h=s.hidden, a=a, full=run.full, liger=run.liger)
    head = sum(final.values()) + (a * N * s.hidden if run.full else 0)   # final norm (+ lm_head input)
    vision = _vision_activations(run)
    masks = blk.masks * run.B * run.S * run.S * (run.weight_bytes if blk.attention == "eager" else 1)
    if run.grad_ckpt:        # the checkpointed layers keep their inputs, the kept layers everything
        keep = min(run.keep_layers, s.layers)
        inputs = 0 if run.offload else (s.layers - keep) * _r512(a * N * s.hidden)
        kept = 0 if run.offload else keep * layer(True)           # their pinned tensors included
        pins = (s.layers if run.offload else s.layers - keep) * pinned
        saved = inputs + kept + pins + head + rope + vision + masks
        # the top layers keep theirs: by the first recomputed layer, more than it needs has been freed
        recompute = layer(True) if not keep or run.offload else 0
    else:
        saved = layer(first_g) + (s.layers - 1) * layer(True) + head + rope + vision
        recompute = 0
        if run.offload:      # in CPU memory until the backward pass fetches each layer's back
            saved, recompute = head + rope + vision + s.layers * pinned, layer(True)
    return {"saved": saved, "recompute": recompute, "rope": rope, "one_layer": layer(True),
            "masks": masks if run.grad_ckpt else 0}


def _vision_activations(run: _Run) -> int:
    """What the vision tower keeps for backward when any of it trains (one image per sample)."""
    s, vis = run.shape, run.shape.vision
    if not vis or not (run.full or run.lora & {l.name for l in s.linears if l.part != "lm"}):
        return 0
    Nv = run.B * vis["tokens"]
    if run.grad_ckpt:
        return vis["layers"] * _r512(run.act_bytes * Nv * vis["hidden"])
    one = _block_saved(Nv, run.B, vis["tokens"], vis["hidden"], vis["hidden"], vis["hidden"], vis["inter"],
                       vis["heads"], run.r, full=run.full, lora=run.lora, a=run.act_bytes, g_in=True, q8=False,
                       blk=vis["names"])[0]
    return vis["layers"] * one


def _loss(run: _Run, loss_chunk: int | None) -> tuple[int, int, int]:
    """(bytes at the loss in the forward pass, in the backward pass, label tensors).

    Gemma-2's soft-capped logits (``cap * tanh(logits / cap)``) keep the tanh output, one more
    16-bit ``[tokens, vocab]`` copy, until the backward pass reaches them.
    """
    s, N, V, w = run.shape, run.N, run.shape.vocab, run.weight_bytes
    labels = 8 * N + (8 * N if run.full else 0)
    lm_b = run.act_bytes if run.quant else w
    cap = lm_b * N * V if s.block.logit_softcap else 0
    if loss_chunk is None:
        forward = (lm_b * N * V if lm_b == 2 else 0) + 4 * N * V + 4 * N * V + labels + cap
        backward = 12 * N * V + labels + cap       # log-softmax out + its grad in + grad out, all fp32
    else:                                          # one chunk: fp32 logits/softmax + its 16-bit copy;
        C = min(loss_chunk, N)                     # the labelled rows' hidden states and their gradient
        forward = 6 * C * V + 2 * w * N * s.hidden + labels
        backward = 2 * w * N * s.hidden + labels   # the stored gradient and its scaled copy
    return forward, backward, labels


def _temporaries(run: _Run) -> tuple[int, int, int]:
    """(a dequantised weight, one layer's backward buffers, the lm_head gradient of full training)."""
    s, a = run.shape, run.act_bytes
    big = max(l.fan_in * l.fan_out for l in s.linears if l.part == "lm")
    deq = 2 * big if run.quant and not run.dequant_cache else 0
    layer_tmp = run.N * s.inter * 2 * a + deq
    head_grad = _r512(s.vocab * s.hidden * run.weight_bytes) if run.full else 0
    return deq, layer_tmp, head_grad


def _params(run: _Run, lora_tensors, trainable) -> dict:
    s = run.shape
    n_quant = sum(l.count * l.fan_in * l.fan_out for l in s.linears if l.part == "lm") if run.quant else 0
    n_all = sum(l.count * (l.fan_in * l.fan_out + (l.fan_out if l.bias else 0)) for l in s.linears)
    return {"total": n_all + sum(s.other.values()), "quantized": n_quant,
            "lora": sum(c * n for c, n in lora_tensors), "trainable": sum(c * n for c, n in trainable)}


def estimate(config, method: str, *, batch_size: int, seq_len: int, lora_r: int = 8, targets="all-linear",
             grad_ckpt: bool = False, prepare_kbit: bool = False, optimizer: str = "adamw",
             dtype: str = "bf16", loss_chunk: int | None = None, attention: str | None = None,
             int8_outliers: float | None = None, lora_impl: str = "peft-fp32", lora_dropout: float = 0.0,
             keep_layers: int = 0, offload: bool = False, liger: bool = False, accumulate: bool = False,
             dequant_cache: bool = False, cpu_embeddings: bool = False) -> MemoryEstimate:
    """Predict peak ``torch.cuda.max_memory_allocated`` of steady-state training (see module doc).

    The peak is the largest of four phases: the forward pass at the loss, the backward pass at the
    loss, the backward pass through the top layer, and the optimizer step.
    ``loss_chunk``: ``None`` for ``model(**batch).loss`` (full ``[tokens, vocab]`` logits); a number of
    rows for a chunked loss (Liger's fused linear cross-entropy, ``ch03_sft.trainer.causal_lm_loss``: one
    chunk's logits at a time, plus the gradient with respect to the last hidden states it forms during the
    forward pass).
    ``attention``: ``"sdpa"`` or ``"eager"``; ``None`` for what the installed transformers picks.
    ``int8_outliers``: for ``qlora8``, the share (0 to 1) of each 8-bit layer's input columns that
    LLM.int8 copies in 16-bit; ``None`` for the shares random weights give (``int8_outlier_share``).
    ``lora_impl``: how the LoRA branch runs (``LORA_IMPLS``; ``lora_dropout`` > 0 adds its masks to the 16-bit
    ones). ``keep_layers``: with ``grad_ckpt``, decoder layers that keep their activations (selective
    checkpointing). ``offload``: the activations saved for backward wait in CPU memory (TRL's
    ``activation_offloading``), brought back a layer at a time. ``liger``: Liger's RMSNorm and SwiGLU keep less
    (with ``loss_chunk``, its fused linear cross-entropy: what the Trainer's ``use_liger_kernel`` turns on).
    ``accumulate``: more than one micro-batch a step (gradient accumulation), so from the second on the gradients
    of the earlier ones are held through the forward and backward passes. ``dequant_cache``: the fused LoRA path
    keeps a 16-bit copy of each frozen quantized weight it wraps (``ch03_sft.fused_lora``), dequantised once.
    ``cpu_embeddings``: the input embedding table in CPU memory (``common.models.embeddings_on_cpu``); a tied one stays.
    """
    _check(method, batch_size, seq_len, lora_r, prepare_kbit, optimizer, dtype, loss_chunk, lora_impl, keep_layers)
    s = model_shape(get_config(config) if isinstance(config, str) else config)
    if attention is not None:
        s = with_attention(s, attention)
    full, quant = method == "full", {"qlora4": 4, "qlora8": 8}.get(method)
    run = _Run(shape=s, full=full, quant=quant, lora=set() if full else resolve_targets(s, targets),
               r=0 if full else lora_r, weight_bytes=2, act_bytes=4 if prepare_kbit else 2, B=batch_size,
               S=seq_len + (s.vision["lm_tokens"] if s.vision else 0), grad_ckpt=grad_ckpt,
               prepare_kbit=prepare_kbit, lora_impl=lora_impl, dropout=lora_dropout > 0, keep_layers=keep_layers,
               offload=offload, liger=liger, accumulate=accumulate, dequant_cache=dequant_cache and bool(quant),
               cpu_embeddings=cpu_embeddings and not full)
    if quant == 8:
        run.outliers = int8_outlier_share(s, run.N) if int8_outliers is None else (float(int8_outliers),) * 2
    qbytes, unq, lora_w, lora_tensors = _weights(run)
    opt = _optimizer(run, lora_tensors, optimizer)
    act = _activations(run)
    loss_fwd, loss_bwd, labels = _loss(run, loss_chunk)
    deq, layer_tmp, head_grad = _temporaries(run)
    comp = lambda g, acts, lg, tmp: dict(zip(COMPONENTS, (qbytes, unq, lora_w, g, opt["on_device"], acts, lg,
                                                          tmp + CUBLAS_WORKSPACE)))
    held = opt["grads"] if accumulate else 0        # the earlier micro-batches' gradients
    phases = {"forward (at the loss)": comp(held, act["saved"], loss_fwd, deq),
              "backward (at the loss)": comp(held, act["saved"], loss_bwd, 0),
              "backward (top layer)": comp(held + head_grad, act["saved"] + act["recompute"], 0, layer_tmp),
              "optimizer step": comp(opt["grads"], 0, 0, max(opt["temporary"], head_grad if full and s.tied else 0))}
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=totals.get)
    outside = {"CUDA context": int(CONTEXT_GIB * GIB)} | (
        {"paged optimizer states": opt["paged"]} if opt["paged"] else {})
    inputs = _inputs(run, method=method, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer, dtype=dtype,
                     loss_chunk=loss_chunk, lora_dropout=lora_dropout)
    return MemoryEstimate(phases[peak], totals, peak, outside, _params(run, lora_tensors, opt["trainable"]),
                          inputs, _detail(run, act, opt, loss_chunk, labels, deq, layer_tmp))


def _detail(run: _Run, act: dict, opt: dict, loss_chunk, labels: int, deq: int, layer_tmp: int) -> dict:
    """``MemoryEstimate.detail``: the intermediate terms, in bytes."""
    s = run.shape
    kept = (4 + (run.act_bytes if run.quant else 2) * bool(s.block.logit_softcap)) * run.N * s.vocab
    return {"saved for backward": act["saved"] + (kept if loss_chunk is None else 0) + labels,
            "rope": act["rope"], "one layer saved": act["one_layer"], "recomputed layer": act["recompute"],
            "optimizer temporary": opt["temporary"], "dequantised weight": deq,
            "layer backward temporary": layer_tmp, "tokens": run.N, "masks": act["masks"],
            "logits block": 0 if run.prepare_kbit else 4 * min(run.N, loss_chunk or run.N) * s.vocab}


def _inputs(run: _Run, *, method, batch_size, seq_len, optimizer, dtype, loss_chunk, lora_dropout) -> dict:
    """What ``estimate`` was asked, as its record keeps it (the sft engine's levers only where used, so that
    earlier records read the same)."""
    inputs = dict(method=method, batch_size=batch_size, seq_len=seq_len, lm_tokens_per_sample=run.S, lora_r=run.r,
                  targets=sorted(run.lora), grad_ckpt=run.grad_ckpt, prepare_kbit=run.prepare_kbit,
                  optimizer=optimizer, dtype=dtype, loss_chunk=loss_chunk, attention=run.shape.block.attention,
                  int8_outliers=list(run.outliers) if run.quant == 8 else None)
    engine = dict(lora_impl=run.lora_impl, lora_dropout=lora_dropout, keep_layers=run.keep_layers,
                  offload=run.offload, liger=run.liger)
    flags = {k: True for k in ("accumulate", "dequant_cache", "cpu_embeddings") if getattr(run, k)}   # only when on
    return inputs | (engine if engine != {k: ENGINE_DEFAULTS[k] for k in engine} else {}) | flags


def liger_loss_chunk(tokens: int, vocab: int, hidden: int) -> int:
    """The rows of logits Liger's fused linear cross-entropy forms at a time: ``tokens`` split so that one chunk's
    logits hold about as many values as the hidden states (a power of two, at most ``tokens``).

        >>> liger_loss_chunk(4096, 152064, 3584), liger_loss_chunk(4096, 151936, 896)
        (128, 32)
    """
    chunk = -(-tokens // -(-vocab // hidden))
    return min(1 << (chunk - 1).bit_length(), tokens)


def largest(ok, limit: int) -> int:
    """The largest whole ``k <= limit`` with ``ok(k)``, for an ``ok`` that holds up to some edge and not past
    it (0 if ``ok(1)`` does not hold): doubling, then a bisection, so a few dozen calls at most."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def largest_fit(config, method: str, gpu_gib: float, *, vary: str, batch_size: int, seq_len: int,
                limit: int = 1 << 20, **kwargs) -> int:
    """The largest ``batch_size`` (``vary="batch_size"``) or ``seq_len`` (``vary="seq_len"``, in steps of
    128 tokens) at which ``estimate`` still ``fits`` a card of ``gpu_gib``, the other held; 0 if none does."""
    step = 128 if vary == "seq_len" else 1
    at = lambda k: {"batch_size": batch_size, "seq_len": seq_len, vary: k * step}
    return step * largest(lambda k: fits(estimate(config, method, **at(k), **kwargs), gpu_gib) == "fits",
                          limit // step)


ROPE_EXTENDS = ("linear", "dynamic", "yarn", "llama3")   # rope types whose ``factor`` stretches the positions


def position_limit(text_config) -> tuple[int | None, str]:
    """The longest sequence a language model takes, and where that number comes from: ``max_position_embeddings``,
    or, under a rope scaling that stretches it (``rope_parameters``/``rope_scaling`` with a ``factor``: a yarn
    config added to Qwen2.5's for 128K tokens), ``original_max_position_embeddings`` (else the former) times the
    factor when that is longer."""
    limit = getattr(text_config, "max_position_embeddings", None)
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if not limit or kind not in ROPE_EXTENDS or not isinstance(factor, (int, float)):
        return limit, "max_position_embeddings"
    original = int(rope.get("original_max_position_embeddings") or limit)
    if original * factor <= limit:       # llama3's: max_position_embeddings states the stretched length already
        return limit, "max_position_embeddings"
    return int(original * factor), f"{original} positions × its {kind} rope scaling factor {factor:g}"


def max_text_tokens(config, est: MemoryEstimate) -> int | None:
    """The longest ``seq_len`` the model has positions for (``position_limit``) less the image tokens of a sample
    (a VLM's); ``None`` when the config has no such field."""
    limit = position_limit(config.get_text_config())[0]
    return limit - (est.inputs["lm_tokens_per_sample"] - est.inputs["seq_len"]) if limit else None


def fit_report(est: MemoryEstimate, config, gpu_name: str, gpu_gib: float) -> dict:
    """The verdict on one card and the largest batch size and sequence length (up to the model's positions) that
    fit it."""
    method = est.inputs["method"]
    longest = max_text_tokens(config, est) or 1 << 20
    return {"gpu": gpu_name, "gpu_gib": gpu_gib, "device_gib": round(est.device_gib, 3),
            "verdict": VERDICT_TEXT[fits(est, gpu_gib)],
            "largest_batch_size": largest_fit(config, method, gpu_gib, vary="batch_size", **est.setting()),
            "largest_seq_len": largest_fit(config, method, gpu_gib, vary="seq_len", limit=longest,
                                           **est.setting())}


def configure_parser(parser) -> None:
    """Arguments of ``python -m qlora_helpers estimate``."""
    parser.add_argument("--model", required=True, metavar="CONFIG", help="preset name or path to a config.json")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--batch-size", required=True, type=int, metavar="B")
    parser.add_argument("--seq-len", required=True, type=int, metavar="S", help="text tokens per sample")
    parser.add_argument("--lora-r", type=int, default=8, metavar="R")
    parser.add_argument("--targets", default="all-linear", help="all-linear | attention | mlp | comma,separated,names")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (use_reentrant=False)")
    parser.add_argument("--prepare-kbit", action="store_true", help="peft's prepare_model_for_kbit_training")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    card = parser.add_mutually_exclusive_group()
    card.add_argument("--gpu", metavar="NAME", help="a card of the chapter-01 table, e.g. '4090' or 'RTX 3060 12GB'")
    card.add_argument("--gpu-gib", type=float, metavar="N", help="any card: its memory in GiB")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cli(args) -> int:
    if args.gpu_gib is not None and args.gpu_gib <= 0:
        raise ValueError(f"--gpu-gib must be a positive number of GiB, got {args.gpu_gib}")
    card = find_gpu(args.gpu) if args.gpu else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AssumedField)
        config = get_config(args.model)
    notes = [str(w.message) for w in caught if issubclass(w.category, AssumedField)]
    est = estimate(config, args.method, batch_size=args.batch_size, seq_len=args.seq_len,
                   lora_r=args.lora_r, targets=args.targets, grad_ckpt=args.grad_ckpt,
                   prepare_kbit=args.prepare_kbit, optimizer=args.optimizer, dtype=args.dtype)
    longest = max_text_tokens(config, est)
    if longest is not None and args.seq_len > longest:
        assumed = " (its config class's default: the file states none)" * any("max_position_embeddings" in n
                                                                               for n in notes)
        images = est.inputs["lm_tokens_per_sample"] - args.seq_len
        source = position_limit(config.get_text_config())[1]
        raise ValueError(f"--seq-len {args.seq_len}{f' + {images} image tokens' if images else ''} is beyond "
                         f"{args.model}'s {source}, {longest + images}{assumed}, the longest sequence "
                         f"the model takes: give --seq-len {longest} or less")
    for note in notes:     # what the estimate stands on that the file does not say, one line each
        print(f"note: {note}", file=sys.stderr)
    report = None
    if card or args.gpu_gib is not None:
        name, gib = (card.name, card.memory_gib) if card else (f"{args.gpu_gib:g} GiB card", args.gpu_gib)
        report = fit_report(est, config, name, gib)
    if args.json:
        print(json.dumps(est.as_dict() | ({"fit": report} if report else {})))
        return 0
    print(f"{args.model}, {args.method}, {args.batch_size} x {args.seq_len} tokens (estimate)")
    print(est.table())
    if report:
        r = report
        print(f"{r['gpu']}: {r['verdict']} (needs ~{r['device_gib']:.1f} of {r['gpu_gib']:g} GiB); largest batch "
              f"size that fits at {args.seq_len} tokens: {r['largest_batch_size']}; longest sequence that fits at "
              f"batch size {args.batch_size}: {r['largest_seq_len']} tokens")
    return 0
