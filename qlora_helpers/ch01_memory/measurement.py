"""Measuring what ``estimate`` predicts: training steps on random weights at real shape, on a GPU.

``measure`` loads the model as a user does: ``save_random`` writes random weights at real shape to a
folder once, and each run calls ``from_pretrained(folder, quantization_config=...)`` with a ``BitsAndBytesConfig``
(plain dtype for LoRA and full training). It then wraps the model as the method does (LoRA, optional
``prepare_model_for_kbit_training`` and gradient checkpointing), calls ``model.train()`` (from_pretrained
returns eval mode, in which transformers skips gradient checkpointing), trains a few steps and reports
the peak allocated and reserved memory of each phase (forward, backward, optimizer), the peak counter
reset after loading. Without a folder the model is built layer by layer in memory (``build_random``).
``benchmarks/memory_validation.py`` runs it for each configuration in a fresh process.
"""

from __future__ import annotations

import gc
import inspect
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, Qwen2VLForConditionalGeneration

from qlora_helpers.ch01_memory.estimator import GIB, model_shape, resolve_targets
from qlora_helpers.common.bench import reset_cuda_peak
from qlora_helpers.common.models import bnb_config, build_random, enable_checkpointing
from qlora_helpers.common.optim import make_optimizer
from qlora_helpers.common.shapes import get_config


def _batch(config, batch_size: int, seq_len: int, device, dtype, generator):
    """Random token ids (labels = input ids); for a VLM one random 336 x 336 image per sample, whose
    tokens come on top of ``seq_len`` text tokens (as ``estimate`` counts them)."""
    text = config.get_text_config()
    vocab = text.vocab_size
    kw = {}
    if config.model_type == "llava":
        n_img = model_shape(config).vision["lm_tokens"]
        ids = torch.randint(0, config.image_token_index, (batch_size, seq_len + n_img), generator=generator)
        ids[:, 1:1 + n_img] = config.image_token_index
        size = config.vision_config.image_size
        kw["pixel_values"] = torch.randn(batch_size, 3, size, size, generator=generator).to(device, dtype)
    elif config.model_type == "qwen2_vl":
        vc, n_img = config.vision_config, model_shape(config).vision["lm_tokens"]
        grid = 336 // vc.patch_size
        ids = torch.randint(0, 151_000, (batch_size, seq_len + n_img), generator=generator)
        ids[:, 1] = config.vision_start_token_id
        ids[:, 2:2 + n_img] = config.image_token_id
        ids[:, 2 + n_img] = config.vision_end_token_id
        patch = 3 * vc.temporal_patch_size * vc.patch_size ** 2
        kw["pixel_values"] = torch.randn(batch_size * grid * grid, patch, generator=generator).to(device, dtype)
        kw["image_grid_thw"] = torch.tensor([[1, grid, grid]] * batch_size, device=device)
        if "mm_token_type_ids" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters:
            kw["mm_token_type_ids"] = (ids == config.image_token_id).int().to(device)   # transformers >= 5.2x
    else:
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    ids = ids.to(device)
    return dict(input_ids=ids, labels=ids, **kw)


def save_random(config, folder, *, dtype=torch.bfloat16, device: str = "cuda", seed: int = 0):
    """Write a decoder of ``config``'s shape with random weights to ``folder`` (``save_pretrained``)."""
    model = build_random(config, device=device, dtype=dtype, seed=seed, progress=False)
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def load(folder, method: str, *, dtype, device: str = "cuda"):
    """``from_pretrained`` as a user calls it: 4-bit NF4 / 8-bit LLM.int8 for QLoRA, else plain ``dtype``."""
    quant = {"qlora4": "4bit", "qlora8": "8bit"}.get(method)
    kwargs = {"quantization_config": bnb_config(quant, dtype)} if quant else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device}, **kwargs)


def _wrap(model, method: str, *, lora_r: int, targets, grad_ckpt: bool, prepare_kbit: bool):
    """The model as the method trains it: everything trainable (full), or frozen with LoRA on ``targets``."""
    ckpt_kwargs = {"use_reentrant": False}
    model.config.use_cache = not grad_ckpt      # the key/value cache is for generation; checkpointing refuses it
    if prepare_kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif grad_ckpt:
        enable_checkpointing(model)
    if method == "full":
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    return model


def _gib(nbytes) -> float:
    return round(nbytes / GIB, 4)       # absolute: the cuBLAS workspace counts, as in estimate()


def _phase(fn, device):
    """Run ``fn`` with the peak counter reset: (its result, peak allocated GiB, peak reserved GiB)."""
    reset_cuda_peak()
    result = fn()
    return result, _gib(torch.cuda.max_memory_allocated(device)), torch.cuda.max_memory_reserved(device) / GIB


def _step(model, opt, batch, device) -> dict:
    """One training step, split into forward, backward and optimizer phases."""
    t, rec = time.perf_counter(), {}
    loss, rec["forward"], r1 = _phase(lambda: model(**batch).loss, device)
    rec["after forward"] = _gib(torch.cuda.memory_allocated(device))
    _, rec["backward"], r2 = _phase(loss.backward, device)
    del loss
    rec["after backward"] = _gib(torch.cuda.memory_allocated(device))
    _, rec["optimizer"], r3 = _phase(opt.step, device)
    opt.zero_grad(set_to_none=True)
    rec["reserved"] = round(max(r1, r2, r3), 4)
    rec["seconds"] = round(time.perf_counter() - t, 3)
    return rec


def _summary(steps: list[dict], device) -> dict:
    """Peaks over the steps after the warm-up one, and what the device holds now."""
    steady = steps[1:]
    peaks = {k: max(s[k] for s in steady) for k in ("forward", "backward", "optimizer")}
    free, total = torch.cuda.mem_get_info(device)
    return {"phases_gib": peaks, "peak_allocated_gib": max(peaks.values()), "peak_phase": max(peaks, key=peaks.get),
            "peak_reserved_gib": max(s["reserved"] for s in steady),
            "first_step_peak_gib": max(steps[0][k] for k in ("forward", "backward", "optimizer")),
            "device_used_gib": _gib(total - free),            # + CUDA context + paged states
            "reserved_now_gib": _gib(torch.cuda.memory_reserved(device))}


def measure(config, method: str, *, batch_size: int, seq_len: int, lora_r: int = 8, targets="all-linear",
            grad_ckpt: bool = False, prepare_kbit: bool = False, optimizer: str = "adamw", dtype: str = "bf16",
            steps: int = 3, device: str = "cuda", seed: int = 0, folder=None) -> dict:
    """Train ``steps`` steps on random weights at real shape and return the measured memory (GiB).

    Step 1 is a warm-up (optimizer states appear during it); ``peak_allocated_gib`` is the largest
    ``max_memory_allocated`` of the later steps, the quantity ``estimate`` predicts. Each step is
    split into forward / backward / optimizer phases whose peaks are reported too, along with the
    allocated memory after build, after the peft wrap and after each phase. Run it in a fresh
    process, or after everything of an earlier run was freed (``checkpoints_gib["start"]`` shows
    what was still allocated), so that no earlier allocation counts towards the peak. ``folder``: a
    ``save_random`` folder of the same shape to load with ``from_pretrained`` (else built in memory).
    """
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RuntimeError("measure() needs a CUDA GPU and torch sees none here: use estimate() on this machine")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first is a warm-up), got {steps}")
    config = get_config(config) if isinstance(config, str) else config
    modules = targets if targets == "all-linear" else sorted(resolve_targets(model_shape(config), targets))
    inputs = dict(method=method, batch_size=batch_size, seq_len=seq_len, lora_r=0 if method == "full" else lora_r,
                  targets=modules, grad_ckpt=grad_ckpt, prepare_kbit=prepare_kbit, optimizer=optimizer, dtype=dtype)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gc.collect()
    torch.cuda.empty_cache()
    out = {"inputs": inputs, "checkpoints_gib": {"start": _gib(torch.cuda.memory_allocated(device))},
           "steps": [], "oom": False}
    mark = lambda key: out["checkpoints_gib"].__setitem__(key, _gib(torch.cuda.memory_allocated(device)))
    model = opt = None
    t0 = time.perf_counter()
    try:
        if folder is not None:
            model = load(folder, method, dtype=torch_dtype, device=device)
        else:
            model = build_random(config, quantize={"qlora4": "4bit", "qlora8": "8bit"}.get(method), device=device,
                                 dtype=torch_dtype, seed=seed, progress=False)
        mark("after load")
        model = _wrap(model, method, lora_r=lora_r, grad_ckpt=grad_ckpt, prepare_kbit=prepare_kbit, targets=modules)
        mark("after wrap")
        out["training"], out["attention"] = model.training, model.config._attn_implementation
        opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = _batch(config, batch_size, seq_len, device, torch_dtype, torch.Generator().manual_seed(seed))
        mark("after batch")
        out["setup_s"] = round(time.perf_counter() - t0, 1)
        out["steps"] = [_step(model, opt, batch, device) for _ in range(steps)]
        out.update(_summary(out["steps"], device))
    except torch.OutOfMemoryError as err:
        out["oom"] = True
        out["error"] = str(err).splitlines()[0][:300]
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
