"""Benchmark our TopK / dyncorr training step against SAELens' TopK training step, side by side.

Run: ``python benchmarks/bench_vs_saelens.py [--quick] [--device auto|cpu|cuda] [--out docs/benchmarks.md]``.

SAELens is never installed into the project's environment: it lives in a side venv whose
interpreter is ``--saelens-python`` (default ``/tmp/saelens-venv/bin/python``). Set it up once with::

    python3 -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0 && \\
        /tmp/saelens-venv/bin/pip install sae-lens==6.54.12

(torch first and pinned, so pip takes the CPU build on this machine's disk instead of downloading
a CUDA build when sae-lens asks for torch). Without that interpreter, or if it cannot import
sae_lens, the benchmark says why and exits 0.

What is timed, on the same batches (``_common.make_activations``: synthetic residual-stream-like
rows rounded to bfloat16, written once to a .npy file that both sides load), d_in 2304,
d_sae 16,384, k 64, batch 4,096 (``--quick``: d_sae 2,048, batch 1,024), float32 weights:

* SAELens 6.54.12: a ``TopKTrainingSAE`` (``TopKTrainingSAEConfig`` defaults: decoder-norm
  rescaling, dense activations, aux coefficient 1) inside a real ``SAETrainer`` (constant lr,
  no wandb), whose ``_train_step`` is called: ``training_forward_pass`` (encode, TopK, decode,
  MSE + AuxK loss), the dead-latent bookkeeping, backward, ``clip_grad_norm_(1.0)``, Adam step,
  ``zero_grad``, lr-scheduler step. Autocast as SAELens' default (off) on CPU; on CUDA on (bf16),
  as our trainer does there.
* Ours: a real ``Trainer`` (topk; dyncorr with k_start = k_end = 64) whose ``Trainer._step`` is
  called: forward with the sparse TopK encoder / decoder, backward, decoder-gradient projection,
  clip 1.0, Adam, decoder renormalisation, ``after_step`` (dyncorr: the latent-statistics update).

SAELens runs in its own process (its own interpreter), ours in another (topk and dyncorr in the
same one, so the dyncorr / topk ratio is measured in one machine state), driven step by step over
a pipe, so they are timed alternately in one run. On this project's VM that state is drawn by where
a process's arrays land in memory (Adam's step alone takes ~0.7 or ~2.2 ms at the demo's size), so at
the demo's size ours runs in ``--demo-processes`` such processes (default 3) and the dyncorr / topk
goal is judged on the median of their ratios. One untimed warm-up step each, then ``--repeats``
rounds per setup in rotated order, a round being as many consecutive steps as fill about
``--round-s`` seconds (one for the steps at d_sae 16,384; about 10-30 at the demo's size), timed step by
step and averaged; tokens/s = batch / median step wall time. Two
scenarios: no dead latents (a fresh SAE: AuxK is skipped on both sides), and the same
``--dead-frac`` of latents forced dead on every step on both sides (AuxK active: k_aux = d_in / 2
on both). Ratios ours / SAELens are of tokens/s; the CPU time of each step (all threads) is the
noise-robust cross-check (``--threads 1`` gives steadier ratios on a shared machine). Beside each of
our steps, the encoder matmul alone (the step's one dense operation) is timed on the same batch: the
share of the step outside it is what sparse work, the optimiser and the penalty cost. Goals: topk
>= 6x SAELens, dyncorr >= 5x, dyncorr's step <= 1.2x topk's, in both scenarios; the demo's size
(d_in 576, d_sae 1,152, batch 512) is timed as well, for the dyncorr / topk ratio.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SAELENS_VERSION = "6.54.12"
DEFAULT_PY = "/tmp/saelens-venv/bin/python"
SETUP = (f"python3 -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0 && "
         f"/tmp/saelens-venv/bin/pip install sae-lens=={SAELENS_VERSION}")
GOAL_TOPK = 6.0  # ours topk / SAELens, tokens/s
GOAL_DYNCORR = 5.0
GOAL_VS_TOPK = 1.2  # dyncorr step / topk step
DEMO_SIZE = (576, 1152, 512)  # d_in, d_sae, batch of `make demo`
GOAL_SIZE = (2304, 16384, 4096)

SAELENS_WORKER = C.WORKER_PRELUDE + r'''
import sae_lens
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
torch.manual_seed(0)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=P["d_in"], d_sae=P["d_sae"], k=P["k"], dtype="float32",
                                            device=P["device"]))
tr = SAETrainer(cfg=SAETrainerConfig(total_training_samples=P["batch"] * 10**6, train_batch_size_samples=P["batch"],
                                     lr=3e-4, lr_end=3e-5, device=P["device"], autocast=P["autocast"],
                                     logger=LoggingConfig(log_to_wandb=False)),
                sae=sae, data_provider=iter(()))
X = _load_batches()
WINDOW = float(tr.cfg.dead_feature_window)
def prepare(cmd):
    # SAETrainer.dead_neurons is n_forward_passes_since_fired > dead_feature_window.
    m = _dead_mask(cmd.get("dead_frac", 0.0))
    tr.n_forward_passes_since_fired = torch.where(m, WINDOW + 1, 0.0).to(tr.n_forward_passes_since_fired)
def step(i):
    out = tr._train_step(sae, X[i % len(X)])
    return {"loss": float(out.loss)}
_serve({"arch": "sae-lens TopK", "sae_lens": sae_lens.__version__, "torch": torch.__version__,
        "params": sum(p.numel() for p in sae.parameters())})
'''


def check_saelens(python: str) -> str | None:
    """None if ``python`` imports sae_lens and torch; else why not."""
    if not Path(python).exists():
        return f"no SAELens interpreter at {python}"
    try:
        r = subprocess.run([python, "-c", "import sae_lens, torch; print(sae_lens.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} could not be run ({e})"
    if r.returncode != 0:
        return f"{python} cannot import sae_lens and torch: {r.stderr.strip().splitlines()[-1:] or r.returncode}"
    version = r.stdout.split()[0]
    if version != SAELENS_VERSION:
        print(f"note: sae-lens {version} found, this benchmark was written for {SAELENS_VERSION}", file=sys.stderr)
    return None


def _s(seconds: float) -> str:
    """Seconds with 3 decimals, 4 below 0.1 s (the demo-size steps take ~15 ms)."""
    return f"{seconds:.3f}" if seconds >= 0.1 else f"{seconds:.4f}"


def _section(label: str, res: dict[str, list[dict]], B: int, main_size: bool) -> tuple[list[str], bool]:
    """One scenario's table; whether every goal in it is met. With our setups in several worker
    processes, each dyncorr row is compared with the topk of its own process, and the goal on
    dyncorr / topk is judged on the median of those ratios (a line under the table)."""
    wall = {n: C.med(t["wall"] for t in res[n]) for n in res}
    cpu = {n: C.med(t["cpu"] for t in res[n]) for n in res}
    per_process = any(", process " in n for n in res)
    lines = [f"#### {label}", "",
             "| implementation | tokens/s | step wall s (median) | step CPU s (median) | wall s per step, each round "
             "| encoder matmul alone s (median) | step outside the matmul | torch addmm alone s (median) "
             "| optimiser step s (median) | ours / SAELens (wall) | ours / SAELens (CPU time) | step / topk's step "
             "| step - topk's step | goal | |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    ok_all = True
    ratios: list[float] = []
    extras: list[float] = []
    for n in res:
        each = ", ".join(_s(t["wall"]) for t in res[n])
        steps = {t.get("reps", 1) for t in res[n]}
        each += "" if steps == {1} else f" ({'/'.join(map(str, sorted(steps)))} steps each)"
        row = f"| {n} | {B / wall[n]:,.0f} | {_s(wall[n])} | {_s(cpu[n])} | {each} |"
        if n == "sae-lens":
            lines.append(row + " | | | | | | | | | |")
            continue
        mm, mm_addmm, opt = (C.med(t[key] for t in res[n]) if all(key in t for t in res[n]) else None
                             for key in ("mm", "mm_addmm", "opt"))
        r, rc = wall["sae-lens"] / wall[n], cpu["sae-lens"] / cpu[n]
        topk = wall.get(topk_of(n))
        vs_topk = wall[n] / topk if topk else None
        goals, oks = [], []
        if main_size:
            bound = GOAL_TOPK if n.startswith("ours topk") else GOAL_DYNCORR
            goals.append(f"SAELens >= {bound:g}x")
            oks.append(r >= bound)
        extra = ""
        if n.startswith("ours dyncorr") and vs_topk is not None:
            ratios.append(vs_topk)
            extras.append(wall[n] - topk)
            extra = f"{(wall[n] - topk) * 1e3:+.1f} ms"
            if not per_process:
                goals.append(f"<= {GOAL_VS_TOPK:g}x topk")
                oks.append(vs_topk <= GOAL_VS_TOPK)
        ok_all &= all(oks)
        row += (f" {_s(mm)} | {1 - mm / wall[n]:.0%} |" if mm else " | |")
        row += f" {_s(mm_addmm)} |" if mm_addmm else " |"
        row += f" {_s(opt)} |" if opt else " |"
        row += f" **{r:.2f}x** | {rc:.2f}x | {'' if vs_topk is None else f'{vs_topk:.2f}x'} | {extra} |"
        row += f" {', '.join(goals)} | {', '.join(C.met(o) for o in oks)} |"
        lines.append(row)
        if any(t.get("skipped") for t in res[n]):
            lines.append(f"WARNING: {n} skipped non-finite steps; its timings are not of full steps.")
    lines.append("")
    if per_process and ratios:
        med_ratio = C.med(ratios)
        ok = med_ratio <= GOAL_VS_TOPK
        ok_all &= ok
        lines += [f"dyncorr / topk in each worker process: {', '.join(f'{x:.2f}x' for x in ratios)}; median "
                  f"**{med_ratio:.2f}x** (goal <= {GOAL_VS_TOPK:g}x: {C.met(ok)}). dyncorr's step minus topk's: "
                  f"{', '.join(f'{x * 1e3:.1f}' for x in extras)} ms, median {C.med(extras) * 1e3:.1f} ms.", ""]
    return lines, ok_all


def ours_name(arch: str, process: int, n_processes: int) -> str:
    """The table's name of our ``arch`` in worker process ``process`` (1-based) of ``n_processes``."""
    return f"ours {arch}" if n_processes == 1 else f"ours {arch}, process {process}"


def topk_of(name: str) -> str:
    """The name of the topk setup in the same worker process as ``name``."""
    return name.replace("ours dyncorr", "ours topk", 1)


def _run_size(a, device: torch.device, d_in: int, d_sae: int, B: int, work: Path, n_ours: int = 1
              ) -> tuple[list[tuple[str, dict]], dict[str, C.StepWorker | C.WorkerView]]:
    """Every scenario at one size, SAELens in its process and ours (every arch) in ``n_ours``
    others, rounds rotated."""
    k = min(a.k, d_sae)
    workers: dict[str, C.StepWorker | C.WorkerView] = {}
    scenarios = [("no dead latents (AuxK off on both sides)", 0.0)]
    if a.dead_frac > 0:
        n_dead = int(round(a.dead_frac * d_sae))
        scenarios.append((f"{a.dead_frac:.0%} of latents ({n_dead:,}) dead on every step (AuxK on, k_aux = "
                          f"{min(d_in // 2, n_dead):,} on both sides)", a.dead_frac))
    results = []
    sub = work / f"{d_in}-{d_sae}-{B}"
    sub.mkdir()
    try:
        x = C.make_activations(a.n_batches * B, d_in, seed=a.seed + 1)
        batches = sub / "batches.npy"
        np.save(batches, x.reshape(a.n_batches, B, d_in))
        dead = sub / "dead.npy"
        np.save(dead, np.random.default_rng(a.seed).permutation(d_sae))
        store = C.write_store(sub / "step-store.zarr", x[: 2 * B], codec="none", logical_dtype="float32", chunk_rows=B)
        del x
        common = {"device": str(device), "threads": a.threads, "d_in": d_in, "d_sae": d_sae, "k": k, "batch": B,
                  "batches": str(batches), "dead": str(dead)}
        print(f"d_in {d_in}, d_sae {d_sae}, batch {B}: starting workers (SAELens' imports take a while)",
              file=sys.stderr, flush=True)
        workers["sae-lens"] = C.StepWorker("sae-lens", a.saelens_python, SAELENS_WORKER,
                                           {**common, "autocast": device.type == "cuda"})
        # Ours with every arch in one process, so that the dyncorr / topk ratio compares code in one
        # machine state; in several such processes where asked, since that state is drawn by where
        # a process's arrays land in memory (docs/benchmarks.md, eleventh session).
        for i in range(1, n_ours + 1):
            ours = C.StepWorker(f"ours-{i}", sys.executable, C.OURS_WORKER,
                                {**common, "repo": str(C.REPO), "store": str(store), "out": str(sub / f"run-{i}"),
                                 "archs": list(a.archs)})
            for arch in a.archs:
                workers[ours_name(arch, i, n_ours)] = C.WorkerView(ours, arch)
        start = 0
        for label, frac in scenarios:
            print(f"scenario: {label}", file=sys.stderr, flush=True)
            res = C.timed_rounds(workers, a.repeats, warmup=1, start=start, round_s=a.round_s, dead_frac=frac,
                                 time_matmul=True)
            start += a.repeats + 1
            results.append((label, res))
    finally:
        for w in workers.values():
            w.close()
    return results, workers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="d_sae 2048, batch 1024, no demo size: < 1 min")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    ap.add_argument("--saelens-python", default=DEFAULT_PY, help=f"interpreter of the SAELens side venv ({DEFAULT_PY})")
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=None, help="default 16384 (quick: 2048)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=None, help="default 4096 (quick: 1024)")
    ap.add_argument("--no-demo-size", action="store_true", help=f"skip the demo's size (d_in {DEMO_SIZE[0]}, "
                    f"d_sae {DEMO_SIZE[1]}, batch {DEMO_SIZE[2]})")
    ap.add_argument("--demo-processes", type=int, default=3,
                    help="worker processes of ours (each with every arch) at the demo's size; the dyncorr / topk "
                         "goal there is judged on the median of their ratios (default 3)")
    ap.add_argument("--archs", nargs="+", default=["topk", "dyncorr"], choices=["topk", "dyncorr"])
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per scenario, default 5 (quick: 3)")
    ap.add_argument("--round-s", type=float, default=0.5,
                    help="seconds of consecutive steps per round and setup (the step count is set from the warm-up "
                         "step, at most 64; 0: one step per round)")
    ap.add_argument("--n-batches", type=int, default=3, help="distinct batches, cycled")
    ap.add_argument("--dead-frac", type=float, default=0.1,
                    help="fraction of latents forced dead in the AuxK scenario (0: skip that scenario)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every process (default: torch's own choice, one per core)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (3 if a.quick else 5)
    argv_used = sys.argv[1:] if argv is None else argv

    why = check_saelens(a.saelens_python)
    if why:
        print(f"bench_vs_saelens skipped: {why}.\nSet up the side venv with:\n  {SETUP}\n"
              f"or pass --saelens-python PATH.")
        return

    device = C.resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    main_size = (a.d_in, a.d_sae or (2048 if a.quick else 16384), a.batch or (1024 if a.quick else 4096))
    sizes = [main_size] + ([] if a.quick or a.no_demo_size else [DEMO_SIZE])
    load_start = C.loadavg()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-saelens-", dir=a.workdir))
    lines: list[str] = []
    all_ok = True
    try:
        for size in sizes:
            d_in, d_sae, B = size
            is_main = size == main_size
            n_ours = 1 if is_main else max(1, a.demo_processes)
            results, workers = _run_size(a, device, d_in, d_sae, B, work, n_ours)
            sl = workers["sae-lens"].info
            ours_threads = next(w.info.get("threads") for n, w in workers.items() if n != "sae-lens")
            ours_thp = next(w.info.get("huge_pages") for n, w in workers.items() if n != "sae-lens")
            defined = size == GOAL_SIZE  # the SAELens goals are defined at this size
            lines += [
                f"### Training step: ours vs SAELens {sl.get('sae_lens')} TopK, d_in {d_in}, d_sae {d_sae:,}, "
                f"k {min(a.k, d_sae)}, batch {B:,}" + ("" if is_main else " (the demo's size)"),
                "",
                f"SAELens side: `{a.saelens_python}`, sae-lens {sl.get('sae_lens')}, torch {sl.get('torch')}, "
                f"{sl.get('threads')} threads, autocast {'on (bf16)' if device.type == 'cuda' else 'off'}. "
                f"Ours: torch {torch.__version__}, {ours_threads} threads, torch's huge-page advice "
                f"{'on' if ours_thp else 'off'} (`THP_MEM_ALLOC_ENABLE`: torch's default, off, on both sides; "
                "trainer/hugepages.py). Float32 weights on both; one untimed "
                f"warm-up step per setup and scenario, then the median of {a.repeats} rotated rounds, a round being "
                f"as many consecutive steps as fill ~{a.round_s:g} s (each round's mean per step is listed). "
                "\"encoder matmul alone\": the step's one dense operation (`(x - b_dec) @ W_enc.T + b_enc`) on the "
                "kernel our step uses (`trainer/saes/linear.py`: "
                f"{'oneDNN, bias fused' if any(w.info.get('onednn') for w in workers.values()) else 'torch addmm'}), "
                "timed in our process just before each of its steps, on the same batch; \"torch addmm alone\": the "
                "same product with `torch.addmm` (MKL on CPU), the kernel SAELens' step runs; \"optimiser step\": "
                "Adam's step inside our training step (on this project's VM its time shows where the process's "
                "arrays landed in memory: docs/benchmarks.md, eleventh session)."
                + ("" if n_ours == 1 else f" Ours ran in {n_ours} worker processes, each with {' and '.join(a.archs)}, "
                   "timed in one rotation with SAELens; each dyncorr row is compared with the topk of its process."),
                "",
            ]
            for label, res in results:
                sec, ok = _section(label, res, B, defined)
                lines += sec
                all_ok &= ok
            ours_peaks = ", ".join(C.peak_mb(workers[ours_name(a.archs[0], i, n_ours)])
                                   for i in range(1, n_ours + 1))
            lines += ["Peak resident memory of each process (MB, `VmHWM`; informative): sae-lens "
                      f"{C.peak_mb(workers['sae-lens'])}, ours ({' and '.join(a.archs)}, one process"
                      f"{'' if n_ours == 1 else f' each, {n_ours} processes'}) {ours_peaks}.", ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines += [
        f"Goals (issue 15), per scenario: at d_sae 16,384, batch 4,096, topk >= {GOAL_TOPK:g}x SAELens and "
        f"dyncorr >= {GOAL_DYNCORR:g}x; at every size dyncorr's step <= {GOAL_VS_TOPK:g}x topk's"
        + (": **met** in every row above." if all_ok else ": **NOT met** in some rows (see the last column)."),
        "",
        f"Wall time of the whole benchmark: {C.elapsed(t0)}.",
    ]
    C.emit(C.machine_lines("SAE training step vs SAELens", "benchmarks/bench_vs_saelens.py", argv_used,
                           device, load_start) + lines, a.out)


if __name__ == "__main__":
    main()
