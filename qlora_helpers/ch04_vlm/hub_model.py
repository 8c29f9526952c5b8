"""Any image-text-to-text model the auto classes load, in 4-bit, with LoRA on its language model.

The recipe, in the library calls a learner would write::

    bnb = bnb_config("4bit", torch.bfloat16, skip_modules=KEEP_16BIT)   # BitsAndBytesConfig: NF4, double quant
    model = AutoModelForImageTextToText.from_pretrained(model_id, quantization_config=bnb, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=language_model_targets(...)))

``KEEP_16BIT`` names the vision tower and projector of LLaVA (``vision_tower``,
``multi_modal_projector``), Qwen2-VL / Qwen2.5-VL (``visual``, its ``merger`` inside) and
Idefics3 / SmolVLM (``vision_model``, ``connector``): they stay in the 16-bit compute dtype
(fp32 or bf16 on the CPU, see ``device.cpu_compute_dtype``), frozen; only the language model's
linear layers become NF4. The projector trains too when asked (peft's ``modules_to_save``, so
it is saved with the adapter), in fp32 like the adapters.
"""

from __future__ import annotations

import types
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

from qlora_helpers.common.models import VISION_PARTS
from qlora_helpers.common.models import bnb_config as common_bnb_config
from qlora_helpers.common.quant import keep_cpu_training_layout

# transformers 5.2x matches these from the start of a module's name (so ".*visual"); earlier 5.x as substrings
KEEP_16BIT = ["lm_head", *VISION_PARTS, *(f".*{name}" for name in VISION_PARTS)]
PROJECTORS = ("multi_modal_projector", "merger", "connector")
LANGUAGE_MODELS = ("language_model", "text_model")


def bnb_config(quantization, dtype) -> BitsAndBytesConfig:
    """NF4 (or FP4) with double quantisation for the language model; tower, projector and lm_head left out."""
    return common_bnb_config("4bit", dtype, double_quant=quantization.double_quant,
                             quant_type=quantization.quant_type, skip_modules=KEEP_16BIT)


def load_vlm(model_id: str, *, quantization, dtype, device: str):
    """``from_pretrained`` in 4-bit when ``quantization.load_in_4bit``, else in ``dtype``; frozen, train mode."""
    kwargs = {"dtype": dtype, "device_map": {"": device}}
    if quantization.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"model_id {model_id!r}: cannot load an image-text-to-text model "
                         f"({str(err).strip().splitlines()[0][:160]}); give a model folder or a hub id") from None
    keep_cpu_training_layout(model)      # bitsandbytes' CPU inference repacking has no backward
    model.requires_grad_(False)
    model.config.use_cache = False
    model.train()
    return model


def embeddings_on_cpu(model, device: str):
    """Keep ``model``'s frozen input embedding table in CPU memory; its looked-up rows go to ``device``.

    The token ids are sent to the CPU for the look-up (a forward pre-hook) and the ``[tokens, hidden]``
    rows come back to ``device`` (a forward hook), so every layer after the table sees what it saw
    before: same losses, same gradients for the adapters. It frees ``vocab x hidden`` 16-bit values of
    ``device`` memory (1.02 GiB for Qwen2-VL-7B's 152,064 x 3,584), for as much CPU memory and one small
    copy per forward pass. A table tied to ``lm_head`` gets its own CPU copy: ``lm_head`` keeps the one
    on ``device``, so nothing is freed there (Qwen2-VL-2B, SmolVLM); the option helps untied models.
    """
    table = model.get_input_embeddings()
    if not isinstance(table, torch.nn.Embedding):
        raise ValueError(f"hardware.embeddings_on_cpu: {type(model).__name__}'s input embeddings are a "
                         f"{type(table).__name__}, not a plain table; set it false")
    table.weight = torch.nn.Parameter(table.weight.detach().to("cpu"), requires_grad=False)
    table.register_forward_pre_hook(lambda module, args: tuple(a.to(module.weight.device) if torch.is_tensor(a)
                                                               else a for a in args))
    table.register_forward_hook(lambda module, args, output: output.to(device))
    # the Trainer (through accelerate) moves a model on one device with .to(device): this table stays on the CPU
    table._apply = types.MethodType(lambda module, fn, recurse=True: module, table)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model


def takes_images(model_id: str) -> bool:
    """Whether ``model_id``'s config has a vision part (what the ``vlm`` command trains); ``False`` if unreadable."""
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError):
        return False
    return getattr(config, "vision_config", None) is not None


def projector_name(model) -> str | None:
    """The short name of the module that maps image features into the language model, if there is one."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return next((p for p in PROJECTORS if p in names), None)


def language_model_targets(model, targets) -> str:
    """A peft ``target_modules`` regex: ``targets`` (q_proj, ...) inside the language model only."""
    return rf".*({'|'.join(LANGUAGE_MODELS)})\..*\.({'|'.join(targets)})$"


def add_lora(model, lora, *, train_projector: bool = False, gradient_checkpointing: bool = True):
    """Wrap ``model`` with LoRA on its language model (and a trainable projector on request), in train mode."""
    modules_to_save = None
    if train_projector:
        name = projector_name(model)
        if name is None:
            raise ValueError(f"train_projector: {type(model).__name__} has none of {', '.join(PROJECTORS)}; "
                             "drop --train_projector")
        modules_to_save = [name]
    if gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):   # its name since 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=language_model_targets(model, lora.targets), modules_to_save=modules_to_save)
    with warnings.catch_warnings():   # peft reads transformers' deprecated ``is_gradient_checkpointing``
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(model, config)
    for name, module in model.named_modules():
        if modules_to_save and name.endswith(f"{modules_to_save[0]}.modules_to_save.default"):
            train_in_fp32(module)
    model.train()
    return model


def train_in_fp32(module) -> None:
    """Keep a trained 16-bit module (the projector) in fp32, as peft keeps LoRA's adapters: a bf16 weight
    drops the updates smaller than 1/256 of itself. Its inputs are cast up, its output back."""
    dtype = next(module.parameters()).dtype
    if dtype == torch.float32:
        return
    module.float()
    module.register_forward_pre_hook(lambda m, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point()
                                                           else a for a in args))
    module.register_forward_hook(lambda m, args, output: output.to(dtype))


def quantized_share(model) -> dict:
    """Linear layers by kind, language model vs the rest: what went to 4 bits and what stayed 16-bit."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            part = "language model" if any(f".{lm}." in f".{name}" for lm in LANGUAGE_MODELS) else "vision + rest"
            key = f"{part}: {type(module).__name__}"
            out[key] = out.get(key, 0) + 1
    return out
