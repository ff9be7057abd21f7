"""Shuffled activation batches for SAE training, read from an actcache store.

Reads are whole store chunks only: gathering random rows from compressed chunks is ~50x
slower (docs/store-format.md). Shuffling is two-level: a seeded chunk order per epoch,
then a seeded row permutation inside each *group* of chunks that fits in half the shuffle
buffer. Extraction already shuffled windows across chunks, so this is enough mixing.

The row stream is infinite and deterministic given (seed, store): epoch after epoch, group
after group. Batches are consecutive ``batch_size`` slices of it, so a batch may span two
groups or two epochs and no row is ever dropped. A position in the stream is just
(epoch, rows consumed in that epoch); a resume recomputes which group holds that row and
re-reads only that group. Memory: at most two groups (together <= the shuffle buffer) and
one batch are alive, whatever the store's size.
"""

from __future__ import annotations

import bisect
import logging
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from zarr.codecs import BytesCodec

from actcache.dtypes import storage_dtype, to_float32
from actcache.errors import ActcacheError
from actcache.store import ActivationStore, open_store

log = logging.getLogger(__name__)

NORMALIZE = ("none", "expected_average_only_in")
SPLITS = ("train", "heldout")
STATE_VERSION = 1
PREFETCH_THREAD = "actcache-loader-prefetch"
_POLL_S = 0.05  # how often a blocked prefetch thread checks whether the consumer has gone
_END = object()  # end of the (heldout) group stream


@dataclass(frozen=True)
class LoaderConfig:
    """How the trainer reads a store. ``prefetch``, ``memmap`` and ``normalize`` never change the row order."""

    batch_size: int = 4096
    """Rows per batch."""
    shuffle_buffer_mb: float = 256
    """RAM for shuffling, in MiB of float32 rows; bounds RSS. A group fills half, the prefetched next group the other."""
    heldout_chunks: int = 1
    """The last n chunks of the store: never trained on, used for evaluation (split="heldout")."""
    prefetch: bool = True
    """Read/decode/permute the next group on a background thread while the current one is consumed."""
    normalize: str = "none"
    """"none", or "expected_average_only_in" (SAELens' name): scale so E||x|| = sqrt(d_in), per the store's stats."""
    seed: int = 0
    """Seeds the chunk order of every epoch and the row permutation of every group."""
    memmap: bool = True
    """Memory-map chunk files of uncompressed stores (codec "none"); False forces zarr reads."""


@dataclass
class _Group:
    epoch: int
    start: int  # offset in the epoch of rows[0]
    rows: torch.Tensor  # float32 (n, d_in), permuted and scaled; may be the tail of the buffer
    held: int  # rows of the whole buffer, for the memory accounting


class ActivationLoader:
    """Batches of one hook of a store: ``split="train"`` shuffled forever, ``"heldout"`` one ordered pass."""

    def __init__(self, store: str | Path | ActivationStore, hook: str, cfg: LoaderConfig, *,
                 device: str | torch.device = "cpu", split: str = "train", rank: int = 0, world_size: int = 1):
        self.store = store if isinstance(store, ActivationStore) else open_store(store)
        self.hook, self.cfg, self.split = hook, cfg, split
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self._array = self.store.array(hook)  # ActcacheError for an unknown hook
        self._layout = self.store.layout
        self._logical = self.store.logical_dtype
        self.d_in: int = self.store.d_model
        n_chunks = self.store.n_chunks
        _validate(cfg, split, rank, world_size, n_chunks)
        self._n_train = n_chunks - cfg.heldout_chunks
        self._heldout = list(range(self._n_train, n_chunks))[rank::world_size]
        chunk_rows = self._layout.chunk_rows
        buffer_rows = int(cfg.shuffle_buffer_mb * 2**20) // (4 * self.d_in)
        self.group_chunks: int = max(1, buffer_rows // 2 // chunk_rows)
        if 2 * chunk_rows > buffer_rows:
            log.warning("shuffle buffer of %s MiB holds fewer than 2 chunks of %d rows: using 1 chunk per group, "
                        "memory will exceed the buffer", cfg.shuffle_buffer_mb, chunk_rows)
        # Loader-owned rows never exceed this: the group being consumed, the one being prefetched, one batch.
        self.rows_bound: int = (2 if cfg.prefetch else 1) * self.group_chunks * chunk_rows + cfg.batch_size
        self.scaling_factor: float = self._scaling()
        enc = self._array.metadata.chunk_key_encoding
        # Chunk c is the file c/<c>/0 (the format's default key encoding): checked to exist, memory-mapped.
        self._default_keys = getattr(enc, "name", None) == "default" and getattr(enc, "separator", None) == "/"
        self.uses_memmap: bool = cfg.memmap and self._default_keys and _uncompressed(self._array, chunk_rows,
                                                                                     self.d_in)
        self.n_rows: int = self._epoch_rows(0)  # this rank's share; for world_size 1, every epoch
        self.max_rows_in_memory = 0  # peak of loader-owned rows (group buffers + batch being assembled)
        self.groups_read = 0
        self._rows_held = 0
        self._lock = threading.Lock()
        self._epoch, self._offset, self._batches = 0, 0, 0
        log.info("loader %s [%s, rank %d/%d]: %d rows, %d chunks per group, memmap=%s, scaling %.6g",
                 hook, split, rank, world_size, self.n_rows, self.group_chunks, self.uses_memmap,
                 self.scaling_factor)

    def _plan(self, epoch: int) -> list[list[int]]:
        """This rank's chunks of an epoch, cut into groups of ``group_chunks``."""
        if self.split == "heldout":
            chunks = self._heldout
        else:
            perm = np.random.default_rng([self.cfg.seed, epoch, 0]).permutation(self._n_train)
            # Every rank takes the same number of chunks so ranks stay in the same epoch; the
            # < world_size chunks left over change from epoch to epoch with the permutation.
            k = len(perm) // self.world_size
            chunks = perm[: k * self.world_size][self.rank::self.world_size].tolist()
        g = self.group_chunks
        return [chunks[i:i + g] for i in range(0, len(chunks), g)]

    def _chunk_len(self, chunk: int) -> int:
        start, stop = self._layout.chunk_rows_range(chunk)
        return stop - start

    def _epoch_rows(self, epoch: int) -> int:
        return sum(self._chunk_len(c) for group in self._plan(epoch) for c in group)

    def _groups(self, epoch: int, offset: int) -> Iterator[_Group]:
        """Groups from row ``offset`` of ``epoch`` on: the first one re-read whole and its head skipped."""
        while True:
            plan = self._plan(epoch)
            starts = np.cumsum([0] + [sum(map(self._chunk_len, g)) for g in plan]).tolist()
            for gi in range(max(0, bisect.bisect_right(starts, offset) - 1), len(plan)):
                rows = self._load_group(epoch, gi, plan[gi])
                skip = max(0, offset - starts[gi])
                yield _Group(epoch, starts[gi] + skip, rows[skip:], len(rows))
            if self.split == "heldout":
                return
            epoch, offset = epoch + 1, 0

    def _load_group(self, epoch: int, index: int, chunks: list[int]) -> torch.Tensor:
        sizes = [self._chunk_len(c) for c in chunks]
        n = sum(sizes)
        self._hold(n)
        try:
            out = np.empty((n, self.d_in), np.float32)
            # Scatter each decoded chunk straight to its shuffled rows: no concatenated copy.
            dest = None if self.split == "heldout" else \
                np.random.default_rng([self.cfg.seed, epoch, 1, index, self.rank]).permutation(n)
            a = 0
            for c, m in zip(chunks, sizes):
                x = to_float32(self._read_chunk(c), self._logical)
                if dest is None:
                    out[a:a + m] = x
                else:
                    out[dest[a:a + m]] = x
                a += m
            if self.scaling_factor != 1.0:
                out *= np.float32(self.scaling_factor)
        except BaseException:
            self._hold(-n)
            raise
        self.groups_read += 1
        return torch.from_numpy(out)

    def _read_chunk(self, chunk: int) -> np.ndarray:
        """Chunk ``chunk`` in the storage dtype; ActcacheError naming hook and chunk if it is unreadable."""
        start, stop = self._layout.chunk_rows_range(chunk)
        path = self.store.path / self.hook / "c" / str(chunk) / "0"
        try:
            if self._default_keys and not path.is_file():
                raise OSError(f"{path} is missing")  # zarr would silently return fill values
            if self.uses_memmap:
                return self._memmap(path, stop - start)
            return self._array[start:stop]
        except Exception as err:
            raise ActcacheError(f"chunk {chunk} of {self.hook} in {self.store.path} is unreadable ({err}): "
                                f"check the store with actcache verify and re-extract it") from err

    def _memmap(self, path: Path, rows: int) -> np.ndarray:
        dtype = storage_dtype(self._logical).newbyteorder("<")
        full = (self._layout.chunk_rows, self.d_in)  # zarr stores edge chunks padded to full size
        expected = full[0] * full[1] * dtype.itemsize
        if path.stat().st_size != expected:
            raise OSError(f"{path} has {path.stat().st_size} bytes, expected {expected}")
        return np.memmap(path, dtype=dtype, mode="r", shape=full)[:rows]

    def batches(self, n_batches: int | None = None) -> Iterator[torch.Tensor]:
        """``n_batches`` float32 (batch_size, d_in) batches on ``device`` (None: forever), scaled.

        Train batches continue from the loader's position; iterate one long call rather than
        many short ones (each call re-reads the group holding the position). Each heldout call
        is one fresh pass in store order whose last batch may be shorter. One iterator at a time.
        """
        if self.split == "heldout":
            self._epoch, self._offset = 0, 0
        self._rows_held = 0  # any earlier iterator is closed: its buffers are gone
        groups = self._groups(self._epoch, self._offset)
        source = _Source(groups, self.cfg.prefetch)
        try:
            yield from self._emit(source, n_batches)
        finally:
            source.close()

    def _emit(self, source: _Source, n: int | None) -> Iterator[torch.Tensor]:
        size = self.cfg.batch_size
        carry: torch.Tensor | None = None  # a fresh buffer for a batch that spans groups
        filled = done = 0
        while n is None or done < n:
            grp = source.get()
            if grp is None:
                break
            rows, pos = grp.rows, 0
            while n is None or done < n:
                if filled == 0 and len(rows) - pos >= size:
                    batch = rows[pos:pos + size]  # the common case: a view, no copy
                    pos += size
                else:
                    if pos == len(rows):
                        break
                    if carry is None:
                        self._hold(size)
                        carry = torch.empty(size, self.d_in)
                    take = min(size - filled, len(rows) - pos)
                    carry[filled:filled + take] = rows[pos:pos + take]
                    filled, pos = filled + take, pos + take
                    if filled < size:
                        break  # group exhausted: the batch continues in the next one
                    batch, carry, filled = carry, None, 0
                    self._hold(-size)  # handed to the caller
                self._epoch, self._offset = grp.epoch, grp.start + pos  # set before yield: state_dict
                done, self._batches = done + 1, self._batches + 1
                yield self._to_device(batch)
            self._hold(-grp.held)
            batch = grp = rows = None  # let the buffer go before the next group is produced
            source.release()
        if carry is not None and filled and (n is None or done < n):  # heldout's short last batch
            self._hold(-size)
            self._batches += 1
            yield self._to_device(carry[:filled])

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned memory lets the copy run asynchronously, overlapping the next batch's work.
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch if self.device.type == "cpu" else batch.to(self.device)

    def _hold(self, rows: int) -> None:
        with self._lock:
            self._rows_held += rows
            self.max_rows_in_memory = max(self.max_rows_in_memory, self._rows_held)

    def _identity(self) -> dict[str, Any]:
        """What fixes the row order: a resumed loader must match it exactly."""
        return {"split": self.split, "hook": self.hook, "seed": self.cfg.seed, "n_chunks": self.store.n_chunks,
                "heldout_chunks": self.cfg.heldout_chunks, "group_chunks": self.group_chunks,
                "rank": self.rank, "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: the next row is row ``rows_in_epoch`` of epoch ``epoch``."""
        return {"version": STATE_VERSION, **self._identity(), "epoch": self._epoch,
                "rows_in_epoch": self._offset, "batches": self._batches, "batch_size": self.cfg.batch_size}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("version") != STATE_VERSION:
            raise ActcacheError(f"loader state version {d.get('version')!r} is not {STATE_VERSION}: "
                                f"resume with the trainer version that saved it")
        for key, value in self._identity().items():
            if d.get(key) != value:
                raise ActcacheError(f"loader state has {key}={d.get(key)!r} but this loader has {value!r}: "
                                    f"resume with the same store, hook and loader settings")
        epoch, offset = int(d["epoch"]), int(d["rows_in_epoch"])
        if epoch < 0 or not 0 <= offset <= self._epoch_rows(epoch):
            raise ActcacheError(f"loader state position (epoch {epoch}, row {offset}) is outside the store: "
                                f"resume with the same store")
        self._epoch, self._offset, self._batches = epoch, offset, int(d.get("batches", 0))

    def _scaling(self) -> float:
        if self.cfg.normalize == "none":
            return 1.0
        mean_norm = self.store.stats(self.hook).mean_norm
        if not mean_norm > 0:
            raise ActcacheError(f"{self.hook} has mean norm {mean_norm} in {self.store.path}: use normalize='none'")
        return math.sqrt(self.d_in) / mean_norm


class _Source:
    """Groups for the consumer: built by a background thread (at most two alive: the consumer's
    and the next) or, without prefetch, on demand on the consumer's thread."""

    def __init__(self, groups: Iterator[_Group], prefetch: bool):
        self._groups = groups
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._slots = threading.Semaphore(2)  # taken before building a group, given back when it is consumed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=PREFETCH_THREAD, daemon=True) if prefetch else None
        if self._thread:
            self._thread.start()

    def _run(self) -> None:
        try:
            while self._acquire():
                item = next(self._groups, _END)
                if not self._put(item) or item is _END:
                    return
        except BaseException as err:  # re-raised by the consumer
            self._put(err)

    # Blocking calls poll the stop flag so an abandoned consumer never leaves the thread stuck.
    def _acquire(self) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=_POLL_S):
                return True
        return False

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def get(self) -> _Group | None:
        if self._thread is None:
            return next(self._groups, None)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is _END else item

    def release(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._groups.close()


def _validate(cfg: LoaderConfig, split: str, rank: int, world_size: int, n_chunks: int) -> None:
    problems = [
        (cfg.batch_size < 1, f"batch_size={cfg.batch_size}: use at least 1"),
        (not cfg.shuffle_buffer_mb > 0, f"shuffle_buffer_mb={cfg.shuffle_buffer_mb}: use a positive size"),
        (cfg.normalize not in NORMALIZE, f"normalize={cfg.normalize!r}: use one of {', '.join(NORMALIZE)}"),
        (cfg.seed < 0, f"seed={cfg.seed}: use a non-negative seed"),
        (split not in SPLITS, f"split={split!r}: use one of {', '.join(SPLITS)}"),
        (not 0 <= rank < world_size, f"rank={rank} with world_size={world_size}: use 0 <= rank < world_size"),
        (not 0 <= cfg.heldout_chunks < n_chunks,
         f"heldout_chunks={cfg.heldout_chunks} leaves no training chunks in a store of {n_chunks} chunks: "
         f"use 0 <= heldout_chunks < {n_chunks}"),
        (split == "heldout" and cfg.heldout_chunks == 0, "heldout split with heldout_chunks=0: set heldout_chunks >= 1"),
        (split == "train" and world_size > n_chunks - cfg.heldout_chunks,
         f"world_size={world_size} exceeds the {n_chunks - cfg.heldout_chunks} training chunks: use fewer ranks"),
    ]
    for bad, msg in problems:
        if bad:
            raise ActcacheError(msg)


def _uncompressed(array: Any, chunk_rows: int, d_in: int) -> bool:
    """Chunk files hold the raw little-endian C-order rows, one store chunk each (safe to memory-map)."""
    try:
        ser = array.serializer
        little = isinstance(ser, BytesCodec) and (ser.endian is None or ser.endian.value == "little")
        return little and not array.compressors and not array.filters and \
            tuple(array.chunks) == (chunk_rows, d_in)
    except Exception:  # e.g. a sharded array has no single serializer: read through zarr
        return False
