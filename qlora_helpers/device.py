"""The machine a notebook runs on: profile, device, versions, bitsandbytes backend."""

from __future__ import annotations

import importlib.metadata
import platform

PROFILES = ("auto", "cpu", "gpu")


def resolve_profile(profile: str) -> str:
    """``"auto"`` becomes ``"gpu"`` when CUDA is visible and ``"cpu"`` otherwise.

    Asking for ``"gpu"`` without a GPU is refused with a line that says what to do.
    """
    import torch

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {profile!r}")
    has_cuda = torch.cuda.is_available()
    if profile == "auto":
        return "gpu" if has_cuda else "cpu"
    if profile == "gpu" and not has_cuda:
        raise ValueError("profile='gpu' but torch sees no CUDA device: use profile='cpu' or 'auto'")
    return profile


def default_device(profile: str) -> str:
    return "cuda" if resolve_profile(profile) == "gpu" else "cpu"


def versions(packages=("torch", "transformers", "peft", "bitsandbytes", "accelerate", "papermill",
                       "ipywidgets", "matplotlib", "qlora-helpers")) -> dict[str, str]:
    """Installed versions of the packages the course depends on (``"missing"`` if not installed)."""
    from qlora_helpers import __version__

    out = {"python": platform.python_version()}
    for name in packages:
        if name == "qlora-helpers":  # also right when run from a checkout that is not installed
            out[name] = __version__
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def device_info() -> dict:
    """Name, memory and capability of the CUDA device, or the CPU description."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": props.name, "count": torch.cuda.device_count(),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                "cuda": torch.version.cuda}
    import os
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count(),
            "bf16": True}
