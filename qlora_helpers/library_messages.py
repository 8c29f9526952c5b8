"""Library messages that tell a learner of this course nothing, each dropped by its exact text, with its cause.

A notebook's output should hold what its cells mean to show. The libraries the course stands on print a
few messages on every run that are about themselves, not about the learner's code; each is listed here
with the reason it is safe to drop, and ``install()`` (called when ``qlora_helpers`` is imported, so before
bitsandbytes, peft or transformers first print them) drops exactly those. Any other warning still shows.
"""

import logging
import re
import warnings

# logger name -> (start of the message, why it says nothing here)
LOGGED = {
    "bitsandbytes.backends.cpu.ops": (
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "on a CPU with AVX-512 BF16, importing bitsandbytes asks the Hugging Face hub for an optional faster "
        "4-bit kernel; the course runs offline and bitsandbytes uses its own CPU kernel (device_info() says which)"),
    "kernels._internals.hf_hub": (
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
        "the same look-up with the hub switched off (HF_HUB_OFFLINE): the kernels package says it cannot check "
        "the kernel's publisher; bitsandbytes then falls back to its own kernel as above"),
    "transformers.trainer_utils": (
        "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config and generation config. The model "
        "config and generation config were aligned accordingly, being updated with the tokenizer's values. Updated "
        "tokens: {'bos_token_id': None}.",
        "this exact message only: transformers 5.17 (the course's oldest supported version) reports a token the "
        "tokenizer leaves undefined (Qwen2.5's has no BOS) as changed on every run of a real Qwen2.5 folder; 5.25 "
        "keeps the config's value and says nothing. Any other alignment still shows"),
    "bitsandbytes.autograd._functions": (
        "MatMul8bitLt: inputs will be cast from",
        "LLM.int8 quantises activations from fp16: on a CPU computing in fp32 or bf16 every 8-bit call casts "
        "them first, as chapter 03 explains"),
}
# (category, start of the message, why it says nothing here)
WARNED = [
    (FutureWarning, "`is_gradient_checkpointing` is deprecated",
     "peft 0.21 (the newest) reads transformers 5's renamed property whenever it wraps a model"),
    (FutureWarning, "`gradient_checkpointing_enable` is deprecated",
     "peft 0.21's prepare_model_for_kbit_training calls the old name; the course's own code calls the new one "
     "(common.models.enable_checkpointing)"),
    (UserWarning, "inner dimension (16) is not aligned for fast kernel with blocksize=64",
     "bitsandbytes' CUDA kernel for small 4-bit batches wants a layer's input size to be a multiple of its block; "
     "chapter 02's adapters at the practice size take 16 inputs, so it uses its other kernel (dequantise, then "
     "a plain matrix product): the same result"),
    (FutureWarning, "`use_liger_kernel=True` is deprecated",
     "TRL 1.16 points every run with Liger's kernels to the Hugging Face hub's kernels instead, which an offline "
     "machine cannot fetch; the sft command takes Liger's kernels from the liger-kernel package, on a GPU only"),
]


class _DropKnown(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def install() -> None:
    """Drop exactly the messages above (again harmless: each logger gets its filter once)."""
    for name, (start, _why) in LOGGED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(start))
    for category, start, _why in WARNED:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
