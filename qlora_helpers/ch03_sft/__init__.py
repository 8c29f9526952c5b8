"""Chapter 03, supervised fine-tuning of a chat model: full, LoRA, QLoRA 4-bit and 8-bit.

============  ========================================================================================
module        what it holds
============  ========================================================================================
data          chat / instruction JSONL with per-line checks, assistant-only masks, batching and packing
modes         the four modes: how each loads the base (``BitsAndBytesConfig``) and wraps it (LoRA)
trainer       what the course adds to TRL's ``SFTTrainer``: its data and masks, whole checkpoints, history
command       the ``sft`` command: its config, validation and ``run_sft`` (training through ``trainer``)
chat          reload with plain peft, chat, merge (and the QLoRA merge pitfall)
peak_memory   peak memory of a block of code (CPU RSS or CUDA peak)
fast_kernels  on a GPU: varlen flash attention for packed rows (``--attn_implementation``)
report        the four runs side by side and the merges compared: columns, a figure, results, scores
gpu_results   the GPU benchmark results the notebook shows: table specs, lines and figures
lora_choices  which layers, which rank, which 4-bit type: trainable shares at real shapes, quantisation error
============  ========================================================================================
"""

import warnings

from qlora_helpers.ch03_sft.chat import (
    PROBE_PROMPTS,
    chat,
    load_for_inference,
    logit_difference,
    merge_adapter,
    prompt_logits,
)
from qlora_helpers.ch03_sft.command import SFTConfig, from_dict, load_config_file, run_sft
from qlora_helpers.ch03_sft.data import (
    DataError,
    batch_order,
    collate,
    encode_all,
    encode_chat,
    read_jsonl,
    records_to_conversations,
    show_mask,
)
from qlora_helpers.ch03_sft.gpu_results import (
    ABLATIONS,
    LEVER_COLUMNS,
    PEER_COLUMNS,
    PEER_TARGET_COLUMNS,
    PLAN_COLUMNS,
    PLANS,
    SFT_MODES,
    SFT_ROW,
    TARGETS,
    lever_rows,
    missed_targets,
    peer_figure,
    peer_plans,
    peer_points,
    peer_targets,
    sft_modes_setting,
    step_profiles,
    throughput_figure,
    throughput_targets,
    unmeasured_peer_rows,
)
from qlora_helpers.ch03_sft.modes import build_model, load_tokenizer, trainable_4bit_layers
from qlora_helpers.ch03_sft.report import (
    MERGE_COLUMNS,
    MODE_COLUMNS,
    answer_scores,
    corpus_preference,
    learning_metrics,
    merge_results,
    mode_results,
    modes_figure,
    modes_note,
    quality_claims,
    quality_ratios,
    run_line,
)
from qlora_helpers.ch03_sft.trainer import LiveLossPlot, evaluate

# `python -m qlora_helpers.ch03_sft.chat` runs chat as __main__ after this package imported it for the names above,
# which runpy reports as a RuntimeWarning before the command's first line; both copies are the same code
warnings.filterwarnings("ignore", r"'qlora_helpers\.ch03_sft\.chat' found in sys\.modules", RuntimeWarning)

__all__ = ["ABLATIONS", "LEVER_COLUMNS", "MERGE_COLUMNS", "MODE_COLUMNS", "PEER_COLUMNS", "PEER_TARGET_COLUMNS",
           "PLAN_COLUMNS", "PLANS", "PROBE_PROMPTS", "SFT_MODES",
           "SFT_ROW", "TARGETS", "answer_scores", "batch_order", "build_model", "chat", "collate",
           "corpus_preference", "DataError", "encode_all", "encode_chat", "evaluate", "from_dict", "learning_metrics",
           "LiveLossPlot",
           "lever_rows", "load_config_file", "load_for_inference", "load_tokenizer", "logit_difference",
           "merge_adapter", "merge_results", "missed_targets", "mode_results", "modes_figure",
           "modes_note", "peer_figure", "peer_plans", "peer_points", "peer_targets",
           "prompt_logits", "quality_claims", "quality_ratios",
           "read_jsonl", "records_to_conversations", "run_line", "run_sft", "sft_modes_setting", "SFTConfig",
           "show_mask", "step_profiles", "throughput_figure", "throughput_targets",
           "trainable_4bit_layers", "unmeasured_peer_rows"]
