"""Logical vs storage dtypes.

Zarr v3 (zarr-python 3.1) has no bfloat16 data type, so bfloat16 activations are stored as
their raw ``uint16`` bit patterns and the array carries ``logical_dtype = "bfloat16"``.
The conversions here are bit-exact views, never numeric casts.
"""

from __future__ import annotations

import numpy as np
import torch

from actcache.errors import ActcacheError

LOGICAL_DTYPES = ("bfloat16", "float16", "float32")
_STORAGE = {"bfloat16": np.dtype("uint16"), "float16": np.dtype("float16"), "float32": np.dtype("float32")}
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_logical(name: str) -> str:
    if name not in LOGICAL_DTYPES:
        raise ActcacheError(f"unknown dtype {name!r}: use one of {', '.join(LOGICAL_DTYPES)}")
    return name


def storage_dtype(logical: str) -> np.dtype:
    return _STORAGE[check_logical(logical)]


def torch_dtype(logical: str) -> torch.dtype:
    return _TORCH[check_logical(logical)]


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor in a logical dtype -> numpy array in the storage dtype (bit view for bf16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(a: np.ndarray, logical: str) -> torch.Tensor:
    """Storage-dtype numpy array -> tensor in the logical dtype, sharing memory where possible."""
    if check_logical(logical) == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def to_float32(a: np.ndarray, logical: str) -> np.ndarray:
    """Storage-dtype numpy array -> float32 numpy array (exact for every logical dtype)."""
    if check_logical(logical) == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)
