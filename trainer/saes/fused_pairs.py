"""The distinct pairs of a TopK batch on CPU, through the fused kernels of :mod:`pair_kernels`.

Two ways to merge the B k (k - 1) / 2 row pairs, one interface (:func:`build_pairs`, then
``terms``, ``gradient``, ``release``): the distinct keys with their product
sums (the moments), ``R`` per distinct pair with the loss and diagnostics, and the gradient
scattered back to the row entries. The torch path (:func:`~trainer.saes.pairs.unique_pairs`)
does the same on other devices and is the reference the tests hold both to.

* :class:`FusedPairs` (sorted): every row pair packed into one int64 and radix-sorted slice by
  slice. Its cost follows the row pairs only, but a sort of n keys costs several passes over
  them (~4 ms for the 1M row pairs of B 512, k 64, measured on 2 cores).
* :class:`DensePairs` (dense triangle): the products summed straight into a dense array of the
  d_sae x d_sae upper triangle (:class:`TriangleLayout`); the distinct pairs are the entries
  that were written (a bitmap of them gives their order). The forward sweeps the triangle once,
  vectorised, writing each pair's weight into a second array that the backward reads; the sums
  stay where they are and go into the running statistics by one more sweep (:class:`DenseSums`),
  which also puts the array back at rest. No sort, no keys written out, but ~d_sae^2 entries of
  memory (two triangles) and a few sequential passes over them per batch.

The choice (:func:`dense_triangle`) depends only on the shapes, so it is the same on every step
of a run (and in every process of one): the dense path is taken when the triangle holds at most
``DENSE_RATIO`` = 4 times as many entries as the batch has row pairs, and its array costs at most
``DENSE_MAX_BYTES`` = 128 MiB. Why: its cost is a pass over the row pairs each way plus a few
sequential ones over the triangle, the sorted path's a sort of the row pairs. Penalty with its
backward, measured on 2 shared cores (triangle / row pairs: dense vs sorted): B 512, k 64, 0.64
(d_sae 1152) 6 vs 27 ms, 2.0 11 vs 31 ms, 4.6 19 vs 33 ms, 8.1 26 vs 34 ms, 16 even; B 4096,
k 64, 1.0 (d_sae 4096) 73 vs 249 ms, 4.1 168 vs 281 ms, 8.1 265 vs 361 ms. Up to 4 it is 1.7x
faster or more, and its two arrays (2 d^2 bytes each in float32, the second with 1/8 headroom:
at most ~34 bytes per row pair) stay near the sorted path's scratch and moments (18 bytes per
row pair, 12 per distinct pair); beyond, the gain shrinks while the memory grows. The byte cap
(per array) bounds what a large batch could ask for. Both paths give the very same keys, sums,
``R``, ``rr``, kept pairs, loss and statistics update (the sums are added in the same order);
their gradients agree to rounding. (The timings above predate the sweep, which made the dense
path faster still: docs/benchmarks.md.)
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from trainer.saes import pair_kernels as kern

__all__ = ["DENSE_MAX_BYTES", "DENSE_RATIO", "DensePairs", "DenseSums", "FusedPairs", "PairTerms", "add_distinct",
           "DenseForward", "build_pairs", "dense_entries", "dense_triangle", "fused_pairs_supported",
           "kernel_threads", "latent_terms", "n_slices", "sort_rows", "triangle_layout"]

_FLOATS = (torch.float32, torch.float64)
# The dense path's rule (dense_triangle; the module docstring says why these numbers).
DENSE_RATIO = 4.0  # triangle entries per row pair, at most
DENSE_MAX_BYTES = 128 * 2**20  # each of the dense triangle's two arrays (dense_entries), at most


def _layout(B: int, k: int) -> tuple[int, int]:
    """``kb`` (bits of a position in a row) and ``shift`` (bits of ``b, p, q``) of the packing."""
    kb = max(1, (k - 1).bit_length())
    return kb, max(1, (B - 1).bit_length()) + 2 * kb


def fused_pairs_supported(B: int, k: int, d: int, device: torch.device) -> bool:
    """The fused kernels run on CPU when ``key << shift | b, p, q`` fits an int64."""
    _, shift = _layout(B, k)
    return device.type == "cpu" and k >= 2 and (d * d - 1).bit_length() + shift <= 63


class TriangleLayout(NamedTuple):
    """The dense path's array: row ``lo`` of the upper triangle holds ``hi = lo .. d - 1`` (the
    diagonal slot unused) from a multiple of 64 on, so its bitmap words are its own. ``words``
    (d + 1,) uint64: each row's first bitmap word (``64 words[lo]``: its first entry), the total
    last; ``base`` (d,) uint64: pair ``(lo, hi)`` is entry ``base[lo] + hi``."""

    words: np.ndarray
    base: np.ndarray

    @property
    def entries(self) -> int:
        return 64 * int(self.words[-1])


@functools.lru_cache(maxsize=8)
def triangle_layout(d: int) -> TriangleLayout:
    """:class:`TriangleLayout` for d latents (read-only arrays, shared)."""
    words = np.zeros(d + 1, dtype=np.uint64)
    np.cumsum(-(-(d - np.arange(d)) // 64), out=words[1:])
    base = 64 * words[:-1] - np.arange(d, dtype=np.uint64)
    words.flags.writeable = base.flags.writeable = False
    return TriangleLayout(words, base)


def dense_entries(d: int) -> int:
    """Entries of the dense path's array for d latents (~d^2 / 2 + 32 d)."""
    return triangle_layout(d).entries


def dense_triangle(B: int, k: int, d: int, itemsize: int) -> bool:
    """Whether a (B, k) batch over d latents, values of ``itemsize`` bytes, takes the dense-triangle
    path (module docstring): a function of the shapes only, so it is deterministic (and resume
    exact). Under dyncorr's cosine k(t) the choice can change as k falls; that changes no number,
    since both paths give the same bits (tests/test_covariance.py)."""
    return (d * (d - 1) // 2 <= DENSE_RATIO * (B * k * (k - 1) // 2)
            and dense_entries(d) * itemsize <= DENSE_MAX_BYTES)


def build_pairs(s: Tensor, vs: Tensor, d: int, *, cut: np.ndarray | None = None) -> FusedPairs | DensePairs:
    """The batch's pairs from the sorted rows ``s`` (B, k) and their values ``vs``, by the path
    :func:`dense_triangle` picks (``cut``: the rows' cuts from :func:`sort_rows`, for the dense
    path; computed here when None)."""
    if vs.dtype not in _FLOATS:
        raise TypeError(f"the fused pair kernels take float32 or float64 values, got {vs.dtype}")
    B, k = s.shape
    if dense_triangle(B, k, d, vs.element_size()):
        return DensePairs.build(s, vs, d, cut=cut)
    return FusedPairs.build(s, vs, d)


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


class LentArrays:
    """Arrays handed out as views that outlive the step: the batch's distinct keys and sums
    (``PairMoments``), which ``stats.update`` reads after the optimiser step and the trainer keeps
    with the step's output until the next step is done. A fresh ~100 MB pair of them costs its
    page faults on every step (at d_sae 16k, 2.55 vs 2.62 s per dyncorr step with and without the
    pool: docs/benchmarks.md), so the buffer goes back to the pool when its view is collected,
    whoever held it last; at most :data:`_KEEP` wait per name."""

    def __init__(self) -> None:
        self._free: dict[str, list[np.ndarray]] = {}

    def take(self, name: str, n: int, dtype: type) -> np.ndarray:
        free = self._free.setdefault(name, [])
        buf = None
        while free and buf is None:
            b = free.pop()
            if b.dtype == dtype and n <= b.size <= 2 * n + 4096:
                buf = b
        if buf is None:
            buf = np.empty(n + n // 8, dtype=dtype)  # headroom: U changes from step to step
        view = buf[:n]
        weakref.finalize(view, self._give, name, buf)
        return view

    def _give(self, name: str, buf: np.ndarray) -> None:
        free = self._free.setdefault(name, [])
        if len(free) < _KEEP:
            free.append(buf)

    def waiting(self, name: str) -> int:
        """Buffers of ``name`` back in the pool, waiting to be lent again."""
        return len(self._free.get(name, []))


_KEEP = 2  # a batch's arrays and the previous one's: the trainer holds one step's output across the next
_LENT = LentArrays()


class _CleanArrays:
    """The dense path's arrays of sums, kept between batches at rest (every entry -0.0, "no pair"):
    a fresh one costs its page faults and a fill, while the statistics' update puts a used one back
    at rest in the pass that reads it. An array is taken for one batch and given back clean; one
    per size and dtype is kept."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, np.dtype], np.ndarray] = {}

    def take(self, n: int, dtype: np.dtype) -> np.ndarray:
        a = self._free.pop((n, np.dtype(dtype)), None)
        return np.full(n, -0.0, dtype=dtype) if a is None else a

    def give(self, a: np.ndarray) -> None:
        self._free[(a.size, a.dtype)] = a


_CLEAN = _CleanArrays()


class PairTerms(NamedTuple):
    """What the penalty's forward needs from a batch's pairs: the moments, as the distinct keys
    (U,) int64, ascending, with ``q = sum_b v_lo v_hi`` (U,) (sorted path) or as the dense array of
    those sums (``triangle``, dense path; its ``pairs()`` reads the keys and sums out);
    ``[sum R^2, sum |R|, max |R|]`` (float64), the kept pairs (``q != 0``) and the non-finite ``R``."""

    keys: Tensor | None
    q: Tensor | None
    sums: np.ndarray
    kept: int
    bad: int
    triangle: DenseSums | None = None


def add_distinct(flat: Tensor, keys: Tensor, values: Tensor, scale: float) -> bool:
    """``flat[keys] += scale * values`` in parallel on CPU, for distinct int64 ``keys`` (the
    penalty's moments); False (nothing done) where the kernel does not apply."""
    if flat.device.type != "cpu" or flat.dtype not in _FLOATS or values.dtype != flat.dtype \
            or keys.dtype != torch.int64 or not flat.is_contiguous():
        return False
    numba.set_num_threads(kernel_threads())
    kern.scatter_distinct(flat.numpy(), keys.numpy().view(np.uint64), values.numpy(), scale)
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
    keys: Tensor | None = None  # from terms(), for the backward
    R: Tensor | None = None
    rr: Tensor | None = None
    g_sorted: Tensor | None = None  # from latent_grads(), for entry_grads()

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
        keys, q = _LENT.take("keys", U, np.int64), _LENT.take("q", U, self.vs.dtype)
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

    def terms(self, M: Tensor, m_scale: float, q_scale: float, mu: Tensor, rs: Tensor) -> PairTerms:
        """:meth:`sums`, then :meth:`correlations` (kept, with the keys, for :meth:`latent_grads`)."""
        keys, q = self.sums()
        self.R, self.rr, sums, kept, bad = self.correlations(keys, q, M, m_scale, q_scale, mu, rs)
        self.keys = keys
        return PairTerms(keys, q, sums, kept, bad)

    def gradient(self, go: Tensor, mu: Tensor, s_diag: Tensor, idx: Tensor, perm: Tensor, v: Tensor) -> Tensor:
        """``dL/dv / B`` per entry of the batch ``(idx, v)`` (B, k), ``perm`` its rows' sorting
        permutation, ``go = dL/dloss / P``, ``mu`` and ``s_diag`` (``mu~``, ``diag S``) those of
        :meth:`terms`: ``corr_penalty._CorrPenalty``'s backward, on what :meth:`terms` computed."""
        num, g_mu = self.latent_grads(2.0 * float(go), mu)
        c = torch.where(num != 0, -go * num / s_diag, v.new_zeros(()))  # dL/dS_ii; 0 outside the pairs
        return self.entry_grads(-g_mu - 2.0 * c * mu, 2.0 * c, idx, perm, v).div_(idx.shape[0])

    def latent_grads(self, coef: float, mu: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`backward` on what :meth:`terms` computed: ``sum_j R_ij^2`` and ``sum_j a_ij mu_j``
        per latent (``a = coef R rr``); the row entries' sums are kept for :meth:`entry_grads`."""
        self.g_sorted, num, gmu = self.backward(self.keys, self.R, self.rr, coef, mu)
        return num, gmu

    def entry_grads(self, g_lat: Tensor, c2_lat: Tensor, idx: Tensor, perm: Tensor, v: Tensor) -> Tensor:
        """Per entry of the batch ``(idx, v)`` (B, k), ``perm`` its rows' sorting permutation:
        ``sum_q a_pq v_q + g_lat[l] + c2_lat[l] v`` for latent ``l`` (after :meth:`latent_grads`)."""
        g = v.new_zeros(idx.shape).scatter_(1, perm, self.g_sorted.view(idx.shape))
        self.g_sorted = None
        flat_idx = idx.reshape(-1)
        return g.add_(g_lat.index_select(0, flat_idx).view_as(g) + c2_lat.index_select(0, flat_idx).view_as(g) * v)

    def backward(self, keys: Tensor, R: Tensor, rr: Tensor, coef: float, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """With ``a_ij = coef R_ij rr_ij``: ``sum_q a_pq v_q`` per sorted row entry (B k,),
        ``sum_j R_ij^2`` (d,) and ``sum_j a_ij mu_j`` (d,) per latent."""
        g, num, gmu = kern.backward_pass(self.packed, self.shift, self.kb, self.k, self.bounds, self.uoff, keys.numpy(),
                                         R.numpy(), rr.numpy(), coef, mu.numpy(), self.vs, self.d,
                                         kernel_threads())
        return torch.from_numpy(g), torch.from_numpy(num), torch.from_numpy(gmu)


class DenseSums:
    """One batch's pair sums left in the dense array (``DensePairs``' moments): they go into the
    running statistics by one pass over the triangle (:meth:`add_to`), which also puts the array
    back at rest for the next batch. The distinct keys and sums are read out only when asked for
    (:meth:`pairs`). A batch whose update never runs (a skipped step) is collected with its array
    still holding sums: it is put back at rest then (numpy, not a kernel: this may run in any
    thread)."""

    def __init__(self, qd: np.ndarray, bm: np.ndarray, off: np.ndarray, d: int) -> None:
        self.d, self._bm, self._off = d, bm, off
        self._state = {"qd": qd}
        self._pairs: tuple[Tensor, Tensor] | None = None
        self._give_back = weakref.finalize(self, _put_back, self._state)

    @property
    def n_pairs(self) -> int:
        return int(self._off[-1])

    @property
    def consumed(self) -> bool:
        """Added into the statistics already, with nothing read out before: no sums left to give."""
        return self._state["qd"] is None and self._pairs is None

    def pairs(self) -> tuple[Tensor, Tensor]:
        """The distinct keys (U,) int64, ascending, and their sums ``q`` (U,): what the sorted path
        hands over (read before :meth:`add_to`, or kept from a read before it)."""
        if self._pairs is None:
            qd = self._state["qd"]
            if qd is None:
                raise RuntimeError("these pair sums were already added into the statistics (add_to)")
            keys, q = read_pairs(self._bm, self._off, self.d, qd, with_keys=True)
            self._pairs = torch.from_numpy(keys), torch.from_numpy(q)
        return self._pairs

    def add_to(self, flat: Tensor, scale: float, q_diag: Tensor | None = None) -> bool:
        """``flat[lo * d + hi] += scale * q`` for every pair (``flat``: the d x d second-moment
        buffer, flat), and ``flat[i * d + i] += q_diag[i] * scale`` for each latent if ``q_diag``
        is given (in ``flat``'s dtype, as torch's ops would), and the array back at rest; False
        (nothing done) where the kernel does not apply (then add :meth:`pairs` instead)."""
        qd = self._state["qd"]
        if qd is None or flat.device.type != "cpu" or not flat.is_contiguous() \
                or flat.numpy().dtype != qd.dtype or flat.numel() != self.d * self.d \
                or (q_diag is not None and (q_diag.dtype != flat.dtype or q_diag.device != flat.device)):
            return False
        numba.set_num_threads(kernel_threads())
        layout = triangle_layout(self.d)
        diag = q_diag.contiguous().numpy() if q_diag is not None else qd[:0]
        kern.triangle_update(qd, layout.words, layout.base, flat.numpy(), self.d, scale, qd.dtype.type(-0.0),
                             kernel_threads(), diag, qd.dtype.type(scale))
        self._state["qd"] = None
        self._give_back.detach()
        _CLEAN.give(qd)
        return True


def read_pairs(bm: np.ndarray, off: np.ndarray, d: int, dense: np.ndarray, *, with_keys: bool = False
               ) -> tuple[np.ndarray | None, np.ndarray]:
    """The pairs of a dense-triangle array (marked in ``bm``, each row's first at ``off``), in
    ascending key order: their keys ``lo * d + hi`` (``with_keys``, else None) and their values."""
    U = int(off[-1])
    keys, vals = np.empty(U if with_keys else 0, dtype=np.int64), np.empty(U, dtype=dense.dtype)
    layout = triangle_layout(d)
    numba.set_num_threads(kernel_threads())
    kern.dense_pairs(bm, np.uint64(d), layout.words, layout.base, off, dense, keys, vals)
    return (keys if with_keys else None), vals


def _put_back(state: dict) -> None:
    """The array of a batch collected before its sums were added: back at rest, into the pool."""
    qd = state["qd"]
    if qd is not None:
        qd.fill(-0.0)
        _CLEAN.give(qd)


class DenseForward(NamedTuple):
    """What :meth:`DensePairs.forward` gives the penalty: the pairs (for the backward), their
    terms, ``B m_t``, ``B diag(Q_t)``, ``mu~``, ``diag(S)``, the rows' sorting permutation,
    ``min_var`` and, if asked for, the gradient."""

    pairs: DensePairs | None  # None with the gradient (nothing left for a backward)
    terms: PairTerms
    m: Tensor
    q_diag: Tensor
    mu_t: Tensor
    s_diag: Tensor
    perm: Tensor
    min_var: Tensor
    grad: Tensor | None  # dL/dv for dL/dloss = 1 (with_grad)


@dataclass
class DensePairs:
    """One batch's pairs summed into a dense array of the upper triangle (the dense-triangle path,
    module docstring; layout: :class:`TriangleLayout`; kernels in :mod:`pair_kernels`). ``qd``
    holds the sums after :meth:`build`; :meth:`terms` hands it over as the batch's moments
    (:class:`DenseSums`) and writes the pairs' weights ``w = R rr`` into a second array, ``wd``,
    which the backward reads and :meth:`release` gives back."""

    s: np.ndarray  # (B, k) int64, the sorted rows
    vs: np.ndarray  # (B, k) their values
    d: int
    qd: np.ndarray | None  # (dense_entries(d),) taken from _CLEAN; None once terms() handed it over
    bm: np.ndarray  # (entries / 64,) uint64: which entries of qd hold a pair
    off: np.ndarray  # (d + 1,) where each lo latent's pairs start among the distinct keys
    cut: np.ndarray  # (B, n_slices + 1) uint64: each row's positions per slice of lo latents (row_cuts)
    scratch: dict[str, np.ndarray] = field(default_factory=dict)  # wd, from _SCRATCH, given back by release()
    num: np.ndarray | None = None  # (d,) sum_j R_ij^2, from terms()
    gw: np.ndarray | None = None  # (d,) sum_j w_ij mu_j, from terms()
    R: Tensor | None = None  # (U,), only from terms(..., with_r=True)
    rr: Tensor | None = None

    def __post_init__(self) -> None:
        # Runs once: from release(), or when a batch without backward is collected.
        self._give_back = weakref.finalize(self, _SCRATCH.give, self.scratch)
        self._sums = DenseSums(self.qd, self.bm, self.off, self.d)  # owns qd from here: back at rest if unused

    @property
    def layout(self) -> TriangleLayout:
        return triangle_layout(self.d)

    @classmethod
    def build(cls, s: Tensor, vs: Tensor, d: int, *, cut: np.ndarray | None = None) -> DensePairs:
        """Sum the products of the sorted rows ``s`` (B, k), values ``vs``, into the dense array
        (``cut``: :func:`pair_kernels.row_cuts` of ``s`` with :func:`n_slices` slices, if known)."""
        numba.set_num_threads(kernel_threads())
        s_np = s.to(torch.int64).numpy()
        vs_np = vs.detach().contiguous().numpy()
        layout = triangle_layout(d)
        qd = _CLEAN.take(layout.entries, vs_np.dtype)
        if cut is None:
            cut = kern.row_cuts(s_np, d, n_slices())
        cut = cut.view(np.uint64)  # unsigned indices: pair_kernels' note
        kern.dense_accumulate(s_np.view(np.uint64), vs_np, cut, layout.base, qd)
        bm = np.empty(qd.size // 64, dtype=np.uint64)
        kern.pair_bitmap(qd.view(_BITS[qd.dtype]).reshape(-1, 64), _REST[qd.dtype], bm)
        return cls(s_np, vs_np, d, qd, bm, kern.pair_offsets(bm, layout.words), cut)

    @classmethod
    def forward(cls, idx: Tensor, v: Tensor, M: Tensor, mu: Tensor, beta: float, scale: float, diag_extra: float,
                eps: float, *, with_grad: bool = False) -> DenseForward | None:
        """The penalty's forward on this path in one kernel call (:func:`pair_kernels.dense_forward`):
        :func:`latent_terms`, :func:`sort_rows`, :meth:`build` and :meth:`terms` on the (B, k)
        batch ``(idx, v)`` (``v`` in the statistics' dtype) against the statistics ``M`` (d, d),
        ``mu``, ``beta``, ``scale``, ``diag_extra``, ``eps``: the same numbers. None (nothing
        kept) when a row cannot be sorted; then take those steps one by one. ``with_grad``: also
        the gradient of the loss w.r.t. ``v`` for ``dL/dloss = 1`` (:meth:`gradient`'s, computed
        while the weights are in cache; the backward scales it), and no pairs kept."""
        B, d = idx.shape[0], mu.numel()
        dt = _NUMPY_FLOATS[v.dtype]
        layout = triangle_layout(d)
        qd = _CLEAN.take(layout.entries, dt)
        scratch = {"wd": _SCRATCH.take("wd", qd.size, dt)}
        numba.set_num_threads(kernel_threads())
        lat = idx.to(torch.int64).contiguous().numpy().view(np.uint64)  # unsigned: pair_kernels' note
        grad = np.empty(idx.shape if with_grad else (0, 0), dtype=dt)
        (refused, low, m, q_diag, mu_t, s_diag, s, perm, vs, cut, bm, off, sums, kept, bad, num, gw) = \
            kern.dense_forward(lat, v.detach().contiguous().numpy(), M.view(-1).numpy(), M.diagonal().numpy(),
                               mu.numpy(), *_latent_scalars(dt, B, beta, scale, diag_extra, eps),
                               (1.0 - beta) * scale, beta / B, layout.words, layout.base, qd,
                               qd.view(_BITS[qd.dtype]).reshape(-1, 64), _REST[qd.dtype], scratch["wd"][:qd.size],
                               n_slices(), kernel_threads(), grad)
        if refused:
            _CLEAN.give(qd)  # untouched: still at rest
            _SCRATCH.give(scratch)
            return None
        if with_grad:  # the weights were read: their array goes back to the pool now, no pairs kept
            _SCRATCH.give(scratch)
            pairs, moments = None, DenseSums(qd, bm, off, d)
        else:
            pairs = cls(s, vs, d, qd, bm, off, cut.view(np.uint64), scratch, num, gw)
            pairs.qd, moments = None, pairs._sums  # the sums are the moments from here
        terms = PairTerms(None, None, sums, kept, bad, moments)
        return DenseForward(pairs, terms, *(torch.from_numpy(a) for a in (m, q_diag, mu_t, s_diag, perm)),
                            torch.tensor(low, dtype=v.dtype), torch.from_numpy(grad) if with_grad else None)

    def terms(self, M: Tensor, m_scale: float, q_scale: float, mu: Tensor, rs: Tensor, *,
              with_r: bool = False) -> PairTerms:
        """:meth:`FusedPairs.correlations`' sums and counts, and the batch's sums handed over as a
        :class:`DenseSums` (``PairTerms.triangle``), in one sweep of the triangle; ``R`` and ``rr``
        per pair (``self.R``, ``self.rr``) only ``with_r``: the backward reads the weights from
        ``wd``."""
        qd, layout = self.qd, self.layout
        self.scratch["wd"] = _SCRATCH.take("wd", qd.size, qd.dtype)
        wd = self.scratch["wd"][:qd.size]
        Rd, rrd = (np.empty(qd.size if with_r else 0, dtype=qd.dtype) for _ in range(2))
        numba.set_num_threads(kernel_threads())
        sums, kept, bad, num, gw = kern.dense_terms(qd, wd, self.bm, np.uint64(self.d), layout.words, layout.base,
                                                    self.off, M.numpy(), m_scale, q_scale, mu.numpy(), rs.numpy(), Rd,
                                                    rrd, n_slices())
        self.num, self.gw = num, gw
        if with_r:
            self.R, self.rr = (torch.from_numpy(read_pairs(self.bm, self.off, self.d, a)[1]) for a in (Rd, rrd))
        self.qd = None
        return PairTerms(None, None, sums, kept, bad, self._sums)

    def gradient(self, go: Tensor, mu: Tensor, s_diag: Tensor, idx: Tensor, perm: Tensor, v: Tensor) -> Tensor:
        """:meth:`FusedPairs.gradient` in one kernel over the row pairs, the per-latent terms
        included (:func:`pair_kernels.dense_entry_grads`, from what :meth:`terms` summed: ``mu``
        must be the one given to it)."""
        out = np.empty(idx.shape, dtype=self.vs.dtype)
        numba.set_num_threads(kernel_threads())
        kern.dense_entry_grads(self.s.view(np.uint64), perm.numpy(), self.vs, self.cut, self.scratch["wd"],
                               self.layout.base, 2.0 * float(go), self.num, self.gw, float(go),
                               s_diag.numpy(), mu.numpy(), float(idx.shape[0]), kernel_threads(), out)
        return torch.from_numpy(out)

    def release(self) -> None:
        """Give the weights' array back (after the backward): this object is unusable afterwards.
        The sums stay with the moments (:class:`DenseSums`) until the statistics' update."""
        self._give_back()
        self.qd = self.vs = self._sums = None


_BITS = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}
_REST = {np.dtype(np.float32): np.int32(np.float32(-0.0).view(np.int32)),
         np.dtype(np.float64): np.int64(np.float64(-0.0).view(np.int64))}


def _latent_scalars(dt: type, B: int, beta: float, scale: float, diag_extra: float, eps: float) -> tuple:
    """:func:`pair_kernels.latent_terms`' scalars, each rounded to the values' dtype ``dt`` as torch
    rounds a Python scalar in an op on a tensor of that dtype (hence torch's bits)."""
    return dt(1.0 - beta), dt(beta / B), dt(scale), dt(diag_extra), dt(B), dt(eps), dt(beta)


def latent_terms(idx: Tensor, v: Tensor, M_diag: Tensor, mu: Tensor, beta: float, scale: float, diag_extra: float,
                 eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``corr_penalty``'s O(d) vectors in one kernel (:func:`pair_kernels.latent_terms`), the same
    bits as its torch ops: ``B m_t``, ``B diag(Q_t)``, ``mu~``, ``diag(S)`` and ``diag(S)^-1/2``
    for the (B, k) batch ``(idx, v)`` (``v`` in the statistics' dtype) against ``M``'s diagonal
    (``M_diag``, before scaling) and ``mu``. IndexError (nothing written) if a latent is outside
    ``0 .. d - 1``, as torch's ``index_add_`` raises."""
    dt = _NUMPY_FLOATS[v.dtype]
    d = mu.numel()
    out = [np.empty(d, dtype=dt) for _ in range(5)]
    numba.set_num_threads(kernel_threads())
    B = idx.shape[0]
    outside = kern.latent_terms(idx.to(torch.int64).contiguous().numpy().view(np.uint64),
                                v.detach().contiguous().numpy(), M_diag.numpy(), mu.numpy(),
                                *_latent_scalars(dt, B, beta, scale, diag_extra, eps), *out)
    if outside:
        raise IndexError(f"idx holds {outside} latent index(es) outside 0 .. {d - 1} (d_sae {d})")
    return tuple(torch.from_numpy(a) for a in out)


def sort_rows(idx: Tensor, v: Tensor, s_diag: Tensor, *, with_cuts: bool = False
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, np.ndarray | None] | None:
    """:func:`~trainer.saes.pairs.sorted_rows` of the (B, k) batch and the smallest ``s_diag``
    among the latents of its co-active pairs (``corr_penalty``'s ``min_var``) in one parallel
    pass (:func:`pair_kernels.sort_rows`), and ``with_cuts`` the sorted rows' cuts for the dense
    path (:func:`pair_kernels.row_cuts`, for :func:`build_pairs`; else None); None when a row
    repeats a latent or holds one outside ``0 .. d - 1``."""
    B, k = idx.shape
    s, perm = np.empty((B, k), dtype=np.int64), np.empty((B, k), dtype=np.int64)
    vs = np.empty((B, k), dtype=_NUMPY_FLOATS[v.dtype])
    cut = np.empty((B, n_slices() + 1) if with_cuts else (0, 0), dtype=np.int64)
    numba.set_num_threads(kernel_threads())
    lat = idx.to(torch.int64).contiguous().numpy().view(np.uint64)  # unsigned: pair_kernels' note; negatives refused
    refused, low = kern.sort_rows(lat, v.detach().contiguous().numpy(), s_diag.numpy(), n_slices(), s, perm, vs, cut)
    if refused:
        return None
    return (torch.from_numpy(s), torch.from_numpy(perm), torch.from_numpy(vs), torch.tensor(low, dtype=s_diag.dtype),
            cut if with_cuts else None)


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}
