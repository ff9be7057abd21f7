"""Store chunks decoded straight into reusable float32 group buffers, for :mod:`trainer.loader`.

A group is filled in two passes over its rows and no temporary: each chunk (memory-mapped
for uncompressed stores, else decoded by zarr) is written once to its shuffled rows, widened
on the fly, then bfloat16 bits are shifted into place (``bits << 16`` are exactly the float32
bits). Buffers are allocated once per iterator and refilled, never handed to the allocator
again: a fresh 100 MB buffer per group costs more page faults than the decode itself.
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import google_crc32c  # the library zarr's crc32c codec uses

import numpy as np
import torch
from zarr.codecs import BytesCodec, Crc32cCodec

from actcache.dtypes import storage_dtype
from actcache.errors import ActcacheError
from actcache.store import ActivationStore, has_checksum

_WAIT_S = 0.001  # poll period while a buffer's last reader finishes
_CHECKER: ThreadPoolExecutor | None = None


def _checker() -> ThreadPoolExecutor:
    """The one thread that checksums memory-mapped chunks: google-crc32c holds the GIL, so a second
    would not run in parallel, but numpy's copies release it, so one overlaps with the copying."""
    global _CHECKER
    if _CHECKER is None:
        _CHECKER = ThreadPoolExecutor(1, thread_name_prefix="actcache-crc32c")
    return _CHECKER


class ChunkReader:
    """Whole chunks of one hook, in the storage dtype, and their decoding into float32 rows."""

    def __init__(self, store: ActivationStore, hook: str, memmap: bool):
        self.store, self.hook = store, hook
        self.array = store.array(hook)  # ActcacheError for an unknown hook
        self.layout, self.logical, self.d_in = store.layout, store.logical_dtype, store.d_model
        enc = self.array.metadata.chunk_key_encoding
        # Chunk c is the file c/<c>/0 (the format's default key encoding): checked to exist, memory-mapped.
        self._default_keys = getattr(enc, "name", None) == "default" and getattr(enc, "separator", None) == "/"
        self.uses_memmap: bool = memmap and store.location.is_local and self._default_keys and \
            _uncompressed(self.array, self.layout.chunk_rows, self.d_in)  # memmap: local paths only, never URLs
        self._crc_bytes = 4 if has_checksum(self.array) else 0  # format 2: each chunk's data, then its crc32c
        self._dtype = storage_dtype(self.logical).newbyteorder("<")

    def chunk_len(self, chunk: int) -> int:
        start, stop = self.layout.chunk_rows_range(chunk)
        return stop - start

    def read(self, chunk: int) -> np.ndarray:
        """Chunk ``chunk`` in the storage dtype; ActcacheError naming hook and chunk if it is unreadable."""
        start, stop = self.layout.chunk_rows_range(chunk)
        with self._reading(chunk):
            if self.uses_memmap:
                raw = self._memmap_raw(chunk)
                if self._crc_bytes:
                    self.store.check_crc32c(self.hook, chunk, raw)  # StoreCorruptError: never decoded
                return self._rows(raw, stop - start)
            return self.store.read_storage_chunk(self.hook, chunk)  # checksum checked: StoreCorruptError names it

    @contextmanager
    def _reading(self, chunk: int) -> Iterator[None]:
        """A missing chunk or any read error -> ActcacheError naming hook and chunk."""
        try:
            if self._default_keys and not self.store.chunk_exists(self.hook, chunk):  # local path or URL
                raise OSError(f"{self.store.chunk_key(self.hook, chunk)} is missing")  # zarr would return fill values
            yield
        except ActcacheError:
            raise
        except Exception as err:
            raise ActcacheError(f"chunk {chunk} of {self.hook} in {self.store.path} is unreadable ({err}): "
                                f"check the store with actcache verify and re-extract it") from err

    def _memmap_raw(self, chunk: int) -> np.ndarray:
        """The chunk object's bytes (data, then the crc32c trailer in format 2), memory-mapped."""
        path = self.store.path / self.hook / "c" / str(chunk) / "0"
        expected = self.layout.chunk_rows * self.d_in * self._dtype.itemsize + self._crc_bytes
        if path.stat().st_size != expected:  # zarr stores edge chunks padded to full size
            raise OSError(f"{path} has {path.stat().st_size} bytes, expected {expected}")
        return np.memmap(path, dtype=np.uint8, mode="r")

    def _rows(self, raw: np.ndarray, rows: int) -> np.ndarray:
        return raw[:len(raw) - self._crc_bytes].view(self._dtype).reshape(self.layout.chunk_rows, self.d_in)[:rows]

    def _mapped_checked(self, chunk: int) -> tuple[np.ndarray, Future]:
        """A memory-mapped chunk object and its crc32c being computed on the checker thread."""
        with self._reading(chunk):
            raw = self._memmap_raw(chunk)
        return raw, _checker().submit(google_crc32c.value, raw[:-self._crc_bytes])

    def _verify(self, chunk: int, raw: np.ndarray, crc: Future) -> None:
        if crc.result() != int.from_bytes(bytes(raw[-self._crc_bytes:]), "little"):
            raise self.store.corrupt(self.hook, chunk, ValueError("checksum mismatch"))

    def decode_into(self, out: np.ndarray, chunks: list[int], dest: np.ndarray | None, scale: float) -> None:
        """Float32 rows of ``chunks`` (in order) into ``out``: row i of their concatenation goes to
        ``out[dest[i]]`` (``dest`` None: to ``out[i]``), times ``scale``. Exact for every stored dtype."""
        bf16 = self.logical == "bfloat16"
        target = out.view(np.uint32) if bf16 else out  # bf16: the bits widen into the low half first
        checked = self.uses_memmap and self._crc_bytes > 0
        a = 0
        for c in chunks:
            if checked:
                # The chunk's crc32c runs on the checker thread while this one copies the same bytes
                # (each reads what the other just pulled into the shared L3). Verified right after
                # the copy: a group with a damaged chunk raises here and never reaches the trainer.
                raw, crc = self._mapped_checked(c)
                x = self._rows(raw, self.chunk_len(c))
            else:
                x = self.read(c)
            m = len(x)
            target[slice(a, a + m) if dest is None else dest[a:a + m]] = x  # the one copy, casting as it goes
            if checked:
                self._verify(c, raw, crc)
            a += m
        if bf16:
            np.left_shift(target, 16, out=target)  # in place: bf16 bits << 16 are the float32 bits
        if scale != 1.0:
            np.multiply(out, np.float32(scale), out=out)


class GroupBuffers:
    """``n`` float32 buffers of ``rows`` x ``d`` (pinned when ``pin``), allocated once and refilled.

    A buffer is refilled only once nothing can read it any more. CPU: no tensor made from its
    last group is alive; batches are views of it, so while the caller still holds one, the
    filler waits, and if the consumer is starving meanwhile (it keeps every batch, say) the
    caller gets that buffer and a fresh one replaces it. CUDA: the host-to-device copies of its
    last group have finished (callers only ever see device tensors).
    """

    def __init__(self, n: int, rows: int, d: int, *, pin: bool, hold: Callable[[int], None]):
        self.rows, self.d, self.pin, self._hold = rows, d, pin, hold
        self._bufs: list[torch.Tensor | None] = [None] * n
        self._leased = [False] * n
        self._readers: list[Any] = [None] * n  # CPU: weakref to the numpy view the last group's tensor owns
        self._events: list[Any] = [None] * n  # CUDA: recorded after the last copy out of the buffer
        self.allocations = 0

    def acquire(self, starving: Callable[[], bool], stopped: Callable[[], bool]) -> torch.Tensor | None:
        """A free buffer, leased until :meth:`release` (None once ``stopped``)."""
        n = len(self._bufs)
        while not stopped():
            for i in range(n):
                if not self._leased[i] and (self._bufs[i] is None or self.pin or self._idle(i)):
                    return self._lease(i)  # pinned: _lease waits for its copies
            if starving():  # a reader outlives its group: it keeps that buffer, a fresh one takes its place
                i = next((i for i in range(n) if not self._leased[i]), 0)
                self._hold(-self.rows)
                self._bufs[i] = None
                return self._lease(i)
            time.sleep(_WAIT_S)
        return None

    def _idle(self, i: int) -> bool:
        return self._readers[i] is None or self._readers[i]() is None

    def _lease(self, i: int) -> torch.Tensor:
        if self._bufs[i] is None:
            self._hold(self.rows)
            self.allocations += 1
            self._bufs[i] = torch.empty((self.rows, self.d), dtype=torch.float32, pin_memory=self.pin)
        elif self._events[i] is not None:
            self._events[i].synchronize()
        self._leased[i], self._readers[i], self._events[i] = True, None, None
        return self._bufs[i]

    def fill(self, buf: torch.Tensor, n: int) -> tuple[np.ndarray, torch.Tensor]:
        """The first ``n`` rows of ``buf``: a numpy array to write and the tensor to hand out."""
        if self.pin:
            return buf.numpy()[:n], buf[:n]
        view = buf.numpy()[:n]
        self._readers[self._index(buf)] = weakref.ref(view)  # alive as long as any tensor made from it
        return view, torch.from_numpy(view)

    def release(self, buf: torch.Tensor, on_cuda: bool) -> None:
        """The consumer is done with ``buf`` (its batches are out, their copies queued)."""
        i = self._index(buf)
        if i is None:
            return  # replaced meanwhile: it belongs to whoever still holds its batches
        if on_cuda:
            self._events[i] = torch.cuda.Event()
            self._events[i].record()
        self._leased[i] = False

    def _index(self, buf: torch.Tensor) -> int | None:
        return next((i for i, b in enumerate(self._bufs) if b is buf), None)


def _uncompressed(array: Any, chunk_rows: int, d_in: int) -> bool:
    """Chunk files hold the raw little-endian C-order rows, one store chunk each (safe to memory-map)."""
    try:
        ser = array.serializer
        little = isinstance(ser, BytesCodec) and (ser.endian is None or ser.endian.value == "little")
        comp = tuple(array.compressors)  # none, or crc32c alone: a 4-byte trailer, checked beside the copy (decode_into)
        raw = not comp or (len(comp) == 1 and isinstance(comp[0], Crc32cCodec))
        return little and raw and not array.filters and \
            tuple(array.chunks) == (chunk_rows, d_in)
    except Exception:  # e.g. a sharded array has no single serializer: read through zarr
        return False
