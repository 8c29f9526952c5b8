"""Chapter 04, a vision-language model trained with QLoRA within 8 GB.

==========  ============================================================================================
module      what it holds
==========  ============================================================================================
config      the VLM training config and its presets (ultra_low_memory, balanced, quality), validated
vram        VLM registry and VRAM plans: what each model, preset, knob and remedy needs; which GPU fits
measured    what ``benchmarks/vlm_8gb.py`` and ``vlm_hf_7b.py`` measured on a GPU: capped proofs, knobs, speed
data        image-question examples from real offline images, held-out split, balanced sampling
model       the small LLaVA (CLIP tower + projector + SmolLM2), its 4-bit language model and LoRA
loop        training and evaluation on the CPU, and a self-test of the recipe on a tiny model
records     image-chat JSONL for the ``vlm`` command: every line checked; example files from LFW/digits
processors  a hub VLM's processor (tokenizer + image processor + chat template); tiny random VLM folders
encode      a record -> the model's inputs, with the loss on the assistant's tokens only
hub_model   any image-text-to-text model in 4-bit (vision tower 16-bit), LoRA on its language model
trainer     the ``vlm`` command on TRL's ``SFTTrainer``: encoded examples, validation, best/final adapters
command     ``python -m qlora_helpers vlm``: settings from preset, config file and flags; ``run_vlm``
==========  ============================================================================================
"""

from qlora_helpers.ch04_vlm import config
from qlora_helpers.ch04_vlm.command import build_run, run_vlm
from qlora_helpers.ch04_vlm.data import balanced, make_examples, photos_336, training_mix
from qlora_helpers.ch04_vlm.loop import cpu_threads, evaluate, linear_schedule, matmul_seconds, self_test, train
from qlora_helpers.ch04_vlm.measured import (
    command_proof_table,
    gpu_benchmark_summary,
    measured_knobs,
    measured_methods,
    proof_table,
    speed_report,
    speed_verdict,
)
from qlora_helpers.ch04_vlm.model import (
    build_vlm,
    match_projector_scale,
    prepare_for_training,
    pretrain_tower,
    probe_accuracy,
    quantize_language_model,
    tower_in_4bit,
    trainable_summary,
)
from qlora_helpers.ch04_vlm.processors import write_tiny_vlm
from qlora_helpers.ch04_vlm.records import read_records, write_example_files
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

__all__ = ["MODELS", "SEED_BREAKDOWN", "balanced", "build_run", "build_vlm", "command_proof_table", "config",
           "cpu_threads", "estimate_vlm", "evaluate", "gpu_benchmark_summary", "gpu_table", "knob_table",
           "linear_schedule", "make_examples", "match_projector_scale", "matmul_seconds", "measured_knobs",
           "measured_methods", "method_table", "model_facts", "photos_336", "plan", "prepare_for_training",
           "pretrain_tower", "probe_accuracy", "proof_table", "quantization_arithmetic", "quantize_language_model",
           "read_records", "registry_table", "remedy_table", "run_vlm", "self_test", "speed_report", "speed_verdict",
           "tower_in_4bit", "train", "trainable_summary", "training_mix", "with_changes", "write_example_files",
           "write_tiny_vlm"]
