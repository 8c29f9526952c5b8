"""Random-weight models in 4 or 8 bits (``load_model``) with LoRA on them (``add_lora``): what a rank trains for
``random:<preset>`` (the GPU benchmarks' 32B shape, built layer by layer), and what the peak measurement
(``peak``) and the CPU gradient test use.

Imported only in a rank or a child process: it pulls in peft and bitsandbytes, which must not be loaded in
the notebook's kernel before ``notebook_launcher`` starts the ranks.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_helpers.common import assets
from qlora_helpers.common.models import bnb_config, build_random, tiny_llama, tiny_qwen2
from qlora_helpers.common.quant import keep_cpu_training_layout
from qlora_helpers.common.shapes import get_config, tokenizer_asset


# --------------------------------------------------------------------------- the model each rank trains
def load_model(model_id: str, quantize: str, *, dtype, device):
    """A 4-bit (or 8-bit) model on ``device`` and its tokenizer.

    ``""``: the cached SmolLM2-135M-Instruct; ``random:<preset>`` / ``tiny:llama`` / ``tiny:qwen2``: random
    weights quantised layer by layer (``models.build_random``); anything else: ``from_pretrained``.
    """


    if model_id.startswith(("random:", "tiny:")):
        kind, name = model_id.split(":", 1)
        family = tokenizer_asset(name)
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
