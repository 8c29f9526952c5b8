"""The CPU's compute dtype is decided in one place (``device.cpu_compute_dtype``): bf16 only where the
CPU multiplies bf16 natively, fp32 elsewhere (an AVX2 laptop, where bf16 runs ~50x slower). Each
answer is forced here, and each chapter's CPU path is checked to follow it."""

import os
import subprocess
import sys

import pytest
import torch

from qlora_helpers.ch03_sft.command import SFTConfig, validate
from qlora_helpers.ch04_vlm.config import preset
from qlora_helpers.ch05_multi_gpu.precision import choose, detect
from qlora_helpers.common import device

ANSWERS = {True: torch.bfloat16, False: torch.float32}


@pytest.fixture(params=[True, False], ids=["native-bf16", "avx2-laptop"])
def native(request, monkeypatch):
    monkeypatch.delenv(device.CPU_DTYPE_ENV, raising=False)
    monkeypatch.setattr(device, "cpu_native_bf16", lambda: request.param)
    return request.param


def test_device_info_reports_the_answer(native):
    info = device.device_info()
    assert info["type"] == "cpu"
    assert info["bf16"] is native
    assert info["compute_dtype"] == ("bfloat16" if native else "float32")


def test_every_chapter_follows_it(native):
    want = ANSWERS[native]
    assert device.cpu_compute_dtype() == want
    assert device.compute_dtype("cpu") == want                          # chapter 02's 4-bit layers
    for name in ("ultra_low_memory", "balanced", "quality"):           # chapter 04's presets
        cfg = preset(name)
        assert cfg.quantization.compute_dtype == "bfloat16"             # the GPU setting stays
        assert cfg.quantization.torch_dtype("cpu") == want
    cap, bf16_ok, _ = detect(None)                                      # chapter 05's worker
    assert choose(cap, bf16_ok).compute_dtype == ("bf16" if native else "fp32")


def test_sft_refuses_bf16_on_a_cpu_without_it(native):
    cfg = SFTConfig(data_path="train.jsonl", use_lora=True, device="cpu", bf16=True)
    if native:
        validate(cfg)
    else:
        with pytest.raises(ValueError, match="no native bf16 .* drop --bf16"):
            validate(cfg)


@pytest.mark.parametrize("forced, want", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_environment_variable_forces_it(monkeypatch, forced, want):
    monkeypatch.setenv(device.CPU_DTYPE_ENV, forced)
    assert device.cpu_compute_dtype() == want
    monkeypatch.setenv(device.CPU_DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match="QLORA_CPU_DTYPE='fp16': use auto, bf16 or fp32"):
        device.cpu_compute_dtype()


def test_an_avx2_kernel_level_means_fp32():
    """torch limited to its AVX2 kernels (as on most laptops) is read as having no native bf16."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    env.pop(device.CPU_DTYPE_ENV, None)
    code = ("import torch; from qlora_helpers.common.device import cpu_compute_dtype, device_info; "
            "print(torch.backends.cpu.get_cpu_capability(), cpu_compute_dtype(), device_info()['bf16'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["AVX2", "torch.float32", "False"]
