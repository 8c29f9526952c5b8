"""Train the CPU vision-language model with batch 1 x gradient accumulation, and grade its answers.

One optimizer step::

    for each of grad_accum micro-batches (one image + question + answer each):
        loss = causal_lm_loss(model, batch) / grad_accum      # recipe: model(**batch).loss without full logits
        loss.backward()          # reaches the LoRA adapters and the projector only
    optimizer.step(); scheduler.step(); zero_grad()

``evaluate`` grades an answer by the model's next-token scores restricted to the valid answers
(``Yes``/``No``, ``0``-``9``), no sampling, repeatable, and keeps the free greedy answer to show
what the model actually says.

Example:
    >>> history = train(model, opt, examples, tokenizer=tok, n_img=9, steps=30, grad_accum=4)  # doctest: +SKIP
    >>> history["loss"][0] > history["loss"][-1]                                           # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from qlora_helpers.ch03_sft.recipe import causal_lm_loss
from qlora_helpers.ch04_vlm.config import preset as get_preset
from qlora_helpers.ch04_vlm.data import CHOICES
from qlora_helpers.ch04_vlm.data import collate as _collate
from qlora_helpers.ch04_vlm.model import prepare_for_training
from qlora_helpers.common.device import cpu_compute_dtype
from qlora_helpers.common.models import build_random, tiny_llava


def collate(examples, tokenizer, n_img, *, with_answer=True, device=None) -> dict:
    batch = _collate(examples, tokenizer, n_img, with_answer=with_answer)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def model_device(model):
    return next(model.parameters()).device


def cpu_threads(device: str = "cpu") -> tuple[int, str]:
    """Threads for torch on this machine, and why.

    When other jobs take cores away, torch's OpenMP threads keep waiting for each other and the many
    small operations of a batch-1 step run 5-10 times slower than on one thread (seen on a shared
    2-core machine). So: one thread on a machine of two cores or fewer, or on a busy one (load
    average above the cores we may use); otherwise torch's default.
    """


    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if str(device) != "cpu":
        return torch.get_num_threads(), "GPU run: CPU threads left as they are"
    load = os.getloadavg()[0]
    if cores <= 2 or load > cores - 0.5:
        torch.set_num_threads(1)
        why = "two cores or fewer" if cores <= 2 else "busy"
    else:
        why = "idle enough"
    n = torch.get_num_threads()
    return n, f"load average {load:.1f} on {cores} cores ({why}): torch runs on {n} thread{'s' * (n > 1)}"


def linear_schedule(optimizer, steps: int, *, warmup: float = 0.1, final: float = 0.1):
    """Learning rates rise over the first ``warmup`` share of ``steps``, then fall linearly to ``final`` x:
    with a few dozen batch-1 steps, the last ones must not undo what the first learned.

    Example: 10 steps, warmup 0.1, final 0.1 -> factors 1.0, 0.9, 0.8, ..., 0.2, 0.1.
    """

    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(final, 1 - (1 - final) * (step - warm + 1) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model, optimizer, examples: list, *, tokenizer, n_img: int, steps: int, grad_accum: int,
          progress: bool = True, start: int = 0, scheduler=None) -> dict:
    """``steps`` optimizer steps over ``examples`` (cycled from index ``start``); the loss of each step."""


    model.train()
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    history = {"loss": [], "seconds": []}
    i = start
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for _ in bar:
        t0, total = time.perf_counter(), 0.0
        for _ in range(grad_accum):
            batch = collate([examples[i % len(examples)]], tokenizer, n_img, device=model_device(model))
            i += 1
            loss = causal_lm_loss(model, batch) / grad_accum   # = model(**batch).loss, without full logits
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        history["loss"].append(total)
        history["seconds"].append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{total:.3f}")
    history["next_example"] = i
    return history


def evaluate(model, examples: list, *, tokenizer, n_img: int, max_new_tokens: int = 3,
             batch_size: int = 40) -> dict:
    """Grade ``examples`` and say what the model answers, in one greedy generation per batch.

    The grade looks at the first generated position only, at the scores of the valid answers
    (``Yes``/``No`` or ``0``-``9``): the highest is the model's choice. The text is the free greedy
    answer. Returns ``{"accuracy": {"face", "digit", "all"}, "choices": [...], "texts": [...]}``
    with one choice and one text per example, in the order given. ``max_new_tokens`` is the number of
    forward passes per batch (one prefill, then one per further token).
    """

    model.eval()
    choice_of, text_of = {}, {}
    correct = {}
    for kind, choices in CHOICES.items():
        group = [(i, e) for i, e in enumerate(examples) if e.kind == kind]
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
        for s in range(0, len(group), batch_size):
            chunk = group[s:s + batch_size]
            batch = collate([e for _, e in chunk], tokenizer, n_img, with_answer=False, device=model_device(model))
            batch.pop("labels")
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
            picks = out.logits[0][:, ids].argmax(-1).tolist()
            new = out.sequences[:, batch["input_ids"].shape[1]:]
            for (i, e), j, seq in zip(chunk, picks, new):
                choice_of[i] = choices[j]
                text_of[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
                correct.setdefault(kind, []).append(choices[j] == e.answer)
    accuracy = {k: sum(v) / len(v) for k, v in correct.items()}
    accuracy["all"] = sum(sum(v) for v in correct.values()) / max(1, len(examples))
    return {"accuracy": accuracy, "choices": [choice_of[i] for i in range(len(examples))],
            "texts": [text_of[i] for i in range(len(examples))]}


def self_test(device: str = "cpu", preset: str = "ultra_low_memory") -> list[dict]:
    """A one-minute check that the 8 GB recipe runs on this machine, on a tiny random LLaVA.

    Builds it with the language model in 4-bit, wraps it exactly as the chapter does (LoRA in the
    language model, projector trained, tower frozen, checkpointing, the preset's optimizer) and
    trains 2 steps of batch 1 x 2. Returns one row per check: ``{"check", "ok", "detail"}``.
    On a GPU, ``python -m benchmarks.vlm_8gb --quick`` is the real-shape version.
    """



    rows = []

    def check(name, ok, detail=""):
        rows.append({"check": name, "ok": bool(ok), "detail": detail})

    cfg = get_preset(preset)
    check("preset validates", True, cfg.summary())
    config = tiny_llava(image_size=28, patch_size=14)
    dtype = torch.bfloat16 if device != "cpu" else cpu_compute_dtype()
    model = build_random(config, quantize="4bit", device=device, dtype=dtype, progress=False)
    n4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    check("language model in 4-bit", n4 > 0, f"{n4} Linear4bit layers")
    model, opt, line = prepare_for_training(model, cfg)
    check("optimizer", True, line)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    check("vision tower frozen", not any("vision_tower" in n for n in trainable))
    check("LoRA only in the language model", all("language_model" in n for n in trainable if "lora_" in n)
          and any("lora_" in n for n in trainable))
    check("projector trained", any("multi_modal_projector" in n for n in trainable))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in lora_b]
    gen = torch.Generator().manual_seed(0)
    n_img = (28 // 14) ** 2 + 1
    losses = []
    model.train()
    for _ in range(2):
        for _ in range(2):
            ids = torch.randint(0, config.image_token_index, (1, 24), generator=gen)
            ids[0, 1:1 + n_img] = config.image_token_index
            pix = torch.randn(1, 3, 28, 28, generator=gen)
            loss = model(input_ids=ids.to(device), pixel_values=pix.to(device, dtype), labels=ids.to(device)).loss / 2
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    check("loss finite", all(math.isfinite(v) for v in losses), f"{losses[0]:.3f} ... {losses[-1]:.3f}")
    check("adapters learn", any(not torch.equal(a, b.detach()) for a, b in zip(before, lora_b)))
    return rows


def matmul_seconds(dtypes, *, rows: int, inner: int, cols: int, repeats: int = 20) -> dict:
    """Best-of-``repeats`` seconds of one ``(rows x inner) @ (inner x cols)`` product in each dtype, on the CPU.

    Example: ``matmul_seconds((torch.float32, torch.bfloat16), rows=25, inner=576, cols=1536)``
    -> ``{"torch.float32": 4e-05, "torch.bfloat16": ...}`` (seconds; they vary by machine and load).
    """

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, inner, generator=gen), torch.randn(inner, cols, generator=gen)
    out = {}
    for dtype in dtypes:
        x, y = a.to(dtype), b.to(dtype)
        x @ y                                      # warm-up: the first call picks a kernel
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - t0)
        out[str(dtype)] = best
    return out
