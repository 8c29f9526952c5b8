"""What the memory of a decoder depends on, read from its ``config.json``.

``model_shape`` reads the fields every decoder has (hidden size, intermediate size, layers, attention
and key/value heads, ``head_dim``, vocabulary, tied embeddings) and the layout of one block, which
differs between families: module names (Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``, StarCoder2
has a plain ``c_fc`` / ``c_proj`` MLP), the norm (RMSNorm, Gemma's ``1 + weight`` RMSNorm, OLMo's
LayerNorm without weights, a LayerNorm with bias), Gemma-2's extra norms after attention and MLP, its
eager attention with soft-capped scores and its soft-capped logits, OLMo's clipped q/k/v, and the
attention masks that sliding-window layers need.

It does not guess: a field it cannot read, or one that changes the memory in a way it does not
model (mixture-of-experts layers, say), raises ``ArchitectureError`` naming that field.

Example:
    >>> from qlora_helpers.common.shapes import get_config
    >>> s = model_shape(get_config("phi-3-mini"))
    >>> [l.name for l in s.linears], s.block.gated
    (['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'], True)
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

# The block layouts known, by model_type. Keys not given take the Llama value.
LLAMA = dict(qkv=("q_proj", "k_proj", "v_proj"), o="o_proj", mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj",
             gated=True, norm="rms", post_norms=False, qkv_bias=False, attention="sdpa")
LAYOUTS = {
    "llama": {}, "mistral": {}, "granite": {},
    "qwen2": {"qkv_bias": True}, "qwen2_vl_text": {"qkv_bias": True},
    "gemma": {"norm": "gemma"},
    "gemma2": {"norm": "gemma", "post_norms": True},
    "phi3": {"qkv": ("qkv_proj",), "mlp_in": ("gate_up_proj",)},
    "olmo": {"norm": "layer_no_weight"},
    "starcoder2": {"mlp_in": ("c_fc",), "mlp_out": "c_proj", "gated": False, "norm": "layer"},
}
LLM_INT8_THRESHOLD = 6.0    # bitsandbytes: input columns holding a larger value run in 16-bit
# fields whose value changes the memory in ways not modelled: (field, value that is fine)
NOT_MODELLED = {"num_local_experts": (None, 0, 1), "num_experts": (None, 0, 1), "n_routed_experts": (None, 0),
                "moe_intermediate_size": (None, 0), "kv_lora_rank": (None,), "q_lora_rank": (None,)}
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class ArchitectureError(ValueError):
    """A config the estimator cannot model; the message is one line that names the field."""


@dataclass(frozen=True)
class Linear:
    name: str       # module name suffix, the one peft matches: "q_proj", "fc1", ...
    part: str       # "lm", "vision" or "projector"
    fan_in: int
    fan_out: int
    bias: bool
    count: int      # how many modules of this kind (usually = number of layers)


@dataclass(frozen=True)
class Block:
    """One decoder layer's layout: module names and the operations whose saved tensors differ by family."""
    qkv: tuple = LLAMA["qkv"]           # names of the modules reading the attention input (one if fused)
    o: str = "o_proj"
    mlp_in: tuple = LLAMA["mlp_in"]     # names of the modules reading the MLP input (one if fused or plain)
    mlp_out: str = "down_proj"
    gated: bool = True                  # act(gate) * up, or a plain act(fc1)
    norm: str = "rms"                   # rms | gemma (x * (1 + w), fp32) | layer (weight and bias) | layer_no_weight
    post_norms: bool = False            # Gemma-2: norms after attention and after the MLP too
    attention: str = "sdpa"             # sdpa | eager (keeps S x S scores)
    attn_softcap: float | None = None   # Gemma-2: tanh-capped scores (one more S x S copy, eager only)
    attn_softcap_field: float | None = None   # the config's value, whichever attention runs
    logit_softcap: float | None = None  # Gemma-2: tanh-capped logits (one more N x V copy)
    clip_qkv: float | None = None       # OLMo: q, k, v clamped in place
    masks: int = 0                      # distinct [B, 1, S, S] masks built per forward (eager or sliding window)


@dataclass(frozen=True)
class Shape:
    """What the memory depends on, read from a transformers config (see ``model_shape``)."""
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple             # Linear, lm_head excluded
    other: dict                # name -> parameter count (embeddings, norms, lm_head, vision extras)
    vision: dict | None = None  # hidden, inter, layers, heads, tokens (in the tower), lm_tokens (per image)
    block: Block = field(default_factory=Block)
    sliding_window: int | None = None
    sliding_layers: int = 0
    init_std: float = 0.02     # initializer_range: the scale of random weights


def _field(text, name: str, kind: str):
    """A required whole-number field of the text config, or ``ArchitectureError`` naming it."""
    value = getattr(text, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArchitectureError(f"config of model_type {kind!r}: cannot read field {name!r} (got {value!r}); "
                                "the estimator needs it as a whole number >= 1")
    return value


def _check_modelled(text, kind: str) -> dict:
    """The layout of ``kind``, after refusing fields that change memory in ways not modelled."""
    if kind not in LAYOUTS:
        raise ArchitectureError(f"field 'model_type' is {kind!r}, whose layer layout the estimator does not know; "
                                f"it reads {', '.join(sorted(LAYOUTS))} (and LLaVA / Qwen2-VL)")
    for name, fine in NOT_MODELLED.items():
        if getattr(text, name, None) not in fine:
            raise ArchitectureError(f"config of model_type {kind!r}: field {name!r} = {getattr(text, name)!r} "
                                    "(mixture-of-experts or low-rank attention) is not modelled by the estimator")
    return {**LLAMA, **LAYOUTS[kind]}


def _sliding(text) -> tuple[int | None, int]:
    """(window, number of sliding-window layers) from ``sliding_window`` and ``layer_types``."""
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None, 0
    types = getattr(text, "layer_types", None)
    n = text.num_hidden_layers if types is None else sum(t == "sliding_attention" for t in types)
    return window, n


@functools.cache
def default_attention(kind: str) -> str:
    """``"sdpa"``, or ``"eager"`` where the installed transformers has no SDPA path for ``kind`` (Gemma-2 in
    recent releases: SDPA cannot soft-cap the scores). Read from the modeling file's source rather than
    by importing it, which would import torch and slow the command line down by seconds."""
    try:
        spec = importlib.util.find_spec(f"transformers.models.{kind}.modeling_{kind}")
    except ModuleNotFoundError:        # a text config living inside another model's package (qwen2_vl_text)
        spec = None
    if spec is None or not spec.origin:
        return "sdpa"
    return "eager" if "_supports_sdpa = False" in Path(spec.origin).read_text() else "sdpa"


def with_attention(shape: Shape, attention: str) -> Shape:
    """``shape`` with its attention run by ``attention`` (``"sdpa"`` or ``"eager"``)."""
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"unknown attention {attention!r}: use sdpa or eager")
    eager, b = attention == "eager", shape.block
    masks = (1 + (0 < shape.sliding_layers < shape.layers)) if eager else int(shape.sliding_layers > 0)
    return replace(shape, block=replace(b, attention=attention, masks=masks,
                                        attn_softcap=b.attn_softcap_field if eager else None))


def _block(lay: dict, text) -> Block:
    """The layout's block, attention as ``with_attention`` then sets it."""
    return Block(qkv=lay["qkv"], o=lay["o"], mlp_in=lay["mlp_in"], mlp_out=lay["mlp_out"], gated=lay["gated"],
                 norm=lay["norm"], post_norms=lay["post_norms"],
                 attn_softcap_field=getattr(text, "attn_logit_softcapping", None),
                 logit_softcap=getattr(text, "final_logit_softcapping", None), clip_qkv=getattr(text, "clip_qkv", None))


def text_shape(text) -> Shape:
    """The decoder part of ``model_shape``: fields, block layout and parameter inventory of a text config."""
    kind = getattr(text, "model_type", None) or "?"
    lay = _check_modelled(text, kind)
    h, inter, n, heads, vocab = (_field(text, name, kind) for name in REQUIRED)
    kv = getattr(text, "num_key_value_heads", None) or heads
    d = getattr(text, "head_dim", None) or (h // heads if h % heads == 0 else None)
    if not isinstance(d, int) or heads % kv:
        bad = "head_dim" if not isinstance(d, int) else "num_key_value_heads"
        raise ArchitectureError(f"config of model_type {kind!r}: cannot read field {bad!r} "
                                f"(hidden_size {h}, {heads} heads, {kv} key/value heads)")
    shared = bool(getattr(text, "use_bias", False))
    att_bias = bool(getattr(text, "attention_bias", False)) or shared
    qkv_b, mlp_b = lay["qkv_bias"] or att_bias, bool(getattr(text, "mlp_bias", False)) or shared
    q_out, kv_out = heads * d, kv * d
    if len(lay["qkv"]) == 1:
        lin = [Linear(lay["qkv"][0], "lm", h, q_out + 2 * kv_out, qkv_b, n)]
    else:
        lin = [Linear(nm, "lm", h, w, qkv_b, n) for nm, w in zip(lay["qkv"], (q_out, kv_out, kv_out))]
    lin.append(Linear(lay["o"], "lm", q_out, h, att_bias, n))
    width = 2 * inter if lay["gated"] and len(lay["mlp_in"]) == 1 else inter
    lin += [Linear(nm, "lm", h, width, mlp_b, n) for nm in lay["mlp_in"]]
    lin.append(Linear(lay["mlp_out"], "lm", inter, h, mlp_b, n))
    tied = bool(getattr(text, "tie_word_embeddings", False))
    per_norm = {"rms": 1, "gemma": 1, "layer": 2, "layer_no_weight": 0}[lay["norm"]] * h
    other = {"embed_tokens": vocab * h, "norms": ((4 if lay["post_norms"] else 2) * n + 1) * per_norm}
    if not tied:
        other["lm_head"] = vocab * h
    window, n_sliding = _sliding(text)
    shape = Shape(h, inter, n, heads, kv, d, vocab, tied, tuple(lin), other, block=_block(lay, text),
                  sliding_window=window, sliding_layers=n_sliding, init_std=getattr(text, "initializer_range", 0.02))
    eager = (getattr(text, "_attn_implementation", None) or default_attention(kind)) == "eager"
    return with_attention(shape, "eager" if eager else "sdpa")


def int8_outlier_share(shape: Shape, tokens: int) -> tuple[float, float]:
    """Shares of input columns holding a value above LLM.int8's threshold, ``(normed inputs, MLP output
    projection's input)``, for random weights drawn with the config's ``initializer_range`` (as the
    course measures them).

    A normed input value is normal with unit variance (times 2 for Gemma's ``1 + weight`` norm with
    weights of one); each gate and up value is normal with variance ``hidden * (gain * std)**2``. A
    column is an outlier column when any of the ``tokens`` rows exceeds the threshold. Trained
    checkpoints differ: pass ``estimate(int8_outliers=...)`` (1.0 is the upper bound).

    Example:
        >>> from qlora_helpers.common.shapes import get_config
        >>> from qlora_helpers.ch01_memory.estimator import model_shape
        >>> [round(x, 3) for x in int8_outlier_share(model_shape(get_config("qwen2.5-0.5b")), 2048)]
        [0.0, 0.0]
    """
    gain = 2.0 if shape.block.norm == "gemma" else 1.0
    sigma = gain * shape.init_std * math.sqrt(shape.hidden)
    t = LLM_INT8_THRESHOLD
    tail = lambda z: math.erfc(z / math.sqrt(2))        # P(|x| > z) for a standard normal x
    if not shape.block.gated:
        p = tail(t / sigma) / 2
    else:                                                  # |act(g) * u| > t, integrated over g (act ~ silu)
        p, step = 0.0, 0.01
        for i in range(1, 1200):
            for x in (i * step * sigma, -i * step * sigma):
                act = abs(x / (1 + math.exp(-x)))
                density = math.exp(-(i * step) ** 2 / 2) / math.sqrt(2 * math.pi) * step
                p += density * tail(t / (act * sigma)) if act else 0.0
    column = lambda q: 1 - (1 - min(q, 1.0)) ** tokens
    return column(tail(t / gain)), column(p)
