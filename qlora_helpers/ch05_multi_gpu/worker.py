"""Data-parallel QLoRA started from a notebook: each rank runs the course's ``sft`` command on the reversal task.

``accelerate.notebook_launcher(train_worker, args=(run,), num_processes=N)`` forks N processes, each running
``train_worker``. What touches CUDA, bitsandbytes or peft is imported inside it (the launcher refuses to fork
a parent that has imported bitsandbytes). Each rank:

1. picks its precision (``qlora_helpers.ch05_multi_gpu.precision``: bf16, fp16 with loss scaling, or fp32);
2. turns ``run`` into the ``sft`` command's settings (``sft_config``: QLoRA 4-bit, the YAML config's LoRA and
   optimisation, ``constant_with_warmup``) and calls ``ch03_sft.command.run_sft``: TRL's ``SFTTrainer`` loads
   its own 4-bit copy of the model, wraps it in DDP (only LoRA gradients travel) and trains its share of
   every global batch;
3. at each epoch end ``plateau.PlateauCallback`` applies the chapter's rule to the validation loss, which
   every rank computes alike (each scores its share, the sums are all-reduced), saves ``best/`` and stops;
   ``RunRecord`` writes ``training_history.json`` (rank 0) and scores the questions before training;
4. after training, asks both directions' questions (each rank its share) and rank 0 writes ``run.json``.

On a CPU the same code runs on gloo with 2 processes (how the tests check that gradients synchronise);
``python -m qlora_helpers.ch05_multi_gpu.worker`` is the same run from a shell (``accelerate launch``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import PartialState, notebook_launcher
from accelerate.utils import gather_object, patch_environment, reduce
from safetensors.torch import save
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from qlora_helpers.ch05_multi_gpu import precision as P
from qlora_helpers.ch05_multi_gpu.config import check_config, load_config
from qlora_helpers.ch05_multi_gpu.reversal import (
    TASKS,
    accuracy,
    eval_items,
    evaluate_items,
    generate_data,
    training_set,
)
from qlora_helpers.ch05_multi_gpu.schedule import PlateauSchedule, number
from qlora_helpers.common import assets
from qlora_helpers.common.bench import report_section
from qlora_helpers.common.files import atomic_open, atomic_write_json, write_new_folder
from qlora_helpers.common.shapes import get_config, tokenizer_asset
from qlora_helpers.errors import OneLineParser, run_main

CPU_PROCESSES = 2
RUN_FILES = ("final", "best", "training_history.json", "run.json")   # what a run writes into OUTPUT_DIR/NAME_TASK


# --------------------------------------------------------------------------- the parent: no CUDA here
def visible_gpus() -> int:
    """CUDA devices visible to this process, counted through NVML: CUDA stays uninitialised, so fork is safe."""
    with patch_environment(pytorch_nvml_based_cuda_check="1"):
        return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_launch(profile: str, num_processes: int = 0, *, gpus: int | None = None) -> tuple[str, int]:
    """(profile, processes): ``auto`` is ``gpu`` when a GPU is visible; 0 processes = one per GPU, 2 on a CPU.

    >>> resolve_launch("auto", 0, gpus=8), resolve_launch("auto", 0, gpus=0), resolve_launch("cpu", 3, gpus=2)
    (('gpu', 8), ('cpu', 2), ('cpu', 3))
    """
    gpus = visible_gpus() if gpus is None else gpus
    if profile not in ("auto", "cpu", "gpu"):
        raise ValueError(f"profile must be auto, cpu or gpu, not {profile!r}")
    if profile == "gpu" and not gpus:
        raise ValueError("profile='gpu' but no CUDA device is visible: use profile='cpu' or 'auto'")
    profile = ("gpu" if gpus else "cpu") if profile == "auto" else profile
    n = num_processes or (gpus if profile == "gpu" else CPU_PROCESSES)
    if profile == "gpu" and n > gpus:
        raise ValueError(f"num_processes={n} but only {gpus} GPU(s) are visible: one process per GPU, use 0 for all")
    if n < 1:
        raise ValueError(f"num_processes must be 0 (automatic) or more, not {n}")
    return profile, n


def free_port() -> str:
    """A free TCP port for the rendezvous, so two runs on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(function, args=(), *, num_processes: int, use_port: str) -> None:
    """accelerate's ``notebook_launcher``, also for a single process. Given one, the launcher would run ``function``
    in this kernel, which must stay free of CUDA and bitsandbytes (the launches after it fork it); here one process
    is forked the way the launcher starts the ranks of several (torch's elastic launch): a process group of one."""
    if num_processes > 1:
        notebook_launcher(function, args=args, num_processes=num_processes, use_port=use_port)
        return
    print("Launching training in one process, a group of one.")
    # LaunchConfig asks CUDA how many GPUs there are: through NVML, or this kernel could no longer fork
    with patch_environment(nproc=1, node_rank=0, world_size=1, master_addr="127.0.0.1", master_port=use_port,
                           pytorch_nvml_based_cuda_check="1"):
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, run_id="none", rdzv_backend="static",
                              rdzv_endpoint=f"127.0.0.1:{use_port}", rdzv_configs={"rank": 0}, max_restarts=0,
                              monitor_interval=0.1, start_method="fork")
        elastic_launch(config=config, entrypoint=function)(*args)


def report_peaks(summary: dict, section: str) -> None:
    """A GPU run's peaks, each rank's (``run.json``), beside the run's estimate, as a section of the notebook's GPU
    record (``common.bench.report_section``); a CPU run has none."""
    for rank, (allocated, reserved) in enumerate(zip(summary["peak_allocated_gib"], summary["peak_reserved_gib"])):
        if allocated is not None:
            report_section(f"{section}, rank {rank}", allocated, reserved, summary["estimate"]["gib"],
                           summary["estimate"]["of"])


def keep_peak(folder, rank: int, device) -> None:
    """In a rank on a GPU (``device``, this rank's): its peak so far (``max_memory_allocated``,
    ``max_memory_reserved``) as ``folder/rank<r>.json``, for ``report_kept_peaks`` in the kernel, which may not touch
    CUDA; on a CPU, nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        atomic_write_json(Path(folder) / f"rank{rank}.json",
                          {"allocated": torch.cuda.max_memory_allocated(device) / 2**30,
                           "reserved": torch.cuda.max_memory_reserved(device) / 2**30})


def report_kept_peaks(folder, section: str, estimate: dict) -> None:
    """In the kernel, after a launch: each rank's peak ``keep_peak`` wrote into ``folder`` (a fresh one for each
    launch: ``tempfile.mkdtemp()``), beside ``estimate`` (``gib``, ``of``), as a section of the notebook's GPU record
    (``common.bench.report_section``). The folder is removed."""
    folder = Path(folder)
    for path in sorted(folder.glob("rank*.json"), key=lambda p: int(p.stem[4:])):
        peak = json.loads(path.read_text())
        path.unlink()
        report_section(f"{section}, rank {path.stem.removeprefix('rank')}", peak["allocated"], peak["reserved"],
                       estimate["gib"], estimate["of"])
    folder.rmdir()


def _earlier_run(out: Path) -> bool:
    """Whether ``out`` holds an earlier run: the ``sft`` command's settings in ``final/``, or this worker's history."""
    if (out / "final" / "sft_config.json").is_file():
        return True
    try:
        return {"task", "steps"} <= set(json.loads((out / "training_history.json").read_text()))
    except (OSError, ValueError, TypeError):
        return False


def check_run_folder(run: dict) -> Path:
    """The run's folder ``output_dir/NAME_TASK``; refused in one line when the run would replace what no earlier run
    wrote there (``RUN_FILES``, ``rank*_lora.safetensors``). A run replaces only those, and an earlier run's
    ``final/`` (the ``sft`` settings' ``overwrite_output_dir``): a user's other files there stay as they are."""
    name = f"{run['name']}_{run['task']}"
    if Path(name).name != name or name.startswith("."):
        raise ValueError(f"name {run['name']!r} must be a plain folder name (no '/', no leading '.'), "
                         "e.g. lfw_reversal")
    out = Path(run["output_dir"]) / name
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file: choose another output_dir or name")
    empty = lambda p: p.is_dir() and not p.is_symlink() and all(q.name.startswith(".") for q in p.iterdir())
    mine = sorted(p.name for p in out.glob("*")      # (a folder holding only a killed write's hidden leftovers: none)
                  if (p.name in RUN_FILES or p.match("rank*_lora.safetensors")) and not empty(p))
    if mine and not _earlier_run(out) or (out / "best").exists() and not (out / "best").is_symlink():
        raise ValueError(f"output folder {out} holds {', '.join(mine)}, which no run of this chapter wrote and a run "
                         "would replace: choose another output_dir or name")
    return out


# --------------------------------------------------------------------------- the run as sft settings
def steps_per_epoch(n_train: int, *, world: int, batch_size: int, accum: int) -> int:
    """Optimizer steps in one epoch of the Trainer, which keeps the last partial batch.

    >>> steps_per_epoch(14, world=2, batch_size=2, accum=1), steps_per_epoch(14, world=2, batch_size=2, accum=2)
    (4, 2)
    """
    return max(1, math.ceil(math.ceil(math.ceil(n_train / world) / batch_size) / accum))


def base_model(model_id: str, folder: Path) -> str:
    """The folder ``run_sft`` loads: ``model_id``; for ``tiny:llama``/``tiny:qwen2`` a written 2-layer model; for
    ``random:<preset>`` the preset's config and tokenizer only (``random_model`` builds the weights)."""
    kind, _, name = model_id.partition(":")
    if kind == "tiny":
        from qlora_helpers.common.models import write_tiny_model  # imports bitsandbytes: in the rank only
        return str(write_tiny_model(folder / f"tiny-{name}", family=name))
    if kind != "random":
        return model_id

    def write(tmp: Path) -> None:
        get_config(name).save_pretrained(tmp)
        family = tokenizer_asset(name)
        AutoTokenizer.from_pretrained(assets.verify(family, only=assets.TOKENIZER_FILES)).save_pretrained(tmp)

    return str(write_new_folder(folder / f"random-{name}", write))


def random_model(model_id: str, lora: dict):
    """``run_sft``'s ``model_factory`` for ``random:<preset>``: random 4-bit weights built layer by layer, LoRA on."""
    from qlora_helpers.ch03_sft.modes import compute_dtype  # peft, bitsandbytes: in the rank only
    from qlora_helpers.ch05_multi_gpu.model import add_lora, load_model

    def build(cfg, device: str):
        model, _ = load_model(model_id, f"{cfg.quantization_bit}bit", dtype=compute_dtype(cfg), device=device)
        return add_lora(model, lora, cfg.gradient_checkpointing, cfg.seed)
    return build


def sft_config(run: dict, prec: P.Precision, *, model: str, n_train: int, world: int, cuda: bool):
    """The ``sft`` command's settings for ``run`` (``SFTConfig``), and the plateau rule of its config."""
    from qlora_helpers.ch03_sft.command import SFTConfig
    from qlora_helpers.common.optim import trainer_optim

    lora, tr = run["config"]["lora"], run["config"]["training"]
    bs, accum = int(tr["batch_size"]), int(tr["gradient_accumulation_steps"])
    epochs, max_steps = int(tr["num_epochs"]), int(run.get("max_steps") or 0)
    per_epoch = steps_per_epoch(n_train, world=world, batch_size=bs, accum=accum)
    total = min(per_epoch * epochs, max_steps) if max_steps > 0 else per_epoch * epochs
    rule = PlateauSchedule.from_config(tr, total)
    optim = str(tr.get("optimizer", "adamw"))
    trainer_optim(optim, setting="training.optimizer")    # one line naming the setting if it is unknown
    if not cuda:    # nothing to page on a CPU
        optim = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw"}.get(optim, optim)
    cfg = SFTConfig(
        model_name_or_path=model, output_dir=str(Path(run["output_dir"]) / f"{run['name']}_{run['task']}" / "final"),
        use_qlora=True, quantization_bit=8 if run.get("quantize") == "8bit" else 4, lora_r=int(lora["r"]),
        lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
        lora_target_modules=list(lora["target_modules"]),
        init_adapter=run.get("init_adapter") or "", learning_rate=rule.learning_rate, num_train_epochs=epochs,
        max_steps=max_steps or -1, per_device_train_batch_size=bs, per_device_eval_batch_size=2 * bs,
        gradient_accumulation_steps=accum, max_length=int(tr.get("max_length", 256)),
        warmup_steps=rule.warmup_steps, lr_scheduler_type="constant_with_warmup",
        weight_decay=number(tr.get("weight_decay", 0.0), "training.weight_decay"),
        max_grad_norm=number(tr.get("max_grad_norm") or 0.0, "training.max_grad_norm"),
        optim=optim,
        gradient_checkpointing=bool(tr.get("gradient_checkpointing", False)), use_liger_kernel=False,
        bf16=prec.compute_dtype == "bf16", fp16=prec.compute_dtype == "fp16", seed=int(tr.get("seed", 0)),
        eval_before=False, save_steps=0, logging_steps=1, device="cuda" if cuda else "cpu",
        overwrite_output_dir=True)    # final/ of an earlier run only: check_run_folder refuses anyone else's
    return cfg, rule, per_epoch


# --------------------------------------------------------------------------- what every rank measures alike
def validation_loss(data, cfg, *, rank: int, world: int, pad_id: int):
    """``val_loss(model)`` for ``PlateauCallback``: the token mean over all of ``data`` (the ``sft`` command's
    ``SFTData``), each rank scoring its share and the sums all-reduced, so every rank decides alike."""
    from qlora_helpers.ch03_sft.data import SFTData
    from qlora_helpers.ch03_sft.trainer import evaluate  # imports peft: in the rank only

    mine = SFTData(data.examples[rank::world], len(data.examples))
    tokens = sum(sum(t != -100 for t in e.labels[1:]) for e in mine.examples)

    def loss(model) -> float:
        device = next(model.parameters()).device
        mean = evaluate(model, mine, cfg.per_device_eval_batch_size, pad_id, str(device), cfg) if tokens else 0.0
        total, count = reduce(torch.tensor([mean * tokens, tokens], dtype=torch.float64, device=device), "sum").tolist()
        return total / max(count, 1)
    return loss


def ask(model, tokenizer, identities: list[dict], *, max_new_tokens: int, task: str = "all") -> dict:
    """``task``'s accuracy (both directions': ``all``), each rank asking its share of the questions; the answers
    of all ranks. ``max_new_tokens=0`` scores the multiple choice only, generating nothing."""
    state, device = PartialState(), next(model.parameters()).device
    items = [it for it in eval_items(identities) if task in ("all", it["direction"])]
    items = items[state.process_index::state.num_processes]
    was_training = model.training
    rows = evaluate_items(model, tokenizer, items, identities=identities, device=device,
                          max_new_tokens=max_new_tokens, generate=max_new_tokens > 0) if items else []
    model.train(was_training)
    everyone = gather_object(rows)
    order = lambda row: (row["direction"], row["wording"], row["identity"])
    return {**accuracy(everyone, len(identities)), "answers": sorted(everyone, key=order)}


def _quiet_libraries() -> None:
    """Silence what every rank would print alike: transformers' progress bars and a known warning."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # bitsandbytes' CPU 4-bit op warns that it has no autograd kernel; LoRA gradients through the layer equal
    # those through the dequantised fp32 weights (tests/test_ddp.py::test_qlora_gradients_on_cpu_are_exact)
    warnings.filterwarnings("ignore", message=r"bitsandbytes::gemv_4bit: an autograd kernel")


def _start(run: dict):
    """This process joined to the others (accelerate's ``PartialState``: gloo on the CPU, NCCL on GPUs), its CPU
    threads shared with the other ranks of the machine, and its precision."""
    gpu = run["profile"] == "gpu"
    if not gpu:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        threads = max(1, (os.cpu_count() or 1) // local_world)
        if local_world > 1:   # a rank of several: accelerate would set it, with a warning
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
    state = PartialState(cpu=not gpu)
    index = state.device.index if gpu else None
    cap, bf16_ok, name = P.detect(index)
    prec = P.choose(cap, bf16_ok, run.get("precision", "auto"))
    P.check_quantize(run.get("quantize", "4bit"), cap, name)
    device = {"rank": state.process_index, "device": str(state.device), "name": name,
              "capability": ".".join(map(str, cap)) if cap else None}
    return state, prec, device


# --------------------------------------------------------------------------- the function each rank runs
def new_history(run: dict, cfg, *, world: int, prec: P.Precision, per_epoch: int) -> dict:
    """``training_history.json`` before the first step: what the run is; ``RunRecord`` adds steps and epochs."""
    return {"task": run["task"], "name": run["name"], "model_id": run.get("model_id") or "SmolLM2-135M-Instruct",
            "data_dir": str(Path(run["data_dir"]).resolve()), "quantize": run.get("quantize", "4bit"),
            "init_adapter": str(Path(cfg.init_adapter).resolve()) if cfg.init_adapter else None,
            "optimizer": cfg.optim, "world_size": world, "precision": prec.as_dict(),
            "global_batch": world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
            "steps_per_epoch": per_epoch, "warmup_steps": cfg.warmup_steps, "status": "running",
            "epochs": [], "steps": []}


def train_worker(run: dict) -> None:
    """The function each rank runs (give it to ``notebook_launcher``); ``run`` is a plain dict (see notebook 05)."""
    # lazy: these load peft and bitsandbytes, which each rank imports after notebook_launcher has forked it
    from qlora_helpers.ch03_sft.command import run_sft
    from qlora_helpers.ch03_sft.data import encode_all
    from qlora_helpers.ch03_sft.modes import load_tokenizer, model_path
    from qlora_helpers.ch05_multi_gpu.plateau import RunRecord
    from qlora_helpers.common.quant import keep_cpu_training_layout

    started = time.perf_counter()
    run = {**run, "config": check_config(run["config"], "the run's config")}   # the notebook checked it: a guard
    check_run_folder(run)
    _quiet_libraries()
    state, prec, device = _start(run)
    seed, model_id = int(run["config"]["training"].get("seed", 0)), run.get("model_id") or ""
    train, val = training_set(run["data_dir"], run["task"], float(run.get("retention_ratio", 0.0)), seed=seed,
                              face_pool=run.get("face_retention_pool"))
    identities = json.loads((Path(run["data_dir"]) / "identities.json").read_text())
    if state.is_main_process:    # save_pretrained writes nothing on the other processes of a run
        base_model(model_id, Path(run["output_dir"]) / "models")
    state.wait_for_everyone()
    base = base_model(model_id, Path(run["output_dir"]) / "models")   # written: its path
    cfg, rule, per_epoch = sft_config(run, prec, model=base, n_train=len(train), world=state.num_processes,
                                      cuda=run["profile"] == "gpu")
    tokenizer = load_tokenizer(model_path(cfg))
    val_data = encode_all([r["messages"] for r in val], tokenizer, cfg.max_length)
    out = Path(cfg.output_dir).parent
    history = new_history(run, cfg, world=state.num_processes, prec=prec, per_epoch=per_epoch)
    max_new = run.get("max_new_tokens", 20)
    before = (lambda m: ask(m, tokenizer, identities, max_new_tokens=0)) \
        if run.get("eval_before", True) else None   # multiple choice only: nothing to generate before training
    record = RunRecord(rule, validation_loss(val_data, cfg, rank=state.process_index, world=state.num_processes,
                                             pad_id=tokenizer.pad_token_id), out=out, history=history, before=before)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{state.num_processes} rank(s) on {device['name']}, {prec.compute_dtype} compute ({prec.reason}); "
              f"{cfg.optim}; {len(train)} training / {len(val)} validation examples, global batch "
              f"{history['global_batch']}, {per_epoch} step(s) per epoch", flush=True)
    factory = random_model(model_id, run["config"]["lora"]) if model_id.startswith("random:") else None
    result = run_sft(cfg, [r["messages"] for r in train], [r["messages"] for r in val], progress=False,
                     trainer_callbacks=[record], model_factory=factory)
    trained = time.perf_counter()
    keep_cpu_training_layout(result.model)   # scored as trained, and as the evaluate command loads it
    result.model.config.use_cache = True     # generation with the cache, as after from_pretrained
    after = ask(result.model, result.tokenizer, identities, max_new_tokens=max_new) \
        if run.get("eval_after", True) else None
    finish_run(run, result, record, devices=gather_object([device]), prec=prec, clock={
        "load": result.summary["load_seconds"], "train": trained - record.clock["train"],
        "evaluation": record.clock.get("before", 0.0) + time.perf_counter() - trained, "started": started},
        accuracy_before=record.before_result, accuracy_after=after)
    state.wait_for_everyone()          # no rank leaves before rank 0 has written run.json
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def finish_run(run: dict, result, record, *, devices: list, prec: P.Precision, clock: dict, accuracy_before,
               accuracy_after) -> None:
    """Every rank's digest (from ``sft_summary.json``) and GPU peak; rank 0 writes the history and ``run.json``."""
    out, history, rank = record.out, record.history, PartialState().process_index
    state = {n: p.detach().float().cpu() for n, p in result.model.named_parameters() if p.requires_grad}   # LoRA
    if run.get("save_rank_states"):
        with atomic_open(out / f"rank{rank}_lora.safetensors", "wb") as fh:
            fh.write(save(state))
    gpu = run["profile"] == "gpu"
    peaks = gather_object([(round(torch.cuda.max_memory_allocated() / 2**30, 3),
                            round(torch.cuda.max_memory_reserved() / 2**30, 3)) if gpu else (None, None)])
    if rank != 0:
        return
    last = history["epochs"][-1] if history["epochs"] else {}
    history.update(status="done", stop_reason=last.get("stop_reason") or "num_epochs", skipped_steps=record.skipped)
    atomic_write_json(out / "training_history.json", history)
    digests = result.summary["processes"]["trainable_sha256"]
    seconds = {k: round(v, 1) for k, v in clock.items() if k != "started"}
    atomic_write_json(out / "run.json", {
        "world_size": len(devices), "devices": devices, "precision": prec.as_dict(),
        "quantize": run.get("quantize", "4bit"), "steps": result.summary["steps"], "epochs": len(history["epochs"]),
        "stop_reason": history["stop_reason"], "skipped_steps": record.skipped, "rank_digests": digests,
        "ranks_identical": len(set(digests)) == 1, "lora_parameters": sum(t.numel() for t in state.values()),
        "peak_allocated_gib": [a for a, _ in peaks], "peak_reserved_gib": [r for _, r in peaks],
        "estimate": result.summary["estimate"],
        "seconds": {**seconds, "total": round(time.perf_counter() - clock["started"], 1)},
        "accuracy_before": accuracy_before, "accuracy": accuracy_after, "best_val_loss": record.schedule.best,
        "output_dir": str(out)})


def main(argv=None) -> None:
    """The same run from a shell, for ``accelerate launch`` / ``torchrun`` (several machines included)::

        torchrun --nproc_per_node 2 -m qlora_helpers.ch05_multi_gpu.worker --profile cpu --max-steps 4
        accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \\
            --main_process_ip $HEAD --main_process_port 29500 -m qlora_helpers.ch05_multi_gpu.worker \\
            --config data/configs/multi_gpu_32b.yaml --model-id Qwen/Qwen2.5-32B-Instruct --task forward

    ``--run FILE`` takes the run dict a notebook gives ``notebook_launcher`` (JSON, data already generated)
    instead of the other options: the tests launch one run both ways and compare.
    """
    p = OneLineParser(prog="python -m qlora_helpers.ch05_multi_gpu.worker",
                      description="data-parallel QLoRA, reversal-curse task")
    p.add_argument("--run", default="", help="a JSON file holding the whole run dict; the other options are ignored")
    p.add_argument("--config", default="data/configs/multi_gpu_32b.yaml")
    p.add_argument("--profile", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--model-id", default="", help="empty: cached SmolLM2; a hub id, a folder, random:PRESET")
    p.add_argument("--task", choices=TASKS, default="forward")
    p.add_argument("--name", default="lfw_reversal")
    p.add_argument("--data-dir", default="outputs/data", help="generated here (the same files on every rank)")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--num-identities", type=int, default=12)
    p.add_argument("--seed", type=int, default=None, help="default: the config's training.seed")
    p.add_argument("--retention-ratio", type=float, default=0.3)
    p.add_argument("--face-retention-pool", default="", help="an earlier stage's data folder: retain its faces, "
                                                               "not general chat")
    p.add_argument("--init-adapter", default="", help="an earlier run's best/ or final/ folder: start from its "
                                                        "LoRA weights (a second stage)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--max-steps", type=int, default=0, help="0: no limit but the schedule's")
    a = p.parse_args(argv)
    if a.run:
        run = json.loads(Path(a.run).read_text())
        check_config(run.get("config"), f"{a.run}: config")
        check_run_folder(run)
        return train_worker(run)
    cfg = load_config(a.config)
    if a.seed is not None:
        cfg["training"]["seed"] = a.seed
    check_run_folder(dict(output_dir=a.output_dir, name=a.name, task=a.task))
    generate_data(a.data_dir, a.num_identities, int(cfg["training"].get("seed", 0)))   # atomic, identical per rank
    train_worker(dict(profile=a.profile, model_id=a.model_id, quantize="4bit", precision=a.precision, config=cfg,
                      data_dir=a.data_dir, task=a.task, name=a.name, output_dir=a.output_dir,
                      retention_ratio=a.retention_ratio, face_retention_pool=a.face_retention_pool or None,
                      init_adapter=a.init_adapter or None, max_steps=a.max_steps))


if __name__ == "__main__":
    sys.exit(run_main(main))
