"""Does QLoRA training of a LLaVA-1.5-7B-shape model fit an 8 GB card? Measured under an enforced cap.

The model has LLaVA-1.5-7B's exact shape (CLIP ViT-L/336 tower, 2-layer projector, Llama-7B
language model) with random weights (no checkpoint can be downloaded here): the language model
is quantised to 4-bit NF4 layer by layer (``models.build_random``), the tower and projector stay
16-bit. Each image is one of six real photos from ``assets.load_images()`` resized to 336 px and
CLIP-normalised; the text is random token ids (no Llama tokenizer offline), so the loss means
nothing, the memory is real.

``torch.cuda.set_per_process_memory_fraction`` caps PyTorch's allocator at 7.5 GiB: an 8 GB card
less its CUDA context. A run that needs more dies with an out-of-memory error, as it would on the
card. Three kinds of runs, each in a fresh process so an out-of-memory error spoils nothing else:

- proofs: the ``ultra_low_memory`` preset at 512 and 1024 text tokens (plus the 576 image tokens),
  10 optimizer steps of batch 1 x 2 accumulated micro-steps, capped at 7.5 GiB; the seed's 12 GB row
  (``balanced``, rank 16) at 512 and 1024 capped at 11.5 GiB, and rank 16 at 512 under the 8 GB cap;
- a search, for each proof that runs out of memory: shorter text, then rank 4, then 224-px images,
  until one fits;
- knobs: the 8 GB preset with one knob flipped at a time (``qlora_helpers.ch04_vlm.vram.KNOBS``), uncapped,
  3 optimizer steps: the measured saving of each knob.

    python -m benchmarks.vlm_8gb            # everything: 12 runs, 3 at a time on one GPU
    python -m benchmarks.vlm_8gb --quick    # the two 8 GB proofs only
    python -m benchmarks.vlm_8gb --smoke    # CPU, tiny LLaVA: checks the plumbing, writes nothing

The record holds each run's own seconds and the whole benchmark's wall time (``wall_seconds``).

Writes ``benchmarks/results/vlm_8gb.json`` (``qlora_helpers.common.bench.write_benchmark``) after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch
from peft import prepare_model_for_kbit_training

from qlora_helpers.ch04_vlm.config import preset as get_preset
from qlora_helpers.ch04_vlm.hub_model import add_lora
from qlora_helpers.ch04_vlm.records import photos_336
from qlora_helpers.ch04_vlm.trainer import vlm_optimizer
from qlora_helpers.ch04_vlm.vram import KNOBS, estimate_vlm, with_changes
from qlora_helpers.common.bench import WorkerError, emit, run_worker, write_benchmark
from qlora_helpers.common.models import build_random, tiny_llava
from qlora_helpers.common.quant import keep_cpu_training_layout
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import OneLineParser, run_main

GIB = 2**30
MODEL = "llava-1.5-7b"
CAP_8GB, CAP_12GB = 7.5, 11.5
# name -> (preset, changes to it, allocator cap in GiB or None)
PROOFS = {
    "8gb-s512": ("ultra_low_memory", {}, CAP_8GB),
    "8gb-s1024": ("ultra_low_memory", {"data": {"max_length": 1024}}, CAP_8GB),
    "12gb-r16-s512": ("balanced", {"data": {"max_length": 512}}, CAP_12GB),
    "12gb-r16-s1024": ("balanced", {"data": {"max_length": 1024}}, CAP_12GB),
    "8gb-r16-s512": ("balanced", {"data": {"max_length": 512}}, CAP_8GB),
}
QUICK = ["8gb-s512", "8gb-s1024"]
# tried in order after an out-of-memory proof, each on top of the proof's own changes
FALLBACKS = [{"data": {"max_length": 768}}, {"data": {"max_length": 640}}, {"data": {"max_length": 512}},
             {"data": {"max_length": 512}, "lora": {"rank": 4, "alpha": 8}},
             {"data": {"max_length": 512, "image_size": 224}, "lora": {"rank": 4, "alpha": 8}}]


NOTES = {"model": f"{MODEL}: CLIP ViT-L/336 + projector + Llama-7B, random weights, LM in 4-bit "
                  "unless a knob says otherwise",
         "images": "6 real photos (china, flower, astronaut, coffee, chelsea, camera) resized, CLIP-normalised",
         "text": "random token ids, labels = ids (image positions -100); batch 1",
         "convention": "peak torch.cuda.max_memory_allocated / max_memory_reserved over optimizer steps "
                       "2..N (step 1 is a warm-up); cap = torch.cuda.set_per_process_memory_fraction"}


def gib(n_bytes: float) -> float:
    return round(n_bytes / GIB, 4)


def merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def knob_runs() -> dict:
    return {f"knob: {name}": ("ultra_low_memory", changes, None) for name, changes in KNOBS.items()
            if "1024 text tokens" not in name}          # that one is the 8gb-s1024 proof


# --------------------------------------------------------------------------- one run (worker process)
def batch_for(config, cfg, image, device, dtype, generator):
    """One sample: BOS, the image's tokens, ``max_length - 1`` random text tokens; image positions unlabelled."""
    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
    text = torch.randint(0, config.image_token_index, (cfg.data.max_length - 1,), generator=generator)
    ids = torch.cat([torch.tensor([1]), torch.full((n_img,), config.image_token_index), text])[None]
    labels = ids.clone()
    labels[ids == config.image_token_index] = -100
    pixels = torch.from_numpy(image)[None].to(device, dtype)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "pixel_values": pixels}


def paged_bytes(optimizer) -> int:
    """Bytes of optimizer state that bitsandbytes keeps in paged (CUDA unified) memory."""
    total = 0
    for state in optimizer.state.values():
        for t in state.values():
            if hasattr(t, "numel") and getattr(t, "is_paged", False):
                total += t.numel() * t.element_size()
    return total


def model_config(cfg, tiny: bool):
    """LLaVA-1.5-7B's config (or a tiny LLaVA), its vision tower at the configured image size."""
    config = tiny_llava(image_size=cfg.data.image_size, patch_size=14) if tiny else get_config(MODEL)
    if not tiny and cfg.data.image_size != config.vision_config.image_size:
        config.vision_config.image_size = cfg.data.image_size       # random weights: any size builds
    return config


def build_for_training(config, cfg, device: str, dtype, row: dict):
    """The random-weight model (4-bit language model unless ``cfg`` says otherwise), LoRA and its optimizer."""
    q = cfg.quantization
    model = build_random(config, quantize="4bit" if q.load_in_4bit else None, device=device, dtype=dtype,
                         double_quant=q.double_quant, quant_type=q.quant_type, progress=False)
    row["after_build_gib"] = gib(torch.cuda.memory_allocated()) if device.startswith("cuda") else None
    if q.prepare_kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.hardware.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        cfg = with_changes(cfg, {"hardware": {"gradient_checkpointing": False}})   # already enabled
    keep_cpu_training_layout(model)          # a --smoke run on the CPU: bitsandbytes' layout with a backward
    model.requires_grad_(False)
    model.config.use_cache = False
    # what the vlm command does: LoRA on the language model, the projector trained (peft's modules_to_save)
    model = add_lora(model, cfg.lora, train_projector=True, gradient_checkpointing=cfg.hardware.gradient_checkpointing)
    opt = vlm_optimizer(model, SimpleNamespace(settings=cfg), device)
    row["optimizer"] = f"{type(opt).__module__.split('.')[0]} {type(opt).__name__}"
    return model, opt


def train(model, opt, config, cfg, row: dict, *, steps: int, accum: int, device: str, dtype) -> int:
    """``steps`` optimizer steps of ``accum`` micro-steps, each recorded in ``row["steps"]``; returns micro-steps."""
    cuda = device.startswith("cuda")
    images = photos_336(cfg.data.image_size)
    gen = torch.Generator().manual_seed(0)
    row["steps"] = []
    micro = 0
    for step in range(steps):
        if cuda and step == 1:                       # step 1 is a warm-up: optimizer states appear in it
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss_sum = 0.0
        for _ in range(accum):
            batch = batch_for(config, cfg, images[micro % len(images)], device, dtype, gen)
            micro += 1
            loss = model(**batch).loss / accum
            loss.backward()
            loss_sum += loss.item()
            del loss, batch
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"loss": round(loss_sum, 4), "seconds": round(time.perf_counter() - t, 3)}
        if cuda:
            torch.cuda.synchronize()
            rec["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
            rec["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
        row["steps"].append(rec)
    return micro


def close_row(row: dict, opt, est, *, cap_gib, steps: int, micro: int, cuda: bool) -> None:
    """The run's figures from its steps: peaks over steps 2..N, the estimator's error, the cap verdict."""
    row["steps_completed"] = len(row["steps"])
    row["micro_steps_completed"] = micro
    row["losses_finite"] = all(math.isfinite(s["loss"]) for s in row["steps"])
    row["paged_optimizer_gib"] = gib(paged_bytes(opt))
    if cuda:
        row["peak_allocated_gib"] = max(s["peak_allocated_gib"] for s in row["steps"][1:] or row["steps"])
        row["peak_reserved_gib"] = max(s["peak_reserved_gib"] for s in row["steps"][1:] or row["steps"])
        row["error_pct"] = round(100 * (est.total_gib - row["peak_allocated_gib"]) / row["peak_allocated_gib"], 1)
        row["under_cap"] = bool(cap_gib) and row["peak_reserved_gib"] <= cap_gib
    row["seconds_per_step"] = round(sum(s["seconds"] for s in row["steps"][1:]) / max(1, steps - 1), 3)
    row["status"] = "ok"


def run_one(preset: str, changes: dict, cap_gib, steps: int, accum: int, device: str = "cuda",
            tiny: bool = False) -> dict:
    """Build, wrap and train one configuration; return what was measured (peak memory in GiB)."""
    cfg = with_changes(get_preset(preset), changes)
    cuda = device.startswith("cuda")
    row = {"preset": preset, "changes": changes, "cap_gib": cap_gib, "config": cfg.summary(),
           "max_length": cfg.data.max_length, "image_size": cfg.data.image_size, "lora_rank": cfg.lora.rank,
           "optimizer_steps": steps, "gradient_accumulation_steps": accum}
    est = estimate_vlm(MODEL, cfg, gradient_accumulation_steps=accum)
    row["estimate"] = est.as_dict()
    row["lm_tokens"] = est.lm_tokens
    if cuda and cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total)
    config = model_config(cfg, tiny)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.hardware.mixed_precision]
    t0 = time.perf_counter()
    try:
        model, opt = build_for_training(config, cfg, device, dtype, row)
        micro = train(model, opt, config, cfg, row, steps=steps, accum=accum, device=device, dtype=dtype)
        close_row(row, opt, est, cap_gib=cap_gib, steps=steps, micro=micro, cuda=cuda)
    except torch.OutOfMemoryError as err:
        row["status"] = "oom"
        row["error"] = str(err).splitlines()[0][:300]
        row["steps_completed"] = len(row.get("steps", []))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# --------------------------------------------------------------------------- the parent process
def spawn(name: str, preset: str, changes: dict, cap, steps: int, accum: int, timeout: int) -> dict:
    """``run_one`` in a fresh process; a crash becomes a row with status ``oom`` or ``error``."""
    spec = json.dumps({"preset": preset, "changes": changes, "cap_gib": cap, "steps": steps, "accum": accum})
    try:
        rows = run_worker("benchmarks.vlm_8gb", ["--worker", spec], label=name, timeout=timeout,
                          env={"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"})
    except WorkerError as err:
        rows = err.rows or [{"preset": preset, "changes": changes, "cap_gib": cap,
                             "status": "oom" if err.out_of_memory else "error", "error": str(err)[:400]}]
    return {"name": name, **rows[0]}


def with_fallbacks(name: str, run: tuple, args) -> list[dict]:
    """One run; for a proof that runs out of memory, then the fallbacks in order until one fits."""
    preset, changes, cap = run
    steps = args.knob_steps if name.startswith("knob: ") else args.steps
    row = spawn(name, preset, changes, cap, steps, args.accum, args.timeout)
    rows = [row]
    if row["status"] != "oom" or name not in PROOFS:
        return rows
    for fb in FALLBACKS:                         # search for what does fit under this cap
        merged = merge(changes, fb)
        if merged == changes:
            continue
        alt = spawn(f"{name} -> {json.dumps(fb)}", preset, merged, cap, steps, args.accum, args.timeout)
        alt["fallback_for"] = name
        rows.append(alt)
        if alt["status"] == "ok":
            break
    return rows


def summarise(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    out = {}
    for name in PROOFS:
        if name in by:
            r = by[name]
            fit = next((f for f in rows if f.get("fallback_for") == name and f["status"] == "ok"), None)
            out[name] = {"status": r["status"], "cap_gib": r["cap_gib"], "lm_tokens": r.get("lm_tokens"),
                         "steps_completed": r.get("steps_completed", 0),
                         "peak_allocated_gib": r.get("peak_allocated_gib"),
                         "peak_reserved_gib": r.get("peak_reserved_gib"),
                         "estimate_gib": r.get("estimate", {}).get("total_gib"),
                         "what_fits_instead": None if r["status"] == "ok" or not fit else
                         {"changes": fit["changes"], "peak_allocated_gib": fit.get("peak_allocated_gib"),
                          "lm_tokens": fit.get("lm_tokens")}}
    base = by.get("8gb-s512", {}).get("peak_allocated_gib")
    knobs = []
    for r in rows:
        if r["name"].startswith("knob: ") and r["status"] == "ok" and base:
            est_base = by["8gb-s512"]["estimate"]["total_gib"]
            knobs.append({"knob": r["name"][6:], "peak_allocated_gib": r["peak_allocated_gib"],
                          "delta_gib": round(r["peak_allocated_gib"] - base, 3),
                          "estimate_delta_gib": round(r["estimate"]["total_gib"] - est_base, 3)})
    return {"proofs": out, "knobs": knobs}


def record(figures: dict, row: dict, out, t0: float) -> None:
    """Add a finished run, rewrite the file (a cut benchmark keeps every finished run), print one line."""
    figures["rows"].append(row)
    figures.update(summarise(figures["rows"]))
    figures["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_benchmark("vlm_8gb", figures, out)
    peak = row.get("peak_allocated_gib")
    print(f"[{time.perf_counter() - t0:5.0f} s] {row['name']:<44} {row['status']:<5} "
          f"tokens {row.get('lm_tokens', '?')}  peak {peak if peak is not None else '-'} GiB  "
          f"estimate {row.get('estimate', {}).get('total_gib', '-')} GiB  "
          f"steps {row.get('steps_completed', 0)}", flush=True)


def chosen_runs(args) -> dict:
    """name -> (preset, changes, cap) of the runs ``--quick`` / ``--only`` select."""
    if args.only:
        return {n: s for n, s in {**PROOFS, **knob_runs()}.items()
                if n in args.only or ("knobs" in args.only and n.startswith("knob: "))}
    runs = {n: PROOFS[n] for n in (QUICK if args.quick else PROOFS)}
    if not args.quick:
        runs.update(knob_runs())
    return runs


def smoke() -> None:
    """Every run's plumbing on a tiny LLaVA on the CPU, in this process."""
    small = {"data": {"max_length": 32, "image_size": 28}}
    for name, (preset, changes, _cap) in {**PROOFS, **knob_runs()}.items():
        row = run_one(preset, merge(changes, small), None, 2, 2, device="cpu", tiny=True)
        print(f"{name:<44} {row['status']} steps {row.get('steps_completed')} finite {row.get('losses_finite')}")


def parse_args(argv):
    parser = OneLineParser(prog="python -m benchmarks.vlm_8gb", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="result file (default: benchmarks/results/vlm_8gb.json)")
    parser.add_argument("--quick", action="store_true", help="only the two 8 GB proofs (and their search)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="proof names and/or 'knobs'")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of each proof")
    parser.add_argument("--knob-steps", type=int, default=3, help="optimizer steps of each knob run")
    parser.add_argument("--accum", type=int, default=2, help="micro-steps (batch 1) per optimizer step")
    parser.add_argument("--jobs", type=int, default=3, help="runs at a time (separate processes, one GPU)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed per run")
    parser.add_argument("--smoke", action="store_true", help="tiny LLaVA on the CPU, in this process; no file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        emit(run_one(spec["preset"], spec["changes"], spec["cap_gib"], spec["steps"], spec["accum"]))
        return 0
    if args.smoke:
        smoke()
        return 0
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible; this benchmark measures GPU memory (the plan alone: "
              "qlora_helpers.ch04_vlm.vram.plan('ultra_low_memory', 'llava-1.5-7b'))", file=sys.stderr)
        return 2
    figures = {**NOTES, "jobs_at_a_time": args.jobs, "rows": []}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for rows in pool.map(lambda item: with_fallbacks(*item, args), chosen_runs(args).items()):
            for row in rows:
                record(figures, row, args.out, t0)
    print(json.dumps(figures["proofs"], indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
