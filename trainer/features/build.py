"""``sae features``: one streaming pass over a split, then the contexts, logit effects and
neighbours of the latents that get a page, assembled into the JSON contract (docs/features.md)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from actcache.errors import ActcacheError
from trainer.config import SAEConfig
from trainer.evaluation.data import EvalData, select_split
from trainer.evaluation.loading import TrainedRun, load_run
from trainer.features.logits import load_head, logit_effects, unembedding
from trainer.features.neighbours import sigma_correlations, sigma_statistics, top_neighbours
from trainer.features.scan import FeatureScan, LatentSummary, histogram_edges
from trainer.rows import norm_outliers

log = logging.getLogger(__name__)
FORMAT = {"name": "actcache-features", "version": 1}
# A shown latent's co-activation sums are len(shown) x d_sae float64: refuse more than this.
MAX_COACTIVATION_BYTES = 2 << 30


@dataclass(frozen=True)
class FeaturesConfig:
    store: str | None = None
    """Store to read; default: the run's training store."""
    split: str = "heldout"
    """heldout, train or all (chunk ranges with the run's heldout_chunks)."""
    latents: int = 256
    """Latents that get a page (the first N by index); 0 = all."""
    examples: int = 20
    """Top activating examples kept per latent."""
    neighbours: int = 10
    """Correlation neighbours listed per latent and source."""
    before: int = 12
    """Context tokens shown before an example's token."""
    after: int = 4
    """Context tokens shown after it."""
    batch_rows: int = 2048
    """Rows encoded at a time."""
    max_rows: int = 0
    """Rows of the split to read; 0 = all."""
    logits: bool = True
    """Load the store's model head for the logit effects and token strings."""
    device: str = "cpu"


def shown_latents(d_sae: int, n: int) -> np.ndarray:
    return np.arange(d_sae if n <= 0 else min(n, d_sae), dtype=np.int64)


def _rows(data: EvalData, batch_rows: int, max_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first store row, float32 batch)`` over the split, whole chunks read one at a time."""
    row = data.window_range[0] * data.store.layout.rows_per_window
    for x in data.batches(batch_rows, max_rows):
        yield row, x
        row += len(x)


@torch.no_grad()
def scan_split(run: TrainedRun, data: EvalData, cfg: FeaturesConfig, shown: np.ndarray) -> LatentSummary:
    """The streaming pass: encode every row of the split once."""
    d_sae = run.sae.cfg.d_sae
    if len(shown) * d_sae * 8 > MAX_COACTIVATION_BYTES:
        raise ActcacheError(f"co-activation sums for {len(shown)} latents x d_sae {d_sae} would take "
                            f"{len(shown) * d_sae * 8 / 2**30:.1f} GiB: pass a smaller --latents")
    dev = run.sae.W_dec.device
    scan = FeatureScan(d_sae, cfg.examples, torch.as_tensor(shown), device=dev)
    ratio, excluded = run.cfg.train.max_norm_ratio, 0
    for first, x in _rows(data, cfg.batch_rows, cfg.max_rows):
        z = run.sae.encode(x.to(dev), run.k)
        if ratio:  # rows the run never trained on (massive activations) fire no latent here
            out = norm_outliers(x, ratio).to(dev)
            z[out] = 0
            excluded += int(out.sum())
        scan.update(z, first)
    return replace(scan.summary(), rows_excluded=excluded)


@dataclass(frozen=True)
class Context:
    start: int  # window position of the first token shown
    tokens: list[int]
    acts: list[float]  # the latent's activation at each shown token


@torch.no_grad()
def example_contexts(run: TrainedRun, data: EvalData, wanted: dict[int, list[tuple[int, int]]],
                     windows: np.ndarray, cfg: FeaturesConfig) -> dict[tuple[int, int, int], Context]:
    """For every ``latent -> [(window, position)]``: the tokens around the example and the
    latent's activation on each, from a second read of only the chunks holding those windows."""
    lay = data.store.layout
    rpw, first = lay.rows_per_window, lay.first_position
    w0 = data.window_range[0]
    by_window: dict[int, list[tuple[int, int]]] = {}
    for latent, exs in wanted.items():
        for w, p in exs:
            by_window.setdefault(w, []).append((latent, p))
    out: dict[tuple[int, int, int], Context] = {}
    per_batch = max(1, cfg.batch_rows // rpw)
    dev = run.sae.W_dec.device
    for c in data.chunks:
        cw0, cw1 = lay.chunk_windows(c)
        need = sorted(w for w in by_window if cw0 <= w < cw1)
        if not need:
            continue
        x = data.store.read_chunk(data.hook, c).float()
        for i in range(0, len(need), per_batch):
            group = need[i:i + per_batch]
            rows = torch.cat([x[(w - cw0) * rpw:(w - cw0 + 1) * rpw] for w in group])
            z = run.sae.encode(rows.to(dev), run.k).view(len(group), rpw, -1).cpu()
            for g, w in enumerate(group):
                toks = windows[w - w0]
                for latent, p in by_window[w]:
                    lo, hi = max(first, p - cfg.before), min(lay.context_size, p + cfg.after + 1)
                    acts = z[g, lo - first:hi - first, latent]
                    out[(latent, w, p)] = Context(lo, [int(t) for t in toks[lo:hi]], [float(a) for a in acts])
    return out


class TokenText:
    """Token id -> display string (cached); ``#id`` without a tokenizer."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token]) if self.tokenizer is not None else f"#{token}"
        return self.cache[token]


def _top_tokens(tokens: list[int], text: TokenText, n: int = 3) -> list[dict[str, Any]]:
    ids, counts = np.unique(np.asarray(tokens, dtype=np.int64), return_counts=True)
    order = np.lexsort((ids, -counts))[:n]
    return [{"token": int(ids[i]), "text": text(int(ids[i])), "count": int(counts[i])} for i in order]


def _head(data: EvalData, cfg: FeaturesConfig, notes: list[str]) -> Any | None:
    if not cfg.logits:
        notes.append("logit effects not computed (--no-logits)")
        return None
    meta = data.store.attrs.get("model", {})
    try:
        return load_head(meta.get("id", ""), meta.get("gguf_file"))
    except ActcacheError as e:
        notes.append(f"no logit effects or token strings: the store's model {meta.get('id')!r} did not load ({e})")
        log.warning(notes[-1])
        return None


def build_features(run_dir: str | Path, cfg: FeaturesConfig) -> dict[str, Any]:
    """Everything ``sae features`` writes, as the JSON contract (docs/features.md)."""
    t0 = time.perf_counter()
    run = load_run(run_dir, device=cfg.device)
    data = select_split(run, cfg.store, cfg.split)
    if data.n_rows == 0:
        raise ActcacheError(f"split {cfg.split} of {data.store.path} is empty: pick another split or store")
    d_sae = run.sae.cfg.d_sae
    shown = shown_latents(d_sae, cfg.latents)
    summary = scan_split(run, data, cfg, shown)
    scan_s = time.perf_counter() - t0
    lay = data.store.layout
    rpw, first = lay.rows_per_window, lay.first_position
    w0, w1 = data.window_range
    windows = data.store.read_windows(w0, w1)

    def where(row: int) -> tuple[int, int]:
        return row // rpw, row % rpw + first

    notes = list(data.warnings)
    head = _head(data, cfg, notes)
    text = TokenText(head.tokenizer if head is not None else None)
    examples = {i: [(*where(r), a) for r, a in summary.examples(i)] for i in range(d_sae)}
    contexts = example_contexts(run, data, {int(i): [(w, p) for w, p, _ in examples[int(i)]] for i in shown},
                                windows, cfg)
    effects, logit_note = {}, None
    if head is not None:
        unembed = unembedding(head.model)
        effects = logit_effects(unembed, run.sae.W_dec.detach().cpu(), [int(i) for i in shown])
        logit_note = unembed.note
    stats = sigma_statistics(run.paths.root, _trained_cfg(run))
    sigma = sigma_correlations(stats, shown) if stats is not None else None
    shown_pos = {int(i): n for n, i in enumerate(shown)}
    latents = []
    for i in range(d_sae):
        entry = _latent_json(i, summary, examples[i], [int(windows[w - w0][p]) for w, p, _ in examples[i]], text)
        if i in shown_pos:
            n = shown_pos[i]
            entry["page"] = f"latents/{i}.html"
            entry["contexts"] = [_context_json(contexts[(i, w, p)], text) for w, p, _ in examples[i]]
            entry["neighbours"] = {} if sigma is None else {"sigma": top_neighbours(sigma[n], i, cfg.neighbours)}
            entry["neighbours"]["coactivation"] = top_neighbours(summary.coactivation[n], i, cfg.neighbours)
            if i in effects:
                entry["logits"] = {side: [{"token": t, "text": text(t), "value": v} for t, v in vals]
                                   for side, vals in effects[i].items()}
        latents.append(entry)
    return {
        "format": FORMAT,
        "run_dir": str(run.paths.root), "arch": _trained_cfg(run).arch,
        "d_in": run.sae.cfg.d_in, "d_sae": d_sae, "k": run.k,
        "store": str(data.store.path), "hook": data.hook, "split": data.split,
        "chunks": [data.chunks.start, data.chunks.stop], "n_rows": summary.n_rows,
        "rows_excluded_max_norm_ratio": summary.rows_excluded,
        "model": data.store.attrs.get("model", {}).get("id"),
        "examples_per_latent": cfg.examples, "context": {"before": cfg.before, "after": cfg.after},
        "histogram_edges": histogram_edges(), "logit_effects_note": logit_note,
        "neighbour_sources": (["sigma"] if sigma is not None else []) + ["coactivation"],
        "notes": notes, "scan_seconds": scan_s, "wall_seconds": time.perf_counter() - t0,
        "latents": latents,
    }


def _trained_cfg(run: TrainedRun) -> SAEConfig:
    """The SAEConfig as trained (load_run builds dyncorr as TopK for inference)."""
    return replace(run.cfg.sae, d_in=run.sae.cfg.d_in, d_sae=run.sae.cfg.d_sae)


def _latent_json(i: int, summary: LatentSummary, examples: list[tuple[int, int, float]], tokens: list[int],
                 text: TokenText) -> dict[str, Any]:
    """The contract's fields of every latent (docs/features.md); ``tokens``: those of its examples."""
    count = int(summary.count[i])
    return {
        "latent": i, "frequency": float(summary.frequency[i]), "n_fired": count,
        "max_activation": float(summary.max_activation[i]),
        "mean_activation": float(summary.total[i] / count) if count else 0.0, "dead": count == 0,
        "examples": [{"window": int(w), "position": int(p), "activation": a} for w, p, a in examples],
        "top_tokens": _top_tokens(tokens, text) if tokens else [],
        "histogram": _sparse_hist(summary.hist[i]), "page": None}


def _sparse_hist(counts: np.ndarray) -> dict[str, Any]:
    """Counts from the first to the last non-empty bin (``first`` = its index into the edges)."""
    nz = np.flatnonzero(counts)
    if not len(nz):
        return {"first": 0, "counts": []}
    return {"first": int(nz[0]), "counts": [int(c) for c in counts[nz[0]:nz[-1] + 1]]}


def _context_json(ctx: Context, text: TokenText) -> dict[str, Any]:
    return {"start": ctx.start, "tokens": ctx.tokens, "text": [text(t) for t in ctx.tokens], "acts": ctx.acts}
