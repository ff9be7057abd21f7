"""Several SAEs from one read: the same weights as separate runs, one read, resume, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from actcache.store import Layout
from actcache.store_writer import StoreWriter
from synthetic import HOOK, sparse_data
from trainer import artifacts as A
from trainer.cli import app
from trainer.config import RunConfig
from trainer.multi import MultiTrainer, expand_runs
from trainer.train import Interrupted, Trainer

HOOK2 = "blocks.1.hook_resid_post"
runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two hooks (the second a different mix of the same rows), 8 chunks of 256 rows, d = 16."""
    x, _ = sparse_data(n=16 * 16 * 8, d=16, n_features=24, k=3, seed=1)
    x2 = np.tanh(x[:, ::-1] * 2.0).astype(np.float32)
    path = tmp_path_factory.mktemp("multi") / "s.zarr"
    layout = Layout(len(x) // 16, 16, False, 16)
    attrs = {"model": {"id": "synthetic"}, "context_size": 16, "prepend_bos": False, "exclude_bos": False, "seed": 0,
             "dataset": {"path": "synthetic"}, "extract_config": {}}
    w = StoreWriter.create(path, attrs=attrs, layout=layout, hooks=[HOOK, HOOK2], d_model=16, logical_dtype="float32",
                           codec="none", windows=np.zeros((layout.n_windows, 16), np.int32),
                           window_source=np.arange(layout.n_windows))
    for c in range(layout.n_chunks):
        r0, r1 = layout.chunk_rows_range(c)
        w.write_chunk(c, {HOOK: x[r0:r1] * 5.0, HOOK2: x2[r0:r1]})
    w.finalize()
    return path


def _flat(store, out, **kw) -> dict:
    flat = dict(store=str(store), out=str(out), hook=HOOK, arch="dyncorr", d_sae=32, k=3, k_start=8, k_end=3,
                batch_size=64, n_tokens=64 * 12, lr=3e-3, dead_after_tokens=256, device="cpu", log_every=2,
                checkpoint_every=4, seed=3, shuffle_buffer_mb=0.04)  # groups of one chunk: several reads per epoch
    flat.update(kw)
    return flat


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / A.CHECKPOINT / A.CKPT_MODEL)


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), (a.name, name)


SWEEP = ["arch=baseline,dyncorr", "d_sae=32,48"]


def test_sweep_trains_like_separate_runs_from_one_read(store, tmp_path):
    cfgs = expand_runs([_flat(store, tmp_path / "multi")], SWEEP)
    assert [Path(c.train.out).name for c in cfgs] == ["arch=baseline,d_sae=32", "arch=baseline,d_sae=48",
                                                      "arch=dyncorr,d_sae=32", "arch=dyncorr,d_sae=48"]
    mt = MultiTrainer(cfgs)
    summaries = mt.fit()
    assert [s["steps"] for s in summaries] == [12] * 4
    for i, c in enumerate(cfgs):
        alone = Trainer(RunConfig.from_flat({**c.to_flat(), "out": str(tmp_path / "alone" / str(i))}))
        alone.fit()
        _assert_same(Path(c.train.out), alone.paths.root)
        assert mt.loaders[HOOK].groups_read == alone.loader.groups_read > 1  # one read for the four runs
        assert (Path(c.train.out) / A.WEIGHTS).exists() and (Path(c.train.out) / A.SAELENS).is_dir()


def test_two_hooks_one_loader_each(store, tmp_path):
    cfgs = expand_runs([_flat(store, tmp_path / "m", arch="topk")], [f"hook={HOOK},{HOOK2}"])
    mt = MultiTrainer(cfgs)
    mt.fit()
    assert set(mt.loaders) == {HOOK, HOOK2}
    for c in cfgs:
        alone = tmp_path / "alone" / c.train.hook
        Trainer(RunConfig.from_flat({**c.to_flat(), "out": str(alone)})).fit()
        _assert_same(Path(c.train.out), alone)


def test_resume_after_a_crash_between_two_runs_checkpoints(store, tmp_path):
    """Run a is back at step 4 (its step-8 checkpoint lost), run b at step 8: the loader restarts
    at a's position and b skips the batches it trained on; both end as uninterrupted runs."""
    flats = {"a": _flat(store, tmp_path / "r" / "a", arch="baseline"), "b": _flat(store, tmp_path / "r" / "b")}
    mt = MultiTrainer(expand_runs(list(flats.values()), []))
    a_ckpt = Path(mt.trainers[0].paths.checkpoint)
    feed = mt._feed

    def _feed(group, x):
        feed(group, x)
        step = mt.trainers[0].state["step"]
        if step == 4:
            shutil.copytree(a_ckpt, tmp_path / "a-step4", dirs_exist_ok=True)
        if step == 9:
            mt._stop = True

    mt._feed = _feed
    with pytest.raises(Interrupted):
        mt.fit()
    assert json.loads((a_ckpt / A.CKPT_STATE).read_text())["step"] == 9
    shutil.rmtree(a_ckpt)
    shutil.copytree(tmp_path / "a-step4", a_ckpt)
    resumed = MultiTrainer(expand_runs(list(flats.values()), []), resume=True)
    assert resumed.skip == [0, 5]
    resumed.fit()
    ref = MultiTrainer(expand_runs([{**f, "out": str(tmp_path / "ref" / n)} for n, f in flats.items()], []))
    ref.fit()
    for n in ("a", "b"):
        _assert_same(tmp_path / "r" / n, tmp_path / "ref" / n)
        steps = [json.loads(ln)["step"] for ln in (tmp_path / "r" / n / A.METRICS).read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 12


def test_cli_several_configs_and_errors(store, tmp_path):
    base = _flat(store, "")
    base.pop("out")
    (tmp_path / "small.json").write_text(json.dumps({**base, "d_sae": 32}))
    (tmp_path / "wide.json").write_text(json.dumps({**base, "d_sae": 48, "arch": "baseline"}))
    args = ["train", "--config", str(tmp_path / "small.json"), "--config", str(tmp_path / "wide.json"),
            "--out", str(tmp_path / "out"), "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "small: dyncorr: 12 steps" in res.output and "wide: baseline: 12 steps" in res.output
    assert json.loads((tmp_path / "out" / "wide" / A.CONFIG).read_text())["d_sae"] == 48
    res = runner.invoke(app, args + ["--resume"])  # finished runs: resume is a no-op that re-exports
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "small.json"), "--out", str(tmp_path / "x"),
                              "--sweep", "batch_size=32,64", "--quiet"])
    assert res.exit_code == 2 and "must agree on" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "small.json"), "--out", str(tmp_path / "x"),
                              "--sweep", "d_sae", "--quiet"])
    assert res.exit_code == 2 and "FIELD=V1,V2" in res.output
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "small.json"), "--out", str(tmp_path / "x"),
                              "--sweep", "d_sae=32,big", "--quiet"])
    assert res.exit_code == 2 and "expected int" in res.output
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "small.json"), "--out", str(tmp_path / "x"),
                              "--nproc", "2", "--batch-size", "63", "--quiet"])  # checked before torchrun starts
    assert res.exit_code == 2 and "not divisible by --nproc 2" in res.output
    assert not (tmp_path / "x").exists()
