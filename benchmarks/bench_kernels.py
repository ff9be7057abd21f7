"""Benchmark the encoder forward's CPU kernels against torch's defaults, side by side.

Run: ``python benchmarks/bench_kernels.py [--quick] [--repeats N] [--out docs/benchmarks.md]``.

Two products of the TopK encoder's forward, each against the torch call it replaces, on the
same float32 tensors (seeded): ``x @ W.T + b`` on ``trainer.saes.linear.linear`` (oneDNN, bias
fused) vs ``torch.addmm`` (MKL, which SAELens' step runs), and the row-wise top-k of the
pre-activations on ``trainer.saes.select.topk`` (numba) vs ``torch.topk(sorted=False)``.
Shapes: the issue-15 size (B 4096, d_in 2304, d_sae 16,384, k 64), the study's (B 2048, d_in
576, d_sae 4,608, k 16 and 64) and the demo's (B 512, d_in 576, d_sae 1,152, k 64). One untimed
call of each, then ``--repeats`` rounds, the two kernels alternating which goes first; the
medians and their ratio (torch's / ours) are reported. Every result is checked against
torch's before timing (the same top-k set; the product within float32 rounding).
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
from trainer.saes.linear import linear, uses_onednn  # noqa: E402
from trainer.saes.select import topk  # noqa: E402

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
        ref_pre = torch.addmm(b, x, W.t())
        pre = linear(x, W, b)
        torch.testing.assert_close(pre, ref_pre, rtol=1e-4, atol=1e-4)
        v, i = topk(pre, k)
        if not torch.equal(i.sort(1).values, torch.topk(pre, k, dim=-1).indices.sort(1).values):
            raise SystemExit(f"top-k sets differ at {B} x {d_sae}, k {k}")
        mm = _pair(lambda: linear(x, W, b), lambda: torch.addmm(b, x, W.t()), repeats)
        tk = _pair(lambda: topk(pre, k), lambda: torch.topk(pre, k, dim=-1, sorted=False), repeats)
        rows.append((B, d_in, d_sae, k, mm, tk))
        print(f"B {B} d_in {d_in} d_sae {d_sae} k {k}: product {mm[0] * 1e3:.2f} vs {mm[1] * 1e3:.2f} ms, "
              f"top-k {tk[0] * 1e3:.2f} vs {tk[1] * 1e3:.2f} ms", file=sys.stderr, flush=True)
    x = torch.zeros(1, 1)
    lines = [
        f"Ours: `linear` on {'oneDNN' if uses_onednn(x) else 'torch addmm (no oneDNN here)'}, `topk` on numba; "
        f"{torch.get_num_threads()} torch threads. Median of {repeats} alternating rounds per pair (ms); "
        "ratio = torch's / ours (> 1: ours faster).",
        "",
        "| B | d_in | d_sae | k | linear ms | torch.addmm ms | ratio | select.topk ms | torch.topk ms | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for B, d_in, d_sae, k, mm, tk in rows:
        lines.append(f"| {B:,} | {d_in:,} | {d_sae:,} | {k} | {mm[0] * 1e3:.2f} | {mm[1] * 1e3:.2f} | "
                     f"**{mm[1] / mm[0]:.2f}x** | {tk[0] * 1e3:.2f} | {tk[1] * 1e3:.2f} | **{tk[1] / tk[0]:.2f}x** |")
    lines += ["", f"Wall time of the whole benchmark: {C.elapsed(t_start)}."]
    C.emit(C.machine_lines("Encoder forward kernels vs torch's", "benchmarks/bench_kernels.py",
                           sys.argv[1:] if argv is None else argv, torch.device("cpu"), load_start) + lines, a.out)


if __name__ == "__main__":
    main()
