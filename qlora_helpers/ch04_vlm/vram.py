"""Vision-language models, their GPU memory under a training config, and the plan for a card.

The estimate reuses the chapter-01 estimator (``qlora_helpers.ch01_memory.estimator.estimate``) for the language
model, which holds nearly all the weights and all the trained adapters, and adds what a VLM has
beside it:

- the image's tokens join the text: LLaVA-1.5 turns a 336-px image into (336/14)^2 = 576 tokens,
  Qwen2-VL merges 2 x 2 patches (144 tokens), InstructBLIP's Q-Former always hands over 32;
- the vision tower (and InstructBLIP's Q-Former) stays frozen and unquantised: its 16-bit weights
  count, its activations do not (nothing in it needs a gradient);
- the projector between the two is trained in full: weights, gradients and optimizer states;
- gradients of the adapters stay allocated between the micro-steps of gradient accumulation;
- ``double_quant=False`` stores the 4-bit block scales as fp32 instead of 8-bit codes;
- the loss: ``model(**batch).loss`` (``benchmarks/vlm_8gb.py``'s loop, chapter 04's hand-written step) builds the
  ``[tokens, vocab]`` logits in fp32; the ``vlm`` command never does: it trains through TRL's fused LM head,
  which multiplies only the labelled rows (the answer's tokens) by ``lm_head``, tile by tile. Its estimate
  passes ``loss_rows=ANSWER_TOKENS`` (the estimator's chunked loss). Counting full logits there put
  Qwen2-VL-7B (152,064-token vocabulary) 21 % over the command's measured peak.

The estimator's own LLaVA path assumes peft matches target names everywhere, so ``q_proj``
would also wrap the CLIP tower's attention; here LoRA stays in the language model (a regex
target, see ``model.lora_config``), hence the language model is estimated on its own.

Example:
    >>> from qlora_helpers.ch04_vlm.config import preset
    >>> est = estimate_vlm("llava-1.5-7b", preset("ultra_low_memory"))    # doctest: +SKIP
    >>> est.lm_tokens, est.verdicts[8]                                      # doctest: +SKIP
    (1088, 'fits')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

from accelerate import init_empty_weights
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

from qlora_helpers.ch01_memory.estimator import GIB, estimate, largest, model_shape, quantized_bytes, state_bytes
from qlora_helpers.ch01_memory.gpus import fits, needed_gib
from qlora_helpers.ch04_vlm.config import PRESET_NOTES, validate
from qlora_helpers.ch04_vlm.config import preset as get_preset
from qlora_helpers.common.shapes import get_config

CARDS_GB = (8, 12, 16, 24)
ANSWER_TOKENS = 64     # the vlm command's loss: the labelled rows it multiplies by lm_head (an answer's tokens)
GROUPS = {"model": ("quantized weights", "unquantized weights"), "adapter": ("LoRA weights",),
          "optimizer": ("optimizer states",), "gradients": ("gradients",),
          "activations": ("activations", "logits and loss", "temporary buffers")}


@dataclass(frozen=True)
class VLMSpec:
    key: str
    title: str
    checkpoint: str
    seed_gb: float     # what the seed's registry claims QLoRA needs
    note: str = ""


MODELS = {
    "qwen2-vl-7b": VLMSpec("qwen2-vl-7b", "Qwen2-VL-7B", "Qwen/Qwen2-VL-7B-Instruct", 6.0,
                           "stands in for Qwen-VL-Chat, whose remote code transformers does not ship"),
    "llava-1.5-7b": VLMSpec("llava-1.5-7b", "LLaVA-1.5-7B", "llava-hf/llava-1.5-7b-hf", 7.0),
    "instructblip-7b": VLMSpec("instructblip-7b", "InstructBLIP-7B", "Salesforce/instructblip-vicuna-7b", 7.0,
                               "Q-Former frozen with the tower; only its language projection is trained"),
    "llava-1.5-13b": VLMSpec("llava-1.5-13b", "LLaVA-1.5-13B", "llava-hf/llava-1.5-13b-hf", 12.0),
}


def model_config(key: str):
    """The transformers config of a registry model (real shape, from its ``config.json``; shared, do not edit), or
    of a model folder's ``config.json`` (read each time: a folder can be written again)."""
    if key not in MODELS and (Path(key) / "config.json").is_file():
        return AutoConfig.from_pretrained(key)
    return _registry_config(key)


@cache
def _registry_config(key: str):
    if key not in MODELS:
        raise ValueError(f"unknown model {key!r}: use one of {', '.join(MODELS)}")
    if key == "instructblip-7b":
        vicuna = dict(model_type="llama", vocab_size=32001, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                      max_position_embeddings=2048, tie_word_embeddings=False)
        return InstructBlipConfig(text_config=vicuna, num_query_tokens=32)   # ViT-g/14 at 224 px, 12-layer Q-Former
    return get_config(key)


def parameter_groups(key: str) -> dict:
    """Parameters of the language model, the frozen vision side and the trained projector, of a registry model
    (counted once) or a model folder.

    Counted on an empty (meta-device) model, so no memory is used.
    """
    return _registry_groups(key) if key in MODELS else _count_groups(model_config(key))


@cache
def _registry_groups(key: str) -> dict:
    return _count_groups(model_config(key))


def _count_groups(config) -> dict:
    blip = config.model_type == "instructblip"
    cls = InstructBlipForConditionalGeneration if blip else AutoModelForImageTextToText
    with init_empty_weights():
        model = (cls(config) if cls is InstructBlipForConditionalGeneration else cls.from_config(config))
    out = {"language": 0, "vision": 0, "projector": 0}
    for name, p in model.named_parameters():
        if "language_model" in name or name.startswith("lm_head"):
            out["language"] += p.numel()
        elif any(k in name for k in ("multi_modal_projector", "merger", "language_projection")):
            out["projector"] += p.numel()
        else:
            out["vision"] += p.numel()
    return out


def image_tokens(key: str, image_size: int) -> int:
    """Tokens one image adds to the language model's sequence at ``image_size`` pixels per side."""
    config = model_config(key)
    if config.model_type == "llava":
        return (image_size // config.vision_config.patch_size) ** 2          # CLS token dropped
    if config.model_type == "qwen2_vl":
        vc = config.vision_config
        return (image_size // vc.patch_size) ** 2 // vc.spatial_merge_size ** 2
    return config.num_query_tokens


METHOD = {"full": "full", "lora": "lora", "qlora": "qlora4"}     # a config's method -> the estimator's name


@dataclass
class VLMEstimate:
    """Predicted peak ``torch.cuda.max_memory_allocated`` of one training step, with its parts (bytes)."""
    model: str
    preset: str
    lm_tokens: int
    image_tokens: int
    components: dict
    outside: dict
    params: dict
    peak_phase: str
    inputs: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def groups_gib(self) -> dict:
        """The seed's five parts: model / adapter / optimizer / gradients / activations."""
        return {g: sum(self.components[c] for c in names) / GIB for g, names in GROUPS.items()}

    @property
    def verdicts(self) -> dict:
        """``fits`` on each of ``CARDS_GB``: the peak plus the allocator's slack and the CUDA context."""
        return {gb: fits(self.total_gib, gb) for gb in CARDS_GB}

    def needed_gib(self) -> float:
        return needed_gib(self.total_gib)

    def as_dict(self) -> dict:
        return {"model": self.model, "preset": self.preset, "total_gib": round(self.total_gib, 3),
                "needed_gib": round(self.needed_gib(), 3), "lm_tokens": self.lm_tokens,
                "image_tokens": self.image_tokens, "peak_phase": self.peak_phase,
                "groups_gib": {k: round(v, 3) for k, v in self.groups_gib().items()},
                "components_gib": {k: round(v / GIB, 3) for k, v in self.components.items()},
                "not_in_total_gib": {k: round(v / GIB, 3) for k, v in self.outside.items()},
                "params": dict(self.params), "verdicts": {f"{gb} GB": v for gb, v in self.verdicts.items()},
                "inputs": dict(self.inputs)}


def estimate_vlm(key: str, cfg, max_length: int | None = None, image_size: int | None = None,
                 gradient_accumulation_steps: int | None = None, *, loss_rows: int | None = None,
                 image_tokens_per_sample: int | None = None) -> VLMEstimate:
    """Predict the peak allocated memory of training registry model ``key`` (or a model folder) with config ``cfg``.

    ``max_length``, ``image_size`` and ``gradient_accumulation_steps`` override the config's;
    ``image_tokens_per_sample`` the image tokens ``image_size`` gives (what a run's processor made).
    ``loss_rows``: ``None`` for ``model(**batch).loss`` (full fp32 logits); a number of labelled rows for a
    loss that multiplies only those by ``lm_head`` (the ``vlm`` command's: ``ANSWER_TOKENS``).
    """
    text_len = max_length or cfg.data.max_length
    size = image_size or cfg.data.image_size
    accum = gradient_accumulation_steps or cfg.training.gradient_accumulation_steps
    n_img = image_tokens(key, size) if image_tokens_per_sample is None else image_tokens_per_sample
    text = model_config(key).get_text_config()
    method, q, hw, t = METHOD[cfg.method], cfg.quantization, cfg.hardware, cfg.training
    kbit = q.prepare_kbit and q.load_in_4bit
    est = estimate(text, method, batch_size=t.batch_size, seq_len=text_len + n_img, lora_r=cfg.lora.rank,
                   targets=",".join(cfg.lora.targets), grad_ckpt=hw.gradient_checkpointing,
                   prepare_kbit=kbit, optimizer=t.optimizer, dtype=hw.mixed_precision,
                   loss_chunk=min(loss_rows, text_len) if loss_rows else None)
    comp, outside, groups = dict(est.components), dict(est.outside), parameter_groups(key)
    w = 4 if kbit else 2                                          # prepare_kbit upcasts every 16-bit weight
    comp["unquantized weights"] += (groups["vision"] + groups["projector"]) * w
    if getattr(hw, "embeddings_on_cpu", False) and not getattr(text, "tie_word_embeddings", False):
        table = text.vocab_size * text.hidden_size * w                 # common.models.embeddings_on_cpu
        comp["unquantized weights"] -= table
        outside["input embeddings (CPU)"] = outside.get("input embeddings (CPU)", 0) + table
    if method == "qlora4" and not q.double_quant:                 # fp32 block scales instead of 8-bit codes
        comp["quantized weights"] += sum(
            l.count * (quantized_bytes(l.fan_in * l.fan_out, double_quant=False)
                       - quantized_bytes(l.fan_in * l.fan_out)) for l in model_shape(text).linears)
    proj = groups["projector"]                                    # trained in full: one tensor's states
    comp["gradients"] += proj * w
    dev, paged = state_bytes(proj, w, t.optimizer)
    comp["optimizer states"] += dev
    if paged:
        outside["paged optimizer states"] = outside.get("paged optimizer states", 0) + paged
    hidden_v = text.hidden_size                                   # projector keeps its input, hidden and output
    comp["activations"] += t.batch_size * n_img * 3 * hidden_v * w
    phase = est.peak_phase
    if accum > 1 and phase != "optimizer step":                   # adapter gradients live across micro-steps
        pbytes = 4 if method != "full" else 2
        comp["gradients"] += est.params["trainable"] * pbytes
    inputs = dict(est.inputs, seq_len=text_len, image_size=size, gradient_accumulation_steps=accum,
                  double_quant=q.double_quant, quant_type=q.quant_type, trained_projector=True)
    params = {**groups, "lora": est.params["lora"], "trainable": est.params["trainable"] + proj}
    return VLMEstimate(key, cfg.name, text_len + n_img, n_img, comp, outside, params, phase, inputs)


def plan(preset: str = "ultra_low_memory", model: str = "llava-1.5-7b", *, max_length: int | None = None,
         show: bool = True) -> VLMEstimate:
    """Print the VRAM plan of training ``model`` with ``preset`` and return the estimate."""
    cfg = get_preset(preset)
    est = estimate_vlm(model, cfg, max_length=max_length)
    p = est.params
    lines = [f"VRAM plan (estimate) - {MODELS[model].title}, preset {cfg.name}: {PRESET_NOTES[preset]}",
             f"  {cfg.summary()}",
             f"  sequence: {est.lm_tokens - est.image_tokens} text + {est.image_tokens} image tokens = "
             f"{est.lm_tokens} per sample",
             f"  parameters: language model {p['language'] / 1e9:.2f} B, vision side {p['vision'] / 1e6:.0f} M "
             f"(frozen, 16-bit), projector {p['projector'] / 1e6:.1f} M (trained), LoRA {p['lora'] / 1e6:.1f} M"]
    for name, gib in est.groups_gib().items():
        lines.append(f"  {name:<12}{gib:8.2f} GiB")
    lines.append(f"  {'total':<12}{est.total_gib:8.2f} GiB  peak allocated, at: {est.peak_phase}")
    for name, b in est.outside.items():
        lines.append(f"  + {name:<22}{b / GIB:6.2f} GiB (outside PyTorch's count)")
    lines.append(f"  a card needs ~{est.needed_gib():.1f} GiB (allocator slack + CUDA context)")
    lines.append("  " + "   ".join(f"{gb} GB: {v}" for gb, v in est.verdicts.items()))
    if show:
        print("\n".join(lines))
    return est


def longest_text_that_fits(key: str, cfg, gpu_gb: float, *, step: int = 128, limit: int = 16384) -> int:
    """The largest ``max_length`` (a multiple of ``step``, at most ``limit``) whose estimate ``fits`` the card;
    0 when not even ``step`` text tokens fit."""
    ok = lambda k: fits(estimate_vlm(key, cfg, max_length=k * step).total_gib, gpu_gb) == "fits"
    return step * largest(ok, limit // step)


def registry_table(preset: str = "ultra_low_memory", max_length: int | None = None) -> list[dict]:
    """One row per registry model: the seed's claim, the estimate, its five parts, the verdicts and the
    longest text (tokens, besides the image) that fits an 8 and a 12 GB card."""
    cfg = get_preset(preset)
    rows = []
    for key, spec in MODELS.items():
        est = estimate_vlm(key, cfg, max_length=max_length)
        longest = {f"{gb} GB": longest_text_that_fits(key, cfg, gb) for gb in (8, 12)}
        rows.append({"model": spec.title, "key": key, "seed_gb": spec.seed_gb, **est.as_dict(),
                     "longest_text_that_fits": longest, "note": spec.note})
    return rows


# The knobs of the 8 GB preset, each flipped on its own: name -> changes to the config
KNOBS = {
    "16-bit base (LoRA, no 4-bit)": dict(method="lora", quantization=dict(load_in_4bit=False)),
    "no gradient checkpointing": dict(hardware=dict(gradient_checkpointing=False)),
    "torch AdamW (32-bit states)": dict(training=dict(optimizer="adamw")),
    "no double quantisation": dict(quantization=dict(double_quant=False)),
    "prepare_model_for_kbit_training": dict(quantization=dict(prepare_kbit=True)),
    "rank 64 instead of 8": dict(lora=dict(rank=64, alpha=128)),
    "1024 text tokens instead of 512": dict(data=dict(max_length=1024)),
    "224-px images instead of 336": dict(data=dict(image_size=224)),
}


def with_changes(cfg, changes: dict):
    """``cfg`` with section fields replaced, e.g. ``{"lora": {"rank": 64}, "method": "lora"}``."""
    top = {}
    for key, value in changes.items():
        top[key] = replace(getattr(cfg, key), **value) if isinstance(value, dict) else value
    return validate(replace(cfg, **top))


def knob_table(model: str = "llava-1.5-7b", preset: str = "ultra_low_memory") -> list[dict]:
    """Estimated peak with each knob of ``KNOBS`` flipped from the preset, and the change."""
    base = estimate_vlm(model, get_preset(preset)).total_gib
    return [{"knob": "preset as is", "total_gib": round(base, 3), "delta_gib": 0.0}] + [
        {"knob": name, **_changed(model, preset, changes, base)} for name, changes in KNOBS.items()]


def _changed(model: str, preset: str, changes: dict, base: float) -> dict:
    """The estimate of ``model`` with ``preset`` changed: its peak, the change from ``base`` and its 8 GB verdict."""
    est = estimate_vlm(model, with_changes(get_preset(preset), changes))
    return {"total_gib": round(est.total_gib, 3), "delta_gib": round(est.total_gib - base, 3),
            "verdict_8gb": est.verdicts[8]}


# The seed's claims for LLaVA-1.5-7B: its QLoRA breakdown (GB) and, per method, model size and total (GB)
SEED_BREAKDOWN = {"model": 3.4, "adapter": 0.2, "optimizer": 0.04, "gradients": 0.02, "activations": 0.5}
SEED_METHODS = (("full", 13.5, 50.0), ("lora", 13.5, 35.0), ("qlora", 3.4, 7.0))


def method_table(model: str = "llava-1.5-7b", preset: str = "ultra_low_memory") -> list[dict]:
    """Full fine-tuning, LoRA and QLoRA of ``model``: the seed's totals beside two estimates, one with the
    preset's memory knobs and one plain (no gradient checkpointing, torch AdamW)."""
    cfg = get_preset(preset)
    plain = {"hardware": {"gradient_checkpointing": False}, "training": {"optimizer": "adamw"}}
    rows = []
    for method, seed_model, seed_total in SEED_METHODS:
        changes = {} if method == "qlora" else {"method": method, "quantization": {"load_in_4bit": False}}
        row = {"method": method, "seed_model_gb": seed_model, "seed_total_gb": seed_total}
        for name, extra in (("with_knobs", {}), ("plain", plain)):
            est = estimate_vlm(model, with_changes(cfg, {**changes, **extra}))
            row[name] = {"total_gib": round(est.total_gib, 2), "model_gib": round(est.groups_gib()["model"], 2),
                         "paged_gib": round(est.outside.get("paged optimizer states", 0) / GIB, 2),
                         "verdicts": {f"{gb} GB": v for gb, v in est.verdicts.items()}}
        rows.append(row)
    return rows


# The seed's GPU table: card, memory (GiB), bf16 support, its ratings for Qwen-VL and LLaVA-7B
SEED_GPUS = (
    ("RTX 3060 12GB", 12, True, "perfect", "perfect"),
    ("RTX 4060 8GB", 8, True, "good", "ok"),
    ("RTX 3060 Ti 8GB", 8, True, "good", "ok"),
    ("RTX 2060 Super 8GB", 8, False, "usable", "usable"),
    ("RTX 4060 Ti 16GB", 16, True, "perfect", "perfect"),
    ("GTX 1660 6GB", 6, False, "not recommended", "not recommended"),
    ("RTX 3050 4GB", 4, True, "too small", "too small"),
)


def gpu_table(preset: str = "ultra_low_memory", models=("qwen2-vl-7b", "llava-1.5-7b")) -> list[dict]:
    """The seed's GPU table recomputed: per card, the estimator's verdict for each model.

    Cards without bf16 (Turing, GTX 16xx) run the same plan in fp16: the same memory.
    """
    cfg = get_preset(preset)
    est = {m: estimate_vlm(m, cfg) for m in models}
    return [{"gpu": name, "memory_gib": mem, "precision": "bf16" if bf16 else "fp16 (no bf16)",
             "seed": {models[0]: seed_qwen, models[1]: seed_llava}, **{m: fits(est[m].total_gib, mem) for m in models}}
            for name, mem, bf16, seed_qwen, seed_llava in SEED_GPUS]


def model_facts(key: str, preset: str = "ultra_low_memory") -> dict:
    """The counts behind the chapter's sentences about a registry model, from its config (nothing is built).

    Parameters in all and by part, the vocabulary, whether input and output embeddings are tied,
    their bf16 size, the image tokens, the 16-bit weights a QLoRA run keeps (tower, projector,
    embeddings, ``lm_head``) and the size of one sample's ``[tokens, vocab]`` logits in fp32 under ``preset``
    (what ``model(**batch).loss`` builds, three times over at its peak; the ``vlm`` command's fused loss never).
    """
    groups = parameter_groups(key)
    text = model_config(key).get_text_config()
    tied = bool(getattr(text, "tie_word_embeddings", False))
    est = estimate_vlm(key, get_preset(preset))
    return {"params": sum(groups.values()), **groups, "vocab": text.vocab_size, "tied": tied,
            "embeddings_gib": text.vocab_size * text.hidden_size * (1 if tied else 2) * 2 / GIB,
            "image_tokens": est.image_tokens, "lm_tokens": est.lm_tokens,
            "unquantized_gib": est.components["unquantized weights"] / GIB,
            "logits_gib": 4 * est.lm_tokens * text.vocab_size / GIB}


def quantization_arithmetic(key: str = "llava-1.5-7b") -> dict:
    """Bytes of the language model's linear layers in bf16, in NF4, and in NF4 without double quantisation.

    Example (Llama-7B): 6.5 B weights, 12.1 GiB in bf16, 3.1 GiB in NF4 with double quantisation.
    """
    linears = [lin for lin in model_shape(model_config(key).get_text_config()).linears if lin.part == "lm"]
    n = sum(lin.fan_in * lin.fan_out * lin.count for lin in linears)
    nf4 = sum(lin.count * quantized_bytes(lin.fan_in * lin.fan_out) for lin in linears)
    plain = sum(lin.count * quantized_bytes(lin.fan_in * lin.fan_out, double_quant=False) for lin in linears)
    return {"weights": n, "bf16_gib": 2 * n / GIB, "nf4_gib": nf4 / GIB, "nf4_no_double_quant_gib": plain / GIB,
            "double_quant_saves_gib": (plain - nf4) / GIB, "double_quant_bits_per_weight": 8 * (plain - nf4) / n}


# The seed's answers to an out-of-memory error on 8 GB, and two of its don'ts: name -> (model, changes)
REMEDIES = {
    "the 8 GB preset as is": (None, {}),
    "seed: a smaller model (Qwen-VL)": ("qwen2-vl-7b", {}),
    "seed: 256 text tokens, not 512": (None, {"data": {"max_length": 256}}),
    "seed: LoRA rank 4, not 8": (None, {"lora": {"rank": 4, "alpha": 8}}),
    "seed: 224-px images, not 336": (None, {"data": {"image_size": 224}}),
    "don't: LoRA on a 16-bit base": (None, KNOBS["16-bit base (LoRA, no 4-bit)"]),
    "don't: gradient checkpointing off": (None, KNOBS["no gradient checkpointing"]),
}


def remedy_table(model: str = "llava-1.5-7b", preset: str = "ultra_low_memory") -> list[dict]:
    """Estimated peak of each of ``REMEDIES`` against the preset on ``model``, and its 8 GB verdict."""
    base = estimate_vlm(model, get_preset(preset)).total_gib
    return [{"remedy": name, "model": MODELS[other or model].title, **_changed(other or model, preset, changes, base)}
            for name, (other, changes) in REMEDIES.items()]
