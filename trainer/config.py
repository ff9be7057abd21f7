"""Configurations of an SAE and of a training run; saved as ``config.json`` in every run dir.

Three small frozen dataclasses rather than one god-config: :class:`SAEConfig` (the model
and its loss), :class:`TrainConfig` (optimisation and I/O), and the loader's own
``LoaderConfig``. On the command line and in ``--config run.json`` they are one flat set of
fields (names are unique across the three); :class:`RunConfig` maps between the two.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from actcache.errors import ActcacheError
from actcache.urls import is_url, redact
from trainer.loader import NORMALIZE, LoaderConfig


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_KINDS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                       "int | None": (int, type(None))}


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check(problems: list[tuple[bool, str]]) -> None:
    """Raise the first problem found (one line that names the field and the fix)."""
    for bad, msg in problems:
        if bad:
            raise ActcacheError(msg)


def check_types(obj: Any) -> None:
    """A dataclass's fields have their annotated types (a --config JSON may hold anything)."""
    for f in fields(obj):
        v, kinds = getattr(obj, f.name), _KINDS.get(str(f.type))
        if kinds is None:  # an annotation this check does not know: the field's own validation decides
            continue
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise ActcacheError(f"{f.name}={v!r} is a {type(v).__name__}, expected {f.type}: fix it in --config "
                                "or on the command line")


def at_least(name: str, v: int, low: int) -> tuple[bool, str]:
    return v < low, f"{flag(name)} {v} must be >= {low}"


def non_negative(name: str, v: float, zero: str = "") -> tuple[bool, str]:
    note = f" ({zero})" if zero else ""
    return not (math.isfinite(v) and v >= 0), f"{flag(name)} {v} must be a finite number >= 0{note}"


def fraction(name: str, v: float) -> tuple[bool, str]:
    return not 0 <= v <= 1, f"{flag(name)} {v} must be in [0, 1]"


def absolute_store(store: str) -> str:
    """A local store path made absolute (a run dir is then usable from any folder); URLs unchanged."""
    if not store or is_url(store):
        return store
    return str(Path(store).expanduser().absolute())


def validate_loader(c: LoaderConfig) -> None:
    check_types(c)
    check([
        at_least("batch_size", c.batch_size, 1),
        (not (math.isfinite(c.shuffle_buffer_mb) and c.shuffle_buffer_mb > 0),
         f"--shuffle-buffer-mb {c.shuffle_buffer_mb} must be a positive size in MiB"),
        (c.heldout_chunks < 0, f"--heldout-chunks {c.heldout_chunks} must be >= 0"),
        (c.normalize not in NORMALIZE, f"--normalize {c.normalize!r}: use one of {', '.join(NORMALIZE)}"),
        (c.seed < 0, f"--seed {c.seed} must be >= 0"),
        (c.shards is not None and c.shards < 1, f"shards={c.shards}: use a positive number, or none (= processes)"),
    ])


@dataclass(frozen=True)
class SAEConfig:
    arch: str = "topk"
    """Architecture: baseline (ReLU + L1), topk, or dyncorr (stabilised dynamic correlation)."""
    d_in: int = 0
    """Width of the activations (filled in from the store)."""
    d_sae: int = 0
    """Number of latents; 0 = d_in (the seed's dict_size)."""
    k: int = 32
    """Active latents per token (topk)."""
    k_start: int = 128
    """k at the start of the cosine schedule (dyncorr)."""
    k_end: int = 32
    """k at the end of the cosine schedule (dyncorr)."""
    sparsity_penalty: float = 0.04
    """L1 coefficient of the baseline (the seed's run 0)."""
    lambda_max: float = 1.0
    """Final weight of the correlation penalty (dyncorr); rises as k falls (default measured: docs/results.md)."""
    beta: float = 0.01
    """EMA rate of the latent mean and second moment (dyncorr)."""
    eps: float = 1e-6
    """Diagonal damping of the latent covariance; 0 disables it (ablation)."""
    cov_dtype: str = "float32"
    """dtype of the d_sae x d_sae second-moment buffer: float32 or float64."""
    k_aux: int = 0
    """AuxK latents per token among dead ones; 0 = d_in // 2 (OpenAI's recipe)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_after_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens is dead."""
    b_dec_init: str = "mean"
    """Initial b_dec from the first batch: mean, geometric_median or zeros."""

    def resolved(self, d_in: int) -> "SAEConfig":
        """Fill width-dependent defaults and validate."""
        if d_in <= 0:
            raise ActcacheError(f"d_in {d_in}: the store's activations must have a positive width")
        c = replace(self, d_in=d_in, d_sae=self.d_sae or d_in, k_aux=self.k_aux or max(1, d_in // 2))
        c.validate()
        return c

    def validate(self) -> None:
        """Every field but ``arch`` (checked against the registry, trainer.saes.ARCHS, by
        ``resolve_config`` and ``build_sae``); the bounds that need the width (k <= d_sae) once
        ``d_in`` is filled in."""
        check_types(self)
        check([
            (self.d_in < 0, f"d_in {self.d_in} must be >= 0 (0 = the store's width)"),
            (self.d_sae < 0, f"--d-sae {self.d_sae} must be positive (or 0 = d_in)"),
            *(at_least(name, getattr(self, name), 1) for name in ("k", "k_start", "k_end", "dead_after_tokens")),
            (self.k_start < self.k_end, f"--k-start {self.k_start} < --k-end {self.k_end}: k must not grow"),
            *(non_negative(name, getattr(self, name)) for name in ("sparsity_penalty", "lambda_max", "aux_coef")),
            non_negative("eps", self.eps, "0 = no damping, the ablation"),
            (self.k_aux < 0, f"--k-aux {self.k_aux} must be >= 0 (0 = d_in // 2)"),
            (not 0 < self.beta <= 1, f"--beta {self.beta} must be in (0, 1]: the EMA rate of the latent statistics"),
            (self.cov_dtype not in ("float32", "float64"),
             f"--cov-dtype {self.cov_dtype!r}: use float32 or float64 (bf16 loses the EMA increments)"),
            (self.b_dec_init not in ("mean", "geometric_median", "zeros"),
             f"--b-dec-init {self.b_dec_init!r}: use mean, geometric_median or zeros"),
        ])
        if self.d_in == 0:
            return
        ks = {"k": self.k} if self.arch == "topk" else {"k_start": self.k_start, "k_end": self.k_end} if self.arch == "dyncorr" else {}
        check([(v > self.d_sae, f"{flag(name)} {v} must be in 1..d_sae ({self.d_sae})") for name, v in ks.items()])


@dataclass(frozen=True)
class TrainConfig:
    store: str = ""
    """Path of the activation store (actcache extract)."""
    hook: str = ""
    """Hook to train on, e.g. blocks.5.hook_resid_post; default: the store's only hook."""
    out: str = ""
    """Run directory (config, metrics, checkpoints, weights, SAELens export)."""
    n_tokens: int = 0
    """Training tokens; 0 = one pass over the store's train split."""
    epochs: int = 1
    """Passes over the train split allowed; n_tokens beyond epochs x train rows is an error."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 3e-4
    """Peak Adam learning rate."""
    lr_warmup_frac: float = 0.05
    """Fraction of steps of linear learning-rate warm-up (and the horizon offset of the k/lambda schedules)."""
    lr_min_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""
    penalty_warmup_frac: float = 0.05
    """Fraction of steps of linear warm-up of the baseline's L1 coefficient."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    max_norm_ratio: float = 0.0
    """Drop rows whose norm exceeds this multiple of the batch's median row norm (massive activations, e.g. 10); 0 = keep all."""
    seed: int = 0
    """Seed of initialisation and data order."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    log_every: int = 10
    """Steps between metrics.jsonl records."""
    checkpoint_every: int = 200
    """Steps between checkpoints (one is always written at the end)."""
    max_nonfinite_in_row: int = 5
    """Non-finite steps in a row before rolling back to the last checkpoint with half the lr."""

    def validate(self) -> None:
        """Every field that needs no store (the store, hook and out are checked when opened)."""
        check_types(self)
        check([
            (self.n_tokens < 0, f"--n-tokens {self.n_tokens} must be positive (or 0 = one pass over the train split)"),
            *(at_least(name, getattr(self, name), 1)
              for name in ("epochs", "batch_size", "log_every", "checkpoint_every", "max_nonfinite_in_row")),
            (not (math.isfinite(self.lr) and self.lr > 0), f"--lr {self.lr} must be a positive finite number (e.g. 3e-4)"),
            *(fraction(name, getattr(self, name)) for name in ("lr_warmup_frac", "lr_min_ratio", "penalty_warmup_frac")),
            non_negative("grad_clip", self.grad_clip, "0 = off"),
            (not (self.max_norm_ratio == 0 or (math.isfinite(self.max_norm_ratio) and self.max_norm_ratio > 1)),
             f"--max-norm-ratio {self.max_norm_ratio} must be 0 (off) or a finite multiple > 1 of the median norm (e.g. 10)"),
            (self.seed < 0, f"--seed {self.seed} must be >= 0"),
            (not _DEVICE.fullmatch(self.device), f"--device {self.device!r}: use auto, cpu, cuda or cuda:N"),
        ])


@dataclass(frozen=True)
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    _SHARED = ("batch_size", "seed")  # train fields the loader mirrors

    @classmethod
    def from_flat(cls, d: dict[str, Any]) -> "RunConfig":
        parts: dict[str, dict[str, Any]] = {"train": {}, "sae": {}, "loader": {}}
        owners = {f.name: part for part, klass in (("loader", LoaderConfig), ("sae", SAEConfig), ("train", TrainConfig))
                  for f in fields(klass)}
        unknown = sorted(k for k in d if k not in owners)
        if unknown:
            raise ActcacheError(f"unknown config keys {', '.join(unknown)}: see `sae train --help` for the fields")
        for k, v in d.items():
            parts[owners[k]][k] = v
        train = TrainConfig(**parts["train"])
        loader = LoaderConfig(**{**parts["loader"], **{k: getattr(train, k) for k in cls._SHARED}})
        cfg = cls(train=replace(train, store=absolute_store(train.store)), sae=SAEConfig(**parts["sae"]), loader=loader)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every field of the three parts, before anything is read or written; ActcacheError names the first bad one."""
        self.train.validate()
        self.sae.validate()
        validate_loader(self.loader)

    def to_flat(self) -> dict[str, Any]:
        """Every field, flat, as written to ``config.json``: a store URL without its secrets."""
        flat = {**asdict(self.loader), **asdict(self.sae), **asdict(self.train)}
        flat["store"] = redact(flat["store"])
        return flat

    @staticmethod
    def parse_value(name: str, text: str) -> Any:
        """A flat field's value from command-line text (``--sweep d_sae=2304,16384``), typed like its default."""
        defaults = {**asdict(LoaderConfig()), **asdict(SAEConfig()), **asdict(TrainConfig())}
        if name not in defaults:
            raise ActcacheError(f"unknown field {name!r}: see `sae train --help` for the fields")
        kind = type(defaults[name]) if defaults[name] is not None else int  # None: an optional int (shards)
        if defaults[name] is None and text.lower() == "none":
            return None
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                return text.lower() in ("true", "1")
            return kind(text)
        except ValueError:
            raise ActcacheError(f"{name}={text!r}: expected {kind.__name__}") from None
