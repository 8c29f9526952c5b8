"""What every chapter shares.

==========  ==========================================================================================
module      what it holds
==========  ==========================================================================================
assets      the real offline assets: fetched from pinned PyPI wheels, converted once, cached with sha256
device      profile, device, versions, and the CPU's compute dtype (bf16 only where it is native)
files       the repository root, atomic writers, notebook results and benchmark result files
bench       what every GPU result file records (device, versions, command, date)
results     showing a result file: a Markdown table, a "measured on" line, a plot, from a small spec
runner      the papermill harness behind ``python -m qlora_helpers run``
outputs     the committed notebook outputs: written back from a run, stale cells found
widgets     the parameter panel of the training chapters
shapes      named real model shapes (Qwen2.5 0.5B-32B, Llama, Mistral, SmolLM2, LLaVA-1.5, Qwen2-VL)
models      tiny random models for tests, random weights at real shapes, ``load_causal_lm``
quant       bitsandbytes: the backend, a 4-bit / 8-bit check on one layer, CPU training layout
optim       the course's optimizer names: the Trainer's name for each, and the class that runs it
run_folder  the output folder of ``sft`` and ``vlm``: the course's files, checkpoints, what a resume may change
==========  ==========================================================================================

The notebooks' set-up cells take the few names below from here; everything else is imported from its
module.
"""

from qlora_helpers.common.device import compute_dtype, default_device, device_info, resolve_profile, versions
from qlora_helpers.common.files import load_benchmark, optional_benchmark, repo_root, results_dir, save_results

__all__ = ["compute_dtype", "default_device", "device_info", "load_benchmark", "optional_benchmark", "repo_root",
           "resolve_profile", "results_dir", "save_results", "versions"]
