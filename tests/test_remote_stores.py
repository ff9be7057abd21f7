"""Stores addressed by fsspec URL: memory:// and a local directory through file://.

memory:// is one process-global file system in fsspec, so every test uses its own unique
bucket name. file:// URLs go through zarr's FsspecStore, the same code path as s3:// / gs://.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from actcache import store as S
from actcache.cli import app
from actcache.errors import ActcacheError
from actcache.extract import extract
from actcache.inspection import store_info, verify_store
from actcache.lock import StoreLock
from actcache.urls import StoreLocation, redact
from conftest import small_config
from trainer.loader import ActivationLoader, LoaderConfig

runner = CliRunner()
HOOK = "blocks.3.hook_resid_post"


def _memory_url(name: str = "s.zarr") -> str:
    return f"memory://actcache-test-{uuid.uuid4().hex}/{name}"


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path) -> str:
    return _memory_url() if request.param == "memory" else f"file://{tmp_path}/s.zarr"


def _assert_same_store(url: str, local: Path) -> None:
    """Every array and the statistics equal, bit for bit, to a store written to a local path."""
    a, b = S.open_store(url), S.open_store(local)
    for name in [*b.hooks, S.TOKENS, S.WINDOWS, S.WINDOW, S.POSITION, S.WINDOW_SOURCE, S.MANIFEST]:
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)
    assert a.attrs["stats"] == b.attrs["stats"] and a.attrs["complete"]


def test_extract_to_url_reads_back_like_a_local_store(url, small_store):
    assert extract(small_config(url)) == url
    _assert_same_store(url, small_store)
    st = S.open_store(url)
    assert st.path == url and not st.location.is_local
    assert torch.equal(st.read_chunk(HOOK, 2), S.open_store(small_store).read_chunk(HOOK, 2))
    assert st.attrs["extract_config"]["out"] == url
    assert not st.location.exists(S.LOCK_FILE)  # released


def test_trainer_loader_reads_url_store(url, small_store):
    extract(small_config(url))
    cfg = LoaderConfig(batch_size=48, shuffle_buffer_mb=0.125, seed=3, normalize="expected_average_only_in")
    remote = ActivationLoader(url, HOOK, cfg)
    assert not remote.uses_memmap
    got = torch.cat(list(remote.batches(20)))
    want = torch.cat(list(ActivationLoader(small_store, HOOK, cfg).batches(20)))
    assert torch.equal(got, want)
    held = torch.cat(list(ActivationLoader(url, HOOK, cfg, split="heldout").batches()))
    assert held.shape == (128, 64)


def test_uncompressed_url_store_is_read_through_zarr_not_memmap(tmp_path):
    url = f"file://{tmp_path}/raw.zarr"
    extract(small_config(url, codec="none"))
    local = ActivationLoader(tmp_path / "raw.zarr", HOOK, LoaderConfig(batch_size=64, shuffle_buffer_mb=0.125))
    remote = ActivationLoader(url, HOOK, LoaderConfig(batch_size=64, shuffle_buffer_mb=0.125))
    assert local.uses_memmap and not remote.uses_memmap
    assert torch.equal(torch.cat(list(local.batches(10))), torch.cat(list(remote.batches(10))))


def test_info_and_verify_on_url(url, small_store):
    extract(small_config(url))
    info = store_info(url)
    assert info["path"] == url and info["chunks_done"] == 6 and info["complete"]
    assert info["bytes_per_token"] == store_info(small_store)["bytes_per_token"]
    r = runner.invoke(app, ["info", url, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["hooks"][0]["bytes_on_disk"] > 0
    r = runner.invoke(app, ["verify", url])
    assert r.exit_code == 0 and "6 chunks checked" in r.output, r.output
    # A missing chunk object reads as zeros through zarr: verify finds it through the listing.
    st = S.open_store(url)
    fs, root = st.location._fs
    fs.rm(f"{root}/{st.chunk_key(HOOK, 4)}")
    rep = verify_store(url)
    assert not rep.ok and any(f"{HOOK} chunk 4: chunk file is missing" in p for p in rep.problems)
    r = runner.invoke(app, ["verify", url])
    assert r.exit_code == 1 and "chunk 4" in r.output


def test_overwrite_deletes_the_old_url_store(url):
    extract(small_config(url))
    loc = StoreLocation(url)
    loc.write_text(f"{HOOK}/c/99/0", "stale")
    with pytest.raises(ActcacheError, match="already exists"):
        extract(small_config(url))
    extract(small_config(url, seed=8), overwrite=True)
    assert not loc.exists(f"{HOOK}/c/99/0")
    assert S.open_store(url).attrs["seed"] == 8


class _Crash:
    """Progress that fails after ``n`` chunks: an in-process crash mid-extraction."""

    def __init__(self, n: int):
        self.n = n

    def start(self, total_rows: int, done_rows: int) -> None:
        pass

    def advance(self, rows: int) -> None:
        self.n -= 1
        if self.n == 0:
            raise RuntimeError("simulated crash")


def test_resume_on_memory_url(small_store):
    url = _memory_url()
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(small_config(url), progress=_Crash(2))
    with pytest.raises(ActcacheError, match="incomplete"):
        S.open_store(url)
    done = int(S.open_store(url, require_complete=False).completed_chunks().sum())
    assert 2 <= done < 6
    extract(small_config(url), resume=True)
    _assert_same_store(url, small_store)


def test_kill_9_then_resume_on_file_url(tmp_path, small_store):
    """A dead writer's lock object is taken over on the same host, through fsspec."""
    out = tmp_path / "s.zarr"
    url = f"file://{out}"
    c = small_config(url, n_tokens=32 * 40, chunk_rows=32, batch_size=1)
    args = [sys.executable, "-m", "actcache", "extract", "--model", c.model, "--hooks", ",".join(c.hooks),
            "--out", url, "--context-size", "32", "--n-tokens", str(c.n_tokens), "--chunk-rows", "32",
            "--batch-size", "1", "--device", "cpu", "--seed", str(c.seed), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120

    def done() -> int:
        try:
            return int(zarr.open_group(str(out), mode="r")[S.MANIFEST][:].sum())
        except Exception:
            return -1

    while done() < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (out / S.LOCK_FILE).exists() and 3 <= done() < 40
    extract(c, resume=True)
    ref = extract(small_config(tmp_path / "ref.zarr", n_tokens=32 * 40, chunk_rows=32, batch_size=1))
    _assert_same_store(url, ref)
    assert not (out / S.LOCK_FILE).exists()


def test_lock_object_on_url_store():
    loc = StoreLocation(_memory_url())
    holder = {"pid": os.getpid(), "host": socket.gethostname()}  # a live writer: this process
    loc.write_text(S.LOCK_FILE, json.dumps(holder))
    with pytest.raises(ActcacheError, match=f"pid {os.getpid()}"):
        StoreLock(loc, S.LOCK_FILE).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    loc.write_text(S.LOCK_FILE, json.dumps({**holder, "pid": int(dead.stdout)}))
    with StoreLock(loc, S.LOCK_FILE):  # stale: taken over
        assert json.loads(loc.read_text(S.LOCK_FILE))["pid"] == os.getpid()
    assert not loc.exists(S.LOCK_FILE)
    loc.write_text(S.LOCK_FILE, json.dumps({**holder, "host": "elsewhere"}))
    with pytest.raises(ActcacheError, match="on elsewhere"):  # another host's lock is never taken over
        StoreLock(loc, S.LOCK_FILE).acquire()


def test_dask_workers_write_a_file_url_store(tmp_path, small_store):
    url = f"file://{tmp_path}/par.zarr"
    extract(small_config(url), workers=2)
    _assert_same_store(url, small_store)


def test_memory_url_with_dask_workers_is_refused():
    with pytest.raises(ActcacheError, match="dask workers cannot write it"):
        extract(small_config(_memory_url()), workers=2)


def test_secrets_in_url_never_reach_attrs_or_logs(caplog, capsys, tmp_path):
    bucket = f"actcache-test-{uuid.uuid4().hex}"
    url = f"memory://alice:s3cr3t-pw@{bucket}/s.zarr?token=t0k3n-xyz&sig=abc"
    secrets = ("alice", "s3cr3t-pw", "t0k3n-xyz", "sig=")
    assert redact(url) == f"memory://{bucket}/s.zarr"
    caplog.set_level(logging.DEBUG)
    r = runner.invoke(app, ["-v", "extract", "--model", "embedded:tiny-gemma2", "--hooks", HOOK, "--out", url,
                            "--context-size", "32", "--n-tokens", "256", "--chunk-rows", "64", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    outputs = [r.output, caplog.text, capsys.readouterr().err]
    for cmd in (["info", url], ["info", url, "--json"], ["verify", url]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, res.output
        outputs.append(res.output)
    assert "ignoring its user info and query" in caplog.text
    st = S.open_store(url)
    assert st.path == f"memory://{bucket}/s.zarr" and S.open_store(st.path).n_rows == 256
    fs, root = st.location._fs
    metadata = [fs.cat_file(k).decode() for k in fs.find(root) if k.endswith("zarr.json")]
    assert metadata and f"memory://{bucket}/s.zarr" in " ".join(outputs)
    # sae train on the same URL: the run's config.json and logs hold the redacted URL only.
    from trainer.cli import app as sae_app

    run = tmp_path / "run"
    res = runner.invoke(sae_app, ["train", "--store", url, "--out", str(run), "--d-sae", "32", "--batch-size", "64",
                                  "--n-tokens", "128", "--heldout-chunks", "1", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["store"] == f"memory://{bucket}/s.zarr"
    outputs += [res.output, caplog.text, *(p.read_text() for p in run.rglob("*.json*"))]
    for text in [*outputs, *metadata, repr(st.location), str(st.path)]:
        for s in secrets:
            assert s not in text, (s, text[:300])


@pytest.mark.parametrize("bad,needles", [
    ("ftp://host/s.zarr", ["unsupported store URL scheme 'ftp'", "use a local path or an s3://"]),
    ("nosuch://bucket/s.zarr", ["unsupported store URL scheme 'nosuch'", "file://"]),
    ("simplecache::s3://b/s.zarr", ["chained fsspec URLs are not supported"]),
])
def test_bad_url_is_a_one_line_error(tmp_path, bad, needles):
    r = runner.invoke(app, ["extract", "--model", "embedded:tiny-gemma2", "--hooks", HOOK, "--out", bad,
                            "--device", "cpu", "--quiet"])
    out = r.output.strip()
    assert r.exit_code == 2 and len(out.splitlines()) == 1 and out.startswith("error:"), out
    for n in needles:
        assert n in out, out
    for cmd in ("info", "verify"):
        r = runner.invoke(app, [cmd, bad])
        assert r.exit_code == 2 and needles[0] in r.output, r.output
    with pytest.raises(ActcacheError, match="unsupported store URL scheme|chained"):
        S.open_store(bad)


@pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) for m in ("s3fs",)), reason="s3fs installed")
def test_missing_backend_names_the_extra():
    r = runner.invoke(app, ["info", "s3://bucket/s.zarr"])
    assert r.exit_code == 2 and "pip install 'actcache-sae[remote]'" in r.output, r.output
