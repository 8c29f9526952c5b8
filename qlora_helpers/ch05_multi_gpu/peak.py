"""What gradient accumulation does to the memory peak of a step, measured on the CPU.

At the peak of a training step a GPU holds what stays (the 4-bit weights, the LoRA weights, their
gradients and optimizer states) and what one forward pass saved for its backward (the activations).
The first part does not depend on the batch. The second is measured here exactly: every tensor autograd
saves is counted while it is alive (``SavedBytes``, through ``torch.autograd.graph.saved_tensors_hooks``),
so the peak of one optimizer step of ``accum`` micro-batches is the largest sum held at any moment.

Each micro-batch repeats the same sequences, so only the setting changes between rows. Calling
``backward`` after every micro-batch frees its activations before the next forward: the peak is one
micro-batch's, whatever ``accum`` is. Summing the micro-batches' losses and calling ``backward`` once
keeps every graph alive, and the peak grows with ``accum``.

It imports peft and bitsandbytes (``model``), so notebook 05 runs it in a child process
(``tables.accumulation_peaks``)::

    python -m qlora_helpers.ch05_multi_gpu.peak --data-dir runs/interactive/data/lfw_reversal
"""

from __future__ import annotations

import argparse
import json
import weakref
from collections import Counter

import torch

from qlora_helpers.ch05_multi_gpu.model import add_lora, load_model
from qlora_helpers.ch05_multi_gpu.reversal import collate, encode, read_jsonl

# (micro-batch, gradient accumulation, one backward over the summed losses)
SETTINGS = ((1, 8, False), (1, 4, False), (2, 4, False), (1, 8, True))


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


def measure(data_dir: str, *, model_id: str = "", lora: dict, max_length: int = 128) -> dict:
    """The fixed bytes of the step and, per setting, the activations held at its peak."""
    model, tok = load_model(model_id, "4bit", dtype=torch.float32, device="cpu")
    model = add_lora(model, lora, False, seed=0)
    records = read_jsonl(f"{data_dir}/forward_train.jsonl")[:2]
    examples = [encode(r["messages"], tok, max_length) for r in records]
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable)
    fixed = {"weights": sum(p.numel() * p.element_size() for p in model.parameters()) - lora_bytes,
             "lora": lora_bytes, "gradients": lora_bytes, "adamw_states": 2 * lora_bytes}
    rows = [{"micro_batch": mb, "accumulation": acc, "summed": summed,
             "activations": step_peak(model, collate(examples[:mb], tok.pad_token_id), accum=acc, summed=summed)}
            for mb, acc, summed in SETTINGS]
    return {"model": model_id or "SmolLM2-135M-Instruct", "tokens": [len(e["input_ids"]) for e in examples],
            "fixed": fixed, "rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qlora_helpers.ch05_multi_gpu.peak",
                                description="activation peak of a step per micro-batch and accumulation, as JSON")
    p.add_argument("--data-dir", required=True, help="a folder written by reversal.generate_data")
    p.add_argument("--model-id", default="", help="empty: the cached SmolLM2")
    a = p.parse_args(argv)
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    print(json.dumps(measure(a.data_dir, model_id=a.model_id, lora=lora)))


if __name__ == "__main__":
    main()
