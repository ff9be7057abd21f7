"""One loading path for every model actcache runs.

A model argument may be an ``embedded:`` name (``actcache.embedded.EMBEDDED_MODELS``), a local
transformers dir (``config.json``), a local ``.gguf`` file (or a dir holding one, or a dir plus
``gguf_file=``), or a hub id.
GGUF checkpoints are dequantized and converted to a safetensors dir under the actcache
cache once, so every later load is a plain, fast ``from_pretrained`` of that dir.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from actcache import embedded
from actcache.device import resolve_device
from actcache.errors import ActcacheError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Soft-capped attention logits are only implemented by the eager attention path.
_EAGER_MODEL_TYPES = frozenset({"gemma2"})
# Keys that name where or with what a config was loaded, not what the model is; leaving them
# out keeps the hash stable across cache dirs, load dtypes and transformers releases.
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "_commit_hash", "transformers_version", "dtype",
                                   "torch_dtype", "_attn_implementation", "_attn_implementation_autoset"})
_MODEL_HINT = "pass a transformers model dir, a .gguf file (or its dir with --gguf-file), or a hub id"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with what is needed to record where it came from."""

    model: PreTrainedModel  # eval(), requires_grad off, on device, in dtype
    tokenizer: PreTrainedTokenizerBase
    model_id: str  # what the user passed
    resolved_path: str  # local dir actually loaded (or hub id)
    revision: str | None  # hub commit hash when known
    config_hash: str  # sha256 of the config as sorted JSON, volatile keys left out
    tokenizer_id: str
    gguf_file: str | None = None  # the .gguf the weights were converted from (its name or --gguf-file)


@dataclass(frozen=True)
class _Source:
    kind: str  # "dir" (local transformers dir), "gguf" (local .gguf file) or "hub"
    location: str


# --- where a model argument points ------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """True for arguments that can only be paths; hub ids are ``name`` or ``org/name``."""
    return (
        model.startswith((".", "/", "~"))
        or (os.sep != "/" and os.sep in model)
        or model.count("/") > 1
        or model.lower().endswith(".gguf")
    )


def _gguf_in_dir(path: Path, model: str) -> _Source:
    found = sorted(path.glob("*.gguf"))
    if len(found) == 1:
        return _Source("gguf", str(found[0]))
    if not found:
        raise ActcacheError(f"model dir {model} has neither config.json nor a .gguf file: {_MODEL_HINT}")
    names = ", ".join(p.name for p in found)
    raise ActcacheError(f"model dir {model} holds several .gguf files ({names}): pick one with --gguf-file")


def _embedded_gguf(model: str, gguf_file: str | None) -> _Source | None:
    """The GGUF itself for a GGUF-backed embedded model, so that reading only the config never
    triggers the conversion. A store records that file's name, and loads it back with it."""
    path = embedded.embedded_gguf_path(model)
    if path is None:
        return None
    if gguf_file not in (None, path.name):
        raise ActcacheError(f"{model} is the single file {path.name}: drop --gguf-file {gguf_file}")
    return _Source("gguf", str(path))


def _resolve_source(model: str, gguf_file: str | None) -> _Source:
    gguf = _embedded_gguf(model, gguf_file)
    if gguf is not None:
        return gguf
    local = embedded.resolve_embedded(model) if model.startswith("embedded:") else None
    path = local if local is not None else Path(model).expanduser()
    if gguf_file is not None:
        return _resolve_gguf_file(model, path, gguf_file)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _Source("gguf", str(path))
        raise ActcacheError(f"model path {model} is a file but not a .gguf: {_MODEL_HINT}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return _Source("dir", str(path))
        return _gguf_in_dir(path, model)
    if _looks_like_path(model):
        raise ActcacheError(f"model path {model} does not exist: {_MODEL_HINT}")
    return _Source("hub", model)


def _resolve_gguf_file(model: str, path: Path, gguf_file: str) -> _Source:
    if path.is_file() and gguf_file == path.name:  # a store's record of a model given as its .gguf
        return _Source("gguf", str(path))
    candidate = Path(gguf_file).expanduser()
    if not candidate.is_absolute():
        if not path.is_dir():
            raise ActcacheError(
                f"--gguf-file {gguf_file} needs the model argument to be the dir holding it, "
                f"but {model} is not a local dir: pass that dir as the model"
            )
        candidate = path / candidate
    if not candidate.is_file():
        raise ActcacheError(f"GGUF file {candidate} does not exist: check --gguf-file and the model dir")
    return _Source("gguf", str(candidate))


# --- configs -------------------------------------------------------------------------------------


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _hub_error(model: str, err: Exception) -> ActcacheError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ActcacheError(
        f"could not load model {model}: not a local dir and the hub is unreachable or has no such "
        f"model ({first_line}): {_MODEL_HINT}"
    )


def _auto_config(model: str, source: _Source, **kwargs: Any) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=False, **kwargs)
    except OSError as err:
        if source.kind == "hub":
            raise _hub_error(model, err) from err
        raise ActcacheError(f"could not read the config of model {model} ({err}): {_MODEL_HINT}") from err
    except ValueError as err:  # unknown model_type, malformed config.json, ...
        raise ActcacheError(
            f"model {model} has a config this transformers cannot use ({err}): "
            "upgrade transformers or pass a supported model"
        ) from err


def resolve_model_config(model: str, gguf_file: str | None = None) -> PretrainedConfig:
    """The config of ``model`` without loading weights (a GGUF not yet converted is only read)."""
    source = _resolve_source(model, gguf_file)
    if source.kind == "gguf":
        converted = embedded.converted_gguf_dir(Path(source.location))
        if converted.is_dir():
            return _auto_config(model, _Source("dir", str(converted)))
        path = Path(source.location)
        return _auto_config(model, _Source("dir", str(path.parent)), gguf_file=path.name)
    return _auto_config(model, source)


def config_hash(config: PretrainedConfig) -> str:
    """sha256 of the config as sorted JSON, without the keys that only say how it was loaded."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _int_field(config: PretrainedConfig, keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ActcacheError(f"config of {config.model_type} names no {what}: pass a decoder-only causal LM")


def n_layers(config: PretrainedConfig) -> int:
    """Number of transformer blocks."""
    return _int_field(config, ("num_hidden_layers", "n_layer", "num_layers"), "layer count")


def d_model(config: PretrainedConfig) -> int:
    """Width of the residual stream."""
    return _int_field(config, ("hidden_size", "n_embd", "d_model"), "hidden size")


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks, whatever the architecture calls it."""
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        candidates.append(getattr(get_decoder(), "layers", None))
    candidates.append(getattr(getattr(model, "model", None), "layers", None))
    for layers in candidates:
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    # e.g. GPT-2's transformer.h: the one ModuleList as long as the layer count.
    count = n_layers(model.config)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ActcacheError(
        f"cannot find the transformer blocks of {type(model).__name__}: pass a decoder-only causal LM"
    )


# --- loading -------------------------------------------------------------------------------------


def _check_causal_lm(model: str, config: PretrainedConfig) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ActcacheError(
            f"model {model} ({config.model_type}) is not a causal language model: pass a decoder-only LM"
        )


def _weights_kwargs(source: _Source, config: PretrainedConfig, dtype: torch.dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"config": config, "trust_remote_code": False, **dtype_kwarg(dtype)}
    if config.model_type in _EAGER_MODEL_TYPES:
        kwargs["attn_implementation"] = "eager"
    if source.kind == "dir" and any(Path(source.location).glob("*.safetensors")):
        kwargs["use_safetensors"] = True  # never unpickle a .bin when safetensors are there
    return kwargs


def _check_keep_layers(config: PretrainedConfig, keep_layers: int) -> None:
    total = n_layers(config)
    if not 1 <= keep_layers <= total:
        raise ActcacheError(
            f"keep_layers={keep_layers} is out of range: the model has {total} layers, "
            f"so ask for a layer between 0 and {total - 1}"
        )


def truncated_config(config: PretrainedConfig, keep_layers: int) -> PretrainedConfig:
    """A copy of ``config`` describing only the first ``keep_layers`` blocks.

    ``from_pretrained`` with it builds (and reads from the safetensors) only those blocks, so
    extracting at Gemma-2-2B's layer 5 never holds the other 20 blocks, not even briefly.
    """
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = keep_layers  # attribute_map covers n_layer / num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:keep_layers]
    return cfg


def _restore_depth(model: PreTrainedModel, full: PretrainedConfig) -> None:
    """Give the loaded model its full config back (one object, shared by every submodule).

    Callers read the model's real depth from it and the config hash must not depend on the
    truncation; HF forwards slice ``layers[:num_hidden_layers]``, which is safe on a shorter list.
    ``output_hidden_states`` of a truncated model returns ``keep_layers + 1`` states, the last
    one final-normed, so read block outputs with forward hooks instead.
    """
    model.config.num_hidden_layers = full.num_hidden_layers
    if getattr(full, "layer_types", None):
        model.config.layer_types = list(full.layer_types)


def _truncate(model: PreTrainedModel, keep_layers: int) -> None:
    """Drop every block after the first ``keep_layers`` (for architectures whose block count
    does not follow ``num_hidden_layers``)."""
    _check_keep_layers(model.config, keep_layers)
    del decoder_layers(model)[keep_layers:]


@contextlib.contextmanager
def _quiet_unused_weights():
    """The blocks left out are reported as UNEXPECTED keys by transformers: expected here."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_model(
    model: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    keep_layers: int | None = None,
) -> LoadedModel:
    """Load ``model`` for inference: eval mode, no grads, on ``device`` in ``dtype``.

    ``keep_layers`` loads only the first ``keep_layers`` blocks (see :func:`truncated_config`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _resolve_source(model, gguf_file)
    # As given when given (it may be a path below the model dir), so loading it back resolves alike.
    converted_from = (gguf_file or Path(source.location).name) if source.kind == "gguf" else None
    if source.kind == "gguf":
        source = _Source("dir", str(embedded.convert_gguf(Path(source.location))))
    config = _auto_config(model, source)
    _check_causal_lm(model, config)
    load_config, quiet = config, contextlib.nullcontext()
    if keep_layers is not None:
        _check_keep_layers(config, keep_layers)
        load_config, quiet = truncated_config(config, keep_layers), _quiet_unused_weights()
    try:
        with quiet:
            lm = AutoModelForCausalLM.from_pretrained(source.location, **_weights_kwargs(source, load_config, dtype))
        tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=False)
    except OSError as err:
        if source.kind == "hub":
            raise _hub_error(model, err) from err
        raise ActcacheError(f"could not load model {model} from {source.location} ({err}): {_MODEL_HINT}") from err
    if keep_layers is not None:
        _restore_depth(lm, config)
        if len(decoder_layers(lm)) > keep_layers:
            _truncate(lm, keep_layers)
    lm = lm.to(resolve_device(str(device)))
    lm.eval()
    lm.requires_grad_(False)
    return LoadedModel(
        model=lm,
        tokenizer=tokenizer,
        model_id=model,
        resolved_path=source.location,
        revision=getattr(lm.config, "_commit_hash", None),
        config_hash=config_hash(lm.config),
        tokenizer_id=str(tokenizer.name_or_path),
        gguf_file=converted_from,
    )
