"""The plateau learning-rate rule of chapter 05 on scripted validation-loss sequences, one per branch; the
reversal verdict on scripted scores; the adapter size counted on the meta device."""

import json
import math
from pathlib import Path

import pytest
import yaml

from qlora_helpers.ch05_multi_gpu.learning import chance_band, learning_metrics, reversal_verdict, seed_spread
from qlora_helpers.ch05_multi_gpu.model import adapter_size
from qlora_helpers.ch05_multi_gpu.schedule import PlateauSchedule, warmup_steps
from qlora_helpers.ch05_multi_gpu.tables import adapter_verdict

ROOT = Path(__file__).resolve().parent.parent
SEED = dict(learning_rate=1e-4, min_lr=6e-5, lr_reduction_factor=0.5, lr_patience=1,
            improvement_threshold=0.05, min_val_loss=0.2)


def run(losses, **kw):
    s = PlateauSchedule(**{**SEED, **kw})
    return s, [s.end_epoch(v) for v in losses]


def test_first_epoch_always_improves():
    _, (d,) = run([9.0])
    assert d.improved and d.new_best and not d.reduced and not d.stop and d.lr == 1e-4


def test_improvement_above_threshold_keeps_the_rate():
    _, ds = run([2.0, 1.8, 1.6])          # 10 % and 11 % better
    assert [d.improved for d in ds] == [True, True, True]
    assert all(d.lr == 1e-4 and d.bad_epochs == 0 for d in ds)


def test_improvement_below_threshold_is_a_bad_epoch_but_a_new_best():
    s, ds = run([2.0, 1.95], lr_patience=3)   # 2.5 % better: under the 5 % threshold
    assert not ds[1].improved and ds[1].new_best and ds[1].bad_epochs == 1 and not ds[1].reduced
    assert s.best == 1.95 and s.reference == 2.0


def test_small_gains_add_up_against_the_reference():
    _, ds = run([2.0, 1.96, 1.92, 1.88], lr_patience=5)   # 2 % steps; 1.88 is 6 % below 2.0
    assert [d.improved for d in ds] == [True, False, False, True]
    assert [d.bad_epochs for d in ds] == [0, 1, 2, 0]


def test_patience_counts_bad_epochs_then_halves_and_resets():
    _, ds = run([2.0, 2.1, 2.0, 2.05, 2.2], lr_patience=2, min_lr=1e-6)
    assert [d.bad_epochs for d in ds] == [0, 1, 0, 1, 0]
    assert [d.reduced for d in ds] == [False, False, True, False, True]
    assert [d.lr for d in ds] == [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5]
    assert not any(d.stop for d in ds)


def test_an_improvement_resets_the_bad_count():
    _, ds = run([2.0, 2.0, 1.5, 1.5], lr_patience=2, min_lr=1e-6)
    assert [d.bad_epochs for d in ds] == [0, 1, 0, 1] and not any(d.reduced for d in ds)


def test_stop_when_lr_falls_below_min_lr_with_the_seed_config():
    # With min_lr = 6e-5 the first halving (1e-4 -> 5e-5) already ends the run.
    _, ds = run([2.0, 1.5, 1.49])
    assert ds[-1].reduced and ds[-1].lr == 5e-5 and ds[-1].stop and ds[-1].reason == "lr < min_lr"


def test_the_halving_chain_of_the_seed_diagram():
    # 1e-4 -> 5e-5 -> 2.5e-5 -> 1.25e-5, stopping once below a min_lr of 2e-5
    _, ds = run([2.0, 2.0, 2.0, 2.0], min_lr=2e-5)
    assert [d.lr for d in ds] == [1e-4, 5e-5, 2.5e-5, 1.25e-5]
    assert [d.stop for d in ds] == [False, False, False, True] and ds[-1].reason == "lr < min_lr"


def test_stop_when_val_loss_is_below_min_val_loss():
    _, ds = run([1.0, 0.19])
    assert ds[-1].stop and ds[-1].reason == "val_loss < min_val_loss" and ds[-1].lr == 1e-4


def test_min_val_loss_wins_when_both_stop_rules_fire():
    _, ds = run([0.21, 0.2])   # a flat epoch halves the rate below min_lr; 0.2 is not below min_val_loss
    assert ds[-1].reason == "lr < min_lr"
    _, ds = run([0.21, 0.205], min_val_loss=0.21)   # both fire: the loss rule is reported
    assert ds[-1].reduced and ds[-1].reason == "val_loss < min_val_loss"


def test_nan_loss_is_never_an_improvement():
    _, ds = run([2.0, math.nan], lr_patience=2)
    assert not ds[1].improved and not ds[1].new_best and ds[1].bad_epochs == 1 and not ds[1].stop


@pytest.mark.parametrize("total,ratio,want", [(1000, 0.02, 20), (10, 0.02, 1), (50, 0.1, 5), (10, 0.0, 0)])
def test_warmup_steps(total, ratio, want):
    assert warmup_steps(total, ratio) == want


@pytest.mark.parametrize("field,value", [("learning_rate", 0), ("min_lr", 2e-4), ("lr_reduction_factor", 1.0),
                                         ("lr_patience", 0), ("improvement_threshold", 1.5), ("min_val_loss", -1)])
def test_bad_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"training.{field}"):
        PlateauSchedule(**{**SEED, field: value})


@pytest.mark.parametrize("name", ["multi_gpu_32b.yaml", "multi_gpu_cpu.yaml"])
def test_config_files_build_a_schedule(name):
    cfg = yaml.safe_load((ROOT / "data" / "configs" / name).read_text())
    s = PlateauSchedule.from_config(cfg["training"], total_steps=100)
    assert s.lr == float(cfg["training"]["learning_rate"]) and s.warmup_steps >= 1
    assert isinstance(s.lr_patience, int)
    with pytest.raises(ValueError, match="min_lr"):
        PlateauSchedule.from_config({k: v for k, v in cfg["training"].items() if k != "min_lr"}, 100)
    with pytest.raises(ValueError, match="training.min_lr = 'six' is not a number"):
        PlateauSchedule.from_config({**cfg["training"], "min_lr": "six"}, 100)


# --------------------------------------------------------------------------- the reversal verdict (learning.py)
def scores(forward: float, reverse: float, new: float | None = None) -> dict:
    """An accuracy dict with the seen wording at ``forward`` / ``reverse`` and the new one at ``new`` (or the same)."""
    return {"forward": {"seen": {"choice": forward}, "new": {"choice": forward if new is None else new}},
            "reverse": {"seen": {"choice": reverse}, "new": {"choice": reverse}}}


def test_chance_band_is_the_binomial_spread_over_the_identities():
    p, low, high = chance_band(12)
    sd = math.sqrt((1 / 12) * (11 / 12) / 12)           # 0.0798
    assert p == pytest.approx(1 / 12) and high == pytest.approx(1 / 12 + 2 * sd) and low == 0.0


def test_learning_metrics_average_the_wordings_and_point_up():
    m = learning_metrics(scores(1.0, 0.25, new=0.5), "forward", 4)
    assert m == {"trained_choice_accuracy": 0.75, "trained_over_chance": 3.0, "trained_minus_other": 0.5}
    assert learning_metrics(scores(0.25, 1.0), "reverse", 4)["trained_minus_other"] == 0.75


@pytest.mark.parametrize("forward,reverse,verdict", [
    (0.9, 1 / 12, "shown"),            # trained far above the band, the other at chance
    (0.9, 0.0, "shown"),               # below the band is not "learned" either
    (0.9, 0.6, "not shown"),           # the other direction learned too
    (0.15, 1 / 12, "not learned"),     # the trained direction inside the band: no verdict on reversal
])
def test_reversal_verdict_cases(forward, reverse, verdict):
    v = reversal_verdict(scores(forward, reverse), "forward", 12)
    assert v["verdict"] == verdict and v["text"]
    assert reversal_verdict(scores(reverse, forward), "reverse", 12)["verdict"] == verdict


def test_seed_spread_reads_the_recorded_file(tmp_path):
    assert "no seed spread" in seed_spread(path=tmp_path / "missing.json")
    entry = {"seeds": [0, 1, 2], "parameters": {}, "date": "2026-12-01T00:00:00",
             "metrics": {"trained_choice_accuracy": {"values": [0.9, 1.0, 0.8], "min": 0.8, "max": 1.0}}}
    (tmp_path / "s.json").write_text(json.dumps({"notebooks": {"05_multi_gpu_32b": entry}}))
    text = seed_spread(path=tmp_path / "s.json")
    assert "0.900, 1.000, 0.800" in text and "min 0.800" in text


def test_adapter_size_is_counted_exactly_at_a_real_shape():
    lora = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    size = adapter_size("smollm2-135m", lora)           # 30 layers, hidden 576, 9 heads / 3 kv heads of 64
    per_layer = 8 * ((576 + 576) + (576 + 192) + (576 + 192) + (576 + 576))
    assert size["parameters"] == 30 * per_layer and size["tensors"] == 30 * 4 * 2
    data = 4 * size["parameters"]
    assert data < size["bytes"] < data + 100_000                       # the safetensors header on top
    assert 2 * size["parameters"] < size["bytes_fp16"] < 2 * size["parameters"] + 100_000
    v = adapter_verdict({**size, "bytes": 153e6}, claim_mb=153)
    assert v["verdict"] == "holds" and adapter_verdict(size, claim_mb=153)["verdict"] == "refuted"
