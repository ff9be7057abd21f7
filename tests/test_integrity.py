"""Integrity: crc32c on every chunk of every array, damage named by verify and refused by every
reader (loader, sae train, sae eval), verify --repair + extract --resume, old stores, an
--overwrite that survives a kill at any point, lock files, permissions, document counts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner
from zarr.codecs import Crc32cCodec

from actcache import store as S
from actcache import store_writer
from actcache.cli import app
from actcache.errors import ActcacheError, StoreCorruptError
from actcache.extract import extract
from actcache.inspection import store_info, verify_store
from actcache.lock import StoreLock
from conftest import small_config

runner = CliRunner()
HOOK = "blocks.1.hook_resid_post"
HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
ARRAYS = [HOOK, S.TOKENS, S.WINDOW, S.POSITION, S.WINDOWS, S.WINDOW_SOURCE, S.stats_array(HOOK, "sum"),
          S.stats_array(HOOK, "norms"), S.MANIFEST]


def flip(store: Path, name: str, chunk: int) -> Path:
    """XOR one byte in the middle of chunk ``chunk`` of array ``name`` (as a bit flip on disk would)."""
    arr = zarr.open_group(str(store), mode="r")[name]
    path = store / S.chunk_key(arr, name, chunk)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def copy(small_store, tmp_path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(small_store, dst)
    return dst


def test_every_array_carries_crc32c(small_store):
    g = zarr.open_group(str(small_store), mode="r")
    names = [*HOOKS, S.TOKENS, S.WINDOW, S.POSITION, S.WINDOWS, S.WINDOW_SOURCE, S.MANIFEST,
             *(S.stats_array(h, n) for h in HOOKS for n in S.STATS_ARRAYS)]
    for name in names:
        comp = g[name].compressors
        assert comp and isinstance(comp[-1], Crc32cCodec), (name, comp)
    assert g.attrs["format"]["version"] == S.FORMAT_VERSION >= S.CHECKSUM_SINCE


@pytest.mark.parametrize("name", ARRAYS)
def test_verify_names_array_and_chunk_of_a_flipped_byte(copy, name):
    chunk = 0 if name == S.MANIFEST else 2
    flip(copy, name, chunk)
    rep = verify_store(copy)
    assert [(f.array, f.chunk) for f in rep.findings] == [(name, chunk)], rep.problems
    assert "checksum mismatch" in rep.findings[0].text
    r = runner.invoke(app, ["verify", str(copy)])
    assert r.exit_code == 1 and f"{name} chunk {chunk}" in r.output


@pytest.mark.parametrize("name", [HOOK, S.WINDOWS, S.TOKENS])
def test_readers_refuse_a_damaged_chunk_naming_it(copy, name):
    path = flip(copy, name, 1)
    st = S.open_store(copy)
    lo, hi = (st.layout.chunk_windows(1) if name == S.WINDOWS else st.layout.chunk_rows_range(1))
    with pytest.raises(StoreCorruptError) as e:
        st.read(name, 0, st.named_array(name).shape[0])  # a read spanning every chunk names the bad one
    msg = str(e.value)
    assert f"{name} chunk 1 is corrupted (crc32c checksum mismatch)" in msg and str(path) in msg
    assert "--repair" in msg and "--resume" in msg and "\n" not in msg
    st.read(name, 0, lo)  # the chunks before it still read
    if name == HOOK:
        with pytest.raises(StoreCorruptError, match="chunk 1"):
            st.read_chunk(HOOK, 1)


@pytest.mark.parametrize("prefetch", [True, False])
def test_loader_hands_the_error_to_the_consumer_and_yields_no_damaged_rows(copy, prefetch):
    from trainer.loader import ActivationLoader, LoaderConfig

    flip(copy, HOOK, 3)
    loader = ActivationLoader(copy, HOOK, LoaderConfig(batch_size=64, heldout_chunks=0, shuffle_buffer_mb=0.001,
                                                       prefetch=prefetch, seed=0))
    good = torch.cat([S.open_store(copy).read_chunk(HOOK, c).float() for c in (0, 1, 2, 4, 5)])
    seen = []
    with pytest.raises(StoreCorruptError, match=f"{HOOK} chunk 3 is corrupted"):
        for b in loader.batches(n_batches=100):
            seen.append(b.clone())
    # Everything delivered before the error is rows of intact chunks.
    rows = {tuple(r.tolist()) for r in good}
    assert all(tuple(r.tolist()) in rows for b in seen for r in b)


def test_memory_mapped_reads_check_the_checksum_too(tmp_path, tiny_model_dir):
    from trainer.loader import ActivationLoader, LoaderConfig

    out = extract(small_config(tmp_path / "raw.zarr", codec="none", hooks=(HOOK,)))
    cfg = LoaderConfig(batch_size=128, heldout_chunks=0, shuffle_buffer_mb=0.001, seed=0)
    mm = ActivationLoader(out, HOOK, cfg)
    plain = ActivationLoader(out, HOOK, LoaderConfig(**{**cfg.__dict__, "memmap": False}))
    assert mm.uses_memmap and not plain.uses_memmap
    for a, b in zip(mm.batches(n_batches=6), plain.batches(n_batches=6)):
        assert torch.equal(a, b)
    flip(out, HOOK, 2)
    with pytest.raises(StoreCorruptError, match=f"{HOOK} chunk 2 is corrupted .crc32c checksum mismatch"):
        list(ActivationLoader(out, HOOK, cfg).batches(n_batches=6))


def _one_line_error(r, *needles):
    out = r.output.strip()
    assert r.exit_code == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    for n in needles:
        assert n in out, out


def test_sae_train_and_eval_stop_at_a_damaged_chunk(small_store, copy, tmp_path):
    from sae_cli import app as sae

    args = ["train", "--store", str(copy), "--hook", HOOK, "--arch", "topk", "--d-sae", "32", "--k", "4",
            "--batch-size", "64", "--quiet"]
    run = tmp_path / "run"
    assert runner.invoke(sae, [*args, "--store", str(small_store), "--out", str(run)]).exit_code == 0
    flip(copy, HOOK, 2)
    bad_run = tmp_path / "bad-run"
    r = runner.invoke(sae, [*args, "--out", str(bad_run)])
    _one_line_error(r, f"{HOOK} chunk 2 is corrupted", str(copy / HOOK / "c" / "2" / "0"))
    assert not (bad_run / "sae.safetensors").exists()  # nothing trained on it
    r = runner.invoke(sae, ["eval", str(run), "--store", str(copy), "--split", "all", "--no-splice"])
    _one_line_error(r, f"{HOOK} chunk 2 is corrupted")
    shutil.copytree(small_store, tmp_path / "w.zarr")
    flip(tmp_path / "w.zarr", S.WINDOWS, 5)  # the held-out windows the spliced forward reads
    r = runner.invoke(sae, ["eval", str(run), "--store", str(tmp_path / "w.zarr"), "--n-windows", "4"])
    _one_line_error(r, "windows chunk 5 is corrupted")


@pytest.mark.parametrize("target", ["zarr.json", f"{HOOK}/zarr.json"])
def test_sae_train_refuses_a_half_written_zarr_json_in_one_line(copy, tmp_path, target):
    from sae_cli import app as sae

    text = (copy / target).read_text()
    (copy / target).write_text(text[: len(text) // 3])
    with pytest.raises(StoreCorruptError, match=f"{target} is damaged"):
        S.open_store(copy).array(HOOK)
    r = runner.invoke(sae, ["train", "--store", str(copy), "--hook", HOOK, "--arch", "topk", "--d-sae", "32",
                            "--k", "4", "--batch-size", "64", "--quiet", "--out", str(tmp_path / "run")])
    _one_line_error(r, f"{target} is damaged")


def test_repair_then_resume_restores_the_identical_store(small_store, copy):
    for name, chunk in [(HOOK, 2), (S.stats_array("blocks.3.hook_resid_post", "sum"), 4), (S.MANIFEST, 5),
                        (S.TOKENS, 1), (S.POSITION, 3), (S.WINDOW_SOURCE, 0)]:
        flip(copy, name, chunk)
    r = runner.invoke(app, ["verify", str(copy), "--repair"])
    assert r.exit_code == 0, r.output
    assert "--resume" in r.output and "rewritten" in r.output
    with pytest.raises(ActcacheError, match="incomplete"):
        S.open_store(copy)  # un-committed: no reader uses it before --resume
    assert sorted(np.flatnonzero(~S.open_store(copy, require_complete=False).completed_chunks())) == [2, 4, 5]
    cfg = S.open_store(small_store).attrs["extract_config"]
    from actcache.config import ExtractConfig

    extract(ExtractConfig.from_dict({**cfg, "out": str(copy)}), resume=True)
    assert verify_store(copy).ok
    a, b = zarr.open_group(str(copy), mode="r"), zarr.open_group(str(small_store), mode="r")
    for name in ARRAYS + [*HOOKS, S.stats_array("blocks.3.hook_resid_post", "sum")]:
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert a.attrs["stats"] == b.attrs["stats"]


def test_damaged_windows_cannot_be_repaired(copy):
    flip(copy, S.WINDOWS, 1)
    before = snapshot(copy)
    r = runner.invoke(app, ["verify", str(copy), "--repair"])
    assert r.exit_code == 1 and "windows chunk 1" in r.output and "--overwrite" in r.output
    assert snapshot(copy) == before


def _without_checksums(monkeypatch) -> None:
    """Write as format 1 did: the same codec chains without crc32c, version 1."""
    monkeypatch.setattr(store_writer, "with_checksum", lambda c: tuple(c or ()))
    monkeypatch.setattr(store_writer, "_SMALL_ARRAYS", store_writer._SMALL_ARRAYS[:-1])
    monkeypatch.setattr(S, "FORMAT_VERSION", 1)


def test_format_1_stores_still_read_and_verify_says_they_have_no_checksums(tmp_path, tiny_model_dir, monkeypatch,
                                                                              small_store):
    with monkeypatch.context() as m:
        _without_checksums(m)
        old = extract(small_config(tmp_path / "v1.zarr"))
    st = S.open_store(old)
    assert st.format_version == 1 and not st.checksummed
    assert not any(isinstance(c, Crc32cCodec) for c in st.array(HOOK).compressors)
    assert torch.equal(st.read_chunk(HOOK, 1), S.open_store(small_store).read_chunk(HOOK, 1))
    r = runner.invoke(app, ["verify", str(old)])
    assert r.exit_code == 0 and "no checksums" in r.output and "ok" in r.output
    assert store_info(old)["checksums"] is None and store_info(small_store)["checksums"] == "crc32c"


def test_info_shows_compute_dtype_and_document_counts(small_store):
    d = store_info(small_store)
    assert d["compute_dtype"] == S.open_store(small_store).attrs["compute_dtype"]
    assert 0 < d["n_documents_used"] <= d["n_documents_read"]
    r = runner.invoke(app, ["info", str(small_store)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and f"computed in {d['compute_dtype']}" in r.output


def test_documents_used_counts_documents_with_a_token_in_a_window(tmp_path, tiny_loaded):
    from actcache.windows import pack_windows

    docs = [" ".join(f"word{i}x{j}" for j in range(3 + (7 * i) % 23)) for i in range(300)]
    tok = tiny_loaded.tokenizer
    for n_windows in (3, 20, None):
        w = pack_windows(iter(docs), tok, context_size=32, n_windows=n_windows, seed=0)
        # Reference: the document of every corpus token of the stream, cut where the windows end.
        owner = []
        for i, ids in enumerate(tok(docs, add_special_tokens=False)["input_ids"]):
            owner += [i] * len(ids) + [-1]
        used = {o for o in owner[: len(w.tokens) * 31] if o >= 0}
        assert w.n_documents_used == len(used)
        assert w.n_documents_read >= w.n_documents_used


# --- --overwrite survives a kill at any point ----------------------------------------------------

_KILL_MID_CHUNKS = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[2])
import actcache.extract as E
from actcache.config import ExtractConfig
from actcache.store_writer import StoreWriter

orig = StoreWriter.write_chunk
def write_chunk(self, c, acts, n=[0]):
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, c, acts)
StoreWriter.write_chunk = write_chunk
E.extract(ExtractConfig.from_dict(json.loads(sys.argv[1])), overwrite=True)
"""


class _Killed(BaseException):
    """Stands in for kill -9 at a point of the swap (the lock is released, as a dead pid's is taken over)."""


def _die(*_a, **_k):
    raise _Killed


def _swap_steps(upto: str):
    import actcache.extract as E

    def swap(staging, out):
        if upto == "after_exchange":
            assert E._exchange(staging, out)
        if upto in ("between_renames", "before_trash_removed"):
            out.rename(E._trash(out))
        if upto == "before_trash_removed":
            staging.rename(out)
        raise _Killed
    return swap


def _assert_same(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS + HOOKS:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert ga.attrs["stats"] == gb.attrs["stats"] and ga.attrs["complete"]


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory, tiny_model_dir):
    """An 'old' store (seed 8) to overwrite, and a clean extract of the 'new' config (seed 7)."""
    d = tmp_path_factory.mktemp("overwrite")
    old = extract(small_config(d / "old.zarr", seed=8))
    new = extract(small_config(d / "new.zarr"))
    return old, new


def test_overwrite_killed_9_mid_run_keeps_the_old_store_and_a_rerun_gives_the_clean_one(tmp_path, old_and_new):
    old, new = old_and_new
    out = tmp_path / "s.zarr"
    shutil.copytree(old, out)
    cfg = small_config(out)
    p = subprocess.run([sys.executable, "-c", _KILL_MID_CHUNKS, json.dumps(cfg.to_dict()),
                        str(Path(__file__).parents[1])], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert snapshot(out) == {**snapshot(old), **{S.LOCK_FILE: (out / S.LOCK_FILE).read_bytes()}}  # untouched
    extract(cfg, overwrite=True)  # the same command again: takes the dead lock over, continues the new store
    _assert_same(out, new)
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]  # no staging or old store left beside it


@pytest.mark.parametrize("point", ["before_swap", "after_exchange", "between_renames", "before_trash_removed"])
def test_overwrite_interrupted_in_the_swap_then_rerun_gives_the_clean_store(tmp_path, old_and_new, point,
                                                                           monkeypatch):
    import actcache.extract as E

    old, new = old_and_new
    out = tmp_path / "s.zarr"
    shutil.copytree(old, out)
    cfg = small_config(out)
    with monkeypatch.context() as m:
        m.setattr(E, "_swap_in", _swap_steps(point))
        with pytest.raises(_Killed):
            extract(cfg, overwrite=True)
    if point != "between_renames":  # out holds the old store or the new one, complete either way
        assert S.open_store(out).attrs["seed"] in (7, 8)
    extract(cfg, overwrite=True)  # the same command again
    _assert_same(out, new)
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]


def test_overwrite_of_a_url_store_interrupted_mid_clear_is_cleared_by_a_rerun(tmp_path, old_and_new, monkeypatch):
    import actcache.extract as E

    old, new = old_and_new
    out = tmp_path / "s.zarr"
    shutil.copytree(old, out)
    cfg = small_config(f"file://{out}")

    def clear(path):  # killed right after the old zarr.json went
        path.write_text(E.CLEARING_MARKER, "")
        path.delete("zarr.json")
        raise _Killed
    with monkeypatch.context() as m:
        m.setattr(E, "_clear_store", clear)
        with pytest.raises(_Killed):
            extract(cfg, overwrite=True)
    with pytest.raises(ActcacheError, match="replacement was interrupted: rerun with --overwrite"):
        extract(cfg)  # recognised as ours, not "exists and is not an actcache store"
    extract(cfg, overwrite=True)
    _assert_same(out, new)


# --- lock files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "{\"pid\": 12", "\x00\x01"])
def test_an_empty_or_unreadable_lock_is_taken_over_after_the_grace_period(tmp_path, content, caplog):
    (tmp_path / S.LOCK_FILE).write_text(content)
    old = time.time() - 60
    os.utime(tmp_path / S.LOCK_FILE, (old, old))
    with caplog.at_level("WARNING"), StoreLock(tmp_path, S.LOCK_FILE):
        assert json.loads((tmp_path / S.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and "empty or unreadable" in caplog.text
    assert not (tmp_path / S.LOCK_FILE).exists()


def test_a_fresh_empty_lock_is_waited_for_then_taken_over(tmp_path, monkeypatch):
    from actcache import lock

    monkeypatch.setattr(lock, "STALE_GRACE_S", 0.3)
    (tmp_path / S.LOCK_FILE).write_text("")
    t0 = time.perf_counter()
    with StoreLock(tmp_path, S.LOCK_FILE):
        pass
    assert time.perf_counter() - t0 >= 0.2


def test_a_live_lock_is_refused_and_release_never_removes_another_holders_lock(tmp_path):
    held = StoreLock(tmp_path, S.LOCK_FILE)
    held.acquire()
    with pytest.raises(ActcacheError, match="being written by another extract"):
        StoreLock(tmp_path, S.LOCK_FILE).acquire()
    other = (tmp_path / S.LOCK_FILE).read_text().replace(held._token, "someone-else")
    (tmp_path / S.LOCK_FILE).write_text(other)  # taken over meanwhile (e.g. the store was swapped)
    held.release()
    assert (tmp_path / S.LOCK_FILE).read_text() == other


def test_store_files_follow_the_umask(tmp_path, tiny_model_dir):
    mask = os.umask(0o027)
    try:
        out = extract(small_config(tmp_path / "s.zarr", n_tokens=32 * 4))
    finally:
        os.umask(mask)
    for p in [out, *out.rglob("*")]:
        want = 0o750 if p.is_dir() else 0o640
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


@pytest.mark.parametrize("where", ["first", "middle", "last-row", "padding"])
def test_memory_mapped_check_covers_every_byte(tmp_path, tiny_model_dir, where):
    """The memory-mapped path checks each chunk on the checker thread beside its copy: the rows are
    zarr's, and a flip anywhere (an edge chunk's padding included) is caught."""
    from trainer.loader import ActivationLoader, LoaderConfig

    out = extract(small_config(tmp_path / "raw.zarr", codec="none", hooks=(HOOK,), n_tokens=32 * 22))
    cfg = LoaderConfig(batch_size=64, heldout_chunks=0, shuffle_buffer_mb=0.001, seed=0)
    mm = ActivationLoader(out, HOOK, cfg)
    plain = ActivationLoader(out, HOOK, LoaderConfig(**{**cfg.__dict__, "memmap": False}))
    assert mm.uses_memmap and mm.n_rows == 704
    for a, b in zip(mm.batches(n_batches=11), plain.batches(n_batches=11), strict=True):
        assert torch.equal(a, b)
    arr = zarr.open_group(str(out), mode="r")[HOOK]
    path = out / S.chunk_key(arr, HOOK, 5)  # the edge chunk: 64 rows, stored padded to 128
    data = bytearray(path.read_bytes())
    offset = {"first": 0, "middle": len(data) // 2, "last-row": 64 * 128 - 1, "padding": 100 * 128}[where]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=f"{HOOK} chunk 5 is corrupted .crc32c checksum mismatch"):
        list(ActivationLoader(out, HOOK, cfg).batches(n_batches=12))
