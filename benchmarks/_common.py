"""Helpers shared by ``bench_train.py`` and ``bench_vs_saelens.py``.

* :func:`machine_lines`: the header of a markdown section (date, CPU model, cores, torch, device,
  load average, the exact command line).
* :func:`make_activations`: synthetic residual-stream-like activations, rounded to bfloat16.
* :func:`write_store`: an actcache store of those rows (any codec, bfloat16 or float32).
* :class:`StepWorker`: one training setup living in its own Python process (our trainer in the
  project's interpreter, or SAELens in its side venv), driven step by step over a pipe so that
  several setups can be timed side by side in alternating order, each with its own peak RSS.
* :func:`rounds`: the alternating order of the variants (rotated every repeat).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOOK = "blocks.12.hook_resid_post"
CTX = 128  # rows per window of the synthetic stores
med = statistics.median


# -- machine / report ------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} torch threads"


def loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_lines(title: str, script: str, argv: Sequence[str], device: torch.device, load_start: str) -> list[str]:
    n_cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = n_cores
    return [
        f"## {title}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"`{shlex.join(['python', script, *argv])}`",
        "",
        f"Machine: {cpu_model()}, {n_cores} cores ({usable} usable); torch {torch.__version__}; "
        f"device {device.type} ({device_name(device)}); Python {platform.python_version()}. "
        f"Load average (1, 5, 15 min) at start: {load_start}; at end: {loadavg()}.",
        "",
    ]


def emit(lines: list[str], out: Path | None) -> None:
    text = "\n".join(lines)
    print(text, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write("\n" + text + "\n")


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def rounds(names: Sequence[str], repeats: int) -> Iterator[list[str]]:
    """``repeats`` orders of ``names``, rotated by one each time (A B C, B C A, C A B, ...)."""
    n = len(names)
    for r in range(repeats):
        yield [names[(r + i) % n] for i in range(n)]


# -- data ------------------------------------------------------------------------------------
def make_activations(n: int, d: int, *, seed: int = 0, block: int = 8192) -> np.ndarray:
    """``n`` float32 rows shaped like a mid-layer residual stream, rounded to bfloat16.

    ``x = mu + sum_{j in S} c_j D_j + noise``: 32 draws from 8192 unit directions per row (Zipf(1.1)
    frequencies, so some fire often and many rarely), coefficients |N(0, 3)|, isotropic noise of
    std 0.5 per coordinate, and a mean ``mu`` with a few large coordinates (as real residual
    streams have): row norms of about 50, the order of Gemma-2-2B's middle layers. bfloat16
    rounding makes the values exactly those a bf16 store holds.
    """
    g = torch.Generator().manual_seed(seed)
    n_feat, k = 8192, 32
    D = torch.randn(n_feat, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    mu = torch.randn(d, generator=g) * 0.3
    big = torch.randperm(d, generator=g)[:4]
    mu[big] = torch.tensor([40.0, -25.0, 15.0, 10.0])[: len(big)]
    freq = 1.0 / torch.arange(1, n_feat + 1, dtype=torch.float64) ** 1.1
    cdf = torch.cumsum(freq[torch.randperm(n_feat, generator=g)], 0)
    cdf = (cdf / cdf[-1]).float()
    out = np.empty((n, d), np.float32)
    for r0 in range(0, n, block):
        m = min(block, n - r0)
        # Inverse-CDF draws (with replacement: a repeated direction just adds its coefficients).
        idx = torch.searchsorted(cdf, torch.rand(m, k, generator=g)).clamp_(max=n_feat - 1)
        coef = torch.randn(m, k, generator=g).abs() * 3.0
        x = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=coef, mode="sum")
        x += mu
        x += torch.randn(m, d, generator=g) * 0.5
        out[r0:r0 + m] = x.to(torch.bfloat16).float().numpy()
    return out


def write_store(path: Path, x: np.ndarray, *, codec: str, logical_dtype: str = "bfloat16",
                chunk_rows: int = 4096) -> Path:
    """A complete store holding ``x`` (rows a multiple of ``CTX``) under ``HOOK``, through ``StoreWriter``."""
    from actcache.dtypes import to_storage, torch_dtype
    from actcache.store import Layout
    from actcache.store_writer import StoreWriter

    n_windows = len(x) // CTX
    layout = Layout(n_windows, CTX, False, max(1, chunk_rows // CTX))
    attrs = {"model": {"id": "synthetic"}, "context_size": CTX, "prepend_bos": False, "exclude_bos": False,
             "seed": 0, "dataset": {"path": "synthetic"}, "extract_config": {}}
    w = StoreWriter.create(path, attrs=attrs, layout=layout, hooks=[HOOK], d_model=x.shape[1],
                           logical_dtype=logical_dtype, codec=codec,
                           windows=np.zeros((n_windows, CTX), np.int32), window_source=np.arange(n_windows))
    for c in range(layout.n_chunks):
        r0, r1 = layout.chunk_rows_range(c)
        w.write_chunk(c, {HOOK: to_storage(torch.from_numpy(x[r0:r1]).to(torch_dtype(logical_dtype)))})
    w.finalize()
    return Path(path)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- step workers ----------------------------------------------------------------------------
# Runs in the worker process; the setup code that follows it defines ``step(i)`` and
# ``prepare(cmd)`` and then calls ``_serve(info)``. Protocol lines start with TAG; anything
# else a library prints to stdout is passed over.
TAG = "@@bench "
WORKER_PRELUDE = r'''
import json, os, resource, sys, time
import numpy as np
import torch
P = json.loads(sys.argv[1])
if P.get("threads"):
    torch.set_num_threads(P["threads"])
DEV = torch.device(P["device"])
TAG = "@@bench "
def _say(obj):
    sys.stdout.write(TAG + json.dumps(obj) + "\n"); sys.stdout.flush()
def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)
def _load_batches():
    a = np.load(P["batches"])  # (n_batches, B, d_in) float32
    return [torch.from_numpy(np.ascontiguousarray(a[i])).to(DEV) for i in range(a.shape[0])]
def _dead_mask(frac):
    m = torch.zeros(P["d_sae"], dtype=torch.bool)
    if frac > 0:
        m[np.load(P["dead"])[: int(round(frac * P["d_sae"]))]] = True
    return m.to(DEV)
def _serve(info):
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEV)
    _say({"ready": {**info, "threads": torch.get_num_threads()}})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak over the exec).
            try:
                with open("/proc/self/status") as f:
                    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
            except (OSError, StopIteration):
                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            res = {"maxrss_mb": hwm / 1024}
            if DEV.type == "cuda":
                res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(DEV) / 2**20
            _say(res)
            return
        # A round is `reps` consecutive steps (prepare untimed before each), reported per step:
        # short steps are timed over a span the timer and the machine's noise do not dominate.
        reps = int(cmd.get("reps", 1))
        wall = cpu = 0.0
        seen = {}
        for r in range(reps):
            prepare(cmd)
            _sync()
            t0, c0 = time.perf_counter(), time.process_time()
            extra = step(cmd["i"] * reps + r) or {}
            _sync()
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            for key, v in extra.items():
                seen.setdefault(key, []).append(v)
        out = {key: (any(v) if all(isinstance(x, bool) for x in v) else
                     sum(v) / reps if all(isinstance(x, float) for x in v) else v[-1]) for key, v in seen.items()}
        _say({**out, "wall": wall / reps, "cpu": cpu / reps, "reps": reps})
'''

# Our trainer: a real ``Trainer`` on a small store of the same width, whose ``_step`` (forward,
# backward, decoder-gradient projection, clip, Adam, decoder renormalisation, after_step) is
# called on the batches from the .npy file.
# `import trainer` first, as the `sae` command does: it sets torch's allocator up before torch loads.
OURS_WORKER = "import trainer\n" + WORKER_PRELUDE + r'''
sys.path.insert(0, P["repo"])
from trainer.hugepages import huge_pages_requested
from trainer.config import RunConfig
from trainer.saes.linear import linear, uses_onednn
from trainer.train import Trainer
# One Trainer per architecture in P["archs"] (or the one P["arch"]); a command's "arch" picks it.
# Several in one process share its state: this machine runs a process fast or slow (a topk step of
# ~10 or ~13 ms at the demo's size, drawn per process: docs/benchmarks.md), so a ratio between
# architectures is measured in one process, or it carries that draw.
X = _load_batches()
TRS = {}
for _arch in P.get("archs") or [P["arch"]]:
    cfg = RunConfig.from_flat({"store": P["store"], "out": P["out"] + ("" if "arch" in P else f"-{_arch}"),
                               "arch": _arch, "d_sae": P["d_sae"], "k": P["k"], "k_start": P["k"], "k_end": P["k"],
                               "batch_size": P["batch"], "device": P["device"], "seed": 0, "heldout_chunks": 1})
    TRS[_arch] = Trainer(cfg, overwrite=True)
    TRS[_arch].sae.init_b_dec(X[0])
tr = next(iter(TRS.values()))
MM = {}
# The optimiser's step inside each training step, timed: on this project's VM it takes ~0.7 or
# ~2.2 ms at the demo's size depending on where its arrays landed in memory (docs/benchmarks.md),
# which is most of the difference between a fast and a slow process.
OPT = {}
def _timed_opt(opt):
    inner = opt.step
    def step(*a, **kw):
        t0 = time.perf_counter()
        r = inner(*a, **kw)
        OPT["opt"] = time.perf_counter() - t0
        return r
    opt.step = step
for _tr in TRS.values():
    _timed_opt(_tr.opt)
def prepare(cmd):
    global tr
    tr = TRS[cmd.get("arch", next(iter(TRS)))]
    # Force the same latents dead on every step (0 of them: none), as the SAELens side does.
    m = _dead_mask(cmd.get("dead_frac", 0.0))
    dead_after = float(tr.cfg.sae.dead_after_tokens)
    tr.sae.tokens_since_fired.copy_(torch.where(m, dead_after, 0.0).to(tr.sae.tokens_since_fired.dtype))
    if cmd.get("time_matmul"):
        # The step's one dense operation alone, on the same batch, just before the (timed) step:
        # the floor a step could reach. Untimed by _serve; reported as "mm" by step().
        # Both kernels: ours (trainer.saes.linear: oneDNN on CPU) and torch's addmm (MKL on CPU),
        # which is what SAELens' step runs.
        sae, x = tr.sae, X[cmd["i"] % len(X)]
        with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=DEV.type == "cuda"):
            x_c = x - sae.b_dec
            for key, fn in (("mm", linear), ("mm_addmm", lambda a, w, b: torch.addmm(b, a, w.t()))):
                _sync()
                t0 = time.perf_counter()
                fn(x_c, sae.W_enc, sae.b_enc)
                _sync()
                MM[key] = time.perf_counter() - t0
def step(i):
    OPT.clear()
    out = tr._step(X[i % len(X)])
    return {"skipped": out is None, "loss": None if out is None else float(out.loss), **MM, **OPT}
_serve({"arch": "+".join(TRS), "params": sum(p.numel() for p in tr.sae.parameters()),
        "torch": torch.__version__, "huge_pages": huge_pages_requested(), "onednn": uses_onednn(X[0])})
'''


class WorkerError(RuntimeError):
    pass


class StepWorker:
    """A training setup in its own process: ``step(i, **kw)`` times one step there."""

    def __init__(self, name: str, python: str, source: str, params: dict[str, Any]):
        self.name = name
        self._err = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".stderr", delete=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        # Both sides run with torch's default allocator setting, not one this process inherited
        # (trainer/hugepages.py).
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        self.proc = subprocess.Popen([python, "-c", source, json.dumps(params)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env, cwd=str(REPO))
        self._info: dict[str, Any] | None = None
        self.final: dict[str, Any] = {}

    @property
    def info(self) -> dict[str, Any]:
        """What the worker said once set up; waits for it (start several workers, then ask each)."""
        if self._info is None:
            self._info = self._read()["ready"]
        return self._info

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        self.proc.wait()
        raise WorkerError(f"{self.name} worker exited (code {self.proc.returncode}):\n{self.stderr_tail()}")

    def stderr_tail(self, n: int = 3000) -> str:
        self._err.flush()
        text = Path(self._err.name).read_text(errors="replace")
        return text[-n:]

    def step(self, i: int, **kw: Any) -> dict[str, Any]:
        self.info  # noqa: B018 (set up first)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "step", "i": i, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            try:
                self.info  # noqa: B018 (a worker still setting up answers "ready" first)
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.final = self._read()
            except (WorkerError, BrokenPipeError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            os.unlink(self._err.name)
        except OSError:
            pass
        return self.final


class WorkerView:
    """One architecture of a :class:`StepWorker` that hosts several (``OURS_WORKER`` with
    ``archs``): ``step`` sends its ``arch``; ``info``, ``final`` and ``close`` are the process's."""

    def __init__(self, worker: StepWorker, arch: str):
        self.worker, self.arch, self.name = worker, arch, arch

    @property
    def info(self) -> dict[str, Any]:
        return self.worker.info

    @property
    def final(self) -> dict[str, Any]:
        return self.worker.final

    def step(self, i: int, **kw: Any) -> dict[str, Any]:
        return self.worker.step(i, arch=self.arch, **kw)

    def stderr_tail(self, n: int = 3000) -> str:
        return self.worker.stderr_tail(n)

    def close(self) -> dict[str, Any]:
        return self.worker.close()


def timed_rounds(workers: dict[str, StepWorker | WorkerView], repeats: int, *, warmup: int = 1, start: int = 0,
                 round_s: float = 0.0, max_reps: int = 64, log: bool = True,
                 **kw: Any) -> dict[str, list[dict[str, Any]]]:
    """``warmup`` untimed steps per worker, then ``repeats`` rounds in rotated order. With
    ``round_s`` a round of a worker whose warm-up step took less than ten times that is as many
    consecutive steps as fill about that many seconds, sized on one more untimed step (1 to
    ``max_reps``; each result is the mean per step, ``reps`` says how many): a 15 ms step timed
    alone, right after another process ran, mostly measures cold caches and timer noise, not a
    training run's steady state."""
    names = list(workers)
    for name in names:  # all started in parallel; wait until each is set up
        workers[name].info  # noqa: B018
    reps = dict.fromkeys(names, 1)
    for w in range(warmup):
        for name in names:
            t = workers[name].step(start + w, **kw)
            if w == warmup - 1 and t["wall"] < 10 * round_s:
                # A first step carries one-off costs (allocations, JIT; in a fresh process it can take
                # longer than a round): size the rounds on a second.
                t = workers[name].step(start + w, **kw)
                reps[name] = max(1, min(max_reps, round(round_s / max(t["wall"], 1e-9))))
    res: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r, order in enumerate(rounds(names, repeats)):
        for name in order:
            t = workers[name].step(start + warmup + r, reps=reps[name], **kw)
            res[name].append(t)
            if log:
                print(f"  round {r + 1}/{repeats} {name}: {t['wall']:.4f} s wall, {t['cpu']:.4f} s CPU per step"
                      + (f" (mean of {t['reps']})" if t.get("reps", 1) > 1 else "")
                      + (" (SKIPPED: non-finite)" if t.get("skipped") else ""), file=sys.stderr, flush=True)
    return res


def peak_mb(w: StepWorker | WorkerView) -> str:
    f = w.final
    if not f:
        return "n/a"
    s = f"{f['maxrss_mb']:,.0f}"
    if "cuda_peak_mb" in f:
        s += f" (GPU {f['cuda_peak_mb']:,.0f})"
    return s


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:,.0f} s"
