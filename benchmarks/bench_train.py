"""Benchmark SAE training on one machine: the activation loader, and one training step per arch.

Run: ``python benchmarks/bench_train.py [--quick] [--device auto|cpu|cuda] [--out docs/benchmarks.md]``.
Without ``--out`` it only prints; with it, the markdown section (date, machine, command,
tables) is appended to that file. ``--quick`` shrinks every size so the whole run takes < 1 min.

1. Loader vs plain read. Three stores of the same bfloat16 rows (``_common.make_activations``:
   synthetic residual-stream-like rows, d_model 2304, 131,072 rows = 32 chunks of 4,096; quick:
   32,768 rows), one per codec (none, blosc-lz4, zstd level 1), written with ``StoreWriter``.
   *Plain read*: every chunk read with zarr (``arr[r0:r1]``) and decoded to float32
   (``actcache.dtypes.to_float32``), nothing else (on CUDA, plus a plain ``.to(device)`` per chunk,
   as the loader delivers on the device). *Loader*: a fresh ``ActivationLoader`` (train split,
   ``heldout_chunks=0``, batch 4,096, default shuffle buffer and prefetch) and exactly one epoch of
   ``batches()``, timed from construction to the last batch (the prefetch thread, which has started
   on the next epoch, is joined outside the timing). Both touch the same chunks and deliver the
   same float32 bytes; GB/s = float32 bytes delivered / wall second. Repeats alternate plain and
   loader (plain first on even repeats, loader first on odd); one untimed pass of each first.
   Target: loader >= 0.8x plain for every codec.
2. Training step. For baseline, topk and dyncorr (d_in 2304, d_sae 16,384, k 64, dyncorr with
   k_start = k_end = 64, batch 4,096; quick: d_sae 2,048, batch 1,024) a real ``Trainer`` is built
   on a small store of the same width, each in its own process, and its ``Trainer._step`` (forward,
   backward, decoder-gradient projection, gradient clipping, Adam, decoder renormalisation,
   ``after_step``) is called on batches of the same synthetic rows. One untimed warm-up step each,
   then ``--repeats`` rounds, one step per arch per round, in rotated order (A B C, B C A, ...),
   so load changes hit every arch alike. tokens/s = batch / median step wall time. Peak RSS is the
   process's own peak resident set (``VmHWM``; informative). Target: dyncorr's step within 1.3x of topk's.

Every ratio compares numbers measured side by side in one run. The CPU time of each timing (all
threads of the process) is shown next to the wall time: when other jobs share the cores, wall time
swings while CPU time barely moves, so the CPU-time ratio is the noise-robust cross-check (with
multi-threaded torch ops under contention, CPU time grows too: ``--threads 1`` gives steadier ratios on
a shared machine). The load average at start and end is in the header.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from actcache.dtypes import to_float32  # noqa: E402
from actcache.store import open_store  # noqa: E402
from trainer.loader import ActivationLoader, LoaderConfig  # noqa: E402

CODECS = (("none", "none"), ("blosc-lz4", "blosc-lz4"), ("zstd", "zstd (level 1)"))
LOADER_TARGET = 0.8
DYNCORR_TARGET = 1.3
ARCHS = ("baseline", "topk", "dyncorr")


# -- 1. loader ---------------------------------------------------------------------------------
def plain_read(path: Path, device: torch.device) -> tuple[int, float, float]:
    store = open_store(path)
    arr, lay, logical = store.array(C.HOOK), store.layout, store.logical_dtype
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for c in range(lay.n_chunks):
        r0, r1 = lay.chunk_rows_range(c)
        x = to_float32(arr[r0:r1], logical)
        if device.type == "cuda":
            torch.from_numpy(x).to(device)
        n += x.nbytes
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n, time.perf_counter() - t0, time.process_time() - c0


def loader_read(path: Path, device: torch.device, batch: int) -> tuple[int, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    loader = ActivationLoader(path, C.HOOK, LoaderConfig(batch_size=batch, heldout_chunks=0, seed=0), device=device)
    n_batches = loader.n_rows // batch
    it = loader.batches()
    n = 0
    for _ in range(n_batches):
        b = next(it)
        n += b.numel() * b.element_size()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    it.close()  # joins the prefetch thread (already on the next epoch): not part of one epoch's cost
    return n, wall, cpu


def bench_loader(a, device: torch.device, work: Path) -> tuple[list[str], bool]:
    n_rows = a.loader_rows or (32768 if a.quick else 131072)
    d = a.d_in
    t0 = time.perf_counter()
    x = C.make_activations(n_rows, d, seed=a.seed)
    stores = {}
    for codec, _ in CODECS:
        stores[codec] = C.write_store(work / f"store-{codec}.zarr", x, codec=codec, chunk_rows=a.chunk_rows)
    raw_bf16 = x.size * 2
    del x
    gc.collect()
    print(f"loader stores written ({n_rows:,} rows x {d}) in {C.elapsed(t0)}", file=sys.stderr, flush=True)

    res: dict[str, dict[str, list[tuple[int, float, float]]]] = {c: {"plain": [], "loader": []} for c, _ in CODECS}
    runs = {"plain": lambda p: plain_read(p, device), "loader": lambda p: loader_read(p, device, a.loader_batch)}
    for codec, _ in CODECS:  # untimed pass of each: page cache, allocator, zarr metadata
        for fn in runs.values():
            fn(stores[codec])
    for r in range(a.loader_repeats):
        for codec, _ in CODECS:
            order = ("plain", "loader") if r % 2 == 0 else ("loader", "plain")
            for name in order:
                gc.collect()
                res[codec][name].append(runs[name](stores[codec]))
        print(f"  loader repeat {r + 1}/{a.loader_repeats} done", file=sys.stderr, flush=True)

    lines = [
        f"### Loader vs plain read ({n_rows:,} bf16 rows x {d}, chunks of {a.chunk_rows:,} rows, "
        f"batch {a.loader_batch:,}, median of {a.loader_repeats} alternating repeats)",
        "",
        "| codec | stored MB | compression | plain read GB/s | loader GB/s | loader / plain (wall) "
        "| loader / plain (CPU time) | target | |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    all_ok = True
    for codec, label in CODECS:
        nbytes = res[codec]["plain"][0][0]
        assert all(t[0] == nbytes for v in res[codec].values() for t in v), "plain and loader delivered different sizes"
        pw, lw = C.med(t[1] for t in res[codec]["plain"]), C.med(t[1] for t in res[codec]["loader"])
        pc, lc = C.med(t[2] for t in res[codec]["plain"]), C.med(t[2] for t in res[codec]["loader"])
        ratio, ratio_cpu = pw / lw, pc / lc
        ok = ratio >= LOADER_TARGET
        all_ok &= ok
        stored = C.dir_bytes(stores[codec] / C.HOOK)
        lines.append(f"| {label} | {stored / 1e6:,.0f} | {raw_bf16 / stored:.2f}x | {nbytes / pw / 1e9:.2f} | "
                     f"{nbytes / lw / 1e9:.2f} | **{ratio:.2f}x** | {ratio_cpu:.2f}x | >= {LOADER_TARGET}x | "
                     f"{C.met(ok)} |")
    lines += [
        "",
        "GB/s: float32 bytes delivered (rows x d_model x 4) per wall second. Plain read: zarr `arr[r0:r1]` of every "
        "chunk + `to_float32`. Loader: `ActivationLoader(...).batches()` for one epoch (construction included; "
        "shuffled; memory-mapped chunk files for codec none). CPU-time ratio: CPU seconds of the plain read over "
        "those of the loader (all threads).",
        "",
    ]
    for codec in stores:
        shutil.rmtree(stores[codec], ignore_errors=True)
    return lines, all_ok


# -- 2. training step ----------------------------------------------------------------------------
def bench_step(a, device: torch.device, work: Path) -> tuple[list[str], bool]:
    d_in, d_sae, k, B = a.d_in, a.d_sae or (2048 if a.quick else 16384), a.k, a.batch or (1024 if a.quick else 4096)
    t0 = time.perf_counter()
    x = C.make_activations(a.n_batches * B, d_in, seed=a.seed + 1)
    batches = work / "batches.npy"
    np.save(batches, x.reshape(a.n_batches, B, d_in))
    store = C.write_store(work / "step-store.zarr", x[: 2 * B], codec="none", logical_dtype="float32", chunk_rows=B)
    del x
    print(f"training data written in {C.elapsed(t0)}; starting workers", file=sys.stderr, flush=True)
    workers: dict[str, C.StepWorker] = {}
    try:
        for arch in a.archs:
            params = {"device": str(device), "threads": a.threads, "repo": str(C.REPO), "store": str(store),
                      "out": str(work / f"run-{arch}"), "arch": arch, "d_sae": d_sae, "k": k, "batch": B, "batches": str(batches)}
            workers[arch] = C.StepWorker(arch, sys.executable, C.OURS_WORKER, params)
        res = C.timed_rounds(workers, a.repeats, warmup=1)
    finally:
        for w in workers.values():
            w.close()
    lines = [
        f"### Training step (`Trainer._step`): d_in {d_in}, d_sae {d_sae:,}, k {k} (dyncorr k_start = k_end = {k}), "
        f"batch {B:,}; {next(iter(workers.values())).info.get('threads')} torch threads per process; "
        f"1 warm-up step, median of {a.repeats} rotated rounds",
        "",
        "| arch | tokens/s | step wall s (median) | step CPU s (median) | wall s of each step | peak RSS MB |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    wall = {n: C.med(t["wall"] for t in res[n]) for n in res}
    cpu = {n: C.med(t["cpu"] for t in res[n]) for n in res}
    skipped = [n for n in res if any(t.get("skipped") for t in res[n])]
    for n in res:
        each = ", ".join(f"{t['wall']:.2f}" for t in res[n])
        lines.append(f"| {n} | {B / wall[n]:,.0f} | {wall[n]:.3f} | {cpu[n]:.3f} | {each} | {C.peak_mb(workers[n])} |")
    lines.append("")
    ok = True
    if "topk" in wall and "dyncorr" in wall:
        r, rc = wall["dyncorr"] / wall["topk"], cpu["dyncorr"] / cpu["topk"]
        ok = r <= DYNCORR_TARGET
        lines.append(f"dyncorr / topk step time: **{r:.2f}x** wall ({rc:.2f}x CPU time); target <= {DYNCORR_TARGET}x"
                     + ("" if (d_sae, B) == (16384, 4096) else " (defined at d_sae 16,384, batch 4,096)")
                     + f": **{C.met(ok)}**.")
    if skipped:
        lines.append(f"WARNING: non-finite (skipped) steps in {', '.join(skipped)}: their timings are not of a full step.")
    lines += ["", "Peak RSS: `VmHWM` of each arch's own process (Python + torch + the Trainer, its store "
              "and the batches); informative only.", ""]
    return lines, ok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: the whole run in < 1 min")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=None, help="default 16384 (quick: 2048)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=None, help="training batch, default 4096 (quick: 1024)")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--repeats", type=int, default=None, help="timed training rounds, default 5 (quick: 3)")
    ap.add_argument("--n-batches", type=int, default=4, help="distinct training batches, cycled")
    ap.add_argument("--loader-rows", type=int, default=None, help="rows per store, default 131072 (quick: 32768)")
    ap.add_argument("--loader-batch", type=int, default=4096)
    ap.add_argument("--loader-repeats", type=int, default=None, help="default 5 (quick: 3)")
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every process (default: torch's own choice, one per core)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary stores go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (3 if a.quick else 5)
    a.loader_repeats = a.loader_repeats or (3 if a.quick else 5)
    device = C.resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    load_start = C.loadavg()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=a.workdir))
    body: list[str] = []
    try:
        if not a.skip_loader:
            lines, _ = bench_loader(a, device, work)
            body += lines
        if not a.skip_step:
            lines, _ = bench_step(a, device, work)
            body += lines
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body.append(f"Wall time of the whole benchmark: {C.elapsed(t0)}.")
    argv_used = sys.argv[1:] if argv is None else argv
    C.emit(C.machine_lines("SAE training: loader and step throughput", "benchmarks/bench_train.py", argv_used,
                           device, load_start) + body, a.out)


if __name__ == "__main__":
    main()
