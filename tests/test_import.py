"""sae import: SAELens round trip (identical weights and eval metrics), a hand-written JumpReLU SAE
against a float64 reference, both cfg layouts, SAELens's b_dec semantics, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from synthetic import HOOK, sparse_data, write_store
from actcache.errors import ActcacheError
from trainer import artifacts as A
from trainer.cli import app
from trainer.config import RunConfig, SAEConfig
from trainer.evaluation import evaluate_run
from trainer.evaluation.loading import load_run
from trainer.features import FeaturesConfig, build_features
from trainer.saes.jumprelu import JumpReLUSAE
from trainer.train import train

runner = CliRunner()
TINY_HOOK = "blocks.1.hook_resid_post"
D, D_SAE = 16, 24


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> Path:
    x, _ = sparse_data(n=16 * 16 * 4, d=D, n_features=20, k=3, seed=2)
    return write_store(tmp_path_factory.mktemp("imp") / "s.zarr", x * 3.0)


def write_saelens(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / A.SAELENS_CFG).write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / A.SAELENS_WEIGHTS)
    return path


def random_weights(seed: int, d_in: int = D, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, "W_dec": torch.randn(d_sae, d_in, generator=g),
            "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g) * 0.1}


def cfg6(arch: str, **top) -> dict:
    return {"architecture": arch, "d_in": D, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", **top,
            "metadata": {"sae_lens_version": "6.5.0", "hook_name": HOOK, "model_name": "synthetic", "context_size": 16}}


def heldout_rows(store: Path) -> torch.Tensor:
    from actcache.store import open_store

    st = open_store(store)
    return st.read_chunk(HOOK, st.n_chunks - 1).double()


@pytest.mark.parametrize("arch", ["baseline", "topk", "dyncorr"])
def test_export_import_round_trip(small_store, tmp_path, arch):
    run = tmp_path / "trained"
    train(RunConfig.from_flat(dict(store=str(small_store), hook=TINY_HOOK, out=str(run), arch=arch, d_sae=96, k=8,
                                   k_start=16, k_end=8, batch_size=64, n_tokens=64 * 6, lr=1e-3, device="cpu",
                                   heldout_chunks=2, checkpoint_every=1000)))
    lens = Path(_ok(["export", str(run), "--out", str(tmp_path / "lens")]))
    imported = Path(_ok(["import", str(lens), "--format", "saelens", "--store", str(small_store),
                         "--out", str(tmp_path / "imported"), "--heldout-chunks", "2"]))
    a, b = load_file(run / A.WEIGHTS), load_file(imported / A.WEIGHTS)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    splice = arch == "topk"  # the spliced forward once is enough: the rest are the same weights
    ev = [evaluate_run(r, n_windows=2, splice=splice, device="cpu")["eval_result_metrics"] for r in (run, imported)]
    assert ("model_performance_preservation" in ev[0]) == splice
    assert ev[0] == ev[1]
    assert load_run(imported).k == load_run(run).k
    if splice:  # sae compare accepts the imported run beside the trained one
        res = runner.invoke(app, ["compare", str(run), str(imported), "--out", str(tmp_path / "cmp")])
        assert res.exit_code == 0, res.output


def jumprelu_reference(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """SAELens's JumpReLU in float64: z = ReLU(pre) * (pre > threshold), pre = (x - b_dec) W_enc + b_enc."""
    w = {k: v.double() for k, v in w.items()}
    pre = (x.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    return torch.relu(pre) * (pre > w["threshold"]).double()


def test_jumprelu_threshold_semantics():
    sae = JumpReLUSAE(SAEConfig(arch="jumprelu", d_in=2, d_sae=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.copy_(torch.tensor([0.5, 0.25, -1.0]))
    z = sae.encode(torch.tensor([[0.5, 0.0], [0.75, 0.0], [-0.5, 0.0]]))
    expect = torch.tensor([[0.0, 0.5, 0.5],  # pre == threshold -> 0 (strictly above fires), full value kept
                           [0.75, 0.75, 0.75],
                           [0.0, 0.0, 0.0]])  # a negative threshold does not let negative values through
    assert torch.equal(z, expect)
    g = torch.Generator().manual_seed(0)
    w = {**random_weights(3), "threshold": torch.rand(D_SAE, generator=g) * 0.5}
    sae = JumpReLUSAE(SAEConfig(arch="jumprelu", d_in=D, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"].t())
        sae.b_enc.copy_(w["b_enc"])
        sae.b_dec.copy_(w["b_dec"])
        sae.threshold.copy_(w["threshold"])
    x = torch.randn(256, D, generator=g)
    torch.testing.assert_close(sae.encode(x).double(), jumprelu_reference(x, w), rtol=0, atol=1e-5)
    with pytest.raises(ActcacheError, match="not for training"):
        sae.forward(x, None)


def test_handwritten_jumprelu_imports_and_evaluates(synth_store, tmp_path):
    g = torch.Generator().manual_seed(5)
    w = {**random_weights(5), "threshold": 0.2 + torch.rand(D_SAE, generator=g)}
    src = write_saelens(tmp_path / "jr", cfg6("jumprelu"), w)
    run = Path(_ok(["import", str(src), "--store", str(synth_store), "--out", str(tmp_path / "run")]))
    loaded = load_run(run)
    assert loaded.sae.cfg.arch == "jumprelu" and loaded.k is None
    assert torch.equal(loaded.sae.threshold, w["threshold"])
    x = heldout_rows(synth_store)
    z = jumprelu_reference(x, w)
    x_hat = z @ w["W_dec"].double() + w["b_dec"].double()
    sst = ((x - x.mean(0)) ** 2).sum()
    m = evaluate_run(run, splice=False, device="cpu")["eval_result_metrics"]
    assert 0 < (z > 0).double().sum(1).mean() < D_SAE  # the thresholds matter
    assert m["sparsity"]["l0"] == pytest.approx((z > 0).double().sum(1).mean().item(), abs=2 / len(x))
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(
        1 - (((x_hat - x) ** 2).sum() / sst).item(), abs=1e-5)
    data = build_features(run, FeaturesConfig(latents=3, examples=4, logits=False))
    for lat in data["latents"]:
        j = lat["latent"]
        assert lat["n_fired"] == pytest.approx(int((z[:, j] > 0).sum()), abs=1)


def test_log_threshold_is_read_as_exp(synth_store, tmp_path):
    w = {**random_weights(6), "log_threshold": torch.full((D_SAE,), -1.0)}
    src = write_saelens(tmp_path / "jr", cfg6("jumprelu"), w)
    run = Path(_ok(["import", str(src), "--store", str(synth_store), "--out", str(tmp_path / "run")]))
    torch.testing.assert_close(load_run(run).sae.threshold, torch.full((D_SAE,), float(np.exp(-1.0))))


def test_pre6_layout_without_b_dec_on_input(synth_store, tmp_path):
    """The flat pre-6 cfg; apply_b_dec_to_input false: SAELens encodes x, not x - b_dec."""
    w = random_weights(7)
    flat = {"architecture": "standard", "d_in": D, "d_sae": D_SAE, "hook_name": HOOK, "model_name": "synthetic",
            "apply_b_dec_to_input": False, "normalize_activations": "expected_average_only_in",
            "activation_fn_str": "relu"}
    run = Path(_ok(["import", str(write_saelens(tmp_path / "std", flat, w)), "--store", str(synth_store),
                    "--out", str(tmp_path / "run")]))
    sae = load_run(run).sae
    x = heldout_rows(synth_store)
    ref = torch.relu(x @ w["W_enc"].double() + w["b_enc"].double())
    torch.testing.assert_close(sae.encode(x.float()).double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(sae.decode(ref.float()).double(), ref @ w["W_dec"].double() + w["b_dec"].double(),
                               rtol=0, atol=1e-4)
    topk = {**flat, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True}
    run = Path(_ok(["import", str(write_saelens(tmp_path / "tk", topk, w)), "--store", str(synth_store),
                    "--out", str(tmp_path / "run-topk")]))
    loaded = load_run(run)
    assert loaded.sae.cfg.arch == "topk" and loaded.k == 3
    pre = torch.relu((x - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double())
    ref = torch.zeros_like(pre).scatter(1, pre.topk(3).indices, pre.topk(3).values)
    torch.testing.assert_close(loaded.sae.encode(x.float(), loaded.k).double(), ref, rtol=0, atol=1e-5)


def test_bad_input_is_one_line_error(synth_store, tmp_path):
    w = random_weights(8)
    good = write_saelens(tmp_path / "good", cfg6("standard"), w)
    cases = {
        "wide": (cfg6("standard") | {"d_in": D + 1}, w, "d_in=17"),
        "hook": (cfg6("standard") | {"metadata": {"hook_name": "blocks.9.hook_resid_post"}}, w, "blocks.9.hook_resid_post"),
        "ln": (cfg6("standard", normalize_activations="layer_norm"), w, "layer_norm"),
        "gated": (cfg6("gated"), w, "'gated' is not supported"),
        "shape": (cfg6("standard") | {"d_sae": D_SAE + 1}, w, "has shape"),
        "nan": (cfg6("standard"), {**w, "b_enc": torch.full((D_SAE,), float("nan"))}, "NaN"),
        "nothr": (cfg6("jumprelu"), w, "no threshold"),
    }
    for name, (cfg, tensors, msg) in cases.items():
        src = write_saelens(tmp_path / name, cfg, tensors)
        res = runner.invoke(app, ["import", str(src), "--store", str(synth_store), "--out", str(tmp_path / f"out-{name}")])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (name, res.output)
        assert not (tmp_path / f"out-{name}").exists()  # nothing written before every check passed
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    _ok(["import", str(good), "--store", str(synth_store), "--out", str(tmp_path / "run")])
    for args, msg in [([str(tmp_path / "nope")], "cannot read"), ([str(good), "--format", "dictlearn"], "unknown format"),
                      ([str(good), "--out", str(tmp_path / "taken")], "not a run directory"),
                      ([str(good), "--out", str(tmp_path / "run")], "--overwrite")]:
        extra = [] if "--out" in args else ["--out", str(tmp_path / "x")]
        res = runner.invoke(app, ["import", *args, "--store", str(synth_store), *extra])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (args, res.output)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    _ok(["import", str(good), "--store", str(synth_store), "--out", str(tmp_path / "run"), "--overwrite"])


def test_jumprelu_is_refused_for_training_before_anything_is_written(synth_store, tmp_path):
    res = runner.invoke(app, ["train", "--store", str(synth_store), "--arch", "jumprelu", "--out", str(tmp_path / "r"),
                              "--quiet"])
    assert res.exit_code == 2 and "inference-only" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "r").exists()
