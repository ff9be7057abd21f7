"""sae experiment: every variant x seed trained on one synthetic store, evaluated, compared; re-runs skip."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actcache.errors import ActcacheError
from synthetic import sparse_data, write_store
from trainer import artifacts as A
from trainer.cli import app
from trainer.report.experiment import DEFAULT_VARIANTS, PARAMS, REPORT, RUNS, run_experiment

runner = CliRunner()
SMALL = dict(n_tokens=64 * 4, batch_size=64, d_sae=32, k_start=8, k_end=3, lr=3e-3, dead_after_tokens=200,
             device="cpu", eval_options={"splice": False}, train_overrides={"log_every": 1, "shuffle_buffer_mb": 0.1})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x, _ = sparse_data(n=16 * 16 * 3, d=16, n_features=24, k=3, seed=1)  # 3 chunks: 2 train, 1 held out
    return write_store(tmp_path_factory.mktemp("exp") / "s.zarr", x * 5.0)


def test_experiment_trains_every_variant_and_seed_then_skips_them(store, tmp_path):
    said: list[str] = []
    report = run_experiment(store, tmp_path, seeds=2, echo=said.append, **SMALL)
    assert report == tmp_path / REPORT / "report.md"
    names = [f"{v}-s{s}" for v in DEFAULT_VARIANTS for s in range(2)]
    assert sorted(p.name for p in (tmp_path / RUNS).iterdir()) == sorted(names)
    for n in names:
        d = A.run_paths(tmp_path / RUNS / n)
        assert d.summary.exists() and d.eval.exists()
        cfg = json.loads(d.config.read_text())
        assert cfg["n_tokens"] == 256 and cfg["batch_size"] == 64 and cfg["seed"] == int(n[-1])
    cfgs = {n: json.loads((tmp_path / RUNS / n / A.CONFIG).read_text()) for n in names}
    assert cfgs["baseline-s0"]["arch"] == "baseline" and cfgs["baseline-s0"]["sparsity_penalty"] == 0.04
    assert cfgs["topk-s1"]["k"] == 3  # the dyncorr schedule's final k
    assert cfgs["dyncorr-s0"]["eps"] == 1e-6 and cfgs["dyncorr-eps0-s0"]["eps"] == 0.0
    numbers = json.loads((tmp_path / REPORT / "compare.json").read_text())
    assert set(numbers["seed_spread"]) == {"baseline", "topk", "dyncorr eps=1e-06", "dyncorr eps=0.0"}
    assert json.loads((tmp_path / PARAMS).read_text())["seeds"] == 2
    md = report.read_text()
    assert "## Stability" in md and "![loss](loss.png)" in md

    # Re-running trains nothing and evaluates nothing: the finished runs are skipped.
    before = {n: (tmp_path / RUNS / n / A.WEIGHTS).stat().st_mtime_ns for n in names}
    said.clear()
    run_experiment(store, tmp_path, seeds=2, echo=said.append, **SMALL)
    assert sum("skipped" in m for m in said) == len(names) and not any(m.startswith("eval") for m in said)
    assert before == {n: (tmp_path / RUNS / n / A.WEIGHTS).stat().st_mtime_ns for n in names}

    # Other settings in the same directory: refused before anything is trained.
    with pytest.raises(ActcacheError, match="holds a run with other settings.*lr"):
        run_experiment(store, tmp_path, seeds=2, **{**SMALL, "lr": 1e-2})


def test_unfinished_run_is_resumed(store, tmp_path):
    kw = {**SMALL, "variants": ("topk",), "evaluate": False}
    run_experiment(store, tmp_path, **kw)
    run = A.run_paths(tmp_path / RUNS / "topk-s0")
    run.summary.unlink()  # as if killed after the last checkpoint
    said: list[str] = []
    run_experiment(store, tmp_path, echo=said.append, **kw)
    assert any("resuming" in m for m in said) and run.summary.exists()


def test_cli_bad_input_is_one_line(store, tmp_path):
    res = runner.invoke(app, ["experiment", "--store", str(store), "--out", str(tmp_path / "e"), "--variants", "topk,nope"])
    assert res.exit_code == 2 and "unknown variant(s) nope" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["experiment", "--store", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (tmp_path / "e").exists()


def test_cli_runs_one_variant(store, tmp_path):
    res = runner.invoke(app, ["experiment", "--store", str(store), "--out", str(tmp_path / "e"), "--variants", "dyncorr",
                              "--n-tokens", "128", "--batch-size", "64", "--d-sae", "32", "--k-start", "8", "--k-end", "3",
                              "--device", "cpu", "--no-splice", "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith(str(tmp_path / "e" / REPORT / "report.md"))
    assert "Stability" in res.output
