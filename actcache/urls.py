"""Where a store lives: a local path, or an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``).

Credentials come only from the environment: s3fs/gcsfs read their usual variables
(``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``...) and fsspec applies ``FSSPEC_<PROTOCOL>_<OPTION>``
variables (e.g. ``FSSPEC_S3_ENDPOINT_URL``) itself; actcache passes no credentials of its own.
A URL's userinfo (``user:secret@``), query (``?token=...``) and fragment are removed before
anything sees it, fsspec and its debug logs included (:func:`redact`, with one warning that
names the parts dropped, never their values): what is opened, shown, logged, sent to dask
workers and written to store attributes is the same public URL.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import zarr

from actcache.errors import ActcacheError

log = logging.getLogger(__name__)

# Writable schemes -> the package that implements them (None: fsspec itself).
SCHEMES = {"file": None, "memory": None, "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
# Not credentials: protocol defaults without which zarr cannot write (no parent dirs on file://).
_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"file": {"auto_mkdir": True}}
_FIX = "use a local path or an s3://, gs://, file:// or memory:// URL"
_WARNED: set[str] = set()  # URLs already warned about (one warning per process)


def is_url(spec: str | Path) -> bool:
    return isinstance(spec, str) and "://" in spec


def redact(spec: str | Path) -> str:
    """The public form of a store location: URL userinfo, query and fragment removed."""
    s = str(spec)
    if "://" not in s:
        return s
    u = urlsplit(s)
    return urlunsplit((u.scheme, u.netloc.rpartition("@")[2], u.path, "", ""))


class StoreLocation:
    """A store's root: a local directory (zarr LocalStore) or an fsspec URL (zarr FsspecStore)."""

    def __init__(self, spec: str | Path):
        raw = os.fspath(spec)
        if not is_url(raw):
            self.scheme, self.local = "", Path(raw).expanduser()
            self.display = str(self.local)
            return
        self.local = None
        self.display = redact(raw)
        self.scheme = raw.split("://", 1)[0].lower()
        if "::" in raw:
            raise ActcacheError(f"chained fsspec URLs are not supported ({self.display}): {_FIX}")
        if self.scheme not in SCHEMES:
            raise ActcacheError(f"unsupported store URL scheme {self.scheme!r} in {self.display}: {_FIX}")
        pkg = SCHEMES[self.scheme]
        if pkg and importlib.util.find_spec(pkg) is None:
            raise ActcacheError(f"{self.scheme}:// stores need the {pkg} package: "
                                f"pip install 'actcache-sae[remote]'")
        if self.display != raw:
            u = urlsplit(raw)
            dropped = [name for name, part in (("user info", "@" in u.netloc), ("query", u.query),
                                               ("fragment", u.fragment)) if part]
            if self.display not in _WARNED:
                _WARNED.add(self.display)
                log.warning("store URL %s: ignoring its %s; credentials come only from the environment",
                            self.display, " and ".join(dropped))

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"StoreLocation({self.display!r})"

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def spec(self) -> str:
        """What another process (a dask worker) opens the same store with."""
        return str(self.local) if self.local is not None else self.display

    @property
    def shared_between_processes(self) -> bool:
        return self.scheme != "memory"  # memory:// lives in one process

    # -- zarr ------------------------------------------------------------------------------
    def zarr_store(self, *, read_only: bool) -> Any:
        if self.local is not None:
            return zarr.storage.LocalStore(self.local, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.display, storage_options=_DEFAULT_OPTIONS.get(self.scheme),
                                                 read_only=read_only)

    def open_group(self, mode: str) -> zarr.Group:
        if self.local is not None:
            return zarr.open_group(str(self.local), mode=mode)
        return zarr.open_group(store=self.zarr_store(read_only=mode == "r"), mode=mode)

    # -- objects (keys are relative to the root, "/"-separated) ------------------------------
    @cached_property
    def _fs(self) -> tuple[Any, str]:
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(self.display, **_DEFAULT_OPTIONS.get(self.scheme, {}))
        return fs, root.rstrip("/")

    def _remote(self, key: str) -> str:
        fs, root = self._fs
        return f"{root}/{key}" if key else root

    def exists(self, key: str = "") -> bool:
        if self.local is not None:
            return (self.local / key).exists()
        fs, _ = self._fs
        return bool(fs.exists(self._remote(key)))

    def is_file(self) -> bool:
        """The root itself is a file (or a single object), so no store can live there."""
        if self.local is not None:
            return self.local.exists() and not self.local.is_dir()
        fs, _ = self._fs
        return bool(fs.isfile(self._remote("")))

    def entries(self) -> list[str]:
        """Names directly under the root (files and sub-directories / prefixes)."""
        if self.local is not None:
            return [p.name for p in self.local.iterdir()] if self.local.is_dir() else []
        fs, root = self._fs
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        except FileNotFoundError:
            return []

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix`` (one listing): key relative to the root -> bytes."""
        if self.local is not None:
            base = self.local / prefix
            return {p.relative_to(self.local).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()}
        fs, root = self._fs
        found = fs.find(self._remote(prefix), detail=True)
        return {k[len(root) + 1:]: int(v.get("size") or 0) for k, v in found.items() if v.get("type") != "directory"}

    def read_text(self, key: str) -> str:
        if self.local is not None:
            return (self.local / key).read_text()
        fs, _ = self._fs
        return fs.cat_file(self._remote(key)).decode()

    def write_text(self, key: str, text: str, *, create: bool = False) -> None:
        """One object PUT; ``create``: FileExistsError if it exists (atomic where the backend can)."""
        if self.local is not None:
            if create:
                self._create_local(key, text)
                return
            (self.local / key).write_text(text)
            return
        fs, _ = self._fs
        try:
            fs.pipe_file(self._remote(key), text.encode(), mode="create" if create else "overwrite")
        except TypeError:  # an fsspec without pipe_file(mode=): check, then write
            if create and fs.exists(self._remote(key)):
                raise FileExistsError(key) from None
            fs.pipe_file(self._remote(key), text.encode())

    def _create_local(self, key: str, text: str) -> None:
        """Create ``key`` with its content in one step (a hard link of a finished temp file), so
        nobody ever sees it empty; FileExistsError if it exists."""
        tmp = self.local / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, self.local / key)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: exclusive create, then write
            with open(self.local / key, "x") as f:
                f.write(text)
        finally:
            tmp.unlink(missing_ok=True)

    def age(self, key: str) -> float | None:
        """Seconds since ``key`` was last written; None when unknown (or it does not exist)."""
        try:
            if self.local is not None:
                return time.time() - (self.local / key).stat().st_mtime
            fs, _ = self._fs
            return time.time() - fs.modified(self._remote(key)).timestamp()
        except Exception:  # backends without modification times, or a missing object
            return None

    def delete(self, key: str, *, recursive: bool = False) -> None:
        if self.local is not None:
            p = self.local / key
            if p.is_dir() and recursive:
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            return
        fs, _ = self._fs
        try:
            fs.rm(self._remote(key), recursive=recursive)
        except FileNotFoundError:
            pass

    def make_writable(self) -> None:
        """Create the root (local) and prove we can write there, before any work is done."""
        probe = ".write-test"
        try:
            if self.local is not None:
                self.local.mkdir(parents=True, exist_ok=True)
            self.write_text(probe, "")
            self.delete(probe)
        except OSError as e:
            why = e.strerror or f"{type(e).__name__}: {e}"
            raise ActcacheError(f"cannot write the store at {self.display} ({why}): choose a writable --out") from None
        except Exception as e:  # remote back-ends raise their own errors (credentials, bucket...)
            raise ActcacheError(f"cannot write the store at {self.display} ({type(e).__name__}): check the URL "
                                "and the credentials in the environment, or choose another --out") from None
