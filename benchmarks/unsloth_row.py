"""The ``unsloth`` row of ``benchmarks/train_throughput.py``, in a process of its own.

Unsloth patches transformers, peft and TRL when it is imported, so it is imported here before them (and
never in the process of another row). The model is loaded the way Unsloth's users load one: random weights
at the shape, saved as a ``from_pretrained`` folder, then ``FastLanguageModel.from_pretrained(...,
load_in_4bit=True)`` and its ``get_peft_model`` with LoRA r=64 on the seven projections, dropout 0 (its
fast path) and its own checkpointing (``use_gradient_checkpointing="unsloth"``). Training is TRL's
SFTTrainer configured as the ``trl-best`` row (``train_throughput.peer_settings``), as Unsloth's own
notebooks train. A machine where Unsloth does not load (no GPU, a missing wheel) records the error.

Unsloth is not a dependency of the course: the GPU run installs its wheels offline with
``pip install --no-index --no-deps --target DIR``: unsloth and unsloth_zoo 2026.10.9, trl 1.15.0 (the newest
it accepts), datasets 4.8.5, dill, multiprocess, tyro, docstring_parser, shtab, typeguard, cut_cross_entropy,
torchao 0.18.0, msgspec, hf_transfer, structlog, json5 and liger-kernel 0.8.5, with bitsandbytes 0.50.2.

    QLORA_UNSLOTH_SITE=DIR python -m benchmarks.train_throughput --shapes qwen2.5-0.5b --rows trl-best unsloth
    # starts this module with DIR (Unsloth's packages, installed with pip install --target DIR) first on the path
    python -m benchmarks.unsloth_row --shape qwen2.5-0.5b --rows unsloth    # the row alone: one result line
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # a local folder: no hub lookups
try:
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl as it is imported)
    from unsloth import FastLanguageModel
    UNSLOTH_ERROR = None
except Exception as err:  # noqa: BLE001  (no GPU, a missing wheel: recorded as the row's result)
    FastLanguageModel, UNSLOTH_ERROR = None, err

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.train_throughput import (  # noqa: E402
    LORA,
    UNSLOTH_TARGETS,
    parse_args,
    peer_dataset,
    peer_settings,
    train_with_sft_trainer,
    worker,
)
from qlora_helpers.common.bench import error_line  # noqa: E402
from qlora_helpers.common.models import build_random, write_model_folder  # noqa: E402


def run_unsloth(config, data, device: str, tmp: Path) -> dict:
    if FastLanguageModel is None:
        return {"error": error_line(UNSLOTH_ERROR)}
    # the shape's model folder (the command rows' too: the same random weights), written once; this row's own
    # folder links its weights and holds the tokenizer
    shared = write_model_folder(Path(data["model_dir"]) if data.get("model_dir") else tmp / "weights",
                                lambda tok: build_random(config, device=device, dtype=torch.bfloat16, seed=0,
                                                         progress=False), data["tokenizer_asset"])
    folder = tmp / "model"
    folder.mkdir()
    for f in shared.iterdir():
        if f.name in ("config.json", "generation_config.json") or ".safetensors" in f.name:
            (folder / f.name).symlink_to(f.resolve())
    data["tokenizer"].save_pretrained(folder)     # its ids, the pad token's included, all fit the shape (workload)
    settings = peer_settings(data, ckpt=True, device=device)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=settings["max_length"],
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=UNSLOTH_TARGETS, bias="none", random_state=0,
                                             use_gradient_checkpointing="unsloth")
    settings.update(gradient_checkpointing=False, use_liger_kernel=False)   # Unsloth's own checkpointing and kernels
    out = train_with_sft_trainer(model, peer_dataset(data), data, device, tmp, **settings)
    versions = {**out["versions"], "unsloth": getattr(unsloth, "__version__", None)}
    return {**out, "versions": versions, "note": "LoRA dropout 0 (Unsloth's fast path), its own checkpointing "
            "(use_gradient_checkpointing='unsloth'); the seven projections (not the output layer)"}


def main(argv=None) -> None:
    worker(parse_args(argv), run_unsloth)     # the worker records a failure as the row's error


if __name__ == "__main__":
    sys.exit(main())
