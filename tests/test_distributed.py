"""Data-parallel training: 2 CPU processes (gloo) with batch B/2 each == 1 process with batch B.

First the ranks get their halves of the 1-process batches (``RankSlice``), so the data order is
the same by construction and the test checks the training maths: averaged gradients, the global
total variance of the TopK loss, global dead-latent tracking (AuxK), and the dyncorr statistics
(``mu``, ``M``) and penalty computed from every rank's latents. float64 throughout, so the runs
agree to ~1e-12, not just roughly. Then the real sharded loader (a 1-process run with
``shards=2`` reads the same rows): a stop raised on one rank stops both, resume restores each
rank's loader position, and ``sae train --nproc 2`` (torchrun) matches in float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from synthetic import HOOK, sparse_data, write_store
from trainer import artifacts as A
from trainer.config import RunConfig

B, STEPS = 64, 8
ARCHS = ("baseline", "dyncorr")


def _flat(store: Path, out: Path, arch: str, **kw) -> dict:
    flat = dict(store=str(store), out=str(out), arch=arch, d_sae=96, k_start=8, k_end=3, lambda_max=1.0, beta=0.2,
                cov_dtype="float64", batch_size=B, n_tokens=B * STEPS, lr=3e-3, dead_after_tokens=B,
                normalize="expected_average_only_in", device="cpu", log_every=2, checkpoint_every=4, seed=5,
                sparsity_penalty=0.2, lr_warmup_frac=0.0)
    flat.update(kw)
    return flat


class RankSlice:
    """Rank ``rank``'s rows of ``inner``'s batches, in float64 (so that data-side sums, e.g. the
    total variance, carry no float32 roundoff); ``world=1``: all of them, i.e. ``inner`` in float64."""

    def __init__(self, inner, rank: int = 0, world: int = 1):
        self.inner, self.rank, self.world = inner, rank, world
        self.n_rows, self.scaling_factor = inner.n_rows // world, inner.scaling_factor

    def batches(self):
        b = self.inner.cfg.batch_size // self.world
        for x in self.inner.batches():
            yield x[self.rank * b:(self.rank + 1) * b].double()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, d):
        self.inner.load_state_dict(d)


def _trainer(cfg: RunConfig, rank: int, world: int, dp=None, **kw):
    """1-process batches sliced between the ranks (the data order is the same by construction)."""
    from trainer.loader import ActivationLoader
    from trainer.train import Trainer

    inner = ActivationLoader(cfg.train.store, HOOK, cfg.loader, device="cpu")
    return Trainer(cfg, dp=dp, loader=RankSlice(inner, rank, world), **kw)


def _sharded(cfg: RunConfig, dp=None, **kw):
    """The real loader of this rank (a 1-process run holds every shard), batches in float64."""
    from actcache.store import open_store
    from trainer.distributed import LOCAL
    from trainer.train import Trainer, make_loader, resolve_config

    store = open_store(cfg.train.store)
    loader = make_loader(store, resolve_config(cfg, store), dp or LOCAL, torch.device("cpu"))
    return Trainer(cfg, dp=dp, loader=RankSlice(loader), **kw)


@contextlib.contextmanager
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _worker(rank: int, world: int, port: int, store: str, root: str) -> None:
    import torch.distributed as dist

    from trainer.distributed import ProcessGroup
    from trainer.train import Interrupted

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dp = ProcessGroup(rank, world, torch.device("cpu"))
    try:
        for arch in ARCHS:
            cfg = RunConfig.from_flat(_flat(Path(store), Path(root) / f"dp-{arch}", arch))
            tr = _trainer(cfg, rank, world, dp)
            tr.fit()
            torch.save(tr.sae.state_dict(), Path(root) / f"dp-{arch}-rank{rank}.pt")
        # Real loader. A stop on rank 1 only (SIGTERM there) stops both ranks at the same step; resume finishes.
        cfg = RunConfig.from_flat(_flat(Path(store), Path(root) / "dp-stop", "dyncorr"))
        tr = _sharded(cfg, dp)
        orig = tr.train_on

        def train_on(x):
            orig(x)
            if rank == 1 and tr.state["step"] == 3:
                tr._stop = True

        tr.train_on = train_on
        with contextlib.suppress(Interrupted):
            tr.fit()
            raise AssertionError("not interrupted")
        assert tr.state["step"] == 3
        _sharded(cfg, dp, resume=True).fit()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x, _ = sparse_data(n=16 * 16 * 8, d=16, n_features=24, k=3, seed=1)
    return write_store(tmp_path_factory.mktemp("dist-store") / "s.zarr", x * 5.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, store):
    root = tmp_path_factory.mktemp("dist")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(store), str(root))) for r in range(2)]
    for p in procs:
        p.start()
    with _float64():  # the 1-process references, meanwhile
        for arch in ARCHS:
            _trainer(RunConfig.from_flat(_flat(store, root / f"ref-{arch}", arch)), 0, 1).fit()
        _sharded(RunConfig.from_flat(_flat(store, root / "ref-shards2", "dyncorr", shards=2))).fit()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():  # a hang (e.g. mismatched collectives) fails the test instead of blocking it
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed (its traceback is in the captured stderr)"
    return root


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / A.CHECKPOINT / A.CKPT_MODEL)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_with_half_batches_match_one_rank(runs, arch):
    ref, dp = _state(runs / f"ref-{arch}"), _state(runs / f"dp-{arch}")
    assert set(ref) == set(dp)
    if arch == "dyncorr":
        assert {"stats.M_buf", "stats.mu"} <= set(ref) and ref["stats.M_buf"].abs().sum() > 0
    for name in ref:
        torch.testing.assert_close(dp[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    # Both ranks hold the same model and statistics (rank 1 wrote nothing of its own).
    r0 = torch.load(runs / f"dp-{arch}-rank0.pt", weights_only=True)
    r1 = torch.load(runs / f"dp-{arch}-rank1.pt", weights_only=True)
    for name, t in r0.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, r1[name]), name
    # Logged metrics are those of the global batch.
    recs = [[json.loads(ln) for ln in (runs / f"{p}-{arch}" / A.METRICS).read_text().splitlines()] for p in ("ref", "dp")]
    assert [r["step"] for r in recs[0]] == [r["step"] for r in recs[1]]
    for a, b in zip(*recs):
        for key in ("loss", "mse", "explained_variance", "l0", "dead_fraction", "grad_norm", "corr_loss", "auxk_loss",
                    "fvu", "mse_loss", "l1_loss", "n_pairs", "mean_abs_R"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["step"], key)
    if arch == "dyncorr":  # the run exercised the penalty and AuxK on dead latents
        assert max(r["corr_loss"] for r in recs[0]) > 0 and max(r["auxk_loss"] for r in recs[0]) > 0
    summary = json.loads((runs / f"dp-{arch}" / A.SUMMARY).read_text())
    assert summary["steps"] == STEPS and summary["tokens"] == STEPS * B


def test_real_loader_stop_on_one_rank_and_resume_match_one_process_with_two_shards(runs):
    ckpt = json.loads((runs / "dp-stop" / A.CHECKPOINT / A.CKPT_STATE).read_text())
    assert ckpt["step"] == STEPS and [s["rank"] for s in ckpt["loader_ranks"]] == [0, 1]
    a, b = _state(runs / "ref-shards2"), _state(runs / "dp-stop")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-12, msg=name)
    steps = [json.loads(ln)["step"] for ln in (runs / "dp-stop" / A.METRICS).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_sae_train_nproc_2_launches_torchrun_and_matches_one_process(store, tmp_path):
    from trainer.train import train

    flat = _flat(store, tmp_path / "dp", "dyncorr", cov_dtype="float32")
    (tmp_path / "run.json").write_text(json.dumps(flat))
    args = [sys.executable, "-m", "trainer", "train", "--nproc", "2", "--quiet", "--config", str(tmp_path / "run.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("dyncorr: 8 steps") == 1, res.stdout  # rank 0 alone reports
    train(RunConfig.from_flat({**flat, "out": str(tmp_path / "ref"), "shards": 2}))
    a, b = _state(tmp_path / "ref"), _state(tmp_path / "dp")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "dp" / A.WEIGHTS).exists() and not list(tmp_path.glob("dp/.*tmp*"))
