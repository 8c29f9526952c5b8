"""The plateau learning-rate rule of chapter 05 on scripted validation-loss sequences, one per branch."""

import math
from pathlib import Path

import pytest
import yaml

from qlora_helpers.ch05_multi_gpu.schedule import PlateauSchedule, warmup_steps

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


def test_warmup_ramps_linearly_and_follows_a_reduction():
    s = PlateauSchedule(**SEED, warmup_steps=4)
    assert [s.lr_at(i) for i in range(6)] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])
    s.lr = 5e-5
    assert s.lr_at(1) == pytest.approx(2.5e-5) and s.lr_at(10) == 5e-5
    assert PlateauSchedule(**SEED).lr_at(0) == 1e-4


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
