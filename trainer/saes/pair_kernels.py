"""Fused CPU kernels (numba) for the correlation penalty's O(B k^2) work.

The penalty's cost is a handful of passes over the n = B k (k - 1) / 2 row pairs of a batch:
build their keys, merge the duplicates, sum the products, form ``R``, scatter the gradient back.
As separate torch / numpy ops each pass re-reads 30-70 MB arrays on one core; fused here they
read them once, in parallel. The merge is a radix sort on the key bits, one slice per thread.

Layout. A row pair ``(b, p, q)`` (positions ``p < q`` of the sorted row ``b``) is packed as
``key << shift | b << 2 kb | p << kb | q``, ``key = lo * d_sae + hi`` and ``kb`` the bits of
``k - 1``, so sorting the packed int64 groups equal keys into runs. The pairs are written into
``n_buckets`` slices by the bucket of their ``lo`` latent (:func:`plan_buckets` cuts the latents
so the slices hold about as many pairs each): every key lives in one slice, so the slices are
sorted independently and every later pass runs slice by slice in parallel, no run crossing two.

Sorting. A slice's keys span ``(its latents as lo) x d_sae`` values, ~25 bits at d_sae 16384:
two or three stable counting passes on digits of at most 13 bits of ``key - base``
(:func:`radix_sort_slices`) sort it in ~1/4 of numpy's comparison sort (measured 50 vs 225 ms on
8.3M pairs, 2 threads). A stable sort on the key alone gives the very order of sorting the whole
int64: within a slice ``pack_pairs`` writes the pairs in ascending ``(b, p, q)``, which is the
order of their low bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from trainer.saes.lanes import (WIDTH, lanes_abs, lanes_add, lanes_get, lanes_load, lanes_over, lanes_sq, lanes_store,
                                lanes_zero)

__all__ = ["backward_pass", "correlations", "count_runs", "dense_accumulate", "dense_entry_grads", "dense_forward",
           "dense_pairs", "dense_terms", "latent_terms", "pack_pairs", "pair_bitmap", "pair_offsets", "plan_buckets",
           "radix_sort_slices", "reduce_parts", "row_cuts", "run_sums", "scatter_distinct", "slice_spans", "sort_rows",
           "tally", "lane_total", "triangle_update", "LANES"]

MAX_DIGIT_BITS = 13  # counts of 8192 int64: 64 KB, in L2 beside the slice being scattered


def plan_buckets(s: np.ndarray, d: int, n_buckets: int) -> np.ndarray:
    """``bucket_of`` (d,) int64, non-decreasing, in ``0..n_buckets-1``: the slice of each latent
    as ``lo``, from the number of pairs that the latents before it lead in this batch."""
    B, k = s.shape
    as_lo = np.bincount(s.ravel(), weights=np.tile(np.arange(k - 1, -1, -1, dtype=np.float64), B), minlength=d)
    before = np.cumsum(as_lo) - as_lo
    return np.minimum((before * (n_buckets / max(before[-1] + as_lo[-1], 1.0))).astype(np.int64), n_buckets - 1)


@njit(cache=True, parallel=True, nogil=True)
def _row_counts(s, bucket_of, n_buckets):
    B, k = s.shape
    cnt = np.zeros((B, n_buckets), dtype=np.int64)
    for b in prange(B):
        for p in range(k - 1):
            cnt[b, bucket_of[s[b, p]]] += k - 1 - p
    return cnt


@njit(cache=True, parallel=True, nogil=True)
def _pack(s, d, kb, shift, bucket_of, start, out):
    B, k = s.shape
    for b in prange(B):
        pos = start[b].copy()
        for p in range(k - 1):
            t = bucket_of[s[b, p]]
            e = pos[t]
            lo = s[b, p] * d
            tag = (b << (2 * kb)) | (p << kb)
            for q in range(p + 1, k):
                out[e] = ((lo + s[b, q]) << shift) | tag | q
                e += 1
            pos[t] = e


def pack_pairs(s: np.ndarray, d: int, kb: int, shift: int, bucket_of: np.ndarray, n_buckets: int,
               out: np.ndarray) -> np.ndarray:
    """Write every row pair of the sorted rows ``s`` (B, k) int64 into ``out`` (n,), packed and
    grouped by slice; returns the slice bounds (n_buckets + 1,)."""
    cnt = _row_counts(s, bucket_of, n_buckets)
    per_bucket = cnt.sum(axis=0)
    bounds = np.zeros(n_buckets + 1, dtype=np.int64)
    np.cumsum(per_bucket, out=bounds[1:])
    start = np.cumsum(cnt, axis=0) - cnt + bounds[:-1]  # row b's first slot in each slice
    _pack(s, d, kb, shift, bucket_of, start, out)
    return bounds


def slice_spans(bucket_of: np.ndarray, d: int, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: ``base`` (its smallest possible key, first lo latent x d) and the bits of its
    key span, for :func:`radix_sort_slices`."""
    first = np.searchsorted(bucket_of, np.arange(n_buckets + 1), side="left")
    width = np.maximum((first[1:] - first[:-1]) * d - 1, 1)
    return first[:-1] * d, np.array([int(w).bit_length() for w in width], dtype=np.int64)


@njit(cache=True, parallel=True, nogil=True)
def radix_sort_slices(pk, tmp, shift, bounds, base, span_bits, max_digit_bits):
    """Sort each slice of ``pk`` by ``pk >> shift`` (stable LSD counting passes over digits of
    ``key - base``: as few passes as ``max_digit_bits`` allows, the bits shared out evenly, so
    the counts stay small); ``tmp`` is scratch of ``pk``'s size."""
    for t in prange(bounds.size - 1):
        lo, hi = bounds[t], bounds[t + 1]
        src, dst = pk, tmp
        passes = (span_bits[t] + max_digit_bits - 1) // max_digit_bits
        digit_bits = (span_bits[t] + passes - 1) // passes
        nd = 1 << digit_bits
        mask = nd - 1
        cnt = np.empty(nd, dtype=np.int64)
        for ps in range(passes):
            sh = ps * digit_bits
            cnt[:] = 0
            for e in range(lo, hi):
                cnt[(((src[e] >> shift) - base[t]) >> sh) & mask] += 1
            acc = lo
            for c in range(nd):
                n = cnt[c]
                cnt[c] = acc
                acc += n
            for e in range(lo, hi):
                x = src[e]
                dgt = (((x >> shift) - base[t]) >> sh) & mask
                dst[cnt[dgt]] = x
                cnt[dgt] += 1
            src, dst = dst, src
        if passes % 2 == 1:
            for e in range(lo, hi):
                pk[e] = tmp[e]


@njit(cache=True, parallel=True, nogil=True)
def count_runs(pk, shift, bounds):
    """Distinct keys per slice of the sorted ``pk``, as offsets (n_buckets + 1,) into the keys."""
    nb = bounds.size - 1
    cnt = np.zeros(nb + 1, dtype=np.int64)
    for t in prange(nb):
        c = 0
        prev = -1
        for e in range(bounds[t], bounds[t + 1]):
            key = pk[e] >> shift
            if key != prev:
                c += 1
                prev = key
        cnt[t + 1] = c
    return np.cumsum(cnt)


@njit(cache=True, parallel=True, nogil=True)
def run_sums(pk, shift, kb, k, bounds, uoff, vs, keys, q):
    """``keys[u]``: the u-th distinct key; ``q[u] = sum v_lo v_hi`` over its row pairs (``vs``: the
    flat (B k,) sorted row values), summed in the values' dtype."""
    kmask = (1 << kb) - 1
    smask = (1 << shift) - 1
    zero = vs.dtype.type(0.0)
    for t in prange(bounds.size - 1):
        u = uoff[t] - 1
        prev = -1
        acc = zero
        for e in range(bounds[t], bounds[t + 1]):
            x = pk[e]
            key = x >> shift
            if key != prev:
                if u >= uoff[t]:
                    q[u] = acc
                u += 1
                keys[u] = key
                prev = key
                acc = zero
            slot = x & smask
            row = (slot >> (2 * kb)) * k
            acc += vs[row + ((slot >> kb) & kmask)] * vs[row + (slot & kmask)]
        if u >= uoff[t]:
            q[u] = acc


# The loss and diagnostics sums of a chunk of pairs are kept in LANES partial sums, pair (lo, hi)
# going to lane hi % LANES, each lane summed in ascending key order; the chunk's sum is
# lane_total(...). Both paths define the same order (so the same bits), and the dense path's
# sweep adds a block of LANES aligned columns to the lanes as one vector each: independent add
# chains, where one chain's add latency bounded it (docs/benchmarks.md).
LANES = WIDTH  # one vector of lanes (trainer.saes.lanes)


@njit(cache=True, nogil=True, inline="always")
def tally(r, lanes, lane, mx, bad):
    """One kept pair's R into a chunk's lanes (``lanes[lane]``: ``sum R^2``, ``lanes[LANES +
    lane]``: ``sum |R|``), its ``max |R|`` (a NaN wins) and non-finite count."""
    if not np.isfinite(r):
        bad += 1
    if abs(r) > mx or r != r:
        mx = abs(r)
    lanes[lane] += r * r
    lanes[LANES + lane] += abs(r)
    return mx, bad


@njit(cache=True, nogil=True, inline="always")
def lane_total(lanes, first):
    """The chunk's sum over lanes ``first .. first + LANES``, in a fixed order."""
    total = 0.0
    for i in range(LANES):
        total += lanes[first + i]
    return total


@njit(cache=True, nogil=True)
def reduce_parts(part):
    """Per-chunk ``[sum R^2, sum |R|, max |R|, kept, non-finite]`` rows -> ``[sum R^2, sum |R|,
    max |R|]``, kept, non-finite (a NaN max wins, as a NaN R must show)."""
    sums = np.zeros(3, dtype=np.float64)
    for c in range(part.shape[0]):
        sums[0] += part[c, 0]
        sums[1] += part[c, 1]
        if part[c, 2] > sums[2] or part[c, 2] != part[c, 2]:
            sums[2] = part[c, 2]
    return sums, int(part[:, 3].sum()), int(part[:, 4].sum())


@njit(cache=True, parallel=True, nogil=True)
def correlations(keys, q, M, m_scale, d, q_scale, mu, rs, R, rr, n_chunks):
    """``R = (m_scale M[key] + q_scale q - mu_i mu_j) rs_i rs_j`` and ``rr = rs_i rs_j`` per
    distinct pair, both 0 where ``q = 0`` (a masked pair); ``M`` is the flat second-moment
    buffer, read once per pair in ascending key order. Returns
    ``[sum R^2, sum |R|, max |R|]`` (float64; max is NaN if any R is), kept pairs, non-finite R."""
    U = keys.size
    part = np.zeros((n_chunks, 8), dtype=np.float64)  # one row per chunk, written once at its end
    lanes_part = np.zeros((n_chunks, 2 * LANES), dtype=np.float64)
    for c in prange(n_chunks):
        lanes = lanes_part[c]
        mx = 0.0
        kept = 0
        bad = 0
        for u in range(U * c // n_chunks, U * (c + 1) // n_chunks):
            if q[u] != 0.0:
                i = keys[u] // d
                j = keys[u] - i * d
                w = rs[i] * rs[j]
                r = (m_scale * M[keys[u]] + q_scale * q[u] - mu[i] * mu[j]) * w
                kept += 1
                mx, bad = tally(r, lanes, j % LANES, mx, bad)
                R[u] = r
                rr[u] = w
            else:
                R[u] = 0.0
                rr[u] = 0.0
        part[c, 0] = lane_total(lanes, 0)
        part[c, 1] = lane_total(lanes, LANES)
        part[c, 2] = mx
        part[c, 3] = kept
        part[c, 4] = bad
    return reduce_parts(part)


@njit(cache=True, parallel=True, nogil=True)
def scatter_distinct(flat, keys, values, scale):
    """``flat[keys] += scale * values`` for distinct ``keys`` (uint64: no wrap-around code, see the
    dense path's note): no two threads write one entry."""
    for u in prange(keys.size):
        flat[keys[u]] += scale * values[u]


@njit(cache=True, parallel=True, nogil=True)
def backward_pass(pk, shift, kb, k, bounds, uoff, keys, R, rr, coef, mu, vs, d, n_groups):
    """With ``a = coef R rr`` per distinct pair: ``g`` (B k,), ``sum_q a_pq v_q`` per sorted row
    entry; ``num`` (d,), ``sum_j R_ij^2`` per latent; ``gmu`` (d,), ``sum_j a_ij mu_j`` per latent.
    Group ``c`` takes the slices ``c, c + n_groups, ...`` and accumulates into its own buffers (no
    races), summed at the end."""
    nb = bounds.size - 1
    kmask = (1 << kb) - 1
    smask = (1 << shift) - 1
    g_part = np.zeros((n_groups, vs.size), dtype=vs.dtype)
    num_part = np.zeros((n_groups, d), dtype=vs.dtype)
    gmu_part = np.zeros((n_groups, d), dtype=vs.dtype)
    for c in prange(n_groups):
        g = g_part[c]
        num = num_part[c]
        gmu = gmu_part[c]
        for t in range(c, nb, n_groups):
            u = uoff[t] - 1
            prev = -1
            a = 0.0
            for e in range(bounds[t], bounds[t + 1]):
                x = pk[e]
                key = x >> shift
                if key != prev:
                    u += 1
                    prev = key
                    a = coef * R[u] * rr[u]
                    if rr[u] != 0.0:  # masked pairs (rr = 0) add nothing
                        i = key // d
                        j = key - i * d
                        num[i] += R[u] * R[u]
                        num[j] += R[u] * R[u]
                        gmu[i] += a * mu[j]
                        gmu[j] += a * mu[i]
                if rr[u] != 0.0:
                    slot = x & smask
                    row = (slot >> (2 * kb)) * k
                    f1 = row + ((slot >> kb) & kmask)
                    f2 = row + (slot & kmask)
                    g[f1] += a * vs[f2]
                    g[f2] += a * vs[f1]
    return g_part.sum(axis=0), num_part.sum(axis=0), gmu_part.sum(axis=0)


# -- the dense-triangle path (see fused_pairs: when it is taken) -----------------------------------
# The products are summed straight into a dense array ``qd`` holding the upper triangle row by row:
# row ``lo`` keeps ``hi = lo .. d - 1`` (the diagonal slot unused) from a multiple of 64 on, so
# pair ``(lo, hi)`` is entry ``base[lo] + hi`` and bit ``hi - lo`` from the row's first bitmap word
# ``words[lo]`` on (fused_pairs.triangle_layout). No packing, no sort. Its entries rest at -0.0,
# "no pair here": a summed entry is never -0.0 (``+ 0.0`` turns a -0.0 sum into +0.0), so the
# distinct pairs are exactly the entries that are not -0.0, pairs whose products sum to 0 included
# (a zero value), as the sorted path keeps them. A bitmap of those entries (:func:`pair_bitmap`) is
# then walked bit by bit (count trailing zeros): that walk costs U steps, not the d^2 / 2 entries
# of the triangle.
#
# Their hot loops index with uint64 (the callers pass uint64 views of the int64 latents and cuts):
# numba adds a negative-index wrap-around to every access through a signed index, 6 of the ~16
# instructions per row pair here; unsigned ones have none (1.45 -> 1.0 ms per pass over 1M row
# pairs). ``_U1``, ``_U64``: uint64 constants (an int64 literal would turn the sum signed again).
_U1 = np.uint64(1)
_U6 = np.uint64(6)
_U63 = np.uint64(63)
_U64 = np.uint64(64)


@intrinsic
def _cttz(typingctx, x):
    """Trailing zero bits of a (non-zero) integer: LLVM's cttz."""
    def codegen(context, builder, sig, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))
    return x(x), codegen


@intrinsic
def _popcount(typingctx, x):
    """Set bits of an integer: LLVM's ctpop."""
    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])
    return x(x), codegen


# row_cuts and pair_offsets run on one thread: their work (~50 us) is below what a parallel launch
# costs on a loaded machine, where every launch waits for a thread that may be descheduled.
@njit(cache=True, nogil=True)
def row_cuts(s, d, n_slices):
    """Slices of the ``lo`` latents holding about as many row pairs each, as ``cut[b, t]``: the first
    position of the sorted row ``b`` whose latent is in slice ``t`` or later (``cut[b, n_slices] = k``)."""
    B, k = s.shape
    lead = np.zeros(d, dtype=np.int64)  # row pairs each latent leads as lo
    for b in range(B):
        for p in range(k - 1):
            lead[s[b, p]] += k - 1 - p
    first = _slice_starts(lead, B * k * (k - 1) // 2, n_slices)
    cut = np.empty((B, n_slices + 1), dtype=np.int64)
    for b in range(B):
        _row_cut(s[b], first, cut[b])
    return cut


@njit(cache=True, nogil=True)
def _slice_starts(lead, total, n_slices):
    """``first[t]``: the first ``lo`` latent of slice ``t`` (``d`` past the last), cutting the
    latents where the row pairs they lead (``lead``) pass ``t / n_slices`` of ``total``."""
    d = lead.size
    first = np.full(n_slices + 1, d, dtype=np.int64)
    before, t = 0, 0
    for lo in range(d):
        while t < n_slices and before * n_slices >= t * total:
            first[t] = lo
            t += 1
        before += lead[lo]
    return first


@njit(cache=True, nogil=True, inline="always")
def _row_cut(srow, first, cut_row):
    """One sorted row's cuts: ``cut_row[t]`` = its first position whose latent is ``>= first[t]``."""
    k = srow.size
    p = 0
    for t in range(first.size):
        while p < k and srow[p] < first[t]:
            p += 1
        cut_row[t] = p


@njit(cache=True, parallel=True, nogil=True)
def dense_accumulate(s, vs, cut, base, qd):
    """``qd[base[lo] + hi] += v_lo v_hi`` over every row pair (``s``, ``cut``, ``base`` uint64).
    Slice ``t`` owns the ``lo`` latents ``[first[t], first[t + 1])`` (``cut`` from
    :func:`row_cuts`): no two threads write one entry. Each entry's sum is built over the rows in
    ascending order from -0.0, the order and start (``-0.0 + x = x``) of :func:`run_sums`: the
    same number."""
    B, k = s.shape
    last, uk = np.uint64(k - 1), np.uint64(k)
    for t in prange(cut.shape[1] - 1):
        for b in range(B):
            srow, vrow = s[b], vs[b]
            for p in range(cut[b, t], min(cut[b, t + 1], last)):
                row = base[srow[p]]
                vp = vrow[p]
                for q in range(p + _U1, uk):
                    e = row + srow[q]
                    qd[e] = (qd[e] + vp * vrow[q]) + 0.0


@njit(cache=True, parallel=True, nogil=True)
def pair_bitmap(bits, rest, bm):
    """``bm[w]`` bit ``i``: entry ``64 w + i`` of the dense array is not at rest, ``bits`` being the
    array's integer view shaped (entries / 64, 64). Each word is built from one row of 64 by a loop
    of fixed length over a row view (no signed index: LLVM vectorises the compares and the OR), ~3x
    numpy's compare and packbits, with no bool array between (measured 0.023 vs 0.069 ms on the
    demo-size array: docs/benchmarks.md)."""
    for w in prange(bits.shape[0]):
        row = bits[w]
        word = np.uint64(0)
        for i in range(64):
            word |= np.uint64(row[i] != rest) << np.uint64(i)
        bm[w] = word


@njit(cache=True, nogil=True)
def pair_offsets(bm, words):
    """``off`` (d + 1,): where row ``lo``'s pairs start among the distinct pairs, from the set bits
    of its words ``words[lo] .. words[lo + 1]`` of the bitmap ``bm``."""
    d = words.size - 1
    off = np.empty(d + 1, dtype=np.int64)
    n = 0
    for lo in range(d):
        off[lo] = n
        for w in range(words[lo], words[lo + 1]):
            n += _popcount(bm[w])
    off[d] = n
    return off


@njit(cache=True, nogil=True)
def _chunk_start(bm, words, off, u):
    """Row, word (uint64, into ``bm``) and remaining bits of that word where the ``u``-th pair is."""
    lo = np.uint64(np.searchsorted(off, u, side="right") - 1)
    skip = u - off[lo]
    w = words[lo]
    word = bm[w]
    while skip >= _popcount(word):
        skip -= _popcount(word)
        w += _U1
        word = bm[w]
    for _ in range(skip):
        word &= word - _U1
    return lo, w, word


@njit(cache=True, nogil=True)
def _pair_entry(bm, words, off, u):
    """``(lo, hi)`` of the ``u``-th pair (``u < U``)."""
    lo, w, word = _chunk_start(bm, words, off, u)
    while word == 0:
        w += _U1
        word = bm[w]
    return lo, lo + _U64 * (w - words[lo]) + _cttz(word)


@njit(cache=True, nogil=True)
def _tally_row(rv, gv, h0, lanes, mx, bad):
    """A swept row's ``R`` (``rv``, its first entry at column ``h0``) into the chunk's lanes, max
    and count (:func:`tally`), and the row's ``sum R^2`` and ``sum gv`` (any order). The columns
    in whole blocks of LANES, from a multiple of LANES on, go a block at a time into vector lanes
    (:mod:`trainer.saes.lanes`): column ``hi`` still adds to lane ``hi % LANES`` after the columns
    before it. A block is looked at entry by entry for the max and the count only when one of its
    ``|R|`` is above the running max or not a number (rare: the max only grows)."""
    m = rv.size
    j0 = min(m, (LANES - h0 % LANES) % LANES)  # the first column of a whole block
    j1 = j0 + (m - j0) // LANES * LANES
    nsum = 0.0
    gsum = 0.0
    for j in range(j0):
        mx, bad = tally(rv[j], lanes, (h0 + j) % LANES, mx, bad)
        nsum += rv[j] * rv[j]
        gsum += gv[j]
    if j1 > j0:
        l2, l1 = lanes_load(lanes, 0), lanes_load(lanes, LANES)
        n2, g2 = lanes_zero(), lanes_zero()
        over = 0
        for j in range(j0, j1, LANES):
            l2 = lanes_sq(l2, rv, j)
            l1 = lanes_abs(l1, rv, j)
            n2 = lanes_sq(n2, rv, j)
            g2 = lanes_add(g2, gv, j)
            over += lanes_over(rv, j, mx)
        lanes_store(l2, lanes, 0)
        lanes_store(l1, lanes, LANES)
        for i in range(LANES):
            nsum += lanes_get(n2, i)
            gsum += lanes_get(g2, i)
        if over > 0 or not mx < np.inf:  # the max and count, entry by entry (in any order: the same result)
            for j in range(j0, j1):
                r = rv[j]
                if not np.isfinite(r):
                    bad += 1
                if abs(r) > mx or r != r:
                    mx = abs(r)
    for j in range(j1, m):
        mx, bad = tally(rv[j], lanes, (h0 + j) % LANES, mx, bad)
        nsum += rv[j] * rv[j]
        gsum += gv[j]
    return nsum, gsum, mx, bad


@njit(cache=True, parallel=True, nogil=True)
def dense_terms(qd, wd, bm, d, words, base, off, M, m_scale, q_scale, mu, rs, Rd, rrd, n_chunks):
    """:func:`correlations` on the dense array of sums ``qd`` (``d`` uint64): the same ``[sum R^2,
    sum |R|, max |R|]``, kept and non-finite counts, each ``R`` computed by the same expression and
    tallied in the same order: chunk ``c`` takes the pairs ``[U c / n_chunks, U (c + 1) / n_chunks)``
    in ascending key order, as there. Writes ``w = R rr`` (0 where masked) into ``wd`` at each
    pair's entry, for :func:`dense_entry_grads` (``qd`` keeps the sums, the moments); ``R`` and
    ``rr`` into ``Rd``, ``rrd`` likewise when they are not empty (read back with
    :func:`dense_pairs`). Also returns ``num`` (d,), ``sum_j R_ij^2``, and ``gw`` (d,),
    ``sum_j w_ij mu_j``, per latent.

    A chunk sweeps its stretch of the triangle row by row, every entry, pair or not: an entry at
    rest (-0.0) masks like a pair whose sum is 0, and its ``R = 0`` adds nothing to any sum. The
    sweep runs over slices with signed indices, which LLVM vectorises; the tally, whose order is
    fixed, takes a row's ``R`` after it in vector lanes (:func:`_tally_row`). At the demo's size,
    on a captured batch: docs/benchmarks.md."""
    U = off[d]
    n = np.int64(d)
    with_r = Rd.size > 0
    part = np.zeros((n_chunks, 8), dtype=np.float64)
    num_part = np.zeros((n_chunks, n), dtype=qd.dtype)
    gw_part = np.zeros((n_chunks, n), dtype=qd.dtype)
    row_part = np.empty((n_chunks, 2, n), dtype=np.float64)  # a row's R and w mu_j, from the sweep to the tally
    lanes_part = np.zeros((n_chunks, 2 * LANES), dtype=np.float64)
    for c in prange(n_chunks):
        u0, u1 = U * c // n_chunks, U * (c + 1) // n_chunks
        if u0 >= u1:
            continue
        num, gw, lanes = num_part[c], gw_part[c], lanes_part[c]
        lo0, hi0 = _pair_entry(bm, words, off, u0)
        lo1, hi1 = _pair_entry(bm, words, off, u1) if u1 < U else (d - _U1, d)
        lo0, hi0, lo1, hi1 = np.int64(lo0), np.int64(hi0), np.int64(lo1), np.int64(hi1)  # signed from here
        mx = 0.0
        kept = 0
        bad = 0
        for lo in range(lo0, lo1 + 1):
            h0 = hi0 if lo == lo0 else lo + 1
            h1 = hi1 if lo == lo1 else n
            m = h1 - h0
            if m <= 0:
                continue
            e0, k0 = np.int64(base[lo]) + h0, lo * n + h0
            qv, wv, Mv = qd[e0:e0 + m], wd[e0:e0 + m], M[k0:k0 + m]
            rsv, muv, nv, gv = rs[h0:h1], mu[h0:h1], num[h0:h1], gw[h0:h1]
            rv, amv = row_part[c, 0, :m], row_part[c, 1, :m]
            mu_i, rs_i = mu[lo], rs[lo]
            kc = 0
            for j in range(m):
                x = qv[j]
                wt = rs_i * rsv[j]
                r = (m_scale * Mv[j] + q_scale * x - mu_i * muv[j]) * wt
                if x == 0.0:
                    r = 0.0
                a = r * wt
                wv[j] = a
                nv[j] += r * r
                gv[j] += a * mu_i
                rv[j] = r
                amv[j] = a * muv[j]
                kc += x != 0.0
            kept += kc
            if with_r:
                Rv, rrv = Rd[e0:e0 + m], rrd[e0:e0 + m]
                for j in range(m):
                    Rv[j] = rv[j]
                    rrv[j] = rs_i * rsv[j] if qv[j] != 0.0 else 0.0
            nsum, gsum, mx, bad = _tally_row(rv, amv, h0, lanes, mx, bad)
            num[lo] += nsum
            gw[lo] += gsum
        part[c, 0] = lane_total(lanes, 0)
        part[c, 1] = lane_total(lanes, LANES)
        part[c, 2] = mx
        part[c, 3] = kept
        part[c, 4] = bad
    sums, kept, bad = reduce_parts(part)
    return sums, kept, bad, num_part.sum(axis=0), gw_part.sum(axis=0)


@njit(cache=True, parallel=True, nogil=True)
def dense_pairs(bm, d, words, base, off, src, keys, vals):
    """The pairs read out of the dense layout, ascending: ``keys[u] = lo * d + hi`` (when ``keys``
    is not empty) and ``vals[u] = src[base[lo] + hi]`` (``d`` uint64)."""
    with_keys = keys.size > 0
    for lo in prange(off.size - 1):
        ulo = np.uint64(lo)
        u, key0, row, w0 = off[lo], ulo * d, base[lo], words[lo]
        for w in range(words[lo], words[lo + 1]):
            word = bm[w]
            while word != 0:
                hi = ulo + _U64 * (w - w0) + _cttz(word)
                word &= word - _U1
                if with_keys:
                    keys[u] = key0 + hi
                vals[u] = src[row + hi]
                u += 1


@njit(cache=True, parallel=True, nogil=True)
def triangle_update(qd, words, base, flat, d, scale, rest, n_groups, q_diag, diag_scale):
    """``flat[lo * d + hi] += scale * qd[base[lo] + hi]`` over the whole upper triangle, then
    ``qd`` back at ``rest``: the running statistics' update from the dense array of sums, every
    entry (an entry at rest, -0.0, adds -0.0: no bit changes), so the same numbers as
    :func:`scatter_distinct` over the pairs, in one vectorised pass that also puts the array back
    at rest. Group ``g`` takes a run of whole rows holding about ``1 / n_groups`` of the entries
    (cut on ``words``): rows in order stream through memory, where rows taken in turn (``g, g +
    n_groups, ...``) ran 4x slower (0.34 vs 0.084 ms at the demo's size). When ``q_diag`` is not
    empty, the diagonal too: ``flat[lo * d + lo] += q_diag[lo] * diag_scale``, in ``flat``'s dtype
    (``diag_scale`` in it), the bits of ``covariance``'s torch ``index_add_`` of ``q_diag * c``."""
    total = words[d]
    for g in prange(n_groups):
        lo0 = np.searchsorted(words, total * np.uint64(g) // np.uint64(n_groups))
        lo1 = np.searchsorted(words, total * np.uint64(g + 1) // np.uint64(n_groups))
        for lo in range(lo0, min(lo1, d - 1)):
            m = d - 1 - lo
            e0, k0 = np.int64(base[lo]) + lo + 1, lo * d + lo + 1
            qv, fv = qd[e0:e0 + m], flat[k0:k0 + m]
            for j in range(m):
                fv[j] += scale * qv[j]
                qv[j] = rest
        if q_diag.size > 0:
            for lo in range(lo0, lo1):
                flat[lo * d + lo] += q_diag[lo] * diag_scale


@njit(cache=True, parallel=True, nogil=True)
def dense_entry_grads(s, perm, vs, cut, wd, base, coef, num, gw, go, s_diag, mu, rows, n_groups, out):
    """The penalty's gradient per row entry, divided by the ``rows`` of the batch, in the rows' own
    order: for sorted entry ``(b, p)`` of latent ``l = s[b, p]``, ``out[b, perm[b, p]] = (coef
    sum_q w_{l, s[b, q]} v_q + g_l + 2 c_l v_p) / rows``, ``w`` read from the dense ``wd`` at
    ``base[lo] + hi`` (``s``, ``cut``, ``base`` uint64), with per latent ``c = -go num / s_diag``
    (``dL/dS_ii``; 0 where ``num = 0``) and ``g = -coef gw - 2 c mu`` (``dL/dmu~`` and the mean's
    share), from :func:`dense_terms`' ``num`` and ``gw``. The row pairs are taken slice by slice as
    :func:`dense_accumulate` does (each slice's rows of ``wd`` stay in cache), group ``c`` taking
    the slices ``c, c + n_groups, ...`` into its own buffer (no races), the buffers summed in group
    order."""
    B, k = s.shape
    d = num.size
    last, uk = np.uint64(k - 1), np.uint64(k)
    nb = cut.shape[1] - 1
    part = np.zeros((n_groups, B, k), dtype=vs.dtype)
    g_lat = np.empty(d, dtype=vs.dtype)
    c2_lat = np.empty(d, dtype=vs.dtype)
    for c in prange(n_groups):
        for i in range(d * c // n_groups, d * (c + 1) // n_groups):
            ci = -go * num[i] / s_diag[i] if num[i] != 0.0 else 0.0
            g_lat[i] = -coef * gw[i] - 2.0 * ci * mu[i]
            c2_lat[i] = 2.0 * ci
        for t in range(c, nb, n_groups):
            for b in range(B):
                g, srow, vrow = part[c, b], s[b], vs[b]
                for p in range(cut[b, t], min(cut[b, t + 1], last)):
                    row = base[srow[p]]
                    vp = vrow[p]
                    acc = g[p]
                    for q in range(p + _U1, uk):
                        a = wd[row + srow[q]]
                        acc += a * vrow[q]
                        g[q] += a * vp
                    g[p] = acc
    for b in prange(B):
        for p in range(k):
            acc = part[0, b, p]
            for c in range(1, n_groups):
                acc += part[c, b, p]
            lat = s[b, p]
            out[b, perm[b, p]] = (coef * acc + g_lat[lat] + c2_lat[lat] * vs[b, p]) / rows


@njit(cache=True, parallel=True, nogil=True)
def latent_terms(idx, v, M_diag, mu, one_minus_beta, beta_over_b, scale, diag_extra, rows, eps, beta, m, q_diag, mu_t,
                 s_diag, rs):
    """The penalty's O(d) vectors from the (B, k) batch (``idx`` uint64): ``m`` = sum_b z_b and
    ``q_diag`` = sum_b z_b^2 (both summed entry by entry in row-major order, the order of torch's
    index_add_ on CPU), ``mu_t = (1 - beta) mu + (beta / B) m``, ``s_diag = (1 - beta) (scale
    M_diag + diag_extra) + beta (q_diag / B + eps) - mu_t^2`` and ``rs = 1 / sqrt(s_diag)``. Each
    is the same expression as corr_penalty's torch ops, one rounding per op in the arrays' dtype
    (the scalars come in that dtype, as torch casts them), so the same bits; one call instead of
    a dozen small ops, each of which costs more to launch than to run at the demo's size. Returns
    the number of entries whose latent is outside ``0 .. d - 1`` (skipped: the caller refuses the
    batch; a negative int64 latent is a huge uint64)."""
    B, k = idx.shape
    d = np.uint64(m.size)
    m[:] = 0.0
    q_diag[:] = 0.0
    outside = 0
    for b in range(B):
        for p in range(k):
            lat = idx[b, p]
            if lat >= d:
                outside += 1
                continue
            x = v[b, p]
            m[lat] += x
            q_diag[lat] += x * x
    one = s_diag.dtype.type(1.0)
    for i in prange(m.size):
        mt = mu[i] * one_minus_beta + m[i] * beta_over_b
        sd = (M_diag[i] * scale + diag_extra) * one_minus_beta + (q_diag[i] / rows + eps) * beta - mt * mt
        mu_t[i] = mt
        s_diag[i] = sd
        rs[i] = one / np.sqrt(sd)
    return outside


@njit(cache=True, nogil=True)
def dense_forward(idx, v, M, M_diag, mu, one_minus_beta, beta_over_b, scale, diag_extra, rows, eps, beta, m_scale,
                  q_scale, words, base, qd, qd_bits, rest, wd, n_slices, n_groups, grad):
    """The dense path's whole forward in one call: :func:`latent_terms`, :func:`sort_rows` with
    the cuts, :func:`dense_accumulate` into ``qd`` (at rest), :func:`pair_bitmap` (``qd_bits``:
    ``qd``'s integer view, rows of 64), :func:`pair_offsets` and :func:`dense_terms` (weights into
    ``wd``), the same kernels in the same order, so the same numbers. Between the kernels there is
    no Python: in a training step each Python-level op between kernels costs 5-30 us (its caches
    are cold after the step's big arrays went through), several times the op itself. Returns
    ``(refused, ...)``: if a row cannot be sorted (``refused > 0``) nothing past the row sort was
    done and the caller takes the general path. With ``grad`` (B, k) not empty, also the gradient
    of the loss ``sum R^2 / P`` (``P`` the kept pairs, at least 1) w.r.t. ``v``, by
    :func:`dense_entry_grads` right after the sweep, while its weights are in cache: the gradient
    is linear in ``dL/dloss``, so the backward only scales it."""
    B, k = idx.shape
    d = mu.size
    m, q_diag, mu_t, s_diag, rs = (np.empty_like(mu), np.empty_like(mu), np.empty_like(mu), np.empty_like(mu),
                                   np.empty_like(mu))
    # A latent outside 0 .. d - 1 is skipped there and refuses its row in sort_rows: nothing past it runs.
    latent_terms(idx, v, M_diag, mu, one_minus_beta, beta_over_b, scale, diag_extra, rows, eps, beta, m, q_diag,
                 mu_t, s_diag, rs)
    s, perm = np.empty((B, k), dtype=np.int64), np.empty((B, k), dtype=np.int64)
    vs = np.empty((B, k), dtype=v.dtype)
    cut = np.empty((B, n_slices + 1), dtype=np.int64)
    refused, low = sort_rows(idx, v, s_diag, n_slices, s, perm, vs, cut)
    bm = np.empty(qd.size // 64, dtype=np.uint64)
    off = np.zeros(d + 1, dtype=np.int64)
    sums = np.zeros(3, dtype=np.float64)
    kept, bad = 0, 0
    num, gw = np.zeros_like(mu), np.zeros_like(mu)
    if refused == 0:
        su, cu = s.view(np.uint64), cut.view(np.uint64)
        dense_accumulate(su, vs, cu, base, qd)
        pair_bitmap(qd_bits, rest, bm)
        off = pair_offsets(bm, words)
        sums, kept, bad, num, gw = dense_terms(qd, wd, bm, np.uint64(d), words, base, off, M, m_scale, q_scale, mu_t,
                                               rs, qd[:0], qd[:0], n_slices)
        if grad.size > 0:
            go = 1.0 / max(kept, 1)
            dense_entry_grads(su, perm, vs, cu, wd, base, 2.0 * go, num, gw, go, s_diag, mu_t, rows, n_groups, grad)
    return refused, low, m, q_diag, mu_t, s_diag, s, perm, vs, cut, bm, off, sums, kept, bad, num, gw


@njit(cache=True, nogil=True)
def _above(a, b):
    """``a > b`` with NaN above every number (torch.topk's order)."""
    return a > b or (a != a and b == b)


@njit(inline="always")
def _sorted_entry(lat, p, o, b, v, s_diag, top1, top2, mv, s, perm, vs):
    """Row ``b``'s entry ``p`` (latent ``lat``) into sorted slot ``o`` (dropped past k: the caller
    refuses that row), and ``mv`` lowered to ``s_diag[lat]`` if the entry is in a co-active pair
    (``|v|`` times the row's largest other ``|v|``, from ``top1, top2``, non-zero); NaN sticks."""
    if o < s.shape[1]:
        s[b, o] = lat
        perm[b, o] = p
        vs[b, o] = v[b, p]
    a = abs(v[b, p])
    other = top2 if a == top1 else top1
    if a * other != 0.0:
        x = s_diag[lat]
        if x < mv or x != x:
            mv = x if mv == mv else mv
    return mv


@njit(cache=True, parallel=True, nogil=True)
def sort_rows(idx, v, s_diag, n_chunks, s, perm, vs, cut):
    """Each row of ``idx`` (B, k; uint64) sorted into ``s``, with ``perm`` (``s[b] = idx[b,
    perm[b]]``) and ``vs[b] = v[b, perm[b]]``, by walking a bitmap of the row's latents in order
    (a row already strictly ascending, as the CPU top-k leaves it, is copied): for distinct
    latents the one order there is, torch.sort's. Returns the number of rows it
    could not sort, a latent repeated or outside ``0 .. d - 1`` (the caller sorts them otherwise),
    and the smallest ``s_diag[l]`` over the entries in a co-active pair (``|v|`` times the row's
    largest other ``|v|`` non-zero, as ``corr_penalty``'s ``_min_var``): inf if none, NaN if one
    is NaN. When ``cut`` is not empty (B, n_slices + 1): :func:`row_cuts` of the sorted rows
    written into it (int64), the row pairs each latent leads counted as the rows are sorted (one
    kernel, in parallel, instead of a pass on one thread after it); left as is if a row is refused."""
    B, k = idx.shape
    d = np.uint64(s_diag.size)
    with_cuts = cut.shape[0] > 0
    lead_part = np.zeros((n_chunks, s_diag.size if with_cuts else 0), dtype=np.int64)
    words = (s_diag.size + 63) // 64
    low = np.full(n_chunks, np.inf)
    refused = np.zeros(n_chunks, dtype=np.int64)
    none = v.dtype.type(-1.0)
    for c in prange(n_chunks):
        bits = np.zeros(words, dtype=np.uint64)
        pos = np.empty(s_diag.size, dtype=np.int64)
        mv = np.inf
        for b in range(B * c // n_chunks, B * (c + 1) // n_chunks):
            top1 = top2 = none  # the row's two largest |v| (top2 = top1 on a tie), NaN the largest as in topk
            ascending = idx[b, k - 1] < d
            for p in range(k):
                a = abs(v[b, p])
                if _above(a, top1):
                    top2 = top1
                    top1 = a
                elif _above(a, top2):
                    top2 = a
                if p > 0 and idx[b, p] <= idx[b, p - 1]:
                    ascending = False
            if ascending:  # already sorted (the CPU top-k's order): no bitmap walk
                for p in range(k):
                    mv = _sorted_entry(idx[b, p], p, p, b, v, s_diag, top1, top2, mv, s, perm, vs)
                continue
            for p in range(k):
                lat = idx[b, p]
                if lat < d:
                    bits[lat >> _U6] |= _U1 << (lat & _U63)
                    pos[lat] = p
            o = 0
            for w in range(words):
                word = bits[w]
                if word == 0:
                    continue
                bits[w] = 0
                while word != 0:
                    lat = np.uint64(w) * _U64 + _cttz(word)
                    word &= word - _U1
                    mv = _sorted_entry(lat, pos[lat], o, b, v, s_diag, top1, top2, mv, s, perm, vs)
                    o += 1
            if o != k:
                refused[c] += 1
        if with_cuts and refused[c] == 0:  # a refused row's s is not filled: no latent of it is read
            lead = lead_part[c]
            for b in range(B * c // n_chunks, B * (c + 1) // n_chunks):
                for p in range(k - 1):
                    lead[s[b, p]] += k - 1 - p
        low[c] = mv
    if with_cuts and refused.sum() == 0:
        first = _slice_starts(lead_part.sum(axis=0), B * k * (k - 1) // 2, cut.shape[1] - 1)
        for b in prange(B):
            _row_cut(s[b], first, cut[b])
    out = np.inf
    for c in range(n_chunks):
        if low[c] < out or low[c] != low[c]:
            out = low[c] if out == out else out
    return refused.sum(), out


