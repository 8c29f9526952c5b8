"""What each chapter teaches is learned: the course run's outcomes, against the spread over seeds.

Every notebook runs once under the ``course`` parameter set (``data/parameter_sets/course.yaml``; the
``course_run`` fixture of conftest.py, shared with test_notebooks.py). A chapter that trains writes the
metrics of its ``learning`` results entry, each oriented so that higher is better. A metric passes when
it reaches its worst value over the seeds recorded beside this file (``tests/learning_seeds.json``,
written by ``python -m benchmarks.learning_seeds``) minus the full spread of those seeds: run-to-run
noise stays above that line, a change that stops a model from learning falls far below it. Each
chapter also has floors that hold whatever the seeds say (above chance, a loss that falls).
"""

import json
from pathlib import Path

import pytest

from qlora_helpers.common import runner

SEEDS = json.loads((Path(__file__).parent / "learning_seeds.json").read_text())["notebooks"]
COURSE = runner.parameter_set("course")
TRAINING = ["02_tad_quantized_adapters", "03_qwen_sft", "04_vlm_8gb", "05_multi_gpu_32b"]


def seed_floor(notebook: str, metric: str) -> float:
    """The worst seed's value minus the spread of the seeds."""
    m = SEEDS[notebook]["metrics"][metric]
    return m["min"] - (m["max"] - m["min"])


@pytest.mark.parametrize("notebook", TRAINING)
def test_the_spread_behind_each_threshold_is_recorded(notebook):
    entry = SEEDS.get(notebook)
    assert entry, f"{notebook}: no seeds recorded: run python -m benchmarks.learning_seeds {notebook}"
    assert len(set(entry["seeds"])) >= 3 and entry["metrics"], f"{notebook}: record at least three seeds"
    assert all(len(m["values"]) == len(entry["seeds"]) for m in entry["metrics"].values())
    assert entry["parameters"] == COURSE.get(notebook, {}), (
        f"{notebook}: the seeds ran other course parameters than data/parameter_sets/course.yaml holds now: "
        f"run python -m benchmarks.learning_seeds {notebook} again")


def learned(course_run, notebook: str) -> dict:
    run = course_run[notebook]
    assert run.status == "ok", f"{notebook} failed at {run.error}; executed copy: {run.executed}"
    return run.results


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("notebook", TRAINING)
def test_learning_stays_within_the_seed_spread(notebook, course_run):
    got = learned(course_run, notebook)["learning"]
    recorded = SEEDS[notebook]["metrics"]
    assert set(got) == set(recorded), f"{notebook}: metrics changed: record the seeds again"
    low = {k: (round(v, 4), round(seed_floor(notebook, k), 4)) for k, v in got.items() if v < seed_floor(notebook, k)}
    assert not low, f"{notebook}: below the seeds' floor (value, floor): {low}"


@pytest.mark.slow
@pytest.mark.learning
def test_02_every_strategy_detects_far_above_chance(course_run):
    r = learned(course_run, "02_tad_quantized_adapters")
    m = r["learning"]
    for strategy in ("full_ft", "adapter", "seed_qlora", "qlora_backbone"):
        assert m[f"map05_over_chance_{strategy}"] > 5, strategy        # chance mAP@0.5 is about 0.04
    assert m["adapter_over_random_backbone"] > 2                       # the pre-trained backbone is what adapts


@pytest.mark.slow
@pytest.mark.learning
def test_03_every_mode_learns_and_qlora_stays_near_lora(course_run):
    m = learned(course_run, "03_qwen_sft")["learning"]
    for mode in ("full", "lora", "qlora-4bit", "qlora-8bit"):
        assert m[f"eval_loss_drop_{mode}"] > 0, mode
    # QLoRA-4 ends within 25 % of LoRA's held-out loss: on a 135M model the 4-bit base alone starts about
    # 13 % behind (the notebook's "loss before" column), and training must not widen that much further
    assert m["lora_over_qlora4_loss"] > 0.8
    # the answers move toward the corpus: the trained models find the corpus's answers more likely, relative to
    # the base model's own greedy answers, than the base model does (in nats per token; see corpus_preference)
    assert m["corpus_preference_gain"] > 0.1
    # the greedy answers' word F1 against the corpus answers is checked by its seed floor only: at the course
    # set's few steps and questions it moves by about as much as it varies from seed to seed


@pytest.mark.slow
@pytest.mark.learning
def test_04_training_teaches_the_model_to_see(course_run):
    m = learned(course_run, "04_vlm_8gb")["learning"]
    assert m["accuracy_gain"] > 0.1                     # held-out accuracy after minus before: 4 of 40 images
    assert m["face_accuracy_gain"] > 0.1                # faces against non-faces, from chance (0.5) upward


@pytest.mark.slow
@pytest.mark.learning
def test_05_the_trained_direction_is_learned_and_the_verdict_follows(course_run):
    r = learned(course_run, "05_multi_gpu_32b")
    m = r["learning"]
    assert m["trained_over_chance"] > 2
    assert r["reversal"]["verdict"]
