"""bitsandbytes on this device: which backend is loaded, and do 4-bit / 8-bit layers work?

``check_bnb`` quantises one random linear layer to NF4 (``Linear4bit``) and to LLM.int8
(``Linear8bitLt``), compares each output with the bf16 layer it came from, then trains a LoRA
adapter on top of the frozen quantised layer for a few steps: the gradient must reach the
adapter and never the quantised weight. That is QLoRA in one layer.

Example (on the CPU, numbers vary a little by backend):
    >>> rows = check_bnb("cpu", steps=2)                      # doctest: +SKIP
    >>> [(r["bits"], r["layer"], r["rel_error"] < 0.15) for r in rows]   # doctest: +SKIP
    [(4, 'Linear4bit', True), (8, 'Linear8bitLt', True)]
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes import cextension
from peft import LoraConfig, inject_adapter_in_model


def backend() -> dict:
    """The bitsandbytes version and the native library it loaded (CPU, CUDA, ...)."""
    lib = getattr(getattr(cextension.lib, "_lib", None), "_name", "") or ""
    return {"version": bnb.__version__, "backend": getattr(cextension, "BNB_BACKEND", "unknown"),
            "library": lib.rsplit("/", 1)[-1]}


def keep_cpu_training_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers touched.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` converts its weight, in place and for
    good, to a bf16 layout for a fast no-gradient kernel the first time it runs in eval mode without
    gradients. A model evaluated before training (every chapter does: loss before, train, loss after)
    would then train on bf16-rounded or misread weights: gradients ~0.3 % off, or a loss stuck near its
    start. Switching the shortcut off keeps the one layout training uses (evaluation is a little slower).
    ``modes.trainable_4bit_layers`` is the context-manager form that also undoes a conversion already made.
    Works on a whole model or on one layer; layers of other kinds are left alone.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _quantized(bits: int, reference, device: str):
    if bits == 4:
        layer = bnb.nn.Linear4bit(reference.in_features, reference.out_features, bias=True,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    elif bits == 8:
        layer = bnb.nn.Linear8bitLt(reference.in_features, reference.out_features, bias=True,
                                    has_fp16_weights=False, threshold=6.0)
    else:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    layer.load_state_dict(reference.state_dict())
    return layer.to(device)  # moving the layer is what quantises it


def check_bnb(device: str = "cpu", *, steps: int = 3, in_features: int = 256, out_features: int = 128,
              seed: int = 0) -> list[dict]:
    """Quantise a bf16 linear layer to 4 and 8 bits on ``device`` and train a LoRA adapter on it."""
    rows = []
    for bits in (4, 8):
        torch.manual_seed(seed)
        reference = torch.nn.Linear(in_features, out_features).to(torch.bfloat16)
        layer = _quantized(bits, reference, device)
        x = torch.randn(16, in_features, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            want = reference.to(device)(x).float()
            got = layer(x).float()
        rel_error = float((got - want).norm() / want.norm())

        model = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["layer"]),
                                        torch.nn.ModuleDict({"layer": layer}))
        adapter = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(adapter, lr=1e-2)
        target = torch.zeros_like(want)
        losses = []
        for _ in range(max(1, steps)):
            loss = torch.nn.functional.mse_loss(model["layer"](x).float(), target)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = float(sum(p.grad.float().norm() ** 2 for p in adapter) ** 0.5)
            optimizer.step()
            losses.append(loss.item())
        rows.append({"bits": bits, "layer": type(layer).__name__, "weight_dtype": str(layer.weight.dtype),
                     "weight_bytes": layer.weight.numel() * layer.weight.element_size(),
                     "bf16_bytes": reference.weight.numel() * 2, "rel_error": round(rel_error, 4),
                     "lora_params": sum(p.numel() for p in adapter), "lora_grad_norm": round(grad_norm, 4),
                     "quantized_weight_has_grad": layer.weight.grad is not None,
                     "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5)})
    return rows
