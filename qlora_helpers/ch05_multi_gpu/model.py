"""Chapter 05's models and the two measurements made on them, in a rank or a child process only (this module
imports peft and bitsandbytes, which the notebook's kernel must not load before ``notebook_launcher``):

- ``load_model`` / ``add_lora``: random-weight models in 4 or 8 bits with LoRA on them: what a rank trains for
  ``random:<preset>`` (built layer by layer), and what the peak measurement and the CPU gradient test use;
- ``adapter_size``: the LoRA adapter's bytes at a real model's shape, counted on the meta device
  (``accelerate.init_empty_weights``) and serialised with safetensors in memory, header included;
- ``measure_peaks``: what gradient accumulation does to the memory peak of a step. At the peak a GPU holds
  what stays (4-bit weights, LoRA weights, their gradients and AdamW states) and what one forward saved for
  its backward: every tensor autograd saves is counted while alive (``SavedBytes``). ``backward`` after
  every micro-batch frees its activations before the next forward, so the peak is one micro-batch's
  whatever ``accum`` is; summing the losses and calling ``backward`` once keeps every graph alive.

Notebook 05 runs the measurements through ``tables.adapter_size`` and ``tables.accumulation_peaks``::

    python -m qlora_helpers.ch05_multi_gpu.model adapter-size --config data/configs/multi_gpu_32b.yaml
    python -m qlora_helpers.ch05_multi_gpu.model peaks --data-dir runs/interactive/data/lfw_reversal
"""

from __future__ import annotations

import argparse
import json
import weakref
from collections import Counter

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_helpers.ch05_multi_gpu.config import load_config
from qlora_helpers.ch05_multi_gpu.precision import torch_dtype
from qlora_helpers.ch05_multi_gpu.reversal import collate, encode, read_jsonl
from qlora_helpers.common import assets
from qlora_helpers.common.models import bnb_config, build_random, enable_checkpointing, tiny_llama, tiny_qwen2
from qlora_helpers.common.quant import keep_cpu_training_layout
from qlora_helpers.common.shapes import get_config, tokenizer_asset

# (micro-batch, gradient accumulation, one backward over the summed losses)
SETTINGS = ((1, 8, False), (1, 4, False), (2, 4, False), (1, 8, True))
PEAK_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def load_model(model_id: str, quantize: str, *, dtype, device):
    """A 4-bit (or 8-bit) model on ``device`` (``"auto"``: placed by accelerate) and its tokenizer.

    ``""``: the cached SmolLM2-135M-Instruct; ``random:<preset>`` / ``tiny:llama`` / ``tiny:qwen2``: random
    weights quantised layer by layer (``models.build_random``); anything else: ``from_pretrained``.
    """
    if model_id.startswith(("random:", "tiny:")):
        kind, name = model_id.split(":", 1)
        tokenizer = AutoTokenizer.from_pretrained(assets.verify(tokenizer_asset(name), only=assets.TOKENIZER_FILES))
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
                                                     device_map=device if device == "auto" else {"": device},
                                                     dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    keep_cpu_training_layout(model)   # the CPU run is the tests' exact reference
    return model, tokenizer


def lora_config(lora: dict) -> LoraConfig:
    """The ``LoraConfig`` of a run config's ``lora:`` section."""
    return LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")


def add_lora(model, lora: dict, gradient_checkpointing: bool, seed: int):
    """LoRA adapters (fp32) on the config's target modules; the same seed on every rank."""
    if gradient_checkpointing:
        enable_checkpointing(model)
    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(lora))


# --------------------------------------------------------------------------- the adapter's size
def adapter_size(preset: str, lora: dict, dtype: str = "fp32") -> dict:
    """Parameters and safetensors bytes of the LoRA adapter ``lora`` (a config's ``lora`` section) on ``preset``."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(get_config(preset))
        base_params = sum(p.numel() for p in model.parameters())
        state = get_peft_model_state_dict(get_peft_model(model, lora_config(lora)))
    saved = {}
    for name in (dtype, "fp16"):   # the adapter's dtype, and a 16-bit save for comparison
        tensors = {key: torch.empty(t.shape, dtype=torch_dtype(name)) for key, t in state.items()}
        saved[name] = len(save(tensors, metadata={"format": "pt"}))   # what save_pretrained writes, header included
    return {"preset": preset, "r": int(lora["r"]), "targets": list(lora["target_modules"]), "dtype": dtype,
            "tensors": len(state), "parameters": sum(t.numel() for t in state.values()),
            "base_parameters": base_params, "bytes": saved[dtype], "bytes_fp16": saved["fp16"]}


# --------------------------------------------------------------------------- gradient accumulation and the peak
class _Saved:
    """A saved tensor in a box: autograd drops the box when it frees the saved tensor."""

    def __init__(self, tensor):
        self.tensor = tensor


class SavedBytes:
    """Bytes autograd holds for backward, live and at their peak; each storage counted once, parameters never.

    Example: ``with saved_tensors_hooks(t.pack, t.unpack): loss.backward()`` then ``t.peak``.
    """

    def __init__(self, parameters):
        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.refs: Counter = Counter()
        self.live = self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.skip or not key:
            return tensor
        if not self.refs[key]:
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        box = _Saved(tensor)
        weakref.finalize(box, self._release, key, storage.nbytes())
        return box

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= nbytes

    @staticmethod
    def unpack(box):
        return box.tensor if isinstance(box, _Saved) else box


def step_peak(model, batch: dict, *, accum: int, summed: bool) -> int:
    """Peak saved bytes over one optimizer step of ``accum`` copies of ``batch``."""
    tracker = SavedBytes(model.parameters())
    losses = []
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        for _ in range(accum):
            loss = model(**batch).loss / accum
            if summed:
                losses.append(loss)      # the graph of every micro-batch stays alive
            else:
                loss.backward()          # frees this micro-batch's activations
        if summed:
            torch.stack(losses).sum().backward()
    model.zero_grad(set_to_none=True)
    return tracker.peak


def measure_peaks(data_dir: str, *, model_id: str = "", lora: dict = PEAK_LORA, max_length: int = 128) -> dict:
    """The fixed bytes of the step and, per setting (``SETTINGS``), the activations held at its peak; each
    micro-batch repeats the same sequences, so only the setting changes between rows."""
    model, tok = load_model(model_id, "4bit", dtype=torch.float32, device="cpu")
    model = add_lora(model, lora, False, seed=0)
    records = read_jsonl(f"{data_dir}/forward_train.jsonl")[:2]
    examples = [encode(r["messages"], tok, max_length) for r in records]
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fixed = {"weights": sum(p.numel() * p.element_size() for p in model.parameters()) - lora_bytes,
             "lora": lora_bytes, "gradients": lora_bytes, "adamw_states": 2 * lora_bytes}
    rows = [{"micro_batch": mb, "accumulation": acc, "summed": summed,
             "activations": step_peak(model, collate(examples[:mb], tok.pad_token_id), accum=acc, summed=summed)}
            for mb, acc, summed in SETTINGS]
    return {"model": model_id or "SmolLM2-135M-Instruct", "tokens": [len(e["input_ids"]) for e in examples],
            "fixed": fixed, "rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qlora_helpers.ch05_multi_gpu.model",
                                description="chapter 05's measurements, printed as JSON")
    sub = p.add_subparsers(dest="what", required=True)
    size = sub.add_parser("adapter-size", help="LoRA adapter size at a model shape")
    size.add_argument("--config", default="data/configs/multi_gpu_32b.yaml", help="its lora section is used")
    size.add_argument("--preset", default="qwen2.5-32b")
    size.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    peaks = sub.add_parser("peaks", help="activation peak of a step per micro-batch and accumulation")
    peaks.add_argument("--data-dir", required=True, help="a folder written by reversal.generate_data")
    peaks.add_argument("--model-id", default="", help="empty: the cached SmolLM2")
    a = p.parse_args(argv)
    if a.what == "peaks":
        print(json.dumps(measure_peaks(a.data_dir, model_id=a.model_id)))
    else:
        print(json.dumps(adapter_size(a.preset, load_config(a.config)["lora"], a.dtype)))


if __name__ == "__main__":
    main()
