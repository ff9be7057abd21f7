"""Tokenise documents and pack them into fixed-length context windows.

Documents are concatenated with an end-of-text separator and cut into windows of
``context_size`` tokens; with ``prepend_bos`` each window is ``[BOS] + context_size - 1``
corpus tokens (SAELens' convention). Windows are then shuffled with a seeded permutation,
because rows cannot be gathered cheaply from compressed chunks later: mixing documents
across chunks has to happen here, at write time.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from actcache.errors import ActcacheError

_DOC_BATCH = 256


@dataclass(frozen=True)
class Windows:
    tokens: np.ndarray  # (n_windows, context_size) int32, in shuffled (store) order
    source: np.ndarray  # (n_windows,) int64, index of each window in corpus order
    corpus_sha256: str  # hash of the document texts read
    n_documents_read: int  # documents read and tokenised (a batch past the last window included)
    n_documents_used: int  # documents with at least one token inside a stored window


def _batched(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _special_ids(tokenizer, prepend_bos: bool) -> tuple[int | None, int]:
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ActcacheError("the tokenizer has no BOS token: pass --no-prepend-bos")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if sep is None:
        raise ActcacheError("the tokenizer has neither EOS nor BOS to separate documents")
    return bos, sep


def pack_windows(
    docs: Iterable[str],
    tokenizer,
    *,
    context_size: int,
    n_windows: int | None,
    prepend_bos: bool = True,
    seed: int = 0,
) -> Windows:
    """Pack the first ``n_windows`` windows of the corpus (all of it if None), then shuffle."""
    if context_size < 2:
        raise ActcacheError(f"context size {context_size} is too small: use at least 2")
    bos, sep = _special_ids(tokenizer, prepend_bos)
    body = context_size - (1 if prepend_bos else 0)
    sha = hashlib.sha256()
    stream: list[int] = []
    rows: list[np.ndarray] = []
    got = n_docs = n_used = 0
    starts: deque[int] = deque()  # stream offsets (from the corpus start) of documents not yet in a window
    offset = 0  # corpus tokens already moved from the stream into windows
    for batch in _batched(docs, _DOC_BATCH):
        if n_windows is not None and got >= n_windows:
            break
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for text, ids in zip(batch, encoded):
            sha.update(text.encode("utf-8") + b"\x00")
            n_docs += 1
            if ids:
                starts.append(offset + len(stream))
            stream.extend(ids)
            stream.append(sep)
        full = len(stream) // body
        if n_windows is not None:
            full = min(full, n_windows - got)
        if full:
            rows.append(np.asarray(stream[: full * body], dtype=np.int32).reshape(full, body))
            del stream[: full * body]
            got += full
            offset += full * body
            while starts and starts[0] < offset:  # its first token is in a window
                starts.popleft()
                n_used += 1
    if n_docs == 0:
        raise ActcacheError("the corpus is empty: it yielded no documents (check --dataset and --text-field)")
    if got == 0:
        raise ActcacheError(
            f"the corpus is shorter than one window ({len(stream)} tokens < {body}): "
            "lower --context-size or give more text"
        )
    if n_windows is not None and got < n_windows:
        raise ActcacheError(
            f"the corpus holds {got * body} tokens in {got} windows, fewer than the {n_windows} windows "
            "requested: lower --n-tokens or leave it out to use the whole corpus"
        )
    packed = np.concatenate(rows)
    if prepend_bos:
        packed = np.concatenate([np.full((len(packed), 1), bos, dtype=np.int32), packed], axis=1)
    perm = np.random.default_rng(seed).permutation(len(packed))
    return Windows(tokens=packed[perm], source=perm.astype(np.int64), corpus_sha256=sha.hexdigest(),
                   n_documents_read=n_docs, n_documents_used=n_used)
