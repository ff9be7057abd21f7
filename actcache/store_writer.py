"""Creating a store and writing it chunk by chunk, crash-safely.

Every array gets zarr's ``crc32c`` codec last in its bytes-to-bytes chain: each chunk object ends
with the checksum of its encoded bytes, checked on every read (format version 2).

Crash safety rests on three facts: every object is written atomically (zarr's LocalStore:
temp file + rename; object stores: one PUT per object); each store chunk is computed from its
own windows only, so it can be recomputed identically; and a chunk's manifest entry (its own
one-byte object) is written only after its data and statistics. After a crash, chunks without a
manifest entry are simply written again. ``complete`` and the statistics land in one last
``zarr.json`` write. ``write_chunk`` may run on several threads at once, one chunk each (see
``runner``): chunks touch disjoint objects, so the bytes written do not depend on the order. See docs/store-format.md for ``file://`` URLs, which are not atomic.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from actcache import store as S
from actcache.dtypes import storage_dtype
from actcache.errors import ActcacheError, StoreCorruptError
from actcache.urls import StoreLocation

log = logging.getLogger(__name__)

CODECS = ("zstd", "blosc-lz4", "none")
_BLOCK_CHUNKS = 64  # chunks per bulk write/read of the small per-row arrays


def compressors_for(codec: str, typesize: int) -> Any:
    """Codec name -> zarr v3 compressors. ``zstd`` is level 1 unless written ``zstd-N``."""
    if codec == "none":
        return None
    if codec == "blosc-lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle, typesize=typesize),)
    if codec == "zstd" or codec.startswith("zstd-"):
        level = 1 if codec == "zstd" else codec.split("-", 1)[1]
        try:
            return (ZstdCodec(level=int(level)),)
        except ValueError:
            pass
    raise ActcacheError(f"unknown codec {codec!r}: use zstd, zstd-N (level N), blosc-lz4 or none")


def with_checksum(compressors: Any) -> tuple:
    """``compressors`` followed by zarr's crc32c codec, so the checksum covers the bytes on disk."""
    return (*(compressors or ()), Crc32cCodec())


# zarr's own default for the small arrays (what version 1 stores used), plus the checksum.
_SMALL_ARRAYS = with_checksum((ZstdCodec(level=0),))


def _writing(array: zarr.Array) -> zarr.Array:
    """``array`` without zarr's empty-chunk check. That check compares every chunk with the fill
    value on zarr's single event-loop thread, costing more than zstd itself and serialising
    concurrent writers; activation chunks are never all zero, and one that was would just be
    stored as an object rather than left absent (it reads back the same)."""
    return array.with_config({"write_empty_chunks": True})


_scratch = threading.local()


def _float32_view(a: np.ndarray, logical: str) -> np.ndarray:
    """``actcache.dtypes.to_float32(a, logical)``, bit for bit, in a buffer this thread reuses for every chunk.

    A fresh chunk-sized array per chunk costs page faults that the kernel serialises across
    threads, which kept concurrent writers from scaling."""
    if a.dtype == np.float32:
        return a
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape != a.shape:
        buf = _scratch.buf = np.empty(a.shape, np.float32)
    if logical == "bfloat16":  # bfloat16 is the top half of a float32
        np.left_shift(a, 16, out=buf.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(buf, a, casting="same_kind")  # float16 -> float32 is exact
    return buf


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ChunkEncoder:
    """One array's chunks (chunked along rows) encoded by its own zarr codecs on the calling thread and
    written with the local store's atomic put: the same bytes as ``array[rows] = a``, without
    zarr's one event-loop thread, which would run every writer thread's checksum and copies one
    after another (docs/benchmarks.md, the writer section). Local stores only; None elsewhere."""

    def __init__(self, array: zarr.Array, name: str, store: Any):
        from zarr.core.array_spec import ArrayConfig, ArraySpec
        from zarr.core.buffer import default_buffer_prototype

        self.array, self.name, self.store = array, name, store
        self.prototype = default_buffer_prototype()
        meta = array.metadata
        self.chunk_shape = tuple(meta.chunk_grid.chunk_shape)
        self.dtype = meta.data_type.to_native_dtype()
        self.spec = ArraySpec(shape=self.chunk_shape, dtype=meta.data_type, fill_value=meta.fill_value,
                              config=ArrayConfig(order="C", write_empty_chunks=True), prototype=self.prototype)
        self.codecs = tuple(meta.codecs)

    @classmethod
    def for_array(cls, array: zarr.Array, name: str, location: StoreLocation) -> "ChunkEncoder | None":
        meta = array.metadata
        # Chunked along rows only (chunk c = rows of c), and codecs with zarr's synchronous encoder.
        if location.local is None or getattr(meta, "zarr_format", 3) != 3 or \
                tuple(meta.chunk_grid.chunk_shape[1:]) != tuple(meta.shape[1:]) or \
                not all(hasattr(c, "_encode_sync") for c in meta.codecs):
            return None
        return cls(array, name, zarr.storage.LocalStore(location.local))

    def encode(self, a: np.ndarray) -> Any:
        """The chunk object's bytes: ``a`` padded with the fill value to the chunk shape (as zarr
        stores an edge chunk), then every codec of the array in order."""
        if a.shape != self.chunk_shape:
            full = np.full(self.chunk_shape, self.spec.fill_value, dtype=self.dtype)
            full[:a.shape[0]] = a
            a = full
        data: Any = self.prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(a, dtype=self.dtype))
        for codec in self.codecs:
            data = codec._encode_sync(data, self.spec)
        return data

    def put(self, chunk: int, a: np.ndarray) -> None:
        self.store.set_sync(S.chunk_key(self.array, self.name, chunk), self.encode(a))


class StoreWriter:
    """Write access to a store being extracted (one process or many dask workers)."""

    def __init__(self, path: str | Path | StoreLocation):
        self.location = path if isinstance(path, StoreLocation) else StoreLocation(path)
        self.path = self.location  # str(): the public form, safe in messages
        self.group = S.open_group(self.location, "r+")
        self.attrs = dict(self.group.attrs)
        self.layout = S.Layout.from_dict(self.attrs["layout"])
        self.hooks: list[str] = list(self.attrs["hooks"])
        self.logical_dtype: str = self.attrs["dtype"]
        self._arrays = {h: _writing(S.open_array(self.group, h, self.location)) for h in self.hooks}
        self._stats = {h: {name: _writing(S.open_array(self.group, S.stats_array(h, name), self.location))
                           for name in ("sum", "norms")} for h in self.hooks}
        self._manifest = _writing(S.open_array(self.group, S.MANIFEST, self.location))
        self._store: S.ActivationStore | None = None
        # name -> encoder, for every array write_chunk writes (None: through zarr's array API).
        self._encoders = {h: ChunkEncoder.for_array(self._arrays[h], h, self.location) for h in self.hooks}
        for h in self.hooks:
            for name, arr in self._stats[h].items():
                self._encoders[S.stats_array(h, name)] = ChunkEncoder.for_array(arr, S.stats_array(h, name), self.location)
        self._encoders[S.MANIFEST] = ChunkEncoder.for_array(self._manifest, S.MANIFEST, self.location)

    @classmethod
    def create(
        cls,
        path: str | Path | StoreLocation,
        *,
        attrs: dict[str, Any],
        layout: S.Layout,
        hooks: list[str],
        d_model: int,
        logical_dtype: str,
        codec: str,
        windows: np.ndarray,
        window_source: np.ndarray,
    ) -> "StoreWriter":
        """Lay out every array and write the token-side arrays; activations come later."""
        sdt = storage_dtype(logical_dtype)
        comp = with_checksum(compressors_for(codec, sdt.itemsize))
        attrs = {**attrs, "layout": layout.to_dict(), "hooks": hooks, "d_model": d_model,
                 "dtype": logical_dtype, "storage_dtype": str(sdt), "codec": codec,
                 "format": {"name": S.FORMAT_NAME, "version": S.FORMAT_VERSION},
                 "created": _now(), "tokens_written": False, "complete": False}
        loc = path if isinstance(path, StoreLocation) else StoreLocation(path)
        g = zarr.create_group(store=loc.zarr_store(read_only=False), attributes=attrs, overwrite=False)
        rows, n_chunks = layout.chunk_rows, layout.n_chunks
        for h in hooks:
            layer = int(h.split(".")[1])
            g.create_array(h, shape=(layout.n_rows, d_model), chunks=(rows, d_model), dtype=sdt,
                           compressors=comp, fill_value=0, dimension_names=("row", "d_model"),
                           attributes={"hook_name": h, "layer": layer, "logical_dtype": logical_dtype})
            sg = g.require_group(f"{S.STATS}/{h}")
            sg.create_array("sum", shape=(n_chunks, d_model), chunks=(1, d_model), dtype="float64", fill_value=0,
                            compressors=_SMALL_ARRAYS)
            sg.create_array("norms", shape=(n_chunks, 2), chunks=(1, 2), dtype="float64", fill_value=0,
                            compressors=_SMALL_ARRAYS, attributes={"columns": ["sum_sq_norm", "sum_norm"]})
        g.create_array(S.MANIFEST, shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                       compressors=with_checksum(None))
        wpc = layout.windows_per_chunk
        g.create_array(S.WINDOWS, data=windows.astype(np.int32), chunks=(wpc, layout.context_size),
                       compressors=_SMALL_ARRAYS)
        g.create_array(S.WINDOW_SOURCE, data=window_source.astype(np.int64), chunks=(wpc,),
                       compressors=_SMALL_ARRAYS)
        writer = cls(loc)
        writer._write_row_arrays(windows)
        writer.group.attrs["tokens_written"] = True
        return writer

    def _write_row_arrays(self, windows: np.ndarray) -> None:
        lay = self.layout
        specs = [(S.TOKENS, np.int32), (S.WINDOW, np.int32), (S.POSITION, np.int16)]
        arrs = {n: self.group.create_array(n, shape=(lay.n_rows,), chunks=(lay.chunk_rows,), dtype=dt,
                                           compressors=_SMALL_ARRAYS) for n, dt in specs}
        positions = np.arange(lay.first_position, lay.context_size, dtype=np.int16)
        for c0 in range(0, lay.n_chunks, _BLOCK_CHUNKS):
            c1 = min(c0 + _BLOCK_CHUNKS, lay.n_chunks)
            w0, w1 = lay.chunk_windows(c0)[0], lay.chunk_windows(c1 - 1)[1]
            r0, r1 = w0 * lay.rows_per_window, w1 * lay.rows_per_window
            arrs[S.TOKENS][r0:r1] = windows[w0:w1, lay.first_position:].reshape(-1)
            arrs[S.WINDOW][r0:r1] = np.repeat(np.arange(w0, w1, dtype=np.int32), lay.rows_per_window)
            arrs[S.POSITION][r0:r1] = np.tile(positions, w1 - w0)

    def read_windows(self, chunk: int) -> np.ndarray:
        w0, w1 = self.layout.chunk_windows(chunk)
        return self._reader().read_windows(w0, w1)  # a damaged chunk: StoreCorruptError, not a traceback

    def _reader(self) -> S.ActivationStore:
        if self._store is None:
            self._store = S.ActivationStore(self.location, require_complete=False)
        return self._store

    def pending_chunks(self) -> list[int]:
        """Chunks without a manifest entry; an entry whose object is damaged counts as not written."""
        try:
            done = self._reader().read(S.MANIFEST, 0, self.layout.n_chunks)
        except StoreCorruptError:
            done = np.zeros(self.layout.n_chunks, dtype=np.uint8)
            for c in range(self.layout.n_chunks):
                try:
                    done[c] = self._reader().read(S.MANIFEST, c, c + 1)[0]
                except StoreCorruptError:
                    log.warning("manifest entry of chunk %d of %s is damaged: recomputing the chunk", c, self.path)
        return [int(c) for c in np.flatnonzero(done == 0)]

    def write_chunk(self, chunk: int, acts: dict[str, np.ndarray]) -> None:
        """Data, then statistics, then the manifest entry that commits the chunk."""
        r0, r1 = self.layout.chunk_rows_range(chunk)
        for h in self.hooks:
            a = acts[h]
            if a.shape != (r1 - r0, self._arrays[h].shape[1]):
                raise ValueError(f"chunk {chunk} of {h}: shape {a.shape}, expected {(r1 - r0, self._arrays[h].shape[1])}")
            self._put(h, self._arrays[h], chunk, a, slice(r0, r1))
            x = _float32_view(a, self.logical_dtype)
            sq = np.einsum("ij,ij->i", x, x)
            self._put(S.stats_array(h, "sum"), self._stats[h]["sum"], chunk, x.sum(axis=0, dtype=np.float64)[None],
                      slice(chunk, chunk + 1))
            norms = np.array([[sq.sum(dtype=np.float64), np.sqrt(sq).sum(dtype=np.float64)]])
            self._put(S.stats_array(h, "norms"), self._stats[h]["norms"], chunk, norms, slice(chunk, chunk + 1))
        self._put(S.MANIFEST, self._manifest, chunk, np.ones(1, np.uint8), slice(chunk, chunk + 1))

    def _put(self, name: str, array: zarr.Array, chunk: int, value: np.ndarray, rows: slice) -> None:
        """Zarr chunk ``chunk`` of ``array`` (``rows`` of it): encoded on this thread when the
        store is local, else through zarr's array API."""
        enc = self._encoders[name]
        if enc is not None:
            enc.put(chunk, value)
        else:
            array[rows] = value

    def finalize(self) -> dict[str, Any]:
        """Check every chunk is committed, reduce per-chunk statistics, mark complete."""
        missing = self.pending_chunks()
        if missing:
            raise ActcacheError(f"{len(missing)} chunks of {self.path} are not written: run with --resume")
        n = self.layout.n_rows
        stats = {}
        for h in self.hooks:
            rd = self._reader()
            total = np.zeros(self._arrays[h].shape[1], dtype=np.float64)
            norms = np.zeros(2, dtype=np.float64)
            # Fixed block order keeps the reduction bitwise reproducible across resumes and workers.
            for c0 in range(0, self.layout.n_chunks, 256):
                c1 = min(c0 + 256, self.layout.n_chunks)
                total += rd.read(S.stats_array(h, "sum"), c0, c1).sum(axis=0)
                norms += rd.read(S.stats_array(h, "norms"), c0, c1).sum(axis=0)
            stats[h] = {"mean": (total / n).tolist(), "mean_sq_norm": float(norms[0] / n),
                        "mean_norm": float(norms[1] / n), "n_rows": n}
        self.group.attrs.update({"stats": stats, "complete": True, "finished": _now()})
        return stats
