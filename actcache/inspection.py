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
    return {"path": str(st.path), "complete": bool(st.attrs.get("complete")), "model": st.attrs["model"]["id"],
            "dataset": st.attrs["dataset"]["path"], "dtype": st.logical_dtype, "codec": st.attrs["codec"],
            "d_model": st.d_model, "context_size": st.attrs["context_size"], "n_rows": st.n_rows,
            "n_chunks": st.n_chunks, "chunks_done": int(done.sum()), "chunk_rows": st.layout.chunk_rows,
            "bytes_per_token": sum(h["bytes_on_disk"] for h in hooks) / max(1, st.n_rows),
            "hooks": hooks}


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    windows_recomputed: int = 0
    max_recompute_error: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_chunk(st: S.ActivationStore, c: int, present: set[str]) -> list[str]:
    r0, r1 = st.layout.chunk_rows_range(c)
    out = []
    for h in st.hooks:
        arr = st.array(h)
        # zarr reads a missing chunk as fill values (zeros), which would pass every other check.
        if st.chunk_key(h, c) not in present:
            out.append(f"{h} chunk {c}: chunk file is missing (re-extract the store)")
            continue
        try:
            a = arr[r0:r1]
        except Exception as e:  # a corrupt chunk surfaces as a codec error: name the chunk
            out.append(f"{h} chunk {c}: cannot be decoded ({type(e).__name__}: {e})")
            continue
        if a.dtype != storage_dtype(st.logical_dtype) or a.shape != (r1 - r0, st.d_model):
            out.append(f"{h} chunk {c}: shape/dtype {a.shape}/{a.dtype} do not match the store")
            continue
        bad = int((~np.isfinite(to_float32(a, st.logical_dtype))).sum())
        if bad:
            out.append(f"{h} chunk {c}: {bad} NaN/Inf values")
    w0, w1 = st.layout.chunk_windows(c)
    windows = st.group[S.WINDOWS][w0:w1]
    expect = windows[:, st.layout.first_position:].reshape(-1)
    if not np.array_equal(st.group[S.TOKENS][r0:r1], expect):
        out.append(f"tokens chunk {c}: do not match the stored windows")
    return out


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
            ids = torch.from_numpy(st.group[S.WINDOWS][w : w + 1].astype(np.int64)).to(lm.model.device)
            acts = cap.run(ids)
            for h in st.hooks:
                got = acts[h][0, first:].to(torch_dtype(st.logical_dtype)).float().cpu().numpy()
                stored = st.read_rows(h, w * rpw, (w + 1) * rpw)
                err = float(np.linalg.norm(got - stored) / max(np.linalg.norm(stored), 1e-30))
                worst = max(worst, err)
                if not err <= RECOMPUTE_TOL[st.logical_dtype]:
                    report.problems.append(f"{h} window {w}: recomputed activations differ (relative error {err:.2e})")
            report.windows_recomputed += 1
    report.max_recompute_error = worst


def verify_store(path: str | Path, *, recompute: int = 0, seed: int = 0, device: str = "auto") -> VerifyReport:
    """Every chunk decodes with the right shape/dtype and no NaN/Inf; manifest complete."""
    st = S.open_store(path, require_complete=False)
    report = VerifyReport()
    done = st.completed_chunks()
    if not done.all():
        report.problems.append(f"manifest incomplete: {int((~done).sum())} of {len(done)} chunks not written "
                               "(finish with actcache extract --resume)")
    elif not st.attrs.get("complete"):
        report.problems.append("all chunks written but the store was not finalised: run actcache extract --resume")
    chunks = [int(c) for c in np.flatnonzero(done)]
    present = set().union(*(st.chunk_keys(h) for h in st.hooks))  # the store's listing, local or remote
    check = dask.delayed(functools.partial(_check_chunk, st, present=present), pure=True)
    results = dask.compute(*[check(c) for c in chunks], scheduler="threads")
    for r in results:
        report.problems.extend(r)
    report.chunks_checked = len(chunks)
    if recompute > 0 and report.ok:
        _recompute(st, recompute, seed, device, report)
    return report
