"""The size of a LoRA adapter at a real model's shape, counted exactly without loading a single weight.

The model is built on the meta device (``accelerate.init_empty_weights``: shapes, no memory), peft adds
the config's LoRA to it, and ``get_peft_model_state_dict`` gives the tensors ``save_pretrained`` would
write. Real empty tensors of those shapes and of the adapter's dtype are then serialised with
safetensors in memory, so the byte count is that of ``adapter_model.safetensors`` itself, header
included. At the 32B shape that is tens of megabytes of RAM for a moment, nothing more.

It imports peft (and with it bitsandbytes), so notebook 05 runs it in a child process
(``tables.adapter_size``), never in the kernel that later starts ``notebook_launcher``::

    python -m qlora_helpers.ch05_multi_gpu.adapter_size --config data/configs/multi_gpu_32b.yaml --preset qwen2.5-32b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from qlora_helpers.ch05_multi_gpu.precision import torch_dtype
from qlora_helpers.common.shapes import get_config


def adapter_size(preset: str, lora: dict, dtype: str = "fp32") -> dict:
    """Parameters and safetensors bytes of the LoRA adapter ``lora`` (a config's ``lora`` section) on ``preset``."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(get_config(preset))
        base_params = sum(p.numel() for p in model.parameters())
        config = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                            target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
        state = get_peft_model_state_dict(get_peft_model(model, config))
    saved = {}
    for name in (dtype, "fp16"):   # the adapter's dtype, and a 16-bit save for comparison
        tensors = {key: torch.empty(t.shape, dtype=torch_dtype(name)) for key, t in state.items()}
        saved[name] = len(save(tensors, metadata={"format": "pt"}))   # what save_pretrained writes, header included
    return {"preset": preset, "r": int(lora["r"]), "targets": list(lora["target_modules"]), "dtype": dtype,
            "tensors": len(state), "parameters": sum(t.numel() for t in state.values()),
            "base_parameters": base_params, "bytes": saved[dtype], "bytes_fp16": saved["fp16"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qlora_helpers.ch05_multi_gpu.adapter_size",
                                description="LoRA adapter size at a model shape, printed as JSON")
    p.add_argument("--config", default="data/configs/multi_gpu_32b.yaml", help="its lora section is used")
    p.add_argument("--preset", default="qwen2.5-32b")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    a = p.parse_args(argv)
    lora = yaml.safe_load(Path(a.config).read_text())["lora"]
    print(json.dumps(adapter_size(a.preset, lora, a.dtype)))


if __name__ == "__main__":
    main()
