"""Benchmark the TopK step's CPU kernels against the torch calls they replace, side by side.

Run: ``python benchmarks/bench_kernels.py [--quick] [--repeats N] [--out docs/benchmarks.md]``.

On the same float32 tensors (seeded), each kernel against the torch call it replaces:

* the encoder's ``x @ W.T + b`` on ``trainer.saes.linear.linear`` (oneDNN, bias fused) vs
  ``torch.addmm`` (MKL, which SAELens' step runs);
* the row-wise top-k of the pre-activations on ``trainer.saes.select.topk`` (numba) vs
  ``torch.topk(sorted=False)``;
* the encoder's forward as the trainer runs it (``sparse_ops.topk_encode``: row blocks of
  ~16 MiB of pre-activations) vs the same in one product over the batch;
* the selection's by-latent CSR pattern (``latent_kernels.by_latent``, a counting sort) vs
  ``argsort(stable=True)``, ``bincount`` and ``cumsum``;
* the sparse decoder (``latent_kernels.decode``) vs ``embedding_bag`` plus ``b_dec``; the
  decoder's backward (``latent_kernels.decoder_grads``) vs ``sampled_addmm`` and ``sparse.mm``;
  the encoder's weight gradient (``latent_kernels.weight_grad``) vs ``sparse.mm``.
Shapes: the issue-15 size (B 4096, d_in 2304, d_sae 16,384, k 64), the study's (B 2048, d_in
576, d_sae 4,608, k 16 and 64) and the demo's (B 512, d_in 576, d_sae 1,152, k 64). One untimed
call of each, then ``--repeats`` rounds, the two kernels alternating which goes first; the
medians and their ratio (torch's / ours) are reported. Every result is checked against
torch's before timing (the same top-k set; products within float32 rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import _common as C  # noqa: E402  (puts the repository on sys.path)

import trainer  # noqa: E402,F401  (the allocator settings the trainer runs with)
from trainer.saes import latent_kernels as LK  # noqa: E402
from trainer.saes.linear import linear, uses_onednn  # noqa: E402
from trainer.saes.select import topk  # noqa: E402
from trainer.saes.sparse_ops import ByLatent, topk_encode  # noqa: E402

SIZES = [(4096, 2304, 16384, 64), (2048, 576, 4608, 16), (2048, 576, 4608, 64), (512, 576, 1152, 64)]


def _pair(ours: Callable[[], object], ref: Callable[[], object], repeats: int) -> tuple[float, float]:
    ours(), ref()
    t: dict[str, list[float]] = {"ours": [], "ref": []}
    for r in range(repeats):
        for name in (["ours", "ref"] if r % 2 == 0 else ["ref", "ours"]):
            fn = ours if name == "ours" else ref
            t0 = time.perf_counter()
            out = fn()
            t[name].append(time.perf_counter() - t0)
            del out
    return statistics.median(t["ours"]), statistics.median(t["ref"])


def _one_product(x, b_dec, W, b, k):
    """The encoder's forward without row blocks: the product over the whole batch, then top-k."""
    pre = linear(x - b_dec, W, b)
    val, idx = topk(pre, k)
    return val.relu(), idx, ByLatent.build(idx, W.shape[0])


def _sparse_pairs(x, W, b_dec, idx, val, repeats):
    """The sparse decoder and weight gradients, ours vs torch's, checked first."""
    sel = ByLatent.build(idx, W.shape[0])
    grad_out = x  # any (B, d_in) dense matrix
    ref_dec = torch.nn.functional.embedding_bag(idx, W, per_sample_weights=val, mode="sum") + b_dec
    torch.testing.assert_close(LK.decode(idx, val, W, b_dec), ref_dec, rtol=1e-4, atol=1e-4)
    gv, gW = LK.decoder_grads(sel.crow, sel.cols, sel.order, val, W, grad_out)
    torch.testing.assert_close(gW, torch.sparse.mm(sel.csr(val), grad_out), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gv, sel.sample(W, grad_out), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(LK.weight_grad(sel.crow, sel.cols, sel.order, val, x),
                               torch.sparse.mm(sel.csr(val), x), rtol=1e-4, atol=1e-3)
    if not all(torch.equal(a, r) for a, r in zip(LK.by_latent(idx, W.shape[0]), ByLatent.arrays(idx, W.shape[0]))):
        raise SystemExit("the counting sort's CSR pattern differs from argsort's")
    return {
        "CSR pattern": _pair(lambda: LK.by_latent(idx, W.shape[0]), lambda: ByLatent.arrays(idx, W.shape[0]),
                             repeats),
        "decode": _pair(lambda: LK.decode(idx, val, W, b_dec),
                        lambda: torch.nn.functional.embedding_bag(idx, W, per_sample_weights=val, mode="sum") + b_dec,
                        repeats),
        "decoder backward": _pair(lambda: LK.decoder_grads(sel.crow, sel.cols, sel.order, val, W, grad_out),
                                  lambda: (sel.sample(W, grad_out), torch.sparse.mm(sel.csr(val), grad_out)), repeats),
        "encoder weight grad": _pair(lambda: LK.weight_grad(sel.crow, sel.cols, sel.order, val, x),
                                     lambda: torch.sparse.mm(sel.csr(val), x), repeats),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's size only")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per pair (default 10, quick 5)")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    a = ap.parse_args(argv)
    repeats = a.repeats or (5 if a.quick else 10)
    load_start = C.loadavg()
    t_start = time.perf_counter()
    sizes = SIZES[-1:] if a.quick else SIZES
    g = torch.Generator().manual_seed(0)
    rows = []
    for B, d_in, d_sae, k in sizes:
        x = torch.randn(B, d_in, generator=g)
        W = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
        b = torch.randn(d_sae, generator=g) * 0.1
        b_dec = torch.randn(d_in, generator=g) * 0.1
        ref_pre = torch.addmm(b, x, W.t())
        pre = linear(x, W, b)
        torch.testing.assert_close(pre, ref_pre, rtol=1e-4, atol=1e-4)
        v, i = topk(pre, k)
        if not torch.equal(i.sort(1).values, torch.topk(pre, k, dim=-1).indices.sort(1).values):
            raise SystemExit(f"top-k sets differ at {B} x {d_sae}, k {k}")
        mm = _pair(lambda: linear(x, W, b), lambda: torch.addmm(b, x, W.t()), repeats)
        tk = _pair(lambda: topk(pre, k), lambda: torch.topk(pre, k, dim=-1, sorted=False), repeats)
        enc = _pair(lambda: topk_encode(x, b_dec, W, b, k), lambda: _one_product(x, b_dec, W, b, k), repeats)
        sparse = _sparse_pairs(x, W, b_dec, i, v.relu(), repeats)
        rows.append((B, d_in, d_sae, k, {"product": mm, "top-k": tk, "encoder forward": enc, **sparse}))
        print(f"B {B} d_in {d_in} d_sae {d_sae} k {k}: " + ", ".join(
            f"{n} {t[0] * 1e3:.2f} vs {t[1] * 1e3:.2f} ms" for n, t in rows[-1][4].items()), file=sys.stderr, flush=True)
    names = list(rows[0][4])
    lines = [
        f"Ours: `linear` on {'oneDNN' if uses_onednn(torch.zeros(1, 1)) else 'torch addmm (no oneDNN here)'}, the "
        f"rest numba; {torch.get_num_threads()} torch threads. Median of {repeats} alternating rounds per pair; "
        "each cell: ours ms / torch's ms = **ratio** (> 1: ours faster). Encoder forward: `topk_encode` (row "
        "blocks) vs one product over the batch, both with our product and top-k.",
        "",
        "| B | d_in | d_sae | k | " + " | ".join(names) + " |",
        "| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for B, d_in, d_sae, k, res in rows:
        lines.append(f"| {B:,} | {d_in:,} | {d_sae:,} | {k} | " + " | ".join(
            f"{res[n][0] * 1e3:.1f} / {res[n][1] * 1e3:.1f} = **{res[n][1] / res[n][0]:.2f}x**" for n in names) + " |")
    lines += ["", f"Wall time of the whole benchmark: {C.elapsed(t_start)}."]
    C.emit(C.machine_lines("TopK step's CPU kernels vs torch's", "benchmarks/bench_kernels.py",
                           sys.argv[1:] if argv is None else argv, torch.device("cpu"), load_start) + lines, a.out)


if __name__ == "__main__":
    main()
