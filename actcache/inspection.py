"""``actcache info`` and ``actcache verify``: what a store holds, and whether it is sound."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np

from actcache import store as S
from actcache.dtypes import storage_dtype, to_float32
from actcache.errors import StoreCorruptError

# Relative L2 error allowed when recomputing a window: batch shape changes low-order bits.
RECOMPUTE_TOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}


def store_info(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary: layout, per-hook shapes, codec, bytes stored and statistics.

    ``path`` may be a URL; bytes come from one listing of each hook's objects."""
    st = S.open_store(path, require_complete=False)
    hooks = []
    for h in st.hooks:
        arr = st.array(h)
        raw = int(np.prod(arr.shape)) * arr.dtype.itemsize
        disk = sum(st.location.sizes(h).values())
        s = st.attrs.get("stats", {}).get(h, {})
        hooks.append({"hook": h, "shape": list(arr.shape), "chunks": list(arr.chunks),
                      "storage_dtype": str(arr.dtype), "bytes_raw": raw, "bytes_on_disk": disk,
                      "ratio": raw / disk if disk else None, "mean_norm": s.get("mean_norm"),
                      "mean_sq_norm": s.get("mean_sq_norm")})
    done = st.completed_chunks()
    ds = st.attrs.get("dataset", {})
    return {"path": str(st.path), "complete": bool(st.attrs.get("complete")), "model": st.attrs["model"]["id"],
            "dataset": ds.get("path"), "n_documents_read": ds.get("n_documents_read", ds.get("n_documents")),
            "n_documents_used": ds.get("n_documents_used"), "format_version": st.format_version,
            "checksums": "crc32c" if st.checksummed else None, "dtype": st.logical_dtype,
            "compute_dtype": st.attrs.get("compute_dtype"), "codec": st.attrs["codec"],
            "d_model": st.d_model, "context_size": st.attrs["context_size"], "n_rows": st.n_rows,
            "n_chunks": st.n_chunks, "chunks_done": int(done.sum()), "chunk_rows": st.layout.chunk_rows,
            "bytes_per_token": sum(h["bytes_on_disk"] for h in hooks) / max(1, st.n_rows),
            "hooks": hooks}


@dataclass(frozen=True)
class Finding:
    """One damaged or wrong chunk of one array: what ``verify --repair`` acts on."""

    array: str  # a hook, tokens, windows, stats/<hook>/sum, manifest...
    chunk: int  # the store chunk (== the array's zarr chunk along its first axis)
    text: str

    @property
    def repair(self) -> str:
        """``recompute``: un-commit, ``--resume`` writes it again; ``rewrite``: derived from the
        windows and the seed, rewritten in place; ``none``: the model inputs themselves are lost."""
        if self.array in S.ROW_ARRAYS or self.array == S.WINDOW_SOURCE:
            return "rewrite"
        return "none" if self.array == S.WINDOWS else "recompute"


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    windows_recomputed: int = 0
    max_recompute_error: float | None = None
    problems: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # the per-chunk problems, also in ``problems``
    notes: list[str] = field(default_factory=list)  # facts that are not problems (an unchecksummed store)
    checksummed: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, f: Finding) -> None:
        self.findings.append(f)
        self.problems.append(f.text)


def _chunk_span(st: S.ActivationStore, name: str, c: int) -> tuple[int, int]:
    """Range of chunk ``c`` along the first axis of array ``name``."""
    if name in st.hooks or name in S.ROW_ARRAYS:
        return st.layout.chunk_rows_range(c)
    if name in S.WINDOW_ARRAYS:
        return st.layout.chunk_windows(c)
    return c, c + 1  # stats/<hook>/* and the manifest: one element (row) per chunk


def _read_checked(st: S.ActivationStore, name: str, c: int, out: list[Finding]) -> np.ndarray | None:
    lo, hi = _chunk_span(st, name, c)
    try:
        return st.read(name, lo, hi)
    except StoreCorruptError:
        key = S.chunk_key(st.named_array(name), name, c)
        try:
            st.named_array(name)[lo:hi]
        except Exception as e:  # the reader's error is one line for users; here the cause is enough
            out.append(Finding(name, c, f"{name} chunk {c}: {S.describe_damage(e)} ({key})"))
        return None


def _check_chunk(st: S.ActivationStore, c: int, present: set[str]) -> list[Finding]:
    r0, r1 = st.layout.chunk_rows_range(c)
    w0, w1 = st.layout.chunk_windows(c)
    out: list[Finding] = []
    for h in st.hooks:
        # zarr reads a missing chunk as fill values (zeros), which would pass every other check.
        if st.chunk_key(h, c) not in present:
            out.append(Finding(h, c, f"{h} chunk {c}: chunk file is missing ({st.chunk_key(h, c)})"))
            continue
        a = _read_checked(st, h, c, out)
        if a is None:
            continue
        if a.dtype != storage_dtype(st.logical_dtype) or a.shape != (r1 - r0, st.d_model):
            out.append(Finding(h, c, f"{h} chunk {c}: shape/dtype {a.shape}/{a.dtype} do not match the store"))
            continue
        bad = int((~np.isfinite(to_float32(a, st.logical_dtype))).sum())
        if bad:
            out.append(Finding(h, c, f"{h} chunk {c}: {bad} NaN/Inf values"))
        for name in S.STATS_ARRAYS:
            _read_checked(st, S.stats_array(h, name), c, out)
    rpw, first = st.layout.rows_per_window, st.layout.first_position
    expected = {S.WINDOW: np.repeat(np.arange(w0, w1), rpw),
                S.POSITION: np.tile(np.arange(first, st.layout.context_size), w1 - w0)}
    windows = _read_checked(st, S.WINDOWS, c, out)
    source = _read_checked(st, S.WINDOW_SOURCE, c, out)
    if source is not None and not ((source >= 0) & (source < st.layout.n_windows)).all():
        out.append(Finding(S.WINDOW_SOURCE, c, f"{S.WINDOW_SOURCE} chunk {c}: indices outside the corpus's windows"))
    if windows is not None:
        expected[S.TOKENS] = windows[:, first:].reshape(-1)
    for name in S.ROW_ARRAYS:
        got = _read_checked(st, name, c, out)
        if got is not None and name in expected and not np.array_equal(got, expected[name]):
            what = "the stored windows" if name == S.TOKENS else "the layout"
            out.append(Finding(name, c, f"{name} chunk {c}: do not match {what}"))
    return out


def _manifest(st: S.ActivationStore, report: VerifyReport) -> np.ndarray:
    """Committed chunks; a damaged manifest entry is a finding and counts as not committed."""
    try:
        return st.completed_chunks()
    except StoreCorruptError:
        done = np.zeros(st.n_chunks, dtype=bool)
        for c in range(st.n_chunks):
            v = _read_checked(st, S.MANIFEST, c, report.findings)
            done[c] = bool(v is not None and v[0])
        report.problems.extend(f.text for f in report.findings)
        return done


def _recompute(st: S.ActivationStore, n: int, seed: int, device: str, report: VerifyReport) -> None:
    import torch

    from actcache.capture import ResidualCapture
    from actcache.device import resolve_device
    from actcache.dtypes import torch_dtype
    from actcache.hooks import parse_hooks
    from actcache.models import load_model

    specs = parse_hooks(st.hooks)
    cfg = st.attrs["extract_config"]
    compute = st.attrs.get("compute_dtype", st.logical_dtype)
    lm = load_model(cfg["model"], gguf_file=cfg.get("gguf_file"), dtype=torch_dtype(compute),
                    device=resolve_device(device), keep_layers=max(s.layer for s in specs) + 1)
    rng = np.random.default_rng(seed)
    picks = rng.choice(st.layout.n_windows, size=min(n, st.layout.n_windows), replace=False)
    rpw, first = st.layout.rows_per_window, st.layout.first_position
    worst = 0.0
    with ResidualCapture(lm.model, specs) as cap:
        for w in sorted(int(p) for p in picks):
            ids = torch.from_numpy(st.read_windows(w, w + 1).astype(np.int64)).to(lm.model.device)
            acts = cap.run(ids)
            for h in st.hooks:
                got = acts[h][0, first:].to(torch_dtype(st.logical_dtype)).float().cpu().numpy()
                stored = st.read_rows(h, w * rpw, (w + 1) * rpw)
                err = float(np.linalg.norm(got - stored) / max(np.linalg.norm(stored), 1e-30))
                worst = max(worst, err)
                if not err <= RECOMPUTE_TOL[st.logical_dtype]:
                    report.add(Finding(h, w // st.layout.windows_per_chunk,
                                       f"{h} window {w}: recomputed activations differ (relative error {err:.2e})"))
            report.windows_recomputed += 1
    report.max_recompute_error = worst


def verify_store(path: str | Path, *, recompute: int = 0, seed: int = 0, device: str = "auto") -> VerifyReport:
    """Every committed chunk of every array: its checksum (format 2 on), that it decodes with the
    right shape/dtype, no NaN/Inf, tokens/window/position consistent with the windows; manifest complete."""
    st = S.open_store(path, require_complete=False)
    report = VerifyReport(checksummed=st.checksummed)
    if not st.checksummed:
        report.notes.append(f"store format {st.format_version} has no checksums: a changed byte that still decodes "
                            "cannot be detected; re-extract with this version (--overwrite) to get crc32c per chunk")
    done = _manifest(st, report)
    if not done.all():
        report.problems.append(f"manifest incomplete: {int((~done).sum())} of {len(done)} chunks not written "
                               "(finish with actcache extract --resume)")
    elif not st.attrs.get("complete"):
        report.problems.append("all chunks written but the store was not finalised: run actcache extract --resume")
    chunks = [int(c) for c in np.flatnonzero(done)]
    present = set().union(*(st.chunk_keys(h) for h in st.hooks))  # the store's listing, local or remote
    check = dask.delayed(functools.partial(_check_chunk, st, present=present), pure=True)
    for found in dask.compute(*[check(c) for c in chunks], scheduler="threads"):
        for f in found:
            report.add(f)
    report.chunks_checked = len(chunks)
    if recompute > 0 and report.ok:
        _recompute(st, recompute, seed, device, report)
    return report
