"""What a run directory and an export leave behind (issue 12 §3, §4): file modes under the umask,
stale temporaries removed on resume, a never-started run replaceable, exports swapped whole, the
SAELens 6.x cfg.json layout, and an absolute store path that works from any folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae_cli import app
from synthetic import HOOK, sparse_data, write_store
from trainer import artifacts as A
from trainer.export import SAELENS_VERSION, saelens_layout

runner = CliRunner()


def _args(store: str | Path, out: str | Path, **kw) -> list[str]:
    flat = dict(store=str(store), out=str(out), arch="topk", d_sae=32, k=3, batch_size=64, n_tokens=64 * 8,
                device="cpu", log_every=4, checkpoint_every=4, seed=3, **kw)
    return ["train", "--quiet", *[a for k, v in flat.items() for a in (f"--{k.replace('_', '-')}", str(v))]]


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x, _ = sparse_data(n=16 * 16 * 8, d=16, n_features=24, k=3, seed=1)
    return write_store(tmp_path_factory.mktemp("integrity") / "s.zarr", x * 5.0)


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    _ok(_args(store, run))
    return run


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask(store, tmp_path, umask):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        _ok(_args(store, run))
        _ok(["export", str(run), "--out", str(tmp_path / "sl")])
    finally:
        os.umask(old)
    paths = [p for p in [run, *run.rglob("*"), tmp_path / "sl", *(tmp_path / "sl").rglob("*")]]
    assert {p.name for p in paths} >= {A.CONFIG, A.METRICS, A.WEIGHTS, A.SUMMARY, A.CKPT_MODEL, A.CKPT_STATE,
                                        A.SAELENS_CFG, A.SAELENS_WEIGHTS}
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))} != {oct(want)}"


def test_resume_removes_what_a_kill_mid_write_left(store, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    staging = run / ".checkpoint.tmp-1a2b3c4d"  # a kill mid-checkpoint: a whole checkpoint's worth
    shutil.copytree(run / A.CHECKPOINT, staging)
    half = run / f".{A.WEIGHTS}.5e6f7a8b.tmp"
    half.write_bytes(b"\0" * 1000)
    export_staging = run / ".saelens.tmp-0f0f0f0f"
    export_staging.mkdir()
    weights = load_file(run / A.WEIGHTS)
    _ok(_args(store, run) + ["--resume"])  # finished: a no-op that re-exports
    assert not staging.exists() and not half.exists() and not export_staging.exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    resumed = load_file(run / A.WEIGHTS)
    assert all(torch.equal(weights[k], resumed[k]) for k in weights) and set(weights) == set(resumed)


def test_a_run_that_never_reached_its_first_checkpoint_can_be_started_again(store, tmp_path):
    """Only config.json (a failure or kill before the first checkpoint): nothing to lose, so the
    (corrected) command starts it again instead of asking for --resume / --overwrite."""
    run = tmp_path / "run"
    run.mkdir()
    (run / A.CONFIG).write_text(json.dumps({"lr": -0.001}))
    _ok(_args(store, run))
    assert json.loads((run / A.CONFIG).read_text())["lr"] == 3e-4


def test_resume_of_a_missing_run_is_an_error_and_creates_nothing(store, tmp_path):
    res = runner.invoke(app, _args(store, tmp_path / "none") + ["--resume"])
    assert res.exit_code == 2 and "nothing to resume" in res.output
    assert not (tmp_path / "none").exists()


def test_export_overwrite_swaps_the_whole_directory(finished, tmp_path):
    out = tmp_path / "sl"
    _ok(["export", str(finished), "--out", str(out)])
    (out / A.SAELENS_CFG).write_text("{}")  # stands for an older export
    (out / "stale.txt").write_text("from the old export")
    res = runner.invoke(app, ["export", str(finished), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / A.SAELENS_CFG).read_text() == "{}"
    _ok(["export", str(finished), "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == [A.SAELENS_CFG, A.SAELENS_WEIGHTS]
    assert json.loads((out / A.SAELENS_CFG).read_text())["metadata"]["hook_name"] == HOOK
    assert [p.name for p in tmp_path.iterdir()] == ["sl"]  # no staging or old dir left beside it
    a, b = load_file(out / A.SAELENS_WEIGHTS), load_file(finished / A.SAELENS / A.SAELENS_WEIGHTS)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# SAELens 6.x SAEConfig fields (sae_lens/saes/sae.py) + the TopK ones (sae_lens/saes/topk_sae.py).
TOP_LEVEL = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
             "reshape_activations", "metadata"}
TOPK = {"k", "rescale_acts_by_decoder_norm"}
METADATA = {"sae_lens_version", "sae_lens_training_version", "model_name", "hook_name", "hook_head_index",
            "context_size", "prepend_bos", "dataset_path", "model_from_pretrained_kwargs"}


def test_saelens_cfg_has_the_6x_layout(store, finished):
    """SAELens treats a cfg without metadata.sae_lens_version >= 6.0.0-rc.0 as pre-6.0 and then
    drops hook_name, model_name, context_size and dataset_path (handle_config_defaulting)."""
    cfg = json.loads((finished / A.SAELENS / A.SAELENS_CFG).read_text())
    assert set(cfg) == TOP_LEVEL | TOPK  # nothing that belongs in metadata at the top level
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["rescale_acts_by_decoder_norm"] is False
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (16, 32, "float32", "none")
    meta = cfg["metadata"]
    assert METADATA <= set(meta)
    assert Version(meta["sae_lens_version"]) >= Version("6.0.0-rc.0")
    assert meta["sae_lens_training_version"] is None  # not trained by SAELens
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    assert (meta["hook_name"], meta["model_name"], meta["context_size"], meta["dataset_path"], meta["prepend_bos"]) == \
        (HOOK, attrs["model"]["id"], attrs["context_size"], attrs["dataset"]["path"], attrs["prepend_bos"])
    assert meta["hook_head_index"] is None and meta["model_from_pretrained_kwargs"] == {}


def test_an_older_cfg_is_upgraded_keeping_its_values():
    old = {"d_in": 16, "d_sae": 32, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "standard",
           "metadata": {"model_name": "m", "hook_name": HOOK, "context_size": 8, "dataset_path": "d", "store": "/s"}}
    new = saelens_layout(old)
    assert new["metadata"]["sae_lens_version"] == SAELENS_VERSION
    assert {k: v for k, v in new.items() if k != "metadata"} == {k: v for k, v in old.items() if k != "metadata"}
    assert {k: new["metadata"][k] for k in old["metadata"]} == old["metadata"]


def test_a_relative_store_is_stored_absolute_and_eval_works_elsewhere(store, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(store, work / "s.zarr")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    _ok(_args("s.zarr", "run"))
    assert json.loads((work / "run" / A.CONFIG).read_text())["store"] == str(work / "s.zarr")
    monkeypatch.chdir(elsewhere)
    _ok(["eval", str(work / "run"), "--no-splice", "--device", "cpu"])
    assert json.loads((work / "run" / A.EVAL).read_text())["eval_config"]["store"] == str(work / "s.zarr")
    # A run written before (relative store in config.json) still resumes from its folder.
    cfg = json.loads((work / "run" / A.CONFIG).read_text())
    (work / "run" / A.CONFIG).write_text(json.dumps({**cfg, "store": "s.zarr"}))
    monkeypatch.chdir(work)
    _ok(_args("s.zarr", "run") + ["--resume"])
