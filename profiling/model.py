"""The memory model of one SAE training step (``Trainer._step``), read off the real code paths.

Every term below names the tensor it stands for; the peak is the persistent state plus the
largest of the step's *phases* (the live set at a point of the step). Persistent: parameters,
Adam moments, ``tokens_since_fired``, the covariance buffers (dyncorr), the previous step's
``SAEOutput`` (``Trainer.fit`` holds it while the next step runs: x_hat, idx, val, and for
dyncorr the ``PairMoments`` in its extras) and, from the previous step, the gradients:
``zero_grad(set_to_none=True)`` runs only after the forward pass.

Phases (CPU, float32 unless noted; the sum checked against the allocators' peak of the real
step, torch's and numpy's on one timeline (``profiling.alloc_trace``), within 4.1 % on issue 14's
grid):

* ``forward.*``: baseline keeps ``z`` (B x d_sae, saved by ReLU) while ``(z > 0).sum(-1)`` casts
  the bool mask to a B x d_sae int64 copy (13 B d_sae bytes live). TopK: ``pre`` (B x d_sae,
  or a row block of it) and AuxK's dense (B, n_dead) float32 code (``select.aux_code``: on CPU
  selected from each block into one preallocated code; elsewhere an index_select, topk and a
  scatter into ``zeros_like``) in ``_TopKEncode.forward``, which saves x_c, val, idx, the
  by-latent CSR pattern (``order``, ``crow``, ``cols``) and the code; ``aux_decode`` saves
  ``W_dec``'s dead rows (n_dead x d_in; under autocast ``mm`` saves bf16 copies of both).
* ``penalty.*`` (dyncorr, ``trainer/saes/corr_penalty.py``): on CPU the fused kernels
  (``fused_pairs.py``) pack the P = B k (k-1) / 2 row pairs as one int64 each (``key << shift |
  b, p, q``), radix-sorted slice by slice through a second buffer (numpy arrays: RSS only), then U-long vectors for
  the U distinct pairs (keys, sums, M gathered, R, rr); for a small d_sae (``dense_triangle``) they
  sum the products into a persistent array of the upper triangle (``dense_entries``) instead, mark
  the written entries (a bool per entry, then a bit), and read the U pairs from there. Elsewhere ``unique_pairs``
  (``torch.unique``: int32 keys when d_sae^2 fits, their sorted copy, an int64 permutation and
  a temporary of its size, then the inverse), the (B, k, k) outer product gathered at pos, and
  U-long vectors.
* ``backward.*``: the previous gradients are gone (``zero_grad``), the new ones appear one by
  one. dyncorr: the penalty's saved tensors, then on CPU each slice's gradient buffers; elsewhere
  ``a`` gathered to the P row pairs and scattered into a (B, k, k) matrix. AuxK
  first (its nodes are the newest): the code's and the rows' gradients (on CPU the rows' as a
  sparse tensor; elsewhere index_select's backward, ``zeros(d_sae, d_in).index_add``), the
  code's waiting for the encoder; then ``squared_error``'s backward (one B x d_in), the
  decoder's W_dec gradient (on CPU ``latent_kernels.decoder_grads`` with the by-latent pattern,
  AuxK's rows added in place; elsewhere embedding_bag's dense backward summed with AuxK's: 3
  d_sae x d_in at the sum), ``_TopKEncode.backward``: the code's gradient masked in place
  (``latent_kernels.mask_to_positive_``), W_enc.grad (on CPU written once by ``latent_kernels``; elsewhere
  ``sparse.mm``'s zeros and result); b_dec's share
  through x - b_dec is ``grad_b @ W_enc`` (no B x d_in gradient of x).
* ``optimizer``: Adam as ``trainer.train.make_optimizer`` builds it: fused (no temporaries), per
  tensor (``denom`` of the previous parameter alive while the next one's ``sqrt`` and quotient
  are built: 3 d_sae x d_in) or foreach (one copy of all parameters). ``project_decoder_grad``
  works in place in blocks of 128 rows: nothing d_sae x d_in.
* ``update`` (dyncorr ``after_step``): ``LatentStatistics.update(..., moments=...)`` scatters the
  penalty's U distinct pairs (``q * c``: U) and the diagonal (d_sae keys and values).

CUDA with bf16 autocast (bf16 pre-activations, autocast's cached weight copies, ``torch.unique``
instead of the fused CPU kernels: what ``torch.cuda.max_memory_allocated`` counts) is checked
without a GPU against the same step traced on CPU tensors (``profiling.measure.emulate_cuda_step``:
CPU autocast to bf16, the torch penalty path; ``traced_on_cpu`` adds the one temporary CPU kernels
make and CUDA's do not). CUDA's own kernel workspaces (cub's sort buffers in ``torch.unique``)
are not in that trace.

Assumptions. AuxK: ``dead_fraction`` of the latents are dead (``n_dead = round(dead_fraction x
d_sae)``; ``min(k_aux, n_dead)`` per token). The trainer marks a latent dead after
``dead_after_tokens`` without firing, so a run has none for its first ``dead_after_tokens``
tokens, and how many later depends on the run (a healthy TopK run: a few percent; a run
with many dead latents: most). The (B, n_dead) blocks grow with n_dead, so the default, 1.0
(every latent dead), is the upper bound; ``--dead-fraction`` profiles a run's own share, and
the measurement harness marks the same number dead. dyncorr uses ``k_start``, its largest
k. ``U`` (distinct co-active pairs) is data dependent: the default assumes uniformly random
co-activation, ``N (1 - exp(-P / N))`` with ``N = d_sae (d_sae - 1) / 2``; trained SAEs co-fire
in structure, so fewer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import RunConfig

ARCH_NAMES = ("baseline", "topk", "dyncorr")
DTYPES = ("float32", "bfloat16")
COV_DTYPES = {"float32": 4, "float64": 8}
CATEGORIES = ("parameters", "gradients", "optimizer", "buffers", "covariance", "activations", "saved",
              "penalty", "input", "loader")


@dataclass(frozen=True)
class LoaderSpec:
    shuffle_buffer_mb: float = 256.0  # per shard held
    prefetch: bool = True  # 2 group buffers per shard held, else 1
    chunk_rows: int = 4096
    train_chunks: int | None = None  # a store's training chunks cap a group; None = unknown (no cap)
    shards: int = 1  # row streams this (single) process holds: ``LoaderConfig.shards`` / world_size
    decode_bytes: int = 2  # bytes per value of the chunk zarr decodes (bf16 stores: 2); 0 = memory-mapped store


@dataclass(frozen=True)
class TrainSpec:
    """One training configuration, as ``sae train`` would run it."""

    arch: str
    d_in: int
    d_sae: int
    batch_size: int
    k: int  # active latents per token at the peak (topk: k; dyncorr: k_start)
    k_aux: int  # resolved AuxK latents per token (0 = none)
    cov_dtype: str = "float32"
    dtype: str = "float32"  # requested; see effective_dtype
    device: str = "cpu"  # "cpu" or "cuda"
    beta: float = 0.01
    dead_fraction: float = 1.0  # share of the latents dead (AuxK's n_dead); 1.0 = every latent: the upper bound
    unique_pairs: int | None = None  # U; None = the uniform-co-activation estimate
    loader: LoaderSpec = field(default_factory=LoaderSpec)
    traced_on_cpu: bool = False  # a CUDA step run by CPU kernels (profiling.measure.emulate_cuda_step)

    @property
    def effective_dtype(self) -> str:
        """bf16 is autocast on CUDA only; ``Trainer._step`` trains in float32 on CPU."""
        return "bfloat16" if self.device == "cuda" and self.dtype == "bfloat16" else "float32"

    @property
    def cpu_kernels(self) -> bool:
        """CPU kernels run the step: their temporaries (a bool sum's int64 copy) are allocated."""
        return self.device == "cpu" or self.traced_on_cpu

    @property
    def n_dead(self) -> int:
        """Dead latents AuxK sees: ``round(dead_fraction * d_sae)`` (0 for the baseline or without AuxK)."""
        if self.arch == "baseline" or self.k_aux <= 0:
            return 0
        return min(self.d_sae, max(0, round(self.dead_fraction * self.d_sae)))

    @property
    def ka(self) -> int:
        """AuxK latents per token: ``min(k_aux, n_dead)``."""
        return min(self.k_aux, self.n_dead)


@dataclass(frozen=True)
class TrainEstimate:
    components: dict[str, int]  # category -> bytes at the peak phase (sums to total)
    peak_phase: str
    phases: dict[str, int]  # step bytes (no input, no loader) per phase
    step_total: int  # what the measurement sees: the step's peak above the input batch
    total: int  # on the training device: step + input batch (+ loader on CPU)
    loader_host: int  # the loader's rows in host RAM (part of total on CPU)
    cov_share: float  # covariance buffers / total


def n_pairs(batch: int, k: int) -> int:
    """P: the pairs p < q of every row of a (batch, k) TopK code."""
    return batch * k * (k - 1) // 2


def unique_pairs(spec: TrainSpec) -> int:
    """U: the distinct pairs among them (uniformly random co-activation unless given)."""
    if spec.unique_pairs is not None:
        return spec.unique_pairs
    N, P = spec.d_sae * (spec.d_sae - 1) // 2, n_pairs(spec.batch_size, spec.k)
    return 0 if N == 0 else round(N * -math.expm1(-P / N))


def param_bytes(d_in: int, d_sae: int) -> int:
    """W_enc, W_dec (d_sae x d_in), b_enc (d_sae), b_dec (d_in), all float32."""
    return 4 * (2 * d_sae * d_in + d_sae + d_in)


def covariance_bytes(d_sae: int, cov_dtype: str) -> int:
    """``LatentStatistics``: M_buf (d_sae x d_sae) and mu (d_sae) in cov_dtype: its ``nbytes``."""
    return COV_DTYPES[cov_dtype] * (d_sae * d_sae + d_sae)


def loader_bytes(spec: TrainSpec) -> dict[str, int]:
    """The loader's own host memory (``ActivationLoader.rows_bound``, ``trainer.decode.GroupBuffers``):
    per shard held, the group buffer being consumed and (prefetch) the one being filled, allocated
    once per ``batches()`` call (pinned on CUDA) and no bigger than a shard's share of the store's
    training chunks; one batch ``torch.cat`` assembles from pieces (CPU; on CUDA the pieces are copied
    to the device); and per shard held, the chunk zarr is decoding (storage dtype; none when memory-mapped)."""
    L, d = spec.loader, spec.d_in
    buffer_rows = int(L.shuffle_buffer_mb * 2**20) // (4 * d)
    chunks = max(1, buffer_rows // 2 // L.chunk_rows)
    if L.train_chunks:
        chunks = min(chunks, -(-L.train_chunks // L.shards))
    n_bufs = 2 if L.prefetch else 1
    return {"groups": L.shards * n_bufs * 4 * chunks * L.chunk_rows * d,
            "batch": 0 if spec.device == "cuda" else 4 * spec.batch_size * d,
            "decoded_chunk": L.shards * L.decode_bytes * L.chunk_rows * d}


def _persistent(s: TrainSpec) -> dict[str, int]:
    B, d, n = s.batch_size, s.d_in, s.d_sae
    P = param_bytes(d, n)
    a = 2 if s.effective_dtype == "bfloat16" else 4
    prev_out = 4 * B * d + (B * s.k * (8 + a) + n if s.arch != "baseline" else 0)  # x_hat, idx, val, fired
    return {"parameters": P, "gradients": P, "optimizer": 2 * P, "buffers": 8 * n,
            "covariance": covariance_bytes(n, s.cov_dtype) if s.arch == "dyncorr" else 0,
            "activations": prev_out, "penalty": _moments_bytes(s) + _scratch_bytes(s)}


def _fused(s: TrainSpec) -> bool:
    """dyncorr's penalty takes the fused CPU kernels (``fused_pairs_supported``)."""
    return s.arch == "dyncorr" and s.k >= 2 and s.device == "cpu" and not s.traced_on_cpu


def _dense(s: TrainSpec) -> bool:
    """The fused penalty takes its dense-triangle path (``fused_pairs.dense_triangle``)."""
    from trainer.saes.fused_pairs import dense_triangle

    return _fused(s) and dense_triangle(s.batch_size, s.k, s.d_sae, COV_DTYPES[s.cov_dtype])


def _scratch_bytes(s: TrainSpec) -> int:
    """Kept between steps by the fused kernels. Sorted path: ``fused_pairs._SCRATCH``, the packed
    row pairs and the radix sort's second buffer (P int64 each), R and rr (U each), every one
    allocated with 1/8 headroom (given back after the backward). Dense path: ``fused_pairs._CLEAN``,
    the array of the pairs' sums over the upper triangle (held by the moments, given back at rest
    by the statistics' update), and in ``_SCRATCH`` the pairs' weights over the same triangle (with
    1/8 headroom, given back after the backward)."""
    if not _fused(s):
        return 0
    P, U, c = n_pairs(s.batch_size, s.k), unique_pairs(s), COV_DTYPES[s.cov_dtype]
    if _dense(s):
        cells = _dense_cells(s.d_sae)
        return c * cells + c * (cells + cells // 8)
    return 2 * 8 * (P + P // 8) + 2 * c * (U + U // 8)


def _grads(nd_buffers: int, s: TrainSpec) -> dict[str, int]:
    """Backward: the previous step's gradients are gone (zero_grad), ``nd_buffers`` d_sae x d_in exist."""
    return {"gradients": -param_bytes(s.d_in, s.d_sae) + nd_buffers * 4 * s.d_sae * s.d_in}


def _baseline_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    B, d, n = s.batch_size, s.d_in, s.d_sae
    bf16, cpu = s.effective_dtype == "bfloat16", s.cpu_kernels
    Bn, Bd = 4 * B * n, 4 * B * d  # bytes of one float32 B x d_sae / B x d_in tensor
    z = Bn + (Bn // 2 if bf16 else 0)  # ReLU output (+ its bf16 cast, saved by the decoder mm)
    casts = {"activations": 2 * (2 * n * d + B * d)} if bf16 else {}  # autocast's bf16 W_enc, W_dec, x_c
    after = {"saved": z + 2 * Bd, "activations": Bd}  # z, x_c, x_hat - x; x_hat
    return {
        "forward.pre": _merge({"saved": Bd, "activations": (Bn // 2 if bf16 else Bn) + Bn}, casts),  # mm, + b_enc
        "forward.l1": _merge(after, {"activations": Bn}, casts),  # z * ||W_dec||
        # active = z > 0 (1 byte each); on CPU (active).sum(-1) first casts it to int64.
        "forward.l0": _merge(after, {"activations": B * n + (2 * Bn if cpu else 0)}, casts),
        "backward.l1": _merge(after, {"activations": 2 * Bn}, _grads(0, s)),
        "backward.mse": _merge(after, {"activations": Bn + 3 * Bd}, _grads(1, s)),  # pow's backward
        "backward.decode": _merge(after, {"activations": 2 * Bn + Bd}, _grads(2, s)),
    }


def _encode_rows(s: TrainSpec) -> int:
    """Rows per product of the TopK encoder's forward (``sparse_ops.encode_block_rows``): row
    blocks of ~16 MiB of pre-activations where the CPU kernels run, the whole batch elsewhere."""
    from trainer.saes.sparse_ops import ENCODE_BLOCK_BYTES, ENCODE_MIN_ROWS

    if not s.cpu_kernels or s.effective_dtype != "float32":
        return s.batch_size
    return max(ENCODE_MIN_ROWS, ENCODE_BLOCK_BYTES // (4 * s.d_sae))


def _topk_phases(s: TrainSpec) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """TopK/dyncorr phases, and what is alive once the forward (before the penalty) is done.

    ``_TopKEncode.forward`` saves x_c, val, idx, the CSR pattern (``order``, ``crow``, ``cols``) and
    AuxK's dense (B, n_dead) float32 code (``select.aux_code``: on CPU float32 selected from each
    block of pre-activations into one preallocated code; elsewhere ``index_select``, ``topk`` and a
    scatter into ``zeros_like``), which it returns. ``aux_decode`` decodes it with ``W_dec``'s dead
    rows (n_dead x d_in, saved; under autocast ``mm`` saves bf16 copies of both). Backward: the
    code's gradient waits for the encoder's node, which masks it in place
    (``latent_kernels.mask_to_positive_``); on CPU
    W_dec's AuxK gradient is a sparse tensor of its n_dead rows, added in place into the decoder's
    dense one, elsewhere ``index_select``'s backward (a ``zeros(d_sae, d_in).index_add``)."""
    B, d, n, k, nd, ka = s.batch_size, s.d_in, s.d_sae, s.k, s.n_dead, s.ka
    bf16 = s.effective_dtype == "bfloat16"
    a = 2 if bf16 else 4
    fast = s.cpu_kernels and not bf16  # sparse_ops' CPU paths: aux_code's kernel, _AuxDecode
    Bd, Bnd, nD = 4 * B * d, 4 * B * nd, 4 * nd * d  # float32 (B, d_in), (B, n_dead), (n_dead, d_in)
    casts = {"activations": 2 * (n * d + B * d + n)} if bf16 else {}  # autocast's bf16 W_enc, x_c, b_enc
    # x_c; val (float32), idx, order, cols (int64); crow; dead_idx; the AuxK code (float32, (B, n_dead)).
    enc = {"saved": Bd + 28 * B * k + 8 * (n + 1) + 8 * nd + Bnd}
    dec = _merge(enc, {"saved": Bd, "activations": Bd})  # err (saved by squared_error); x_hat
    # W_dec's dead rows (the code is enc's), or mm's bf16 copies of the code and the rows.
    aux = {"saved": (Bnd + nD) * a // 4 if bf16 else nD}
    rows = _encode_rows(s)
    if rows < B:  # CPU: row blocks (sparse_ops.encode_block_rows); the code, each block's pre, the parts so far
        parts = 12 * B * k  # every block's val (float32) and idx (int64)
        encode = Bnd + max(4 * rows * n + rows * k * 12 + parts, 2 * parts)  # a block in flight; the cat
    elif fast:  # pre (B x d_sae), topk's val/idx, the code from aux_code's kernel
        encode = a * B * n + B * k * (a + 4 + 8) + Bnd
    else:  # ... or from its torch path: index_select (float32), zeros_like, pos, gather, ReLU at the ReLU
        encode = a * B * n + B * k * (a + 4 + 8) + (2 * Bnd + 16 * B * ka if nd else 0)
    phases = {
        # ... and ByLatent's argsort.
        "forward.encode": _merge({"saved": Bd, "activations": encode + 16 * B * k}, casts),
        "forward.decode": _merge(dec, {"activations": Bd}, casts),  # batch_total_var's x - mean (then a dot)
    }
    pending = 0  # AuxK's gradients waiting during the decoder's backward: the code's (+ W_dec's sparse rows)
    if nd:
        after = _merge(dec, aux, {"saved": Bd})  # + err - e_hat, saved by squared_error
        pending = Bnd + (nD if fast else 0)
        phases.update({
            # mm: e_hat (+ under autocast the float32 rows before their bf16 cast).
            "forward.aux_mm": _merge(dec, aux, {"activations": (nD if bf16 else 0) + Bd}, casts),
            "forward.aux_loss": _merge(dec, aux, {"activations": 2 * Bd}, casts),  # e_hat, err - e_hat (then a dot)
            "backward.aux_mm": _merge(after, {"activations": Bnd + nD}, _grads(0, s)),  # grad of code, of the rows
        })
        if not fast:
            # index_select's backward: zeros(d_sae, d_in).index_add(...) (W_dec.grad's AuxK part); the
            # rows are gone, their gradient (same size) is not; the code's waits.
            phases["backward.aux_rows"] = _merge(dec, aux, {"activations": Bnd + nD}, _grads(1, s))
    else:
        after = dec
    full = 0 if fast or not nd else 1  # W_dec's AuxK part as a full d_sae x d_in buffer
    phases.update({
        # squared_error's backward: err times a scalar (one B x d_in).
        "backward.mse": _merge(dec, {"activations": Bd + pending}, _grads(full, s)),
        # the decoder's dense W_dec gradient (+ AuxK's: in place on CPU, else a sum: 3 buffers at it).
        "backward.decode": _merge(enc, {"saved": Bd, "activations": pending}, _grads(1 + 2 * full, s)),
        # W_dec.grad and W_enc.grad: on CPU written once (latent_kernels.weight_grad); elsewhere
        # sparse.mm's zeros and result; g and the CSR values; AuxK: the code's gradient (masked in
        # place: on CPU tensors by a kernel, elsewhere through two bool masks) and the dead rows' product
        # (n_dead x d_in) added into W_enc.grad.
        "backward.encode": _merge(enc, {"saved": Bd, "activations": 12 * B * k + (
            Bnd + (0 if s.cpu_kernels else 2 * B * nd) + nD if nd else 0)},
                                  _grads(2 if s.cpu_kernels else 3, s)),
    })
    return phases, _merge(after, casts)


def _moments_bytes(s: TrainSpec) -> int:
    """dyncorr's ``PairMoments`` in ``SAEOutput.extras`` (``penalty_and_moments`` hands them to
    ``stats.update``): the U distinct pair keys (int64) and sums (the dense path leaves its sums in
    its array instead: ``_scratch_bytes``), ``sum z`` and ``sum z^2`` (d_sae)."""
    c = COV_DTYPES[s.cov_dtype]
    if s.arch != "dyncorr" or s.k < 2:
        return 0
    return (0 if _dense(s) else unique_pairs(s) * (8 + c)) + 2 * s.d_sae * c


def _penalty_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    """``penalty_and_moments`` (trainer/saes/corr_penalty.py): on CPU the fused kernels
    (``_FusedCorrPenalty``, trainer/saes/fused_pairs.py), elsewhere ``_CorrPenalty`` and
    ``unique_pairs`` (trainer/saes/pairs.py)."""
    if s.k < 2:
        return {}
    return _fused_penalty_phases(s) if _fused(s) else _torch_penalty_phases(s)


def _penalty_small(s: TrainSpec) -> int:
    """Sorted rows s, perm (int64), their values vs (+ val's float64 copy); m, q_diag, mu~, s_diag, rsqrt(s_diag)."""
    B, n, k, c = s.batch_size, s.d_sae, s.k, COV_DTYPES[s.cov_dtype]
    return B * k * (16 + c) + (B * k * c if c == 8 else 0) + 5 * n * c


def fused_slices() -> tuple[int, int]:
    """The fused kernels' slices (``FusedPairs.build``: 4 per kernel thread) and threads."""
    from trainer.saes.fused_pairs import kernel_threads, n_slices

    return n_slices(), kernel_threads()


def _dense_penalty_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    """The dense-triangle path (``DensePairs``); its arrays of sums and weights are persistent
    (_scratch_bytes).
    Arrays numba allocates inside the kernels (the row cuts, the per-chunk and per-group partial
    sums, num and gw) are not in the measured value, nor here."""
    B, n, k, c = s.batch_size, s.d_sae, s.k, COV_DTYPES[s.cov_dtype]
    cells = _dense_cells(n)
    small = _penalty_small(s)
    return {
        # the bitmap of the pairs (pair_kernels.pair_bitmap: a bit per entry, no bool array).
        "penalty.mark": {"penalty": small + cells // 8},
        # bitmap, per-latent counts and offsets (the sums stay in the array, the weights go to the
        # second one: both persistent).
        "penalty.R": {"penalty": small + cells // 8 + 16 * n},
        # saved and held (s, perm, vs, bitmap, offsets, mu~, s_diag) and the moments; the
        # per-latent gradient vectors, the entries' gradients.
        "backward.penalty": {"penalty": _dense_saved(s) + 3 * n * c + B * k * c},
    }


def _dense_saved(s: TrainSpec) -> int:
    B, n, k, c = s.batch_size, s.d_sae, s.k, COV_DTYPES[s.cov_dtype]
    return B * k * (16 + c) + 2 * n * c + _dense_cells(n) // 8 + 8 * n + _moments_bytes(s)


def _dense_cells(d_sae: int) -> int:
    """Entries of the dense path's array: the upper triangle, rows from multiples of 64 on
    (``fused_pairs.dense_entries``)."""
    from trainer.saes.fused_pairs import dense_entries

    return dense_entries(d_sae)


def _fused_penalty_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    if _dense(s):
        return _dense_penalty_phases(s)
    B, n, k, c = s.batch_size, s.d_sae, s.k, COV_DTYPES[s.cov_dtype]
    P, U = n_pairs(B, k), unique_pairs(s)
    nb, threads = fused_slices()
    small = _penalty_small(s) + 8 * B * k  # + plan_buckets' float64 weights
    # The packed row pairs (sorted in place, slice by slice), R and rr live in the scratch pool
    # (persistent, _scratch_bytes).
    return {
        # per row and slice counts and starts.
        "penalty.pack": {"penalty": small + 3 * 8 * B * nb},
        # keys and q (the moments), M_{t-1} gathered at the keys.
        "penalty.R": {"penalty": small + U * (8 + 2 * c)},
        # saved: keys, perm, vs, mu~, s_diag, and the moments; each thread's gradient buffers
        # (B k + 2 d_sae) and their sums (numba's: not in the measured value).
        "backward.penalty": {"penalty": _fused_saved(s) + (threads + 1) * (B * k + 2 * n) * c},
    }


def _fused_saved(s: TrainSpec) -> int:
    B, n, k, c = s.batch_size, s.d_sae, s.k, COV_DTYPES[s.cov_dtype]
    return B * k * (8 + c) + 2 * n * c + _moments_bytes(s)


def _torch_penalty_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    B, k, c = s.batch_size, s.k, COV_DTYPES[s.cov_dtype]
    P, U, Bk2 = n_pairs(B, k), unique_pairs(s), B * k * k
    small = _penalty_small(s)
    kb = 4 if s.d_sae * s.d_sae - 1 <= 2**31 - 1 else 8  # unique_pairs sorts int32 keys when they fit
    # torch.unique (sort-based): the keys, their sorted copy, the sort's int64 permutation and an
    # int64 temporary of the same length (then the inverse), the distinct keys.
    unique = 2 * kb * P + 16 * P + kb * U
    pairs = P * (8 + 8)  # inv and pos (int64): for every row pair, its distinct pair and its (b, p, q)
    return {
        "penalty.unique": {"penalty": small + unique},
        # products: the (B, k, k) outer product of vs, gathered at pos (P).
        "penalty.products": {"penalty": small + pairs + 8 * U + Bk2 * c + P * c},
        # uniq, i and j (int32), keep; q_pair, s_ij and the two U-long gathers (mu~, then rsqrt(s_diag)
        # into the same buffers: rr).
        "penalty.R": {"penalty": small + pairs + U * (8 + 8 + 1 + 4 * c)},
        # saved (perm, vs, inv, pos, i, j, mu~, s_diag, R, rr) and the moments (uniq, q_pair, m, q_diag);
        # in backward a and R * R; then a gathered to the row pairs (a_rows), a freed, a_rows
        # scattered into A (B, k, k).
        "backward.penalty": {"penalty": _torch_saved(s) + 2 * U * c},
        "backward.pairs": {"penalty": _torch_saved(s) + P * c + max(U, Bk2) * c},
    }


def _torch_saved(s: TrainSpec) -> int:
    B, n, k = s.batch_size, s.d_sae, s.k
    c, P, U = COV_DTYPES[s.cov_dtype], n_pairs(s.batch_size, s.k), unique_pairs(s)
    return B * k * (8 + c) + (B * k * c if c == 8 else 0) + P * 16 + U * (8 + 2 * c) + 2 * n * c + _moments_bytes(s)


def _update_phase(s: TrainSpec) -> dict[str, int]:
    """``LatentStatistics.update(idx, val, moments=...)``: the moments' sums times a scalar
    (U + d_sae; the dense path adds its sums in place: d_sae), the diagonal's keys (d_sae int64);
    the moments are the current output's."""
    c, U, n = COV_DTYPES[s.cov_dtype], unique_pairs(s), s.d_sae
    return {"penalty": _moments_bytes(s) + (0 if _dense(s) else U * c) + n * (8 + c)}


@functools.lru_cache(maxsize=None)
def adam_mode() -> str:
    """How ``trainer.train.make_optimizer`` builds Adam: fused, foreach or the per-tensor default."""
    import torch

    from trainer.train import make_optimizer

    d = make_optimizer(torch.nn.Linear(1, 1), 1e-3).defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default"


def _optimizer_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    """Adam's temporaries (``project_decoder_grad`` works in place, 128 rows at a time: nothing
    d_sae x d_in, and clip_grad_norm_'s norms are scalars): none fused;
    per tensor (CPU default) the previous ``denom`` + ``sqrt`` + quotient, 3 d_sae x d_in;
    foreach (CUDA default) ``sqrt`` of every parameter at once."""
    n, d = s.d_sae, s.d_in
    mode = adam_mode()
    if mode == "default" and s.device == "cuda":
        mode = "foreach"
    temps = {"fused": 0, "foreach": param_bytes(d, n), "default": 3 * 4 * n * d}[mode]
    return {"optimizer": {"optimizer": temps}}


def _step_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    """Bytes on top of the persistent state, per phase (negative gradients: not all exist yet)."""
    out_t = {"activations": 4 * s.batch_size * s.d_in + (s.batch_size * s.k * 12 if s.arch != "baseline" else 0)}
    if s.arch == "baseline":
        phases = _baseline_phases(s)
    else:
        phases, after = _topk_phases(s)
        if s.arch == "dyncorr":
            moments = {"penalty": _moments_bytes(s)}  # from the penalty on, until the next step's output
            phases = {name: _merge(p, moments) if name.startswith("backward") else p for name, p in phases.items()}
            for name, p in _penalty_phases(s).items():
                phases[name] = _merge(after, p, _grads(0, s) if name.startswith("backward") else {})
            phases["update"] = _merge(out_t, _update_phase(s))
            out_t = _merge(out_t, moments)
    for name, p in _optimizer_phases(s).items():
        phases[name] = _merge(out_t, p)
    return phases


def _merge(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for key, v in p.items():
            out[key] = out.get(key, 0) + v
    return out


def estimate_training(s: TrainSpec) -> TrainEstimate:
    """Predicted peak bytes of ``Trainer._step`` for ``s``, by component (see the module docstring)."""
    persistent, phases = _persistent(s), _step_phases(s)
    totals = {name: sum(_merge(persistent, p).values()) for name, p in phases.items()}
    peak = max(totals, key=totals.__getitem__)
    comps = {c: 0 for c in CATEGORIES}
    comps.update(_merge(persistent, phases[peak]))
    ld = loader_bytes(s)
    on_cuda = s.device == "cuda"
    comps["input"] = 4 * s.batch_size * s.d_in if on_cuda else 0  # on CPU the batch is a view into a group
    loader = sum(ld.values())
    comps["loader"] = 0 if on_cuda else loader
    total = sum(comps.values())
    return TrainEstimate(components=comps, peak_phase=peak, phases=totals, step_total=totals[peak], total=total,
                         loader_host=loader, cov_share=comps["covariance"] / total if total else 0.0)


def train_spec(cfg: RunConfig, *, dtype: str = "float32", device: str = "cpu", chunk_rows: int = 4096,
               train_chunks: int | None = None, decode_bytes: int = 2, dead_fraction: float = 1.0) -> TrainSpec:
    """The TrainSpec of a RunConfig whose ``sae`` is resolved (``SAEConfig.resolved(d_in)``), run in
    one process: it holds all ``cfg.loader.shards`` row streams (default one)."""
    s, ld = cfg.sae, cfg.loader
    return TrainSpec(arch=s.arch, d_in=s.d_in, d_sae=s.d_sae, batch_size=cfg.train.batch_size,
                     k=s.k_start if s.arch == "dyncorr" else s.k, k_aux=s.k_aux, cov_dtype=s.cov_dtype,
                     dtype=dtype, device=device, beta=s.beta, dead_fraction=dead_fraction,
                     loader=LoaderSpec(ld.shuffle_buffer_mb, ld.prefetch, chunk_rows, train_chunks,
                                       ld.shards or 1, decode_bytes))
