"""Planning a CUDA run from a machine without a GPU: common cards, what ``max_memory_allocated``
does not count, and the largest d_sae that fits.

The model (:mod:`profiling.model`, ``device="cuda"``) predicts what
``torch.cuda.max_memory_allocated`` would report for a training step: the tensors. A process
needs more than that from the card; the rest is listed here with typical figures (not measured
on this machine: it has no GPU), and ``fits`` compares the card with the sum.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from actcache.errors import ActcacheError
from profiling.model import TrainSpec, estimate_training

MiB = 2**20

# Memory each card reports to CUDA (nvidia-smi's total, MiB): what a process can ask for at most.
GPUS: dict[str, int] = {
    "h200-141gb": 143771 * MiB,
    "h100-80gb": 81559 * MiB,
    "a100-80gb": 81920 * MiB,
    "a100-40gb": 40960 * MiB,
    "l40s-48gb": 46068 * MiB,
    "a10g-24gb": 23028 * MiB,
    "l4-24gb": 23034 * MiB,
    "rtx4090-24gb": 24564 * MiB,
    "rtx3090-24gb": 24576 * MiB,
    "v100-32gb": 32768 * MiB,
    "v100-16gb": 16384 * MiB,
    "t4-16gb": 15360 * MiB,
}
# The cards the "largest d_sae" table is given for (24, 40 and 80 GB).
PLAN_GPUS = ("l4-24gb", "a100-40gb", "h100-80gb")


@dataclass(frozen=True)
class CudaOverhead:
    """What a CUDA training process holds on the card beyond ``max_memory_allocated``."""

    context: int = 500 * MiB  # CUDA context, torch's kernels (lazy loading, CUDA 12): 300-600 MiB
    cublas_workspace: int = 32 * MiB  # CUBLAS_WORKSPACE_CONFIG=:4096:8 on Hopper (8 MiB on older cards)
    slack: float = 0.10  # the caching allocator's reserved-but-free blocks, a share of the peak (5-20 %)

    def bytes_for(self, allocated: int) -> int:
        return self.context + self.cublas_workspace + round(self.slack * allocated)

    def describe(self) -> str:
        return (f"not counted by max_memory_allocated, added for fits (typical figures, no GPU here): CUDA "
                f"context {self.context // MiB} MiB (300-600), cuBLAS workspace {self.cublas_workspace // MiB} MiB, "
                f"caching allocator's reserved-but-free blocks {100 * self.slack:.0f} % of the peak (5-20 %)")


OVERHEAD = CudaOverhead()


def gpu_memory(name: str) -> int:
    """Bytes of a card of :data:`GPUS`; a one-line error naming the known cards otherwise."""
    key = name.strip().lower()
    if key not in GPUS:
        raise ActcacheError(f"unknown --gpu {name!r}: use one of {', '.join(GPUS)} (or --budget 80GB)")
    return GPUS[key]


def cuda_need(allocated: int, overhead: CudaOverhead = OVERHEAD) -> int:
    """What a card must have for a step whose ``max_memory_allocated`` is ``allocated``."""
    return allocated + overhead.bytes_for(allocated)


def largest_d_sae(spec: TrainSpec, budget: int, step: int = 1024, limit: int = 1 << 22) -> int:
    """The largest multiple of ``step`` for d_sae whose CUDA step (plus overheads) fits ``budget``;
    0 when not even ``step`` does. The need grows with d_sae, so a bisection finds it."""
    def fits(n: int) -> bool:
        s = replace(spec, d_sae=n, unique_pairs=None)
        return cuda_need(estimate_training(s).total) <= budget

    lo, hi = 0, limit // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * step):
            lo = mid
        else:
            hi = mid - 1
    return lo * step
