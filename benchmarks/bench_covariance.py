"""Benchmark the dyncorr latent statistics: lazy sparse update vs the dense update, and the penalty.

Run: ``python benchmarks/bench_covariance.py [--quick] [--out docs/benchmarks.md]``.

* Lazy: ``LatentStatistics.update`` (fp32 buffer), which scatters the non-zeros of ``Q_t``'s upper
  triangle into ``M_buf`` and folds the decay into a scalar: O(B k^2 + d_sae). Two forms: on its
  own (it builds every row's B k (k-1)/2 pairs and scatters them with their duplicates, plus the
  diagonal), and as the training step runs it, ``update(..., moments=...)`` with the distinct
  pairs the penalty has already merged (``penalty_and_moments``, run for each update outside the
  timing, as each step runs it: the dense path's moments are consumed by the update).
  The fold-back (``M_buf *= scale``, O(d_sae^2), once every ``ceil(log(1e-3) / log(1 - beta))``
  steps) is timed separately and reported amortised.
* Dense: the straightforward ``M = (1 - b) M + b (z^T z / B + eps I)`` on dense fp32 ``z``
  (B x d_sae, built from the same ``idx, val`` by a scatter, included in its time), done as one
  in-place ``addmm_`` (the fastest dense form) plus the diagonal: O(B d_sae^2). It is slow at the
  full size, so only ``--dense-iters`` (default 2) steps are timed, with no warm-up.
* Penalty: ``correlation_penalty`` forward, and forward + backward w.r.t. ``val``; against
  ``dense_correlation_penalty`` (same maths on dense fp32 ``z``) only where d_sae <= 4096.
  "dyncorr's extra per step" = penalty forward + backward + the update from its moments: what
  the dyncorr step adds to a TopK step.

Batches: k distinct latents per row drawn without replacement with Zipf(0.8) weights over a random
permutation of the latents (frequent latents co-fire often, so pairs repeat as in a real SAE),
values |N(0, 1)|; the last 10% of the latents never fire. Timings are medians after three warm-up
calls (except the dense update); CUDA timings are synchronised. The lazy result is checked against the dense one
on the same batches (relative error on a block of latents).
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.saes.corr_penalty import correlation_penalty, dense_correlation_penalty, penalty_and_moments  # noqa: E402
from trainer.saes.covariance import LatentStatistics  # noqa: E402

TARGET = 20.0


def make_batches(n: int, d: int, k: int, B: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_alive = max(k, int(0.9 * d))
    perm = torch.randperm(n_alive, generator=g).to(device)
    logw = (-0.8 * torch.log(torch.arange(1, n_alive + 1, dtype=torch.float32))).to(device)
    out = []
    for _ in range(n):
        u = torch.rand(B, n_alive, generator=g).to(device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        idx = perm[(logw + gumbel).topk(k, dim=1).indices]  # Gumbel-top-k: weighted, no replacement
        val = torch.randn(B, k, generator=g).abs().to(device)
        out.append((idx.contiguous(), val))
    return out


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3
    return run


def dense_step(M: torch.Tensor, mu: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, beta: float, eps: float) -> None:
    B, d = idx.shape[0], M.shape[0]
    z = torch.zeros(B, d, dtype=M.dtype, device=M.device).scatter_(1, idx, val.to(M.dtype))
    M.addmm_(z.T, z, beta=1.0 - beta, alpha=beta / B)  # (1 - b) M + b z^T z / B
    M.diagonal().add_(beta * eps)
    mu.mul_(1.0 - beta).add_(z.mean(0), alpha=beta)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="d_sae 4096, k 32, B 1024 (seconds on a CPU)")
    ap.add_argument("--d-sae", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--lazy-iters", type=int, default=10)
    ap.add_argument("--dense-iters", type=int, default=2)
    ap.add_argument("--penalty-iters", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    a = ap.parse_args(argv)
    d = a.d_sae or (4096 if a.quick else 16384)
    k = a.k or (32 if a.quick else 64)
    B = a.batch or (1024 if a.quick else 4096)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    beta, eps = a.beta, a.eps
    tm = timer(device)
    batches = make_batches(4, d, k, B, device, a.seed)
    nb = len(batches)

    # -- lazy update ---------------------------------------------------------------------
    st = LatentStatistics(d, beta, eps, device=device)
    for i in range(3):  # warm-up (allocator, page faults of the fresh buffer)
        st.update(*batches[i % nb])
    lazy = [tm(lambda i=i: st.update(*batches[i % nb])) for i in range(a.lazy_iters)]
    lazy_ms = statistics.median(lazy)
    fold_period = math.ceil(math.log(st.fold_threshold) / math.log(1.0 - beta)) if beta < 1 else 1
    fold_ms = statistics.median([tm(lambda: st.M_buf.mul_(0.5)) for _ in range(3)])  # what a fold does
    lazy_amortised = lazy_ms + fold_ms / fold_period
    def via_moments(i: int) -> float:
        """One update from the batch's moments, made fresh (untimed) as each step makes them: the
        dense path's moments are consumed by the update, their array going back at rest."""
        with torch.no_grad():
            moments = penalty_and_moments(st, *batches[i % nb])[2]
        return tm(lambda: st.update(*batches[i % nb], moments=moments))

    via_ms = statistics.median([via_moments(i) for i in range(a.lazy_iters)])
    with torch.no_grad():
        n_distinct = penalty_and_moments(st, *batches[-1])[2].pairs()[0].numel()
    nbytes = st.nbytes
    del st

    # -- dense update --------------------------------------------------------------------
    M = torch.eye(d, dtype=torch.float32, device=device) * eps
    mu = torch.zeros(d, dtype=torch.float32, device=device)
    dense = [tm(lambda i=i: dense_step(M, mu, *batches[i % nb], beta, eps)) for i in range(a.dense_iters)]
    dense_ms = statistics.median(dense)

    # correctness: the lazy statistics after the same dense_iters batches, on the 512 busiest latents
    chk = LatentStatistics(d, beta, eps, device=device)
    for i in range(a.dense_iters):
        chk.update(*batches[i % nb])
    busy = torch.topk(chk.mean(), min(512, d)).indices
    ref = M[busy][:, busy].double()
    got = chk.second_moment(busy, busy, dtype=torch.float64)
    rel_err_M = ((got - ref).abs().max() / ref.abs().max()).item()
    rel_err_mu = ((chk.mean() - mu).abs().max() / mu.abs().max()).item()
    del M, mu

    # -- penalty -------------------------------------------------------------------------
    idx, val = batches[-1]

    def fwd():
        return correlation_penalty(chk, idx, val)

    def fwd_bwd():
        v = val.clone().requires_grad_(True)
        loss, _ = correlation_penalty(chk, idx, v)
        loss.backward()

    for _ in range(3):  # warm-up: the first calls pay for the allocator settling
        fwd(), fwd_bwd()
    pen_f = statistics.median([tm(fwd) for _ in range(a.penalty_iters)])
    pen_fb = statistics.median([tm(fwd_bwd) for _ in range(a.penalty_iters)])
    extra_ms = pen_fb + via_ms
    loss, diag = fwd()
    n_pairs = int(diag["n_pairs"])
    dense_pen_f = dense_pen_fb = None
    if d <= 4096:
        M_prev, mu_prev = chk.second_moment(), chk.mean()
        z = torch.zeros(B, d, device=device).scatter_(1, idx, val)
        ref_loss = dense_correlation_penalty(M_prev, mu_prev, z, beta, eps)
        pen_rel = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())

        def dfb():
            zz = torch.zeros(B, d, device=device).scatter(1, idx, val.clone().requires_grad_(True))
            dense_correlation_penalty(M_prev, mu_prev, zz, beta, eps).backward()

        dfb(), dfb()
        dense_pen_f = statistics.median([tm(lambda: dense_correlation_penalty(M_prev, mu_prev, z, beta, eps))
                                         for _ in range(a.penalty_iters)])
        dense_pen_fb = statistics.median([tm(dfb) for _ in range(a.penalty_iters)])
    else:
        pen_rel = None

    # -- report --------------------------------------------------------------------------
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    ratio = dense_ms / lazy_ms
    ratio_am = dense_ms / lazy_amortised
    met = ratio_am >= TARGET
    full = (d, k, B) == (16384, 64, 4096)
    fmt = lambda x: "n/a" if x is None else f"{x:,.1f}"  # noqa: E731
    rat = lambda x, y: "n/a" if x is None or y is None else f"{x / y:,.1f}x"  # noqa: E731
    lines = [
        f"## Latent statistics (dyncorr): lazy vs dense, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"`{shlex.join(['python', 'benchmarks/bench_covariance.py', *(sys.argv[1:] if argv is None else argv)])}`",
        "",
        f"d_sae {d}, k {k}, B {B}, beta {beta}, eps {eps}, fp32 buffers; device {device.type} ({dev_name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads. Second-moment buffer held: "
        f"{nbytes / 2**20:,.1f} MiB (`nbytes`). Pairs per step: {B * k * (k - 1) // 2:,} row pairs + {d:,} diagonal "
        f"entries scattered by the update on its own, {n_distinct:,} distinct pairs + the diagonal from the "
        f"penalty's moments; {n_pairs:,} co-active pairs in the penalty.",
        "",
        "| operation | lazy / sparse (ms) | dense (ms) | speed-up |",
        "| --- | ---: | ---: | ---: |",
        f"| Sigma update, per step (lazy median of {a.lazy_iters}, dense median of {a.dense_iters}) | "
        f"{fmt(lazy_ms)} | {fmt(dense_ms)} | {ratio:,.1f}x |",
        f"| fold-back `M_buf *= scale` (O(d_sae^2), every {fold_period} steps) | {fmt(fold_ms)} | | |",
        f"| Sigma update incl. amortised fold-back | {fmt(lazy_amortised)} | {fmt(dense_ms)} | **{ratio_am:,.1f}x** |",
        f"| Sigma update from the penalty's moments (the training step's), median of {a.lazy_iters} | "
        f"{fmt(via_ms)} | {fmt(dense_ms)} | {dense_ms / via_ms:,.1f}x |",
        f"| correlation penalty, forward | {fmt(pen_f)} | {fmt(dense_pen_f)} | {rat(dense_pen_f, pen_f)} |",
        f"| correlation penalty, forward + backward | {fmt(pen_fb)} | {fmt(dense_pen_fb)} | {rat(dense_pen_fb, pen_fb)} |",
        f"| dyncorr's extra per step: penalty forward + backward + update from its moments | {fmt(extra_ms)} | | |",
        "",
        (f"Target >= {TARGET:g}x on the update (amortised) at d_sae 16384, k 64, B 4096: "
         f"**{'met' if met else 'NOT met'}** ({ratio_am:,.1f}x). " if full else
         f"Target >= {TARGET:g}x is defined at d_sae 16384, k 64, B 4096 (the ratio grows like "
         f"d_sae^2 / k^2); at this size {ratio_am:,.1f}x ({'above' if met else 'below'} it). ")
        +
        f"Lazy vs dense after {a.dense_iters} steps, 512 busiest latents: max relative error of M "
        f"{rel_err_M:.1e}, of mu {rel_err_mu:.1e}"
        + (f"; penalty vs dense reference: {pen_rel:.1e} relative." if pen_rel is not None else "."),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out is not None:
        with a.out.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
