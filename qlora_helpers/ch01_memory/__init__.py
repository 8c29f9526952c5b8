"""Chapter 01, memory math: where GPU memory goes in training, and which GPU a run fits on.

=============  =========================================================================================
module         what it holds
=============  =========================================================================================
architectures  what a decoder's ``config.json`` says about its memory: sizes and the layout of a block
estimator      ``estimate``: a training step's peak memory, term by term, from a model's config
gpus           the GPU table, and whether an estimate fits a card (CUDA context and allocator slack added)
measurement    ``measure``: the same step run on random weights at real shape on a GPU, phase by phase
calculator     the widget calculator: a breakdown and each card's verdict for the chosen setting
claims         the estimate checked: the seeds' memory claims with verdicts, the peaks measured on a GPU
=============  =========================================================================================

``measurement`` loads peft and bitsandbytes, so it is imported from its module, not from here.
"""

from qlora_helpers.ch01_memory.calculator import calculator, card_lines
from qlora_helpers.ch01_memory.claims import (
    CLAIM_COLUMNS,
    VALIDATION,
    benchmark_summary,
    seed_claims,
    validation_plot,
    validation_summary,
)
from qlora_helpers.ch01_memory.estimator import COMPONENTS, GIB, estimate, model_shape, quantized_bytes
from qlora_helpers.ch01_memory.gpus import fits, verdict

__all__ = ["CLAIM_COLUMNS", "COMPONENTS", "GIB", "VALIDATION", "benchmark_summary", "calculator", "card_lines",
           "estimate", "fits", "model_shape", "quantized_bytes", "seed_claims", "validation_plot",
           "validation_summary", "verdict"]
