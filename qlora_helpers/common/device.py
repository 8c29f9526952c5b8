"""The machine a notebook runs on: profile, device, versions, bitsandbytes backend."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from qlora_helpers import __version__

PROFILES = ("auto", "cpu", "gpu")
# torch's CPU kernels come in levels; bf16 matrix products run in hardware only from AVX-512 on, and only
# on CPUs with the AVX512-BF16 or AMX instructions. Elsewhere (AVX2 laptops) they are ~50x slower than fp32.
NATIVE_BF16_LEVELS = ("AVX512",)
CPU_DTYPE_ENV = "QLORA_CPU_DTYPE"   # "auto" (default), "bf16" or "fp32": force the CPU's compute dtype


def resolve_profile(profile: str) -> str:
    """``"auto"`` becomes ``"gpu"`` when CUDA is visible and ``"cpu"`` otherwise.

    Asking for ``"gpu"`` without a GPU is refused with a line that says what to do.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {profile!r}")
    has_cuda = torch.cuda.is_available()
    if profile == "auto":
        return "gpu" if has_cuda else "cpu"
    if profile == "gpu" and not has_cuda:
        raise ValueError("profile='gpu' but torch sees no CUDA device: use profile='cpu' or 'auto'")
    return profile


def check_device_name(name: str, setting: str, *, auto: bool = False) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` where the command places the model itself), CUDA only where
    torch sees it; anything else is refused in one line naming ``setting``."""
    kind, _, index = name.partition(":")
    allowed = ("auto", "cpu", "cuda") if auto else ("cpu", "cuda")
    if kind not in allowed or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"{setting} {name!r} is not a device: use {', '.join(allowed)} or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting} {name}: torch sees no CUDA device; use {setting} cpu")
    return name


def default_device(profile: str) -> str:
    return "cuda" if resolve_profile(profile) == "gpu" else "cpu"


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware, by torch's reported kernel level.

    ``ATEN_CPU_CAPABILITY=avx2`` (with ``ONEDNN_MAX_CPU_ISA=AVX2``) makes a newer CPU answer as an
    AVX2 laptop does.
    """
    if torch.backends.cpu.get_cpu_capability() not in NATIVE_BF16_LEVELS:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_compute_dtype():
    """The dtype the course computes in on the CPU: bf16 where the CPU computes it natively, else fp32.

    The GPU settings (bf16 in the presets, the precision rule of chapter 05) are not this function's:
    it answers only for the CPU. ``QLORA_CPU_DTYPE=fp32`` (or ``bf16``) forces the answer.
    """
    forced = os.environ.get(CPU_DTYPE_ENV, "auto")
    if forced not in ("auto", "bf16", "fp32"):
        raise ValueError(f"{CPU_DTYPE_ENV}={forced!r}: use auto, bf16 or fp32")
    if forced == "auto":
        forced = "bf16" if cpu_native_bf16() else "fp32"
    return torch.bfloat16 if forced == "bf16" else torch.float32


def compute_dtype(device: str):
    """bf16 on a CUDA device that has it (fp16 on one that has not), ``cpu_compute_dtype()`` on the CPU."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return cpu_compute_dtype()


def versions(packages=("torch", "transformers", "peft", "bitsandbytes", "accelerate", "papermill",
                       "ipywidgets", "matplotlib", "qlora-helpers")) -> dict[str, str]:
    """Installed versions of the packages the course depends on (``"missing"`` if not installed)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:    # this package's own version is right also in a checkout that is not installed
            out[name] = __version__ if name == "qlora-helpers" else importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def device_info() -> dict:
    """Name, memory and capability of the CUDA device, or the CPU description."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": props.name, "count": torch.cuda.device_count(),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                "cuda": torch.version.cuda}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count(),
            "capability": torch.backends.cpu.get_cpu_capability(), "bf16": cpu_native_bf16(),
            "compute_dtype": str(cpu_compute_dtype()).removeprefix("torch.")}
