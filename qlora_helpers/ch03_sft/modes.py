"""The four fine-tuning modes: which weights load how, and which of them train.

======== ======================================= ==================================================
mode     base weights                            trained
======== ======================================= ==================================================
full     fp32 (bf16 autocast when asked)         every weight
lora     frozen, fp32 on CPU / bf16 with bf16    LoRA matrices A, B beside the target layers
qlora-4  frozen NF4 (``Linear4bit``) via         the same LoRA matrices; the 4-bit weights are
         a 4-bit ``BitsAndBytesConfig``          dequantised on the fly and get no gradient
qlora-8  frozen int8 (``Linear8bitLt``)          the same LoRA matrices
======== ======================================= ==================================================

Quantised models are loaded the way the rest of the ecosystem does it:
``AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map={"": device})`` with
``bnb`` a ``BitsAndBytesConfig`` (``common.models.bnb_config`` builds it). On the CPU the ``device_map`` is
what makes bitsandbytes quantise the weights as they load. Then, by default, the base is frozen with its
embeddings, norms and lm_head left in the compute dtype; ``kbit_upcast=True`` calls peft's
``prepare_model_for_kbit_training`` instead, which upcasts them to fp32 (the seed guide's way; it costs memory
and speed for nothing, see ``benchmarks/results/throughput.json``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_helpers.ch03_sft.fast_kernels import use_varlen_attention
from qlora_helpers.ch03_sft.fused_lora import use_fused_lora
from qlora_helpers.common.assets import smollm2_path
from qlora_helpers.common.models import bnb_config, embeddings_on_cpu, enable_checkpointing

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}


def model_path(cfg) -> str:
    """``cfg.model_name_or_path`` or, when empty, the cached SmolLM2-135M-Instruct folder."""
    if cfg.model_name_or_path:
        return str(cfg.model_name_or_path)

    return str(smollm2_path())


def linear_layer_names(model) -> list[str]:
    """Short names of every linear layer (plain or bitsandbytes), ``lm_head`` excluded.

    This is what ``lora_target_modules: null`` trains: all of them.
    """

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in full:
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def target_names(spec) -> list[str] | None:
    """``lora_target_modules`` as module names: None for every linear layer (``None``, "auto", "null", ""), a
    preset's names ("attention", "mlp", "all"), else the names given (a list or "a,b,c")."""
    if spec is None or spec in ("auto", "null", ""):
        return None
    if isinstance(spec, str):
        return TARGET_PRESETS.get(spec) or [s.strip() for s in spec.split(",") if s.strip()]
    return list(spec)


def resolve_target_modules(spec, model) -> list[str]:
    """``target_names(spec)`` checked against ``model``'s linear layers (None: all of them)."""
    available = linear_layer_names(model)
    spec = target_names(spec)
    if spec is None:
        return available
    unknown = [s for s in spec if s not in available]
    if unknown:
        raise ValueError(f"lora_target_modules: {', '.join(unknown)} not found in {type(model).__name__}; "
                         f"its linear layers are {', '.join(available)} (or use attention, mlp, all, null)")
    return list(spec)


def wants_varlen(cfg) -> bool:
    """Varlen flash attention: asked for, or ``auto`` on packed bf16 rows (it falls back to SDPA elsewhere)."""
    attention = getattr(cfg, "attn_implementation", "auto")
    return attention == "varlen" or (attention == "auto" and getattr(cfg, "packing", False) and cfg.bf16 is True)


def compute_dtype(cfg):
    """bf16, fp16 or fp32 as ``cfg`` says (``bf16="auto"`` is decided by ``command.validate``: until then, no bf16)."""
    return torch.bfloat16 if cfg.bf16 is True else torch.float16 if cfg.fp16 else torch.float32


def bnb_quantization_config(cfg):
    """The ``BitsAndBytesConfig`` of a QLoRA mode (4-bit NF4 + double quantisation, or LLM.int8)."""

    return bnb_config("8bit" if cfg.quantization_bit == 8 else "4bit", compute_dtype(cfg),
                      quant_type=cfg.bnb_4bit_quant_type, double_quant=cfg.bnb_4bit_use_double_quant)


def load_tokenizer(path: str):
    """The model's tokenizer; a folder that does not exist, or a hub id that cannot be reached, is one line."""
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"model_name_or_path {path!r}: no model folder there (no config.json); give a folder "
                             "written by save_pretrained, or leave it empty for the cached SmolLM2")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"model_name_or_path {path!r}: cannot load a tokenizer ({str(err).splitlines()[0]}); "
                         "give a local model folder or a hub id this machine can reach") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg, device: str, *, quantization_bit: int | None = None, dtype=None):
    """The base model for ``cfg``'s mode on ``device`` (quantised when ``quantization_bit`` is 4 or 8)."""

    path = model_path(cfg)
    kwargs = {"dtype": dtype or torch.float32}
    if getattr(cfg, "attn_implementation", "auto") == "eager":
        kwargs["attn_implementation"] = "eager"
    if quantization_bit:
        kwargs.update(quantization_config=bnb_quantization_config(cfg), device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ValueError(f"model_name_or_path {path!r}: cannot load ({str(err).splitlines()[0]}); "
                         "give a local model folder or a hub id this machine can reach") from None
    if not quantization_bit:
        model.to(device)
    model.config.use_cache = False
    return model


def build_model(cfg, device: str):
    """Load and wrap the model for ``cfg.mode``: returns the model ready to train."""

    gc_kwargs = {"use_reentrant": False}
    if cfg.mode == "full":
        model = load_base(cfg, device, dtype=torch.float32)  # fp32 master weights; bf16/fp16 via autocast
    else:
        model = load_base(cfg, device, quantization_bit=(cfg.quantization_bit or 4) if cfg.use_qlora else None,
                          dtype=compute_dtype(cfg))
    model.requires_grad_(cfg.mode == "full")
    if getattr(cfg, "embeddings_on_cpu", False):
        embeddings_on_cpu(model, device)
    if cfg.use_qlora and cfg.kbit_upcast:   # the seed's way: frozen embeddings, norms and lm_head upcast to fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif cfg.gradient_checkpointing:        # else they stay frozen in the compute dtype
        enable_checkpointing(model)
        if cfg.mode == "lora":              # the input hook: QLoRA's non-reentrant checkpointing needs none
            model.enable_input_require_grads()
    model.checkpointing = keep_activations(model, getattr(cfg, "checkpoint_keep_layers", 0)) \
        if cfg.gradient_checkpointing else "off"
    # Liger's kernels come through the Trainer's use_liger_kernel; varlen attention is switched on here
    model.attention_kernel = use_varlen_attention(model) if wants_varlen(cfg) else "sdpa (not asked)"
    if cfg.mode == "full":
        return model
    targets = resolve_target_modules(cfg.lora_target_modules, model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.lora_kernel = use_fused_lora(model, dequantized=getattr(cfg, "keep_dequantized", False)) \
        if getattr(cfg, "fused_lora", False) is True else "peft"
    return model


def keep_activations(model, layers: int) -> str:
    """Selective checkpointing: the last ``layers`` decoder layers of a checkpointed ``model`` keep their
    activations (no second forward pass through them); returns how many of how many are checkpointed."""
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for block in blocks[max(0, len(blocks) - layers):] if layers else []:
        block.gradient_checkpointing = False
    return f"{len(blocks) - min(layers, len(blocks))} of {len(blocks)} layers"


@contextmanager
def trainable_4bit_layers(model):
    """Keep bitsandbytes' CPU inference shortcut off while a 4-bit model trains.

    On a CPU with AVX512-BF16, the first forward of a ``Linear4bit`` in eval mode without
    gradients repacks its weight for a fused bf16 kernel that has *no backward*; a model
    evaluated before training would then train with wrong gradients (torch only warns). Inside
    this block packed weights are unpacked and the shortcut is disabled; on exit it is
    restored, so generation afterwards is as fast as in a freshly loaded model. Merging an
    adapter into 4-bit layers (``merge_and_unload``) after an inference pass needs the same
    unpacking, or the merged weights are garbage.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        yield model
        return
    changed = []
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                         weight.quant_state)
            module.support_avx512bf16_for_cpu = False
            changed.append(module)
    try:
        yield model
    finally:
        for module in changed:
            module.support_avx512bf16_for_cpu = True
