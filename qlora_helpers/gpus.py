"""Common GPUs, whether a training run fits on them, and measuring a run on one.

A card's memory is not all yours: the CUDA context (driver, kernels, cuBLAS handles) takes a few
hundred MiB before PyTorch allocates anything, and PyTorch's caching allocator reserves more than
it hands out (fragmentation). ``fits`` adds both to the predicted peak before comparing.

Example:
    >>> [g.name for g in which_gpus(9.0)][:2]
    ['RTX 3060 12GB', 'RTX 4060 Ti 16GB']
    >>> fits(6.0, 8)
    'fits'
    >>> fits(7.2, 8)
    'tight'
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_GIB = 0.75  # CUDA context + kernels, outside max_memory_allocated (0.75 GiB seen on an H100, CUDA 13)
SLACK = 0.20        # allocator slack: reserved was 2-26 % above peak allocated in benchmarks/memory_validation


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float   # total memory as nvidia-smi reports it, in GiB
    note: str = ""


GPUS = (
    GPU("RTX 4060 8GB", 8, "also RTX 3060 Ti / 3070 / 2060 Super 8GB"),
    GPU("RTX 3060 12GB", 12, "also RTX 4070 12GB"),
    GPU("RTX 4060 Ti 16GB", 16, "also RTX 4080 16GB, T4 / V100 16GB"),
    GPU("RTX 4090 24GB", 24, "also RTX 3090 / A10 / L4 24GB"),
    GPU("V100 32GB", 32, "also RTX 5090 32GB; no bf16 on V100"),
    GPU("A100 40GB", 40, ""),
    GPU("RTX A6000 48GB", 48, "also L40S / A40 48GB"),
    GPU("A100 / H100 80GB", 79.6, "H100 80GB HBM3 reports 81,559 MiB"),
)


def needed_gib(total_gib: float, context_gib: float = CONTEXT_GIB, slack: float = SLACK) -> float:
    """Card memory a run needs: predicted peak allocated, plus allocator slack and the CUDA context."""
    return total_gib * (1 + slack) + context_gib


def fits(total_gib, gpu_gib: float, context_gib: float = CONTEXT_GIB, slack: float = SLACK) -> str:
    """``"fits"``, ``"tight"`` (fits only without allocator slack) or ``"no"``.

    ``total_gib`` is a number or anything with a ``total_gib`` attribute (a ``MemoryEstimate``).
    """
    total = getattr(total_gib, "total_gib", total_gib)
    if needed_gib(total, context_gib, slack) <= gpu_gib:
        return "fits"
    if total + context_gib <= gpu_gib:
        return "tight"
    return "no"


def which_gpus(total_gib, gpus=GPUS) -> list[GPU]:
    """The cards of ``gpus`` on which the run fits (``"fits"``), smallest first."""
    return [g for g in sorted(gpus, key=lambda g: g.memory_gib) if fits(total_gib, g.memory_gib) == "fits"]


def verdict(total_gib, gpus=GPUS) -> str:
    """One line: the smallest common card that fits, or why none does.

    Example:
        >>> verdict(30.0)
        'needs ~36.8 GiB: smallest common card that fits is A100 40GB'
    """
    total = getattr(total_gib, "total_gib", total_gib)
    need = needed_gib(total)
    ok = which_gpus(total, gpus)
    if not ok:
        return f"needs ~{need:.1f} GiB: more than any single card listed ({max(g.memory_gib for g in gpus):.0f} GB)"
    return f"needs ~{need:.1f} GiB: smallest common card that fits is {ok[0].name}"


def gpu_table(total_gib, gpus=GPUS) -> list[dict]:
    """One row per card: name, memory and fits / tight / no."""
    return [{"gpu": g.name, "memory_gib": g.memory_gib, "verdict": fits(total_gib, g.memory_gib)} for g in gpus]


def _batch(config, batch_size: int, seq_len: int, device, dtype, generator):
    """Random token ids (labels = input ids); for a VLM one random 336 x 336 image per sample, whose
    tokens come on top of ``seq_len`` text tokens (as ``estimate`` counts them)."""
    import inspect

    import torch

    from qlora_helpers.memory import model_shape

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
        from transformers import Qwen2VLForConditionalGeneration
        if "mm_token_type_ids" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters:
            kw["mm_token_type_ids"] = (ids == config.image_token_id).int().to(device)   # transformers >= 5.2x
    else:
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    ids = ids.to(device)
    return dict(input_ids=ids, labels=ids, **kw)


def _make_optimizer(name: str, params, lr: float = 1e-4):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes as bnb

    return (bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit)(params, lr=lr)


def measure(config, method: str, batch_size: int, seq_len: int, lora_r: int = 8, targets="all-linear",
            grad_ckpt: bool = False, prepare_kbit: bool = False, optimizer: str = "adamw", dtype: str = "bf16",
            steps: int = 3, device: str = "cuda", seed: int = 0) -> dict:
    """Train ``steps`` steps on random weights at real shape and return the measured memory (GiB).

    Step 1 is a warm-up (optimizer states appear during it); ``peak_allocated_gib`` is the largest
    ``max_memory_allocated`` of the later steps, the quantity ``estimate`` predicts. Each step is
    split into forward / backward / optimizer phases whose peaks are reported too, along with the
    allocated memory after build, after the peft wrap and after each phase. Run it in a fresh
    process, or after everything of an earlier run was freed (``checkpoints_gib["start"]`` shows
    what was still allocated), so that no earlier allocation counts towards the peak.
    """
    import gc
    import time

    import torch

    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RuntimeError("measure() needs a CUDA GPU and torch sees none here: use estimate() on this machine")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first is a warm-up), got {steps}")
    if isinstance(config, str):
        from qlora_helpers.configs import get_config
        config = get_config(config)
    from qlora_helpers.memory import GIB, estimate
    from qlora_helpers.models import build_random

    est = estimate(config, method, batch_size, seq_len, lora_r, targets, grad_ckpt, prepare_kbit, optimizer, dtype)

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    quant = {"qlora4": "4bit", "qlora8": "8bit"}.get(method)
    gc.collect()
    torch.cuda.empty_cache()
    gib = lambda b: round(b / GIB, 4)                  # absolute: the cuBLAS workspace counts, as in estimate()
    out = {"inputs": est.inputs, "checkpoints_gib": {"start": gib(torch.cuda.memory_allocated(device))},
           "steps": [], "oom": False}
    mark = lambda key: out["checkpoints_gib"].__setitem__(key, gib(torch.cuda.memory_allocated(device)))
    model = opt = None
    t0 = time.perf_counter()
    try:
        model = build_random(config, quantize=quant, device=device, dtype=torch_dtype, seed=seed, progress=False)
        mark("after build")
        ckpt_kwargs = {"use_reentrant": False}
        if prepare_kbit:
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt,
                                                    gradient_checkpointing_kwargs=ckpt_kwargs)
        elif grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        if method == "full":
            model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model
            tm = "all-linear" if targets == "all-linear" else est.inputs["targets"]
            model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=tm, task_type="CAUSAL_LM"))
        model.train()
        mark("after wrap")
        opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
        gen = torch.Generator().manual_seed(seed)
        batch = _batch(config, batch_size, seq_len, device, torch_dtype, gen)
        mark("after batch")
        out["setup_s"] = round(time.perf_counter() - t0, 1)

        def phase(fn):
            torch.cuda.reset_peak_memory_stats(device)
            result = fn()
            return result, gib(torch.cuda.max_memory_allocated(device)), torch.cuda.max_memory_reserved(device) / GIB

        for _ in range(steps):
            t = time.perf_counter()
            rec = {}
            loss, rec["forward"], r1 = phase(lambda: model(**batch).loss)
            rec["after forward"] = gib(torch.cuda.memory_allocated(device))
            _, rec["backward"], r2 = phase(loss.backward)
            del loss
            rec["after backward"] = gib(torch.cuda.memory_allocated(device))
            _, rec["optimizer"], r3 = phase(opt.step)
            opt.zero_grad(set_to_none=True)
            rec["reserved"] = round(max(r1, r2, r3), 4)
            rec["seconds"] = round(time.perf_counter() - t, 3)
            out["steps"].append(rec)
        steady = out["steps"][1:]
        peaks = {k: max(s[k] for s in steady) for k in ("forward", "backward", "optimizer")}
        out["phases_gib"] = peaks
        out["peak_allocated_gib"] = max(peaks.values())
        out["peak_phase"] = max(peaks, key=peaks.get)
        out["peak_reserved_gib"] = max(s["reserved"] for s in steady)
        out["first_step_peak_gib"] = max(out["steps"][0][k] for k in ("forward", "backward", "optimizer"))
        free, total = torch.cuda.mem_get_info(device)
        out["device_used_gib"] = round((total - free) / GIB, 4)   # + CUDA context + paged states
        out["reserved_now_gib"] = round(torch.cuda.memory_reserved(device) / GIB, 4)
    except torch.OutOfMemoryError as err:
        out["oom"] = True
        out["error"] = str(err).splitlines()[0][:300]
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out

