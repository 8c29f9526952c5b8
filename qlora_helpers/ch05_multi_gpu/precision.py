"""Which number formats a QLoRA run can use on this device, decided once per rank.

=====================  ==================  ==============  ==============================
device                 compute dtype       loss scaling    why
=====================  ==================  ==============  ==============================
Ampere or newer (8.x+)  bf16                no              bf16 has fp32's exponent range
Volta / Turing (7.x)    fp16                GradScaler      no bf16 units; fp16 gradients
                                                            underflow without scaling
CPU with native bf16    bf16                no              AVX-512 BF16 / AMX: bf16 is fast
CPU without (AVX2)      fp32                no              bf16 there is ~50x slower than
                                                            fp32 (``device.cpu_compute_dtype``)
=====================  ==================  ==============  ==============================

The LoRA weights themselves stay fp32 in every case (peft upcasts adapters of a 16-bit model),
so the optimizer updates full-precision numbers; only the matmuls run in the compute dtype.

8-bit (LLM.int8) weights need int8 tensor cores, compute capability 7.5 or newer: a V100 (7.0)
is refused with a line that says to use 4-bit. 4-bit NF4 runs on every CUDA GPU and on the CPU.

Example:
    >>> choose((7, 0), bf16_supported=False).compute_dtype, choose((9, 0), True).compute_dtype
    ('fp16', 'bf16')
    >>> choose(None, False).compute_dtype, choose(None, True).compute_dtype
    ('fp32', 'bf16')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qlora_helpers.common.device import cpu_compute_dtype

REQUESTS = ("auto", "bf16", "fp16", "fp32")
INT8_MIN_CAPABILITY = (7, 5)   # bitsandbytes: int8 tensor cores (Turing) or newer
BF16_MIN_CAPABILITY = (8, 0)   # Ampere


@dataclass(frozen=True)
class Precision:
    compute_dtype: str      # "bf16", "fp16" or "fp32": dtype of the matmuls and of the unquantized weights
    mixed_precision: str    # what accelerate's Accelerator(mixed_precision=...) is given: "bf16", "fp16", "no"
    grad_scaling: bool      # fp16 only: scale the loss so small gradients do not flush to zero
    lora_dtype: str         # the adapter weights and optimizer states
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def _name(capability) -> str:
    return f"compute capability {capability[0]}.{capability[1]}"


def choose(capability: tuple[int, int] | None, bf16_supported: bool, request: str = "auto") -> Precision:
    """The precision for a device of ``capability`` (``None`` for the CPU); ``request`` forces one."""
    if request not in REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(REQUESTS)}, not {request!r}")
    if capability is None:
        if request == "fp16":
            raise ValueError("precision='fp16' is a GPU path (loss scaling for Volta/Turing): "
                             "use 'auto' or 'fp32' on the CPU")
        if request == "bf16" or (request == "auto" and bf16_supported):
            why = "as requested" if request == "bf16" else "this CPU computes bf16 natively"
            return Precision("bf16", "bf16", False, "fp32", f"bf16 on the CPU, {why}")
        why = "as requested" if request == "fp32" else "this CPU has no native bf16 (it would run ~50x slower)"
        return Precision("fp32", "no", False, "fp32", f"CPU: fp32 compute, {why}")
    bf16_ok = bf16_supported and tuple(capability) >= BF16_MIN_CAPABILITY
    if request == "bf16" and not bf16_ok:
        raise ValueError(f"precision='bf16' needs compute capability 8.0 or newer; this GPU has {_name(capability)}: "
                         "use 'fp16' (or 'auto')")
    if request == "fp32":
        return Precision("fp32", "no", False, "fp32", "fp32 compute, as requested (slow, twice the activations)")
    if request == "bf16" or (request == "auto" and bf16_ok):
        return Precision("bf16", "bf16", False, "fp32", f"{_name(capability)} has bf16: no loss scaling needed")
    why = "as requested" if request == "fp16" else f"{_name(capability)} has no bf16"
    return Precision("fp16", "fp16", True, "fp32", f"fp16 compute with loss scaling, {why}; LoRA weights stay fp32")


def check_quantize(quantize: str, capability: tuple[int, int] | None, device_name: str = "this GPU") -> None:
    """Refuse a quantization the device cannot run, in one line that names the fix."""
    if quantize not in ("4bit", "8bit"):
        raise ValueError(f"quantize must be '4bit' or '8bit', not {quantize!r}")
    if quantize == "8bit" and capability is not None and tuple(capability) < INT8_MIN_CAPABILITY:
        raise ValueError(f"8-bit weights need int8 tensor cores (compute capability 7.5+); {device_name} has "
                         f"{_name(capability)}: use quantize='4bit'")


def detect(device_index: int | None = None) -> tuple[tuple[int, int] | None, bool, str]:
    """(capability, bf16 supported, device name) of CUDA device ``device_index``, or the CPU's.

    On the CPU "bf16 supported" is ``device.cpu_compute_dtype()``'s answer: native bf16 (or forced).
    """
    if device_index is None or not torch.cuda.is_available():
        return None, cpu_compute_dtype() == torch.bfloat16, "CPU"
    cap = torch.cuda.get_device_capability(device_index)
    return cap, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device_index)


def torch_dtype(name: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
