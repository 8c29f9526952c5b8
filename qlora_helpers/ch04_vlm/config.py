"""Training configs for vision-language QLoRA: sections, validation, JSON, and three presets.

A config has five parts, each a small dataclass:

===============  ==========================================================================
section          knobs
===============  ==========================================================================
(top level)      ``method`` (full / lora / qlora), ``budget_gb`` the card it is meant for
lora             rank, alpha, dropout, targets (names of the language model's linear layers)
quantization     4-bit on/off, nf4 / fp4, double quantisation, compute dtype, prepare_kbit
data             max_length (text tokens; the image's tokens come on top), image_size (pixels)
hardware         gradient checkpointing, mixed precision (bf16 / fp16), input embeddings on the CPU
training         batch size, gradient accumulation, learning rates and their schedule, optimizer
===============  ==========================================================================

``validate`` raises a one-line ``ValueError`` naming the field and the fix; configs go to and
from JSON unchanged.

Example:
    >>> cfg = preset("ultra_low_memory")
    >>> cfg.budget_gb, cfg.method, cfg.lora.rank, cfg.quantization.quant_type
    (8, 'qlora', 8, 'nf4')
    >>> from_json(to_json(cfg)) == cfg
    True
    >>> validate(replace(cfg, lora=replace(cfg.lora, rank=0)))
    Traceback (most recent call last):
    ...
    ValueError: lora.rank must be a whole number >= 1, got 0: try 8 or 16
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from qlora_helpers.ch01_memory.estimator import DTYPES as PRECISIONS
from qlora_helpers.ch01_memory.estimator import OPTIMIZERS, TARGET_PRESETS
from qlora_helpers.common.device import cpu_compute_dtype
from qlora_helpers.common.files import atomic_write_text

METHODS = ("full", "lora", "qlora")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16")
LM_TARGETS = TARGET_PRESETS["attention"] + TARGET_PRESETS["mlp"]   # the language model's linear layers
PATCH = 14   # every registry model cuts images into 14 x 14 patches


@dataclass(frozen=True)
class LoRASettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple = LM_TARGETS     # linear layers of the language model only; the vision tower stays frozen


@dataclass(frozen=True)
class QuantizationSettings:
    load_in_4bit: bool = True
    quant_type: str = "nf4"          # nf4 suits normally distributed weights better than fp4
    double_quant: bool = True        # quantise the block scales too: ~0.4 bit per weight saved
    compute_dtype: str = "bfloat16"  # on the GPU, 4-bit weights are dequantised to this for each matmul;
    #                                  the CPU uses device.cpu_compute_dtype() instead (fp32 without native bf16)
    prepare_kbit: bool = False       # peft's prepare_model_for_kbit_training (upcasts norms, embeddings, tower)

    def torch_dtype(self, device: str):
        """``compute_dtype`` on a GPU; on the CPU, bf16 only where it is native (``device.cpu_compute_dtype``)."""
        return getattr(torch, self.compute_dtype) if str(device).startswith("cuda") else cpu_compute_dtype()


@dataclass(frozen=True)
class DataSettings:
    max_length: int = 512            # text tokens per sample; image tokens are added on top
    image_size: int = 336            # pixels per side; LLaVA-1.5: (336 / 14)^2 = 576 image tokens


@dataclass(frozen=True)
class HardwareSettings:
    gradient_checkpointing: bool = True
    mixed_precision: str = "bf16"    # fp16 on cards without bf16 (Turing RTX 20xx, T4, V100)
    # the frozen input embedding table in CPU memory, only the looked-up rows sent to the GPU: saves
    # vocab x hidden x 2 bytes of GPU memory (1.02 GiB for Qwen2-VL-7B) when it is not tied to lm_head,
    # same losses; costs that much CPU memory and one small host-to-device copy per forward pass
    embeddings_on_cpu: bool = False


@dataclass(frozen=True)
class TrainingSettings:
    batch_size: int = 1
    gradient_accumulation_steps: int = 32
    learning_rate: float = 2e-4      # LoRA adapters
    projector_learning_rate: float = 1e-3
    optimizer: str = "paged_adamw_8bit"
    # the schedule (trainer.schedule): rise over the first warmup_ratio of the steps (at least one, at its
    # full rate), then fall linearly to min_lr_ratio x at the last step (0 and 0: the Trainer's linear decay)
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class VLMTrainConfig:
    name: str = "custom"
    budget_gb: int = 8
    method: str = "qlora"
    lora: LoRASettings = field(default_factory=LoRASettings)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    data: DataSettings = field(default_factory=DataSettings)
    hardware: HardwareSettings = field(default_factory=HardwareSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    @property
    def effective_batch(self) -> int:
        return self.training.batch_size * self.training.gradient_accumulation_steps

    def summary(self) -> str:
        q = self.quantization
        quant = (f"4-bit {q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"
                 if q.load_in_4bit else "no quantisation")
        t = self.training
        return (f"{self.name} ({self.budget_gb} GB): {self.method}, LoRA r={self.lora.rank} alpha={self.lora.alpha}, "
                f"{quant}, {self.data.max_length} text tokens, {self.data.image_size}px images, "
                f"grad ckpt {'on' if self.hardware.gradient_checkpointing else 'off'}, "
                f"{self.hardware.mixed_precision}, "
                f"{'input embeddings on the CPU, ' if self.hardware.embeddings_on_cpu else ''}"
                f"batch {t.batch_size} x {t.gradient_accumulation_steps} accumulation, {t.optimizer}")


SECTIONS = {"lora": LoRASettings, "quantization": QuantizationSettings, "data": DataSettings,
            "hardware": HardwareSettings, "training": TrainingSettings}


def _whole(value, where: str, lo: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{where} must be a whole number >= {lo}, got {value!r}: {hint}")


def _one_of(value, allowed, where: str) -> None:
    if value not in allowed:
        raise ValueError(f"{where} must be one of {', '.join(allowed)}, got {value!r}")


def _flag(value, where: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")


def _number(value, where: str, ok, bounds: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{where} must be a number {bounds}, got {value!r}: {hint}")


def validate(cfg: VLMTrainConfig) -> VLMTrainConfig:
    """Check every field and the fields that must agree; return ``cfg`` or raise a one-line ValueError."""
    _one_of(cfg.method, METHODS, "method")
    _whole(cfg.budget_gb, "budget_gb", 1, "the card's memory in GB, e.g. 8, 12 or 24")
    lo, q, d, hw, t = cfg.lora, cfg.quantization, cfg.data, cfg.hardware, cfg.training
    if cfg.method != "full":
        _whole(lo.rank, "lora.rank", 1, "try 8 or 16")
        _number(lo.alpha, "lora.alpha", lambda v: v > 0, "> 0", "twice the rank is a common choice")
        _number(lo.dropout, "lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)", "0.05 is usual")
        targets = lo.targets
        if isinstance(targets, str) or not targets:
            raise ValueError(f"lora.targets must be a non-empty list of layer names, got {targets!r}: "
                             f"e.g. {list(LM_TARGETS[:4])}")
        bad = [n for n in targets if n not in LM_TARGETS]
        if bad:
            raise ValueError(f"lora.targets has unknown layer {bad[0]!r}: use names from {', '.join(LM_TARGETS)}")
    _flag(q.load_in_4bit, "quantization.load_in_4bit")
    _flag(q.double_quant, "quantization.double_quant")
    _flag(q.prepare_kbit, "quantization.prepare_kbit")
    _one_of(q.quant_type, QUANT_TYPES, "quantization.quant_type")
    _one_of(q.compute_dtype, COMPUTE_DTYPES, "quantization.compute_dtype")
    if cfg.method == "qlora" and not q.load_in_4bit:
        raise ValueError("method is 'qlora' but quantization.load_in_4bit is false: set it true, or use method 'lora'")
    if cfg.method != "qlora" and q.load_in_4bit:
        raise ValueError(f"quantization.load_in_4bit is true but method is {cfg.method!r}: "
                         "use method 'qlora', or set load_in_4bit false")
    if q.prepare_kbit and not q.load_in_4bit:
        raise ValueError("quantization.prepare_kbit applies to 4-bit models only: set it false, or use method 'qlora'")
    _whole(d.max_length, "data.max_length", 16, "512 fits an 8 GB card with the 8 GB preset")
    _whole(d.image_size, "data.image_size", PATCH, "336 (LLaVA-1.5) or 224")
    if d.image_size % PATCH:
        raise ValueError(f"data.image_size must be a multiple of the {PATCH}-pixel patch, got {d.image_size}: "
                         f"try {d.image_size // PATCH * PATCH or PATCH}")
    _flag(hw.gradient_checkpointing, "hardware.gradient_checkpointing")
    _flag(hw.embeddings_on_cpu, "hardware.embeddings_on_cpu")
    _one_of(hw.mixed_precision, PRECISIONS, "hardware.mixed_precision")
    if q.load_in_4bit and {"bf16": "bfloat16", "fp16": "float16"}[hw.mixed_precision] != q.compute_dtype:
        raise ValueError(f"quantization.compute_dtype {q.compute_dtype} does not match hardware.mixed_precision "
                         f"{hw.mixed_precision}: use bfloat16 with bf16, float16 with fp16")
    _whole(t.batch_size, "training.batch_size", 1, "1 on an 8 GB card")
    _whole(t.gradient_accumulation_steps, "training.gradient_accumulation_steps", 1,
           "raise it to keep the effective batch when batch_size is 1")
    for name in ("learning_rate", "projector_learning_rate"):
        _number(getattr(t, name), f"training.{name}", lambda v: 0 < v < 1, "in (0, 1)", "2e-4 is usual for LoRA")
    _one_of(t.optimizer, OPTIMIZERS, "training.optimizer")
    for name in ("warmup_ratio", "min_lr_ratio"):
        _number(getattr(t, name), f"training.{name}", lambda v: 0 <= v < 1, "in [0, 1)", "0.1 is usual")
    return cfg


def to_dict(cfg: VLMTrainConfig) -> dict:
    out = asdict(cfg)
    out["lora"]["targets"] = list(cfg.lora.targets)
    return out


def from_dict(values: dict, source: str = "config") -> VLMTrainConfig:
    """Build and validate a config; an unknown or misspelt key is an error naming ``source`` and the key."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
    top = {f.name for f in fields(VLMTrainConfig)}
    kwargs = {}
    for key, value in values.items():
        if key not in top:
            raise ValueError(f"{source}: unknown field {key!r}; known fields are {', '.join(sorted(top))}")
        if key in SECTIONS:
            cls = SECTIONS[key]
            known = {f.name for f in fields(cls)}
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key} must be an object with fields {', '.join(sorted(known))}")
            for sub in value:
                if sub not in known:
                    raise ValueError(f"{source}: unknown field {key}.{sub}; known fields are "
                                     f"{', '.join(sorted(known))}")
            value = dict(value)
            if key == "lora" and isinstance(value.get("targets"), list):
                value["targets"] = tuple(value["targets"])
            value = cls(**value)
        kwargs[key] = value
    cfg = VLMTrainConfig(**kwargs)
    try:
        return validate(cfg)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def to_json(cfg: VLMTrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2) + "\n"


def from_json(text: str, source: str = "config JSON") -> VLMTrainConfig:
    try:
        return from_dict(json.loads(text), source)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err.msg}, line {err.lineno}); fix that line") from None


def save(cfg: VLMTrainConfig, path: str | Path) -> Path:
    return atomic_write_text(path, to_json(validate(cfg)))


def load(path: str | Path) -> VLMTrainConfig:
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such config file")
    return from_json(Path(path).read_text(), str(path))


# name -> (budget in GB, what it trades, config)
PRESETS = {
    "ultra_low_memory": VLMTrainConfig(
        name="ultra_low_memory", budget_gb=8, method="qlora",
        lora=LoRASettings(rank=8, alpha=16),
        data=DataSettings(max_length=512, image_size=336),
        training=TrainingSettings(batch_size=1, gradient_accumulation_steps=32, optimizer="paged_adamw_8bit")),
    "balanced": VLMTrainConfig(
        name="balanced", budget_gb=12, method="qlora",
        lora=LoRASettings(rank=16, alpha=32),
        data=DataSettings(max_length=1024, image_size=336),
        training=TrainingSettings(batch_size=1, gradient_accumulation_steps=16, optimizer="paged_adamw_8bit")),
    "quality": VLMTrainConfig(
        name="quality", budget_gb=24, method="lora",
        lora=LoRASettings(rank=64, alpha=128),
        quantization=QuantizationSettings(load_in_4bit=False),
        data=DataSettings(max_length=2048, image_size=336),
        training=TrainingSettings(batch_size=1, gradient_accumulation_steps=16, optimizer="adamw_8bit")),
}
PRESET_NOTES = {
    "ultra_low_memory": "8 GB cards (RTX 4060 / 3060 Ti / 2060 Super): every memory knob on, rank 8, 512 text tokens",
    "balanced": "12 GB cards (RTX 3060 12GB): rank 16 and 1024 text tokens",
    "quality": "24 GB cards (RTX 3090 / 4090): 16-bit base weights (no quantisation error), rank 64, 2048 tokens",
}


def preset(name: str, **changes) -> VLMTrainConfig:
    """A preset by name, optionally with top-level fields or whole sections replaced, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return validate(replace(PRESETS[name], **changes))
