"""AdaTAD's adapters, the seed's QLoRA adapter, a 4-bit backbone, and freezing that respects both.

``TemporalAdapter`` is AdaTAD's temporal-informative adapter (``plain=True``: without the temporal
convolution); ``QLoRAAdapter`` the seed's variant with frozen bitsandbytes projections and LoRA pairs beside
them; ``quantize_backbone`` the textbook QLoRA alternative (pretrained linears in NF4, adapters in full
precision). Notebook 02, section 4, writes out what each computes.

Example:
    >>> a = TemporalAdapter(64)
    >>> x = torch.randn(2 * 8, 4 * 16, 64)         # 2 videos x 8 chunks, 4 time x 16 space tokens
    >>> torch.equal(a(x, t=32, h=4, w=4), x)      # zero-initialised up_proj: identity at first
    True
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from torch import nn

from qlora_helpers.common.quant import keep_cpu_training_layout

BACKBONE_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def quantized_linear(in_features: int, out_features: int, bits: int, *, bias: bool = False,
                     quant_type: str = "fp4", compute_dtype=None) -> nn.Module:
    """An (as yet unquantized) bitsandbytes linear layer; it quantizes when moved to a device."""
    if bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, quant_type=quant_type,
                                  compute_dtype=compute_dtype)
        # bitsandbytes' CPU inference repacking would also fail here unless out_features % 32 == 0
        keep_cpu_training_layout(layer)
        return layer
    if bits == 8:  # has_fp16_weights=False: the weight really is int8 (bitsandbytes' default keeps it float)
        return bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=6.0)
    raise ValueError(f"quantize_bits={bits}: use 4 (Linear4bit) or 8 (Linear8bitLt)")


def _init_projections(down: nn.Module, up: nn.Module) -> None:
    """AdaTAD's initialisation: down ~ N(0, 0.02) truncated, up = 0 (so the adapter starts as the identity)."""
    with torch.no_grad():
        nn.init.trunc_normal_(down.weight, std=0.02)
        nn.init.zeros_(up.weight)
        for layer in (down, up):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class _TemporalMixer(nn.Module):
    """Depthwise temporal convolution (kernel 3) plus 1x1 convolution, over the whole video."""

    def __init__(self, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.dwconv = nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.conv = nn.Conv1d(hidden, hidden, 1)
        nn.init.normal_(self.dwconv.weight, std=math.sqrt(2.0 / kernel_size))
        nn.init.normal_(self.conv.weight, std=math.sqrt(2.0 / hidden))
        nn.init.zeros_(self.dwconv.bias)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """Same arithmetic as ``conv(dwconv(.))`` over time, computed channels-last (no transposes)."""
        n, tokens, c = x.shape                         # [videos*chunks, t_chunk*h*w, c]
        y = x.reshape(-1, t, h * w, c)                 # [videos, time, space, c]
        k = self.dwconv.kernel_size[0]
        padded = torch.nn.functional.pad(y, (0, 0, 0, 0, k // 2, k // 2))
        weight = self.dwconv.weight[:, 0, :].to(y.dtype)            # [c, k]
        mixed = sum(padded[:, i:i + t] * weight[:, i] for i in range(k)) + self.dwconv.bias.to(y.dtype)
        mixed = torch.nn.functional.linear(mixed, self.conv.weight[:, :, 0].to(y.dtype), self.conv.bias.to(y.dtype))
        return mixed.reshape(n, tokens, c)


class TemporalAdapter(nn.Module):
    """AdaTAD's temporal-informative adapter (TIA); ``plain=True`` drops the temporal convolution::

        x -> down_proj -> GELU -> (+ 1x1 conv(depthwise temporal conv over the whole video)) -> up_proj
          -> x + gamma * that

    ``up_proj`` starts at zero, so a fresh adapter is the identity and training starts from the pretrained model.
    """

    def __init__(self, embed_dims: int, mlp_ratio: float = 0.25, plain: bool = False):
        super().__init__()
        hidden = int(embed_dims * mlp_ratio)
        self.down_proj = nn.Linear(embed_dims, hidden)
        self.act = nn.GELU()
        self.temporal = None if plain else _TemporalMixer(hidden)
        self.up_proj = nn.Linear(hidden, embed_dims)
        self.gamma = nn.Parameter(torch.ones(1))
        _init_projections(self.down_proj, self.up_proj)

    def forward(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        y = self.act(self.down_proj(x))
        if self.temporal is not None:
            y = y + self.temporal(y, t, h, w)
        return x + self.gamma * self.up_proj(y)


def _lora_pair(in_features: int, out_features: int, r: int) -> tuple[nn.Linear, nn.Linear]:
    """LoRA's A (Kaiming-uniform) and B (zero): their product starts at zero."""
    a, b = nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


class QLoRAAdapter(nn.Module):
    """The seed's adapter: frozen quantized ``down_proj``/``up_proj`` (``Linear4bit``, bitsandbytes' default FP4
    as the seed's call leaves it, or ``Linear8bitLt``), trainable LoRA pairs beside them scaled by
    ``lora_alpha / lora_r`` (``down_lora_a/b``, ``up_lora_a/b``, the seed's names), the temporal convolution and
    ``gamma``. What is quantized is a *freshly initialised* projection (random down, zero up), not pretrained weights.
    """

    def __init__(self, embed_dims: int, mlp_ratio: float = 0.25, *, lora_r: int = 16, lora_alpha: float = 32,
                 lora_dropout: float = 0.1, quantize_bits: int = 4, use_plain_adapter: bool = False,
                 quant_type: str = "fp4"):
        super().__init__()
        hidden = int(embed_dims * mlp_ratio)
        self.quantize_bits, self.scaling = quantize_bits, lora_alpha / lora_r
        self.down_proj = quantized_linear(embed_dims, hidden, quantize_bits, quant_type=quant_type)
        self.up_proj = quantized_linear(hidden, embed_dims, quantize_bits, quant_type=quant_type)
        _init_projections(self.down_proj, self.up_proj)   # before quantization, which happens on .to(device)
        self.down_lora_a, self.down_lora_b = _lora_pair(embed_dims, hidden, lora_r)
        self.up_lora_a, self.up_lora_b = _lora_pair(hidden, embed_dims, lora_r)
        self.lora_dropout = nn.Dropout(lora_dropout)
        self.act = nn.GELU()
        self.temporal = None if use_plain_adapter else _TemporalMixer(hidden)
        self.gamma = nn.Parameter(torch.ones(1))

    def _frozen(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A frozen quantized projection. LLM.int8 quantizes fp16 inputs: an 8-bit layer gets them in fp16
        (bitsandbytes would cast them itself, and log a warning on every call)."""
        return layer(x.half() if self.quantize_bits == 8 else x).to(x.dtype)

    def forward(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        down = self.down_lora_b(self.down_lora_a(self.lora_dropout(x))) * self.scaling
        y = self.act(self._frozen(self.down_proj, x) + down)
        if self.temporal is not None:
            y = y + self.temporal(y, t, h, w)
        up = self.up_lora_b(self.up_lora_a(self.lora_dropout(y))) * self.scaling
        return x + self.gamma * (self._frozen(self.up_proj, y) + up)


# --------------------------------------------------------------------------- quantized backbone
def quantize_backbone(vit: nn.Module, bits: int = 4, *, quant_type: str = "nf4", compute_dtype=None) -> None:
    """Swap every block's qkv/proj/fc1/fc2 for a bitsandbytes layer holding the *same* (pretrained)
    weights; they quantize when the model is moved to a device. Adapters are left alone."""
    for block in vit.blocks:
        for path in BACKBONE_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            old = getattr(parent, name)
            new = quantized_linear(old.in_features, old.out_features, bits, bias=old.bias is not None,
                                   quant_type=quant_type, compute_dtype=compute_dtype)
            new.load_state_dict(old.state_dict())
            setattr(parent, name, new)


# --------------------------------------------------------------------------- freezing and reports
def is_quantized(param: torch.Tensor) -> bool:
    """A bitsandbytes weight (Params4bit / Int8Params) or any integer tensor: it can never get a gradient."""
    return type(param).__name__ in ("Params4bit", "Int8Params") or not (param.is_floating_point() or param.is_complex())


def freeze_for_adapters(model: nn.Module, train_names=("adapter", "lora")) -> None:
    """Freeze the backbone; train float parameters whose name holds one of ``train_names``, and the head.

    This is the rule seed 001 arrived at, written so that it cannot go wrong: quantized weights are
    recognised by their type or dtype (not by a layer name) and are never given ``requires_grad``
    (PyTorch refuses: only floating point tensors can require gradients).
    """
    for name, param in model.named_parameters():
        if not is_quantized(param):
            param.requires_grad_(not name.startswith("backbone.") or any(key in name for key in train_names))


def backbone_counts(backbone: nn.Module) -> dict:
    """Parameters of the ViT and of its adapters (all, and trainable), and how many are quantized.

    A quantized weight counts its logical, unpacked size, as OpenTAD's log line does.
    """
    counts = dict.fromkeys(("vit_params", "adapter_params", "adapter_trainable", "quantized_params",
                            "quantized_bytes"), 0)
    for name, p in backbone.named_parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = math.prod(shape) if shape is not None else p.numel()
        counts["adapter_params" if "adapter" in name else "vit_params"] += n
        counts["adapter_trainable"] += n if "adapter" in name and p.requires_grad else 0
        if is_quantized(p):
            counts["quantized_params"] += n
            counts["quantized_bytes"] += p.numel() * p.element_size()
    return counts


def parameter_report(model: nn.Module) -> dict:
    """The seed-001 counts (ViT vs adapter parameters) and what actually trains.

    ``adapter_ratio_pct`` is what OpenTAD prints (all adapter parameters, frozen quantized ones
    included, over the ViT's); ``trainable_backbone_ratio_pct`` is the trainable share.
    """
    c = backbone_counts(model.backbone)
    backbone_trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    return {**{k: c[k] for k in ("vit_params", "adapter_params", "adapter_trainable")},
            "adapter_ratio_pct": round(100 * c["adapter_params"] / c["vit_params"], 3),
            "backbone_trainable": backbone_trainable,
            "trainable_backbone_ratio_pct": round(100 * backbone_trainable / c["vit_params"], 3),
            "head_params": sum(p.numel() for p in model.head.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "quantized_params": c["quantized_params"], "quantized_bytes": c["quantized_bytes"],
            "quantized_requiring_grad": sum(1 for p in model.parameters() if is_quantized(p) and p.requires_grad)}
