"""sae train: exact resume after kill -9, the non-finite guard, the SAELens export, bad input."""

import math
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from synthetic import HOOK, sparse_data, write_store
from trainer import artifacts as A
from trainer.cli import app
from trainer.config import RunConfig
from trainer.saes import build_sae
from trainer.config import SAEConfig
from trainer.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x, _ = sparse_data(n=16 * 16 * 8, d=16, n_features=24, k=3, seed=1)
    return write_store(tmp_path_factory.mktemp("train") / "s.zarr", x * 5.0)


def _flat(store, out, **kw):
    base = dict(store=str(store), out=str(out), arch="dyncorr", d_sae=32, k_start=8, k_end=3, batch_size=64,
                n_tokens=64 * 60, epochs=3, lr=3e-3, normalize="expected_average_only_in", dead_after_tokens=2000,
                device="cpu", log_every=5, checkpoint_every=10, seed=3)
    base.update(kw)
    return base


def _cli(flat: dict) -> list[str]:
    args = [sys.executable, "-m", "trainer", "train", "--quiet"]
    for k, v in flat.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.mark.parametrize("arch", ["baseline", "dyncorr"])
def test_kill_9_then_resume_reaches_the_same_weights(store, tmp_path, arch):
    ref = train(RunConfig.from_flat(_flat(store, tmp_path / "ref", arch=arch)))
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(_flat(store, out, arch=arch)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # Kill once at least one checkpoint exists and the run is mid-way.
    while time.time() < deadline and proc.poll() is None:
        try:  # a checkpoint is swapped in by two renames: between them the path is briefly absent
            if json.loads((out / A.CHECKPOINT / A.CKPT_STATE).read_text())["step"] >= 20:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert not (out / A.WEIGHTS).exists()
    res = runner.invoke(app, _cli(_flat(store, out, arch=arch))[3:] + ["--resume"])
    assert res.exit_code == 0, res.output
    a, b = load_file(tmp_path / "ref" / A.WEIGHTS), load_file(out / A.WEIGHTS)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(ln)["step"] for ln in (out / A.METRICS).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == ref["steps"]  # no duplicated records after resume


def test_nonfinite_steps_are_skipped_counted_and_rolled_back(tmp_path):
    x, _ = sparse_data(n=16 * 16 * 8, d=16, n_features=24, k=3, seed=2)
    x[16 * 16 * 3 : 16 * 16 * 4] = np.nan  # one whole chunk of NaN rows
    bad = write_store(tmp_path / "nan.zarr", x)
    s = train(RunConfig.from_flat(_flat(bad, tmp_path / "run", arch="topk", k=3, normalize="none",
                                        max_nonfinite_in_row=2, checkpoint_every=5,
                                        shuffle_buffer_mb=0.04)))  # groups of one chunk: NaN rows stay together
    assert s["nonfinite_events"] > 0 and s["skipped_steps"] == s["nonfinite_events"]
    assert s["rollbacks"] >= 1
    w = load_file(tmp_path / "run" / A.WEIGHTS)
    assert all(torch.isfinite(t).all() for t in w.values())
    recs = [json.loads(ln) for ln in (tmp_path / "run" / A.METRICS).read_text().splitlines()]
    assert recs[-1]["nonfinite_events"] == s["nonfinite_events"]


@pytest.mark.parametrize("arch", ["baseline", "topk"])
def test_saelens_export_contract_and_folded_normalisation(store, tmp_path, arch):
    train(RunConfig.from_flat(_flat(store, tmp_path / "run", arch=arch, k=3, n_tokens=64 * 20)))
    res = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "sl")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
            "reshape_activations", "architecture", "metadata"} <= set(cfg)
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 32 and cfg["normalize_activations"] == "none"
    assert cfg["reshape_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == HOOK and "model_name" in cfg["metadata"]
    assert cfg["architecture"] == ("standard" if arch == "baseline" else "topk")
    if arch == "topk":
        assert cfg["k"] == 3 and cfg["rescale_acts_by_decoder_norm"] is False
    w = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    assert w["W_enc"].shape == (16, 32) and w["W_dec"].shape == (32, 16)
    assert w["b_enc"].shape == (32,) and w["b_dec"].shape == (16,)
    # The export on raw activations == the trained SAE on normalised ones, scaled back.
    from trainer.loader import ActivationLoader, LoaderConfig

    ld = ActivationLoader(str(store), HOOK, LoaderConfig(normalize="expected_average_only_in", heldout_chunks=1))
    s = ld.scaling_factor
    assert s != 1.0
    x = torch.from_numpy(np.asarray(sparse_data(n=64, d=16, n_features=24, k=3, seed=9)[0] * 5.0))
    sae = build_sae(SAEConfig(arch=arch, d_in=16, d_sae=32, k=3).resolved(16))
    ck = load_file(tmp_path / "run" / A.CHECKPOINT / A.CKPT_MODEL)
    sae.load_state_dict(ck)
    z_train = sae.encode(x * s)
    x_hat_train = sae.decode(z_train) / s
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "baseline":
        z = torch.relu(pre)
    else:
        top = torch.topk(pre, 3, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(z, z_train, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z @ w["W_dec"] + w["b_dec"], x_hat_train, rtol=1e-4, atol=1e-4)


def _err(args: list[str]):
    r = runner.invoke(app, args)
    out = r.output.strip()
    assert r.exit_code not in (0, None) and isinstance(r.exception, SystemExit), out
    assert "Traceback" not in out and len(out.splitlines()) == 1 and out.startswith("error:"), out
    return out


def test_bad_input_is_one_line(store, tmp_path):
    base = ["train", "--store", str(store), "--out", str(tmp_path / "r"), "--d-sae", "32", "--batch-size", "64",
            "--device", "cpu", "--quiet"]
    assert "not a store" in _err(["train", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert "is not in store" in _err(base + ["--hook", "blocks.9.hook_resid_post"])
    assert "--k-start 64 must be in 1..d_sae (32)" in _err(base + ["--arch", "dyncorr", "--k-end", "8", "--k-start", "64"])
    assert "k must not grow" in _err(base + ["--arch", "dyncorr", "--k-start", "2", "--k-end", "3"])
    dyn = base + ["--arch", "dyncorr", "--k-start", "8", "--k-end", "4"]
    assert "--eps" in _err(dyn + ["--eps", "-1"])
    assert "--beta" in _err(dyn + ["--beta", "1.5"])
    assert "--k " in _err(base + ["--k", "33"]) + " "
    assert "--epochs" in _err(base + ["--n-tokens", str(10**7)])
    assert "unknown arch" in _err(base + ["--arch", "gated"])
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"lr": 1e-3, "learning_rate": 1}))
    assert "unknown config keys learning_rate" in _err(base + ["--config", str(cfg)])
    assert not (tmp_path / "r").exists()  # nothing was written for any of them


def test_existing_run_needs_resume_or_overwrite_and_resume_must_match(store, tmp_path):
    flat = _flat(store, tmp_path / "r", n_tokens=64 * 10)
    train(RunConfig.from_flat(flat))
    before = (tmp_path / "r" / A.WEIGHTS).read_bytes()
    args = _cli(flat)[3:]
    assert "--resume" in _err(args)
    assert "cannot resume" in _err(args[:-2] + ["--seed", "4", "--resume"])
    assert (tmp_path / "r" / A.WEIGHTS).read_bytes() == before


def test_incomplete_store_and_corrupted_chunk(store, tmp_path):
    import shutil

    import zarr

    inc = tmp_path / "inc.zarr"
    shutil.copytree(store, inc)
    zarr.open_group(str(inc), mode="r+").attrs["complete"] = False
    assert "incomplete" in _err(["train", "--store", str(inc), "--out", str(tmp_path / "a"), "--quiet"])
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    (bad / HOOK / "c" / "2" / "0").write_bytes(b"xx")
    msg = _err(["train", "--store", str(bad), "--out", str(tmp_path / "b"), "--d-sae", "32", "--batch-size", "64",
                "--quiet", "--device", "cpu"])
    assert "chunk 2" in msg


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e9, math.inf])
def test_clip_gradients_is_clip_grad_norm_bit_for_bit(max_norm):
    from trainer.train import clip_gradients

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(30, 7, generator=g), torch.randn(11, generator=g) * 0.1]
    a = [torch.zeros_like(t, requires_grad=True) for t in grads]
    b = [torch.zeros_like(t, requires_grad=True) for t in grads]
    for p, q, t in zip(a, b, grads):
        p.grad, q.grad = t.clone(), t.clone()
    na = clip_gradients(a, max_norm)
    nb = torch.nn.utils.clip_grad_norm_(b, max_norm)
    assert torch.equal(na, nb)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
    assert (na > max_norm) == any(not torch.equal(p.grad, t) for p, t in zip(a, grads))
