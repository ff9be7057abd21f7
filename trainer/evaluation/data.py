"""Which rows and windows an evaluation reads, and whether the SAE was trained on them.

Splits are chunk ranges of the evaluation store, with the run's ``heldout_chunks``:
``heldout`` = the last ``heldout_chunks`` chunks (never trained on when the store is the
training store), ``train`` = the others, ``all`` = every chunk. Chunks hold whole windows,
so a split is also a contiguous range of windows, whose tokens the spliced forward reuses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from actcache.errors import ActcacheError
from actcache.store import WINDOWS, ActivationStore, open_store
from trainer.evaluation.loading import TrainedRun

log = logging.getLogger(__name__)
SPLITS = ("heldout", "train", "all")


@dataclass
class EvalData:
    store: ActivationStore
    hook: str
    split: str
    chunks: range
    same_store: bool  # the store the run was trained on
    warnings: list[str] = field(default_factory=list)

    @property
    def window_range(self) -> tuple[int, int]:
        lay = self.store.layout
        if not self.chunks:
            return 0, 0
        return lay.chunk_windows(self.chunks[0])[0], lay.chunk_windows(self.chunks[-1])[1]

    @property
    def n_rows(self) -> int:
        w0, w1 = self.window_range
        return (w1 - w0) * self.store.layout.rows_per_window

    def batches(self, batch_rows: int = 8192, max_rows: int = 0) -> Iterator[torch.Tensor]:
        """float32 rows of the split in store order, whole chunks read one at a time."""
        left = max_rows or self.n_rows
        for c in self.chunks:
            x = self.store.read_chunk(self.hook, c).float()[:left]
            for i in range(0, len(x), batch_rows):
                yield x[i:i + batch_rows]
            left -= len(x)
            if left <= 0:
                return

    def windows(self, n: int) -> torch.Tensor:
        """The first ``n`` windows of the split (store order is already a seeded shuffle), int64."""
        w0, w1 = self.window_range
        return torch.from_numpy(self.store.read_windows(w0, min(w1, w0 + n)).astype(np.int64))


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return str(a) == str(b)


def _chunk_range(split: str, n_chunks: int, heldout: int, store: ActivationStore) -> range:
    if split not in SPLITS:
        raise ActcacheError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split == "all":
        return range(n_chunks)
    if heldout <= 0:
        raise ActcacheError(f"the run kept no held-out chunks (heldout_chunks={heldout}): evaluate another store "
                            "with --store OTHER --split all, or retrain with --heldout-chunks 1")
    if heldout >= n_chunks:
        raise ActcacheError(f"store {store.path} has {n_chunks} chunks, not more than the run's heldout_chunks="
                            f"{heldout}: use --split all")
    return range(n_chunks - heldout, n_chunks) if split == "heldout" else range(n_chunks - heldout)


def _window_keys(store: ActivationStore, w0: int, w1: int) -> set[bytes]:
    rows = np.ascontiguousarray(store.read_windows(w0, w1))
    return {r.tobytes() for r in rows}


def _overlap_warning(run: TrainedRun, data: EvalData) -> str | None:
    """Another store may hold the very windows the run trained on (same corpus, tokenizer, context)."""
    try:
        train_store = open_store(run.cfg.train.store)
    except ActcacheError as e:
        log.info("cannot check overlap with the training store (%s)", e)
        return None
    heldout = run.cfg.loader.heldout_chunks
    trained = _window_keys(train_store, 0, train_store.layout.chunk_windows(train_store.n_chunks - heldout - 1)[1])
    w0, w1 = data.window_range
    ours = np.ascontiguousarray(data.store.read_windows(w0, w1))
    shared = sum(r.tobytes() in trained for r in ours)
    if not shared:
        return None
    return (f"{shared} of the {len(ours)} windows of {data.split} of {data.store.path} are windows the SAE was "
            f"trained on (in {train_store.path}): these metrics are not held-out")


def select_split(run: TrainedRun, store: str | Path | None = None, split: str = "heldout") -> EvalData:
    """Open the evaluation store (default: the training store) and pick the split's chunks."""
    path = store or run.cfg.train.store
    st = open_store(path)
    hook = run.cfg.train.hook
    st.array(hook)  # a hook not in the store -> one-line error
    if st.d_model != run.sae.cfg.d_in:
        raise ActcacheError(f"store {st.path} has width {st.d_model} but the SAE reads {run.sae.cfg.d_in}: "
                            "pass a store of the same model and hook")
    same = _same_path(path, run.cfg.train.store)
    data = EvalData(st, hook, split, _chunk_range(split, st.n_chunks, run.cfg.loader.heldout_chunks, st), same)
    if same and split != "heldout":
        data.warnings.append(f"evaluating on --split {split} of the training store {st.path}: the SAE was trained "
                             "on these rows, so the metrics are optimistic; use --split heldout")
    elif not same:
        warning = _overlap_warning(run, data)
        if warning:
            data.warnings.append(warning)
    for w in data.warnings:
        log.warning(w)
    return data
