"""Configs in the shape of the seed's OpenTAD files, their validation, the builder, and optimizer groups.

A config is a plain dict, as in OpenTAD::

    model = dict(
        backbone=dict(type="VisionTransformerQLoRA", embed_dims=64, depth=4, ...,
                      lora_r=8, lora_alpha=16, lora_dropout=0.1, quantize_bits=4, use_plain_adapter=False),
        head=dict(dims=64, levels=4))
    optimizer = dict(type="AdamW", lr=1e-4, weight_decay=0.05, paramwise=True,
                     backbone=dict(lr=0, weight_decay=0, custom=[dict(name="adapter", lr=2e-4, weight_decay=0.05),
                                                                 dict(name="lora", lr=2e-4, weight_decay=0.05)]))

Backbone types: ``VisionTransformer`` trains everything (full fine-tuning: give ``optimizer.backbone.lr`` > 0);
``VisionTransformerAdapter`` trains AdaTAD adapters, and with ``backbone_quantize_bits=4`` stores the frozen
backbone's linears in NF4 (the textbook QLoRA alternative); ``VisionTransformerQLoRA`` is the seed's: LoRA
pairs, temporal conv and gamma of quantized adapters train. Bad values are refused with one line that names
the field and the fix, e.g. ``model.backbone.quantize_bits=3: use 4 (Linear4bit) or 8 (Linear8bitLt)``.
"""

from __future__ import annotations

import copy
from functools import partial

from qlora_helpers.ch02_tad.adapters import QLoRAAdapter, TemporalAdapter, freeze_for_adapters, quantize_backbone
from qlora_helpers.ch02_tad.model import Detector, TADHead, VideoViT
from qlora_helpers.errors import did_you_mean

GEOMETRY = {"img_size": 32, "patch_size": 8, "in_chans": 1, "embed_dims": 64, "depth": 4, "num_heads": 4,
            "mlp_ratio": 4.0, "num_frames": 16, "tubelet_size": 2, "with_cp": False}
ADAPTER_KEYS = {"use_plain_adapter": False, "adapter_mlp_ratio": 0.25}
KEYS = {
    "VisionTransformer": {},
    "VisionTransformerAdapter": {**ADAPTER_KEYS, "backbone_quantize_bits": None, "backbone_quant_type": "nf4"},
    "VisionTransformerQLoRA": {**ADAPTER_KEYS, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1,
                               "quantize_bits": 4, "quant_type": "fp4"},
}
HEAD = {"dims": 64, "levels": 4, "regression_ranges": ((0, 4), (4, 8), (8, 16), (16, 10_000)), "center_radius": 1.5}
# ViT-S/16 as VideoMAE-S in the seed config (e2e_thumos_videomae_s_768x1_160_adapter_qlora): 768 frames, 160 px
VIDEOMAE_S = {"img_size": 160, "patch_size": 16, "in_chans": 3, "embed_dims": 384, "depth": 12, "num_heads": 6,
              "mlp_ratio": 4.0, "num_frames": 16, "tubelet_size": 2}
STRATEGIES = ("full_ft", "adapter", "seed_qlora", "qlora_backbone")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v, *, above: float | None = None, at_least: float | None = None, below: float = float("inf")) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v < below
    return ok and (above is None or v > above) and (at_least is None or v >= at_least)


RULES = {  # backbone field: (test of its value, the fix)
    **{key: (_positive_int, "must be a positive integer") for key in
       ("img_size", "patch_size", "in_chans", "embed_dims", "depth", "num_heads", "num_frames", "tubelet_size")},
    "with_cp": (lambda v: isinstance(v, bool), "use True or False"),
    "use_plain_adapter": (lambda v: isinstance(v, bool), "use False (with temporal conv) or True (plain adapter)"),
    "backbone_quantize_bits": (lambda v: v in (None, 4, 8), "use None (full precision), 4 (NF4) or 8 (LLM.int8)"),
    "backbone_quant_type": (lambda v: v in ("nf4", "fp4"), "use 'nf4' or 'fp4'"),
    "lora_r": (_positive_int, "must be a positive integer (the seed recommends 8-32)"),
    "lora_alpha": (partial(_number, above=0), "must be > 0 (usually 2 * lora_r)"),
    "lora_dropout": (partial(_number, at_least=0, below=1), "must be in [0, 1), e.g. 0.1"),
    "quantize_bits": (lambda v: v in (4, 8) and not isinstance(v, bool), "use 4 (Linear4bit) or 8 (Linear8bitLt)"),
    "quant_type": (lambda v: v in ("nf4", "fp4"), "use 'fp4' or 'nf4'"),
}


class ConfigError(ValueError):
    """A config field is wrong; the message names it and says what to use."""


def _check(ok: bool, field: str, value, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r}: {fix}")


def validate(cfg: dict) -> dict:
    """Return ``cfg`` with defaults filled in, or raise ``ConfigError`` naming the first bad field."""
    cfg = copy.deepcopy(cfg)
    backbone = cfg.get("model", {}).get("backbone")
    _check(isinstance(backbone, dict), "model.backbone", backbone, "give a dict with a 'type'")
    kind = backbone.get("type")
    _check(kind in KEYS, "model.backbone.type", kind, f"use one of {', '.join(KEYS)}")
    allowed = {**GEOMETRY, **KEYS[kind]}
    for key in backbone:
        if key != "type" and key not in allowed:
            hint = did_you_mean(key, allowed, f"{kind} takes {', '.join(sorted(allowed))}", quote="'")
            raise ConfigError(f"model.backbone.{key}: not a key of {kind}; {hint}")
    b = cfg["model"]["backbone"] = {"type": kind, **allowed, **backbone}
    for key, (test, fix) in RULES.items():
        if key in b:
            _check(test(b[key]), f"model.backbone.{key}", b[key], fix)
    _check(b["embed_dims"] % b["num_heads"] == 0, "model.backbone.num_heads", b["num_heads"],
           f"must divide embed_dims={b['embed_dims']}")
    _check(b["img_size"] % b["patch_size"] == 0, "model.backbone.img_size", b["img_size"],
           f"must be a multiple of patch_size={b['patch_size']}")
    if kind != "VisionTransformer":
        hidden = int(b["embed_dims"] * b["adapter_mlp_ratio"])
        _check(hidden >= 1, "model.backbone.adapter_mlp_ratio", b["adapter_mlp_ratio"],
               "gives no hidden units; use 0.25")
        # a pair's update x A B has rank <= the adapter's hidden size: a larger r only adds parameters;
        # twice that is allowed, so that the seed's advice "16 -> 32" can be tried on the small ViT (hidden 16)
        _check(b.get("lora_r", 0) <= 2 * hidden, "model.backbone.lora_r", b.get("lora_r"),
               f"is above twice the adapter's hidden size {hidden}: use at most {2 * hidden}")
    cfg["model"]["head"] = {**HEAD, **cfg["model"].get("head", {})}
    _validate_optimizer(cfg.setdefault("optimizer", {}), kind)
    return cfg


def _validate_optimizer(opt: dict, kind: str) -> None:
    """Fill the optimizer's defaults; every lr must be a number >= 0, and full fine-tuning needs a backbone lr."""
    _check(opt.setdefault("type", "AdamW") == "AdamW", "optimizer.type", opt["type"], "only 'AdamW' is supported")
    opt.setdefault("lr", 1e-4)
    opt.setdefault("weight_decay", 0.05)
    bb = opt.setdefault("backbone", {"lr": 0, "weight_decay": 0, "custom": []})
    bb.setdefault("lr", 0)
    custom = bb.setdefault("custom", [])
    for i, group in enumerate(custom):
        _check(isinstance(group, dict) and isinstance(group.get("name"), str) and group["name"],
               f"optimizer.backbone.custom[{i}]", group, "give dict(name=..., lr=..., weight_decay=...)")
    fields = [("optimizer.lr", opt["lr"]), ("optimizer.weight_decay", opt["weight_decay"]),
              ("optimizer.backbone.lr", bb["lr"])] + [(f"optimizer.backbone.custom[{i}].lr", g.get("lr"))
                                                      for i, g in enumerate(custom)]
    for field, value in fields:
        _check(_number(value, at_least=0), field, value, "must be >= 0")
    if kind == "VisionTransformer":
        _check(bb["lr"] > 0, "optimizer.backbone.lr", bb["lr"],
               "full fine-tuning (type='VisionTransformer') needs a backbone lr > 0, e.g. 1e-4")


def strategy_config(strategy: str, geometry: dict | None = None, *, lr: float = 1e-4, adapter_lr: float = 2e-4,
                    lora_r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.1, quantize_bits: int = 4,
                    use_plain_adapter: bool = False, head: dict | None = None) -> dict:
    """The config of one of the four compared strategies, in the seed's shape.

    ``full_ft`` | ``adapter`` | ``seed_qlora`` | ``qlora_backbone`` (NF4 backbone + full-precision adapter).
    """
    custom = [dict(name="adapter", lr=adapter_lr, weight_decay=0.05)]
    if strategy == "full_ft":
        backbone, bb_opt = {"type": "VisionTransformer"}, dict(lr=lr, weight_decay=0.05, custom=[])
    elif strategy in ("adapter", "qlora_backbone"):
        backbone = {"type": "VisionTransformerAdapter", "use_plain_adapter": use_plain_adapter}
        if strategy == "qlora_backbone":
            backbone["backbone_quantize_bits"] = 4
        bb_opt = dict(lr=0, weight_decay=0, custom=custom)
    elif strategy == "seed_qlora":
        backbone = {"type": "VisionTransformerQLoRA", "lora_r": lora_r, "lora_alpha": lora_alpha,
                    "lora_dropout": lora_dropout, "quantize_bits": quantize_bits,
                    "use_plain_adapter": use_plain_adapter}
        bb_opt = dict(lr=0, weight_decay=0, custom=custom + [dict(name="lora", lr=adapter_lr, weight_decay=0.05)])
    else:
        raise ConfigError(f"strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
    cfg = {"model": {"backbone": {**backbone, **GEOMETRY, **(geometry or {})}, "head": {**HEAD, **(head or {})}},
           "optimizer": {"type": "AdamW", "lr": lr, "weight_decay": 0.05, "paramwise": True, "backbone": bb_opt}}
    return validate(cfg)


def build_backbone(bcfg: dict, pretrained: dict | None = None, compute_dtype=None):
    """The ViT of a validated backbone config, pretrained weights loaded before anything is quantized."""
    adapter = None
    if bcfg["type"] == "VisionTransformerAdapter":
        adapter = partial(TemporalAdapter, mlp_ratio=bcfg["adapter_mlp_ratio"], plain=bcfg["use_plain_adapter"])
    elif bcfg["type"] == "VisionTransformerQLoRA":
        adapter = partial(QLoRAAdapter, mlp_ratio=bcfg["adapter_mlp_ratio"], **{k: bcfg[k] for k in (
            "lora_r", "lora_alpha", "lora_dropout", "quantize_bits", "use_plain_adapter", "quant_type")})
    vit = VideoViT(**{k: bcfg[k] for k in GEOMETRY}, adapter=adapter)
    if pretrained is not None:
        missing, unexpected = vit.load_state_dict(pretrained, strict=False)
        bad = [k for k in missing if "adapter" not in k] + list(unexpected)
        if bad:
            raise ConfigError(f"pretrained weights do not fit this backbone (first mismatch: {bad[0]}): "
                              "pre-train with the same geometry")
    if bcfg.get("backbone_quantize_bits"):
        quantize_backbone(vit, bcfg["backbone_quantize_bits"], quant_type=bcfg["backbone_quant_type"],
                          compute_dtype=compute_dtype)
    return vit


def build_model(cfg: dict, num_classes: int, *, pretrained: dict | None = None, device: str = "cpu",
                compute_dtype=None):
    """Validated config -> ``Detector`` on ``device`` (moving it there quantizes), frozen as its type says."""
    cfg = validate(cfg)
    bcfg = cfg["model"]["backbone"]
    head = TADHead(bcfg["embed_dims"], num_classes, **cfg["model"]["head"])
    model = Detector(build_backbone(bcfg, pretrained, compute_dtype), head).to(device)
    if bcfg["type"] != "VisionTransformer":
        freeze_for_adapters(model)
    return model


def param_groups(model, opt_cfg: dict) -> list[dict]:
    """OpenTAD-style paramwise groups: ``head`` (base lr), ``backbone`` (backbone lr) and one per custom name.

    A backbone parameter joins the custom group whose name appears *last* in its dotted name, so
    ``blocks.0.adapter.down_lora_a.weight`` is ``lora`` and ``blocks.0.adapter.dwconv.weight`` is
    ``adapter``. Frozen parameters join no group; a trainable one that would get lr 0 is an error.
    """
    bb = opt_cfg["backbone"]
    groups = {name: {"name": name, "lr": g["lr"], "weight_decay": g.get("weight_decay", 0), "params": []}
              for name, g in [("head", opt_cfg), ("backbone", bb)] + [(c["name"], c) for c in bb["custom"]]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hits = [(name.rfind(c["name"]), c["name"]) for c in bb["custom"] if c["name"] in name]
        key = "head" if not name.startswith("backbone.") else max(hits)[1] if hits else "backbone"
        if groups[key]["lr"] == 0:
            raise ConfigError(f"{name} trains but its optimizer group '{key}' has lr 0: "
                              "freeze it or give the group an lr")
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]
