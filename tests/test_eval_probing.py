"""Sparse probing: the logistic regression and top-k selection on known data, the labelled sets, the pipeline."""

import json

import numpy as np
import torch

from trainer.evaluation import PROBE_STDLIB, evaluate_run
from trainer.evaluation.probe_data import LabelledTexts, load_labelled, make_tasks
from trainer.evaluation.probing import KS, logistic_accuracy, sparse_probing, top_k_by_mean_diff

from test_eval import TINY_HOOK, perfect_run


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
    assert abs(float(np.mean(list(chance.values()))) - 0.5) < 0.12, chance
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


def test_probing_through_the_model(small_store, tmp_path):
    path = tmp_path / "p.jsonl"
    words = {"x": "asyncio event loop coroutine task", "y": "email message header mime part"}
    path.write_text("".join(json.dumps({"text": f"{words[lab]} {i}", "label": lab}) + "\n"
                            for i in range(24) for lab in "xy"))
    run = perfect_run(tmp_path / "run", small_store, TINY_HOOK)
    r = evaluate_run(run, splice=False, probe_file=path, device="cpu")
    sp = r["eval_result_metrics"]["sparse_probing"]
    assert set(sp) == {f"{p}_{k}test_accuracy" for p in ("llm", "sae") for k in ["", *(f"top_{k}_" for k in KS)]}
    assert sp["llm_test_accuracy"] == 1.0 and sp["sae_test_accuracy"] == 1.0  # the words differ
    assert r["eval_result_details"][0]["dataset_name"] == "p/y"
