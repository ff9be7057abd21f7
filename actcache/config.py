"""Extraction configuration, saved into every store's attributes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from actcache.corpus import STDLIB_DATASET


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    """Model: a transformers model dir, a dir/file with a .gguf, a hub id, or embedded:tiny-gemma2 / embedded:smollm2-135m / embedded:gemma3-270m."""
    hooks: tuple[str, ...]
    """Residual sites, e.g. ("blocks.5.hook_resid_post",)."""
    out: str
    """Path of the Zarr v3 store to write."""
    dataset: str = STDLIB_DATASET
    """Corpus: .txt, .jsonl, .parquet, a datasets save_to_disk dir, or embedded:stdlib-docstrings."""
    text_field: str = "text"
    """Field/column holding the text in jsonl, parquet and datasets corpora."""
    gguf_file: str | None = None
    """Name of the .gguf file inside the model dir, when the model is a GGUF checkpoint."""
    context_size: int = 128
    """Tokens per context window (BOS included)."""
    n_tokens: int | None = None
    """Rows of activations to write (rounded up to whole windows); None = the whole corpus."""
    batch_size: int = 8
    """Context windows per forward pass."""
    dtype: str = "bfloat16"
    """Storage dtype of the activations: bfloat16, float16 or float32."""
    compute_dtype: str = "auto"
    """Dtype the model runs in: auto (the storage dtype on CUDA or CPUs with native bf16, else float32), or a dtype."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    codec: str = "zstd"
    """Chunk compressor: zstd (level 1), zstd-N, blosc-lz4 or none (raw, memory-mappable chunks)."""
    chunk_rows: int = 4096
    """Target rows per chunk, rounded down to whole windows."""
    seed: int = 0
    """Seed of the window shuffle."""
    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token."""
    exclude_bos: bool = False
    """Leave the BOS rows out of the store."""
    queue_depth: int = 2
    """Computed chunks waiting for the background writer; bounds peak RAM."""
    writer_threads: int = 0
    """Threads encoding and writing chunks in parallel; 0 = one per core, at most 4."""

    # Fields that may change between an interrupted run and its --resume.
    RUNTIME_FIELDS = ("out", "device", "batch_size", "queue_depth", "writer_threads")

    def n_windows(self) -> int | None:
        if self.n_tokens is None:
            return None
        rows_per_window = self.context_size - (1 if self.exclude_bos else 0)
        return max(1, math.ceil(self.n_tokens / rows_per_window))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hooks"] = list(self.hooks)
        return d

    def identity(self) -> dict[str, Any]:
        """The fields that define the store's contents; a resume must match them all."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["hooks"] = tuple(kw["hooks"])
        return cls(**kw)
