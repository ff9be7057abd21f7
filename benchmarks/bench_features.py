"""Benchmark ``sae features``: rows per second of its streaming pass against the training
loader's read rate on the same store, and its memory as the rows grow.

Run: ``python benchmarks/bench_features.py [--quick] [--device auto|cpu|cuda] [--out docs/benchmarks.md]``.

One bfloat16 zstd store (``_common.make_activations``: d_model 576, SmolLM2-135M's width, 65,536
rows in chunks of 4,096; quick: 16,384) and TopK SAEs (k 32, random weights) at each ``--d-sae``.
Three timings, alternated over ``--repeats`` rounds (rotated order), one untimed pass of each first:

- *loader*: a fresh ``ActivationLoader`` (train split, ``heldout_chunks=0``, batch 4,096), one epoch;
- *encode only*: the split's rows read as ``sae features`` reads them (``EvalData.batches``) and
  ``sae.encode`` on each batch, nothing else: the floor of any pass that needs the latents;
- *features pass*: ``trainer.features.build.scan_split`` (the same reads and encodes, plus the
  running top-k, histograms, sums and co-activation sums of 256 shown latents).

rows/s = rows / median wall time; ratios are of numbers measured in this run. Goal: features pass
>= 0.5x the loader. Memory: ``FeatureScan.state_bytes`` (what the pass holds between batches) and the
peak RSS of a fresh ``sae features --no-logits`` process over a quarter of the rows and over all
of them (bounded: it must not grow with the rows).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from trainer import artifacts as A  # noqa: E402
from trainer.checkpoint import atomic_write_text  # noqa: E402
from trainer.config import RunConfig, SAEConfig  # noqa: E402
from trainer.evaluation.data import select_split  # noqa: E402
from trainer.evaluation.loading import load_run  # noqa: E402
from trainer.export import folded_weights, saelens_cfg, write_weights  # noqa: E402
from trainer.features.build import FeaturesConfig, scan_split, shown_latents  # noqa: E402
from trainer.features.scan import FeatureScan  # noqa: E402
from trainer.loader import ActivationLoader, LoaderConfig  # noqa: E402
from trainer.saes import build_sae  # noqa: E402

GOAL = 0.5
SHOWN = 256


def make_run(root: Path, store: Path, d_in: int, d_sae: int, k: int) -> Path:
    cfg = RunConfig.from_flat(dict(store=str(store), hook=C.HOOK, out=str(root), arch="topk", d_sae=d_sae, k=k))
    root.mkdir(parents=True)
    atomic_write_text(A.run_paths(root).config, json.dumps(cfg.to_flat()))
    sae = build_sae(SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k), seed=1)
    meta = {"sae": asdict(sae.cfg), "saelens_cfg": saelens_cfg(sae, final_k=k, metadata={"scaling_factor_folded": 1.0})}
    write_weights(A.run_paths(root).weights, folded_weights(sae, 1.0), meta)
    return root


def time_loader(store: Path, device: torch.device) -> tuple[int, float]:
    t0 = time.perf_counter()
    loader = ActivationLoader(store, C.HOOK, LoaderConfig(batch_size=4096, heldout_chunks=0, seed=0), device=device)
    it, n = loader.batches(), 0
    for _ in range(loader.n_rows // 4096):
        n += len(next(it))
    wall = time.perf_counter() - t0
    it.close()
    return n, wall


@torch.no_grad()
def time_encode(run_dir: Path, device: torch.device) -> tuple[int, float]:
    run = load_run(run_dir, device=device)
    data = select_split(run, None, "all")
    t0, n = time.perf_counter(), 0
    for x in data.batches(FeaturesConfig().batch_rows):
        z = run.sae.encode(x.to(device), run.k)
        n += len(z)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n, time.perf_counter() - t0


def time_scan(run_dir: Path, device: torch.device) -> tuple[int, float]:
    run = load_run(run_dir, device=device)
    data = select_split(run, None, "all")
    cfg = FeaturesConfig(split="all", device=str(device))
    t0 = time.perf_counter()
    summary = scan_split(run, data, cfg, shown_latents(run.sae.cfg.d_sae, SHOWN))
    return summary.n_rows, time.perf_counter() - t0


def features_rss_mb(run_dir: Path, max_rows: int, device: torch.device, out: Path) -> float:
    """Peak RSS (MB) of a fresh process running ``sae features`` on ``max_rows`` rows."""
    code = ("import resource, sys; from sae_cli import main; sys.argv = ['sae'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('@@rss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    args = [sys.executable, "-c", code, "features", str(run_dir), "--split", "all", "--no-logits", "--latents",
            str(SHOWN), "--max-rows", str(max_rows), "--device", str(device), "--out", str(out)]
    res = subprocess.run(args, capture_output=True, text=True, cwd=C.REPO, check=True)
    return int(next(line for line in res.stdout.splitlines() if line.startswith("@@rss")).split()[1]) / 1024


def bench(a, device: torch.device, work: Path) -> list[str]:
    x = C.make_activations(a.rows, a.d_in, seed=a.seed)
    store = C.write_store(work / "s.zarr", x, codec="zstd")
    del x
    lines = [f"Store: {a.rows:,} rows x d_model {a.d_in}, bfloat16, zstd, chunks of 4,096 rows; TopK SAEs (k {a.k}, "
             f"random weights); {SHOWN} shown latents; median of {a.repeats} alternating repeats.", "",
             "| d_sae | loader rows/s | encode-only rows/s | features pass rows/s | features / loader | "
             "features / encode-only | pass state MB | peak RSS MB (1/4 rows -> all rows) | goal >= 0.5x loader |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d_sae in a.d_sae:
        run = make_run(work / f"run-{d_sae}", store, a.d_in, d_sae, a.k)
        fns = {"loader": lambda: time_loader(store, device), "encode": lambda: time_encode(run, device),
               "features": lambda: time_scan(run, device)}
        for fn in fns.values():
            fn()  # untimed: page cache, lazy imports, allocator
        walls: dict[str, list[float]] = {name: [] for name in fns}
        rows: dict[str, int] = {}
        for order in C.rounds(list(fns), a.repeats):
            for name in order:
                rows[name], wall = fns[name]()
                walls[name].append(wall)
        rate = {name: rows[name] / C.med(w) for name, w in walls.items()}
        state = FeatureScan(d_sae, FeaturesConfig().examples, torch.arange(min(SHOWN, d_sae))).state_bytes
        rss = [features_rss_mb(run, n, device, work / f"site-{d_sae}-{n}") for n in (a.rows // 4, a.rows)]
        ratio = rate["features"] / rate["loader"]
        lines.append(f"| {d_sae:,} | {rate['loader']:,.0f} | {rate['encode']:,.0f} | {rate['features']:,.0f} | "
                     f"{ratio:.2f}x | {rate['features'] / rate['encode']:.2f}x | {state / 2**20:.1f} | "
                     f"{rss[0]:,.0f} -> {rss[1]:,.0f} | {C.met(ratio >= GOAL)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", "*encode-only* is the encoder alone (rows x d_in x d_sae); *features / encode-only* is what is left "
              "of that rate once the pass's bookkeeping is added (running top-k, histograms, sums, and the "
              "co-activation sums of the shown latents, a rows x shown x d_sae product); *features / loader* is the "
              "goal's ratio. On a CPU both encoding and bookkeeping run far below the loader's read rate.", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: the whole run in about a minute")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    ap.add_argument("--rows", type=int, default=None, help="store rows, default 65536 (quick: 16384)")
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, nargs="+", default=None, help="default 1152 4608 16384 (quick: 1152)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 2)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.rows = a.rows or (16384 if a.quick else 65536)
    a.d_sae = a.d_sae or ([1152] if a.quick else [1152, 4608, 16384])
    a.repeats = a.repeats or (2 if a.quick else 3)
    device = C.resolve_device(a.device)
    load_start = C.loadavg()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-features-", dir=a.workdir))
    try:
        body = bench(a, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body.append(f"Wall time of the whole benchmark: {C.elapsed(t0)}.")
    argv_used = sys.argv[1:] if argv is None else argv
    C.emit(C.machine_lines("sae features: streaming pass vs loader", "benchmarks/bench_features.py", argv_used,
                           device, load_start) + body, a.out)


if __name__ == "__main__":
    main()
