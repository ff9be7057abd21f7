"""The distinct pairs of a TopK batch on CPU, through the fused kernels of :mod:`pair_kernels`.

:class:`FusedPairs` holds one batch's packed, sorted row pairs (one int64 per row pair) and
answers the penalty's three questions about them: the distinct keys with their product sums,
``R`` per distinct pair, and the gradient scattered back to the row entries. The torch path
(:func:`~trainer.saes.pairs.unique_pairs`) does the same on other devices and is the reference
the tests hold this one to.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from torch import Tensor

from trainer.saes import pair_kernels as kern

__all__ = ["FusedPairs", "add_distinct", "fused_pairs_supported", "kernel_threads", "n_slices"]

_FLOATS = (torch.float32, torch.float64)


def _layout(B: int, k: int) -> tuple[int, int]:
    """``kb`` (bits of a position in a row) and ``shift`` (bits of ``b, p, q``) of the packing."""
    kb = max(1, (k - 1).bit_length())
    return kb, max(1, (B - 1).bit_length()) + 2 * kb


def fused_pairs_supported(B: int, k: int, d: int, device: torch.device) -> bool:
    """The fused kernels run on CPU when ``key << shift | b, p, q`` fits an int64."""
    _, shift = _layout(B, k)
    return device.type == "cpu" and k >= 2 and (d * d - 1).bit_length() + shift <= 63


def kernel_threads() -> int:
    """Threads for the kernels: torch's intra-op count (what the run was given), capped by numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def n_slices() -> int:
    """Slices of the packed pairs: several per thread, so one hot latent cannot starve the others."""
    return 4 * kernel_threads()


class _Scratch:
    """Per-step temporaries kept for the next step: a fresh 30-70 MB array costs its page
    faults and the kernel's zeroing on every step. An array is taken (popped) for one batch and
    given back when that batch's backward is done, so two live batches never share one."""

    def __init__(self) -> None:
        self._free: dict[str, np.ndarray] = {}

    def take(self, name: str, n: int, dtype: type) -> np.ndarray:
        a = self._free.pop(name, None)
        if a is None or a.dtype != dtype or not n <= a.size <= 2 * n + 4096:
            a = np.empty(n + n // 8, dtype=dtype)  # some headroom: U changes from step to step
        return a

    def give(self, arrays: dict[str, np.ndarray]) -> None:
        self._free.update(arrays)


_SCRATCH = _Scratch()


def add_distinct(flat: Tensor, keys: Tensor, values: Tensor, scale: float) -> bool:
    """``flat[keys] += scale * values`` in parallel on CPU, for distinct int64 ``keys`` (the
    penalty's moments); False (nothing done) where the kernel does not apply."""
    if flat.device.type != "cpu" or flat.dtype not in _FLOATS or values.dtype != flat.dtype \
            or keys.dtype != torch.int64 or not flat.is_contiguous():
        return False
    numba.set_num_threads(kernel_threads())
    kern.scatter_distinct(flat.numpy(), keys.numpy(), values.numpy(), scale)
    return True


@dataclass
class FusedPairs:
    """One batch's row pairs, packed and sorted slice by slice (see :mod:`pair_kernels`)."""

    packed: np.ndarray  # (n,) int64
    bounds: np.ndarray  # (n_buckets + 1,) slice offsets into packed
    uoff: np.ndarray  # (n_buckets + 1,) slice offsets into the distinct keys
    vs: np.ndarray  # (B k,) the sorted rows' values, flat
    k: int
    d: int
    kb: int  # the packing (_layout)
    shift: int
    scratch: dict[str, np.ndarray] = field(default_factory=dict)  # taken from _SCRATCH, given back by release()

    def __post_init__(self) -> None:
        # Runs once: from release(), or when a batch without backward is collected.
        self._give_back = weakref.finalize(self, _SCRATCH.give, self.scratch)

    def release(self) -> None:
        """Give the scratch arrays back (after the backward): this object is unusable afterwards."""
        self._give_back()
        self.packed = self.vs = None

    @classmethod
    def build(cls, s: Tensor, vs: Tensor, d: int) -> FusedPairs:
        """From the sorted rows ``s`` (B, k) and their values ``vs`` (float32 or float64)."""
        if vs.dtype not in _FLOATS:
            raise TypeError(f"the fused pair kernels take float32 or float64 values, got {vs.dtype}")
        B, k = s.shape
        kb, shift = _layout(B, k)
        threads = kernel_threads()
        numba.set_num_threads(threads)
        n_buckets = n_slices()
        s_np = s.to(torch.int64).numpy()
        bucket_of = kern.plan_buckets(s_np, d, n_buckets)
        n = B * k * (k - 1) // 2
        scratch = {name: _SCRATCH.take(name, n, np.int64) for name in ("packed", "sort_tmp")}
        packed = scratch["packed"][:n]
        bounds = kern.pack_pairs(s_np, d, kb, shift, bucket_of, n_buckets, packed)
        base, span_bits = kern.slice_spans(bucket_of, d, n_buckets)
        kern.radix_sort_slices(packed, scratch["sort_tmp"][:n], shift, bounds, base, span_bits, kern.MAX_DIGIT_BITS)
        uoff = kern.count_runs(packed, shift, bounds)
        return cls(packed, bounds, uoff, vs.contiguous().view(-1).numpy(), k, d, kb, shift, scratch)

    @property
    def n_unique(self) -> int:
        return int(self.uoff[-1])

    def sums(self) -> tuple[Tensor, Tensor]:
        """The distinct keys (U,) int64, ascending, and ``q = sum_b v_lo v_hi`` (U,) for each."""
        U = self.n_unique
        keys, q = np.empty(U, dtype=np.int64), np.empty(U, dtype=self.vs.dtype)
        kern.run_sums(self.packed, self.shift, self.kb, self.k, self.bounds, self.uoff, self.vs, keys, q)
        return torch.from_numpy(keys), torch.from_numpy(q)

    def correlations(self, keys: Tensor, q: Tensor, M: Tensor, m_scale: float, q_scale: float, mu: Tensor,
                     rs: Tensor) -> tuple[Tensor, Tensor, np.ndarray, int, int]:
        """``R_ij`` with ``S_ij = m_scale M[key] + q_scale q - mu_i mu_j`` (``M`` flat) and
        ``rr = rs_i rs_j`` per distinct pair (0 where ``q = 0``), ``[sum R^2, sum |R|, max |R|]``,
        the number of kept pairs and of non-finite ``R``."""
        U = keys.numel()
        for name in ("R", "rr"):
            self.scratch[name] = _SCRATCH.take(name, U, self.vs.dtype)
        R, rr = self.scratch["R"][:U], self.scratch["rr"][:U]
        sums, kept, bad = kern.correlations(keys.numpy(), q.numpy(), M.numpy(), m_scale, self.d, q_scale,
                                            mu.numpy(), rs.numpy(), R, rr, n_slices())
        return torch.from_numpy(R), torch.from_numpy(rr), sums, kept, bad

    def backward(self, keys: Tensor, R: Tensor, rr: Tensor, coef: float, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """With ``a_ij = coef R_ij rr_ij``: ``sum_q a_pq v_q`` per sorted row entry (B k,),
        ``sum_j R_ij^2`` (d,) and ``sum_j a_ij mu_j`` (d,) per latent."""
        g, num, gmu = kern.backward_pass(self.packed, self.shift, self.kb, self.k, self.bounds, self.uoff, keys.numpy(),
                                         R.numpy(), rr.numpy(), coef, mu.numpy(), self.vs, self.d,
                                         kernel_threads())
        return torch.from_numpy(g), torch.from_numpy(num), torch.from_numpy(gmu)
