"""Shuffled activation batches for SAE training, read from an actcache store.

Reads are whole store chunks only: gathering random rows from compressed chunks is ~50x
slower (docs/store-format.md). Shuffling is two-level: a seeded chunk order per epoch,
then a seeded row permutation inside each *group* of chunks that fits in half the shuffle
buffer. Extraction already shuffled windows across chunks, so this is enough mixing.

Shards and data parallelism. The epoch's chunk order is dealt round-robin to ``shards``
independent row streams (default: one per rank); each stream is infinite and deterministic
given (seed, store, shards, buffer): epoch after epoch, group after group, no row dropped.
A batch takes ``batch_size / streams held`` consecutive rows of each stream this loader
holds, in shard order. Rank r of W holds shards ``[r*S/W, (r+1)*S/W)``, so ranks read
disjoint chunks and together every train chunk once per epoch. Guarantee: with the same
seed, store, ``shards=S`` and shuffle buffer, the batch at step s of a 1-rank loader of
``batch_size=B`` equals exactly (bitwise, same rows in the same order) the concatenation of
the step-s batches of ranks 0..W-1 of a W-rank run with ``batch_size=B/W`` each. So a
single-process reference run for a W-rank run sets ``shards=W`` (and then holds W streams'
buffers, W x the memory). A stream's position is (epoch, rows consumed in that epoch); a
resume recomputes which group holds it and re-reads only that group.

Memory: per stream held, two group buffers with prefetch (the one consumed, the one being
filled; one without), allocated once and refilled (trainer.decode), plus one batch while a
batch is assembled from several pieces. Batches are views of the group buffer when they can
be (CPU); on CUDA group buffers are pinned and batches are copied with ``non_blocking``.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from actcache.errors import ActcacheError
from actcache.store import ActivationStore, open_store
from trainer.decode import ChunkReader, GroupBuffers
from trainer.prefetch import Prefetcher

log = logging.getLogger(__name__)

NORMALIZE = ("none", "expected_average_only_in")
SPLITS = ("train", "heldout")
STATE_VERSION = 1


@dataclass(frozen=True)
class LoaderConfig:
    """How the trainer reads a store. ``prefetch``, ``memmap`` and ``normalize`` never change the row order."""

    batch_size: int = 4096
    """Rows per batch (per rank)."""
    shuffle_buffer_mb: float = 256
    """RAM for shuffling per shard held, in MiB of float32 rows; bounds RSS. A group fills half, the prefetched next group the other."""
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
    shards: int | None = None
    """Row streams the batches are cut from (None: world_size); a multiple of world_size. Fixes the row order: a 1-rank run with shards=W matches a W-rank run batch for batch."""


@dataclass
class _Group:
    epoch: int
    start: int  # offset in the epoch of rows[0]
    rows: torch.Tensor  # float32 (n, d_in), permuted and scaled; may be the tail of the buffer
    buf: torch.Tensor  # the group buffer rows lives in, given back once its batches are out


class ActivationLoader:
    """Batches of one hook of a store: ``split="train"`` shuffled forever, ``"heldout"`` one ordered pass."""

    def __init__(self, store: str | Path | ActivationStore, hook: str, cfg: LoaderConfig, *,
                 device: str | torch.device = "cpu", split: str = "train", rank: int = 0, world_size: int = 1):
        self.store = store if isinstance(store, ActivationStore) else open_store(store)
        self.hook, self.cfg, self.split = hook, cfg, split
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self._reader = ChunkReader(self.store, hook, cfg.memmap)  # ActcacheError for an unknown hook
        self._layout = self.store.layout
        self.d_in: int = self.store.d_model
        n_chunks = self.store.n_chunks
        self.shards: int = cfg.shards or world_size
        _validate(cfg, split, rank, world_size, self.shards, n_chunks)
        self._n_train = n_chunks - cfg.heldout_chunks
        self._heldout = list(range(self._n_train, n_chunks))[rank::world_size]
        per_rank = self.shards // world_size
        self._mine = list(range(rank * per_rank, (rank + 1) * per_rank)) if split == "train" else [0]
        chunk_rows = self._layout.chunk_rows
        buffer_rows = int(cfg.shuffle_buffer_mb * 2**20) // (4 * self.d_in)
        self.group_chunks: int = max(1, buffer_rows // 2 // chunk_rows)
        if 2 * chunk_rows > buffer_rows:
            log.warning("shuffle buffer of %s MiB holds fewer than 2 chunks of %d rows: using 1 chunk per group, "
                        "memory will exceed the buffer", cfg.shuffle_buffer_mb, chunk_rows)
        most = len(self._heldout) if split == "heldout" else -(-self._n_train // self.shards)
        self._buffer_rows = min(self.group_chunks, most) * chunk_rows  # a group buffer: no bigger than a group
        # Loader-owned rows never exceed this: per stream held, the group consumed and the one prefetched; one batch.
        self.rows_bound: int = len(self._mine) * (2 if cfg.prefetch else 1) * self.group_chunks * chunk_rows \
            + cfg.batch_size
        self.scaling_factor: float = self._scaling()
        self.uses_memmap: bool = self._reader.uses_memmap
        self.n_rows: int = sum(self._epoch_rows(0, j) for j in self._mine)  # this rank's rows in epoch 0
        self.max_rows_in_memory = 0  # peak of loader-owned rows (group buffers + batch being assembled)
        self.groups_read = 0
        self._rows_held = 0
        self._lock = threading.Lock()
        self._positions = [(0, 0)] * len(self._mine)  # per stream held: (epoch, rows consumed in it)
        self._batches = 0
        log.info("loader %s [%s, rank %d/%d, shards %s]: %d rows, %d chunks per group, memmap=%s, scaling %.6g",
                 hook, split, rank, world_size, self._mine, self.n_rows, self.group_chunks, self.uses_memmap,
                 self.scaling_factor)

    def _plan(self, epoch: int, shard: int) -> list[list[int]]:
        """Shard ``shard``'s chunks of an epoch, cut into groups of ``group_chunks``."""
        if self.split == "heldout":
            chunks = self._heldout
        else:  # shard j takes every S-th chunk of the epoch's order: all chunks, disjoint shards
            chunks = np.random.default_rng([self.cfg.seed, epoch, 0]).permutation(self._n_train)[shard::self.shards]
            chunks = chunks.tolist()
        g = self.group_chunks
        return [chunks[i:i + g] for i in range(0, len(chunks), g)]

    def _epoch_rows(self, epoch: int, shard: int) -> int:
        return sum(self._reader.chunk_len(c) for group in self._plan(epoch, shard) for c in group)

    def _groups(self, shard: int, epoch: int, offset: int, pool: GroupBuffers,
                starving: Callable[[], bool], stopped: Callable[[], bool]) -> Iterator[_Group]:
        """Groups from row ``offset`` of ``epoch`` on: the first one re-read whole and its head skipped."""
        while True:
            plan = self._plan(epoch, shard)
            starts = np.cumsum([0] + [sum(map(self._reader.chunk_len, g)) for g in plan]).tolist()
            for gi in range(max(0, bisect.bisect_right(starts, offset) - 1), len(plan)):
                buf = pool.acquire(starving, stopped)
                if buf is None:
                    return
                n = starts[gi + 1] - starts[gi]
                out, rows = pool.fill(buf, n)
                dest = None if self.split == "heldout" else \
                    np.random.default_rng([self.cfg.seed, epoch, 1, gi, shard]).permutation(n)
                try:
                    self._reader.decode_into(out, plan[gi], dest, self.scaling_factor)
                except BaseException:
                    pool.release(buf, False)
                    raise
                self.groups_read += 1
                skip = max(0, offset - starts[gi])
                out = None
                yield _Group(epoch, starts[gi] + skip, rows[skip:], buf)
                rows = buf = None
            if self.split == "heldout":
                return
            epoch, offset = epoch + 1, 0

    def batches(self, n_batches: int | None = None) -> Iterator[torch.Tensor]:
        """``n_batches`` float32 (batch_size, d_in) batches on ``device`` (None: forever), scaled.

        Train batches continue from the loader's position; iterate one long call rather than
        many short ones (each call re-reads the group holding the position). Each heldout call
        is one fresh pass in store order whose last batch may be shorter. One iterator at a time.
        CPU batches may be views of a group buffer: the buffer is refilled only once no batch
        from it is alive, so keeping batches is safe (it costs a fresh buffer per group kept).
        """
        if self.split == "heldout":
            self._positions = [(0, 0)]
        self._rows_held = 0  # any earlier iterator is closed: its buffers are gone
        cuda = self.device.type == "cuda"
        streams = [_Stream(self, j, e, o, cuda) for j, (e, o) in zip(self._mine, self._positions)]
        try:
            yield from self._emit(streams, n_batches)
        finally:
            for s in streams:
                s.close()

    def _emit(self, streams: list[_Stream], n: int | None) -> Iterator[torch.Tensor]:
        per = self.cfg.batch_size // len(streams)
        done = 0
        while n is None or done < n:
            pieces = [p for s in streams for p in s.take(per)]
            if not pieces:
                break  # heldout: the pass is over
            batch = self._assemble(pieces)
            pieces = None
            for s in streams:
                s.settle()
            self._positions = [(s.epoch, s.offset) for s in streams]  # set before yield: state_dict
            done, self._batches = done + 1, self._batches + 1
            yield batch
            batch = None  # the caller's reference alone decides when the group buffer is free

    def _assemble(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        if len(pieces) == 1:  # the common case: a view of the group buffer (pinned on CUDA)
            p = pieces[0]
            if self.device.type == "cuda":
                return p.to(self.device, non_blocking=True)
            return p if self.device.type == "cpu" else p.to(self.device)
        rows = sum(len(p) for p in pieces)
        if self.device.type == "cuda":  # straight from the pinned pieces, no host copy
            out, a = torch.empty((rows, self.d_in), device=self.device), 0
            for p in pieces:
                out[a:a + len(p)].copy_(p, non_blocking=True)
                a += len(p)
            return out
        self._hold(rows)
        out = torch.cat(pieces)
        self._hold(-rows)  # handed to the caller
        return out if self.device.type == "cpu" else out.to(self.device)

    def _hold(self, rows: int) -> None:
        with self._lock:
            self._rows_held += rows
            self.max_rows_in_memory = max(self.max_rows_in_memory, self._rows_held)

    def _identity(self) -> dict[str, Any]:
        """What fixes the row order: a resumed loader must match it exactly."""
        return {"split": self.split, "hook": self.hook, "seed": self.cfg.seed, "n_chunks": self.store.n_chunks,
                "heldout_chunks": self.cfg.heldout_chunks, "group_chunks": self.group_chunks,
                "rank": self.rank, "world_size": self.world_size, "shards": self.shards}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: per stream held, the next row is row ``rows_in_epoch`` of ``epoch``."""
        (epoch, offset), *_ = self._positions
        return {"version": STATE_VERSION, **self._identity(), "epoch": epoch, "rows_in_epoch": offset,
                "positions": [list(p) for p in self._positions], "batches": self._batches,
                "batch_size": self.cfg.batch_size}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("version") != STATE_VERSION:
            raise ActcacheError(f"loader state version {d.get('version')!r} is not {STATE_VERSION}: "
                                f"resume with the trainer version that saved it")
        for key, value in self._identity().items():
            saved = d.get(key, 1 if key == "shards" else None)  # states from before shards: one stream
            if saved != value:
                raise ActcacheError(f"loader state has {key}={saved!r} but this loader has {value!r}: "
                                    f"resume with the same store, hook and loader settings")
        positions = [(int(e), int(o)) for e, o in d.get("positions", [(d["epoch"], d["rows_in_epoch"])])]
        if len(positions) != len(self._mine) or any(
                e < 0 or not 0 <= o <= self._epoch_rows(e, j) for (e, o), j in zip(positions, self._mine)):
            raise ActcacheError(f"loader state positions {positions} are outside the store: resume with the same store")
        self._positions, self._batches = positions, int(d.get("batches", 0))

    def _scaling(self) -> float:
        if self.cfg.normalize == "none":
            return 1.0
        mean_norm = self.store.stats(self.hook).mean_norm
        if not mean_norm > 0:
            raise ActcacheError(f"{self.hook} has mean norm {mean_norm} in {self.store.path}: use normalize='none'")
        return math.sqrt(self.d_in) / mean_norm


class _Stream:
    """One shard's rows for the consumer: groups from a :class:`_Source`, handed out in pieces."""

    def __init__(self, loader: ActivationLoader, shard: int, epoch: int, offset: int, cuda: bool):
        n_bufs = 2 if loader.cfg.prefetch else 1
        self._pool = GroupBuffers(n_bufs, loader._buffer_rows, loader.d_in, pin=cuda, hold=loader._hold)
        self._cuda = cuda
        self._source = Prefetcher(lambda starving, stopped: loader._groups(shard, epoch, offset, self._pool, starving,
                                                                        stopped), loader.cfg.prefetch)
        self.epoch, self.offset = epoch, offset
        self._grp: _Group | None = None
        self._pos, self._ended = 0, False
        self._used: list[_Group] = []  # exhausted groups, given back once the batch holding their last rows is out

    def take(self, n: int) -> list[torch.Tensor]:
        """Up to ``n`` next rows (fewer only at the end of a heldout pass), as views of group buffers."""
        pieces: list[torch.Tensor] = []
        while n > 0 and not self._ended:
            if self._grp is not None and self._pos == len(self._grp.rows):
                self._used.append(self._grp)
                self._grp = None
                if not pieces:
                    self.settle()  # its rows all went out with earlier batches
            if self._grp is None:
                self._grp, self._pos = self._source.get(), 0
                self._ended = self._grp is None
                if self._ended:
                    break
            k = min(n, len(self._grp.rows) - self._pos)
            pieces.append(self._grp.rows[self._pos:self._pos + k])
            self._pos, n = self._pos + k, n - k
            self.epoch, self.offset = self._grp.epoch, self._grp.start + self._pos
        return pieces

    def settle(self) -> None:
        """Give back the buffers of exhausted groups: the batch with their last rows is out (or its copy queued)."""
        for g in self._used:
            self._pool.release(g.buf, self._cuda)
            self._source.release()
        self._used = []

    def close(self) -> None:
        self._grp = None
        self._used = []
        self._source.close()


def _validate(cfg: LoaderConfig, split: str, rank: int, world_size: int, shards: int, n_chunks: int) -> None:
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
        (shards < 1 or shards % max(1, world_size) != 0,
         f"shards={shards} with world_size={world_size}: use a positive multiple of world_size"),
        (split == "train" and cfg.batch_size % max(1, shards // max(1, world_size)) != 0,
         f"batch_size={cfg.batch_size} with {shards // max(1, world_size)} shards per rank: use a multiple of it"),
        (split == "train" and shards > n_chunks - cfg.heldout_chunks,
         f"{shards} shards (world_size={world_size}) exceed the {n_chunks - cfg.heldout_chunks} training chunks: "
         f"use fewer ranks or shards"),
    ]
    for bad, msg in problems:
        if bad:
            raise ActcacheError(msg)
