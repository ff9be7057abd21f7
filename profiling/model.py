"""The memory model of one SAE training step (``Trainer._step``), read off the real code paths.

Every term below names the tensor it stands for; the peak is the persistent state plus the
largest of the step's *phases* (the live set at a point of the step). Persistent: parameters,
Adam moments, ``tokens_since_fired``, the covariance buffers (dyncorr), the previous step's
``SAEOutput`` (``Trainer.fit`` holds it while the next step runs) and, from the previous step,
the gradients: ``zero_grad(set_to_none=True)`` runs only after the forward pass.

Phases (CPU, float32 unless noted; checked op by op against the torch profiler's allocation
events, within a few percent):

* ``forward.*``: baseline keeps ``z`` (B x d_sae, saved by ReLU) while ``(z > 0).sum(-1)`` casts
  the bool mask to a B x d_sae int64 copy (13 B d_sae bytes live). TopK keeps ``pre``
  (B x d_sae) until ``_TopKEncode.forward`` returns, with TopK + AuxK values/indices and the
  concatenated copies saved for backward.
* ``penalty.*`` (dyncorr): ``correlation_penalty`` builds P = B k (k-1) / 2 pair keys and products
  (a B x k x k broadcast first), ``torch.unique`` (sorted copy, permutation, inverse, and
  a sort scratch buffer that only shows in RSS), then
  ~11 U-long vectors for the U unique pairs (diagnostics included).
* ``backward.*``: the previous gradients are gone (``zero_grad``), the new ones appear one by
  one. ``pow``'s backward (3 B x d_in), embedding_bag's dense backward of W_dec, and
  ``_TopKEncode.backward``: the COO matrix, ``coalesce``'s copies and sort, then ``sparse.mm``'s
  output and a second d_sae x d_in buffer. dyncorr: the penalty's saved tensors, then its
  B x k x k gradients.
* ``optimizer.*``: ``project_decoder_grad`` builds one d_sae x d_in product; Adam as
  ``trainer.train.make_optimizer`` builds it: fused (no temporaries), per tensor (``denom`` of the
  previous parameter alive while the next one's ``sqrt`` and quotient are built: 3 d_sae x d_in)
  or foreach (one copy of all parameters).
* ``update`` (dyncorr ``after_step``): ``LatentStatistics.update`` scatters B k (k+1) / 2 pairs.

CUDA with bf16 autocast is modelled (bf16 pre-activations and autocast's cached weight copies)
but could not be checked here: no GPU.

AuxK is assumed active with ``min(k_aux, d_sae)`` latents per token (late training: at least
k_aux dead latents); dyncorr uses ``k_start``, its largest k. ``U`` (unique co-active pairs) is
data dependent: the default assumes uniformly random co-activation, ``N (1 - exp(-P / N))``
with ``N = d_sae (d_sae - 1) / 2``; trained SAEs co-fire in structure, so fewer.
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
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class LoaderSpec:
    shuffle_buffer_mb: float = 256.0
    prefetch: bool = True
    chunk_rows: int = 4096
    train_chunks: int | None = None  # a store's training chunks cap a group; None = unknown (no cap)


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
    aux: bool = True  # assume >= k_aux dead latents, so AuxK runs at full size
    unique_pairs: int | None = None  # U; None = the uniform-co-activation estimate
    loader: LoaderSpec = field(default_factory=LoaderSpec)

    @property
    def effective_dtype(self) -> str:
        """bf16 is autocast on CUDA only; ``Trainer._step`` trains in float32 on CPU."""
        return "bfloat16" if self.device == "cuda" and self.dtype == "bfloat16" else "float32"

    @property
    def ka(self) -> int:
        return min(self.k_aux, self.d_sae) if self.aux and self.arch != "baseline" else 0


@dataclass(frozen=True)
class TrainEstimate:
    components: dict[str, int]  # category -> bytes at the peak phase (sums to total)
    peak_phase: str
    phases: dict[str, int]  # step bytes (no input, no loader) per phase
    step_total: int  # what the measurement sees: the step's peak above the input batch
    total: int  # on the training device: step + input batch (+ loader on CPU)
    loader_host: int  # the loader's rows in host RAM (part of total on CPU)
    cov_share: float  # covariance buffers / total


def n_pairs(batch: int, k: int, diagonal: bool = False) -> int:
    return batch * k * (k + 1 if diagonal else k - 1) // 2


def unique_pairs(spec: TrainSpec) -> int:
    if spec.unique_pairs is not None:
        return spec.unique_pairs
    N, P = spec.d_sae * (spec.d_sae - 1) // 2, n_pairs(spec.batch_size, spec.k)
    return 0 if N == 0 else round(N * -math.expm1(-P / N))


def key_bytes(d_sae: int) -> int:
    """``_row_pairs`` keys are int32 while ``d_sae^2 - 1`` fits, else int64."""
    return 4 if d_sae * d_sae - 1 <= _INT32_MAX else 8


def param_bytes(d_in: int, d_sae: int) -> int:
    """W_enc, W_dec (d_sae x d_in), b_enc (d_sae), b_dec (d_in), all float32."""
    return 4 * (2 * d_sae * d_in + d_sae + d_in)


def covariance_bytes(d_sae: int, cov_dtype: str) -> int:
    """``LatentStatistics``: M_buf (d_sae x d_sae) and mu (d_sae) in cov_dtype: its ``nbytes``."""
    return COV_DTYPES[cov_dtype] * (d_sae * d_sae + d_sae)


def loader_bytes(spec: TrainSpec) -> dict[str, int]:
    """The loader's own rows (``ActivationLoader.rows_bound``): group + prefetched group + one batch."""
    L, d = spec.loader, spec.d_in
    buffer_rows = int(L.shuffle_buffer_mb * 2**20) // (4 * d)
    chunks = max(1, buffer_rows // 2 // L.chunk_rows)
    group = (min(chunks, L.train_chunks) if L.train_chunks else chunks) * L.chunk_rows
    return {"group": 4 * group * d, "prefetch": 4 * group * d if L.prefetch else 0,
            "batch": 4 * spec.batch_size * d}


def _persistent(s: TrainSpec) -> dict[str, int]:
    B, d, n = s.batch_size, s.d_in, s.d_sae
    P = param_bytes(d, n)
    a = 2 if s.effective_dtype == "bfloat16" else 4
    prev_out = 4 * B * d + (B * s.k * (8 + a) + n if s.arch != "baseline" else 0)
    return {"parameters": P, "gradients": P, "optimizer": 2 * P, "buffers": 8 * n,
            "covariance": covariance_bytes(n, s.cov_dtype) if s.arch == "dyncorr" else 0,
            "activations": prev_out}


def _grads(nd_buffers: int, s: TrainSpec) -> dict[str, int]:
    """Backward: the previous step's gradients are gone (zero_grad), ``nd_buffers`` d_sae x d_in exist."""
    return {"gradients": -param_bytes(s.d_in, s.d_sae) + nd_buffers * 4 * s.d_sae * s.d_in}


def _baseline_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    B, d, n = s.batch_size, s.d_in, s.d_sae
    bf16, cpu = s.effective_dtype == "bfloat16", s.device == "cpu"
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


def _topk_forward(s: TrainSpec) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """TopK/dyncorr phases, and what is alive once the forward (before the penalty) is done."""
    B, d, n, k, ka = s.batch_size, s.d_in, s.d_sae, s.k, s.ka
    bf16 = s.effective_dtype == "bfloat16"
    a = 2 if bf16 else 4
    Bd, kt = 4 * B * d, k + ka
    casts = {"activations": 2 * (n * d + B * d + n)} if bf16 else {}  # autocast's bf16 W_enc, x_c, b_enc
    outs = B * kt * (a + 8)  # val, idx, aux_val, aux_idx
    cats = B * kt * (a + 8)  # torch.cat([idx, aux_idx]), torch.cat([val, aux_val]): saved for backward
    n_err = 2 if ka else 1  # x - x_hat (and AuxK's e_hat - err), saved by pow
    after = {"saved": Bd + cats + n_err * Bd, "activations": outs + Bd}  # x_c, ...; x_hat
    # _TopKEncode.backward: W_dec.grad exists; g, grad_x, the COO rows/indices, coalesce's copies and sort.
    enc_bwd = {"saved": Bd + cats, "activations": 3 * Bd + 12 * B * k + 4 * B * kt}
    return {
        "forward.encode": _merge({"saved": Bd + cats, "activations": a * B * n + outs}, casts),
        "forward.decode": _merge(after, {"activations": 2 * Bd}, casts),
        "backward.mse": _merge(after, {"activations": 3 * Bd}, _grads(0, s)),
        "backward.decode": _merge(after, {"activations": 40 * B * max(k, ka)}, _grads(2 if ka else 1, s)),
        "backward.coalesce": _merge(enc_bwd, {"activations": 72 * B * kt}, _grads(1, s)),
        "backward.sparse_mm": _merge(enc_bwd, {"activations": 28 * B * kt}, _grads(3, s)),
    }, _merge(after, casts)


def _penalty_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    B, n, k = s.batch_size, s.d_sae, s.k
    c, kb = COV_DTYPES[s.cov_dtype], key_bytes(n)
    if k < 2:
        return {}
    P, U, Bk2 = n_pairs(B, k), unique_pairs(s), B * k * k
    small = B * k * (16 + c + 4) + 8 * n * c  # sorted idx, perm, gathered values, int32 keys; O(d_sae) vectors
    u_keys = U * (8 if kb == 4 else 0) + U  # uniq as int64 (when it was int32), keep mask
    u_vecs = U * (3 * 8 + max(11 * c + 9, 12 * c + 3))  # sel, i, j; q_pair ... R, |R|, isfinite
    return {
        "penalty.pairs": {"penalty": small + P * kb + Bk2 * c + P * c},
        # + the sort's scratch (~P kb, outside torch's allocator: seen in RSS, not by the profiler)
        "penalty.unique": {"penalty": small + P * (3 * kb + c + 16) + U * kb},
        "penalty.R": {"penalty": small + P * (kb + c + 8) + u_keys + u_vecs},
        # backward: inv, prod and 7 U-vectors saved, ~3 U-vectors of gradients in flight; then B x k x k grads.
        "backward.penalty": {"penalty": P * (8 + c) + U * (24 + 10 * c)},
        "backward.pairs": {"penalty": 3 * Bk2 * c},
    }


def _update_phase(s: TrainSpec) -> dict[str, int]:
    B, n, k = s.batch_size, s.d_sae, s.k
    c, kb = COV_DTYPES[s.cov_dtype], key_bytes(n)
    P1 = n_pairs(B, k, diagonal=True)
    extra = P1 * (8 + 16 + c) if s.device == "cuda" else 0  # keys.long() + index_put_'s sort
    return {"penalty": B * k * (16 + c + 4) + P1 * kb + B * k * k * c + P1 * c + extra}


@functools.lru_cache(maxsize=None)
def adam_mode() -> str:
    """How ``trainer.train.make_optimizer`` builds Adam: fused, foreach or the per-tensor default."""
    import torch

    from trainer.train import make_optimizer

    d = make_optimizer(torch.nn.Linear(1, 1), 1e-3).defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default"


def _optimizer_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    """``project_decoder_grad`` (one d_sae x d_in product), then Adam's temporaries: none fused;
    per tensor (CPU default) the previous ``denom`` + ``sqrt`` + quotient, 3 d_sae x d_in;
    foreach (CUDA default) ``sqrt`` of every parameter at once."""
    n, d = s.d_sae, s.d_in
    mode = adam_mode()
    if mode == "default" and s.device == "cuda":
        mode = "foreach"
    temps = {"fused": 0, "foreach": param_bytes(d, n), "default": 3 * 4 * n * d}[mode]
    return {"optimizer.project": {"activations": 4 * n * d}, "optimizer": {"optimizer": temps}}


def _step_phases(s: TrainSpec) -> dict[str, dict[str, int]]:
    """Bytes on top of the persistent state, per phase (negative gradients: not all exist yet)."""
    out_t = {"activations": 4 * s.batch_size * s.d_in + (s.batch_size * s.k * 12 if s.arch != "baseline" else 0)}
    if s.arch == "baseline":
        phases = _baseline_phases(s)
    else:
        phases, after = _topk_forward(s)
        if s.arch == "dyncorr":
            for name, p in _penalty_phases(s).items():
                phases[name] = _merge(after, p, _grads(0, s) if name.startswith("backward") else {})
            phases["update"] = _merge(out_t, _update_phase(s))
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
    loader = ld["group"] + ld["prefetch"] + ld["batch"]
    comps["loader"] = 0 if on_cuda else loader
    total = sum(comps.values())
    return TrainEstimate(components=comps, peak_phase=peak, phases=totals, step_total=totals[peak], total=total,
                         loader_host=loader, cov_share=comps["covariance"] / total if total else 0.0)


def train_spec(cfg: RunConfig, *, dtype: str = "float32", device: str = "cpu", chunk_rows: int = 4096,
               train_chunks: int | None = None) -> TrainSpec:
    """The TrainSpec of a RunConfig whose ``sae`` is resolved (``SAEConfig.resolved(d_in)``)."""
    s, ld = cfg.sae, cfg.loader
    return TrainSpec(arch=s.arch, d_in=s.d_in, d_sae=s.d_sae, batch_size=cfg.train.batch_size,
                     k=s.k_start if s.arch == "dyncorr" else s.k, k_aux=s.k_aux, cov_dtype=s.cov_dtype,
                     dtype=dtype, device=device, beta=s.beta,
                     loader=LoaderSpec(ld.shuffle_buffer_mb, ld.prefetch, chunk_rows, train_chunks))
