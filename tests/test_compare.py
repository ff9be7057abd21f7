"""sae compare: each stability metric on series with known answers, the report, bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from actcache.errors import ActcacheError
from trainer import artifacts as A
from trainer.cli import app
from trainer.report.compare import compare, final_metrics
from trainer.report.runs import load_run, load_runs, seed_groups
from trainer.report.stability import late_cv, loss_spikes, max_and_p99, seed_spread, stability

runner = CliRunner()


# -- the metrics on known answers ------------------------------------------------------------
def test_one_injected_spike_gives_exactly_one_spike():
    rng = np.random.default_rng(0)
    loss = 2.0 * np.exp(-np.arange(300) / 80) + 0.5 + 0.01 * rng.standard_normal(300)  # decaying, noisy
    assert loss_spikes(loss) == []
    loss[200] += 1.0
    assert loss_spikes(loss) == [200]


def test_constant_loss_has_no_spikes_and_a_step_up_is_one():
    assert loss_spikes([1.0] * 50) == []
    assert loss_spikes([1.0] * 30 + [1.5] + [1.0] * 30) == [30]


def test_non_finite_loss_is_a_spike_and_does_not_poison_the_window():
    loss = [1.0, 1.1, 0.9] * 10
    loss[12] = math.nan
    loss[20] = math.inf
    assert loss_spikes(loss) == [12, 20]


def test_spike_needs_a_window_of_three():
    assert loss_spikes([1.0, 100.0, 1.0]) == []  # nothing to compare with yet


def test_late_cv():
    assert late_cv([5.0] * 100) == 0.0
    series = [9.0] * 80 + [1.0, 3.0] * 10  # last 20%: mean 2, population std 1
    assert late_cv(series) == pytest.approx(0.5)
    assert math.isnan(late_cv([1.0]))


def test_max_and_p99():
    g = list(range(1, 101)) + [math.nan, math.inf]
    mx, p99 = max_and_p99(g)
    assert mx == 100 and p99 == pytest.approx(99.01)
    assert all(math.isnan(v) for v in max_and_p99([]))


def test_seed_spread():
    same = seed_spread([0.8, 0.8, 0.8])
    assert same["std"] == 0.0 and same["range"] == 0.0 and same["mean"] == pytest.approx(0.8)
    s = seed_spread([1.0, 2.0, 3.0])
    assert s["std"] == pytest.approx(1.0) and s["range"] == 2.0 and s["n"] == 3


def test_stability_of_records():
    recs = [{"step": i, "tokens": 64 * i, "loss": 1.0, "grad_norm": float(i), "dead_fraction": d,
             "sigma_min_eig": e, "sigma_condition": c}
            for i, (d, e, c) in enumerate([(0.0, 1e-3, 10.0), (0.5, 1e-6, math.inf), (0.25, 1e-4, 50.0)])]
    s = stability(recs, {"nonfinite_events": 3, "skipped_steps": 3, "rollbacks": 1})
    assert (s["nonfinite_events"], s["skipped_steps"], s["rollbacks"]) == (3, 3, 1)
    assert s["loss_spikes"] == 0 and s["late_loss_cv"] == 0.0 and s["grad_norm_max"] == 2.0
    assert (s["dead_fraction_end"], s["dead_fraction_max"]) == (0.25, 0.5)
    assert s["sigma_min_eig_min"] == 1e-6 and s["sigma_min_eig_end"] == 1e-4
    assert s["sigma_condition_max"] == math.inf  # a singular Sigma is the point, not noise
    s0 = stability([{"loss": 1.0, "tokens": 1}], {})
    assert math.isnan(s0["sigma_min_eig_min"]) and math.isnan(s0["rollbacks"])  # baseline / topk: blank


# -- run directories written by hand ---------------------------------------------------------
def fake_run(root: Path, name: str, *, arch="topk", seed=0, hook="blocks.0.hook_resid_post", d_in=16, ev=0.9, l0=8.0,
             loss=None, finished=True, eval_json=None, eps=1e-6) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {"arch": arch, "seed": seed, "hook": hook, "d_in": d_in, "d_sae": 32, "eps": eps, "lr": 1e-3,
           "out": str(d), "store": "s.zarr", "device": "cpu"}
    (d / A.CONFIG).write_text(json.dumps(cfg))
    loss = loss if loss is not None else [1.0 / (1 + i) + 0.1 for i in range(40)]
    recs = [{"step": i + 1, "tokens": 64 * (i + 1), "loss": v, "explained_variance": 0.5, "l0": l0, "k": 8,
             "lambda": 0.0, "dead_fraction": 0.0, "grad_norm": 0.5, "nonfinite_events": 0, "skipped_steps": 0,
             "rollbacks": 0} for i, v in enumerate(loss)]
    if arch == "dyncorr":
        for r in recs:
            r.update(sigma_min_eig=1e-4, sigma_condition=100.0, **{"lambda": 0.05})
    (d / A.METRICS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    if finished:
        summary = {"arch": arch, "steps": len(recs), "tokens": 64 * len(recs), "wall_s": 1.0,
                   "nonfinite_events": 2, "skipped_steps": 2, "rollbacks": 1,
                   "heldout": {"explained_variance": ev, "mse": 0.1, "cosine_similarity": 0.95, "l0": l0, "l1": 3.0,
                               "dead_fraction": 0.0}}
        (d / A.SUMMARY).write_text(json.dumps(summary))
    if eval_json is not None:
        (d / A.EVAL).write_text(json.dumps(eval_json))
    return d


def test_compare_writes_report_tables_plots_and_seed_spread(tmp_path):
    spiky = [1.0 / (1 + i) + 0.1 for i in range(40)]
    spiky[30] += 5.0
    runs = [fake_run(tmp_path, f"dyncorr-s{s}", arch="dyncorr", seed=s, ev=0.8, l0=8.0) for s in range(3)]
    runs += [fake_run(tmp_path, "topk-s0", loss=spiky), fake_run(tmp_path, "topk-s1", seed=1, ev=0.7, l0=9.0)]
    out = tmp_path / "report"
    c = compare(runs, out)
    assert c.report == out / "report.md" and c.report.exists()
    md = c.report.read_text()
    for png in ("loss", "explained_variance", "l0_vs_k", "dead_fraction", "grad_norm", "lambda", "sigma_min_eig"):
        assert (out / f"{png}.png").stat().st_size > 1000
        assert f"({png}.png)" in md
    assert c.stability["topk-s0"]["loss_spikes"] == 1 and c.stability["topk-s1"]["loss_spikes"] == 0
    assert c.stability["topk-s0"]["rollbacks"] == 1
    assert set(c.spread) == {"dyncorr", "topk"}
    assert c.spread["dyncorr"]["explained_variance"]["std"] == 0.0 and c.spread["dyncorr"]["l0"]["range"] == 0.0
    assert c.spread["topk"]["explained_variance"]["range"] == pytest.approx(0.2)
    assert "Across-seed spread" in md and "| topk-s0 | topk |" in md
    numbers = json.loads((out / "compare.json").read_text())
    assert numbers["runs"]["topk-s1"]["final"]["explained_variance"] == 0.7
    assert math.isnan(c.final["topk-s0"]["ce_loss_score"])  # no eval.json: blank, not an error


def test_eval_json_wins_over_the_training_summary(tmp_path):
    ev = {"eval_result_metrics": {"reconstruction_quality": {"explained_variance": 0.42, "mse": 1.0, "cossim": 0.5},
                                  "sparsity": {"l0": 7.0, "l1": 2.0},
                                  "model_performance_preservation": {"ce_loss_score": 0.93, "kl_div_with_sae": 0.1},
                                  "sparse_probing": {"llm_top_1_test_accuracy": 0.7, "sae_top_1_test_accuracy": 0.6}}}
    f = final_metrics(load_run(fake_run(tmp_path, "a", eval_json=ev)))
    assert (f["explained_variance"], f["l0"], f["ce_loss_score"], f["kl_div_with_sae"], f["probe_top1"]) == \
        (0.42, 7.0, 0.93, 0.1, 0.6)


def _eval_with_decorrelation(ev: float, r2: float, probe: float = 0.75) -> dict:
    dec = {"n_rows": 512, "n_alive_latents": 30, "n_coactive_pairs": 200, "n_undefined_pairs": 0,
           "coactive_pair_fraction": 200 / 435, "mean_sq_corr_coactive": r2, "mean_abs_corr_coactive": 2 * r2,
           "frac_coactive_abs_corr_gt_0_5": r2 / 2, "decoder_redundancy": 0.3}
    return {"eval_result_metrics": {"reconstruction_quality": {"explained_variance": ev, "mse": 1.0, "cossim": 0.9},
                                    "sparsity": {"l0": 8.0, "l1": 2.0}, "decorrelation": dec,
                                    "sparse_probing": {"sae_top_1_test_accuracy": probe,
                                                       "sae_top_1_test_accuracy_stderr": 0.02}}}


def test_decorrelation_table_and_tradeoff_plots(tmp_path):
    runs = [fake_run(tmp_path, "topk-s0", eval_json=_eval_with_decorrelation(0.9, 0.0125)),
            fake_run(tmp_path, "topk-s1", seed=1, eval_json=_eval_with_decorrelation(0.88, 0.0075)),
            fake_run(tmp_path, "dyncorr", arch="dyncorr", eval_json=_eval_with_decorrelation(0.85, 0.004)),
            fake_run(tmp_path, "no-eval", arch="baseline")]
    out = tmp_path / "report"
    c = compare(runs, out)
    assert c.final["dyncorr"]["mean_sq_corr_coactive"] == 0.004 and c.final["topk-s0"]["probe_top1_stderr"] == 0.02
    assert math.isnan(c.final["no-eval"]["mean_sq_corr_coactive"])
    table = next(t for t in c.tables if t.title.startswith("Decorrelation"))
    rows = {row[0]: dict(zip(table.columns, row)) for row in table.rows}
    assert rows["dyncorr"]["mean R² (co-active)"] == "0.0040" and rows["dyncorr"]["share abs(R) > 0.5"] == "0.0020"
    assert rows["topk-s0"]["co-active pairs"] == "200" and rows["no-eval"]["decoder redundancy"] == ""
    assert c.spread["topk"]["mean_sq_corr_coactive"]["mean"] == pytest.approx(0.01)
    md = c.report.read_text()
    for png in ("ev_vs_l0", "ev_vs_mean_sq_corr"):
        assert (out / f"{png}.png").stat().st_size > 1000 and f"({png}.png)" in md
    assert "## Decorrelation" in md and "co-active" in md.split("## Definitions")[1]
    bare = compare([fake_run(tmp_path / "b", "a")], tmp_path / "bare")
    assert not any(t.title.startswith("Decorrelation") for t in bare.tables)
    assert not (tmp_path / "bare" / "ev_vs_mean_sq_corr.png").exists()


def test_unfinished_run_is_compared_with_blank_final_metrics(tmp_path):
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b", finished=False)
    c = compare([a, b], tmp_path / "r", plots=False)
    assert math.isnan(c.final["b"]["explained_variance"]) and c.stability["b"]["rollbacks"] == 0
    assert "Unfinished" in c.report.read_text()


def test_groups_need_identical_settings_apart_from_the_seed(tmp_path):
    runs = load_runs([fake_run(tmp_path, "e6", arch="dyncorr", eps=1e-6), fake_run(tmp_path, "e0", arch="dyncorr", eps=0.0),
                      fake_run(tmp_path, "e0b", arch="dyncorr", eps=0.0, seed=1)])
    assert [r.label for r in runs] == ["dyncorr eps=1e-06", "dyncorr eps=0.0", "dyncorr eps=0.0"]
    assert list(seed_groups(runs)) == ["dyncorr eps=0.0"]


def test_same_directory_names_are_made_unique(tmp_path):
    runs = load_runs([fake_run(tmp_path / "x", "run"), fake_run(tmp_path / "y", "run", seed=1)])
    assert [r.name for r in runs] == ["x/run", "y/run"]


# -- bad input: one line, exit != 0, no traceback --------------------------------------------
def test_different_hooks_are_refused_naming_them(tmp_path):
    a = fake_run(tmp_path, "a")
    b = fake_run(tmp_path, "b", hook="blocks.3.hook_resid_post")
    with pytest.raises(ActcacheError, match="different hooks.*blocks.0.hook_resid_post.*blocks.3.hook_resid_post"):
        load_runs([a, b])
    res = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "different hooks" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


def test_different_widths_are_refused(tmp_path):
    with pytest.raises(ActcacheError, match=r"different widths \(d_in\).*16.*32"):
        load_runs([fake_run(tmp_path, "a"), fake_run(tmp_path, "b", d_in=32)])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / A.METRICS).unlink(), "has no metrics.jsonl"),
    (lambda d: (d / A.CONFIG).unlink(), "has no config.json"),
    (lambda d: (d / A.METRICS).write_text(""), "metrics.jsonl is empty"),
    (lambda d: (d / A.METRICS).write_text("{not json\n"), "line 1 is not JSON"),
])
def test_damaged_run_dirs_give_one_line_errors(tmp_path, damage, message):
    d = fake_run(tmp_path, "a")
    damage(d)
    res = runner.invoke(app, ["compare", str(d), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_missing_run_dir(tmp_path):
    res = runner.invoke(app, ["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "is not a directory" in res.output


def test_cli_prints_tables_and_the_report_path(tmp_path):
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b", seed=1)
    res = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "r"), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "Stability" in res.output and res.output.strip().endswith(str(tmp_path / "r" / "report.md"))
