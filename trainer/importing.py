"""``sae import``: a SAELens-format SAE (``cfg.json`` + ``sae_weights.safetensors``) as a run
directory that ``sae eval``, ``sae features`` and ``sae compare`` read like a trained one.

Accepted layouts: SAELens 6.x (``metadata: {hook_name, model_name, context_size, ...}`` beside the
top-level architecture, d_in, d_sae, apply_b_dec_to_input, normalize_activations) and the flat
pre-6 one (the same keys at the top level; TopK as ``architecture: standard`` with
``activation_fn_str: topk``). Architectures: ``standard`` (ReLU), ``topk``, ``jumprelu``.

SAELens semantics, kept exactly:
- ``apply_b_dec_to_input``: the encoder reads ``x - b_dec`` when true, ``x`` when false. Our SAEs
  always subtract ``b_dec``, so false is folded into the encoder bias:
  ``b_enc' = b_enc + b_dec @ W_enc`` (float64, then float32), the same pre-activations.
- ``normalize_activations``: ``none`` and ``expected_average_only_in`` apply nothing at inference
  (SAELens folds the latter's factor into the weights when training ends); ``constant_norm_rescale``
  and ``layer_norm`` rescale every token and cannot be folded into weights: refused.
- JumpReLU: ``z = ReLU(pre) * (pre > threshold)`` (trainer/saes/jumprelu.py); ``log_threshold``
  (training checkpoints) is read as ``threshold = exp(log_threshold)``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from safetensors import SafetensorError
from safetensors.torch import load_file

from actcache.cli_support import fail
from actcache.errors import ActcacheError
from actcache.store import open_store
from trainer import artifacts as A
from trainer.checkpoint import atomic_write_text
from trainer.config import RunConfig, SAEConfig, absolute_store
from trainer.export import saelens_layout, write_weights
from trainer.loader import LoaderConfig

FORMATS = ("saelens",)
IDENTITY_NORMS = ("none", "expected_average_only_in")


def _field(cfg: dict[str, Any], key: str) -> Any:
    """A key of either layout: 6.x keeps where-it-applies keys under ``metadata``."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return meta.get(key, cfg.get(key))


def read_saelens_cfg(path: Path) -> tuple[str, int | None, dict[str, Any]]:
    """``(arch, k, cfg)`` of a SAELens export directory; one-line errors for what we cannot import."""
    try:
        cfg = json.loads((path / A.SAELENS_CFG).read_text())
    except OSError as e:
        raise ActcacheError(f"cannot read {path / A.SAELENS_CFG} ({e.strerror}): pass a SAELens SAE directory "
                            f"holding {A.SAELENS_CFG} and {A.SAELENS_WEIGHTS}") from None
    except ValueError as e:
        raise ActcacheError(f"{path / A.SAELENS_CFG} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ActcacheError(f"{path / A.SAELENS_CFG} is not a SAELens config (not a JSON object)")
    arch = str(cfg.get("architecture", "standard"))
    k = None
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":  # pre-6 TopK
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k")
    elif arch == "topk":
        k = cfg.get("k")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise ActcacheError(f"{path}: TopK with rescale_acts_by_decoder_norm is not supported: fold the decoder "
                                "norms into the weights with SAELens first")
    elif arch not in ("standard", "jumprelu"):
        raise ActcacheError(f"{path}: architecture {arch!r} is not supported: sae import reads standard, topk and jumprelu")
    if arch == "topk" and not k:
        raise ActcacheError(f"{path / A.SAELENS_CFG}: a TopK SAE without k: add \"k\" to it")
    norm = str(cfg.get("normalize_activations") or "none")
    if norm not in IDENTITY_NORMS:
        raise ActcacheError(f"{path}: normalize_activations={norm!r} rescales each token at run time and cannot be "
                            f"folded into weights: only {', '.join(IDENTITY_NORMS)} can be imported")
    if _field(cfg, "hook_head_index") is not None:
        raise ActcacheError(f"{path}: SAEs on one attention head (hook_head_index) are not supported")
    return arch, int(k) if k else None, cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / A.SAELENS_WEIGHTS)
    except (OSError, SafetensorError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ActcacheError(f"cannot read {path / A.SAELENS_WEIGHTS} ({why}): pass a SAELens SAE directory") from None


def saelens_weights(tensors: dict[str, torch.Tensor], cfg: dict[str, Any], arch: str, where: Path) -> dict[str, torch.Tensor]:
    """Our SAELens-layout float32 weights (``W_enc [d_in, d_sae]``) with SAELens's semantics folded in."""
    d_in, d_sae = int(cfg.get("d_in", 0)), int(cfg.get("d_sae", 0))
    t = dict(tensors)
    if arch == "jumprelu" and "threshold" not in t and "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").double().exp()
    names = ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if arch == "jumprelu" else ())
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for n in names:
        if n not in t:
            raise ActcacheError(f"{where / A.SAELENS_WEIGHTS} has no {n}: it is not a {arch} SAE in SAELens layout")
        if tuple(t[n].shape) != shapes[n]:
            raise ActcacheError(f"{where / A.SAELENS_WEIGHTS}: {n} has shape {tuple(t[n].shape)}, cfg.json says "
                                f"{shapes[n]} (d_in {d_in}, d_sae {d_sae})")
        if not torch.isfinite(t[n]).all():
            raise ActcacheError(f"{where / A.SAELENS_WEIGHTS}: {n} holds NaN or inf: the SAE is damaged")
    out = {n: t[n].float().contiguous() for n in names}
    if cfg.get("apply_b_dec_to_input", True) is False:
        # SAELens encodes x, ours x - b_dec: the same pre-activations with this encoder bias.
        out["b_enc"] = (t["b_enc"].double() + t["b_dec"].double() @ t["W_enc"].double()).float()
    return out


def import_saelens(path: str | Path, *, store: str, out: str | Path, heldout_chunks: int | None = None,
                   overwrite: bool = False) -> Path:
    """Write run directory ``out`` for the SAELens SAE in ``path``, evaluated against ``store``."""
    src, root = Path(path).expanduser(), A.run_paths(out).root
    if not store:
        raise ActcacheError("no store: pass --store URL (the activations to evaluate the SAE on)")
    arch, k, cfg = read_saelens_cfg(src)
    st = open_store(store)
    hook = _field(cfg, "hook_name")
    if not hook:
        raise ActcacheError(f"{src / A.SAELENS_CFG} names no hook_name: add it (e.g. blocks.5.hook_resid_post)")
    if hook not in st.hooks:
        raise ActcacheError(f"the SAE reads {hook} but store {st.path} holds {', '.join(st.hooks)}: "
                            f"extract {hook} (actcache extract --hooks {hook}) or pass another store")
    d_in = int(cfg.get("d_in", 0))
    if d_in != st.d_model:
        raise ActcacheError(f"the SAE reads width d_in={d_in} but store {st.path} has {st.d_model}: "
                            "pass a store of the model the SAE was trained on")
    weights = saelens_weights(_read_tensors(src), cfg, arch, src)
    our_arch = {"standard": "baseline"}.get(arch, arch)
    sae_cfg = SAEConfig(arch=our_arch, d_in=d_in, d_sae=int(cfg["d_sae"]), k=k or SAEConfig().k)
    loader = {"heldout_chunks": heldout_chunks} if heldout_chunks is not None else {}
    flat = {**RunConfig.from_flat({"store": absolute_store(store), "hook": hook, "out": str(root), **loader}).to_flat(),
            **{f: getattr(sae_cfg, f) for f in ("arch", "d_in", "d_sae", "k")}}
    lens_cfg = saelens_layout({key: v for key, v in cfg.items() if key != "metadata"}
                              | {"metadata": {**(cfg.get("metadata") or {}), "hook_name": hook,
                                              "model_name": _field(cfg, "model_name"), "scaling_factor_folded": 1.0,
                                              "imported_from": str(src.resolve())}})
    if cfg.get("apply_b_dec_to_input", True) is False:
        lens_cfg["apply_b_dec_to_input"] = True  # folded into b_enc above
    _prepare(root, overwrite)
    try:
        atomic_write_text(root / A.CONFIG, json.dumps(flat, indent=2))
        write_weights(root / A.WEIGHTS, weights, {"sae": asdict(sae_cfg), "saelens_cfg": lens_cfg})
        # sae compare needs a metrics record; this one says that no training happened here.
        atomic_write_text(root / A.METRICS, json.dumps({"step": 0, "tokens": 0, "imported_from": str(src)}) + "\n")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def _prepare(root: Path, overwrite: bool) -> None:
    if root.exists() and any(root.iterdir()):
        if not (root / A.CONFIG).exists():
            raise ActcacheError(f"--out {root} exists and is not a run directory: choose a new path")
        if not overwrite:
            raise ActcacheError(f"{root} holds a run: pass --overwrite to replace it, or choose a new --out")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


def import_sae(
    path: Annotated[Path, typer.Argument(help="SAE directory (SAELens: cfg.json + sae_weights.safetensors).")],
    store: Annotated[str, typer.Option(help="Store of the SAE's model and hook, to evaluate it on.")] = "",
    out: Annotated[Optional[Path], typer.Option(help="Run directory to write.")] = None,
    format: Annotated[str, typer.Option(help=f"Input format: {', '.join(FORMATS)}.")] = "saelens",
    heldout_chunks: Annotated[int, typer.Option(help="Last store chunks forming the heldout split (as sae train).")] = LoaderConfig().heldout_chunks,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Import an SAE trained elsewhere (SAELens standard / topk / jumprelu) as a run directory that
    sae eval, sae features and sae compare accept."""
    try:
        if format not in FORMATS:
            raise ActcacheError(f"unknown format {format!r}: use {', '.join(FORMATS)}")
        if out is None:
            raise ActcacheError("no run directory: pass --out RUN_DIR")
        root = import_saelens(path, store=store, out=out, heldout_chunks=heldout_chunks, overwrite=overwrite)
    except ActcacheError as e:
        fail(str(e))
    typer.echo(str(root))


def register(app: typer.Typer) -> None:
    app.command("import")(import_sae)
