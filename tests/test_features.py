"""sae features: the streaming pass against brute force on planted latents, Sigma and co-activation
neighbours against float64 references, logit effects, the JSON contract and the site, bounded state."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from synthetic import HOOK, sparse_data, write_store
from trainer import artifacts as A
from trainer.checkpoint import atomic_write_text
from trainer.cli import app
from trainer.config import RunConfig, SAEConfig
from trainer.export import folded_weights, saelens_cfg, write_weights
from trainer.features import FeaturesConfig, build_features
from trainer.features.scan import HIST_BINS, FeatureScan, histogram_edges
from trainer.saes import build_sae

runner = CliRunner()
RPW, WPC, N_CHUNKS, D = 16, 16, 4, 12


def make_run(root: Path, store: Path, hook: str, W_enc: torch.Tensor, W_dec: torch.Tensor,
             b_enc: torch.Tensor | None = None) -> Path:
    """A finished baseline run holding exactly these raw-space weights, written as sae train does."""
    d_sae, d_in = W_dec.shape
    cfg = RunConfig.from_flat(dict(store=str(store), hook=hook, out=str(root), arch="baseline", d_sae=d_sae))
    root.mkdir(parents=True)
    atomic_write_text(A.run_paths(root).config, json.dumps(cfg.to_flat()))
    sae = build_sae(SAEConfig(arch="baseline", d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(b_enc if b_enc is not None else torch.zeros(d_sae))
        sae.b_dec.zero_()
    meta = {"sae": asdict(sae.cfg), "saelens_cfg": saelens_cfg(sae, final_k=None, metadata={"scaling_factor_folded": 1.0})}
    write_weights(A.run_paths(root).weights, folded_weights(sae, 1.0), meta)
    return root


def planted(seed: int = 0) -> np.ndarray:
    """Rows whose positive entries are the planted latents (identity SAE: z = relu(x) exactly):
    latent j fires with its own rate, with distinct activations; latent D-1 never fires."""
    rng = np.random.default_rng(seed)
    n = RPW * WPC * N_CHUNKS
    rates = np.linspace(0.01, 0.4, D)
    rates[-1] = 0.0
    fire = rng.random((n, D)) < rates
    x = np.where(fire, rng.uniform(0.01, 30.0, (n, D)), -rng.uniform(0.0, 1.0, (n, D)))
    return x.astype(np.float32)


@pytest.fixture
def planted_run(tmp_path):
    x = planted()
    store = write_store(tmp_path / "p.zarr", x, rows_per_window=RPW, windows_per_chunk=WPC)
    eye = torch.eye(D)
    return x, make_run(tmp_path / "run", store, HOOK, eye, eye)


def brute_force(z: np.ndarray, first_row: int, examples: int) -> list[dict]:
    out = []
    for j in range(z.shape[1]):
        col = z[:, j]
        rows = np.flatnonzero(col > 0)
        order = rows[np.lexsort((rows, -col[rows].astype(np.float64)))][:examples]
        out.append({"frequency": len(rows) / len(col), "n_fired": len(rows),
                    "max_activation": float(col.max()) if len(rows) else 0.0,
                    "mean_activation": float(col[rows].astype(np.float64).sum() / len(rows)) if len(rows) else 0.0,
                    "examples": [((first_row + r) // RPW, (first_row + r) % RPW, float(col[r])) for r in order]})
    return out


@pytest.mark.parametrize("split", ["all", "heldout"])
def test_planted_latents_match_brute_force_exactly(planted_run, split):
    x, run = planted_run
    examples = 7
    data = build_features(run, FeaturesConfig(split=split, latents=0, examples=examples, batch_rows=37, logits=False))
    first = 0 if split == "all" else RPW * WPC * (N_CHUNKS - 1)
    z = np.maximum(x[first:], 0)
    expect = brute_force(z, first, examples)
    assert data["n_rows"] == len(z)
    edges = np.asarray(histogram_edges())
    for j, (lat, ref) in enumerate(zip(data["latents"], expect)):
        assert lat["frequency"] == ref["frequency"] and lat["n_fired"] == ref["n_fired"]
        assert lat["max_activation"] == ref["max_activation"]
        assert lat["mean_activation"] == pytest.approx(ref["mean_activation"], rel=1e-12)
        got = [(e["window"], e["position"], e["activation"]) for e in lat["examples"]]
        assert got == ref["examples"], j
        assert lat["dead"] == (ref["n_fired"] == 0)
        hist = np.zeros(HIST_BINS, np.int64)
        h = lat["histogram"]
        hist[h["first"]:h["first"] + len(h["counts"])] = h["counts"]
        vals = z[:, j][z[:, j] > 0].astype(np.float64)
        assert hist.sum() == ref["n_fired"]
        np.testing.assert_array_equal(hist, np.histogram(np.clip(vals, edges[0], edges[-1] * 0.999), edges)[0])
        for ex, ctx in zip(lat["examples"], lat["contexts"]):  # the example's own token carries its activation
            assert ctx["acts"][ex["position"] - ctx["start"]] == ex["activation"]
    assert data["latents"][D - 1]["dead"] and data["latents"][D - 1]["examples"] == []
    # Co-activation neighbours: Pearson correlation of the latents over the split, float64 reference.
    R = np.corrcoef(z[:, :D - 1].astype(np.float64), rowvar=False)
    for j in range(D - 1):
        nb = data["latents"][j]["neighbours"]["coactivation"]
        assert "sigma" not in data["latents"][j]["neighbours"]
        others = np.delete(np.arange(D - 1), j)
        assert [n["latent"] for n in nb] == [int(i) for i in others[np.argsort(-np.abs(R[j, others]))][:len(nb)]]
        for n in nb:
            assert n["corr"] == pytest.approx(R[j, n["latent"]], abs=1e-6)


def test_state_is_bounded_by_latents_not_rows():
    """O(d_sae x examples) (+ histograms, + shown x d_sae co-activation), whatever the number of rows."""
    d_sae, examples, shown = 64, 5, torch.arange(3)
    scans = [FeatureScan(d_sae, examples, shown) for _ in range(2)]
    before = scans[0].state_bytes
    for s, n in zip(scans, (100, 5000)):
        s.update(torch.rand(n, d_sae), 0)
    assert scans[0].state_bytes == scans[1].state_bytes == before
    assert before == d_sae * (8 + 8 + 4 + examples * (4 + 8) + HIST_BINS * 8 + 8) + len(shown) * d_sae * 8


def test_dyncorr_neighbours_come_from_its_sigma(tmp_path):
    from trainer.features.neighbours import sigma_statistics
    from trainer.train import train

    x, _ = sparse_data(n=16 * 16 * 6, d=16, n_features=24, k=3, seed=4)
    store = write_store(tmp_path / "s.zarr", x)
    out = tmp_path / "dyn"
    train(RunConfig.from_flat(dict(store=str(store), out=str(out), arch="dyncorr", d_sae=32, k_start=8, k_end=3,
                                   batch_size=64, n_tokens=64 * 20, lr=3e-3, device="cpu", checkpoint_every=1000)))
    data = build_features(out, FeaturesConfig(latents=6, examples=3, neighbours=5, logits=False))
    assert data["arch"] == "dyncorr" and data["neighbour_sources"] == ["sigma", "coactivation"]
    trained = RunConfig.from_flat(json.loads((out / A.CONFIG).read_text())).sae
    stats = sigma_statistics(out, replace(trained, d_in=16, d_sae=32))
    R = stats.correlation_block(None, dtype=torch.float64).numpy()  # dense float64 reference
    for lat in data["latents"][:6]:
        i = lat["latent"]
        row = np.delete(R[i], i)
        others = np.delete(np.arange(32), i)
        ok = np.isfinite(row)
        expect = others[ok][np.argsort(-np.abs(row[ok]), kind="stable")][:5]
        got = lat["neighbours"]["sigma"]
        assert [n["latent"] for n in got] == [int(j) for j in expect]
        for n in got:
            assert n["corr"] == pytest.approx(R[i, n["latent"]], rel=1e-9, abs=1e-12)
    assert all(lat["page"] is None and "neighbours" not in lat for lat in data["latents"][6:])


def test_logit_effects_fold_the_final_norm_weight(small_store, tiny_loaded, tmp_path):
    hook = "blocks.1.hook_resid_post"
    d_in = 64
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(8, d_in, generator=g)
    run = make_run(tmp_path / "run", small_store, hook, torch.randn(8, d_in, generator=g), W_dec)
    data = build_features(run, FeaturesConfig(latents=3, examples=2))
    model = tiny_loaded.model
    W_U = model.get_output_embeddings().weight.double()
    gamma = model.model.norm.weight.double() + 1.0  # Gemma-2's RMSNorm scales by 1 + weight
    eff = (W_dec.double()[:3] * gamma) @ W_U.T
    assert "folded" in data["logit_effects_note"]
    for i in range(3):
        lg = data["latents"][i]["logits"]
        assert [e["token"] for e in lg["positive"]] == eff[i].topk(10).indices.tolist()
        assert [e["token"] for e in lg["negative"]] == eff[i].topk(10, largest=False).indices.tolist()
        np.testing.assert_allclose([e["value"] for e in lg["positive"]], eff[i].topk(10).values.numpy(), rtol=1e-4)
        assert all(isinstance(e["text"], str) for e in lg["positive"])
    tok = tiny_loaded.tokenizer
    lat = next(lat for lat in data["latents"][:3] if lat["examples"])
    assert lat["contexts"][0]["text"] == [tok.decode([t]) for t in lat["contexts"][0]["tokens"]]


def test_cli_writes_site_and_contract_and_replaces_it(planted_run, tmp_path):
    _, run = planted_run
    res = runner.invoke(app, ["features", str(run), "--latents", "4", "--examples", "5", "--no-logits", "--split", "all"])
    assert res.exit_code == 0, res.output
    site = run / "features"
    assert res.output.strip().endswith(str(site / "index.html"))
    data = json.loads((site / "features.json").read_text())
    assert data["format"] == {"name": "actcache-features", "version": 1} and len(data["latents"]) == D
    for lat in data["latents"]:
        acts = [e["activation"] for e in lat["examples"]]
        assert acts == sorted(acts, reverse=True) and len(acts) <= 5
        assert set(lat["examples"][0]) == {"window", "position", "activation"} if acts else True
        assert (lat["page"] is not None) == (lat["latent"] < 4)
    for i in range(4):
        page = (site / "latents" / f"{i}.html").read_text()
        assert 'class="tok max"' in page and "Correlation neighbours" in page
    assert not (site / "latents" / "4.html").exists()
    for f in ("index.html", "index.js", "index-data.js", "style.css"):
        text = (site / f).read_text()
        assert "http://" not in text and "https://" not in text  # offline: nothing fetched
    res = runner.invoke(app, ["features", str(run), "--latents", "2", "--no-logits", "--split", "all"])
    assert res.exit_code == 0, res.output
    assert not (site / "latents" / "3.html").exists()  # the old site was replaced, not merged
    assert not list(run.glob(".features.*"))  # no temporary directory left behind


def test_bad_input_is_one_line_error(planted_run, tmp_path):
    _, run = planted_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cases = [
        ([str(run), "--latents", "many"], "--latents 'many'"),
        ([str(run), "--latents", "0"], "--latents 0"),
        ([str(run), "--examples", "0"], "--examples 0"),
        ([str(run), "--split", "test"], "unknown split"),
        ([str(run), "--out", str(tmp_path / "taken")], "not a sae features site"),
        ([str(tmp_path / "nope")], "does not exist"),
    ]
    for args, msg in cases:
        res = runner.invoke(app, ["features", *args, "--no-logits"])
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output and "Traceback" not in res.output, (args, res.output)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_rows_the_run_left_out_fire_no_latent(tmp_path):
    """A run trained with --max-norm-ratio: its massive rows give no example, count or maximum."""
    x = planted()
    x[5] = -1.0
    x[5, 0] = 5e4  # latent 0's largest activation by far, on a row 5e4 / median norm out
    store = write_store(tmp_path / "p.zarr", x, rows_per_window=RPW, windows_per_chunk=WPC)
    eye = torch.eye(D)
    run = make_run(tmp_path / "run", store, HOOK, eye, eye)
    cfg = json.loads(A.run_paths(run).config.read_text())
    kept = build_features(run, FeaturesConfig(split="all", latents=2, examples=3, logits=False))
    assert kept["latents"][0]["max_activation"] == pytest.approx(5e4) and kept["rows_excluded_max_norm_ratio"] == 0
    atomic_write_text(A.run_paths(run).config, json.dumps({**cfg, "max_norm_ratio": 10.0}))
    data = build_features(run, FeaturesConfig(split="all", latents=2, examples=3, logits=False))
    assert data["rows_excluded_max_norm_ratio"] == 1
    lat = data["latents"][0]
    z0 = np.maximum(np.delete(x[:, 0], 5), 0)
    assert lat["max_activation"] == pytest.approx(float(z0.max())) and lat["n_fired"] == int((z0 > 0).sum())
    assert all((e["window"], e["position"]) != (0, 5) for e in lat["examples"])
