"""Chapter 01, memory math: where GPU memory goes in training, and which GPU a run fits on.

===========  =========================================================================================
module       what it holds
===========  =========================================================================================
estimator    ``estimate``: a training step's peak memory, term by term, from a model's config
gpus         the GPU table, and whether an estimate fits a card (CUDA context and allocator slack added)
measurement  ``measure``: the same step run on random weights at real shape on a GPU, phase by phase
===========  =========================================================================================

``measurement`` loads peft and bitsandbytes, so it is imported from its module, not from here.
"""

from qlora_helpers.ch01_memory.estimator import (
                                                 COMPONENTS,
                                                 GIB,
                                                 MemoryEstimate,
                                                 estimate,
                                                 model_shape,
                                                 quantized_bytes,
                                                 resolve_targets,
)
from qlora_helpers.ch01_memory.gpus import CONTEXT_GIB, GPUS, fits, gpu_table, verdict, which_gpus

__all__ = ["COMPONENTS", "CONTEXT_GIB", "GIB", "GPUS", "MemoryEstimate", "estimate", "fits", "gpu_table",
           "model_shape", "quantized_bytes", "resolve_targets", "verdict", "which_gpus"]
