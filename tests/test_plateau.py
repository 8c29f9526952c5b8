"""Chapter 05's plateau rule as a Trainer callback: on a real HF ``Trainer`` run (a 2-layer Llama with LoRA,
2 steps per epoch) scripted validation losses give the rates, the ``best/`` adapter and the stop that
``PlateauSchedule`` decides, with the Trainer's warmup before them."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from qlora_helpers.ch05_multi_gpu.plateau import PlateauCallback
from qlora_helpers.ch05_multi_gpu.schedule import PlateauSchedule
from qlora_helpers.common.models import build_tiny, tiny_llama

RULE = dict(learning_rate=1e-3, min_lr=2e-4, lr_reduction_factor=0.5, lr_patience=1, improvement_threshold=0.05,
            min_val_loss=0.2)


class StepRates(TrainerCallback):
    """The rate each optimizer step is taken with (read before the step), and the rate the Trainer logs for it
    (what chapter 05's history and live log show)."""

    def __init__(self):
        self.rates, self.logged = [], []

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.rates.append(optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kw):
        if "learning_rate" in (logs or {}):
            self.logged.append(logs["learning_rate"])


def run(tmp_path, losses, *, warmup_steps=0, epochs=6, save=False, resume=None):
    torch.manual_seed(0)
    model = get_peft_model(build_tiny(tiny_llama(vocab_size=300), seed=0),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    rows = [{"input_ids": list(range(1 + i, 17 + i)), "labels": list(range(1 + i, 17 + i))} for i in range(8)]
    script = iter(losses)
    saved = {}

    def val_loss(m):
        value = next(script)
        saved[value] = {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}
        return value

    rule = PlateauCallback(PlateauSchedule(**RULE), val_loss, best_dir=tmp_path / "best")
    rates = StepRates()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=epochs,
                             learning_rate=RULE["learning_rate"], lr_scheduler_type="constant_with_warmup",
                             warmup_steps=warmup_steps, save_strategy="epoch" if save else "no", report_to="none",
                             use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[rule, rates]).train(
        resume_from_checkpoint=resume)
    run.logged = rates.logged
    return rule, rates.rates, saved, model


def test_a_plateau_halves_the_rate_and_a_good_loss_stops(tmp_path):
    rule, rates, saved, model = run(tmp_path, [2.0, 1.99, 1.0, 0.1])
    assert [(d.improved, d.reduced, d.reason) for d in rule.decisions] == [
        (True, False, None), (False, True, None), (True, False, None), (True, False, "val_loss < min_val_loss")]
    assert rates == pytest.approx([1e-3] * 4 + [5e-4] * 4), "epochs 1-2 at the rate, 3-4 at half of it"
    assert run.logged == pytest.approx(rates), "each step logs the rate it took, the first after a halving too"
    best = load_file(str(tmp_path / "best" / "adapter_model.safetensors"))
    last = {k.replace(".default", ""): v for k, v in saved[0.1].items()}
    assert set(best) == set(last) and all(torch.equal(best[k], last[k]) for k in best), "best/ is epoch 4's"
    assert isinstance(PeftModel.from_pretrained(build_tiny(tiny_llama(vocab_size=300), seed=0), tmp_path / "best"),
                      PeftModel)


def test_the_rate_below_min_lr_stops_after_warmup(tmp_path):
    rule, rates, _, _ = run(tmp_path, [2.0, 1.98, 1.97, 1.96], warmup_steps=2)
    # gains of 1 % are plateaus: 1e-3 -> 5e-4 -> 2.5e-4 -> 1.25e-4, below min_lr 2e-4 after epoch 4
    assert [d.reason for d in rule.decisions] == [None, None, None, "lr < min_lr"]
    assert len(rates) == 8 and rates[:2] == pytest.approx([0.0, 5e-4]), "the Trainer's warmup: 0, then half"
    assert rates[2:] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])


def test_the_rule_continues_where_a_resumed_checkpoint_left_it(tmp_path):
    """Killed after epoch 2 (one plateau: the rate halved), resumed from its checkpoint: epoch 3 is measured against
    epoch 1's loss, at half the rate, and epoch 4's second halving stops the run."""
    first, _, _, _ = run(tmp_path, [2.0, 1.99], epochs=2, save=True)
    assert [(d.improved, d.reduced) for d in first.decisions] == [(True, False), (False, True)]
    rule, rates, _, _ = run(tmp_path, [1.98, 1.97], epochs=4, resume=str(tmp_path / "out" / "checkpoint-4"))
    assert [(d.epoch, d.improved, d.reduced, d.reason) for d in rule.decisions] == [
        (3, False, True, None), (4, False, True, "lr < min_lr")]
    assert rates == pytest.approx([5e-4] * 2 + [2.5e-4] * 2), "the halved rate came back with the checkpoint"
