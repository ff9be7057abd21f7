"""Interrupted extractions (kill -9, Ctrl-C) finish with --resume, identical row for row."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from actcache import store as S
from actcache.errors import ActcacheError
from actcache.extract import extract
from conftest import small_config

# 40 chunks of one window each, one window per forward: slow enough to interrupt mid-run.
RUN = dict(context_size=64, n_tokens=64 * 40, chunk_rows=64, batch_size=1)


def _cli_args(out: Path) -> list[str]:
    c = small_config(out, **RUN)
    return [sys.executable, "-m", "actcache", "extract", "--model", c.model, "--hooks", ",".join(c.hooks),
            "--out", str(out), "--context-size", str(c.context_size), "--n-tokens", str(c.n_tokens),
            "--chunk-rows", str(c.chunk_rows), "--batch-size", "1", "--dtype", c.dtype, "--device", "cpu",
            "--seed", str(c.seed), "--quiet"]


def _done_chunks(out: Path) -> int:
    """Committed chunks; -1 while the store does not exist yet."""
    if not (out / "zarr.json").exists():
        return -1
    try:
        return int(zarr.open_group(str(out), mode="r")[S.MANIFEST][:].sum())
    except Exception:
        return 0


def _interrupt(out: Path, sig: int, after_chunks: int) -> int:
    proc = subprocess.Popen(_cli_args(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _done_chunks(out) < after_chunks and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in [*ga.attrs["hooks"], S.TOKENS, S.WINDOWS, S.WINDOW, S.POSITION, S.WINDOW_SOURCE, S.MANIFEST]:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert ga.attrs["stats"] == gb.attrs["stats"]
    assert ga.attrs["complete"] and gb.attrs["complete"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    return extract(small_config(tmp_path_factory.mktemp("ref") / "ref.zarr", **RUN))


# -1: at once (maybe before anything is written); 0: as soon as the store exists; 3: mid-run.
@pytest.mark.parametrize("after_chunks", [-1, 0, 3])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, reference, after_chunks):
    out = tmp_path / "s.zarr"
    code, _ = _interrupt(out, signal.SIGKILL, after_chunks)
    assert code == -signal.SIGKILL
    if after_chunks >= 0:
        assert (out / S.LOCK_FILE).exists()  # a dead process's lock is left behind...
    if after_chunks > 0:
        assert 0 < _done_chunks(out) < 40
    extract(small_config(out, **RUN), resume=True)  # ...and taken over as stale
    _assert_same_store(out, reference)
    assert not (out / S.LOCK_FILE).exists()


def test_ctrl_c_keeps_finished_chunks_and_resume_finishes(tmp_path, reference):
    out = tmp_path / "s.zarr"
    code, err = _interrupt(out, signal.SIGINT, 2)
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    kept = _done_chunks(out)
    assert 2 <= kept < 40
    extract(small_config(out, **RUN), resume=True)
    _assert_same_store(out, reference)


def test_resume_with_changed_parameters_is_refused(tmp_path, reference):
    out = tmp_path / "s.zarr"
    _interrupt(out, signal.SIGKILL, 2)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != S.LOCK_FILE}
    with pytest.raises(ActcacheError, match=r"cannot resume.*seed: 7 -> 8"):
        extract(small_config(out, **{**RUN, "seed": 8}), resume=True)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != S.LOCK_FILE}
    assert before == after


def test_resume_of_complete_store_is_a_no_op(tmp_path):
    out = extract(small_config(tmp_path / "s.zarr"))
    mtime = (out / "zarr.json").stat().st_mtime_ns
    extract(small_config(out), resume=True)
    assert (out / "zarr.json").stat().st_mtime_ns == mtime


def test_two_dask_workers_write_the_same_store_as_one_process(tmp_path, small_store):
    out = extract(small_config(tmp_path / "par.zarr"), workers=2)
    _assert_same_store(out, small_store)
