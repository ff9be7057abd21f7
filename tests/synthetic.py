"""Stores of synthetic activations with a known sparse structure (no model involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actcache.store import Layout
from actcache.store_writer import StoreWriter

HOOK = "blocks.0.hook_resid_post"


def sparse_data(n: int, d: int, n_features: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x = c @ D``: each row mixes ``k`` of ``n_features`` unit directions with weights in [1, 2]."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_features, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = np.zeros((n, n_features))
    for r in range(n):
        codes[r, rng.choice(n_features, size=k, replace=False)] = rng.uniform(1.0, 2.0, size=k)
    return (codes @ D).astype(np.float32), D


def write_store(path: Path, x: np.ndarray, *, rows_per_window: int = 16, windows_per_chunk: int = 16,
                codec: str = "none") -> Path:
    """A complete float32 actcache store holding ``x`` under ``HOOK``."""
    n_windows = len(x) // rows_per_window
    layout = Layout(n_windows, rows_per_window, False, windows_per_chunk)
    attrs = {"model": {"id": "synthetic"}, "context_size": rows_per_window, "prepend_bos": False,
             "exclude_bos": False, "seed": 0, "dataset": {"path": "synthetic"}, "extract_config": {}}
    w = StoreWriter.create(path, attrs=attrs, layout=layout, hooks=[HOOK], d_model=x.shape[1],
                           logical_dtype="float32", codec=codec,
                           windows=np.zeros((n_windows, rows_per_window), np.int32),
                           window_source=np.arange(n_windows))
    for c in range(layout.n_chunks):
        r0, r1 = layout.chunk_rows_range(c)
        w.write_chunk(c, {HOOK: x[r0:r1]})
    w.finalize()
    return Path(path)
