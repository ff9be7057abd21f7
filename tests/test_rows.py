"""Massive-activation rows (trainer.rows): dropped by batch-median norm in training, evaluation
and splicing alike, counted, and refused when the ratio is meaningless."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from synthetic import HOOK, sparse_data, write_store
from trainer import artifacts as A
from trainer.cli import app
from trainer.config import RunConfig
from trainer.evaluation import evaluate_run
from trainer.evaluation.splice import sae_replacement, zero_replacement
from trainer.loader import ActivationLoader
from trainer.rows import drop_norm_outliers, norm_outliers
from trainer.saes import build_sae
from trainer.config import SAEConfig
from trainer.train import train

runner = CliRunner()
EVERY = 37  # every 37th row is a massive activation


def _planted(n: int = 16 * 16 * 8, d: int = 16) -> np.ndarray:
    x, _ = sparse_data(n=n, d=d, n_features=24, k=3, seed=4)
    x = x * 5.0
    x[::EVERY] *= 400.0
    return x


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("rows") / "s.zarr", _planted())


def test_outliers_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 32, generator=g)
    x[[3, 77, 401]] *= 50
    n64 = x.double().norm(dim=1)
    ref = n64 > 10 * n64.median()
    assert torch.equal(norm_outliers(x, 10.0), ref) and int(ref.sum()) == 3
    kept, n = drop_norm_outliers(x, 10.0)
    assert n == 3 and torch.equal(kept, x[~ref])
    same, none = drop_norm_outliers(x, 0.0)
    assert none == 0 and same is x
    assert norm_outliers(x.reshape(20, 25, 32), 10.0).shape == (20, 25)  # (windows, positions)


def _flat(store, out, **kw):
    base = dict(store=str(store), out=str(out), arch="topk", d_sae=32, k=3, batch_size=64, n_tokens=64 * 30,
                epochs=2, lr=3e-3, device="cpu", log_every=5, checkpoint_every=10, seed=3, heldout_chunks=1)
    base.update(kw)
    return base


def test_training_and_eval_drop_exactly_the_massive_rows(store, tmp_path):
    cfg = RunConfig.from_flat(_flat(store, tmp_path / "run", max_norm_ratio=10.0))
    summary = train(cfg)
    loader = ActivationLoader(store, HOOK, cfg.loader)  # the same batches, in the same order
    seen = [b for _, b in zip(range(summary["steps"]), loader.batches())]
    expected = sum(int(norm_outliers(b, 10.0).sum()) for b in seen)
    assert summary["rows_dropped"] == expected > 0
    assert summary["tokens"] == 64 * 30 - expected  # tokens: the rows trained on
    rec = [json.loads(ln) for ln in A.run_paths(tmp_path / "run").metrics.read_text().splitlines()]
    assert rec[-1]["rows_dropped"] == expected

    r = evaluate_run(tmp_path / "run", splice=False, device="cpu")
    held = torch.cat(list(ActivationLoader(store, HOOK, cfg.loader, split="heldout").batches()))
    planted = int(norm_outliers(held, 10.0).sum())
    assert r["eval_result_metrics"]["token_stats"]["rows_excluded_max_norm_ratio"] == planted > 0
    assert r["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"] == len(held) - planted
    assert r["eval_config"]["max_norm_ratio"] == 10.0

    plain = train(RunConfig.from_flat(_flat(store, tmp_path / "plain")))
    assert plain["rows_dropped"] == 0 and plain["tokens"] == 64 * 30


def test_splice_keeps_the_dropped_rows_clean():
    sae = build_sae(SAEConfig(arch="topk", d_in=8, d_sae=16, k=2))
    h = torch.randn(2, 6, 8)
    h[0, 3] *= 1000
    for fn in (sae_replacement(sae, 2, 1, max_norm_ratio=10.0), zero_replacement(1, max_norm_ratio=10.0)):
        out = fn(h)
        assert torch.equal(out[0, 3], h[0, 3]) and torch.equal(out[:, 0], h[:, 0])  # outlier and BOS kept
        changed = (out != h).any(-1)
        changed[0, 3] = changed[:, 0] = True
        assert changed.all()  # every other row replaced
    assert not torch.equal(sae_replacement(sae, 2, 1)(h)[0, 3], h[0, 3])  # ratio 0: replaced too


@pytest.mark.parametrize("bad", ["0.5", "1", "nan", "-3"])
def test_a_meaningless_ratio_is_one_line(store, tmp_path, bad):
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(tmp_path / "r"), "--max-norm-ratio", bad,
                            "--quiet"])
    out = r.output.strip()
    assert r.exit_code == 2 and len(out.splitlines()) == 1 and "Traceback" not in out, out
    assert "--max-norm-ratio" in out and "median" in out
    assert not (tmp_path / "r").exists()
