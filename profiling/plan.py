"""From ``sae profile-memory`` options to the rows of the report: parsing, validation, estimates.

Every user mistake is an :class:`ActcacheError` with a one-line message naming the fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from actcache.errors import ActcacheError
from profiling.extract_side import ExtractEstimate, ExtractSpec, ModelShape
from profiling.measure import Measurement
from profiling.cov_cost import CovarianceCost
from profiling.model import ARCH_NAMES, DTYPES, TrainEstimate, TrainSpec
from trainer.config import RunConfig

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``80GB`` (10^9), ``80GiB`` or ``80G`` (2^30), ``512MiB``, ``1.5TB``, or plain bytes."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ActcacheError(f"--budget {text!r} is not a size: use e.g. 80GB, 80GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ActcacheError(f"{option} {text!r}: give comma-separated integers, e.g. 2304,16384") from None
    if not values:
        raise ActcacheError(f"{option} is empty: give at least one value")
    bad = [v for v in values if v <= 0]
    if bad:
        raise ActcacheError(f"{option} {bad[0]} must be > 0")
    return values


def parse_choices(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v not in allowed:
            what = "arch" if option == "--arch" else "dtype"
            raise ActcacheError(f"unknown {what} {v!r}: use one of {', '.join(allowed)}")
    if not values:
        raise ActcacheError(f"{option} is empty: use one of {', '.join(allowed)}")
    return values


def load_flat(config: Path | None, run: Path | None) -> dict[str, Any] | None:
    """The flat RunConfig fields of ``--config FILE`` or ``--run RUN_DIR`` (its config.json)."""
    if config is not None and run is not None:
        raise ActcacheError("--config and --run exclude each other: pick one")
    path = run / "config.json" if run is not None else config
    if path is None:
        return None
    try:
        flat = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        what = f"--run {run}: no readable config.json" if run is not None else f"cannot read --config {config}"
        raise ActcacheError(f"{what} ({e})") from None
    if not isinstance(flat, dict):
        raise ActcacheError(f"{path} must hold a JSON object of `sae train` fields")
    RunConfig.from_flat(flat)  # unknown keys -> one-line error
    return flat


def store_shape(store: str, heldout_chunks: int, hook: str = "", memmap: bool = True) -> tuple[int, int, int, int] | None:
    """(d_model, chunk_rows, training chunks, bytes per value of a chunk zarr decodes: 0 when
    the loader memory-maps the chunks) of the store a run config names, if it opens."""
    if not store:
        return None
    try:
        from actcache.dtypes import storage_dtype
        from actcache.store import open_store
        from trainer.decode import ChunkReader

        s = open_store(store)
        mapped = ChunkReader(s, hook or s.hooks[0], memmap).uses_memmap
        decode = 0 if mapped else storage_dtype(s.logical_dtype).itemsize
        return s.d_model, s.layout.chunk_rows, max(1, s.n_chunks - heldout_chunks), decode
    except Exception:  # a store elsewhere (another machine): fall back to the options
        return None


def store_extraction(store: str) -> dict[str, Any] | None:
    """The extraction that wrote the store a run config names (its model, deepest hooked block,
    context size and storage dtype), as ``profile-memory`` options, if the store opens."""
    if not store:
        return None
    try:
        from actcache.hooks import deepest_block, parse_hooks
        from actcache.models import resolve_model_config
        from actcache.store import open_store

        s = open_store(store)
        resolve_model_config(s.attrs["model"]["id"])  # a model this machine can read the config of
        return {"extract_model": s.attrs["model"]["id"], "hook_layer": max(0, deepest_block(parse_hooks(s.hooks))),
                "context_size": s.layout.context_size, "extract_dtype": s.logical_dtype}
    except Exception:  # a store elsewhere (another machine): keep the options
        return None


@dataclass(frozen=True)
class TrainRow:
    spec: TrainSpec
    flat: dict[str, Any]  # the resolved RunConfig, flat, for the measurement child
    estimate: TrainEstimate
    cost: CovarianceCost | None
    fits: bool
    measured: Measurement = field(default_factory=lambda: Measurement(None, note="not measured (--no-measure)"))
    need: int = 0  # what the device must have: the total, on CUDA + what max_memory_allocated does not count
    compared: int = 0  # the prediction a measurement is held to when it is not step_total (a CUDA step traced on CPU)

    @property
    def ratio(self) -> float | None:
        m = self.measured.peak_bytes
        return (self.compared or self.estimate.step_total) / m if m else None


@dataclass(frozen=True)
class LargestRow:
    """The largest d_sae whose CUDA step fits each card (and the budget), for one arch."""

    arch: str
    batch_size: int
    dtype: str
    d_sae: dict[str, int]  # card (or "budget") -> largest d_sae, multiple of 1024
    cov_share: dict[str, float]  # the covariance buffer's share of the total at that d_sae


@dataclass(frozen=True)
class ExtractRow:
    spec: ExtractSpec
    shape: ModelShape
    estimate: ExtractEstimate
    fits: bool
    n_windows: int  # windows a measurement runs
    comparable: int  # predicted bytes of what the measurement runs
    measured: Measurement = field(default_factory=lambda: Measurement(None, note="not measured (--no-measure)"))

    @property
    def ratio(self) -> float | None:
        m = self.measured.peak_bytes
        return self.comparable / m if m else None


@dataclass(frozen=True)
class TrainOptions:
    d_in: int
    d_sae: list[int]
    batch_size: list[int]
    arch: list[str]
    dtype: list[str]
    fields: dict[str, Any]  # further flat RunConfig fields set on the command line
    device: str
    chunk_rows: int
    train_chunks: int | None = None
    decode_bytes: int = 2  # bytes per value of the chunk zarr decodes (bf16 zstd store); 0 = memory-mapped
    dead_fraction: float = 1.0  # AuxK's dead latents, as a share of d_sae
    target: str = ""  # cpu / cuda: the device to predict for; "" = where ``device`` resolves


def train_options(opts: dict[str, Any], explicit: set[str], flat: dict[str, Any] | None) -> TrainOptions:
    """Merge ``--config``/``--run`` fields with the options given on the command line (these win)."""
    def given(name: str) -> bool:
        return flat is None or name in explicit

    base = dict(flat or {})
    d_in, chunk_rows = opts["d_in"], opts["chunk_rows"]
    shape = store_shape(base.get("store", ""), int(base.get("heldout_chunks", 1)), base.get("hook", ""),
                        bool(base.get("memmap", True))) if flat is not None else None
    if not given("d_in"):  # the store's width, else the one the run dir recorded
        d_in = shape[0] if shape else int(base.get("d_in") or d_in)
    if shape and not given("chunk_rows"):
        chunk_rows = shape[1]
    if d_in <= 0:
        raise ActcacheError(f"--d-in {d_in} must be > 0")
    if chunk_rows <= 0:
        raise ActcacheError(f"--chunk-rows {chunk_rows} must be > 0")
    d_sae = parse_ints(opts["d_sae"], "--d-sae") if given("d_sae") else [int(base.get("d_sae", 0)) or d_in]
    batch = (parse_ints(opts["batch_size"], "--batch-size") if given("batch_size")
             else [int(base.get("batch_size", 4096))])
    arch = parse_choices(opts["arch"], "--arch", ARCH_NAMES) if given("arch") else [base.get("arch", "topk")]
    parse_choices(",".join(arch), "--arch", ARCH_NAMES)
    device = opts["device"] if given("device") else base.get("device", "auto")
    fields = {k: v for k, v in base.items() if k not in ("d_sae", "batch_size", "arch", "d_in")}
    for name in ("k", "k_start", "k_end", "k_aux", "cov_dtype", "shuffle_buffer_mb", "shards"):
        if given(name):
            fields[name] = opts[name]
    fields["device"] = device
    dtype = parse_choices(opts["dtype"], "--dtype", DTYPES) if given("dtype") else None
    if fields.get("shards") is not None and fields["shards"] < 1:
        raise ActcacheError(f"--shards {fields['shards']} must be >= 1")
    if not 0.0 <= opts["dead_fraction"] <= 1.0:
        raise ActcacheError(f"--dead-fraction {opts['dead_fraction']} must be in 0..1")
    return TrainOptions(d_in, d_sae, batch, arch, dtype or [], fields, device, chunk_rows,
                        shape[2] if shape else None, shape[3] if shape else 2, opts["dead_fraction"])


def train_rows(t: TrainOptions, budget: int) -> list[TrainRow]:
    from actcache.device import resolve_device
    from profiling.cov_cost import covariance_cost
    from profiling.gpu import cuda_need
    from profiling.model import estimate_training, train_spec

    dev = t.target or resolve_device(t.device).type
    # Without --dtype: what `sae train` would run (bf16 autocast on CUDA, float32 on CPU).
    dtypes = t.dtype or ["bfloat16" if dev == "cuda" else "float32"]
    rows = []
    for arch in t.arch:
        for d_sae in t.d_sae:
            for batch in t.batch_size:
                cfg = RunConfig.from_flat({**t.fields, "arch": arch, "d_sae": d_sae, "batch_size": batch})
                cfg = replace(cfg, sae=cfg.sae.resolved(t.d_in))  # k > d_sae etc. -> one-line error
                for dtype in dtypes:
                    spec = train_spec(cfg, dtype=dtype, device=dev, chunk_rows=t.chunk_rows, train_chunks=t.train_chunks,
                                      decode_bytes=t.decode_bytes, dead_fraction=t.dead_fraction)
                    est = estimate_training(spec)
                    cost = covariance_cost(spec) if arch == "dyncorr" else None
                    need = cuda_need(est.total) if dev == "cuda" else est.total
                    rows.append(TrainRow(spec, cfg.to_flat(), est, cost, need <= budget, need=need))
    return rows


def largest_rows(rows: list[TrainRow], budget: int) -> list[LargestRow]:
    """Per arch (its first batch size and dtype among ``rows``): the largest d_sae that fits the
    planning cards (24, 40, 80 GB) and the budget."""
    from profiling.gpu import GPUS, PLAN_GPUS, largest_d_sae
    from profiling.model import estimate_training

    cards = {name: GPUS[name] for name in PLAN_GPUS}
    if budget not in cards.values():
        cards["budget"] = budget
    out, seen = [], set()
    for r in rows:
        if r.spec.arch in seen or r.spec.device != "cuda":
            continue
        seen.add(r.spec.arch)
        sizes = {name: largest_d_sae(r.spec, b) for name, b in cards.items()}
        shares = {name: estimate_training(replace(r.spec, d_sae=n, unique_pairs=None)).cov_share if n else 0.0
                  for name, n in sizes.items()}
        out.append(LargestRow(r.spec.arch, r.spec.batch_size, r.spec.effective_dtype, sizes, shares))
    return out


def extract_row(spec: ExtractSpec, budget: int, n_batches: int) -> ExtractRow:
    from profiling.extract_side import estimate_extraction, measured_part, model_config, model_shape

    for name, option in (("context_size", "--context-size"), ("batch", "--extract-batch"),
                         ("chunk_rows", "--chunk-rows"), ("queue_depth", "--queue-depth")):
        if getattr(spec, name) < 1:
            raise ActcacheError(f"{option} {getattr(spec, name)} must be >= 1")
    if spec.writer_threads < 0:
        raise ActcacheError(f"--writer-threads {spec.writer_threads} must be >= 0 (0: one per core, at most 4)")
    from profiling.gpu import cuda_need

    shape = model_shape(model_config(spec.model), spec.hook_layer)
    est = estimate_extraction(spec, shape)
    n_windows = min(max(1, est.chunk_rows // spec.context_size), n_batches * spec.batch)
    # On CUDA the writer queue is host memory: the card holds weights, activations and the cast.
    need = cuda_need(est.total - est.writer_queue) if spec.device.startswith("cuda") else est.total
    return ExtractRow(spec, shape, est, need <= budget, n_windows, measured_part(est, spec, shape, n_windows))
