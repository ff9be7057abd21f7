"""trainer leaves torch's CPU allocator at its default (no huge-page advice); a user can opt in."""

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
def test_importing_trainer_leaves_torchs_default_and_the_user_can_opt_in():
    huge, env = _probe("trainer")
    assert env == "None" and huge < 8 << 10  # torch's default: no advice, 4 KB pages
    huge, env = _probe("trainer", **{ENV: "1"})
    assert env == "1" and huge >= 32 << 10  # the user's setting: most of the 64 MB in 2 MB pages


def test_huge_pages_requested_reads_the_environment(monkeypatch):
    from trainer.hugepages import huge_pages_requested

    monkeypatch.delenv(ENV, raising=False)
    assert huge_pages_requested() is False
    monkeypatch.setenv(ENV, "1")
    assert huge_pages_requested() is True
