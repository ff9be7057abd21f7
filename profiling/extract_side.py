"""Memory of ``actcache extract`` for one model: weights kept, activations per batch, writer queue.

Weights are counted on the meta device (no download, no allocation) for the layers
``load_model(keep_layers=L + 1)`` keeps: embedding, blocks 0..L, final norm (and an untied
``lm_head``). ``load_model`` builds only those blocks (``actcache.models.truncated_config``), so
the deep blocks are never materialised.

Activations (inference mode, one batch of ``batch x context`` tokens, ``t`` tokens, compute
dtype ``w`` bytes): residual stream, block input and normed input (3 t d w), the causal and
sliding-window masks (eager attention), then the larger of the MLP (activation, up and their
product: 3 t I w) and attention (q, repeated k/v, 2 score matrices, fp32 softmax). The chunk
being filled, ``queue_depth`` queued and one being written by each writer thread:
``queue_depth + writer_threads + 1`` chunks of ``chunk_rows x d_model`` in the storage dtype
(``actcache.runner``), plus, per writer thread, the float32 chunk its statistics are computed from
(reused across chunks; none for a float32 store).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

from actcache import models
from actcache.errors import ActcacheError
from actcache.runner import default_writer_threads

PRESETS = ("gemma-2-2b",)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ExtractSpec:
    model: str = "gemma-2-2b"  # a preset, a model dir / .gguf, or a hub id
    hook_layer: int = 5
    context_size: int = 128
    batch: int = 8  # windows per forward pass
    chunk_rows: int = 4096
    queue_depth: int = 2
    writer_threads: int = 0  # 0: actcache's default (one per core, at most 4)
    dtype: str = "bfloat16"  # storage dtype
    compute_dtype: str = "auto"
    device: str = "cpu"


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    n_layers: int
    d_model: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    eager: bool  # eager attention (gemma2): the score matrices are materialised
    kept_params: int
    full_params: int


@dataclass(frozen=True)
class ExtractEstimate:
    compute_dtype: str
    chunk_rows: int  # rows per chunk (whole windows)
    weights: int
    activations: int
    cast: int  # a batch converted to the storage dtype
    writer_queue: int  # queue_depth + writer_threads + 1 chunks, and each thread's float32 statistics buffer
    total: int


def model_config(model: str) -> Any:
    """A PretrainedConfig: the preset (``transformers.Gemma2Config()`` defaults are Gemma-2-2B) or
    whatever actcache would load (``resolve_model_config``: dir, .gguf, embedded:, hub id)."""
    if model == "gemma-2-2b":
        from transformers import Gemma2Config

        return Gemma2Config()
    from actcache.models import resolve_model_config

    return resolve_model_config(model)


def _count_params(config: Any) -> tuple[int, int]:
    """Parameters of the model built from ``config`` on the meta device, and of its first block."""
    import torch
    from transformers import AutoModelForCausalLM

    from actcache.models import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return total, sum(p.numel() for p in decoder_layers(model)[0].parameters())


def model_shape(config: Any, hook_layer: int) -> ModelShape:
    from actcache.models import d_model, n_layers

    total = n_layers(config)
    if not 0 <= hook_layer < total:
        raise ActcacheError(f"--hook-layer {hook_layer} is out of range: the model has {total} layers (0..{total - 1})")
    d = d_model(config)
    heads = int(getattr(config, "num_attention_heads", 1))
    kept, per_layer = _count_params(models.truncated_config(config, hook_layer + 1))
    return ModelShape(model_type=config.model_type, n_layers=total, d_model=d,
                      intermediate=int(getattr(config, "intermediate_size", 4 * d)), heads=heads,
                      kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                      head_dim=int(getattr(config, "head_dim", None) or d // heads),
                      eager=config.model_type == "gemma2", kept_params=kept,
                      full_params=kept + (total - hook_layer - 1) * per_layer)


def compute_dtype(spec: ExtractSpec) -> str:
    import torch

    from actcache.device import resolve_compute_dtype, resolve_device

    # A CUDA target is planned without a GPU: its dtype choice needs no device.
    dev = torch.device(spec.device) if spec.device.startswith("cuda") else resolve_device(spec.device)
    return resolve_compute_dtype(spec.compute_dtype, spec.dtype, dev)


def activation_bytes(shape: ModelShape, batch: int, context: int, w: int) -> int:
    """Peak transient bytes of one forward pass through the kept blocks (module docstring)."""
    t, T = batch * context, context
    scores = batch * shape.heads * T * T
    base = 3 * t * shape.d_model * w + (2 * batch * T * T * w if shape.eager else 0)
    mlp = 3 * t * shape.intermediate * w
    attn = t * shape.head_dim * (3 * shape.heads + 2 * shape.kv_heads) * w
    if shape.eager:
        attn += 2 * scores * w + (scores * 4 if w != 4 else 0)
    return base + max(mlp, attn)


def estimate_extraction(spec: ExtractSpec, shape: ModelShape) -> ExtractEstimate:
    cdt = compute_dtype(spec)
    w, s = _BYTES[cdt], _BYTES[spec.dtype]
    rows = max(1, spec.chunk_rows // spec.context_size) * spec.context_size
    weights = shape.kept_params * w
    acts = activation_bytes(shape, spec.batch, spec.context_size, w)
    cast = spec.batch * spec.context_size * shape.d_model * s if cdt != spec.dtype else 0
    threads = spec.writer_threads or default_writer_threads()
    chunk = rows * shape.d_model
    queue = (spec.queue_depth + threads + 1) * chunk * s + (threads * chunk * 4 if spec.dtype != "float32" else 0)
    return ExtractEstimate(compute_dtype=cdt, chunk_rows=rows, weights=weights, activations=acts, cast=cast,
                           writer_queue=queue, total=weights + acts + cast + queue)


def measured_part(est: ExtractEstimate, spec: ExtractSpec, shape: ModelShape, n_windows: int) -> int:
    """What the measurement runs: kept weights, one forward's activations, the chunk array of
    ``n_windows`` windows being filled and the per-batch cast (no writer thread)."""
    s = _BYTES[spec.dtype]
    return est.weights + est.activations + est.cast + n_windows * spec.context_size * shape.d_model * s


# -- measurement (child side) -------------------------------------------------------------
def extract_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the kept blocks with random weights and run ``compute_chunk`` through ``ResidualCapture``."""
    import time

    import numpy as np
    from transformers import AutoModelForCausalLM

    from actcache.capture import ResidualCapture
    from actcache.device import resolve_device
    from actcache.dtypes import torch_dtype
    from actcache.hooks import HookSpec
    from actcache.models import dtype_kwarg
    from actcache.runner import compute_chunk
    from profiling.rss import current_rss, peak_rss, reset_peak_rss

    es = ExtractSpec(**spec["extract"])
    device = resolve_device(es.device)
    cfg = models.truncated_config(model_config(es.model), es.hook_layer + 1)
    kwargs = {"attn_implementation": "eager"} if cfg.model_type == "gemma2" else {}
    kwargs.update(dtype_kwarg(torch_dtype(spec["compute_dtype"])))
    hook = HookSpec(es.hook_layer, "hook_resid_post")

    def run(model: Any, windows: np.ndarray, layer: int) -> None:
        h = HookSpec(layer, "hook_resid_post")
        with ResidualCapture(model, [h]) as cap:
            compute_chunk(cap, windows, hooks=[h.name], first_position=0, batch_size=es.batch,
                          logical_dtype=es.dtype, device=device)

    # Warm-up on a tiny model of the same class: lazy imports, thread pools, kernels.
    tiny = models.truncated_config(cfg, 1)
    tiny.hidden_size, tiny.intermediate_size, tiny.vocab_size, tiny.head_dim = 64, 128, 256, 16
    run(AutoModelForCausalLM.from_config(tiny, **kwargs).to(device).eval(),
        np.zeros((es.batch, es.context_size), np.int32), 0)
    gc.collect()
    base = current_rss()
    model = AutoModelForCausalLM.from_config(cfg, **kwargs).to(device).eval()
    model.requires_grad_(False)
    gc.collect()
    reset = reset_peak_rss()  # the weights stay resident; construction's transients do not count
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.vocab_size, size=(int(spec["n_windows"]), es.context_size), dtype=np.int32)
    t0 = time.perf_counter()
    run(model, windows, hook.layer)
    n_batches = -(-len(windows) // es.batch)
    peak = peak_rss() - base
    return {"peak_bytes": int(peak), "baseline_bytes": int(base),
            "method": "VmHWM - VmRSS" if reset else "ru_maxrss - VmRSS",
            "step_s": (time.perf_counter() - t0) / n_batches}
