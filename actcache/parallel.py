"""Extraction on a dask.distributed cluster: a LocalCluster or an existing scheduler.

The coordinator tokenises and lays out the store; workers each load the model once, take
contiguous, chunk-aligned ranges of pending chunks and write them straight into the shared
store. Chunks are computed exactly as in a single process, so the store is the same.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from actcache.config import ExtractConfig
from actcache.hooks import parse_hooks

_TASKS_PER_WORKER = 4  # more, smaller tasks: steadier progress and load balance


@functools.lru_cache(maxsize=2)
def _worker_model(model: str, gguf_file: str | None, dtype: str, compute_dtype: str, device: str,
                  keep_layers: int):
    from actcache.device import resolve_compute_dtype, resolve_device
    from actcache.dtypes import torch_dtype
    from actcache.models import load_model

    dev = resolve_device(device)
    compute = resolve_compute_dtype(compute_dtype, dtype, dev)
    return load_model(model, gguf_file=gguf_file, dtype=torch_dtype(compute), device=dev, keep_layers=keep_layers)


def _work(store: str, cfg: dict[str, Any], chunks: list[int], threads: int) -> int:
    import torch

    from actcache.runner import run_chunks
    from actcache.store_writer import StoreWriter

    if threads > 0:
        torch.set_num_threads(threads)
    c = ExtractConfig.from_dict(cfg)
    specs = parse_hooks(list(c.hooks))
    lm = _worker_model(c.model, c.gguf_file, c.dtype, c.compute_dtype, c.device, max(s.layer for s in specs) + 1)
    writer = StoreWriter(store)
    run_chunks(writer, lm.model, specs, chunks, batch_size=c.batch_size, queue_depth=c.queue_depth,
               writer_threads=c.writer_threads)
    return sum(writer.layout.chunk_rows_range(i)[1] - writer.layout.chunk_rows_range(i)[0] for i in chunks)


def split_ranges(chunks: list[int], n_tasks: int) -> list[list[int]]:
    """Contiguous, near-equal groups of chunk ids, in order."""
    n_tasks = max(1, min(n_tasks, len(chunks)))
    size, extra = divmod(len(chunks), n_tasks)
    out, i = [], 0
    for t in range(n_tasks):
        j = i + size + (1 if t < extra else 0)
        out.append(chunks[i:j])
        i = j
    return [g for g in out if g]


def run_distributed(
    store: str,
    cfg: ExtractConfig,
    chunks: list[int],
    *,
    workers: int = 0,
    scheduler: str | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> None:
    """Compute ``chunks`` on dask workers; ``workers`` starts a LocalCluster of that size."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or workers)
        threads = 0 if scheduler else max(1, (os.cpu_count() or 1) // n_workers)
        groups = split_ranges(chunks, n_workers * _TASKS_PER_WORKER)
        futures = [client.submit(_work, store, cfg.to_dict(), g, threads, pure=False) for g in groups]
        for fut in as_completed(futures):
            rows = fut.result()
            if on_rows:
                on_rows(rows)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
