"""Chapter 01, memory math: where GPU memory goes in training, and which GPU a run fits on.

=============  =========================================================================================
module         what it holds
=============  =========================================================================================
architectures  what a decoder's ``config.json`` says about its memory: sizes and the layout of a block
estimator      ``estimate``: a training step's peak memory, term by term, from a model's config
gpus           the GPU table, and whether an estimate fits a card (CUDA context and allocator slack added)
measurement    ``measure``: the same step run on random weights at real shape on a GPU, phase by phase
validation     the estimate against the peaks measured on a GPU: the table of the benchmark's file
calculator     the widget calculator: a breakdown and each card's verdict for the chosen setting
claims         the seeds' memory claims, each with the estimate and a verdict, and their columns
=============  =========================================================================================

``measurement`` loads peft and bitsandbytes, so it is imported from its module, not from here.
"""

from qlora_helpers.ch01_memory.calculator import calculator, card_lines
from qlora_helpers.ch01_memory.claims import CLAIM_COLUMNS, seed_claims, seen
from qlora_helpers.ch01_memory.estimator import (
                                                 COMPONENTS,
                                                 GIB,
                                                 MemoryEstimate,
                                                 estimate,
                                                 largest_fit,
                                                 model_shape,
                                                 quantized_bytes,
                                                 resolve_targets,
)
from qlora_helpers.ch01_memory.gpus import CONTEXT_GIB, GPUS, fits, verdict, which_gpus
from qlora_helpers.ch01_memory.validation import VALIDATION, benchmark_summary, validation_plot, validation_summary

__all__ = ["CLAIM_COLUMNS", "COMPONENTS", "CONTEXT_GIB", "GIB", "GPUS", "MemoryEstimate", "VALIDATION",
           "benchmark_summary", "calculator", "card_lines",
           "estimate", "largest_fit",
           "fits", "model_shape", "quantized_bytes", "resolve_targets", "seed_claims", "seen",
           "validation_plot", "validation_summary", "verdict", "which_gpus"]
