"""sae study: the small preset end to end on the tiny Gemma-2 (extract, train, eval, compare, stress),
then a re-run that redoes nothing; the variant plan; the corpus; one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from actcache.corpus import iter_documents
from actcache.errors import ActcacheError
from actcache.store import open_store
from trainer import artifacts as A
from trainer.cli import app
from trainer.report.experiment import REPORT, RUNS, evaluate_again
from trainer.report.study import (CORPUS, HELDOUT_CORPUS, HELDOUT_STORE, SCALES, STORE, STRESS, SUMMARY, SWEEP_PLOT,
                                  StudyConfig, build_corpus, main_variants, middle_hook, preset, probe_table, run_study,
                                  stress_variants)

TINY = "embedded:tiny-gemma2"
runner = CliRunner()


def test_presets_measure_what_the_issue_asks():
    full = SCALES["full"]
    assert full.n_tokens >= 2_000_000 and full.d_sae_mult >= 8 and full.seeds >= 3
    for scale in SCALES.values():
        defs, seeds = main_variants(scale)
        lams = sorted(f["lambda_max"] for f in defs.values() if f["arch"] == "dyncorr" and f.get("lambda_max"))
        assert len(lams) >= 4 and lams[-1] / lams[0] >= 100  # a curve over orders of magnitude
        assert {"baseline", "topk", "topk-cosine", "dyncorr", "dyncorr-eps0"} <= set(defs)
        assert defs["topk-cosine"]["lambda_max"] == 0.0 and defs["dyncorr-eps0"]["eps"] == 0.0
        constk = [f for v, f in defs.items() if v.startswith("dyncorr-constk-")]  # the penalty over constant k
        assert constk and all(f["k_start"] == f["k_end"] == scale.k_end and f["lambda_max"] > 0 for f in constk)
        assert all(seeds[v] == scale.seeds for v in ("baseline", "topk", "topk-cosine", "dyncorr", "dyncorr-eps0"))
        stress = stress_variants(scale, d_in=64)
        regimes = {n.rsplit("-eps", 1)[0] for n in stress}
        assert {"beta1", "batch32", "lr10x", "dying", "cov64"} <= regimes
        for r in regimes:  # every regime as an eps pair, nothing else differing
            a, b = stress[f"{r}-eps1e-6"], stress[f"{r}-eps0"]
            assert a["eps"] == 1e-6 and b["eps"] == 0.0 and {k: v for k, v in a.items() if k != "eps"} == \
                {k: v for k, v in b.items() if k != "eps"}
        assert stress["dying-eps0"]["d_sae"] >= 16 * 64 and stress["batch32-eps0"]["batch_size"] <= 64
        assert stress["beta1-eps0"]["beta"] == 1.0 and stress["cov64-eps0"]["cov_dtype"] == "float64"


def test_middle_hook():
    assert middle_hook("embedded:smollm2-135m") == "blocks.15.hook_resid_post"
    assert middle_hook("google/gemma-2-2b") == "blocks.13.hook_resid_post"
    with pytest.raises(ActcacheError, match="--hook"):
        middle_hook("/nonexistent/model")


def test_corpus_is_capped_written_once_and_atomic(tmp_path):
    docs = lambda: iter(["a" * 40, "b" * 40, "c" * 40])  # noqa: E731
    p = build_corpus(tmp_path / "c.jsonl", 60, docs)
    assert [json.loads(line)["text"][0] for line in p.read_text().splitlines()] == ["a", "b"]
    assert not list(tmp_path.glob("*.tmp"))
    build_corpus(p, 1000, lambda: iter(["z" * 40]))  # kept: a resumed study extracts the same text
    assert len(p.read_text().splitlines()) == 2


def test_small_study_end_to_end_then_rerun_skips_everything(tmp_path):
    scale = SCALES["small"]  # ~20 s on 2 quiet cores
    # No splice: loading the model for every evaluation would dominate a CI-sized study.
    cfg = StudyConfig(out=tmp_path, model=TINY, dataset="embedded:stdlib-docstrings", scale=scale, device="cpu",
                      stress=True, probe_file="", splice=False)
    said: list[str] = []
    summary = run_study(cfg, echo=said.append)
    st = open_store(tmp_path / STORE)
    assert st.hooks == ["blocks.2.hook_resid_post"] and st.n_rows >= scale.n_tokens - scale.context_size
    # Evaluation rows come from documents the training store never read.
    held = open_store(tmp_path / HELDOUT_STORE)
    assert held.hooks == st.hooks and held.n_rows >= scale.heldout_tokens - scale.context_size
    n_read = st.attrs["dataset"]["n_documents_read"]
    unseen = list(itertools.islice(iter_documents(cfg.dataset), n_read, n_read + 3))
    first = [json.loads(line)["text"] for line in (tmp_path / HELDOUT_CORPUS).read_text().splitlines()[:3]]
    assert first == unseen and held.attrs["dataset"]["path"] == str(tmp_path / HELDOUT_CORPUS)
    defs, seeds = main_variants(scale)
    names = [f"{v}-s{i}" for v in defs for i in range(seeds[v])]
    assert sorted(p.name for p in (tmp_path / RUNS).iterdir()) == sorted(names)
    final_k = set()
    for n in names:
        paths = A.run_paths(tmp_path / RUNS / n)
        c = json.loads(paths.config.read_text())
        assert c["d_sae"] == 8 * st.d_model and c["store"] == str(tmp_path / STORE)
        ev_all = json.loads(paths.eval.read_text())
        assert ev_all["eval_config"]["split"] == "all"
        assert Path(ev_all["eval_config"]["store"]).resolve() == (tmp_path / HELDOUT_STORE).resolve()
        ev = ev_all["eval_result_metrics"]
        ev_ = ev["reconstruction_quality"]["explained_variance"]
        assert math.isfinite(ev_) and ev_ <= 1 and (ev_ > 0 or c["arch"] == "baseline")  # the L1 baseline is not sparse-trained here
        assert 0 <= ev["decorrelation"]["mean_sq_corr_coactive"] <= 1  # measured for every arch
        if c["arch"] != "baseline":
            final_k.add(c["k"] if c["arch"] == "topk" else c["k_end"])
    assert final_k == {scale.k_end}  # the same final L0 everywhere
    stress = sorted(p.name for p in (tmp_path / STRESS / RUNS).iterdir())
    assert len(stress) == len(stress_variants(scale, st.d_model)) and all(n.endswith("-s0") for n in stress)
    for n in stress:  # trained to the end: every regime finishes (or reports) without an exception
        assert (tmp_path / STRESS / RUNS / n / "summary.json").exists()
    md = summary.read_text()
    assert summary == tmp_path / SUMMARY
    for v in list(defs) + ["beta1-eps0", "dying-eps1e-6"]:
        assert f"| {v} | " in md
    row = next(line for line in md.splitlines() if line.startswith("| topk | ")).split("|")
    evs = [json.loads(A.run_paths(tmp_path / RUNS / f"topk-s{i}").eval.read_text())["eval_result_metrics"]
           ["reconstruction_quality"]["explained_variance"] for i in range(scale.seeds)]
    mean, std = (float(x) for x in row[3].split("±"))  # mean ± sample std over the seeds
    assert row[2].strip() == str(scale.seeds) and mean == pytest.approx(sum(evs) / len(evs), abs=1e-4)
    assert std == pytest.approx(float(np.std(evs, ddof=1)), abs=1e-4)

    # The sweep: one row per lambda_max from 0 (topk-cosine) through the main dyncorr, and its plot.
    sweep_md, constk_md = md.split("## the penalty over constant k")
    lam_rows = [line.split("|") for line in sweep_md.splitlines() if re.match(r"\| [0-9.e+-]+ \| \d+ \| ", line)]
    assert [r[1].strip() for r in lam_rows] == ["0", "0.01", "0.1", "1", "3", "10"]
    # The penalty over constant k: lambda 0 is topk's 3 seeds, then each constant-k run.
    flat_rows = [line.split("|") for line in constk_md.splitlines() if re.match(r"\| [0-9.e+-]+ \| \d+ \| ", line)]
    assert [(r[1].strip(), r[2].strip()) for r in flat_rows] == [("0", str(scale.seeds)), ("1", "1")]
    assert float(flat_rows[0][3].split("±")[0]) == pytest.approx(mean, abs=1e-4)  # topk's mean EV
    main = next(r for r in lam_rows if r[1].strip() == "1")
    evs = [json.loads(A.run_paths(tmp_path / RUNS / f"dyncorr-s{i}").eval.read_text())["eval_result_metrics"]
           ["reconstruction_quality"]["explained_variance"] for i in range(scale.seeds)]
    assert main[2].strip() == "3" and float(main[3].split("±")[0]) == pytest.approx(np.mean(evs), abs=1e-4)
    assert (tmp_path / REPORT / SWEEP_PLOT).stat().st_size > 0 and f"]({REPORT}/{SWEEP_PLOT})" in md

    # Re-run: the store is kept, no run is trained or evaluated again.
    mtimes = {n: (tmp_path / RUNS / n / A.WEIGHTS).stat().st_mtime_ns for n in names}
    said.clear()
    run_study(cfg, echo=said.append)
    assert any("complete, kept" in m for m in said)
    assert not any(m.startswith("eval") for m in said)
    assert sum("skipped" in m for m in said) == len(names) + len(stress)
    assert mtimes == {n: (tmp_path / RUNS / n / A.WEIGHTS).stat().st_mtime_ns for n in names}
    assert not (tmp_path / CORPUS).exists()  # an explicit dataset: no corpus is built


def test_cli_errors_are_one_line(tmp_path):
    res = runner.invoke(app, ["study", "--out", str(tmp_path / "s"), "--scale", "huge"])
    assert res.exit_code == 2 and "--scale 'huge'" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["study", "--out", str(tmp_path / "s"), "--model", "/nonexistent/m", "--scale", "small"])
    assert res.exit_code == 2 and "--hook" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s").exists()  # nothing written before the inputs are checked


def test_preset_overrides():
    assert preset("small", seeds=5).seeds == 5 and preset("small", seeds=None).seeds == SCALES["small"].seeds
    assert not math.isnan(preset("full").lr)


def _probed_run(root, name, tasks):
    d = root / name
    d.mkdir(parents=True)
    details = [{"dataset_name": t, "n_train": 80, "n_test": n, **{f"{p}_{k}": v for p, accs in by.items()
                                                                    for k, v in accs.items()}}
               for t, n, by in tasks]
    A.run_paths(d).eval.write_text(json.dumps({"eval_result_details": details}))
    return d


def test_probe_table_per_task_mean_std_and_binomial_se(tmp_path):
    acc = lambda top1, top5, top20, all_: {"top_1_test_accuracy": top1, "top_5_test_accuracy": top5,  # noqa: E731
                                          "top_20_test_accuracy": top20, "test_accuracy": all_}
    llm = acc(0.70, 0.80, 0.90, 0.95)
    runs = [_probed_run(tmp_path, "topk-s0", [("pkgs", 100, {"llm": llm, "sae": acc(0.60, 0.7, 0.8, 0.9)}),
                                              ("langs", 400, {"llm": llm, "sae": acc(0.5, 0.5, 0.5, 0.5)})]),
            _probed_run(tmp_path, "topk-s1", [("pkgs", 100, {"llm": llm, "sae": acc(0.64, 0.7, 0.8, None)}),
                                              ("langs", 400, {"llm": llm, "sae": acc(0.7, 0.5, 0.5, 0.5)})]),
            tmp_path / "dyncorr-s0"]  # not evaluated: no row
    rows = [r.split("|")[1:-1] for r in probe_table(runs).splitlines()[2:]]
    cells = {(r[0].strip(), r[1].strip()): [c.strip() for c in r[2:]] for r in rows}
    assert set(cells) == {("pkgs", "llm (raw activations)"), ("pkgs", "topk"), ("langs", "llm (raw activations)"),
                          ("langs", "topk")}
    assert cells[("pkgs", "topk")][:4] == ["2", "100", f"0.620 ± {np.std([0.60, 0.64], ddof=1):.3f}", "0.700 ± 0.000"]
    assert cells[("pkgs", "topk")][5] == "0.900"  # one seed measured it: no spread to show
    assert cells[("pkgs", "topk")][6] == f"{math.sqrt(0.62 * 0.38 / 100):.3f}"
    assert cells[("langs", "llm (raw activations)")][:3] == ["1", "400", "0.700"]
    assert cells[("langs", "llm (raw activations)")][6] == f"{math.sqrt(0.7 * 0.3 / 400):.3f}"
    assert probe_table([tmp_path / "dyncorr-s0"]) == ""


def test_a_run_is_evaluated_again_only_on_another_store_or_split(tmp_path):
    ev = tmp_path / "eval.json"
    opts = {"store": str(tmp_path / "heldout.zarr"), "split": "all"}
    assert evaluate_again(ev, opts) == ""  # never evaluated
    ev.write_text(json.dumps({"eval_config": {"store": str(tmp_path / "store.zarr"), "split": "heldout"}}))
    assert "again: on" in evaluate_again(ev, opts)
    ev.write_text(json.dumps({"eval_config": {"store": str(tmp_path / "x" / ".." / "heldout.zarr"), "split": "all"}}))
    assert evaluate_again(ev, opts) is None
    assert "max_rows 4096" in evaluate_again(ev, {**opts, "max_rows": 4096})  # a row cap is another evaluation
    ev.write_text("{")
    assert "damaged" in evaluate_again(ev, opts)
