"""The store contract: layout, names and the reader (see docs/store-format.md).

This module is the only part of ``actcache`` the trainer imports. It knows how rows are
arranged in a store and how to read them back exactly; writing lives in ``store_writer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from actcache.dtypes import from_storage, to_float32
from actcache.errors import ActcacheError
from actcache.urls import StoreLocation

FORMAT_NAME = "actcache"
FORMAT_VERSION = 1

# Array names inside the group (hook arrays are named by their hook, e.g. blocks.5.hook_resid_post).
WINDOWS = "windows"  # (n_windows, context_size) int32: the model inputs, in store order
WINDOW_SOURCE = "window_source"  # (n_windows,) int64: index of each window in corpus order
TOKENS = "tokens"  # (n_rows,) int32: the token at each row
WINDOW = "window"  # (n_rows,) int32: index into WINDOWS of each row
POSITION = "position"  # (n_rows,) int16: position of each row inside its window
MANIFEST = "manifest"  # (n_chunks,) uint8, one zarr chunk per element: 1 = chunk complete
STATS = "stats"  # group: stats/<hook>/{sum, sum_sq_norm, sum_norm}, one row per chunk
LOCK_FILE = ".actcache.lock"


@dataclass(frozen=True)
class Layout:
    """How rows, windows and chunks line up. Every chunk holds whole windows."""

    n_windows: int
    context_size: int
    exclude_bos: bool
    windows_per_chunk: int

    @property
    def first_position(self) -> int:
        return 1 if self.exclude_bos else 0

    @property
    def rows_per_window(self) -> int:
        return self.context_size - self.first_position

    @property
    def chunk_rows(self) -> int:
        return self.windows_per_chunk * self.rows_per_window

    @property
    def n_rows(self) -> int:
        return self.n_windows * self.rows_per_window

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_windows / self.windows_per_chunk)

    def chunk_windows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.windows_per_chunk
        return start, min(start + self.windows_per_chunk, self.n_windows)

    def chunk_rows_range(self, chunk: int) -> tuple[int, int]:
        w0, w1 = self.chunk_windows(chunk)
        return w0 * self.rows_per_window, w1 * self.rows_per_window

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_windows": self.n_windows,
            "context_size": self.context_size,
            "exclude_bos": self.exclude_bos,
            "windows_per_chunk": self.windows_per_chunk,
            "rows_per_window": self.rows_per_window,
            "chunk_rows": self.chunk_rows,
            "n_rows": self.n_rows,
            "n_chunks": self.n_chunks,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Layout":
        return cls(d["n_windows"], d["context_size"], d["exclude_bos"], d["windows_per_chunk"])

    @classmethod
    def plan(cls, n_windows: int, context_size: int, exclude_bos: bool, chunk_rows: int) -> "Layout":
        """Round the requested chunk size down to whole windows (at least one)."""
        rows_per_window = context_size - (1 if exclude_bos else 0)
        return cls(n_windows, context_size, exclude_bos, max(1, chunk_rows // rows_per_window))


@dataclass(frozen=True)
class HookStats:
    """Statistics accumulated while writing, for input normalisation."""

    mean: np.ndarray  # (d_model,) float64
    mean_sq_norm: float  # E ||x||^2
    mean_norm: float  # E ||x||
    n_rows: int


class ActivationStore:
    """Read-only view of a store written by ``actcache extract``: a local path or an fsspec URL.

    ``path`` is a ``Path`` for a local store and the public (redacted) URL string otherwise;
    ``location`` can list, size and open the store either way.
    """

    def __init__(self, path: str | Path | StoreLocation, *, require_complete: bool = True):
        self.location = path if isinstance(path, StoreLocation) else StoreLocation(path)
        self.path: Path | str = self.location.local if self.location.is_local else self.location.display
        if not self.location.exists("zarr.json"):
            raise ActcacheError(f"{self.path} is not a store: no zarr.json there (run actcache extract first)")
        self.group = self.location.open_group("r")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        fmt = self.attrs.get("format", {})
        if fmt.get("name") != FORMAT_NAME:
            raise ActcacheError(f"{self.path} is a Zarr group but not an actcache store")
        if fmt.get("version", 0) > FORMAT_VERSION:
            raise ActcacheError(
                f"{self.path} has store format {fmt.get('version')}, newer than this actcache reads "
                f"({FORMAT_VERSION}): upgrade actcache-sae"
            )
        if require_complete and not self.attrs.get("complete", False):
            raise ActcacheError(f"{self.path} is incomplete: finish it with actcache extract --resume")
        self.layout = Layout.from_dict(self.attrs["layout"])
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def hooks(self) -> list[str]:
        return list(self.attrs["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    @property
    def logical_dtype(self) -> str:
        return str(self.attrs["dtype"])

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def n_chunks(self) -> int:
        return self.layout.n_chunks

    def array(self, hook: str) -> zarr.Array:
        """The raw hook array (storage dtype: uint16 bit patterns for bfloat16)."""
        if hook not in self.hooks:
            raise ActcacheError(f"hook {hook} is not in store {self.path}: it holds {', '.join(self.hooks)}")
        if hook not in self._arrays:  # opened once: on object stores each open is a GET
            self._arrays[hook] = self.group[hook]
        return self._arrays[hook]

    def read_chunk(self, hook: str, chunk: int) -> torch.Tensor:
        """One chunk as a (rows, d_model) tensor in the logical dtype, bit-exact."""
        start, stop = self.layout.chunk_rows_range(chunk)
        return from_storage(self.array(hook)[start:stop], self.logical_dtype)

    def read_rows(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Rows as float32 numpy (exact for every logical dtype)."""
        return to_float32(self.array(hook)[start:stop], self.logical_dtype)

    def chunk_key(self, hook: str, chunk: int) -> str:
        """The object key (relative to the store root) of a hook's store chunk."""
        return f"{hook}/{self.array(hook).metadata.encode_chunk_key((chunk, 0))}"

    def chunk_exists(self, hook: str, chunk: int) -> bool:
        """zarr reads a missing chunk as fill values (zeros): this tells the two apart."""
        return self.location.exists(self.chunk_key(hook, chunk))

    def chunk_keys(self, hook: str) -> set[str]:
        """Keys of every chunk object of a hook that exists, from one listing of the store."""
        return set(self.location.sizes(f"{hook}/c"))

    def completed_chunks(self) -> np.ndarray:
        return self.group[MANIFEST][:].astype(bool)

    def stats(self, hook: str) -> HookStats:
        self.array(hook)
        s = self.attrs.get("stats", {}).get(hook)
        if s is None:
            raise ActcacheError(f"store {self.path} has no statistics for {hook}: it is incomplete")
        return HookStats(np.asarray(s["mean"], dtype=np.float64), s["mean_sq_norm"], s["mean_norm"], s["n_rows"])

    def to_dask(self, hook: str):
        """Lazy float32 dask array of a hook, one dask chunk per store chunk."""
        import dask.array as da

        raw = da.from_zarr(self.array(hook))
        logical = self.logical_dtype
        return raw.map_blocks(to_float32, logical, dtype=np.float32)


def open_store(path: str | Path, *, require_complete: bool = True) -> ActivationStore:
    """Open a store by local path or fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``)."""
    return ActivationStore(path, require_complete=require_complete)
