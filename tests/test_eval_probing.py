"""Sparse probing: the logistic regression and top-k selection on known data, the labelled sets, the pipeline."""

import json

import numpy as np
import torch

import math

import pytest
from typer.testing import CliRunner

from actcache.errors import ActcacheError
from trainer.cli import app
from trainer.evaluation import PROBE_CODE, PROBE_STDLIB, evaluate_run
from trainer.evaluation.probe_data import SNIPPET_LINES, LabelledTexts, load_labelled, make_split_tasks, make_tasks
from trainer.evaluation.probing import KS, binomial_stderr, logistic_accuracy, sparse_probing, top_k_by_mean_diff

from test_eval import TINY_HOOK, perfect_run

runner = CliRunner()


def _synthetic(n=400, d=60, informative=(7,), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g)
    for j in informative:
        x[:, j] += 4.0 * (2 * y - 1)  # 8 standard deviations apart: separable
    return x, y


def _tasks(y: torch.Tensor, seed=0):
    labels = ["pos" if v else "neg" for v in y.tolist()]
    return make_tasks(LabelledTexts("synthetic", [""] * len(labels), labels), seed=seed)


def test_separable_data_is_probed_perfectly_and_shuffled_labels_at_chance():
    x, y = _synthetic()
    assert top_k_by_mean_diff(x, y, 1).tolist() == [7]
    mean, details = sparse_probing({"sae": x}, _tasks(y))
    assert len(details) == 1 and details[0]["n_test"] == 80
    assert mean["sae_top_1_test_accuracy"] >= 0.98 and mean["sae_test_accuracy"] >= 0.95
    assert mean["sae_top_50_test_accuracy"] >= 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    chance = sparse_probing({"sae": x}, _tasks(shuffled))[0]
    accs = [v for key, v in chance.items() if key.endswith("_accuracy")]
    assert len(accs) == 1 + len(KS) and abs(float(np.mean(accs)) - 0.5) < 0.12, chance
    assert logistic_accuracy(x[:300], y[:300], x[300:], y[300:]) == 1.0


def test_k_beyond_the_width_is_null():
    x, y = _synthetic(d=4, informative=(0,))
    mean, _ = sparse_probing({"llm": x}, _tasks(y), ks=(1, 2, 5))
    assert mean["llm_top_5_test_accuracy"] is None and mean["llm_top_2_test_accuracy"] >= 0.95


def test_user_files_and_one_vs_rest(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("body,y\n" + "".join(f"text {i},{'abc'[i % 3]}\n" for i in range(30)))
    data = load_labelled(path, text_field="body", label_field="y", max_per_class=6)
    assert data.classes == ["a", "b", "c"] and len(data.texts) == 18
    tasks = make_tasks(data)
    assert [t.name for t in tasks] == ["l/a", "l/b", "l/c"]
    for t in tasks:  # balanced: the class against as many others
        assert t.y.sum() == 6 and len(t.y) == 12 and 0 < (~t.train).sum() < 12


def test_embedded_stdlib_set_is_deterministic():
    a = load_labelled(PROBE_STDLIB, max_per_class=30)
    b = load_labelled(PROBE_STDLIB, max_per_class=30)
    assert a == b and len(a.classes) == 5 and len(a.texts) == 150
    assert len(set(a.texts)) == len(a.texts)


def _accuracy_keys(prefixes=("llm", "sae")) -> set[str]:
    return {f"{p}_{k}test_accuracy" for p in prefixes for k in ["", *(f"top_{k}_" for k in KS)]}


def test_probing_through_the_model(small_store, tmp_path):
    path = tmp_path / "p.jsonl"
    words = {"x": "asyncio event loop coroutine task", "y": "email message header mime part"}
    path.write_text("".join(json.dumps({"text": f"{words[lab]} {i}", "label": lab}) + "\n"
                            for i in range(24) for lab in "xy"))
    run = perfect_run(tmp_path / "run", small_store, TINY_HOOK)
    r = evaluate_run(run, splice=False, probe_file=path, device="cpu")
    sp = r["eval_result_metrics"]["sparse_probing"]
    acc = _accuracy_keys()
    assert set(sp) == acc | {f"{k}_stderr" for k in acc} | {"n_tasks", "n_test"}
    assert sp["llm_test_accuracy"] == 1.0 and sp["sae_test_accuracy"] == 1.0  # the words differ
    assert sp["sae_test_accuracy_stderr"] == 0.0 and sp["n_tasks"] == 1 and sp["n_test"] == 10  # 20% of 24 + 24
    assert r["eval_result_details"][0]["dataset_name"] == "p/y"


# -- standard errors ---------------------------------------------------------------------------
def test_binomial_stderr_per_task_and_of_the_mean():
    assert binomial_stderr(0.9, 100) == pytest.approx(0.03, abs=1e-15)
    assert binomial_stderr(1.0, 50) == 0.0 and math.isnan(binomial_stderr(0.5, 0))
    x, y = _synthetic(n=300, d=30, informative=())  # no signal: accuracies away from 0 and 1
    labels = ["abc"[i % 3] for i in range(300)]
    tasks = make_tasks(LabelledTexts("three", [""] * 300, labels))
    mean, details = sparse_probing({"sae": x}, tasks, ks=(1, 5))
    assert len(details) == 3 and mean["n_test"] == sum(d["n_test"] for d in details)
    for d in details:
        assert d["sae_top_5_test_accuracy_stderr"] == pytest.approx(
            math.sqrt(d["sae_top_5_test_accuracy"] * (1 - d["sae_top_5_test_accuracy"]) / d["n_test"]), rel=1e-12)
    se = [d["sae_top_1_test_accuracy_stderr"] for d in details]
    assert mean["sae_top_1_test_accuracy_stderr"] == pytest.approx(math.sqrt(sum(e * e for e in se)) / 3, rel=1e-12)


# -- a separate test set -----------------------------------------------------------------------
def test_split_tasks_train_on_one_set_and_test_on_the_other():
    train = LabelledTexts("tr", [f"t{i}" for i in range(40)], ["abc"[i % 3] for i in range(40)])
    test = LabelledTexts("te", [f"s{i}" for i in range(15)], ["abc"[i % 3] for i in range(15)])
    tasks = make_split_tasks(train, test, seed=1)
    assert [t.name for t in tasks] == ["tr/a", "tr/b", "tr/c"]
    for t in tasks:
        assert (t.index[t.train] < 40).all() and (t.index[~t.train] >= 40).all()
        assert t.y[~t.train].sum() == 5 and (~t.train).sum() == 10  # the class against as many others
        assert all((train.labels + test.labels)[i] == t.name[-1] for i in t.index[t.y == 1])
    with pytest.raises(ActcacheError, match="same labels"):
        make_split_tasks(train, LabelledTexts("te", ["u"] * 8, ["a", "b"] * 4))


def _write(path, words, n, flip=False, start=0):
    labels = "xy"
    path.write_text("".join(json.dumps({"text": f"{words[lab]} {i}", "label": labels[(labels.index(lab) + flip) % 2]})
                            + "\n" for i in range(start, start + n) for lab in labels))
    return path


def test_probe_test_file_is_what_is_scored(small_store, tmp_path):
    """Trained on the train file, tested on the test file: with the test file's labels swapped,
    every probe is exactly wrong; with them right, exactly right."""
    words = {"x": "asyncio event loop coroutine task", "y": "email message header mime part"}
    train = _write(tmp_path / "train.jsonl", words, 20)
    test = _write(tmp_path / "test.jsonl", words, 6, start=100)
    flipped = _write(tmp_path / "flipped.jsonl", words, 6, flip=True, start=100)
    run = perfect_run(tmp_path / "run", small_store, TINY_HOOK)
    r = evaluate_run(run, splice=False, probe_file=train, probe_test_file=test, device="cpu")
    sp = r["eval_result_metrics"]["sparse_probing"]
    assert r["eval_result_details"][0]["n_train"] == 40 and sp["n_test"] == 12
    assert all(sp[k] == 1.0 for k in _accuracy_keys())
    assert r["eval_config"]["probe_test_file"] == str(test) and r["warnings"] == []
    sp = evaluate_run(run, splice=False, probe_file=train, probe_test_file=flipped,
                      device="cpu")["eval_result_metrics"]["sparse_probing"]
    assert all(sp[k] == 0.0 for k in _accuracy_keys())
    res = runner.invoke(app, ["eval", str(run), "--no-splice", "--device", "cpu", "--probe-file", str(train),
                              "--probe-test-file", str(train)])
    assert res.exit_code == 0, res.output
    assert "± 0.000" in res.output and "LLM (raw activations)" in res.output and "warning:" in res.output
    missing = str(tmp_path / "nope.jsonl")
    for args, msg in [(["--probe-test-file", str(test)], "needs a probe train file"),
                      (["--probe-file", str(train), "--probe-test-file", missing], "does not exist")]:
        res = runner.invoke(app, ["eval", str(run), "--no-splice", "--device", "cpu", *args])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output


# -- the embedded code-language set ------------------------------------------------------------
def test_embedded_code_languages_are_deterministic_snippets():
    a = load_labelled(PROBE_CODE, max_per_class=40)
    assert a == load_labelled(PROBE_CODE, max_per_class=40)
    assert a.classes == ["c++", "cmake", "python"] and len(a.texts) == 120 and len(set(a.texts)) == 120
    assert all(len(t.splitlines()) == SNIPPET_LINES for t in a.texts)
    py = [t for t, lab in zip(a.texts, a.labels) if lab == "python"]
    cpp = [t for t, lab in zip(a.texts, a.labels) if lab == "c++"]
    assert sum("def " in t or "import " in t or "self" in t for t in py) > 20
    assert sum(";" in t for t in cpp) > 20


def test_several_sources_in_one_eval(small_store, tmp_path):
    """The embedded code set and a file probed in one pass: per-source means and the mean over all tasks."""
    words = {"x": "asyncio event loop coroutine task", "y": "email message header mime part"}
    path = _write(tmp_path / "w.jsonl", words, 10)
    run = perfect_run(tmp_path / "run", small_store, TINY_HOOK)
    res = runner.invoke(app, ["eval", str(run), "--no-splice", "--device", "cpu", "--probe-max-per-class", "12",
                              "--probe-file", f"{PROBE_CODE}, {path}"])
    assert res.exit_code == 0, res.output
    assert f"sparse probing of {PROBE_CODE}" in res.output and "sparse probing of all sources" in res.output
    r = json.loads((run / "eval.json").read_text())
    names = [d["dataset_name"] for d in r["eval_result_details"]]
    assert names == [f"{PROBE_CODE}/{c}" for c in ("c++", "cmake", "python")] + ["w/y"]
    m = r["eval_result_metrics"]
    assert list(m["sparse_probing_by_source"]) == [PROBE_CODE, "w"] and m["sparse_probing"]["n_tasks"] == 4
    assert m["sparse_probing_by_source"]["w"]["sae_test_accuracy"] == 1.0
    key = "llm_top_2_test_accuracy"
    assert m["sparse_probing"][key] == pytest.approx(np.mean([d[key] for d in r["eval_result_details"]]), rel=1e-12)
    assert r["eval_config"]["probe_file"] == f"{PROBE_CODE},{path}"
    with pytest.raises(ActcacheError, match="test set of one --probe-file"):
        evaluate_run(run, splice=False, probe_file=[PROBE_CODE, path], probe_test_file=path, device="cpu")


def test_pooled_features_match_one_text_at_a_time_in_float64(small_store, tmp_path):
    """Right-padded batches + index_add pooling == each text alone through a float64 model."""
    from actcache.hooks import parse_hook
    from actcache.models import load_model
    from actcache.store import open_store
    from trainer.evaluation.loading import load_run
    from trainer.evaluation.probing import pool, token_activations

    store = open_store(small_store)
    run = load_run(perfect_run(tmp_path / "run", small_store, TINY_HOOK), device=torch.device("cpu"))
    loaded = load_model(store.attrs["model"]["id"], dtype=torch.float64, device=torch.device("cpu"))
    spec = parse_hook(TINY_HOOK)
    texts = ["a", "the email header", "asyncio event loop coroutine task " * 5, "x y z"]
    tokens = token_activations(loaded.model, loaded.tokenizer, spec, texts, max_tokens=16, prepend_bos=True,
                               batch_texts=3)
    acts, latents = pool(tokens, run.sae.double(), run.k)
    assert tokens.acts.dtype == torch.float32 and torch.isfinite(acts).all() and torch.isfinite(latents).all()
    for i, t in enumerate(texts):
        alone = token_activations(loaded.model, loaded.tokenizer, spec, [t], max_tokens=16, prepend_bos=True)
        assert alone.acts.shape[0] == int((tokens.text == i).sum()) <= 15  # BOS dropped, truncated
        ref = alone.acts.double().mean(0)
        torch.testing.assert_close(acts[i].double(), ref, rtol=1e-5, atol=1e-5)
        ref_z = run.sae.encode(alone.acts.double(), run.k).mean(0)
        torch.testing.assert_close(latents[i].double(), ref_z, rtol=1e-5, atol=1e-5)


def test_second_eval_reuses_the_forward_pass(small_store, tmp_path, monkeypatch):
    """Runs of one store probed on the same texts share one forward pass, with identical results."""
    import trainer.evaluation.run as run_mod

    words = {"x": "asyncio event loop coroutine task", "y": "email message header mime part"}
    path = _write(tmp_path / "w.jsonl", words, 10)
    run_a = perfect_run(tmp_path / "a", small_store, TINY_HOOK)
    run_b = perfect_run(tmp_path / "b", small_store, TINY_HOOK)
    calls = []
    real = run_mod.token_activations
    monkeypatch.setattr(run_mod, "token_activations", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_mod.clear_probe_cache()
    ra = evaluate_run(run_a, splice=False, probe_file=path, device="cpu")
    rb = evaluate_run(run_b, splice=False, probe_file=path, device="cpu")
    assert len(calls) == 1
    assert ra["eval_result_metrics"]["sparse_probing"] == rb["eval_result_metrics"]["sparse_probing"]
    run_mod.clear_probe_cache()
    fresh = evaluate_run(run_b, splice=False, probe_file=path, device="cpu")
    assert len(calls) == 2 and fresh["eval_result_details"] == rb["eval_result_details"]
