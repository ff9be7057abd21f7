"""Several writer threads: the same store bytes, each chunk committed after its own data, bounded memory."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import zarr
import pytest

from actcache import store as S
from actcache.runner import BackgroundWriter
from actcache.store import Layout
from actcache.store_writer import StoreWriter

HOOK = "blocks.0.hook_resid_post"
ROWS_PER_WINDOW, WINDOWS_PER_CHUNK, N_CHUNKS, D = 16, 4, 12, 48
CHUNK_ROWS = ROWS_PER_WINDOW * WINDOWS_PER_CHUNK


def _data(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N_CHUNKS * CHUNK_ROWS, D)) * 3).astype(np.float32)


def _new_store(path: Path, codec: str) -> StoreWriter:
    n_windows = N_CHUNKS * WINDOWS_PER_CHUNK
    layout = Layout(n_windows, ROWS_PER_WINDOW, False, WINDOWS_PER_CHUNK)
    attrs = {"model": {"id": "synthetic"}, "context_size": ROWS_PER_WINDOW, "prepend_bos": False,
             "exclude_bos": False, "seed": 0, "dataset": {"path": "synthetic"}, "extract_config": {}}
    return StoreWriter.create(path, attrs=attrs, layout=layout, hooks=[HOOK], d_model=D, logical_dtype="float32",
                              codec=codec, windows=np.zeros((n_windows, ROWS_PER_WINDOW), np.int32),
                              window_source=np.arange(n_windows))


def _write(writer: StoreWriter, x: np.ndarray, threads: int, chunks: list[int] | None = None) -> None:
    bg = BackgroundWriter(writer, depth=2, threads=threads)
    try:
        for c in range(N_CHUNKS) if chunks is None else chunks:
            bg.put(c, {HOOK: x[c * CHUNK_ROWS:(c + 1) * CHUNK_ROWS]}, CHUNK_ROWS)
    finally:
        bg.close()


def _objects(path: Path) -> dict[str, bytes]:
    """Every object but the root ``zarr.json`` (its ``created``/``finished`` timestamps differ)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.relative_to(path) != Path("zarr.json")}


@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4", "none"])
def test_same_store_bytes_with_one_and_four_threads(tmp_path, codec):
    x = _data()
    stats = {}
    for t in (1, 4):
        w = _new_store(tmp_path / f"{t}.zarr", codec)
        _write(w, x, t)
        stats[t] = w.finalize()
    one, four = _objects(tmp_path / "1.zarr"), _objects(tmp_path / "4.zarr")
    assert len(one) >= N_CHUNKS * 4  # data, two statistics objects and a manifest entry per chunk
    assert one.keys() == four.keys()
    assert [k for k in one if one[k] != four[k]] == []
    assert stats[1] == stats[4]
    got = S.ActivationStore(tmp_path / "4.zarr").read_rows(HOOK, 0, len(x))
    np.testing.assert_array_equal(got, x)
    mean64 = x.astype(np.float64).mean(axis=0)
    assert np.isfinite(stats[4][HOOK]["mean"]).all()
    np.testing.assert_allclose(stats[4][HOOK]["mean"], mean64, rtol=0, atol=1e-9)


def test_each_manifest_entry_follows_its_own_data_and_statistics(tmp_path):
    """With four threads committing out of order, the moment chunk c's manifest entry is written its
    activations and statistics already read back exactly."""
    x = _data(1)
    w = _new_store(tmp_path / "s.zarr", "zstd")
    reader = S.ActivationStore(tmp_path / "s.zarr", require_complete=False)
    enc = w._encoders[S.MANIFEST]  # local store: the manifest entry is written by its chunk encoder
    put, seen, errors, lock = enc.put, [], [], threading.Lock()

    def checked_put(c, value):
        r0, r1 = c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS
        ok = (np.array_equal(reader.read_rows(HOOK, r0, r1), x[r0:r1])
              and np.array_equal(reader.read(S.stats_array(HOOK, "sum"), c, c + 1)[0],
                                 x[r0:r1].sum(axis=0, dtype=np.float64)))
        with lock:
            seen.append(c)
            if not ok:
                errors.append(c)
        put(c, value)

    enc.put = checked_put
    _write(w, x, threads=4)
    assert sorted(seen) == list(range(N_CHUNKS))
    assert errors == []
    assert w.pending_chunks() == []


def test_a_failing_chunk_is_raised_and_left_pending(tmp_path):
    x = _data(2)
    w = _new_store(tmp_path / "s.zarr", "zstd")
    orig = w.write_chunk

    def write_chunk(c, acts):
        if c == 5:
            raise OSError("disk full")
        orig(c, acts)

    w.write_chunk = write_chunk
    with pytest.raises(OSError, match="disk full"):
        _write(w, x, threads=3)
    pending = w.pending_chunks()
    assert 5 in pending
    # A resume with the real writer finishes the store: the same bytes as one uninterrupted writer.
    w.write_chunk = orig
    _write(w, x, threads=3, chunks=pending)
    w.finalize()
    ref = _new_store(tmp_path / "ref.zarr", "zstd")
    _write(ref, x, threads=1)
    ref.finalize()
    assert _objects(tmp_path / "s.zarr") == _objects(tmp_path / "ref.zarr")


def test_queue_stays_bounded_while_writers_are_busy(tmp_path):
    """Blocked writers hold one chunk each and the queue ``depth`` more: put() blocks after that."""
    w = _new_store(tmp_path / "s.zarr", "none")
    release = threading.Event()
    w.write_chunk = lambda c, acts: release.wait()
    threads, depth = 3, 2
    bg = BackgroundWriter(w, depth, threads=threads)
    accepted = []

    def producer():
        for c in range(N_CHUNKS):
            bg.put(c, {}, CHUNK_ROWS)
            accepted.append(c)

    p = threading.Thread(target=producer, daemon=True)
    p.start()
    deadline = time.monotonic() + 10
    while len(accepted) < threads + depth and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # room for a put() that should have blocked to get through
    assert p.is_alive()
    assert len(accepted) == threads + depth
    release.set()
    p.join(timeout=10)
    bg.close()
    assert len(accepted) == N_CHUNKS


@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_direct_encoding_writes_zarrs_own_bytes(tmp_path, codec, dtype):
    """The writer threads encode chunks with the array's own zarr codecs (ChunkEncoder): every
    chunk object, the padded edge chunk included, is byte for byte what ``array[rows] = a`` writes."""
    from actcache.dtypes import storage_dtype
    from actcache.store_writer import ChunkEncoder, compressors_for, with_checksum

    sdt = storage_dtype(dtype)
    x = (_data(3)[:5 * CHUNK_ROWS - 7] * 100).astype(np.float32)  # the last chunk is an edge chunk
    a = x.view(np.uint32).__rshift__(16).astype(np.uint16) if dtype == "bfloat16" else x.astype(sdt)
    paths = {}
    for how in ("zarr", "direct"):
        g = zarr.open_group(str(tmp_path / f"{how}.zarr"), mode="w")
        arr = g.create_array(HOOK, shape=a.shape, chunks=(CHUNK_ROWS, D), dtype=sdt, fill_value=0,
                             compressors=with_checksum(compressors_for(codec, sdt.itemsize)))
        enc = ChunkEncoder.for_array(arr, HOOK, S.StoreLocation(tmp_path / f"{how}.zarr")) if how == "direct" else None
        assert how == "zarr" or enc is not None
        for c in range(5):
            rows = a[c * CHUNK_ROWS:(c + 1) * CHUNK_ROWS]
            if enc is None:
                arr.with_config({"write_empty_chunks": True})[c * CHUNK_ROWS:c * CHUNK_ROWS + len(rows)] = rows
            else:
                enc.put(c, rows)
        paths[how] = tmp_path / f"{how}.zarr" / HOOK / "c"
    files = sorted(p.relative_to(paths["zarr"]) for p in paths["zarr"].rglob("*") if p.is_file())
    assert len(files) == 5
    for f in files:
        assert (paths["direct"] / f).read_bytes() == (paths["zarr"] / f).read_bytes(), f
    back = zarr.open_group(str(tmp_path / "direct.zarr"), mode="r")[HOOK][:]
    assert np.array_equal(back, a)


@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4", "none"])
def test_whole_store_matches_zarrs_own_write_path(tmp_path, codec):
    """Activations, statistics and manifest through the chunk encoders, or all through zarr's
    array API: the same objects, byte for byte."""
    x = _data(5)
    for how in ("zarr", "direct"):
        w = _new_store(tmp_path / f"{how}.zarr", codec)
        if how == "zarr":
            w._encoders = {name: None for name in w._encoders}
        else:
            assert all(enc is not None for enc in w._encoders.values())
        _write(w, x, 2)
        w.finalize()
    assert _objects(tmp_path / "direct.zarr") == _objects(tmp_path / "zarr.zarr")
