"""Shared fixtures: a hermetic cache dir, the tiny random Gemma-2, small stores."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One cache for the whole session, outside the user's: the tiny model is built once, the
# demo GGUF converted once, and nothing from ~/.cache leaks into the results. xdist workers
# inherit the variable, so only the process that made the directory removes it: left behind,
# one per run filled the CI disk.
if "ACTCACHE_CACHE" not in os.environ:
    _session_cache = tempfile.mkdtemp(prefix="actcache-test-cache-")
    os.environ["ACTCACHE_CACHE"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = "embedded:tiny-gemma2"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from actcache.embedded import tiny_gemma2_path

    return tiny_gemma2_path()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny Gemma-2 in float32 on CPU, full depth (read-only: do not mutate)."""
    import torch

    from actcache.models import load_model

    return load_model(TINY, dtype=torch.float32, device="cpu")


def small_config(out: Path, **kw):
    from actcache.config import ExtractConfig

    base = dict(model=TINY, hooks=("blocks.1.hook_resid_post", "blocks.3.hook_resid_post"), out=str(out),
                context_size=32, n_tokens=32 * 24, batch_size=4, chunk_rows=32 * 4, dtype="bfloat16",
                device="cpu", seed=7)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, tiny_model_dir) -> Path:
    """A complete bf16 store of the tiny model: 24 windows x 32 tokens, 6 chunks, 2 hooks."""
    from actcache.extract import extract

    out = tmp_path_factory.mktemp("stores") / "small.zarr"
    return extract(small_config(out))
