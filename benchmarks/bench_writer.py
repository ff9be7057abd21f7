"""Benchmark the extraction writer alone: 1 vs N writer threads, per codec, and an identical store.

Run: ``python benchmarks/bench_writer.py --out docs/benchmarks.md [--threads 2] [--quick]``.

No model: bfloat16 activation chunks (``_common.make_activations``, d_in 2304 like Gemma-2-2B,
4096 rows per chunk) are computed once, then fed through ``runner.BackgroundWriter`` (what
``run_chunks`` hands its chunks to) into a fresh ``StoreWriter.create`` store per run: zarr chunk
encoding + crc32c, per-chunk statistics, manifest entries. Store creation is not timed; the
timed span is the first ``put`` to the end of ``close``. Thread counts alternate (1 N, N 1, ...)
and medians are reported, so every ratio compares runs made side by side. Each timing records
wall time and the process's CPU time: tokens per CPU second at 1 thread is the per-core rate,
from which the cores needed for a GPU node's forward rate follow. After the timings, the stores
written with 1 and N threads are compared object by object (every file but the root
``zarr.json``, whose timestamps differ).

Two sinks: a local directory, and ``memory://`` (fsspec's in-process store), which leaves out the
filesystem and so shows how the writer's own work (encoding, checksums, statistics) scales. A
calibration row times plain 19 MB file writes (open, write, rename; no zarr) at 1 and N threads:
what the disk itself allows.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CTX, HOOK, loadavg, machine_lines, make_activations, med, rounds  # noqa: E402

from actcache.dtypes import to_storage  # noqa: E402
from actcache.runner import BackgroundWriter  # noqa: E402
from actcache.store import Layout  # noqa: E402
from actcache.store_writer import StoreWriter  # noqa: E402
from actcache.urls import StoreLocation  # noqa: E402

D_IN = 2304  # Gemma-2-2B
CHUNK_ROWS = 4096
GPU_TOKENS_PER_S = 400_000  # Gemma-2-2B truncated at layer 5 on one GPU (issue 15)
CODECS = ("zstd", "blosc-lz4", "none")


def make_chunks(n: int) -> list[np.ndarray]:
    x = make_activations(n * CHUNK_ROWS, D_IN, seed=0)
    bf16 = to_storage(torch.from_numpy(x).to(torch.bfloat16))
    return [bf16[i * CHUNK_ROWS:(i + 1) * CHUNK_ROWS].copy() for i in range(n)]


def new_store(path: Path | StoreLocation, codec: str, n_chunks: int) -> StoreWriter:
    n_windows = n_chunks * CHUNK_ROWS // CTX
    layout = Layout(n_windows, CTX, False, CHUNK_ROWS // CTX)
    attrs = {"model": {"id": "synthetic"}, "context_size": CTX, "prepend_bos": False, "exclude_bos": False,
             "seed": 0, "dataset": {"path": "synthetic"}, "extract_config": {}}
    return StoreWriter.create(path, attrs=attrs, layout=layout, hooks=[HOOK], d_model=D_IN,
                              logical_dtype="bfloat16", codec=codec,
                              windows=np.zeros((n_windows, CTX), np.int32), window_source=np.arange(n_windows))


def timed_write(writer: StoreWriter, chunks: list[np.ndarray], n_chunks: int, threads: int,
                depth: int) -> tuple[float, float]:
    """Wall and process CPU seconds to write ``n_chunks`` chunks (cycling through ``chunks``)."""
    t0, c0 = time.perf_counter(), time.process_time()
    bg = BackgroundWriter(writer, depth, threads=threads)
    try:
        for c in range(n_chunks):
            bg.put(c, {HOOK: chunks[c % len(chunks)]}, CHUNK_ROWS)
    finally:
        bg.close()
    return time.perf_counter() - t0, time.process_time() - c0


def file_writes(data: bytes, n_files: int, threads: int, tmp: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``n_files`` atomic writes of ``data`` (temp + rename) on ``threads`` threads."""
    names = iter(range(n_files))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(names, None)
            if i is None:
                return
            p = tmp / f"cal-{i}"
            with open(f"{p}.tmp", "wb") as f:
                f.write(data)
            os.replace(f"{p}.tmp", p)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, time.process_time() - c0


def store_objects(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.relative_to(path) != Path("zarr.json")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="markdown file to append the section to")
    ap.add_argument("--threads", type=int, default=2, help="writer threads compared with 1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=16, help="4096-row chunks written per run")
    ap.add_argument("--distinct", type=int, default=8, help="distinct chunks of activations, cycled")
    ap.add_argument("--tmp", type=Path, default=None, help="directory for the stores (default: system temp)")
    ap.add_argument("--quick", action="store_true", help="3 repeats of 8 chunks: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.chunks, args.distinct = 3, 8, 4
    load_start = loadavg()
    console = Console()
    chunks = make_chunks(args.distinct)
    variants = [1, args.threads]
    depth = 2 * args.threads  # the same bounded queue for both: only the thread count differs
    tokens = args.chunks * CHUNK_ROWS
    sinks = ("disk", "memory")
    results: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    identical: dict[str, bool] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-writer-", dir=args.tmp))
    counter = itertools.count()
    try:
        for sink, codec in itertools.product(sinks, CODECS):
            kept: dict[int, Path] = {}
            for order in rounds(variants, args.repeats):
                for t in order:
                    i = next(counter)
                    where = tmp / f"{i}.zarr" if sink == "disk" else StoreLocation(f"memory://bench-writer/{i}")
                    writer = new_store(where, codec, args.chunks)
                    results.setdefault((sink, codec, t), []).append(
                        timed_write(writer, chunks, args.chunks, t, depth))
                    if sink == "memory":
                        fsspec.filesystem("memory").rm(f"/bench-writer/{i}", recursive=True)
                    elif t in kept:
                        shutil.rmtree(where)
                    else:
                        kept[t] = where
            if sink == "disk":
                identical[codec] = store_objects(kept[1]) == store_objects(kept[args.threads])
                for p in kept.values():
                    shutil.rmtree(p)
        raw = chunks[0].tobytes()
        for order in rounds(variants, args.repeats):
            for t in order:
                results.setdefault(("disk", "plain file writes", t), []).append(
                    file_writes(raw, args.chunks, t, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = Table(title=f"writer alone, {tokens} tokens per run, d_in {D_IN} bfloat16")
    cols = ["sink", "codec", "threads", "wall s", "tokens/s", "CPU s", "tokens per CPU s", "speed-up (wall)",
            "goal", "store identical to 1 thread", "cores for 400k tok/s"]
    for col in cols:
        table.add_column(col)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for sink, codec in [*itertools.product(sinks, CODECS), ("disk", "plain file writes")]:
        calibration = codec == "plain file writes"
        base = med(w for w, _ in results[(sink, codec, 1)])
        per_core = tokens / med(c for _, c in results[(sink, codec, 1)])
        for t in variants:
            wall = med(w for w, _ in results[(sink, codec, t)])
            cpu = med(c for _, c in results[(sink, codec, t)])
            speedup = base / wall
            row = [sink, codec, str(t), f"{wall:.3f}", f"{tokens / wall:,.0f}", f"{cpu:.3f}", f"{tokens / cpu:,.0f}",
                   f"{speedup:.2f}x", "" if t == 1 or calibration else ("met" if speedup >= 1.8 else "NOT met"),
                   "" if t == 1 or sink != "disk" or calibration else ("yes" if identical[codec] else "NO"),
                   "" if t != 1 or calibration else str(math.ceil(GPU_TOKENS_PER_S / per_core))]
            table.add_row(*row)
            md.append("| " + " | ".join(row) + " |")
    console.print(table)

    gb_s = GPU_TOKENS_PER_S * D_IN * 2 / 1e9
    zstd_per_core = tokens / med(c for _, c in results[("disk", "zstd", 1)])
    zstd_eff = (med(w for w, _ in results[("disk", "zstd", 1)])
                / med(w for w, _ in results[("disk", "zstd", args.threads)])) / args.threads
    cores_at_measured = math.ceil(GPU_TOKENS_PER_S / (zstd_per_core * zstd_eff))
    lines = machine_lines("Extraction writer alone: 1 vs N writer threads", "benchmarks/bench_writer.py",
                          sys.argv[1:] if argv is None else argv, torch.device("cpu"), load_start)
    lines += [
        f"Writer alone (no model): {args.chunks} chunks of {CHUNK_ROWS} rows x {D_IN} bfloat16 "
        f"({args.distinct} distinct chunks of `make_activations` rows, cycled) through "
        f"`runner.BackgroundWriter` into a fresh store per run (encode + crc32c, statistics, manifest), "
        f"queue depth {depth}; medians of {args.repeats} alternating runs per thread count.",
        "",
        *md,
        "",
        f"Cores needed to keep up with {GPU_TOKENS_PER_S:,} tokens/s ({gb_s:.2f} GB/s of bf16 at d {D_IN}): "
        f"{GPU_TOKENS_PER_S:,} / (tokens per CPU second at 1 thread), rounded up, in the last column; "
        f"a lower bound that assumes linear scaling with `--writer-threads`. At the 2-thread efficiency "
        f"measured here (speed-up / {args.threads}), disk + zstd needs "
        f"{cores_at_measured:.0f} cores, if that efficiency held at more threads (a serial part caps it).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n" + text + "\n")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
