"""Measured peaks, each in a fresh subprocess (``python -m profiling.measure KIND SPEC_JSON``).

Training: a few real steps of ``Trainer._step`` (the method itself, inherited by
:class:`StepHarness`, which sets up the same SAE, Adam, schedule and state as
``Trainer.__init__`` without a store or run dir). As in ``Trainer.fit``, the previous step's
output stays alive while the next step runs. Before every step ``round(dead_fraction * d_sae)``
latents (a fixed random set; default all of them, the model's default) are marked dead and the
others alive, so AuxK's dense (B, n_dead) blocks have the size the prediction assumes.

* CPU: peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` when the kernel
  allows it, else ``ru_maxrss``) minus the resident memory after imports, a warm-up step of a
  tiny SAE of the same arch (thread pools, lazy kernels) and the input batch (the loader's).
  glibc's malloc keeps freed 128 KiB - 32 MiB blocks resident once its dynamic mmap threshold
  has risen, so RSS can exceed the live tensors; ``MALLOC_MMAP_THRESHOLD_`` in the child's
  environment (``--pin-malloc``) pins the threshold and RSS then tracks them (docs/memory.md).
* CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the same point.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from profiling.rss import current_rss, peak_rss, reset_peak_rss

_RESULT = "PROFILE-RESULT "


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int | None  # above the baseline; None when not measured
    baseline_bytes: int | None = None
    method: str = ""
    step_s: float | None = None  # median wall time of one step
    note: str = ""  # why it was not measured, or the error


# -- the training step -----------------------------------------------------------------------
def _harness_class():
    import torch

    from trainer import schedules as sch
    from trainer.saes import build_sae
    from trainer.train import EIG_BLOCK, Trainer, make_optimizer

    class StepHarness(Trainer):
        """``Trainer`` minus the store, loader and run dir: the same objects ``Trainer.__init__``
        builds for ``_step`` (tests/test_profiling.py checks they stay the same)."""

        def __init__(self, cfg, device: torch.device, n_steps: int):
            self.cfg, self.device, self.n_steps = cfg, device, n_steps
            self.dp = Trainer.dp  # one process
            self.store = self.hook = self.progress = self.loader = self.paths = None  # no store, no run dir
            warm = int(cfg.train.lr_warmup_frac * n_steps)
            self.sched = sch.Schedule(total_steps=n_steps, warmup_steps=warm,
                                      penalty_warmup_steps=int(cfg.train.penalty_warmup_frac * n_steps),
                                      lr_min_ratio=cfg.train.lr_min_ratio)
            torch.manual_seed(cfg.train.seed)
            self.sae = build_sae(cfg.sae, seed=cfg.train.seed).to(device)
            self.sae.dp = self.dp
            self.opt = make_optimizer(self.sae, cfg.train.lr)
            g = torch.Generator().manual_seed(cfg.train.seed + 1)
            self.eig_block = torch.randperm(cfg.sae.d_sae, generator=g)[: min(EIG_BLOCK, cfg.sae.d_sae)].to(device)
            self.state = {"step": 0, "tokens": 0, "lr_scale": 1.0, "nonfinite_events": 0,
                          "skipped_steps": 0, "rollbacks": 0, "nonfinite_in_row": 0, "wall_s": 0.0}
            self.loader_state = None
            self._stop = False

    return StepHarness


def run_steps(flat: dict[str, Any], d_in: int, steps: int, n_steps: int = 10_000,
              dead_fraction: float = 1.0) -> tuple[Any, list[float]]:
    """Build the harness for the flat RunConfig ``flat`` and run ``steps`` real steps on random
    input; returns the harness and the step times. Used by the child and by the tests."""
    import torch

    from actcache.device import resolve_device
    from trainer.config import RunConfig

    cfg = RunConfig.from_flat(flat)
    cfg = replace(cfg, sae=cfg.sae.resolved(d_in))
    device = resolve_device(cfg.train.device)
    x = torch.randn(cfg.train.batch_size, d_in, generator=torch.Generator().manual_seed(0)).to(device)
    return _steps(cfg, device, x, steps, n_steps, dead_fraction)


def dead_latents(d_sae: int, dead_fraction: float) -> Any:
    """The latents the harness marks dead: ``round(dead_fraction * d_sae)`` of them, a fixed random set."""
    import torch

    n_dead = min(d_sae, max(0, round(dead_fraction * d_sae)))
    return torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))[:n_dead]


def _steps(cfg, device, x, steps: int, n_steps: int, dead_fraction: float) -> tuple[Any, list[float]]:
    harness = _harness_class()(cfg, device, n_steps)
    harness.sae.init_b_dec(x)  # as Trainer.fit does before the first step
    dead = dead_latents(cfg.sae.d_sae, dead_fraction).to(device)
    since = harness.sae.tokens_since_fired
    out, times = None, []
    for _ in range(steps):
        since.zero_()  # the others fired just now: alive
        since[dead] = float(cfg.sae.dead_after_tokens)  # dead: AuxK's n_dead = len(dead)
        t0 = time.perf_counter()
        out = harness._step(x)  # the previous ``out`` is alive meanwhile, as in Trainer.fit
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if out is None:
            raise RuntimeError("non-finite loss or gradient on random input")
    return harness, times


def _train_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from actcache.device import resolve_device
    from trainer.config import RunConfig

    cfg = RunConfig.from_flat(spec["flat"])
    d_in, steps = int(spec["d_in"]), int(spec["steps"])
    dead_fraction = float(spec.get("dead_fraction", 1.0))
    cfg = replace(cfg, sae=cfg.sae.resolved(d_in))
    device = resolve_device(cfg.train.device)
    # Warm-up on a tiny SAE of the same arch: thread pools, allocator arenas, lazy kernel init.
    tiny = dict(spec["flat"], d_sae=16, k=2, k_start=4, k_end=2, k_aux=2, batch_size=8)
    run_steps(tiny, 8, 2)
    x = torch.randn(cfg.train.batch_size, d_in, generator=torch.Generator().manual_seed(0)).to(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _, times = _steps(cfg, device, x, steps, int(spec.get("n_steps", 10_000)), dead_fraction)
        peak, method = torch.cuda.max_memory_allocated(device) - base, "max_memory_allocated - memory_allocated"
    else:
        base = current_rss()
        reset = reset_peak_rss()
        _, times = _steps(cfg, device, x, steps, int(spec.get("n_steps", 10_000)), dead_fraction)
        peak = peak_rss() - base
        method = "VmHWM - VmRSS" if reset else "ru_maxrss - VmRSS"
    times.sort()
    return {"peak_bytes": int(peak), "baseline_bytes": int(base), "method": method,
            "step_s": times[len(times) // 2]}


# -- the parent side -------------------------------------------------------------------------
def run_child(kind: str, spec: dict[str, Any], timeout_s: float, env: dict[str, str] | None = None) -> Measurement:
    """Run ``python -m profiling.measure KIND SPEC`` (with ``env`` added) and read its result line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    malloc = env.get("MALLOC_MMAP_THRESHOLD_")
    try:
        proc = subprocess.run([sys.executable, "-m", "profiling.measure", kind, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return Measurement(None, note=f"not measured: timed out after {timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            m = Measurement(**json.loads(line[len(_RESULT):]))
            if sys.platform.startswith("linux") and ("VmHWM" in m.method or "ru_maxrss" in m.method):
                m = replace(m, method=m.method + (f", MALLOC_MMAP_THRESHOLD_={malloc}" if malloc else
                                                   ", glibc malloc defaults"))
            return m
    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    if proc.returncode < 0 or proc.returncode == 137:
        err = f"killed (signal {-proc.returncode if proc.returncode < 0 else 9}): out of memory?"
    return Measurement(None, note=f"measurement failed: {err}")


def measure_training(flat: dict[str, Any], d_in: int, *, steps: int = 3, timeout_s: float = 1800,
                     env: dict[str, str] | None = None, dead_fraction: float = 1.0) -> Measurement:
    spec = {"flat": flat, "d_in": d_in, "steps": steps, "dead_fraction": dead_fraction}
    return run_child("train", spec, timeout_s, env)


def main(argv: list[str]) -> None:
    kind, spec = argv[0], json.loads(argv[1])
    if kind == "train":
        result = _train_child(spec)
    elif kind == "extract":
        from profiling.extract_side import extract_child

        result = extract_child(spec)
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
