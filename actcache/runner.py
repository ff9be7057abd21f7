"""Compute store chunks: forward passes on the main thread, writes on background threads.

The queue between them is bounded, so peak memory is about ``queue_depth + writer_threads + 1``
chunks of activations whatever ``n_tokens`` is, and the forward pass never waits on compression
or disk unless the writers fall a whole queue behind.

Several writer threads scale with cores because the heavy work (zstd / blosc encoding, the
statistics' numpy reductions, file writes) releases the GIL. Each thread writes whole chunks,
each in the commit order of ``StoreWriter.write_chunk`` (data, statistics, manifest entry), so
chunks may commit out of order but never one before its own data: ``--resume`` stays exact, and
the bytes of every object do not depend on the number of threads.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable

import numpy as np
import torch

from actcache.capture import ResidualCapture
from actcache.dtypes import storage_dtype, to_storage, torch_dtype
from actcache.errors import ActcacheError
from actcache.hooks import HookSpec
from actcache.store_writer import StoreWriter

ChunkCallback = Callable[[int, int], None]  # (chunk index, rows written)
_DONE = object()


def default_writer_threads() -> int:
    """Writer threads when none are asked for: one per core, up to 4 (the forward pass needs the rest)."""
    return max(1, min(4, os.cpu_count() or 1))


class BackgroundWriter:
    """Threads draining a bounded queue of computed chunks into the store, one whole chunk each."""

    def __init__(self, writer: StoreWriter, depth: int, on_written: ChunkCallback | None = None,
                 threads: int = 1):
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._on_written = on_written
        self._callback_lock = threading.Lock()  # progress bars are not thread-safe
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._loop, name=f"actcache-writer-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is not None:
                continue  # keep draining so put() never blocks forever
            chunk, acts, rows = item
            try:
                self._writer.write_chunk(chunk, acts)
                if self._on_written:
                    with self._callback_lock:
                        self._on_written(chunk, rows)
            except BaseException as e:  # re-raised on the main thread
                self._error = e

    def put(self, chunk: int, acts: dict[str, np.ndarray], rows: int) -> None:
        self._raise_if_failed()
        self._queue.put((chunk, acts, rows))

    def close(self) -> None:
        """Write everything queued, stop the threads, surface any write error."""
        for _ in self._threads:
            self._queue.put(_DONE)
        for t in self._threads:
            t.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def compute_chunk(
    capture: ResidualCapture,
    windows: np.ndarray,
    *,
    hooks: list[str],
    first_position: int,
    batch_size: int,
    logical_dtype: str,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Activations of one chunk's windows, as (rows, d_model) arrays in the storage dtype."""
    n, ctx = windows.shape
    rows_per_window = ctx - first_position
    out: dict[str, np.ndarray] = {}
    for b0 in range(0, n, batch_size):
        b1 = min(b0 + batch_size, n)
        ids = torch.from_numpy(windows[b0:b1].astype(np.int64)).to(device)
        acts = capture.run(ids)
        for h in hooks:
            a = acts[h][:, first_position:, :]
            if h not in out:
                out[h] = np.empty((n * rows_per_window, a.shape[-1]), dtype=storage_dtype(logical_dtype))
            # The model may compute in a wider dtype than it stores (see resolve_compute_dtype).
            a = a.reshape(-1, a.shape[-1])
            stored = a.to(torch_dtype(logical_dtype))
            check_finite(h, a, stored, logical_dtype)
            out[h][b0 * rows_per_window : b1 * rows_per_window] = to_storage(stored)
    return out


def check_finite(hook: str, computed: torch.Tensor, stored: torch.Tensor, logical_dtype: str) -> None:
    """Refuse to store inf / NaN: an activation beyond the storage dtype's range (float16 tops
    out at 65504; Gemma-2's residual stream can exceed it) or a non-finite one from the model.
    Raised before the chunk is queued, so the chunks already written stay valid."""
    if bool(torch.isfinite(stored).all()):
        return
    if bool(torch.isfinite(computed).all()):
        peak = float(computed.abs().max())
        raise ActcacheError(f"{hook}: activations reach {peak:.4g}, beyond {logical_dtype}'s range: "
                            f"use --dtype bfloat16 or float32 (with --overwrite for this store)")
    raise ActcacheError(f"{hook}: the model produced non-finite activations (inf or NaN): try "
                        f"--compute-dtype float32")


def run_chunks(
    writer: StoreWriter,
    model: torch.nn.Module,
    specs: list[HookSpec],
    chunks: list[int],
    *,
    batch_size: int,
    queue_depth: int = 2,
    writer_threads: int = 0,
    on_written: ChunkCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Compute and write ``chunks`` (``writer_threads`` 0: ``default_writer_threads()``);
    ``should_stop`` is polled between chunks, and on a stop (or an interrupt) the chunks already
    queued are still written before KeyboardInterrupt."""
    device = next(model.parameters()).device
    lay = writer.layout
    bg = BackgroundWriter(writer, queue_depth, on_written, writer_threads or default_writer_threads())
    try:
        with ResidualCapture(model, specs) as cap:
            for c in chunks:
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                acts = compute_chunk(cap, writer.read_windows(c), hooks=[s.name for s in specs],
                                     first_position=lay.first_position, batch_size=batch_size,
                                     logical_dtype=writer.logical_dtype, device=device)
                r0, r1 = lay.chunk_rows_range(c)
                bg.put(c, acts, r1 - r0)
    finally:
        bg.close()
