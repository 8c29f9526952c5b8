"""``python -m qlora_helpers vlm``: QLoRA on any image-text-to-text model, on your images.

    python -m qlora_helpers vlm --model_id llava-hf/llava-1.5-7b-hf --data_path train.jsonl \\
        --val_path val.jsonl --preset ultra_low_memory --output_dir outputs/my-vlm
    python -m qlora_helpers vlm --config_file my-vlm.json --lora.rank 16 --max_steps 200
    python -m qlora_helpers vlm --config_file my-vlm.json --resume      # after an interruption

Settings come from a preset (``ultra_low_memory`` 8 GB, ``balanced`` 12 GB, ``quality`` 24 GB; see
``ch04_vlm.config``), then the JSON ``--config_file`` (run keys at the top, sections such as
``"lora": {"rank": 16}``), then flags: ``--max_steps 50``, ``--lora.rank 16``,
``--training.gradient_accumulation_steps 8``. The data format is ``ch04_vlm.records``'s; every line
is checked, and every example encoded, before the model loads. What the output folder receives is
in ``ch04_vlm.trainer``. The processor's own image size is used (``data.image_size`` is for plans).
``--hardware.embeddings_on_cpu`` keeps the frozen input embedding table in CPU memory (see
``common.models.embeddings_on_cpu``): 1 GiB less on the GPU for a large untied vocabulary such as
Qwen2-VL-7B's, the same losses, for as much CPU memory and a small copy per step.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from transformers import set_seed

from qlora_helpers.ch03_sft.command import _bool, load_config_file, resolve_device, setting
from qlora_helpers.ch04_vlm import config as vc
from qlora_helpers.ch04_vlm.hub_model import (
    add_lora,
    load_processor,
    load_vlm,
    quantized_share,
    takes_images,
)
from qlora_helpers.ch04_vlm.records import encode_all, read_records, text_tokens
from qlora_helpers.ch04_vlm.trainer import HISTORY, train_vlm
from qlora_helpers.ch04_vlm.vram import ANSWER_TOKENS, estimate_vlm
from qlora_helpers.common.device import cpu_compute_dtype
from qlora_helpers.common.files import atomic_write_json
from qlora_helpers.common.models import check_model_folder, count_parameters, embeddings_on_cpu
from qlora_helpers.common.run_folder import CHECKPOINTS, MAY_CHANGE, data_digest, disk_full_is_one_line, inspect_folder
from qlora_helpers.errors import check_keys

# What a --resume may change (common.run_folder's rule, as for sft): every other setting must be the checkpoint's.
VLM_MAY_CHANGE = (*MAY_CHANGE, "val_path", "preset", "name", "budget_gb", "hardware.gradient_checkpointing",
                  "hardware.embeddings_on_cpu")
CONFIG, SUMMARY = "vlm_config.json", "vlm_summary.json"
VLM_WRITES = (CONFIG, SUMMARY, HISTORY, CHECKPOINTS, "best", "final")   # the names a run writes into output_dir


@dataclass
class VLMRun:
    model_id: str = setting("", "a from_pretrained folder or hub id: LLaVA, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM")
    data_path: str = setting("", "training JSONL: {\"image\": \"a.png\", \"messages\": [...]} per line "
                                 "(ch04_vlm.records)")
    val_path: str = setting("", "validation JSONL; without it no validation loss and no best adapter")
    output_dir: str = "outputs/vlm"
    preset: str = setting("ultra_low_memory", "ultra_low_memory (8 GB) | balanced (12 GB) | quality (24 GB): "
                                           "the settings flags change")
    max_steps: int = setting(100, "optimizer steps")
    eval_steps: int = setting(20, "validation loss every N steps (and at the end; 0: at the end only)")
    save_steps: int = setting(20, "a checkpoint every N steps, for --resume (0: none)")
    save_total_limit: int = 2
    max_grad_norm: float = 1.0
    train_projector: bool = setting(False, "train the image-to-text projector too (saved with the adapter)")
    seed: int = 0
    device: str = setting("auto", "auto | cpu | cuda")
    resume: bool = setting(False, "continue from output_dir/checkpoints/latest: the same loss curve (from step 0 if "
                                  "the run stopped before its first checkpoint)")
    overwrite_output_dir: bool = setting(False, "allow a non-empty output_dir: the files an earlier run wrote there "
                                                "go (.course_files.json lists them), yours stay")
    settings: vc.VLMTrainConfig = field(default_factory=lambda: vc.preset("ultra_low_memory"))


RUN_KEYS = [f.name for f in fields(VLMRun) if f.name != "settings"]
CONFIG_KEYS = [f.name for f in fields(vc.VLMTrainConfig)]


def _names(text: str) -> tuple:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _flags():
    """``(flag, default, help)`` of every run key, then of every ``section.key`` of the settings."""
    for f in fields(VLMRun):
        if f.name != "settings":
            yield f.name, f.default, f"{f.metadata.get('help', '')} (default {f.default!r})".strip()
    for section, cls in vc.SECTIONS.items():
        for f in fields(cls):
            default = getattr(cls(), f.name)
            yield f"{section}.{f.name}", default, f"the preset's unless given (ch04_vlm.config; e.g. {default!r})"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", help="JSON file of settings; flags given here override it")
    for key, default, text in _flags():
        kind = _bool if isinstance(default, bool) else _names if key == "lora.targets" else type(default)
        extra = {"nargs": "?", "const": True} if isinstance(default, bool) else {}
        parser.add_argument(f"--{key}", dest=key, type=kind, default=argparse.SUPPRESS, help=text,
                            metavar=key.split(".")[-1].upper(), **extra)


def build_run(values: dict, flags: dict, source: str = "config") -> VLMRun:
    """A run from a config file's ``values`` and command-line ``flags`` (run keys and ``section.key``)."""
    check_keys(values, RUN_KEYS + CONFIG_KEYS, source, "vlm")
    merged = {**values, **{k: v for k, v in flags.items() if "." not in k}}
    name = merged.get("preset", VLMRun.preset)
    settings = vc.to_dict(vc.preset(name))
    for key in CONFIG_KEYS:
        if isinstance(merged.get(key), dict):
            settings[key].update(merged[key])
        elif key in merged:
            settings[key] = merged[key]
    for key, value in flags.items():
        if "." in key:
            section, sub = key.split(".", 1)
            settings[section][sub] = list(value) if isinstance(value, tuple) else value
    run = VLMRun(**{k: merged[k] for k in RUN_KEYS if k in merged})
    return validate(replace(run, settings=vc.from_dict(settings, source)))


def validate(run: VLMRun) -> VLMRun:
    """One-line ``ValueError`` for what the trainer cannot do with these settings."""
    if not run.model_id:
        raise ValueError("model_id is empty: give --model_id, a from_pretrained folder or a hub id "
                         "(e.g. llava-hf/llava-1.5-7b-hf)")
    if not run.data_path:
        raise ValueError("data_path is empty: give --data_path, a JSONL file of {\"image\", \"messages\"} lines")
    if run.settings.method == "full":
        raise ValueError("method 'full' is not what the vlm command trains: use --preset quality (lora) or "
                         "ultra_low_memory (qlora)")
    for key in ("max_steps", "save_total_limit"):
        if getattr(run, key) < 1:
            raise ValueError(f"{key} must be >= 1, not {getattr(run, key)}")
    for key in ("eval_steps", "save_steps"):
        if getattr(run, key) < 0:
            raise ValueError(f"{key} must be >= 0 (0: never), not {getattr(run, key)}")
    if run.max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), not {run.max_grad_norm}")
    if run.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {run.device!r}")
    resolve_device(run)                      # refuses cuda where torch sees none
    if run.resume and run.overwrite_output_dir:
        raise ValueError("resume and overwrite_output_dir contradict: keep one of them")
    return run


def config_from_args(args: argparse.Namespace) -> VLMRun:
    source = getattr(args, "config_file", None)
    values = load_config_file(source) if source else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config_file", "debug")}
    return build_run(values, flags, source or "config")


def cli(args: argparse.Namespace) -> int:
    run = config_from_args(args)
    summary = run_vlm(run).summary
    best = summary["history"]["best"]
    evals = summary["history"]["eval"]
    val = f"val loss {evals[0]['val_loss']:.4f} -> {evals[-1]['val_loss']:.4f}, best at step {best['step']}; " \
        if best else ""
    print(f"{summary['model_type']} {run.settings.method}: {run.max_steps} steps, trainable "
          f"{summary['params']['trainable']:,} of {summary['params']['total']:,}; {val}adapters in {run.output_dir}")
    return 0


def cpu_threads() -> str:
    """Set torch's CPU threads for batch-1 training, and say why.

    When other jobs take cores away, torch's OpenMP threads keep waiting for each other and the many
    small operations of a batch-1 step run 5-10 times slower than on one thread (seen on a shared
    2-core machine). So: one thread on a machine of two cores or fewer, or on a busy one (load
    average above the cores we may use); otherwise torch's default. The setting holds for the rest of the
    process (the notebook grades on the same threads); where the OS reports no load average, it counts as idle.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores <= 2 or load > cores - 0.5:
        torch.set_num_threads(1)
    why = "two cores or fewer" if cores <= 2 else "busy" if load > cores - 0.5 else "idle enough"
    n = torch.get_num_threads()
    return f"load average {load:.1f} on {cores} cores ({why}): torch runs on {n} thread{'s' * (n > 1)}"


def run_settings(run: VLMRun) -> dict:
    """Every setting of the run and the digest of its data file: what each checkpoint records."""
    return {**{k: getattr(run, k) for k in RUN_KEYS}, **vc.to_dict(run.settings),
            "data_sha256": data_digest(run.data_path)}


def vlm_config(run: VLMRun) -> dict:
    return {**asdict(run), "settings": vc.to_dict(run.settings)}


@dataclass
class VLMResult:
    summary: dict        # also output_dir/vlm_summary.json
    model: object        # the trained PeftModel, in train mode, on its device
    processor: object
    val: list            # the encoded validation examples


def run_estimate(run: VLMRun, examples: list, processor) -> dict:
    """Chapter 04's estimate of this run's training peak allocated memory on a GPU (``vram.estimate_vlm``: the
    chapter-01 estimator's language model plus the vision side) at its longest example's text and image tokens;
    ``gib`` is None, and ``of`` says why, where the estimator does not model the model."""
    longest = max(examples, key=lambda e: e["input_ids"].shape[-1])
    text = text_tokens(longest["input_ids"], processor)
    images = longest["input_ids"].shape[-1] - text
    try:
        est = estimate_vlm(run.model_id, run.settings, max_length=text, loss_rows=ANSWER_TOKENS,
                           image_tokens_per_sample=images)
    except (ValueError, OSError) as err:
        return {"gib": None, "of": f"no estimate: {str(err).splitlines()[0]}"}
    return {"gib": round(est.total_gib, 3),
            "of": f"chapter 04's estimate of training, {run.settings.method}, {text} text + {images} image tokens"}


def run_vlm(run: VLMRun, *, progress: bool = True, callbacks=()) -> VLMResult:
    """Check, encode, load, train, save; returns the summary (also ``vlm_summary.json``) and the model."""
    validate(run)
    folder = inspect_folder(run.output_dir, resume=run.resume, overwrite=run.overwrite_output_dir,
                            writes=VLM_WRITES, finished=SUMMARY)    # nothing changes there before the model loads
    records = read_records(run.data_path), read_records(run.val_path, "--val_path") if run.val_path else []
    fingerprint = folder.check_settings(run_settings(run), may_change=VLM_MAY_CHANGE)
    run = replace(run, resume=folder.checkpoint is not None)       # stopped before its first checkpoint: step 0
    check_model_folder(run.model_id, setting="model_id", kind="vision")
    processor = load_processor(run.model_id)
    if not takes_images(run.model_id):
        raise ValueError(f"model_id {run.model_id!r} has no vision part (no vision_config): the vlm command trains "
                         "image-text-to-text models; train a text model with `python -m qlora_helpers sft`")
    train, val = (encode_all(r, processor, run.settings.data.max_length) for r in records)
    device = resolve_device(run)
    dtype = getattr(torch, run.settings.quantization.compute_dtype) if device == "cuda" else cpu_compute_dtype()
    threads = cpu_threads() if device == "cpu" else "GPU run: CPU threads left as they are"
    expected = run_estimate(run, train, processor)   # before training, and before the seed: it builds no weights,
    set_seed(run.seed)                               # but an empty model, whose init may draw random numbers
    model = load_vlm(run.model_id, quantization=run.settings.quantization, dtype=dtype, device=device)
    if run.settings.hardware.embeddings_on_cpu:
        embeddings_on_cpu(model, device, "hardware.embeddings_on_cpu")
    model = add_lora(model, run.settings.lora, train_projector=run.train_projector,
                     gradient_checkpointing=run.settings.hardware.gradient_checkpointing)
    out = folder.start(VLM_WRITES, config=None if run.resume else (CONFIG, vlm_config(run)))   # a resume: at the end
    with disk_full_is_one_line(out):
        history = train_vlm(model, train, val, run, processor=processor, out=out, device=device,
                            fingerprint=fingerprint, progress=progress, callbacks=callbacks)
        summary = {"model_id": run.model_id, "model_type": model.config.model_type, "device": device,
                   "estimate": expected,
                   "dtype": str(dtype).removeprefix("torch."), "threads": threads, "params": count_parameters(model),
                   "linear_layers": quantized_share(model),
                   "examples": {"train": len(train), "val": len(val)}, "history": history}
        if run.resume:
            atomic_write_json(out / CONFIG, vlm_config(run))
        atomic_write_json(out / SUMMARY, summary)
    return VLMResult(summary, model, processor, val)
