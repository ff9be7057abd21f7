"""trainer asks torch's CPU allocator for transparent huge pages when it is imported before torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.hugepages import ENV

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SMAPS = Path("/proc/self/smaps_rollup")

# Grows a 64 MB tensor and prints how much of it the kernel backed with huge pages.
PROBE = """
import sys
if sys.argv[1] == "trainer":
    import trainer
import torch
def anon_huge_kb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
before = anon_huge_kb()
x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
import os
print(anon_huge_kb() - before, os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""


def _probe(first: str, **env: str) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if k != ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, first], env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), out[1]


@pytest.mark.skipif(not (THP.exists() and SMAPS.exists()) or "[never]" in THP.read_text(),
                    reason="no transparent huge pages on this kernel")
def test_importing_trainer_before_torch_backs_large_tensors_with_huge_pages():
    huge, env = _probe("trainer")
    assert env == "1" and huge >= 32 << 10  # most of the 64 MB, in 2 MB pages
    # torch first: trainer can no longer change the allocator, and does not pretend to.
    huge, env = _probe("torch")
    assert env == "None" and huge < 8 << 10
    # The user's opt-out wins.
    huge, env = _probe("trainer", **{ENV: "0"})
    assert env == "0" and huge < 8 << 10


def test_the_request_is_skipped_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401

    from trainer.hugepages import request_huge_pages

    monkeypatch.delenv(ENV, raising=False)
    assert request_huge_pages() is False and ENV not in os.environ
