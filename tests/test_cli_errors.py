"""Bad input: a one-line error, exit != 0, no traceback, and nothing already written lost."""

import json
import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actcache import store as S
from actcache.cli import app

runner = CliRunner()
BASE = ["extract", "--model", "embedded:tiny-gemma2", "--hooks", "blocks.1.hook_resid_post",
        "--context-size", "32", "--n-tokens", "128", "--chunk-rows", "64", "--device", "cpu", "--quiet"]


def _run(*args: str):
    return runner.invoke(app, list(args))


def _assert_user_error(result, *needles: str) -> None:
    out = result.output.strip()
    assert result.exit_code not in (0, None), out
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("error:")
    for n in needles:
        assert n in out, out


def _snapshot(path: Path) -> dict:
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_missing_model_path(tmp_path):
    r = _run(*BASE[:1], "--model", str(tmp_path / "nope"), *BASE[3:], "--out", str(tmp_path / "s.zarr"))
    _assert_user_error(r, "does not exist")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("hook,needle", [("blocks.1.hook_attn_out", "unknown hook"),
                                         ("blocks.9.hook_resid_post", "out of range")])
def test_bad_hooks(tmp_path, tiny_model_dir, hook, needle):
    args = list(BASE)
    args[args.index("--hooks") + 1] = hook
    _assert_user_error(_run(*args, "--out", str(tmp_path / "s.zarr")), needle)


def test_empty_corpus(tmp_path, tiny_model_dir):
    (tmp_path / "empty.txt").write_text("\n\n")
    r = _run(*BASE, "--dataset", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "s.zarr"))
    _assert_user_error(r, "empty")


def test_corpus_shorter_than_one_window(tmp_path, tiny_model_dir):
    (tmp_path / "short.txt").write_text("just a few words")
    r = _run(*BASE, "--dataset", str(tmp_path / "short.txt"), "--out", str(tmp_path / "s.zarr"))
    _assert_user_error(r, "shorter than one window")


def test_jsonl_text_field_missing(tmp_path, tiny_model_dir):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello there " * 50}) + "\n")
    r = _run(*BASE, "--dataset", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "s.zarr"))
    _assert_user_error(r, "--text-field")


def test_existing_store_is_kept_without_resume_or_overwrite(tmp_path, small_store):
    before = _snapshot(small_store)
    _assert_user_error(_run(*BASE, "--out", str(small_store)), "--resume", "--overwrite")
    assert _snapshot(small_store) == before


def test_resume_with_other_parameters_is_refused_and_store_kept(tmp_path, small_store):
    before = _snapshot(small_store)
    _assert_user_error(_run(*BASE, "--out", str(small_store), "--resume"), "cannot resume")
    assert _snapshot(small_store) == before


def test_overwrite_refuses_a_directory_that_is_not_a_store(tmp_path, tiny_model_dir):
    d = tmp_path / "mydata"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    _assert_user_error(_run(*BASE, "--out", str(d), "--overwrite"), "not an actcache store")
    assert (d / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output(tmp_path, tiny_model_dir, where):
    if where == "under_a_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "s.zarr"
    else:
        out = Path("/proc/actcache-test.zarr")
    _assert_user_error(_run(*BASE, "--out", str(out)), "writable")


def test_second_extract_on_a_locked_store_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "s.zarr"
    out.mkdir()
    # A lock held by a live process on this host (this test process stands in for it).
    (out / S.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    _assert_user_error(_run(*BASE, "--out", str(out)), "being written by another extract")
    assert (out / S.LOCK_FILE).exists() and not (out / "zarr.json").exists()


@pytest.mark.parametrize("opt,val,needle", [("--dtype", "int8", "unknown dtype"), ("--codec", "gzip", "unknown codec"),
                                            ("--batch-size", "0", "--batch-size"), ("--device", "tpu", "device")])
def test_bad_options(tmp_path, opt, val, needle):
    _assert_user_error(_run(*BASE, opt, val, "--out", str(tmp_path / "s.zarr")), needle)


def test_info_and_verify_on_a_missing_store(tmp_path):
    _assert_user_error(_run("info", str(tmp_path / "none.zarr")), "not a store")
    _assert_user_error(_run("verify", str(tmp_path / "none.zarr")), "not a store")


def test_float16_overflow_is_a_clear_error(tmp_path, tiny_model_dir):
    """Activations beyond float16's range: a one-line error naming the hook and the fix, never
    inf in the store; the same command with bfloat16 (whose range is float32's) then succeeds."""
    import shutil

    import torch
    from transformers import Gemma2ForCausalLM

    big = tmp_path / "big-embeddings"
    shutil.copytree(tiny_model_dir, big)
    m = Gemma2ForCausalLM.from_pretrained(big).float()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(1e7)  # the residual stream then holds ~1e6-1e7
    m.save_pretrained(big)
    args = list(BASE)
    args[args.index("--model") + 1] = str(big)
    out = tmp_path / "s.zarr"
    _assert_user_error(_run(*args, "--dtype", "float16", "--out", str(out)),
                       "blocks.1.hook_resid_post", "float16", "--dtype bfloat16")
    r = _run(*args, "--dtype", "bfloat16", "--out", str(out), "--overwrite")
    assert r.exit_code == 0, r.output
    st = S.open_store(out)
    x = st.read_chunk("blocks.1.hook_resid_post", 0).float()
    assert bool(torch.isfinite(x).all()) and float(x.abs().max()) > 65504
