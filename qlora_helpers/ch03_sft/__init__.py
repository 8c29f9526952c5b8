"""Chapter 03, supervised fine-tuning of a chat model: full, LoRA, QLoRA 4-bit and 8-bit.

============  ========================================================================================
module        what it holds
============  ========================================================================================
data          chat / instruction JSONL with per-line checks, assistant-only masks, batching and packing
modes         the four modes: how each loads the base (``BitsAndBytesConfig``) and wraps it (LoRA)
loop          the training loop: optimizer, schedule, evaluation, atomic checkpoints and resume
command       the ``sft`` command: its config, validation and ``run_sft``
chat          reload with plain peft, chat, merge (and the QLoRA merge pitfall)
peak_memory   peak memory of a block of code (CPU RSS or CUDA peak)
recipe        the lean recipe: loss without full logits, packing, no fp32 upcast, planned micro-batch
fast_kernels  on a GPU: varlen flash attention for packed rows, Liger's RMSNorm and SwiGLU
============  ========================================================================================
"""

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
from qlora_helpers.ch03_sft.loop import LiveLossPlot, evaluate
from qlora_helpers.ch03_sft.modes import load_tokenizer, trainable_4bit_layers

__all__ = ["PROBE_PROMPTS", "DataError", "LiveLossPlot", "SFTConfig", "batch_order", "chat", "collate", "encode_all",
           "encode_chat", "evaluate", "from_dict", "load_config_file", "load_for_inference", "load_tokenizer",
           "logit_difference", "merge_adapter", "prompt_logits", "read_jsonl", "records_to_conversations",
           "run_sft", "show_mask", "trainable_4bit_layers"]
