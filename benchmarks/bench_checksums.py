"""Benchmark the cost of per-chunk checksums: loader throughput with crc32c vs without, per codec.

Run: ``python benchmarks/bench_checksums.py [--quick] [--out docs/benchmarks.md]``.
Without ``--out`` it only prints; with it, the markdown section is appended to that file.

For each codec (none, blosc-lz4, zstd level 1) two stores of the *same* bfloat16 rows
(``_common.make_activations``; d_model 2304, 131,072 rows = 32 chunks of 4,096; quick: 32,768 rows)
are written with ``StoreWriter``: one as this version writes every store (zarr's ``crc32c`` codec
last in each array's chain, format 2), one with the crc32c codec left out (what a format-1 store
holds; for codec none its chunk files are raw, so the loader memory-maps them). Each timing is one
epoch of a fresh ``ActivationLoader`` (train split, ``heldout_chunks=0``, batch 4,096, default
shuffle buffer and prefetch), construction included, the prefetch thread joined outside the timing.
Repeats alternate the two stores of a codec (with first on even repeats, without first on odd),
after one untimed pass of each. GB/s = float32 bytes delivered / wall second.
Target: with / without >= 0.9x for every codec.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import _common as C  # noqa: E402  (puts the repository on sys.path)

from actcache import store_writer  # noqa: E402
from trainer.loader import ActivationLoader, LoaderConfig  # noqa: E402

CODECS = [("none", "none"), ("blosc-lz4", "blosc-lz4"), ("zstd", "zstd-1")]
TARGET = 0.9


@contextmanager
def without_checksums() -> Iterator[None]:
    """Write stores as before checksums: the same codec chains with crc32c left out."""
    saved = store_writer.with_checksum, store_writer._SMALL_ARRAYS
    store_writer.with_checksum = lambda compressors: tuple(compressors or ())
    store_writer._SMALL_ARRAYS = saved[1][:-1]
    try:
        yield
    finally:
        store_writer.with_checksum, store_writer._SMALL_ARRAYS = saved


def loader_epoch(path: Path, batch: int) -> tuple[int, float, float, bool]:
    t0, c0 = time.perf_counter(), time.process_time()
    loader = ActivationLoader(path, C.HOOK, LoaderConfig(batch_size=batch, heldout_chunks=0, seed=0))
    it = loader.batches()
    n = 0
    for _ in range(loader.n_rows // batch):
        b = next(it)
        n += b.numel() * b.element_size()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    it.close()
    return n, wall, cpu, loader.uses_memmap


def run(a) -> list[str]:
    n_rows = a.rows or (32768 if a.quick else 131072)
    x = C.make_activations(n_rows, a.d_in, seed=a.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-checksums-", dir=a.workdir))
    try:
        stores: dict[tuple[str, str], Path] = {}
        for codec, _ in CODECS:
            stores[codec, "with"] = C.write_store(work / f"{codec}-crc.zarr", x, codec=codec, chunk_rows=a.chunk_rows)
            with without_checksums():
                stores[codec, "without"] = C.write_store(work / f"{codec}-plain.zarr", x, codec=codec,
                                                         chunk_rows=a.chunk_rows)
        del x
        gc.collect()
        res: dict[tuple[str, str], list[tuple[int, float, float, bool]]] = {k: [] for k in stores}
        for key, path in stores.items():  # untimed: page cache, allocator, zarr metadata
            loader_epoch(path, a.batch)
        for r in range(a.repeats):
            for codec, _ in CODECS:
                for kind in (("with", "without") if r % 2 == 0 else ("without", "with")):
                    gc.collect()
                    res[codec, kind].append(loader_epoch(stores[codec, kind], a.batch))
            print(f"  repeat {r + 1}/{a.repeats} done", file=sys.stderr, flush=True)
        lines = [
            f"### Loader with vs without crc32c checksums ({n_rows:,} bf16 rows x {a.d_in}, chunks of "
            f"{a.chunk_rows:,} rows, batch {a.batch:,}, median of {a.repeats} alternating repeats)",
            "",
            "| codec | stored MB with / without | loader GB/s without | loader GB/s with | with / without (wall) "
            "| with / without (CPU time) | target | |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for codec, label in CODECS:
            w, wo = res[codec, "with"], res[codec, "without"]
            nbytes = w[0][0]
            assert all(t[0] == nbytes for t in w + wo), "the two stores delivered different sizes"
            ww, wow = C.med(t[1] for t in w), C.med(t[1] for t in wo)
            wc, woc = C.med(t[2] for t in w), C.med(t[2] for t in wo)
            ratio = wow / ww
            mm = [" (memory-mapped)" if t[0][3] else "" for t in (wo, w)]
            lines.append(f"| {label} | {C.dir_bytes(stores[codec, 'with'] / C.HOOK) / 1e6:,.1f} / "
                         f"{C.dir_bytes(stores[codec, 'without'] / C.HOOK) / 1e6:,.1f} | {nbytes / wow / 1e9:.2f}{mm[0]} | "
                         f"{nbytes / ww / 1e9:.2f}{mm[1]} | **{ratio:.2f}x** | {woc / wc:.2f}x | >= {TARGET}x | "
                         f"{C.met(ratio >= TARGET)} |")
        lines += [
            "",
            "Both stores of a codec hold the same rows; \"with\" is what `actcache extract` writes (zarr's `crc32c` "
            "codec last in every array's chain: 4 bytes per chunk, checked on every read), \"without\" leaves the "
            "codec out (format 1). Loader: `ActivationLoader(...).batches()` for one epoch, construction included; "
            "for codec none both are memory-mapped, \"with\" computing each chunk's crc32c (google-crc32c) on a checker "
            "thread while the chunk is copied, and verifying it before the group is handed out (the crc holds the GIL, "
            "numpy's copy does not, so the two overlap on 2 cores). Codecs blosc-lz4 and zstd: zarr checks the crc "
            "of the compressed bytes in its codec pipeline. CPU-time ratio: CPU seconds without over with (all threads). Wall times swing with other jobs' "
            "load (load average in the header); the ratios compare runs alternated side by side.",
            "",
        ]
        return lines
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: the whole run in < 1 min")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    ap.add_argument("--rows", type=int, default=None, help="rows per store, default 131072 (quick: 32768)")
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=None, help="default 9 (quick: 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary stores go")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (3 if a.quick else 9)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    load_start = C.loadavg()
    t0 = time.perf_counter()
    body = run(a)
    body.append(f"Wall time of the whole benchmark: {C.elapsed(t0)}.")
    argv_used = sys.argv[1:] if argv is None else argv
    C.emit(C.machine_lines("Checksums: loader throughput with vs without crc32c", "benchmarks/bench_checksums.py",
                           argv_used, device, load_start) + body, a.out)


if __name__ == "__main__":
    main()
