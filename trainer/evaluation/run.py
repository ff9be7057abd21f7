"""``evaluate_run``: every metric of ``sae eval`` for one run, written as ``eval.json``."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from actcache.device import resolve_device
from actcache.errors import ActcacheError
from actcache.store import ActivationStore
from trainer.checkpoint import atomic_write_text
from trainer.evaluation.data import EvalData, select_split
from trainer.evaluation.decorrelation import DecorrelationMetrics, decorrelation_metrics
from trainer.evaluation.loading import TrainedRun, load_run
from trainer.evaluation.probe_data import ProbeTask, load_labelled, make_split_tasks, make_tasks
from trainer.evaluation.probing import KS, TokenActivations, mean_over_tasks, pool, sparse_probing, token_activations
from trainer.evaluation.reconstruction import ReconstructionMetrics, evaluate
from trainer.evaluation.splice import SpliceMetrics, splice_metrics
from trainer.rows import drop_norm_outliers

log = logging.getLogger(__name__)
EVAL_TYPE = "actcache-core"


def _load_store_model(store: ActivationStore, device: torch.device, warnings: list[str]):
    """The model named in the store's metadata, full depth, float32."""
    from actcache.models import load_model

    meta = store.attrs.get("model", {})
    if not meta.get("id"):
        raise ActcacheError(f"store {store.path} names no model: splicing and probing need one (pass splice=False)")
    loaded = load_model(meta["id"], gguf_file=meta.get("gguf_file"), dtype=torch.float32, device=device)
    if meta.get("config_hash") and meta["config_hash"] != loaded.config_hash:
        warnings.append(f"model {meta['id']} now has config hash {loaded.config_hash[:12]}, not the store's "
                        f"{meta['config_hash'][:12]}: it is not the model the activations came from")
    return loaded


def _finite(obj: Any) -> Any:
    """NaN/inf -> null: eval.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _metrics(rec: ReconstructionMetrics, dec: DecorrelationMetrics, spl: SpliceMetrics | None) -> dict[str, Any]:
    m: dict[str, Any] = {
        "reconstruction_quality": {"explained_variance": rec.explained_variance, "mse": rec.mse,
                                   "cossim": rec.cosine_similarity},
        "sparsity": {"l0": rec.l0, "l1": rec.l1},
        "misc_metrics": {"dead_fraction": rec.dead_fraction, "freq_over_1_percent": rec.frac_alive_gt_1pct,
                         "freq_over_10_percent": rec.frac_alive_gt_10pct},
        "token_stats": {"total_tokens_eval_reconstruction": rec.n_tokens,
                        "total_tokens_eval_ce": spl.n_predictions if spl else 0},
        "decorrelation": dec.to_dict(),
    }
    if spl is not None:
        m["model_performance_preservation"] = {
            "ce_loss_score": spl.ce_loss_score, "ce_loss_with_ablation": spl.ce_loss_with_ablation,
            "ce_loss_with_sae": spl.ce_loss_with_sae, "ce_loss_without_sae": spl.ce_loss_without_sae,
            "kl_div_with_sae": spl.kl_div_with_sae}
        m["model_behavior_preservation"] = {"kl_div_score": spl.kl_div_score,
                                            "kl_div_with_ablation": spl.kl_div_with_ablation,
                                            "kl_div_with_sae": spl.kl_div_with_sae}
    return m


def probe_sources(probe_file: str | Path | Sequence[str | Path] | None) -> list[str]:
    """``probe_file`` as a list of sources: a list, or one string with comma-separated sources."""
    if probe_file is None:
        return []
    items = [probe_file] if isinstance(probe_file, (str, Path)) else list(probe_file)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def _probe_tasks(cfg: dict[str, Any], warnings: list[str]) -> tuple[list[str], list[ProbeTask]]:
    """The probing texts (each source's, then the test set's) and tasks; read before any model
    work, so a bad labelled file fails at once."""
    opts = dict(text_field=cfg["probe_text_field"], label_field=cfg["probe_label_field"],
                max_per_class=cfg["probe_max_per_class"], seed=cfg["seed"])
    sources = probe_sources(cfg["probe_file"])
    if cfg["probe_test_file"] is not None:
        if len(sources) != 1:
            raise ActcacheError(f"--probe-test-file is the test set of one --probe-file, not of {len(sources)} "
                                f"({', '.join(sources)}): pass one train file with it")
        train = load_labelled(sources[0], **opts)
        test = load_labelled(str(cfg["probe_test_file"]), **opts)
        tasks = make_split_tasks(train, test, seed=cfg["seed"])
        shared = len(set(train.texts) & set(test.texts))
        if shared:
            warnings.append(f"{shared} texts of the probe test set {cfg['probe_test_file']} are also in the train "
                            f"set {sources[0]}: the probe accuracies are optimistic")
        return train.texts + test.texts, tasks
    texts: list[str] = []
    tasks = []
    for source in sources:
        data = load_labelled(source, **opts)
        tasks += [replace(t, index=t.index + len(texts)) for t in make_tasks(data, seed=cfg["seed"])]
        texts += data.texts
    return texts, tasks


# The last probe texts' hook activations: `sae experiment` and `sae study` evaluate many SAEs of
# one store on the same texts, and the model's forward pass is most of probing's cost.
_TOKEN_ACTS: dict[tuple, TokenActivations] = {}


def clear_probe_cache() -> None:
    """Forget the cached probe activations (their memory: tokens x d_in float32)."""
    _TOKEN_ACTS.clear()


def _probe_tokens(data: EvalData, loaded, spec, texts: list[str], device: torch.device) -> TokenActivations:
    meta = data.store.attrs.get("model", {})
    max_tokens, bos = int(data.store.attrs["context_size"]), bool(data.store.attrs.get("prepend_bos", True))
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    key = (meta.get("id"), meta.get("gguf_file"), loaded.config_hash, spec.name, str(device), max_tokens, bos, digest)
    if key not in _TOKEN_ACTS:
        _TOKEN_ACTS.clear()
        _TOKEN_ACTS[key] = token_activations(loaded.model, loaded.tokenizer, spec, texts, max_tokens=max_tokens,
                                             prepend_bos=bos)
    return _TOKEN_ACTS[key]


def _probe(run: TrainedRun, data: EvalData, loaded, spec, texts: list[str], tasks: list[ProbeTask], device: torch.device
           ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Mean over all tasks, mean per source (the task names' prefix), and per task."""
    acts, latents = pool(_probe_tokens(data, loaded, spec, texts, device), run.sae, run.k)
    mean, details = sparse_probing({"llm": acts, "sae": latents}, tasks, KS)
    by_source: dict[str, list[dict[str, Any]]] = {}
    for d in details:
        by_source.setdefault(d["dataset_name"].split("/", 1)[0], []).append(d)
    return mean, {name: mean_over_tasks(ds) for name, ds in by_source.items()}, details


def evaluate_run(run_dir: str | Path, *, store: str | Path | None = None, split: str = "heldout",
                 probe_file: str | Path | Sequence[str | Path] | None = None,
                 probe_test_file: str | Path | None = None,
                 splice: bool = True, n_windows: int = 64, device: str = "auto", batch_windows: int = 4,
                 max_rows: int = 0,
                 probe_text_field: str = "text", probe_label_field: str = "label", probe_max_per_class: int = 200,
                 seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a finished run on a split of a store; returns the result and writes it to ``eval.json``.

    ``store``: default the training store. ``split``: heldout, train or all (chunk ranges with the
    run's ``heldout_chunks``). ``splice``: CE/KL with the SAE spliced into the store's model over
    the split's first ``n_windows`` windows. ``probe_file``: a labelled ``.jsonl``/``.csv`` or an
    embedded set (``embedded:stdlib-packages``, ``embedded:code-languages``) for sparse probing,
    or several (a list, or comma-separated); None: no probing. Each is split 80/20 unless
    ``probe_test_file`` gives the test set (of one ``probe_file``). ``max_rows``:
    cap on the rows of the reconstruction and decorrelation metrics (0 = the whole split).
    ``out``: default ``RUN_DIR/eval.json``.
    """
    cfg = {k: v for k, v in locals().items()}
    if probe_test_file is not None and not probe_sources(probe_file):
        raise ActcacheError("a probe test file needs a probe train file: pass --probe-file TRAIN with "
                            "--probe-test-file TEST")
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev)
    data = select_split(run, store, split)
    if data.n_rows == 0:
        raise ActcacheError(f"split {split} of {data.store.path} is empty: pick another split or store")
    if n_windows < 1 and splice:
        raise ActcacheError(f"n_windows={n_windows}: splicing needs at least 1 window (or splice=False)")
    warnings = list(data.warnings)
    probe = _probe_tasks(cfg, warnings) if probe_sources(probe_file) else None
    t0 = time.perf_counter()
    ratio = run.cfg.train.max_norm_ratio  # the rows training left out are left out here too
    dropped = [0]

    def kept() -> Iterator[torch.Tensor]:
        for x in data.batches(max_rows=max_rows):
            x, n = drop_norm_outliers(x, ratio)
            dropped[0] += n
            yield x.to(dev)

    rec = evaluate(run.sae, kept(), k=run.k)
    rows_excluded = dropped[0]
    dec = decorrelation_metrics(run.sae, kept(), run.k)
    spl, probe_mean, probe_by_source, probe_details = None, None, None, []
    if splice or probe:
        from actcache.hooks import parse_hook

        spec = parse_hook(data.hook)
        loaded = _load_store_model(data.store, dev, warnings)
        if splice:
            spl = splice_metrics(loaded.model, spec, run.sae, run.k, data.windows(n_windows),
                                 first_position=data.store.layout.first_position, batch_windows=batch_windows,
                                 max_norm_ratio=ratio)
        if probe:
            probe_mean, probe_by_source, probe_details = _probe(run, data, loaded, spec, *probe, dev)
    metrics = _metrics(rec, dec, spl)
    metrics["token_stats"]["rows_excluded_max_norm_ratio"] = rows_excluded
    if probe_mean is not None:
        metrics["sparse_probing"] = probe_mean
        metrics["sparse_probing_by_source"] = probe_by_source
    result = {
        "eval_type_id": EVAL_TYPE,
        "eval_config": {**{k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()},
                        "probe_file": ",".join(probe_sources(probe_file)) or None,
                        "run_dir": str(run.paths.root), "store": str(data.store.path), "hook": data.hook,
                        "chunks": [data.chunks.start, data.chunks.stop], "k": run.k, "device": str(dev),
                        "model": data.store.attrs.get("model", {}).get("id"), "probe_ks": list(KS),
                        "max_norm_ratio": ratio},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": probe_details,
        "warnings": warnings,
        "wall_s": time.perf_counter() - t0,
        "sae_cfg_dict": run.saelens_cfg,
    }
    result = _finite(result)
    path = Path(out) if out is not None else run.paths.eval
    atomic_write_text(path, json.dumps(result, indent=2))
    log.info("wrote %s", path)
    return result
