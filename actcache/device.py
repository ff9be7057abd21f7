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
