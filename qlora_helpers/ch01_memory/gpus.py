"""Common GPUs, whether a training run fits on them, and measuring a run on one.

A card's memory is not all yours: the CUDA context (driver, kernels, cuBLAS handles) takes a few
hundred MiB before PyTorch allocates anything, and PyTorch's caching allocator reserves more than
it hands out (fragmentation). ``fits`` adds both to the predicted peak before comparing.

Example:
    >>> [g.name for g in which_gpus(9.0)][:2]
    ['RTX 3060 12GB', 'RTX 4060 Ti 16GB']
    >>> fits(6.0, 8)
    'fits'
    >>> fits(7.2, 8)
    'tight'
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_GIB = 0.75  # CUDA context + kernels, outside max_memory_allocated (0.75 GiB seen on an H100, CUDA 13)
SLACK = 0.20        # allocator slack: reserved was 2-26 % above peak allocated in benchmarks/memory_validation


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float   # total memory as nvidia-smi reports it, in GiB
    note: str = ""


GPUS = (
    GPU("RTX 4060 8GB", 8, "also RTX 3060 Ti / 3070 / 2060 Super 8GB"),
    GPU("RTX 3060 12GB", 12, "also RTX 4070 12GB"),
    GPU("RTX 4060 Ti 16GB", 16, "also RTX 4080 16GB, T4 / V100 16GB"),
    GPU("RTX 4090 24GB", 24, "also RTX 3090 / A10 / L4 24GB"),
    GPU("V100 32GB", 32, "also RTX 5090 32GB; no bf16 on V100"),
    GPU("A100 40GB", 40, ""),
    GPU("RTX A6000 48GB", 48, "also L40S / A40 48GB"),
    GPU("A100 / H100 80GB", 79.6, "H100 80GB HBM3 reports 81,559 MiB"),
)


def reserved_gib(total_gib: float, largest_block_gib: float = 0.0) -> float:
    """Peak reserved memory predicted from the peak allocated (see ``SLACK``)."""
    return total_gib * (1 + SLACK) + 0 * largest_block_gib


def needed_gib(total_gib: float, context_gib: float = CONTEXT_GIB, slack: float = SLACK) -> float:
    """Card memory a run needs: predicted peak allocated, plus allocator slack and the CUDA context."""
    return total_gib * (1 + slack) + context_gib


def fits(total_gib, gpu_gib: float, *, context_gib: float = CONTEXT_GIB, slack: float = SLACK) -> str:
    """``"fits"``, ``"tight"`` (fits only without allocator slack) or ``"no"``.

    ``total_gib`` is a number or anything with a ``total_gib`` attribute (a ``MemoryEstimate``).
    """
    total = getattr(total_gib, "total_gib", total_gib)
    if needed_gib(total, context_gib, slack) <= gpu_gib:
        return "fits"
    if total + context_gib <= gpu_gib:
        return "tight"
    return "no"


def which_gpus(total_gib, gpus=GPUS) -> list[GPU]:
    """The cards of ``gpus`` on which the run fits (``"fits"``), smallest first."""
    return [g for g in sorted(gpus, key=lambda g: g.memory_gib) if fits(total_gib, g.memory_gib) == "fits"]


def verdict(total_gib, gpus=GPUS) -> str:
    """One line: the smallest common card that fits, or why none does.

    Example:
        >>> verdict(30.0)
        'needs ~36.8 GiB: smallest common card that fits is A100 40GB'
    """
    total = getattr(total_gib, "total_gib", total_gib)
    need = needed_gib(total)
    ok = which_gpus(total, gpus)
    if not ok:
        return f"needs ~{need:.1f} GiB: more than any single card listed ({max(g.memory_gib for g in gpus):.0f} GB)"
    return f"needs ~{need:.1f} GiB: smallest common card that fits is {ok[0].name}"


def gpu_table(total_gib, gpus=GPUS) -> list[dict]:
    """One row per card: name, memory and fits / tight / no."""
    return [{"gpu": g.name, "memory_gib": g.memory_gib, "verdict": fits(total_gib, g.memory_gib)} for g in gpus]
