"""Measured peaks, each in a fresh subprocess (``python -m profiling.measure KIND SPEC_JSON``).

Training: a few real steps of ``Trainer._step`` (the method itself, inherited by
:class:`StepHarness`, which sets up the same SAE, Adam, schedule and state as
``Trainer.__init__`` without a store or run dir). As in ``Trainer.fit``, the previous step's
output stays alive while the next step runs. Before every step ``round(dead_fraction * d_sae)``
latents (a fixed random set; default all of them, the model's default) are marked dead and the
others alive, so AuxK's dense (B, n_dead) blocks have the size the prediction assumes.

* CPU: the peak of the bytes held by torch's CPU allocator plus numpy's, on one timeline
  (:mod:`profiling.alloc_trace`): deterministic, whatever the load or glibc does. From the
  harness's construction on (parameters, Adam, covariance buffer) through every step; the
  input batch (the loader's) is allocated before. Beside it, labelled, the RSS figure: peak
  resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` when the kernel allows
  it, else ``ru_maxrss``) minus the resident memory after imports, a warm-up step of a tiny SAE
  of the same arch (thread pools, lazy kernels) and the input batch. glibc's malloc keeps freed
  128 KiB - 32 MiB blocks resident once its dynamic mmap threshold has risen, so RSS can exceed
  the live tensors (``--pin-malloc`` sets ``MALLOC_MMAP_THRESHOLD_``, docs/memory.md).
* CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the same point.
* A CUDA step without a GPU (``target="cuda"``): the same step on CPU tensors as it runs on
  CUDA (:func:`emulate_cuda_step`), measured as on CPU: the check of ``--target cuda``.
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
    peak_bytes: int | None  # above the baseline; None when not measured (CPU training: the allocators' peak)
    baseline_bytes: int | None = None
    method: str = ""
    step_s: float | None = None  # median wall time of one step
    note: str = ""  # why it was not measured, or the error
    rss_bytes: int | None = None  # CPU: the RSS figure (what the OS sees), beside the deterministic one
    torch_bytes: int | None = None  # at the peak: torch's CPU allocator ...
    numpy_bytes: int | None = None  # ... and numpy's (tracemalloc) share
    at: str = ""  # the op allocating at the peak


# -- the training step -----------------------------------------------------------------------
def _harness_class():
    import torch

    from trainer import schedules as sch
    from trainer.saes import build_sae
    from trainer.train import EIG_BLOCK, Trainer, initial_state, make_optimizer

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
            self.state = initial_state()
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


def _steps(cfg, device, x, steps: int, n_steps: int, dead_fraction: float,
           as_cuda: bool = False) -> tuple[Any, list[float]]:
    import torch

    harness = _harness_class()(cfg, device, n_steps)
    if as_cuda:
        harness.device = torch.device("cuda")  # what _step reads to pick autocast (emulate_cuda_step)
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
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if out is None:
            raise RuntimeError("non-finite loss or gradient on random input")
    return harness, times


def emulate_cuda_step() -> None:
    """Make this process run ``Trainer._step`` on CPU tensors as it runs on CUDA, for
    :func:`trace_cuda_step`: ``torch.autocast("cuda", bf16)`` becomes CPU autocast to bf16 (the
    same matmuls drop to bf16), the correlation penalty takes its torch path (``torch.unique``,
    ``_CorrPenalty``) instead of the CPU-only fused kernels, ``stats.update`` its
    ``index_add_`` instead of the CPU scatter, and the TopK encoder one product over the whole
    batch instead of CPU row blocks. Irreversible: call it in a child process only."""
    import torch

    import trainer.saes.corr_penalty as corr
    import trainer.saes.covariance as cov
    import trainer.saes.sparse_ops as sparse_ops

    real = torch.autocast
    if getattr(real, "as_cuda", False):  # done already
        return

    class _AsCuda(real):  # type: ignore[misc, valid-type]
        as_cuda = True

        def __init__(self, device_type: str, dtype: Any = None, enabled: bool = True, cache_enabled: Any = None):
            super().__init__("cpu" if device_type == "cuda" else device_type, dtype=dtype, enabled=enabled,
                             cache_enabled=cache_enabled)

    torch.autocast = _AsCuda
    corr.fused_pairs_supported = lambda *args: False
    cov.add_distinct = lambda *args: False
    sparse_ops.encode_block_rows = lambda B, d_sae, device: B


def _train_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from actcache.device import resolve_device
    from trainer.config import RunConfig

    cfg = RunConfig.from_flat(spec["flat"])
    d_in, steps = int(spec["d_in"]), int(spec["steps"])
    dead_fraction = float(spec.get("dead_fraction", 1.0))
    cfg = replace(cfg, sae=cfg.sae.resolved(d_in))
    as_cuda = spec.get("target") == "cuda"
    if as_cuda:  # a CUDA step traced on CPU tensors (no GPU needed)
        emulate_cuda_step()
        cfg = replace(cfg, train=replace(cfg.train, device="cpu"))
    device = resolve_device(cfg.train.device)
    # Warm-up on a tiny SAE of the same arch: thread pools, allocator arenas, lazy kernel init
    # (d_sae 64 at k 2 takes the numba top-k of trainer/saes/select.py, which loads on first use).
    tiny = dict(spec["flat"], device=cfg.train.device, d_sae=64, k=2, k_start=4, k_end=2, k_aux=2, batch_size=8)
    run_steps(tiny, 8, 2)
    x = torch.randn(cfg.train.batch_size, d_in, generator=torch.Generator().manual_seed(0)).to(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _, times = _steps(cfg, device, x, steps, int(spec.get("n_steps", 10_000)), dead_fraction)
        peak, method = torch.cuda.max_memory_allocated(device) - base, "max_memory_allocated - memory_allocated"
        extra: dict[str, Any] = {}
    else:
        from profiling.alloc_trace import AllocationTrace

        base = current_rss()
        reset = reset_peak_rss()
        with AllocationTrace() as trace:
            _, times = _steps(cfg, device, x, steps, int(spec.get("n_steps", 10_000)), dead_fraction, as_cuda)
        rss = peak_rss() - base
        t = trace.result()
        peak, method = t.peak_bytes, "torch CPU allocator + numpy (tracemalloc), one timeline"
        if as_cuda:
            method = "CUDA step traced on CPU (bf16 autocast, torch penalty path): " + method
        extra = {"rss_bytes": int(rss), "torch_bytes": t.torch_bytes, "numpy_bytes": t.numpy_bytes, "at": t.at,
                 "note": "RSS: " + ("VmHWM - VmRSS" if reset else "ru_maxrss - VmRSS")}
    times.sort()
    return {"peak_bytes": int(peak), "baseline_bytes": int(base), "method": method,
            "step_s": times[len(times) // 2], **extra}


# -- the parent side -------------------------------------------------------------------------
def _labelled(result: dict[str, Any], malloc: str | None) -> Measurement:
    """A child's result, its RSS label completed with the glibc setting it ran under."""
    m = Measurement(**result)
    rss_in = m.note if m.note.startswith("RSS:") else m.method
    if sys.platform.startswith("linux") and ("VmHWM" in rss_in or "ru_maxrss" in rss_in):
        glibc = f", MALLOC_MMAP_THRESHOLD_={malloc}" if malloc else ", glibc malloc defaults"
        m = replace(m, note=m.note + glibc) if rss_in is m.note else replace(m, method=m.method + glibc)
    return m


def _run_child(kind: str, spec: dict[str, Any], timeout_s: float,
               env: dict[str, str] | None) -> tuple[Any, str | None, str]:
    """``python -m profiling.measure KIND SPEC`` (with ``env`` added): (its result, the mmap
    threshold it ran under, why there is none)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    malloc = env.get("MALLOC_MMAP_THRESHOLD_")
    try:
        proc = subprocess.run([sys.executable, "-m", "profiling.measure", kind, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None, malloc, f"not measured: timed out after {timeout_s:.0f} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):]), malloc, ""
    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    if proc.returncode < 0 or proc.returncode == 137:
        err = f"killed (signal {-proc.returncode if proc.returncode < 0 else 9}): out of memory?"
    return None, malloc, f"measurement failed: {err}"


def run_child(kind: str, spec: dict[str, Any], timeout_s: float, env: dict[str, str] | None = None) -> Measurement:
    """Run ``python -m profiling.measure KIND SPEC`` (with ``env`` added) and read its result line."""
    result, malloc, why = _run_child(kind, spec, timeout_s, env)
    return Measurement(None, note=why) if result is None else _labelled(result, malloc)


def measure_training(flat: dict[str, Any], d_in: int, *, steps: int = 3, timeout_s: float = 1800,
                     env: dict[str, str] | None = None, dead_fraction: float = 1.0, target: str = "") -> Measurement:
    """Measure ``steps`` real steps in a fresh process; ``target="cuda"``: trace a CUDA step on
    CPU tensors (:func:`emulate_cuda_step`)."""
    spec = {"flat": flat, "d_in": d_in, "steps": steps, "dead_fraction": dead_fraction, "target": target}
    return run_child("train", spec, timeout_s, env)


def measure_trainings(items: list[tuple[dict[str, Any], int, float]], *, steps: int = 2, timeout_s: float = 1800,
                      env: dict[str, str] | None = None, target: str = "") -> list[Measurement]:
    """Several ``(flat, d_in, dead_fraction)`` configurations measured one after the other in
    one fresh process (one start-up for all: the tests). The allocators' peak of each is its
    own (counted from its harness's construction); their RSS figures are not (the heap of the
    earlier ones stays)."""
    specs = [{"flat": f, "d_in": d, "steps": steps, "dead_fraction": dead, "target": target} for f, d, dead in items]
    results, malloc, why = _run_child("trains", {"specs": specs}, timeout_s, env)
    if results is None:
        return [Measurement(None, note=why)] * len(items)
    return [_labelled(r, malloc) for r in results]


def _train_children(spec: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for one in spec["specs"]:
        results.append(_train_child(one))
        gc.collect()
    return results


def main(argv: list[str]) -> None:
    kind, spec = argv[0], json.loads(argv[1])
    result: Any
    if kind == "train":
        result = _train_child(spec)
    elif kind == "trains":
        result = _train_children(spec)
    elif kind == "extract":
        from profiling.extract_side import extract_child

        result = extract_child(spec)
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
