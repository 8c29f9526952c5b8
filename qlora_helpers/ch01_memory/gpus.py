"""Common GPUs, whether a training run fits on them, and measuring a run on one.

A card's memory is not all yours: the CUDA context (driver, kernels, cuBLAS handles) takes a few
hundred MiB before PyTorch allocates anything, and PyTorch's caching allocator reserves more than
it hands out (fragmentation). ``fits`` adds both to the predicted peak before comparing.

The allocator's slack is modelled from ``benchmarks/results/memory_validation.json``: reserved
exceeded the peak allocated by about one fp32 ``[tokens, vocab]`` logits block when the ``lm_head``
runs in 16-bit (blocks of the 16-bit logits, their fp32 copy and the gradients cannot reuse each
other), plus about half the layer recomputed under gradient checkpointing. The two factors were
fitted on those rows, so their errors there are in-sample; ``MARGIN`` is the worst of them, rounded up.

Example:
    >>> [g.name for g in which_gpus(9.0)][:2]
    ['RTX 3060 12GB', 'RTX 4060 Ti 16GB']
    >>> fits(5.5, 8)
    'fits'
    >>> fits(6.5, 8)
    'tight'
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_GIB = 0.95  # CUDA context + kernels, outside max_memory_reserved (0.75-0.93 GiB seen on an H200, CUDA 13,
                    # the most once bitsandbytes' 8-bit kernels had loaded)
SLACK = 0.20        # for a bare number of GiB, which carries no logits or layer sizes to model the slack from
LOGITS_SLACK = 1.0      # reserved above allocated: x the fp32 logits block, when the lm_head is 16-bit
RECOMPUTE_SLACK = 0.57  # ... plus x the layer recomputed under gradient checkpointing
MARGIN = 0.10       # "fits" keeps this share of headroom: the worst error of the reserved estimate measured
VERDICT_TEXT = {"fits": "fits", "tight": "tight", "no": "does not fit"}


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


def reserved_gib(total_gib: float, logits_gib: float = 0.0, recompute_gib: float = 0.0) -> float:
    """Peak ``max_memory_reserved`` from the peak allocated, the fp32 logits block of a 16-bit ``lm_head``
    and the layer recomputed under checkpointing (GiB; see the module doc).

        >>> reserved_gib(8.0, 1.0, 0.5)
        9.285
    """
    return total_gib + LOGITS_SLACK * logits_gib + RECOMPUTE_SLACK * recompute_gib


def needed_gib(total_gib) -> float:
    """Card memory a run needs: an estimate's ``device_gib`` (reserved memory, CUDA context, paged states),
    or for a bare number of peak-allocated GiB that number plus ``SLACK`` and the CUDA context."""
    return total_gib.device_gib if hasattr(total_gib, "device_gib") else total_gib * (1 + SLACK) + CONTEXT_GIB


def fits(total_gib, gpu_gib: float) -> str:
    """``"fits"``, ``"tight"`` or ``"no"`` (``VERDICT_TEXT`` words them for printing).

    For a ``MemoryEstimate``: ``"fits"`` with ``MARGIN`` of headroom over its ``device_gib``, ``"tight"``
    when ``device_gib`` is within ``MARGIN`` of the card (it may or may not fit), else ``"no"``.
    For a bare number of GiB: ``"fits"`` with ``SLACK`` and the context added, ``"tight"`` without slack.
    """
    if hasattr(total_gib, "device_gib"):
        need = total_gib.device_gib
        return "fits" if need * (1 + MARGIN) <= gpu_gib else "tight" if need * (1 - MARGIN) <= gpu_gib else "no"
    return "fits" if needed_gib(total_gib) <= gpu_gib else "tight" if total_gib + CONTEXT_GIB <= gpu_gib else "no"


def which_gpus(total_gib, gpus=GPUS) -> list[GPU]:
    """The cards of ``gpus`` on which the run fits (``"fits"``), smallest first."""
    return [g for g in sorted(gpus, key=lambda g: g.memory_gib) if fits(total_gib, g.memory_gib) == "fits"]


def verdict(total_gib, gpus=GPUS) -> str:
    """One line: the smallest common card that fits, or why none does.

    Example:
        >>> verdict(30.0)
        'needs ~37.0 GiB: smallest common card that fits is A100 40GB'
    """
    ok = which_gpus(total_gib, gpus)
    if not ok:
        return (f"needs ~{needed_gib(total_gib):.1f} GiB: more than any single card listed "
                f"({max(g.memory_gib for g in gpus):.0f} GB)")
    return f"needs ~{needed_gib(total_gib):.1f} GiB: smallest common card that fits is {ok[0].name}"


def find_gpu(name: str, gpus=GPUS) -> GPU:
    """The card of ``gpus`` whose name contains ``name`` (case and spaces ignored), e.g. ``"4090"``."""
    key = name.lower().replace(" ", "")
    hits = [g for g in gpus if key in g.name.lower().replace(" ", "")]
    exact = [g for g in hits if g.name.lower().replace(" ", "") == key]
    if len(exact or hits) != 1:
        raise ValueError(f"{'no' if not hits else 'more than one'} GPU in the table matches {name!r}: use one of "
                         f"{', '.join(repr(g.name) for g in gpus)}, or --gpu-gib N")
    return (exact or hits)[0]
