"""One autograd step for a frozen layer and its LoRA branch: the ``sft`` command's ``--fused_lora``.

peft computes a LoRA layer as autograd sees each piece of it::

    result = base_layer(x).clone()                    # 4-bit: dequantise W, x @ W.T, then a copy
    result = result + lora_B(lora_A(dropout(x))) * scaling

Each piece is its own kernel and keeps its own tensors for the backward pass: the copy, the product by
``scaling`` and the sum each read and write a ``[tokens, out]`` tensor, and the backward pass multiplies the
incoming gradient by ``scaling`` once more; with dropout each layer keeps its own dropped copy of the input (q, k and
v three copies of one input). ``LoRALinear`` does the same arithmetic in one ``torch.autograd.Function``: the
low-rank product is added into the base product by the matrix multiply itself (``addmm_`` with ``alpha=scaling``),
the input is kept once for all the layers that read it, with each layer's dropout mask (one byte a value), the
dropped copy is made again from them in the backward pass, and that pass is written out::

    y  = x @ W.T + s * (drop(x) @ A.T) @ B.T         h = drop(x) @ A.T   (saved: [tokens, r])
    dx = dy @ W + s * mask * ((dy @ B) @ A)           dequantise W again: nothing 16-bit is kept
    dB = s * dy.T @ h          dA = s * (dy @ B).T @ drop(x)

The random numbers are drawn exactly as peft draws them (one ``dropout`` call per layer, in the same
order), so a fused run and a peft run of the same seed drop the same values. It is what Unsloth's LoRA
kernels do without Triton, and it applies where the arithmetic is exactly peft's: one active LoRA adapter
(no DoRA or other variant, not merged, no per-sample adapters) on a frozen 4-bit ``Linear4bit`` or a plain
``Linear``, while gradients are being taken; everything else runs peft's own ``forward``.
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora import LoraLayer
from torch.nn import functional as F

try:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
except ImportError:      # the plain-Linear path works without bitsandbytes
    bnb = dequantize_4bit = None


def frozen_weight(base, dtype) -> torch.Tensor:
    """The base layer's weight as a ``[out, in]`` tensor of ``dtype`` (a 4-bit one dequantised, or its kept copy)."""
    copy = getattr(base, "_dequantized", None)
    if copy is not None and copy.dtype == dtype:
        return copy
    weight = base.weight
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        weight = dequantize_4bit(weight.data, weight.quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


class LoRALinear(torch.autograd.Function):
    """``y = base(x) + s * B(A(dropout(x)))`` with the base frozen, as one autograd node."""

    @staticmethod
    def forward(ctx, x, a, b, base, scaling: float, p: float, dtype):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        bias = base.bias if base.bias is None or base.bias.dtype == dtype else base.bias.to(dtype)
        y = F.linear(x2, frozen_weight(base, dtype), bias)
        xd, mask = torch.native_dropout(x2, p, True) if p > 0 else (x2, None)
        h = xd @ a.t()
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.base, ctx.scaling, ctx.p, ctx.x_dtype = base, scaling, p, x.dtype
        ctx.save_for_backward(x2, mask, h, a, b)       # the input, shared by the layers that read it (q, k, v)
        del xd                                         # the dropped copy goes: backward makes it again from the mask
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x2, mask, h, a, b = ctx.saved_tensors
        xd = x2 if mask is None else torch.ops.aten.native_dropout_backward(x2, mask, 1 / (1 - ctx.p))
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != xd.dtype:
            dy2 = dy2.to(xd.dtype)
        g = (dy2 @ b).mul_(ctx.scaling)                    # [tokens, r]: the gradient reaching A's output
        db = (dy2.t() @ h).mul_(ctx.scaling)
        da = g.t() @ xd
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ frozen_weight(ctx.base, xd.dtype)   # dequantised again: nothing 16-bit was kept
            if mask is None:
                dx.addmm_(g, a)
            else:                                          # through the dropout: the kept values, scaled
                dx.add_((g @ a).mul_(mask), alpha=1 / (1 - ctx.p))
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
            dx = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
        return dx, da, db, None, None, None, None


def frozen(base) -> bool:
    """Whether nothing of a base layer trains (a trained weight or bias takes its gradient through peft)."""
    return not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


def fusable(layer) -> bool:
    """Whether ``layer`` (a peft LoRA layer) computes exactly what ``LoRALinear`` does."""
    base = layer.get_base_layer()
    plain = type(base) is torch.nn.Linear and frozen(base)
    four_bit = bnb is not None and isinstance(base, bnb.nn.Linear4bit) and frozen(base)
    adapters = layer.active_adapters
    return ((plain or four_bit) and len(adapters) == 1 and adapters[0] in layer.lora_A
            and not getattr(layer, "lora_variant", {}) and not layer.use_dora.get(adapters[0], False)
            and type(layer.lora_A[adapters[0]]) is torch.nn.Linear and layer.lora_A[adapters[0]].bias is None
            and type(layer.lora_B[adapters[0]]) is torch.nn.Linear and layer.lora_B[adapters[0]].bias is None)


def compute_dtype(layer, x) -> torch.dtype | None:
    """The dtype peft's products would run in: autocast's, or else the base's and the adapter's when they agree
    (None: they differ, and only peft's own casts give its numbers)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    base = layer.get_base_layer()
    four_bit = bnb is not None and isinstance(base, bnb.nn.Linear4bit)
    dtype = (base.compute_dtype or x.dtype) if four_bit else base.weight.dtype
    adapter = layer.lora_A[layer.active_adapters[0]].weight.dtype
    return dtype if dtype == adapter == x.dtype else None


def _forward(self, x, *args, **kwargs):
    """A LoRA layer's forward: ``LoRALinear`` while gradients are taken through the adapter it was fused for, else
    peft's (``use_fused_lora`` checked the layer's kind once; what a user can switch is checked at every call)."""
    if (args or kwargs or self.disable_adapters or self.merged or not torch.is_grad_enabled()
            or self.active_adapters != self._fused_adapters or self.lora_variant or not frozen(self.base_layer)):
        return self._peft_forward(x, *args, **kwargs)
    dtype = compute_dtype(self, x)
    if dtype is None:
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if a.dtype != dtype:      # fp32 adapters under autocast: a 16-bit copy, as autocast makes (its gradient flows
        a, b = a.to(dtype), b.to(dtype)     # back to the fp32 weights through the cast)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return LoRALinear.apply(x, a, b, self.get_base_layer(), self.scaling[name], p, dtype)


def keep_dequantized(layers, on: bool) -> int:
    """Give each fused layer's frozen 4-bit weight a 16-bit copy (its compute dtype), dequantised now and used by
    every product after (``on=False``: drop the copies); returns how many layers hold one. Memory for speed: two
    bytes a weight beside its half byte, and no dequantisation in the forward or backward pass. The copy is a plain
    attribute, not a parameter or buffer: nothing saved or merged sees it."""
    held = 0
    for layer in layers:
        base = layer.get_base_layer()
        base._dequantized = None
        if on and bnb is not None and isinstance(base, bnb.nn.Linear4bit):
            with torch.no_grad():
                base._dequantized = frozen_weight(base, base.compute_dtype or torch.bfloat16)
            held += 1
    return held


def lora_layers(model) -> list:
    """Every peft LoRA layer of ``model`` that wraps a base layer."""
    return [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "get_base_layer")]


def release_dequantized(model) -> None:
    """Drop every 16-bit copy ``keep_dequantized`` made in ``model`` (after training: evaluation, generation and
    merging use peft's own layers)."""
    keep_dequantized(lora_layers(model), False)


def use_fused_lora(model, on: bool = True, dequantized: bool = False) -> str:
    """Route every fusable LoRA layer of a peft ``model`` through ``LoRALinear`` (``on=False``: back to peft's own
    forward); with ``dequantized``, each fused 4-bit layer keeps its weight's 16-bit copy (``keep_dequantized``);
    returns what it did."""
    layers = lora_layers(model)
    fused = [m for m in layers if fusable(m)] if on else []
    kept = keep_dequantized(layers, False) + keep_dequantized(fused, dequantized)
    for layer in layers:
        if getattr(vars(layer).get("forward"), "__func__", None) is _forward:   # an earlier call routed it here:
            if layer._before_fused is None:                                    # what was there before comes back
                del layer.forward
            else:
                layer.forward = layer._before_fused
        if layer in fused:                  # peft's forward, or what wraps it on this layer (a hook's wrapper)
            layer._before_fused = vars(layer).get("forward")
            layer._peft_forward = layer._before_fused or type(layer).forward.__get__(layer)
            layer._fused_adapters = list(layer.active_adapters)
            layer.forward = types.MethodType(_forward, layer)
    if not on:
        return "peft"
    if not fused:
        return "peft (no layer it fuses: 4-bit or plain base, one plain adapter)"
    return f"fused ({len(fused)} of {len(layers)} LoRA layers" + (f", {kept} weights kept 16-bit)" if kept else ")")
