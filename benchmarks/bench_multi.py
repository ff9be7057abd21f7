"""Benchmark several SAEs from one read of the store vs one run each (``sae train --sweep``).

Run: ``python benchmarks/bench_multi.py [--quick] [--device auto|cpu|cuda] [--out docs/benchmarks.md]``.

One zstd-compressed bfloat16 store (``_common.make_activations``: d_model 768, ``--rows`` 32,768 =
8 chunks of 4,096 by default; quick: 16,384 rows) and N TopK SAEs of a d_sae sweep (default 1024, 2048, 4096;
k 32; batch 4,096; one epoch each, held-out chunk 1). *Separate*: ``trainer.train.train`` once per
SAE, one after the other (each run reads and decodes the store itself). *Together*:
``trainer.multi.train_many`` on the same configs (one loader, each batch handed to every SAE).
Both are timed end to end (construction, training, held-out evaluation, export) in this process,
alternating which goes first over ``--repeats`` rounds, after one untimed warm-up run. tokens/s =
N x training tokens / wall seconds. The read share: one epoch of the loader alone (``batches()``,
nothing trained), timed the same way, over the separate runs' wall time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from trainer.config import RunConfig  # noqa: E402
from trainer.loader import ActivationLoader, LoaderConfig  # noqa: E402
from trainer.multi import expand_runs, train_many  # noqa: E402
from trainer.train import train  # noqa: E402

D_IN, BATCH, K = 768, 4096, 32


def configs(store: Path, out: Path, sweep: str, device: str) -> list[RunConfig]:
    base = dict(store=str(store), out=str(out), arch="topk", k=K, batch_size=BATCH, epochs=1, lr=1e-3,
                device=device, log_every=1000, checkpoint_every=100_000, seed=0, heldout_chunks=1)
    return expand_runs([base], [f"d_sae={sweep}"])


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def read_only(store: Path, device: torch.device) -> None:
    loader = ActivationLoader(store, C.HOOK, LoaderConfig(batch_size=BATCH, heldout_chunks=1), device=device)
    for _ in loader.batches(loader.n_rows // BATCH):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--d-sae", default="1024,2048,4096", help="the sweep: comma-separated d_sae values")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--rows", type=int, default=32_768, help="store rows (chunks of 4,096; the last is held out)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: no OpenMP spin-waiting when other jobs share the cores)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    load0, t_all = C.loadavg(), time.perf_counter()
    device = C.resolve_device(args.device)
    torch.set_num_threads(args.threads)
    rows = 16_384 if args.quick else args.rows
    tmp = Path(tempfile.mkdtemp(prefix="bench-multi-"))
    try:
        store = C.write_store(tmp / "s.zarr", C.make_activations(rows, D_IN), codec="zstd")
        n_sae = len(args.d_sae.split(","))
        runs = {"separate": lambda out: [train(c) for c in configs(store, out, args.d_sae, device.type)],
                "together": lambda out: train_many(configs(store, out, args.d_sae, device.type))}
        runs["separate"](tmp / "warm")  # untimed: thread pools, lazy kernels, page cache
        walls: dict[str, list[tuple[float, float]]] = {"separate": [], "together": [], "read": []}
        for r in range(args.repeats):
            for name in (("separate", "together") if r % 2 == 0 else ("together", "separate")):
                out = tmp / f"{name}-{r}"
                walls[name].append(timed(lambda: runs[name](out)))
                shutil.rmtree(out)
            walls["read"].append(timed(lambda: read_only(store, device)))
        steps = (rows - 4096) // BATCH  # one held-out chunk of 4,096 rows
        tokens = n_sae * steps * BATCH
        med = {k: (C.med(w for w, _ in v), C.med(c for _, c in v)) for k, v in walls.items()}
        sep, tog, rd = med["separate"], med["together"], med["read"]
        lines = C.machine_lines("Several SAEs from one read (sae train --sweep)", "benchmarks/bench_multi.py",
                                sys.argv[1:], device, load0)
        lines += [f"### {n_sae} TopK SAEs (d_sae {args.d_sae}, k {K}), d_in {D_IN}, batch {BATCH:,}, one epoch of "
                  f"{rows - 4096:,} rows (zstd bf16 store, {rows // 4096} chunks); median of {args.repeats} "
                  "alternating repeats", "",
                  "| mode | wall s | CPU s | tokens/s (all SAEs) | tokens per CPU s | speed-up (wall) | "
                  "speed-up (CPU time) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {n_sae} separate runs | {sep[0]:.1f} | {sep[1]:.1f} | {tokens / sep[0]:,.0f} | "
                  f"{tokens / sep[1]:,.0f} | 1.00x | 1.00x |",
                  f"| one read, {n_sae} SAEs | {tog[0]:.1f} | {tog[1]:.1f} | {tokens / tog[0]:,.0f} | "
                  f"{tokens / tog[1]:,.0f} | **{sep[0] / tog[0]:.2f}x** | **{sep[1] / tog[1]:.2f}x** |", "",
                  f"One epoch of the loader alone (read + decode + shuffle, nothing trained): {rd[0]:.2f} s wall, "
                  f"{rd[1]:.2f} s CPU, i.e. {n_sae} x {rd[1]:.2f} s = {100 * n_sae * rd[1] / sep[1]:.0f}% of the "
                  f"separate runs' CPU time, of which one read saves {n_sae - 1} x. Both modes include construction, "
                  "held-out evaluation and the SAELens export of every run. The saving is the read's share of the "
                  "work: small on a CPU, where the SAE steps dominate, larger where steps are cheap relative to "
                  "reading (GPUs, small SAEs, compressed stores). Wall times swing with other jobs' load (load "
                  "average in the header); CPU time is the steadier measure.", "",
                  f"Wall time of the whole benchmark: {C.elapsed(t_all)}."]
        C.emit(lines, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
