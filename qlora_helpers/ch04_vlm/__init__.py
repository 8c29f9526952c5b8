"""Chapter 04, a vision-language model trained with QLoRA within 8 GB.

==========  ============================================================================================
module      what it holds
==========  ============================================================================================
config      the VLM training config and its presets (ultra_low_memory, balanced, quality), validated
vram        VLM registry and VRAM plans: what each model, preset, knob and remedy needs; which GPU fits
measured    what ``benchmarks/vlm_8gb.py`` and ``vlm_hf_7b.py`` measured on a GPU: table specs, the speed verdict
records     image-chat JSONL for the ``vlm`` command: every line checked, encoded with the loss on the answers only;
            example files from LFW/digits
small_llava the practice's LLaVA folder (CLIP tower pre-trained here + projector + SmolLM2); answers graded
hub_model   any image-text-to-text model: its processor, 4-bit loading (vision tower 16-bit), LoRA on its language
            model; tiny random VLM folders
trainer     the ``vlm`` command on TRL's ``SFTTrainer``: encoded examples, validation, best/final adapters
command     ``python -m qlora_helpers vlm``: settings from preset, config file and flags, CPU threads; ``run_vlm``
==========  ============================================================================================
"""

from qlora_helpers.ch04_vlm import config
from qlora_helpers.ch04_vlm.command import build_run, run_vlm
from qlora_helpers.ch04_vlm.hub_model import write_tiny_vlm
from qlora_helpers.ch04_vlm.measured import (
    COMMAND_RUNS,
    PROOFS,
    SEED_SPEED,
    SEED_SPEED_COLUMNS,
    SPEED_COLUMNS,
    gpu_benchmark_summary,
    measured_knobs,
    measured_methods,
    speed_report,
    speed_rows,
    speed_verdict,
)
from qlora_helpers.ch04_vlm.records import photos_336, read_records, write_example_files
from qlora_helpers.ch04_vlm.small_llava import (
    grade,
    matmul_seconds,
    pretrain_tower,
    probe_accuracy,
    small_processor,
    tower_in_4bit,
    tower_inputs,
    write_small_llava,
)
from qlora_helpers.ch04_vlm.vram import (
    MODELS,
    SEED_BREAKDOWN,
    estimate_vlm,
    gpu_table,
    knob_table,
    method_table,
    model_facts,
    plan,
    quantization_arithmetic,
    registry_table,
    remedy_table,
    with_changes,
)

__all__ = ["COMMAND_RUNS", "MODELS", "PROOFS", "SEED_BREAKDOWN", "SEED_SPEED", "SEED_SPEED_COLUMNS", "SPEED_COLUMNS",
           "build_run", "config", "estimate_vlm", "gpu_benchmark_summary", "gpu_table", "grade", "knob_table",
           "matmul_seconds", "measured_knobs", "measured_methods", "method_table", "model_facts", "photos_336", "plan",
           "pretrain_tower", "probe_accuracy", "quantization_arithmetic", "read_records", "registry_table",
           "remedy_table", "run_vlm", "small_processor", "speed_report", "speed_rows", "speed_verdict",
           "tower_in_4bit", "tower_inputs", "with_changes", "write_example_files", "write_small_llava",
           "write_tiny_vlm"]
