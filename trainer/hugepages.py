"""Ask torch's CPU allocator for transparent huge pages, before torch is imported.

A training step allocates and frees the same large arrays every step (the B x d_sae
pre-activations, the d_sae x d_in gradients: 0.15-0.27 GB each at d_sae 16,384). glibc hands
every block above its mmap threshold back to the kernel on free, so each step faults them in
again, 4 KB at a time: ~0.25 s of a 2.5 s step at that size (docs/benchmarks.md). torch's
``THP_MEM_ALLOC_ENABLE=1`` makes its CPU allocator ``madvise(MADV_HUGEPAGE)`` blocks of 2 MB and
more, so the same memory faults in 2 MB at a time. torch reads the variable once, at its first
allocation (during ``import torch``), hence the variable is set here, in ``trainer``'s package
init, which runs before any trainer module imports torch. A process that imported torch first
keeps its setting; ``THP_MEM_ALLOC_ENABLE=0`` in the environment opts out. On kernels whose THP
mode is ``never`` the advice is a no-op.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ENV", "huge_pages_requested", "request_huge_pages"]

ENV = "THP_MEM_ALLOC_ENABLE"


def request_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless the user set it or torch is already loaded; returns
    whether this process's torch allocator uses huge-page advice."""
    if "torch" not in sys.modules:
        os.environ.setdefault(ENV, "1")
    return huge_pages_requested()


def huge_pages_requested() -> bool:
    """Whether the environment asks torch for huge pages (what torch read, if it loaded after
    the environment was set)."""
    return os.environ.get(ENV) == "1"  # torch's check_env takes "1" / "0" only
