"""Chapter 05, data-parallel QLoRA from a notebook with accelerate's ``notebook_launcher``.

=========  ===============================================================================================
module     what it holds
=========  ===============================================================================================
config     the YAML training config, read and checked before the launch (one line naming file, line, key)
worker     the function each rank runs: the run as the ``sft`` command's settings, ``run_sft``, the scores
precision  bf16, fp16 with loss scaling, or fp32, decided per device
schedule   warm-up, the plateau learning-rate rule and early stopping; live history plot
plateau    that rule, ``best/`` and the early stop as a Trainer callback; the run's history (ranks only)
reversal   the reversal-curse data (LFW identities) and its scoring
learning   the learning metrics and the reversal-curse verdict computed from the scores
tables     the notebook's tables from result files: the V100 plan, the GPU runs, the face retention pool,
           ``best/`` beside ``final/``, the adapter's size at the 32B shape, the accumulation peaks
model      random-weight 4-bit models with LoRA; the adapter's size and the activation peak, measured
evaluate   ``python -m qlora_helpers evaluate``: a saved adapter scored again
nodes      the accelerate config of one node; the worker as several machines on this host
=========  ===============================================================================================

Importing this package loads neither peft nor bitsandbytes: the notebook's kernel must not have them
before ``notebook_launcher`` starts the ranks. ``model``, ``plateau`` and ``evaluate`` (which load them)
are not imported here, and ``worker`` imports chapter 03's ``sft`` command inside the rank. ``worker`` is imported
where it is used (``from qlora_helpers.ch05_multi_gpu import worker``), not here: ``python -m
qlora_helpers.ch05_multi_gpu.worker`` would otherwise find it imported already and warn.
"""

from qlora_helpers.ch05_multi_gpu import learning, reversal, tables
from qlora_helpers.ch05_multi_gpu.config import load_config
from qlora_helpers.ch05_multi_gpu.schedule import LiveHistory, PlateauSchedule

__all__ = ["LiveHistory", "PlateauSchedule", "learning", "load_config", "reversal", "tables", "worker"]
