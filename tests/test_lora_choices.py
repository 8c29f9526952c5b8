"""Chapter 03b's bookkeeping: LoRA's trainable share counted at a shape, and a 4-bit type's error on a weight."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_helpers.ch03_sft.lora_choices import level_use, lora_share, quantization_error, rank_rows
from qlora_helpers.common.shapes import get_config


@pytest.mark.parametrize("targets,modules", [("all-linear", "all-linear"),
                                             ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                             ("mlp", ["gate_proj", "up_proj", "down_proj"])])
def test_lora_share_counts_what_peft_wraps(targets, modules):
    one_block = AutoModelForCausalLM.from_config(get_config("smollm2-135m", num_hidden_layers=1))
    peft_model = get_peft_model(one_block, LoraConfig(r=4, target_modules=modules))
    trainable = peft_model.get_nb_trainable_parameters()[0]
    row = lora_share("smollm2-135m", 4, targets)
    assert row["lora"] == 30 * trainable and row["params"] == 134_515_008   # the real model's 30 blocks
    assert row["share"] == row["lora"] / row["params"]


def test_rank_rows_share_grows_with_rank_and_falls_with_width():
    rows = rank_rows(("smollm2-135m", "qwen2.5-7b"), (8, 16))
    assert [r["hidden"] for r in rows] == [576, 3584]
    for r in rows:
        assert r["r=16"] == pytest.approx(2 * r["r=8"])
    assert rows[1]["r=8"] < rows[0]["r=8"]


def test_nf4_fits_normal_weights_better_than_fp4():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    nf4, fp4 = (quantization_error(weight, qt, True) for qt in ("nf4", "fp4"))
    assert nf4["rel_error"] < fp4["rel_error"] < 0.2
    assert quantization_error(weight, "nf4", False)["bits_per_weight"] == 4.5   # 4 + one fp32 absmax per 64
    assert nf4["bits_per_weight"] < 4.2                                        # the absmax in 8 bits
    use = level_use(weight, "nf4")
    assert len(use["levels"]) == 16 and sum(use["share"]) == pytest.approx(1.0)
    assert level_use(weight, "fp4")["entropy_bits"] < use["entropy_bits"] <= 4
