"""sae eval: known answers (a perfect SAE, a zero SAE), weights folded back from normalisation, bad input."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from actcache.errors import ActcacheError
from synthetic import sparse_data, write_store
from trainer import artifacts as A
from trainer.checkpoint import atomic_write_text
from trainer.cli import app
from trainer.config import RunConfig, SAEConfig
from trainer.evaluation import evaluate_run
from trainer.export import folded_weights, saelens_cfg, write_weights
from trainer.saes import build_sae
from trainer.train import train

runner = CliRunner()
TINY_HOOK = "blocks.1.hook_resid_post"


def make_run(root: Path, store: Path, hook: str, W_enc: torch.Tensor, W_dec: torch.Tensor, *,
             scaling: float = 1.0) -> Path:
    """A finished baseline run holding exactly these (raw-space) weights, written as sae train does."""
    d_sae, d_in = W_dec.shape
    cfg = RunConfig.from_flat(dict(store=str(store), hook=hook, out=str(root), arch="baseline", d_sae=d_sae))
    root.mkdir(parents=True)
    atomic_write_text(A.run_paths(root).config, json.dumps(cfg.to_flat()))
    sae = build_sae(SAEConfig(arch="baseline", d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc / scaling)
        sae.W_dec.copy_(W_dec * scaling)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    meta = {"sae": asdict(sae.cfg), "saelens_cfg": saelens_cfg(sae, final_k=None, metadata={"scaling_factor_folded": scaling})}
    write_weights(A.run_paths(root).weights, folded_weights(sae, scaling), meta)
    return root


def perfect_run(root: Path, store: Path, hook: str, d: int = 64, scaling: float = 1.0) -> Path:
    """x = relu(x) - relu(-x): d_sae = 2 d_in, W_enc = W_dec = [I; -I]."""
    eye = torch.eye(d)
    W = torch.cat([eye, -eye])
    return make_run(root, store, hook, W, W, scaling=scaling)


@pytest.mark.parametrize("hook", [TINY_HOOK, "blocks.3.hook_resid_post"])  # the last block: before the final norm
def test_perfect_sae_keeps_everything(small_store, tmp_path, hook):
    run = perfect_run(tmp_path / "run", small_store, hook, scaling=0.37)
    r = evaluate_run(run, n_windows=4, device="cpu")
    m = r["eval_result_metrics"]
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["reconstruction_quality"]["cossim"] == pytest.approx(1.0, abs=1e-6)
    mp = m["model_performance_preservation"]
    assert mp["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert mp["ce_loss_with_sae"] == pytest.approx(mp["ce_loss_without_sae"], abs=1e-5)
    assert mp["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert mp["ce_loss_with_ablation"] != mp["ce_loss_without_sae"]  # random weights: not necessarily worse
    assert m["token_stats"]["total_tokens_eval_ce"] == 4 * 31
    assert json.loads((run / A.EVAL).read_text()) == r
    assert r["warnings"] == [] and r["eval_config"]["chunks"] == [5, 6]


def test_zero_sae_is_as_bad_as_ablation(small_store, tmp_path):
    run = make_run(tmp_path / "run", small_store, TINY_HOOK, torch.eye(64), torch.zeros(64, 64))
    m = evaluate_run(run, n_windows=4, device="cpu")["eval_result_metrics"]
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(0.0, abs=1e-9)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0.0, abs=1e-9)
    assert m["reconstruction_quality"]["explained_variance"] <= 0


def test_normalised_training_is_folded_back(tmp_path):
    """The eval of the exported (raw-space) weights agrees with the trainer's own held-out eval."""
    x, _ = sparse_data(n=16 * 16 * 6, d=16, n_features=24, k=3, seed=4)
    store = write_store(tmp_path / "s.zarr", x * 7.0)
    summary = train(RunConfig.from_flat(dict(store=str(store), out=str(tmp_path / "run"), arch="topk", d_sae=32, k=3,
                                             batch_size=64, n_tokens=64 * 20, lr=3e-3, device="cpu",
                                             normalize="expected_average_only_in", checkpoint_every=1000)))
    r = evaluate_run(tmp_path / "run", splice=False, device="cpu")
    m = r["eval_result_metrics"]
    h = summary["heldout"]
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(h["explained_variance"], abs=1e-4)
    assert m["sparsity"]["l0"] == pytest.approx(h["l0"])
    assert m["misc_metrics"]["dead_fraction"] == pytest.approx(h["dead_fraction"])
    assert "model_performance_preservation" not in m


def test_training_rows_warn_loudly(small_store, tmp_path):
    run = perfect_run(tmp_path / "run", small_store, TINY_HOOK)
    r = evaluate_run(run, split="train", splice=False, device="cpu")
    assert len(r["warnings"]) == 1 and "trained" in r["warnings"][0]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    assert evaluate_run(run, store=copy, splice=False, device="cpu")["warnings"] == []  # its heldout = ours
    r = evaluate_run(run, store=copy, split="all", splice=False, device="cpu")
    assert "20 of the 24 windows" in r["warnings"][0]
    res = runner.invoke(app, ["eval", str(run), "--split", "train", "--no-splice", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and res.output.strip().endswith(str(run / A.EVAL))


def test_bad_input_is_one_line_error(small_store, tmp_path):
    run = perfect_run(tmp_path / "run", small_store, TINY_HOOK)
    x, _ = sparse_data(n=16 * 16 * 2, d=64, n_features=8, k=2)
    other = write_store(tmp_path / "other.zarr", x)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(run / A.CONFIG, no_weights / A.CONFIG)
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"text": f"text {i}", "label": "a"}) + "\n" for i in range(8)))
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("text,kind\nhello,a\n")
    cases = [
        ([str(no_weights)], "no sae.safetensors"),
        ([str(run), "--store", str(other)], f"hook {TINY_HOOK} is not in store"),
        ([str(run), "--split", "test"], "unknown split"),
        ([str(run), "--no-splice", "--probe-file", str(one_class)], "1 class"),
        ([str(run), "--no-splice", "--probe-file", str(no_label)], "no column 'label'"),
        ([str(tmp_path / "nope")], "does not exist"),
    ]
    for args, msg in cases:
        res = runner.invoke(app, ["eval", *args, "--device", "cpu"])
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output and "Traceback" not in res.output, (args, res.output)
    with pytest.raises(ActcacheError, match="no sae.safetensors"):
        evaluate_run(no_weights)


def test_resid_pre_of_a_block_is_resid_post_of_the_one_before(tiny_loaded):
    from actcache.hooks import parse_hook
    from trainer.evaluation.splice import replaced_residual, zero_replacement

    model = tiny_loaded.model
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    out = []
    for hook in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"):
        with torch.no_grad(), replaced_residual(model, parse_hook(hook), zero_replacement(3)):
            out.append(model(input_ids=ids, use_cache=False).logits)
    clean = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(out[0], out[1])
    assert torch.equal(out[0][:, :3], clean[:, :3]) and not torch.equal(out[0][:, 3:], clean[:, 3:])
