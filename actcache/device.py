"""Device selection shared by extraction and training."""

from __future__ import annotations

import torch

from actcache.errors import ActcacheError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ActcacheError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ActcacheError(f"device {name} asked for but CUDA is not available here: use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ActcacheError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return dev


def cpu_has_bf16() -> bool:
    """Native bf16 matmul on this CPU (AMX or AVX512-BF16); without it bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_compute_dtype(requested: str, storage: str, device: torch.device) -> str:
    """Dtype the model runs in. ``auto``: the storage dtype on CUDA and on CPUs with native
    bf16; float32 otherwise, where it is both faster (measured ~4x on an AVX512 CPU without
    BF16, docs/benchmarks.md) and more exact before rounding to the storage dtype."""
    if requested != "auto":
        return requested
    if device.type == "cuda" or storage == "float32":
        return storage
    if storage == "bfloat16" and cpu_has_bf16():
        return storage
    return "float32"
