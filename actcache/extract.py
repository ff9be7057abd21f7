"""``actcache extract``: model + corpus -> a complete, resumable Zarr v3 store."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers

from actcache import __version__
from actcache.config import ExtractConfig
from actcache.corpus import check_corpus, dataset_kind, iter_documents
from actcache.device import resolve_compute_dtype, resolve_device
from actcache.dtypes import check_logical, torch_dtype
from actcache.errors import ActcacheError, StoreCorruptError
from actcache.hooks import HookSpec, parse_hooks
from actcache.lock import StoreLock
from actcache.models import LoadedModel, load_model, n_layers, resolve_model_config
from actcache import store as S
from actcache.store import LOCK_FILE, Layout
from actcache.store_writer import StoreWriter, compressors_for
from actcache.urls import StoreLocation
from actcache.windows import pack_windows

log = logging.getLogger(__name__)

CLEARING_MARKER = ".actcache.clearing"  # present while a path is being cleared for a new store


class Progress(Protocol):
    """What extraction reports; the CLI renders it with rich."""

    def start(self, total_rows: int, done_rows: int) -> None: ...
    def advance(self, rows: int) -> None: ...


class _StopOnSignal:
    """First SIGINT/SIGTERM: finish the current chunk, then stop cleanly (libraries such as
    zarr's sync layer may otherwise swallow a KeyboardInterrupt). A second one interrupts now."""

    def __init__(self) -> None:
        self._stop = False
        self._old: dict[int, Any] = {}

    def requested(self) -> bool:
        return self._stop

    def _handle(self, signum, frame) -> None:
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _validate(cfg: ExtractConfig, distributed: bool) -> tuple[list[HookSpec], StoreLocation]:
    loc = StoreLocation(cfg.out)  # a bad URL fails first, before any other work
    if distributed and not loc.shared_between_processes:
        raise ActcacheError(f"{loc} lives in this process only, so dask workers cannot write it: "
                            "use an s3://, gs:// or file:// URL or a shared path, or drop --workers/--scheduler")
    check_logical(cfg.dtype)
    if cfg.compute_dtype != "auto":
        check_logical(cfg.compute_dtype)
    compressors_for(cfg.codec, 2)
    resolve_device(cfg.device)
    for name in ("context_size", "batch_size", "chunk_rows", "queue_depth"):
        if getattr(cfg, name) < 1:
            raise ActcacheError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.writer_threads < 0:
        raise ActcacheError(f"--writer-threads must be >= 0 (0: one per core, at most 4), got {cfg.writer_threads}")
    if cfg.context_size < 2:  # a window is BOS + at least one corpus token
        raise ActcacheError(f"--context-size {cfg.context_size} is too small: use at least 2")
    if cfg.n_tokens is not None and cfg.n_tokens < 1:
        raise ActcacheError(f"--n-tokens must be a positive number of rows, got {cfg.n_tokens}")
    if cfg.exclude_bos and not cfg.prepend_bos:
        raise ActcacheError("--exclude-bos needs BOS tokens: drop it or drop --no-prepend-bos")
    if cfg.seed < 0:
        raise ActcacheError(f"--seed {cfg.seed} must be >= 0")
    check_corpus(cfg.dataset)  # missing, unsupported or binary corpora fail before anything is written
    parse_hooks(list(cfg.hooks))  # bad names fail before the (slower) model config is resolved
    mcfg = resolve_model_config(cfg.model, cfg.gguf_file)
    specs = parse_hooks(list(cfg.hooks), n_layers(mcfg))
    max_pos = getattr(mcfg, "max_position_embeddings", None)
    if max_pos and cfg.context_size > max_pos:
        raise ActcacheError(f"--context-size {cfg.context_size} exceeds the model's {max_pos} positions")
    return specs, loc


def _is_store(path: StoreLocation) -> bool:
    return path.exists("zarr.json")


def _stored_config(path: StoreLocation) -> tuple[dict[str, Any], bool]:
    attrs = dict(S.open_group(path, "r").attrs)
    cfg = attrs.get("extract_config", {})
    return (cfg if isinstance(cfg, dict) else {}), bool(attrs.get("tokens_written"))


def _check_resume(path: StoreLocation, cfg: ExtractConfig) -> None:
    stored, _ = _stored_config(path)
    if not stored:
        raise ActcacheError(f"{path} is a Zarr group but not an actcache store: choose another --out")
    try:
        old = ExtractConfig.from_dict(stored).identity()
    except (KeyError, TypeError):
        raise StoreCorruptError(f"{path}/zarr.json holds a damaged extract_config: re-extract with --overwrite") from None
    new = cfg.identity()
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if diff:
        raise ActcacheError(
            f"cannot resume {path} with different parameters ({'; '.join(diff)}): "
            "rerun with the original ones, or use --overwrite to start again"
        )


def _ours(path: StoreLocation) -> bool:
    """An actcache store, even one whose root ``zarr.json`` is damaged (its manifest array is there)."""
    try:
        return bool(_stored_config(path)[0])
    except StoreCorruptError:
        return path.exists(f"{S.MANIFEST}/zarr.json")


def _prepare_out(path: StoreLocation, cfg: ExtractConfig, resume: bool, overwrite: bool) -> str:
    """Decide 'new', 'resume' or 'overwrite' before anything is written; refuse what would lose data."""
    if resume and overwrite:
        raise ActcacheError("--resume and --overwrite exclude each other: pick one")
    if path.is_file():
        raise ActcacheError(f"--out {path} is a file: give a directory path for the store")
    if path.exists(CLEARING_MARKER):  # an --overwrite (or a restart) killed while it cleared the path
        if overwrite or resume:
            return "overwrite"
        raise ActcacheError(f"{path} holds a store whose replacement was interrupted: rerun with --overwrite")
    if _is_store(path):
        if overwrite:
            if not _ours(path):
                raise ActcacheError(f"refusing to overwrite {path}: it is not an actcache store")
            return "overwrite"
        if resume:
            _check_resume(path, cfg)
            return "resume"
        raise ActcacheError(f"store {path} already exists: pass --resume to finish it or --overwrite to replace it")
    if any(name not in (LOCK_FILE, CLEARING_MARKER) and not name.endswith(".partial") for name in path.entries()):
        raise ActcacheError(f"--out {path} exists and is not an actcache store: choose a new path")
    path.make_writable()
    return "new"


def _clear_store(path: StoreLocation) -> None:
    """Delete everything but our lock, in place (URL stores, or a restart before any chunk): the
    marker written first makes an interrupted delete recognisable as ours, so a rerun clears it."""
    path.write_text(CLEARING_MARKER, "")
    names = sorted(path.entries(), key=lambda n: n != "zarr.json")
    for name in names:
        if name not in (LOCK_FILE, CLEARING_MARKER):
            path.delete(name, recursive=True)


def _attrs(cfg: ExtractConfig, lm: LoadedModel, specs: list[HookSpec], windows) -> dict[str, Any]:
    return {
        "model": {"id": cfg.model, "resolved_path": lm.resolved_path, "revision": lm.revision,
                  "config_hash": lm.config_hash, "architecture": type(lm.model).__name__,
                  "n_layers": n_layers(lm.model.config), "gguf_file": lm.gguf_file},
        "tokenizer_id": lm.tokenizer_id,
        "compute_dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "layers": [s.layer for s in specs],
        "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos, "exclude_bos": cfg.exclude_bos,
        "seed": cfg.seed,
        "dataset": {"path": cfg.dataset, "kind": dataset_kind(cfg.dataset), "text_field": cfg.text_field,
                    "sha256": windows.corpus_sha256,
                    "n_documents_read": windows.n_documents_read, "n_documents_used": windows.n_documents_used},
        "package_version": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "extract_config": {**cfg.to_dict(), "out": str(StoreLocation(cfg.out))},  # URL userinfo/query stripped
    }


def _create(path: StoreLocation, cfg: ExtractConfig, lm: LoadedModel, specs: list[HookSpec]) -> StoreWriter:
    docs = iter_documents(cfg.dataset, cfg.text_field)
    win = pack_windows(docs, lm.tokenizer, context_size=cfg.context_size, n_windows=cfg.n_windows(),
                       prepend_bos=cfg.prepend_bos, seed=cfg.seed)
    layout = Layout.plan(len(win.tokens), cfg.context_size, cfg.exclude_bos, cfg.chunk_rows)
    writer = StoreWriter.create(path, attrs=_attrs(cfg, lm, specs, win), layout=layout,
                                hooks=[s.name for s in specs], d_model=lm.model.config.hidden_size,
                                logical_dtype=cfg.dtype, codec=cfg.codec,
                                windows=win.tokens, window_source=win.source)
    path.delete(CLEARING_MARKER)  # a store is there again: an interrupted clear is over
    return writer


# --- --overwrite of a local store: built beside the old one, swapped in when complete ----------------


def _staging(out: Path) -> Path:
    return out.with_name(f".{out.name}.overwrite")  # the new store while it is written


def _trash(out: Path) -> Path:
    return out.with_name(f".{out.name}.replaced")  # the old store between the two renames of the swap


def _complete(path: Path) -> bool:
    try:
        return bool(S.open_group(StoreLocation(path), "r").attrs.get("complete"))
    except (ActcacheError, OSError):
        return False


def recover_overwrite(out: Path) -> None:
    """Finish (or undo) a swap that a kill interrupted, so ``out`` holds the old store or the new one.

    The swap is ``out -> trash``, ``staging -> out``, delete trash; each rename is atomic."""
    staging, trash = _staging(out), _trash(out)
    if not out.exists() and trash.exists():
        if staging.exists() and _complete(staging):
            log.warning("finishing the interrupted --overwrite of %s", out)
            staging.rename(out)
        else:
            trash.rename(out)
    if out.exists() and trash.exists():
        shutil.rmtree(trash, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(staging: Path, out: Path) -> None:
    """The complete new store at ``staging`` becomes ``out``; the old store is deleted."""
    trash = _trash(out)
    if _exchange(staging, out):  # no instant without a store at out
        staging.rename(trash)
    else:  # two renames; recover_overwrite finishes them after a kill in between
        out.rename(trash)
        staging.rename(out)
    shutil.rmtree(trash, ignore_errors=True)


def _open_staging(out: Path, cfg: ExtractConfig) -> tuple[StoreLocation, str]:
    """Where the new store is built, and whether an interrupted run of the same command is continued."""
    loc = StoreLocation(_staging(out))
    if loc.exists():
        try:
            if _is_store(loc) and not loc.exists(CLEARING_MARKER):
                _check_resume(loc, cfg)
                return loc, "resume"  # the same --overwrite was interrupted: keep its finished chunks
        except ActcacheError:
            pass
        shutil.rmtree(loc.local)  # another command's unfinished store: nothing in it is kept
    loc.make_writable()
    return loc, "new"


# --- extraction ---------------------------------------------------------------------------------------


def _run(path: StoreLocation, cfg: ExtractConfig, specs: list[HookSpec], mode: str, *, workers: int,
         scheduler: str | None, progress: Progress | None) -> StoreWriter:
    """Create (``new``/``overwrite``) or finish (``resume``) the store at ``path``; the caller holds the lock."""
    distributed = bool(workers or scheduler)
    if mode == "resume" and not _stored_config(path)[1]:
        mode = "overwrite"  # interrupted while writing tokens: nothing worth keeping yet
    if mode == "overwrite":
        _clear_store(path)
    lm = None
    if mode != "resume" or not distributed:
        device = resolve_device(cfg.device)
        compute = resolve_compute_dtype(cfg.compute_dtype, cfg.dtype, device)
        lm = load_model(cfg.model, gguf_file=cfg.gguf_file, dtype=torch_dtype(compute),
                        device=device, keep_layers=max(s.layer for s in specs) + 1)
    writer = StoreWriter(path) if mode == "resume" else _create(path, cfg, lm, specs)
    pending = writer.pending_chunks()
    lay = writer.layout
    if progress:
        done = lay.n_rows - sum(lay.chunk_rows_range(c)[1] - lay.chunk_rows_range(c)[0] for c in pending)
        progress.start(lay.n_rows, done)
    if pending and distributed:
        from actcache.parallel import run_distributed

        del lm  # workers load their own copies
        run_distributed(path.spec, cfg, pending, workers=workers, scheduler=scheduler,
                        on_rows=progress.advance if progress else None)
    elif pending:
        from actcache.runner import run_chunks

        with _StopOnSignal() as stop:
            run_chunks(writer, lm.model, specs, pending, batch_size=cfg.batch_size,
                       queue_depth=cfg.queue_depth, writer_threads=cfg.writer_threads, should_stop=stop.requested,
                       on_written=(lambda c, rows: progress.advance(rows)) if progress else None)
    if not writer.group.attrs.get("complete"):
        writer.finalize()
    return writer


def _forget_new_dir(path: StoreLocation, existed: bool) -> None:
    """A new store that failed before its ``zarr.json`` leaves nothing behind: the directory we
    made goes (only if empty: our lock is already released)."""
    if path.is_local and not existed and not _is_store(path):
        try:
            path.local.rmdir()
        except OSError:
            pass


def extract(
    cfg: ExtractConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    workers: int = 0,
    scheduler: str | None = None,
    progress: Progress | None = None,
) -> Path | str:
    """Write (or finish) the store ``cfg.out`` (a path or an fsspec URL); returns it once complete:
    a ``Path`` for a local store, the public URL (userinfo and query stripped) otherwise.

    ``overwrite`` of a local store builds the new store beside the old one and swaps it in at the
    end, so a kill at any point leaves the old store or the new one; rerunning the command works."""
    if workers < 0:
        raise ActcacheError(f"--workers {workers} must be >= 0 (0: extract in this process)")
    specs, path = _validate(cfg, bool(workers or scheduler))
    if path.is_local:
        recover_overwrite(path.local)
    existed = path.exists()
    mode = _prepare_out(path, cfg, resume, overwrite)
    kw = dict(workers=workers, scheduler=scheduler, progress=progress)
    try:
        with StoreLock(path, LOCK_FILE):  # for an overwrite: the old store, untouched until the swap
            if mode == "overwrite" and path.is_local and _is_store(path):
                staging, how = _open_staging(path.local, cfg)
                writer = _run(staging, cfg, specs, how, **kw)
                _swap_in(staging.local, path.local)
            else:
                writer = _run(path, cfg, specs, mode, **kw)
    except BaseException:
        if mode == "new":
            _forget_new_dir(path, existed)
        raise
    log.info("store %s complete (%d rows)", path, writer.layout.n_rows)
    return path.local if path.is_local else path.spec
