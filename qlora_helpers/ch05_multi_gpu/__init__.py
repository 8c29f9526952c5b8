"""Chapter 05, data-parallel QLoRA from a notebook with accelerate's ``notebook_launcher``.

============  ============================================================================================
module        what it holds
============  ============================================================================================
worker        the function each rank runs: the run as the ``sft`` command's settings, ``run_sft``, the scores
precision     bf16, fp16 with loss scaling, or fp32, decided per device
schedule      warm-up, the plateau learning-rate rule and early stopping; live history plot
plateau       that rule, ``best/`` and the early stop as a Trainer callback; the run's history (ranks only)
model         random-weight 4-bit models with LoRA (``random:<preset>``, the peak measurement)
reversal      the reversal-curse data (LFW identities) and its scoring
learning      the learning metrics and the reversal-curse verdict computed from the scores
retention     the face retention pool measured (``benchmarks/face_retention.py``): table, plot, verdict
tables        the notebook's finished tables: the V100 plan against the write-up, the GPU benchmark runs,
              the adapter's size at the 32B shape against the write-up's, best/ beside final/, the peaks
adapter_size  that size, counted on the meta device (imports peft: run in a child process)
evaluate      ``python -m qlora_helpers evaluate``: a saved adapter scored again (imports peft: a child process)
nodes         the accelerate config of one node; the worker as several machines on this host
peak          the activations a step holds per micro-batch and accumulation (imports peft: a child process)
============  ============================================================================================

Importing this package loads neither peft nor bitsandbytes: the notebook's kernel must not have them
before ``notebook_launcher`` starts the ranks. ``model``, ``plateau``, ``adapter_size``, ``evaluate`` and ``peak``
(which load them) are not imported here, and ``worker`` imports chapter 03's ``sft`` command inside the rank.
"""

from qlora_helpers.ch05_multi_gpu import learning, retention, reversal, tables, worker
from qlora_helpers.ch05_multi_gpu.schedule import LiveHistory, PlateauSchedule

__all__ = ["LiveHistory", "PlateauSchedule", "learning", "retention", "reversal", "tables", "worker"]
