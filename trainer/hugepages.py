"""torch's transparent-huge-page advice for its CPU allocator: left at torch's default (off).

``THP_MEM_ALLOC_ENABLE=1``, read by torch once at its first allocation, makes torch
``madvise(MADV_HUGEPAGE)`` every block of 2 MB and more, so it faults in 2 MB at a time.
``trainer`` used to set it at import: when a step allocated (B, d_sae) arrays (0.27 GB each at
d_sae 16,384), fewer faults saved ~0.28 s of a 2.5 s step. The step no longer allocates those
(row blocks of pre-activations, gradient storage kept between steps), and on this project's VM
the advice now costs more than it saves: topk at d_sae 16,384, batch 4,096, 1.83-1.85 s per
step without it, 2.00-2.02 s with it (system time 0.09 vs 0.41-0.44 s a step); dyncorr within
noise either way (docs/benchmarks.md). A user can still set it in the environment.
"""

from __future__ import annotations

import os

__all__ = ["ENV", "huge_pages_requested"]

ENV = "THP_MEM_ALLOC_ENABLE"


def huge_pages_requested() -> bool:
    """Whether the environment asks torch for huge pages (what torch read, if it loaded after
    the environment was set)."""
    return os.environ.get(ENV) == "1"  # torch's check_env takes "1" / "0" only
