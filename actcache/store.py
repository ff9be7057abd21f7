"""The store contract: layout, names and the reader (see docs/store-format.md).

This module is the only part of ``actcache`` the trainer imports. It knows how rows are
arranged in a store and how to read them back exactly; writing lives in ``store_writer``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from actcache.dtypes import from_storage, to_float32
from actcache.errors import ActcacheError, StoreCorruptError
from actcache.urls import StoreLocation

FORMAT_NAME = "actcache"
FORMAT_VERSION = 2  # 2: every array carries zarr's crc32c codec (version 1 stores are read, unchecked)
CHECKSUM_SINCE = 2  # first format version whose chunks carry a crc32c checksum

# Array names inside the group (hook arrays are named by their hook, e.g. blocks.5.hook_resid_post).
WINDOWS = "windows"  # (n_windows, context_size) int32: the model inputs, in store order
WINDOW_SOURCE = "window_source"  # (n_windows,) int64: index of each window in corpus order
TOKENS = "tokens"  # (n_rows,) int32: the token at each row
WINDOW = "window"  # (n_rows,) int32: index into WINDOWS of each row
POSITION = "position"  # (n_rows,) int16: position of each row inside its window
MANIFEST = "manifest"  # (n_chunks,) uint8, one zarr chunk per element: 1 = chunk complete
STATS = "stats"  # group: stats/<hook>/{sum, sum_sq_norm, sum_norm}, one row per chunk
LOCK_FILE = ".actcache.lock"
ROW_ARRAYS = (TOKENS, WINDOW, POSITION)  # (n_rows,): store chunk c is zarr chunk c
WINDOW_ARRAYS = (WINDOWS, WINDOW_SOURCE)  # (n_windows, ...): store chunk c is zarr chunk c
STATS_ARRAYS = ("sum", "norms")  # stats/<hook>/<name>: (n_chunks, ...), one zarr chunk per store chunk


def stats_array(hook: str, name: str) -> str:
    return f"{STATS}/{hook}/{name}"


def describe_damage(err: BaseException) -> str:
    """What went wrong with a chunk's bytes, in a few words (zarr's messages run long)."""
    text = str(err)
    if "checksum" in text.lower():
        return "crc32c checksum mismatch"
    return f"cannot be decoded: {type(err).__name__}: {text.splitlines()[0][:120] if text else ''}".rstrip(": ")


def repair_hint(store: object) -> str:
    return (f"run `actcache verify {store} --repair` to un-commit the damaged chunks, then rerun the "
            f"store's extract command with --resume to recompute them")


def open_group(location: StoreLocation, mode: str) -> zarr.Group:
    """The store's root group; damaged metadata (a half-written or invalid ``zarr.json``) is a
    :class:`StoreCorruptError` naming the file, never a JSONDecodeError."""
    try:
        return location.open_group(mode)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"{location}/zarr.json is damaged (not valid JSON: {e}): the store's metadata "
                                "cannot be read; re-extract it with --overwrite") from None
    except (ValueError, TypeError, KeyError) as e:
        raise StoreCorruptError(f"{location}/zarr.json is not valid Zarr v3 group metadata ({type(e).__name__}: "
                                f"{str(e)[:160]}): re-extract the store with --overwrite") from None
    except FileNotFoundError:
        raise ActcacheError(f"{location} is not a store: no zarr.json there (run actcache extract first)") from None


def open_array(group: zarr.Group, name: str, location: StoreLocation) -> zarr.Array:
    """An array of the store; its damaged ``zarr.json`` is a :class:`StoreCorruptError`."""
    try:
        node = group[name]
    except KeyError:
        raise StoreCorruptError(f"{location} has no array {name} (its {name}/zarr.json is missing): "
                                "the store is damaged; re-extract it with --overwrite") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise StoreCorruptError(f"{location}/{name}/zarr.json is damaged ({type(e).__name__}: {str(e)[:160]}): "
                                "re-extract the store with --overwrite") from None
    if not isinstance(node, zarr.Array):
        raise StoreCorruptError(f"{location}/{name} is a group, not an array: re-extract the store with --overwrite")
    return node


def chunk_key(array: zarr.Array, name: str, chunk: int) -> str:
    """Object key (relative to the store root) of zarr chunk ``chunk`` along the first axis."""
    return f"{name}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"


def has_checksum(array: zarr.Array) -> bool:
    from zarr.codecs import Crc32cCodec

    return any(isinstance(c, Crc32cCodec) for c in array.compressors)


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
        if self.location.is_file():
            raise ActcacheError(f"{self.path} is a file, not a store: pass the store's directory")
        if not self.location.exists("zarr.json"):
            raise ActcacheError(f"{self.path} is not a store: no zarr.json there (run actcache extract first)")
        self.group = open_group(self.location, "r")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        fmt = self.attrs.get("format", {})
        if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
            raise ActcacheError(f"{self.path} is a Zarr group but not an actcache store: pass a store written by "
                                "actcache extract")
        if not isinstance(fmt.get("version"), int) or fmt["version"] > FORMAT_VERSION:
            raise ActcacheError(
                f"{self.path} has store format {fmt.get('version')!r}, newer than this actcache reads "
                f"({FORMAT_VERSION}): upgrade actcache-sae"
            )
        self.format_version: int = fmt["version"]
        if require_complete and not self.attrs.get("complete", False):
            raise ActcacheError(f"{self.path} is incomplete: finish it with actcache extract --resume")
        try:
            self.layout = Layout.from_dict(self.attrs["layout"])
            for key, kind in (("hooks", list), ("d_model", int), ("dtype", str)):
                if not isinstance(self.attrs[key], kind):
                    raise TypeError(key)
        except (KeyError, TypeError) as e:
            raise StoreCorruptError(f"{self.path}/zarr.json lacks a valid {e} attribute: the store's metadata is "
                                    "damaged; re-extract it with --overwrite") from None
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
    def checksummed(self) -> bool:
        """Written with a crc32c checksum per chunk (format 2 on); older stores are read unchecked."""
        return self.format_version >= CHECKSUM_SINCE

    @property
    def n_chunks(self) -> int:
        return self.layout.n_chunks

    def array(self, hook: str) -> zarr.Array:
        """The raw hook array (storage dtype: uint16 bit patterns for bfloat16)."""
        if hook not in self.hooks:
            raise ActcacheError(f"hook {hook} is not in store {self.path}: it holds {', '.join(self.hooks)}")
        return self.named_array(hook)

    def named_array(self, name: str) -> zarr.Array:
        """Any array of the store by its path (a hook, ``tokens``, ``stats/<hook>/sum``...)."""
        if name not in self._arrays:  # opened once: on object stores each open is a GET
            self._arrays[name] = open_array(self.group, name, self.location)
        return self._arrays[name]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` along the first axis of array ``name``, in its stored dtype.

        A chunk that fails its checksum or does not decode raises :class:`StoreCorruptError`
        naming the array, the chunk and its file: its bytes are never returned."""
        arr = self.named_array(name)
        try:
            return arr[start:stop]
        except Exception as err:
            raise self._locate_damage(name, start, stop, err) from None

    def _locate_damage(self, name: str, start: int, stop: int, err: BaseException) -> StoreCorruptError:
        """The first chunk of ``[start, stop)`` that does not read, as the error to raise."""
        arr = self.named_array(name)
        size = arr.chunks[0]
        for c in range(start // size, max(start // size + 1, -(-stop // size))):
            try:
                arr[c * size:min((c + 1) * size, arr.shape[0])]
            except Exception as e:
                return self.corrupt(name, c, e)
        return self.corrupt(name, start // size, err)

    def corrupt(self, name: str, chunk: int, err: BaseException) -> StoreCorruptError:
        key = chunk_key(self.named_array(name), name, chunk)
        where = self.location.local / key if self.location.is_local else f"{self.location}/{key}"
        return StoreCorruptError(f"{name} chunk {chunk} is corrupted ({describe_damage(err)}) in {where}: "
                                 f"{repair_hint(self.path)}")

    def check_crc32c(self, name: str, chunk: int, raw: np.ndarray) -> None:
        """Check a chunk object read without zarr (the loader's memory map): ``raw`` is its bytes as
        zarr's crc32c codec wrote them, the data then the little-endian crc32c of the data, computed
        with the library the codec uses. A mismatch is a :class:`StoreCorruptError`."""
        import google_crc32c

        if len(raw) < 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(bytes(raw[-4:]), "little"):
            raise self.corrupt(name, chunk, ValueError("checksum mismatch"))

    def read_chunk(self, hook: str, chunk: int) -> torch.Tensor:
        """One chunk as a (rows, d_model) tensor in the logical dtype, bit-exact."""
        return from_storage(self.read_storage_chunk(hook, chunk), self.logical_dtype)

    def read_storage_chunk(self, hook: str, chunk: int) -> np.ndarray:
        """One chunk of a hook in its storage dtype (uint16 bit patterns for bfloat16)."""
        self.array(hook)
        start, stop = self.layout.chunk_rows_range(chunk)
        return self.read(hook, start, stop)

    def read_rows(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Rows as float32 numpy (exact for every logical dtype)."""
        self.array(hook)
        return to_float32(self.read(hook, start, stop), self.logical_dtype)

    def read_windows(self, start: int, stop: int) -> np.ndarray:
        """Windows ``[start, stop)`` (the model inputs, in store order), int32."""
        return self.read(WINDOWS, start, stop)

    def chunk_key(self, hook: str, chunk: int) -> str:
        """The object key (relative to the store root) of a hook's store chunk."""
        return chunk_key(self.array(hook), hook, chunk)

    def chunk_exists(self, hook: str, chunk: int) -> bool:
        """zarr reads a missing chunk as fill values (zeros): this tells the two apart."""
        return self.location.exists(self.chunk_key(hook, chunk))

    def chunk_keys(self, hook: str) -> set[str]:
        """Keys of every chunk object of a hook that exists, from one listing of the store."""
        return set(self.location.sizes(f"{hook}/c"))

    def completed_chunks(self) -> np.ndarray:
        return self.read(MANIFEST, 0, self.n_chunks).astype(bool)

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
