"""Supervised fine-tuning in four modes from one entry point: full, LoRA, QLoRA 4-bit, QLoRA 8-bit.

The same keys work in a JSON config file and as command-line flags; flags given on the command
line override the file::

    python -m qlora_helpers sft --config_file data/configs/qlora-4bit.json --max_steps 20
    python -m qlora_helpers sft --use_lora --lora_r 16 --lora_alpha 32 --data_path my.jsonl \\
        --output_dir outputs/my-lora --learning_rate 2e-4

The same command runs data-parallel on several processes, one per GPU (the Trainer's DDP), the global
batch being processes x ``per_device_train_batch_size`` x ``gradient_accumulation_steps``; only the main
process writes into ``output_dir``. Without GPUs, add ``--device cpu`` and the processes meet over gloo
(accelerate's ``--cpu`` flag would start one process: its CPU launcher needs MPI for more)::

    accelerate launch --multi_gpu --num_processes 2 -m qlora_helpers sft --config_file data/configs/qlora-4bit.json

No mode flag means full fine-tuning (``--full_finetune`` says so explicitly). ``--use_qlora``
trains LoRA on a base quantised to ``--quantization_bit`` 4 (default) or 8. Contradictory or
invalid settings stop before anything loads, with one line naming the key and the fix.

The output folder receives, at the end, the adapter (``adapter_config.json``,
``adapter_model.safetensors``) or the full model, the tokenizer, ``sft_config.json`` and
``sft_summary.json``; every ``save_steps`` steps a checkpoint goes to ``checkpoints/`` (see
``qlora_helpers.ch03_sft.trainer``: the training is TRL's ``SFTTrainer``). ``.course_files.json`` lists what
the course wrote there. An output folder that already holds files is refused unless ``--resume`` (continue from
``checkpoints/latest``, or from step 0 when the run stopped before its first checkpoint) or
``--overwrite_output_dir`` (the course's files go, yours stay) is given; nothing in it changes before the model
has loaded, and a resume takes the checkpoint's settings and data (``qlora_helpers.common.run_folder``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import PartialState, init_empty_weights
from accelerate.utils import gather_object
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, set_seed

from qlora_helpers.ch01_memory.estimator import OPTIMIZERS as ESTIMATED_OPTIMIZERS
from qlora_helpers.ch01_memory.estimator import estimate, liger_loss_chunk
from qlora_helpers.ch03_sft import data as d
from qlora_helpers.ch03_sft.fused_lora import release_dequantized
from qlora_helpers.ch03_sft.modes import (
    build_model,
    load_tokenizer,
    model_path,
    resolve_target_modules,
    target_names,
    trainable_4bit_layers,
)
from qlora_helpers.ch03_sft.peak_memory import PeakMemory
from qlora_helpers.ch03_sft.trainer import (
    CHECKPOINTS,
    evaluate,
    liger_on,
    tensor_bytes,
    train,
)
from qlora_helpers.common.assets import sft_paths
from qlora_helpers.common.device import cpu_compute_dtype
from qlora_helpers.common.files import atomic_write_json, settle_tree, state_digest
from qlora_helpers.common.models import check_model_folder, count_parameters
from qlora_helpers.common.optim import OPTIMIZERS, optimizer_name
from qlora_helpers.common.run_folder import MAY_CHANGE, RunFolder, disk_full_is_one_line, inspect_folder, record
from qlora_helpers.errors import check_keys

# The settings that take one of a few values, and those values.
CHOICES = {"bnb_4bit_quant_type": ("nf4", "fp4"), "optim": ("auto", *OPTIMIZERS), "device": ("auto", "cpu", "cuda"),
           "attn_implementation": ("auto", "sdpa", "eager", "varlen"),
           "lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup")}
# Settings that count something, and what their smallest value means; none may be negative.
COUNTS = {"max_train_samples": "0: all", "max_eval_samples": "0: all", "eval_steps": "0: only at the end",
          "save_steps": "0: no checkpoints", "save_total_limit": "0: keep every checkpoint",
          "logging_steps": "1: every step", "warmup_steps": "0: no warmup",
          "checkpoint_keep_layers": "0: every layer checkpointed"}
# What only a LoRA or QLoRA run uses: given to full fine-tuning, a sign that a mode flag is missing.
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# What a --resume may change (common.run_folder's rule): every other setting must be the checkpoint's.
SFT_MAY_CHANGE = (*MAY_CHANGE, "num_train_epochs", "eval_data_path", "max_eval_samples", "per_device_eval_batch_size",
                  "eval_before", "logging_steps", "gradient_checkpointing", "memory_budget_gib", "use_liger_kernel",
                  "attn_implementation", "fused_lora", "checkpoint_keep_layers", "activation_offloading",
                  "keep_dequantized", "embeddings_on_cpu")
CONFIG, SUMMARY = "sft_config.json", "sft_summary.json"
# The names a run writes into output_dir, by what it saves (a user's file of such a name is refused, never replaced).
WRITES = {"any": (CONFIG, SUMMARY, CHECKPOINTS, "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                  "chat_template.jinja", "vocab.json", "merges.txt"),
          "full": ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json"),
          "adapter": ("adapter_*", "README.md")}


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _bool_or_auto(text: str) -> bool | str:
    return "auto" if str(text).lower() == "auto" else _bool(text)


def _targets(text: str):
    return None if text.lower() in ("null", "none", "auto") else text


def setting(default, text: str = "", *, parse=None):
    """A field of ``SFTConfig``: its default, its ``--help`` text, and how its flag parses (default: the type of
    the default)."""
    return field(default=default, metadata={"help": text, "parse": parse})


@dataclass
class SFTConfig:
    """The ``sft`` command's settings: each is a key of a config file and a flag (``configure_parser``)."""

    # what to train
    model_name_or_path: str = setting("", "local folder or hub id (default: the cached SmolLM2-135M-Instruct)")
    data_path: str = setting("", "training JSONL, a conversation a line: {\"messages\": [{\"role\": \"user\", "
                                 "\"content\": ...}, {\"role\": \"assistant\", \"content\": ...}]} or "
                                 "{\"instruction\": ..., \"input\": ..., \"output\": ...} (default: chatterbot "
                                 "train split)")
    eval_data_path: str = setting("", "validation JSONL (default: chatterbot validation when data_path is not "
                                      "given, else no eval)")
    output_dir: str = "outputs/sft"
    # the mode
    full_finetune: bool = setting(False, "train every weight (the default when no mode is given)")
    use_lora: bool = setting(False, "freeze the base, train LoRA adapters")
    use_qlora: bool = setting(False, "LoRA on a base quantised to quantization_bit bits")
    quantization_bit: int | None = setting(None, "4 (NF4, the default) or 8 (LLM.int8), with --use_qlora", parse=int)
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: str | list | None = setting(
        None, "attention | mlp | all | null (every linear layer) | q_proj,v_proj,...", parse=_targets)
    init_adapter: str = setting("", "a saved adapter folder (same lora_r and targets): start from its weights, "
                                    "e.g. a second stage")
    # optimisation
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int = setting(-1, "optimizer steps; > 0 overrides num_train_epochs")
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 256
    packing: bool = setting(False, "TRL's best-fit packing of whole conversations into padding-free rows of "
                                   "max_length tokens")
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = setting("auto", "auto (paged_adamw_8bit on CUDA, adamw_torch on the CPU) | adamw_torch | adamw_8bit "
                                 "| paged_adamw_8bit | paged_adamw_32bit (paged: CUDA only)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, more time")
    memory_budget_gib: float = setting(0.0, "plan per_device_train_batch_size (same tokens per step) and "
                                            "checkpointing for this many GiB with the chapter-01 estimator; "
                                            "-1: the GPU's memory; 0: off")
    use_liger_kernel: bool = setting(True, "Liger's fused kernels (a Trainer option), on CUDA where liger-kernel "
                                           "is installed")
    fused_lora: bool | str = setting("auto", "one autograd step for each frozen layer and its LoRA branch "
                                             "(ch03_sft.fused_lora): true | false | auto (on CUDA)",
                                     parse=_bool_or_auto)
    checkpoint_keep_layers: int = setting(0, "with gradient_checkpointing, the last N decoder layers keep their "
                                             "activations (faster, more memory); memory_budget_gib plans it")
    keep_dequantized: bool = setting(False, "QLoRA 4-bit with fused_lora: dequantise each frozen weight once and "
                                            "keep its 16-bit copy for every product (faster, 2 bytes a weight "
                                            "more); memory_budget_gib plans it")
    embeddings_on_cpu: bool = setting(False, "LoRA/QLoRA on CUDA: the frozen input embedding table waits in CPU "
                                             "memory, the looked-up rows go to the GPU (1 GiB less at 7B, the same "
                                             "numbers); memory_budget_gib plans it")
    activation_offloading: bool = setting(False, "TRL's: the activations saved for backward wait in CPU memory "
                                                 "(less GPU memory, a copy each way; CUDA)")
    attn_implementation: str = setting("auto", "auto | sdpa | eager | varlen (flash attention over packed rows, "
                                               "CUDA); auto: varlen for packed bf16 rows on CUDA, else sdpa")
    kbit_upcast: bool = setting(False, "QLoRA: upcast frozen embeddings/norms/lm_head to fp32 (peft's "
                                       "prepare_model_for_kbit_training), not the recipe")
    bf16: bool | str = setting("auto", "true | false | auto: bf16 autocast (and bf16 frozen base for LoRA/QLoRA); "
                                       "auto: on a GPU with bf16, and on a CPU that computes bf16 natively "
                                       "(common.device.cpu_compute_dtype)", parse=_bool_or_auto)
    fp16: bool = False
    seed: int = 42
    # bookkeeping
    max_train_samples: int = setting(0, "0: all")
    max_eval_samples: int = setting(0, "0: all")
    eval_before: bool = setting(True, "eval loss of the untrained model too")
    eval_steps: int = setting(0, "0: only at the end")
    save_steps: int = setting(100, "write a checkpoint every N steps (0: none)")
    save_total_limit: int = 2
    logging_steps: int = 1
    device: str = "auto"
    overwrite_output_dir: bool = setting(False, "allow a non-empty output_dir: the files an earlier run wrote there "
                                                "go (.course_files.json lists them), yours stay")
    resume: bool = setting(False, "continue from output_dir/checkpoints/latest (from step 0 if the run stopped "
                                  "before its first checkpoint)")

    @property
    def mode(self) -> str:
        if self.use_qlora:
            return f"qlora-{self.quantization_bit or 4}bit"
        return "lora" if self.use_lora else "full"

    def to_dict(self) -> dict:
        return asdict(self)


KEYS = [f.name for f in fields(SFTConfig)]


# --------------------------------------------------------------------------- building and checking a config
def from_dict(values: dict, source: str = "config") -> SFTConfig:
    check_keys(values, KEYS, source, "sft")
    defaults = SFTConfig()
    for key, value in values.items():
        want = type(getattr(defaults, key))
        if want is type(None) or key in ("lora_target_modules", "bf16"):   # bf16: true, false or auto
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ValueError(f"{source}: key '{key}' must be {want.__name__}, not {value!r}")
    return SFTConfig(**values)


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: must hold one JSON object of settings")
    return values


def _cuda() -> tuple[bool, bool, str]:
    """(CUDA visible, bf16 supported, device name)."""

    if not torch.cuda.is_available():
        return False, False, ""
    return True, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(0)


def resolve_device(cfg: SFTConfig) -> str:
    has_cuda = _cuda()[0]
    if cfg.device == "auto":
        return "cuda" if has_cuda else "cpu"
    if cfg.device == "cuda" and not has_cuda:
        raise ValueError("device='cuda' but torch sees no CUDA device: use --device cpu or auto")
    return cfg.device


def validate(cfg: SFTConfig, given=None) -> SFTConfig:
    """Raise ``ValueError`` with one line for the first invalid or contradictory setting.

    Checked in this order: the mode, the LoRA settings, the settings of a few values (``CHOICES``) and the
    optimisation, the choices that exclude each other, what the device supports. A QLoRA mode without
    ``quantization_bit`` gets 4 on the way, and ``bf16="auto"`` becomes true or false for the device
    (``resolve_bf16``). ``given``: the keys the user set (a config file's and the flags), to refuse LoRA settings
    with full fine-tuning; by default the keys whose value is not the default.
    """
    _check_mode(cfg, given)
    if cfg.use_qlora and cfg.quantization_bit is None:
        cfg.quantization_bit = 4
    if cfg.use_lora or cfg.use_qlora:
        _check_lora(cfg)
    elif cfg.init_adapter:
        raise ValueError("init_adapter needs a LoRA mode: add --use_lora or --use_qlora, or drop init_adapter")
    _check_optimisation(cfg)
    _check_choices(cfg)
    _check_device(cfg)
    return cfg


def _check_mode(cfg: SFTConfig, given=None) -> None:
    if cfg.full_finetune and (cfg.use_lora or cfg.use_qlora):
        other = "use_qlora" if cfg.use_qlora else "use_lora"
        raise ValueError(f"full_finetune and {other} contradict: full fine-tuning trains every weight, "
                         f"{other} freezes the base and trains an adapter; keep one of them")
    defaults = SFTConfig()
    given = [k for k in LORA_KEYS if (k in given if given is not None else getattr(cfg, k) != getattr(defaults, k))]
    if cfg.mode == "full" and given:
        raise ValueError(f"{given[0]} is a LoRA setting, but this run is full fine-tuning (no --use_lora or "
                         f"--use_qlora): add --use_lora or --use_qlora to train an adapter, or drop {given[0]}")
    if cfg.quantization_bit is not None:
        if cfg.quantization_bit not in (4, 8):
            raise ValueError(f"quantization_bit must be 4 or 8, not {cfg.quantization_bit!r} "
                             "(bitsandbytes stores NF4/FP4 in 4 bits or LLM.int8 in 8)")
        if not cfg.use_qlora:
            raise ValueError(f"quantization_bit={cfg.quantization_bit} needs use_qlora: "
                             "add --use_qlora or drop quantization_bit")


def _check_lora(cfg: SFTConfig) -> None:
    if not isinstance(cfg.lora_r, int) or isinstance(cfg.lora_r, bool) or cfg.lora_r <= 0:
        raise ValueError(f"lora_r must be a positive integer (8-64 is typical for models under 1B), "
                         f"not {cfg.lora_r!r}")
    if not cfg.lora_alpha > 0:
        raise ValueError(f"lora_alpha must be > 0 (often r/2 to 2r), not {cfg.lora_alpha!r}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), not {cfg.lora_dropout!r}")
    if cfg.init_adapter and Path(cfg.output_dir).resolve() in (Path(cfg.init_adapter).resolve(),
                                                                *Path(cfg.init_adapter).resolve().parents):
        raise ValueError(f"init_adapter {cfg.init_adapter} lies inside output_dir {cfg.output_dir}, which this run "
                         "rewrites: copy the adapter elsewhere or choose another output_dir")
    if cfg.init_adapter and not Path(cfg.init_adapter, "adapter_config.json").is_file():
        raise FileNotFoundError(f"init_adapter {cfg.init_adapter} holds no adapter_config.json: give the folder "
                                "an earlier run saved its adapter in")
    if isinstance(cfg.lora_target_modules, list) and not cfg.lora_target_modules:
        raise ValueError("lora_target_modules is an empty list: give names, a preset (attention, mlp, all) "
                         "or null for all")


def _check_optimisation(cfg: SFTConfig) -> None:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {getattr(cfg, key)!r}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, not {cfg.learning_rate!r}")
    if cfg.max_steps < -1 or cfg.num_train_epochs < 0:
        key = "max_steps" if cfg.max_steps < -1 else "num_train_epochs"
        raise ValueError(f"{key} must not be negative, not {getattr(cfg, key)!r}: give max_steps > 0, or -1 to train "
                         "num_train_epochs > 0")
    if cfg.max_steps <= 0 and not cfg.num_train_epochs > 0:
        raise ValueError("nothing to train: set max_steps > 0 or num_train_epochs > 0")
    for key, meaning in COUNTS.items():
        least = 1 if key == "logging_steps" else 0
        if getattr(cfg, key) < least:
            raise ValueError(f"{key} must be >= {least} ({meaning}), not {getattr(cfg, key)!r}")
    for key in ("weight_decay", "max_grad_norm"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0 (0: off), not {getattr(cfg, key)!r}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, not {getattr(cfg, key)!r}")
    if cfg.max_length < 8:
        raise ValueError(f"max_length must be >= 8 tokens, not {cfg.max_length!r}")
    if cfg.attn_implementation == "varlen" and not cfg.packing:
        raise ValueError("attn_implementation=varlen attends within the packed conversations of a row and needs "
                         "--packing: add it, or use auto or sdpa")
    if cfg.keep_dequantized and (not cfg.use_qlora or cfg.quantization_bit != 4 or cfg.fused_lora is False):
        raise ValueError("keep_dequantized keeps 16-bit copies of a 4-bit base for the fused LoRA path: it needs "
                         "--use_qlora with quantization_bit 4 and fused_lora true or auto; drop it otherwise")
    if cfg.memory_budget_gib < 0 and cfg.memory_budget_gib != -1:
        raise ValueError(f"memory_budget_gib must be > 0 GiB, 0 (off) or -1 (the GPU's), not {cfg.memory_budget_gib!r}")


def _check_choices(cfg: SFTConfig) -> None:
    if not (isinstance(cfg.bf16, bool) or cfg.bf16 == "auto"):
        raise ValueError(f"bf16 must be true, false or auto, not {cfg.bf16!r}")
    if cfg.bf16 is True and cfg.fp16:
        raise ValueError("bf16 and fp16 both set: choose one mixed-precision type")
    if cfg.resume and cfg.overwrite_output_dir:
        raise ValueError("resume and overwrite_output_dir contradict: resume keeps the checkpoints, "
                         "overwrite discards them")


def resolve_bf16(cfg: SFTConfig, device: str) -> bool:
    """``bf16="auto"``: bf16 on a GPU that supports it, on the CPU where ``cpu_compute_dtype()`` is bf16 (native
    bf16 kernels), never beside ``fp16``; true or false as given."""
    if cfg.bf16 != "auto":
        return cfg.bf16
    if cfg.fp16:
        return False
    return _cuda()[1] if device == "cuda" else cpu_compute_dtype() == torch.bfloat16


def _check_device(cfg: SFTConfig) -> None:
    """What the device this run resolves to can do: bf16, fp16, paged optimizers."""
    device = resolve_device(cfg)
    cfg.bf16 = resolve_bf16(cfg, device)
    _, has_bf16, gpu = _cuda()
    if device == "cuda" and cfg.bf16 and not has_bf16:
        raise ValueError(f"bf16 requested but {gpu} has no bfloat16 support "
                         "(needs compute capability 8.0+): use --fp16 or drop --bf16")
    if device == "cpu" and cfg.bf16 and cpu_compute_dtype() != torch.bfloat16:
        raise ValueError("bf16 requested but this CPU has no native bf16 (torch reports "
                         f"{torch.backends.cpu.get_cpu_capability()}): it would run ~50x slower than fp32; drop --bf16")
    if device == "cpu" and cfg.fp16:
        raise ValueError("fp16 needs a CUDA GPU (no fp16 autocast and grad scaler on the CPU): use --bf16 or neither")
    if device == "cpu" and cfg.attn_implementation == "varlen":
        raise ValueError("attn_implementation=varlen is PyTorch's flash kernel and needs CUDA: use auto or sdpa")
    if device == "cpu" and cfg.memory_budget_gib == -1:
        raise ValueError("memory_budget_gib=-1 plans for the GPU's memory and needs CUDA: give a number of GiB or 0")
    if cfg.embeddings_on_cpu and (device == "cpu" or cfg.mode == "full"):
        raise ValueError("embeddings_on_cpu moves a frozen embedding table off the GPU: it needs CUDA and a LoRA or "
                         "QLoRA mode (full fine-tuning trains the table); drop it")
    if device == "cpu" and cfg.activation_offloading:
        raise ValueError("activation_offloading moves a GPU's activations to CPU memory and needs CUDA: drop it")
    if device == "cpu" and cfg.optim.startswith("paged_"):
        raise ValueError(f"optim={cfg.optim} pages optimizer state between GPU and CPU memory and needs CUDA: "
                         "use adamw_torch on the CPU")


# --------------------------------------------------------------------------- the command line
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """A flag per ``SFTConfig`` field, and ``--config_file``; a flag not given leaves the file's value or default."""
    parser.add_argument("--config_file", help="JSON file of settings; flags given here override it")
    for f in fields(SFTConfig):
        shown = "null" if f.default is None else str(f.default).lower() if f.type in ("bool", "bool | str") \
            else repr(f.default)
        text = f.metadata.get("help", "")
        text = text if "(default" in text else f"{text} (default {shown})".strip()
        parse = f.metadata.get("parse") or (_bool if f.type == "bool" else type(f.default))
        boolean = {"nargs": "?", "const": True} if parse in (_bool, _bool_or_auto) else {}
        parser.add_argument(f"--{f.name}", type=parse, default=argparse.SUPPRESS, help=text, **boolean)


def config_from_args(args: argparse.Namespace) -> SFTConfig:
    values = load_config_file(args.config_file) if getattr(args, "config_file", None) else {}
    source = args.config_file or "config"
    cfg = from_dict(values, source)
    for key in KEYS:
        if hasattr(args, key):
            setattr(cfg, key, getattr(args, key))
    return validate(cfg, given={*values, *(k for k in KEYS if hasattr(args, k))})


def cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = run_sft(cfg, echo=print).summary
    if not PartialState().is_main_process:      # under accelerate launch: one line, from the main process
        return 0
    ev = {k: "n/a" if v is None else f"{v:.4f}" for k, v in summary["eval_loss"].items()}
    print(f"{cfg.mode}: {summary['steps']} steps, trainable {summary['params']['trainable']:,} "
          f"of {summary['params']['total']:,}; eval loss {ev['before']} -> {ev['after']}; "
          f"saved to {cfg.output_dir}")
    out, chat = shlex.quote(cfg.output_dir), "python -m qlora_helpers.ch03_sft.chat --lora_model"
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    where = (" --device cuda --dtype bf16" + (" --load_in_4bit" if cfg.mode == "qlora-4bit" else "")) if on_gpu else ""
    print(f"chat with it: {chat} {out} --chat{where}")
    if cfg.mode != "full":
        print(f"merge it into one model folder: {chat} {out} --merge_to {shlex.quote(cfg.output_dir + '-merged')}")
    return 0


# --------------------------------------------------------------------------- running it
def inspect_output_dir(cfg: SFTConfig) -> RunFolder:
    """What ``output_dir`` holds and what this run will do to it, changing nothing (``common.run_folder``): a
    folder holding files needs --resume or --overwrite_output_dir, and --resume a run to continue."""
    writes = WRITES["any"] + WRITES["full" if cfg.mode == "full" else "adapter"]
    return inspect_folder(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir, writes=writes,
                          finished=SUMMARY)


def run_settings(cfg: SFTConfig, base: str, processes: int, conversations: list) -> dict:
    """Every setting of the run as it trains (``auto`` resolved), the number of processes (the global batch, each
    rank's random state) and the digest of the training conversations: what each checkpoint records."""
    digest = hashlib.sha256(json.dumps(conversations, sort_keys=True).encode()).hexdigest()
    return {**cfg.to_dict(), "mode": cfg.mode, "model_name_or_path": base, "processes": processes,
            "data_sha256": digest}


def check_targets(cfg: SFTConfig, base: str) -> None:
    """``lora_target_modules`` against the model's layers, on a model built from its config on the meta device (no
    weights read): a wrong name stops the run before the output folder changes."""
    if cfg.mode == "full":
        return
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError):
        return                            # the model's own load reports it
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    resolve_target_modules(cfg.lora_target_modules, model)


def read_conversations(cfg: SFTConfig, train_conversations=None, eval_conversations=None) -> tuple:
    """(train, eval) conversations: given ones, the files of cfg, or the chatterbot splits; checked, not encoded."""

    if train_conversations is None:
        train_conversations = d.read_jsonl(cfg.data_path or sft_paths()["train"])
    if eval_conversations is None:
        if cfg.eval_data_path:
            eval_conversations = d.read_jsonl(cfg.eval_data_path, "--eval_data_path")
        elif not cfg.data_path:
            eval_conversations = d.read_jsonl(sft_paths()["validation"])
    if cfg.max_train_samples > 0:
        train_conversations = train_conversations[:cfg.max_train_samples]
    if eval_conversations is not None and cfg.max_eval_samples > 0:
        eval_conversations = eval_conversations[:cfg.max_eval_samples]
    return train_conversations, eval_conversations


LOADED_BY = ("adapter_config.json", "config.json")   # what peft / transformers open first: moved in last


def save_final(model, tokenizer, out: Path) -> list[str]:
    """Save the adapter (or full model) and tokenizer into a temp folder, then move each file into place.

    Each move is atomic and the config that makes the folder loadable goes last, so a run killed
    while saving leaves no adapter that loads half-written: with --resume the settings (and so the
    config) are the same, and the config of a first run appears only once its weights are complete.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=out))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        settle_tree(tmp)                  # on disk before any of it is moved in
        names = sorted((p.name for p in tmp.iterdir() if p.is_file()), key=lambda n: (n in LOADED_BY, n))
        record(out, *names)                # the course's files from now on (--overwrite_output_dir removes them)
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


PLAN_TOKENS = (512, 1024, 2048, 4096, 8192, 16384, 32768)     # the micro-batches the planner weighs


def plan_micro_batch(config, budget_gib: float, *, method: str = "qlora4", lora_r: int = 16, chunked: bool = True,
                     engine: dict | None = None, candidates=PLAN_TOKENS,
                     enough_tokens: int = 4096, may_move_embeddings: bool = False) -> dict:
    """The packed micro-batch (tokens) and the checkpointing that fit ``budget_gib`` as the chapter-01 estimator
    predicts the peak, for a loss taken in chunks (``chunked``: Liger's fused linear cross-entropy, on a GPU) or over
    the full logits, and for the engine's levers (``engine``: ``estimate``'s ``lora_impl``, ``lora_dropout``,
    ``offload`` and ``liger``).

    Without checkpointing, the largest micro-batch that fits: fewer, larger micro-batches launch fewer kernels per
    token. Checkpointing costs a second forward pass, so it is chosen only when no micro-batch of ``enough_tokens``
    (4k: enough to keep a GPU's matrix units busy) fits without it; then the micro-batch is the largest that fits up
    to ``enough_tokens``, and the memory left over goes to selective checkpointing: the most decoder layers that can
    keep their activations (``checkpoint_keep_layers``) are spared the second pass. The top layer is recomputed the
    moment the backward pass starts, so keeping it costs no more memory than recomputing it: a plan keeps at least
    that one. What is still left keeps a 16-bit copy of every frozen 4-bit weight (``keep_dequantized``, fused
    LoRA) where all of them fit. The largest candidate is a whole optimizer step: a smaller micro-batch accumulates,
    and the gradients of the earlier micro-batches are counted while the next one runs.

    With ``may_move_embeddings`` (CUDA), the same plan is made with the input embedding table in CPU memory
    (``embeddings_on_cpu``: one small copy of the looked-up rows a micro-batch), and taken where it is the better
    one: no checkpointing, a larger micro-batch, more layers kept, or the copies.
    """
    text = config.get_text_config()
    step = max(candidates)
    engine = engine or {}
    if set(engine) & {"dequant_cache", "cpu_embeddings"}:
        raise ValueError("plan_micro_batch decides dequant_cache and cpu_embeddings itself: pass engine_levers(cfg), "
                         "not planned_levers(cfg)")
    cacheable = method == "qlora4" and engine.get("lora_impl") == "fused"

    def need(tokens: int, ckpt: bool, keep: int = 0, cached: bool = False, cpu_embeddings: bool = False) -> float:
        chunk = liger_loss_chunk(tokens, text.vocab_size, text.hidden_size) if chunked else None
        return estimate(config, method, batch_size=1, seq_len=tokens, lora_r=lora_r, grad_ckpt=ckpt,
                        loss_chunk=chunk, keep_layers=keep, accumulate=tokens < step, dequant_cache=cached,
                        cpu_embeddings=cpu_embeddings, **engine).total_gib

    moves = (False, True) if may_move_embeddings and not text.tie_word_embeddings else (False,)
    plans = [p for p in (_plan(need, moved, budget_gib, candidates, enough_tokens, text.num_hidden_layers,
                               cacheable) for moved in moves) if p]
    if not plans:
        raise ValueError(f"memory_budget_gib={budget_gib}: no micro-batch of {candidates[0]} tokens or more fits "
                         "even with checkpointing; raise the budget, shorten max_length or use a smaller model")
    rank = lambda p: (not p["gradient_checkpointing"], p["tokens"], p["checkpoint_keep_layers"], p["keep_dequantized"],
                      not p["embeddings_on_cpu"])          # on a tie, the table stays on the GPU
    return max(plans, key=rank)


def _plan(need, cpu_embeddings: bool, budget_gib: float, candidates, enough_tokens: int, layers: int,
          cacheable: bool) -> dict | None:
    """``plan_micro_batch``'s plan with the embedding table where ``cpu_embeddings`` puts it, or None if none fits."""
    at = lambda tokens, ckpt, keep=0, cached=False: need(tokens, ckpt, keep, cached, cpu_embeddings)
    plain = max((t for t in candidates if at(t, False) <= budget_gib), default=0)
    fit = [t for t in candidates if min(at(t, True), at(t, True, 1)) <= budget_gib]   # the top layer kept may cost less
    if not plain and not fit:
        return None
    ckpt = plain < min(enough_tokens, max(fit, default=0))
    tokens = max((t for t in fit if t <= enough_tokens), default=min(fit, default=0)) if ckpt else plain
    keep = max((k for k in range(layers) if at(tokens, True, k) <= budget_gib), default=0) if ckpt else 0
    cached = cacheable and at(tokens, ckpt, keep, True) <= budget_gib
    return {"tokens": tokens, "gradient_checkpointing": ckpt, "checkpoint_keep_layers": keep,
            "keep_dequantized": cached, "embeddings_on_cpu": cpu_embeddings,
            "estimate_gib": round(at(tokens, ckpt, keep, cached), 3), "budget_gib": budget_gib}


def engine_levers(cfg: SFTConfig) -> dict:
    """``estimate``'s keywords for how this run computes: the LoRA branch (fused, or peft with the bf16 adapters TRL
    gives a quantized model, or peft's fp32 ones), its dropout, activation offloading, Liger's kernels. Where the
    weights and the embedding table wait is ``planned_levers``: ``plan_micro_batch`` may switch them on, a user
    may force them (a forced one is not in the plan's estimate)."""
    impl = ("fused" if cfg.fused_lora is True else "peft-bf16") if cfg.use_qlora and cfg.bf16 is True else "peft-fp32"
    return {"lora_impl": impl, "lora_dropout": cfg.lora_dropout, "offload": bool(cfg.activation_offloading),
            "liger": bool(cfg.use_liger_kernel)}


def planned_levers(cfg: SFTConfig) -> dict:
    """``estimate``'s keywords for the levers the planner may switch on: 16-bit copies of the 4-bit weights
    (``keep_dequantized``) and the input embedding table in CPU memory (``embeddings_on_cpu``)."""
    return {"dequant_cache": bool(cfg.keep_dequantized), "cpu_embeddings": bool(cfg.embeddings_on_cpu)}


def estimator_method(cfg: SFTConfig) -> str:
    """The chapter-01 estimator's name for this run's mode: full, lora, qlora4 or qlora8."""
    return {"full": "full", "lora": "lora"}.get(cfg.mode, f"qlora{cfg.quantization_bit or 4}")


def run_estimate(cfg: SFTConfig, base: str) -> dict:
    """The chapter-01 estimate of this run's training peak ``max_memory_allocated`` on a GPU (loading and evaluation
    aside): micro-batches of ``per_device_train_batch_size`` rows of ``max_length`` tokens (a padded batch is as long
    as its longest row: an upper bound), its checkpointing, optimizer, loss (Liger's chunks or the full logits) and
    levers. ``gib`` is None, and ``of`` says why, where the estimator does not model the model or its targets."""
    optimizer = cfg.optim if cfg.optim in ESTIMATED_OPTIMIZERS else "adamw"   # (paged 32-bit AdamW: as AdamW)
    targets = target_names(cfg.lora_target_modules) or "all-linear"
    try:
        text = AutoConfig.from_pretrained(base).get_text_config()
        tokens = cfg.per_device_train_batch_size * cfg.max_length
        chunk = liger_loss_chunk(tokens, text.vocab_size, text.hidden_size) if cfg.use_liger_kernel else None
        gib = estimate(text, estimator_method(cfg), batch_size=cfg.per_device_train_batch_size,
                       seq_len=cfg.max_length, lora_r=cfg.lora_r, targets=targets,
                       grad_ckpt=bool(cfg.gradient_checkpointing), optimizer=optimizer, loss_chunk=chunk,
                       prepare_kbit=bool(cfg.use_qlora and cfg.kbit_upcast),
                       keep_layers=cfg.checkpoint_keep_layers if cfg.gradient_checkpointing else 0,
                       accumulate=cfg.gradient_accumulation_steps > 1,
                       **(engine_levers(cfg) | planned_levers(cfg) if cfg.mode != "full" else {})).total_gib
    except (ValueError, OSError) as err:   # an architecture or a target the estimator does not model
        return {"gib": None, "of": f"no estimate: {str(err).splitlines()[0]}"}
    return {"gib": round(gib, 3), "of": f"chapter 01's estimate of training, {cfg.mode}, "
                                        f"{cfg.per_device_train_batch_size} x {cfg.max_length} tokens, {optimizer}"}


def plan_batch(cfg: SFTConfig, base: str, device: str) -> dict | None:
    """With ``memory_budget_gib``, the chapter-01 estimator's plan for it (before the model loads): the micro-batch
    (rows of ``max_length`` tokens, the tokens per optimizer step kept) and whether to checkpoint; ``cfg`` is set."""
    if not cfg.memory_budget_gib:
        return None
    budget = cfg.memory_budget_gib
    if budget == -1:
        budget = round(0.92 * torch.cuda.get_device_properties(0).total_memory / 2**30, 2)   # the allocator's margin
    try:
        config = AutoConfig.from_pretrained(base)
    except OSError as err:
        raise ValueError(f"model_name_or_path {base!r}: cannot read its config.json ({str(err).splitlines()[0]})") \
            from None
    rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    # whole rows of max_length, as many as divide a step's rows: what can run is what is planned
    rows = [d * cfg.max_length for d in range(1, rows_per_step + 1) if rows_per_step % d == 0]
    plan = plan_micro_batch(config, budget, method=estimator_method(cfg), lora_r=cfg.lora_r,
                            chunked=bool(cfg.use_liger_kernel),
                            engine=engine_levers(cfg) if cfg.mode != "full" else None, candidates=rows,
                            may_move_embeddings=device.startswith("cuda") and cfg.mode != "full")
    cfg.per_device_train_batch_size = plan["tokens"] // cfg.max_length
    cfg.gradient_accumulation_steps = rows_per_step // cfg.per_device_train_batch_size   # the same rows per step
    cfg.gradient_checkpointing = cfg.gradient_checkpointing or plan["gradient_checkpointing"]
    cfg.checkpoint_keep_layers = plan["checkpoint_keep_layers"] if plan["gradient_checkpointing"] else 0
    cfg.keep_dequantized = cfg.keep_dequantized or plan["keep_dequantized"]
    cfg.embeddings_on_cpu = cfg.embeddings_on_cpu or plan["embeddings_on_cpu"]
    return {**plan, "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps}


def start_output_dir(cfg: SFTConfig, processes: PartialState, folder: RunFolder, base: str) -> Path:
    """The output folder, once the model has loaded: the changes ``folder`` planned (with --overwrite_output_dir
    the earlier run's files go), ``sft_config.json`` for a run from step 0 (a resume writes it when it ends, so a
    failed one leaves the earlier file), by the main process while the others wait."""
    processes.wait_for_everyone()
    if processes.is_main_process:
        config = None if folder.checkpoint else (CONFIG, sft_config(cfg, base))
        folder.start((CHECKPOINTS, SUMMARY), config=config)
    processes.wait_for_everyone()
    return Path(cfg.output_dir)


def sft_config(cfg: SFTConfig, base: str) -> dict:
    """What ``sft_config.json`` holds: the settings, the base model's path and the mode."""
    return {**cfg.to_dict(), "model_name_or_path": base, "mode": cfg.mode}


def finish_output_dir(processes: PartialState, model, tokenizer, out: Path, summary: dict, *,
                      config: dict | None = None) -> dict:
    """The final model and ``sft_summary.json`` (and, ending a resume, ``config``: ``sft_config.json``), written by
    the main process alone, the others waiting.

    ``summary`` gains ``processes``: every process's digest of its trainable weights (equal digests: the processes
    of a data-parallel run hold bit-identical weights) and, on the main process, the files written.
    """
    digests = gather_object([state_digest({n: p for n, p in model.named_parameters() if p.requires_grad})])
    summary["processes"] = {"world_size": processes.num_processes, "trainable_sha256": digests,
                            "identical": len(set(digests)) == 1}
    if processes.is_main_process:
        summary["files"] = save_final(model, tokenizer, out)
        if config is not None:
            atomic_write_json(out / CONFIG, config)
        atomic_write_json(out / SUMMARY, summary)
    processes.wait_for_everyone()     # no process returns before the files are whole
    return summary


@dataclass
class SFTResult:
    summary: dict          # also written to output_dir/sft_summary.json
    model: object          # the trained model, in eval mode, still on its device
    tokenizer: object


def resolve_fused_lora(cfg: SFTConfig, device: str) -> None:
    """``fused_lora="auto"``: on where the run trains on CUDA; ``keep_dequantized`` needs it on."""
    cfg.fused_lora = cfg.fused_lora is True or (cfg.fused_lora == "auto" and device.startswith("cuda"))
    if cfg.keep_dequantized and not cfg.fused_lora:
        raise ValueError("keep_dequantized serves the fused LoRA path, which fused_lora=auto takes on CUDA only: add "
                         "--fused_lora true, or drop keep_dequantized")


def run_sft(cfg: SFTConfig, train_conversations=None, eval_conversations=None, callbacks=(),
            progress: bool = True, *, trainer_callbacks=(), model_factory=None, echo=None) -> SFTResult:
    """Validate, load, train, evaluate and save one mode.

    ``train_conversations``/``eval_conversations`` (lists of message lists) replace the data
    files, as the notebook does to train on the English records only. ``trainer_callbacks`` go to the
    Trainer (chapter 05's plateau rule); ``model_factory(cfg, device)``, when given, builds the model with
    its adapter instead of ``modes.build_model`` (chapter 05's random-weight models). ``echo`` (``print`` from the
    command) receives a line for each kind of conversation the data lost to ``max_length``, before training.
    """

    validate(cfg)
    device = resolve_device(cfg)
    processes = PartialState(cpu=device == "cpu")   # one, or this one of accelerate launch's (gloo on the CPU)
    folder = inspect_output_dir(cfg)                # nothing in output_dir changes before the model has loaded
    # the data files are read and checked before the tokenizer, the tokenizer before the model
    conversations = read_conversations(cfg, train_conversations, eval_conversations)
    base = model_path(cfg)
    cfg.optim, cfg.use_liger_kernel = optimizer_name(cfg.optim, device), liger_on(cfg, device)   # auto, as it runs
    resolve_fused_lora(cfg, device)
    plan = plan_batch(cfg, base, device)
    cfg.resume = folder.checkpoint is not None      # a run that stopped before its first checkpoint: from step 0
    fingerprint = folder.check_settings(run_settings(cfg, base, processes.num_processes, conversations[0]),
                                        may_change=SFT_MAY_CHANGE)
    if model_factory is None:                       # a factory builds the weights: the folder holds none
        check_model_folder(base, setting="model_name_or_path")
    tokenizer = load_tokenizer(base)
    train_data = d.encode_all(conversations[0], tokenizer, cfg.max_length)   # with packing, TRL packs them
    for line in d.losses(train_data, cfg.max_length) if echo and processes.is_main_process else []:
        echo(line)
    eval_data = d.encode_all(conversations[1], tokenizer, cfg.max_length) if conversations[1] else None
    if model_factory is None:
        check_targets(cfg, base)
    expected = run_estimate(cfg, base)              # before training: nothing after it can fail on an estimate

    set_seed(cfg.seed)
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        model = (model_factory or build_model)(cfg, str(processes.device) if processes.num_processes > 1 else device)
        if cfg.init_adapter:
            load_initial_adapter(model, cfg.init_adapter)
        load_seconds = time.perf_counter() - t0
        out = start_output_dir(cfg, processes, folder, base)
        params = count_parameters(model)
        before = None
        with trainable_4bit_layers(model), disk_full_is_one_line(out):   # eval before, training, eval after alike
            if eval_data is not None and cfg.eval_before and not cfg.resume:
                before = evaluate(model, eval_data, cfg.per_device_eval_batch_size, tokenizer.pad_token_id,
                                  device, cfg)
            result = train(model, tokenizer, train_data, cfg, output_dir=out, device=device,
                           eval_data=eval_data, resume=cfg.resume, callbacks=callbacks, progress=progress,
                           fingerprint=fingerprint, initial_eval=before, trainer_callbacks=trainer_callbacks)
            release_dequantized(model)                # the 16-bit copies served training only
    summary = make_summary(cfg, base, device, model=model, data=(train_data, eval_data), result=result,
                           params=params, load_seconds=load_seconds, peak=mem.as_dict(), plan=plan)
    summary["estimate"] = expected
    with disk_full_is_one_line(out):
        summary = finish_output_dir(processes, model, tokenizer, out, summary,
                                    config=sft_config(cfg, base) if cfg.resume else None)
    return SFTResult(summary, model, tokenizer)


def load_initial_adapter(model, folder) -> None:
    """Start the LoRA weights of ``model`` from a saved adapter (an earlier stage's): every LoRA tensor is replaced,
    none left at its fresh initialisation; another rank or other targets are refused in one line."""
    folder = Path(folder)
    saved, mine = json.loads((folder / "adapter_config.json").read_text()), model.peft_config["default"]
    if int(saved["r"]) != mine.r or set(saved["target_modules"]) != set(mine.target_modules):
        raise ValueError(f"init_adapter {folder} has r={saved['r']} on {sorted(saved['target_modules'])}, this run "
                         f"r={mine.r} on {sorted(mine.target_modules)}: train with the earlier run's lora settings")
    state = load_file(str(folder / "adapter_model.safetensors"))
    missing = set(get_peft_model_state_dict(model)) - set(state)
    if missing:
        raise ValueError(f"init_adapter {folder} lacks {len(missing)} LoRA tensor(s) of this model, "
                         f"e.g. {sorted(missing)[0]}: was it trained on another base model?")
    set_peft_model_state_dict(model, state)


def make_summary(cfg: SFTConfig, base: str, device: str, *, model, data, result: dict, params: dict,
                 load_seconds: float, peak: dict, plan: dict | None) -> dict:
    """What ``sft_summary.json`` holds: the run's settings, data, losses before and after, speed and memory."""
    train_data, eval_data = data
    before = next((e["eval_loss"] for e in result["history"]["eval"] if e["step"] == 0), None)
    return {
        "mode": cfg.mode, "model": base, "device": device,
        "params": {**params, "trainable_percent": round(100 * params["trainable"] / params["total"], 4)},
        "data": {"train": train_data.summary() + (f"; packed by TRL, best-fit, into padding-free rows of "
                                                  f"{cfg.max_length} tokens" if cfg.packing else ""),
                 "eval": eval_data.summary() if eval_data else None,
                 "train_truncated": train_data.n_truncated, "train_dropped": train_data.n_dropped},
        "eval_loss": {"before": before, "after": result["eval_loss"]},
        "steps": result["steps"], "resumed_from": result["resumed_from"],
        "step_seconds": result["step_seconds"], "tokens_per_second": result["tokens_per_second"],
        "load_seconds": round(load_seconds, 2), "peak_memory": peak,
        # exact bytes of the tensors training keeps, whatever the allocator does
        "tensor_memory_mib": {"weights": round(tensor_bytes(model) / 2**20, 1),
                              **{k: round(v / 2**20, 1) for k, v in result["state_bytes"].items()}},
        "history": result["history"], "files": [], "plan": plan,
        "kernels": {"attention": getattr(model, "attention_kernel", "sdpa"),
                    "liger_trainer": bool(cfg.use_liger_kernel), "lora": getattr(model, "lora_kernel", "peft"),
                    "checkpointing": getattr(model, "checkpointing", "off")},
        "torch_threads": torch.get_num_threads(),
    }
