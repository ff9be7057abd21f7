"""The SAE trainer's activation loader: coverage, determinism, exact resume, memory, reads."""

import json
import math
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.errors import ActcacheError, StoreCorruptError
from actcache.store import open_store
from conftest import small_config
from trainer.loader import ActivationLoader, LoaderConfig
from trainer.prefetch import PREFETCH_THREAD

HOOK = "blocks.3.hook_resid_post"
# small_store: 6 chunks x 128 rows, d_model 64 -> 5 train chunks (640 rows) with 1 heldout.
TRAIN_ROWS = 640
B = 48  # does not divide a group or an epoch: batches span groups and epochs
MB_2CHUNKS = 0.125  # 512 float32 rows of 64: groups of 2 chunks (256 rows)
MB_1CHUNK = 0.0625  # 256 rows: groups of 1 chunk


def _cfg(**kw) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": B, "shuffle_buffer_mb": MB_2CHUNKS, **kw})


def _take(loader: ActivationLoader, n: int) -> np.ndarray:
    return torch.cat(list(loader.batches(n))).numpy()


def _multiset(rows: np.ndarray) -> np.ndarray:
    """Rows as sorted opaque byte strings: equality is bitwise multiset equality."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return np.sort(rows.view(np.dtype((np.void, rows.shape[1] * 4))).ravel())


def _counter(rows: np.ndarray) -> Counter:
    return Counter(r.tobytes() for r in np.ascontiguousarray(rows, dtype=np.float32))


def _no_prefetch_thread() -> bool:
    return not any(t.name == PREFETCH_THREAD and t.is_alive() for t in threading.enumerate())


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory, tiny_model_dir) -> Path:
    """Uncompressed (codec none) bf16 store of 22 windows: 6 chunks, the last one 64 rows (an edge chunk)."""
    from actcache.extract import extract

    out = tmp_path_factory.mktemp("loader") / "raw.zarr"
    return extract(small_config(out, codec="none", n_tokens=32 * 22, hooks=(HOOK,)))


def test_epochs_cover_train_rows_once_and_skip_heldout(small_store):
    ld = ActivationLoader(small_store, HOOK, _cfg())
    assert ld.d_in == 64 and ld.n_rows == TRAIN_ROWS and ld.group_chunks == 2
    st = open_store(small_store)
    train, heldout = st.read_rows(HOOK, 0, TRAIN_ROWS), st.read_rows(HOOK, TRAIN_ROWS, 768)
    stream = _take(ld, math.ceil(3 * TRAIN_ROWS / B))
    epochs = [stream[e * TRAIN_ROWS:(e + 1) * TRAIN_ROWS] for e in range(3)]
    for rows in epochs:
        np.testing.assert_array_equal(_multiset(rows), _multiset(train))
    assert not np.array_equal(epochs[0], epochs[1])  # every epoch has its own order
    assert not np.array_equal(epochs[0][:B], train[:B])  # shuffled, not store order
    only_heldout = set(_counter(heldout)) - set(_counter(train))  # (BOS rows are identical everywhere)
    assert only_heldout and not only_heldout & set(_counter(stream))


def test_seeded_order(small_store):
    a, b = (_take(ActivationLoader(small_store, HOOK, _cfg()), 4) for _ in range(2))
    c = _take(ActivationLoader(small_store, HOOK, _cfg(seed=1)), 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_resume_is_exact(small_store):
    n, cuts = 32, (0, 1, 5, 13, 14, 27)  # 32 batches of 48 = 2.4 epochs of 640 rows
    ref, states = [], {}
    ld = ActivationLoader(small_store, HOOK, _cfg())
    for i, batch in enumerate(ld.batches(n)):
        if i in cuts:
            states[i] = json.loads(json.dumps(ld.state_dict()))  # state of "i batches yielded"
        ref.append(batch.clone())
    assert ld.state_dict()["batches"] == n and ld.state_dict()["epoch"] == 2
    for k in cuts:
        state = states[k]
        assert state["batches"] == k + 1
        resumed = ActivationLoader(small_store, HOOK, _cfg(prefetch=False))
        resumed.load_state_dict(state)
        got = list(resumed.batches(n - k - 1))
        assert resumed.groups_read <= 2 + math.ceil((n - k - 1) * B / 256)  # no replay of the epoch
        assert len(got) == n - k - 1
        for want, have in zip(ref[k + 1:], got):
            assert torch.equal(want, have)
    # Re-deriving the position reads one group, not the epoch so far.
    resumed = ActivationLoader(small_store, HOOK, _cfg(prefetch=False))
    resumed.load_state_dict(states[27])
    assert torch.equal(next(iter(resumed.batches(1))), ref[28]) and resumed.groups_read <= 2
    # A loader can also pause and continue: batches() picks up where the last call stopped.
    ld = ActivationLoader(small_store, HOOK, _cfg())
    parts = list(ld.batches(3)) + list(ld.batches(4))
    assert all(torch.equal(x, y) for x, y in zip(parts, ref[:7]))


def test_state_must_match(small_store):
    state = ActivationLoader(small_store, HOOK, _cfg()).state_dict()
    with pytest.raises(ActcacheError, match="seed"):
        ActivationLoader(small_store, HOOK, _cfg(seed=3)).load_state_dict(state)
    with pytest.raises(ActcacheError, match="group_chunks"):
        ActivationLoader(small_store, HOOK, _cfg(shuffle_buffer_mb=MB_1CHUNK)).load_state_dict(state)


def test_heldout_split(small_store):
    ld = ActivationLoader(small_store, HOOK, _cfg(), split="heldout")
    assert ld.n_rows == 128
    want = open_store(small_store).read_rows(HOOK, TRAIN_ROWS, 768)
    for _ in range(2):  # every call is one fresh ordered pass
        got = list(ld.batches())
        assert [len(b) for b in got] == [48, 48, 32]
        np.testing.assert_array_equal(torch.cat(got).numpy(), want)
    assert len(list(ld.batches(2))) == 2
    with pytest.raises(ActcacheError, match="heldout_chunks=6"):
        ActivationLoader(small_store, HOOK, _cfg(heldout_chunks=6))
    with pytest.raises(ActcacheError, match="heldout_chunks >= 1"):
        ActivationLoader(small_store, HOOK, _cfg(heldout_chunks=0), split="heldout")


def test_normalisation(small_store):
    ld = ActivationLoader(small_store, HOOK, _cfg(normalize="expected_average_only_in"))
    stats = open_store(small_store).stats(HOOK)
    assert ld.scaling_factor == math.sqrt(64) / stats.mean_norm
    assert ActivationLoader(small_store, HOOK, _cfg()).scaling_factor == 1.0
    n = TRAIN_ROWS // 32
    scaled = _take(ActivationLoader(small_store, HOOK, _cfg(batch_size=32, normalize="expected_average_only_in")), n)
    raw = _take(ActivationLoader(small_store, HOOK, _cfg(batch_size=32)), n)
    np.testing.assert_array_equal(scaled, raw * np.float32(ld.scaling_factor))
    # Stats cover the whole store, the epoch only the train chunks: close, not equal.
    assert np.linalg.norm(scaled, axis=1).mean() == pytest.approx(8.0, rel=0.1)


@pytest.mark.parametrize("prefetch", [True, False])
def test_memory_is_bounded_by_the_buffer(small_store, prefetch):
    ld = ActivationLoader(small_store, HOOK, _cfg(shuffle_buffer_mb=MB_1CHUNK, prefetch=prefetch))
    assert ld.group_chunks == 1
    assert ld.rows_bound == (2 if prefetch else 1) * 128 + B < TRAIN_ROWS
    for _ in ld.batches(3 * TRAIN_ROWS // B):
        time.sleep(0.002)  # a slow consumer: the prefetch thread gets every chance to run ahead
        assert ld.max_rows_in_memory <= ld.rows_bound
    assert ld.max_rows_in_memory > 128  # the accounting saw the groups and the spanning batches


def test_uncompressed_store_is_memory_mapped(raw_store, small_store):
    mm = ActivationLoader(raw_store, HOOK, _cfg())
    via_zarr = ActivationLoader(raw_store, HOOK, _cfg(memmap=False))
    assert mm.uses_memmap and not via_zarr.uses_memmap
    assert not ActivationLoader(small_store, HOOK, _cfg()).uses_memmap  # zstd: through zarr
    assert mm.n_rows == 5 * 128
    np.testing.assert_array_equal(_take(mm, 30), _take(via_zarr, 30))
    # The heldout chunk is the short edge chunk (64 rows, stored padded to 128).
    held = torch.cat(list(ActivationLoader(raw_store, HOOK, _cfg(), split="heldout").batches())).numpy()
    np.testing.assert_array_equal(held, open_store(raw_store).read_rows(HOOK, 640, 704))
    everything = ActivationLoader(raw_store, HOOK, _cfg(heldout_chunks=0))  # the edge chunk is trained on
    assert everything.n_rows == 704
    np.testing.assert_array_equal(_multiset(_take(everything, 704 // B + 1)[:704]),
                                  _multiset(open_store(raw_store).read_rows(HOOK, 0, 704)))


def test_prefetch_thread_stops(small_store):
    ld = ActivationLoader(small_store, HOOK, _cfg())
    gen = ld.batches()
    next(gen), next(gen)
    assert not _no_prefetch_thread()
    gen.close()
    assert _no_prefetch_thread()
    for _ in ld.batches():
        break
    assert _no_prefetch_thread()
    assert len(list(ld.batches(20))) == 20 and _no_prefetch_thread()


@pytest.mark.parametrize("prefetch", [True, False])
def test_corrupted_chunk_is_named(small_store, raw_store, tmp_path, prefetch):
    bad = shutil.copytree(small_store, tmp_path / "bad.zarr")
    (bad / HOOK / "c" / "2" / "0").write_bytes(b"not zstd at all" * 40)
    ld = ActivationLoader(bad, HOOK, _cfg(prefetch=prefetch))
    with pytest.raises(StoreCorruptError, match=f"{HOOK} chunk 2 is corrupted"):
        for _ in ld.batches(TRAIN_ROWS // B + 1):
            pass
    assert _no_prefetch_thread()
    raw = shutil.copytree(raw_store, tmp_path / "raw.zarr")
    chunk = raw / HOOK / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:1000])  # truncated: a memmap would read past it
    with pytest.raises(ActcacheError, match=f"chunk 1 of {HOOK}"):
        list(ActivationLoader(raw, HOOK, _cfg(prefetch=prefetch)).batches(TRAIN_ROWS // B + 1))
    chunk.unlink()  # zarr would return zeros for a missing chunk
    with pytest.raises(ActcacheError, match=f"chunk 1 of {HOOK}"):
        list(ActivationLoader(raw, HOOK, _cfg(prefetch=prefetch, memmap=False)).batches(TRAIN_ROWS // B + 1))
    assert _no_prefetch_thread()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu(small_store):
    cpu = list(ActivationLoader(small_store, HOOK, _cfg()).batches(15))
    gpu = list(ActivationLoader(small_store, HOOK, _cfg(), device="cuda").batches(15))
    assert all(g.device.type == "cuda" and g.dtype == torch.float32 for g in gpu)
    assert all(torch.equal(c, g.cpu()) for c, g in zip(cpu, gpu))


def _ranks(store, world: int, batch: int, shards: int | None = None, **kw) -> list[ActivationLoader]:
    return [ActivationLoader(store, HOOK, _cfg(batch_size=batch, shards=shards, **kw), rank=r, world_size=world)
            for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_chunks_covering_each_epoch(small_store, world):
    # Shard j of an epoch takes chunks perm[j::world]: disjoint, and together every train chunk.
    for epoch in range(3):
        plans = [[c for g in ld._plan(epoch, ld._mine[0]) for c in g] for ld in _ranks(small_store, world, 48)]
        assert sorted(c for p in plans for c in p) == list(range(5))
    ld0 = ActivationLoader(small_store, HOOK, _cfg(), rank=0, world_size=world)
    assert ld0._plan(0, 0) != ActivationLoader(small_store, HOOK, _cfg(seed=1), rank=0, world_size=world)._plan(0, 0)
    with pytest.raises(ActcacheError, match="rank"):
        ActivationLoader(small_store, HOOK, _cfg(), rank=world, world_size=world)
    with pytest.raises(ActcacheError, match="shards"):
        ActivationLoader(small_store, HOOK, _cfg(), rank=0, world_size=6)  # 6 shards > 5 train chunks


def test_two_ranks_concatenate_to_the_one_rank_stream(small_store):
    """The data-parallel guarantee: rank 0's batch then rank 1's is the 1-rank (shards=2) batch, bitwise."""
    n = 30  # batches of 48: 2.25 epochs of a shard's ~256-384 rows, spanning groups and epochs
    one = list(ActivationLoader(small_store, HOOK, _cfg(batch_size=B, shards=2)).batches(n))
    r0, r1 = (list(ld.batches(n)) for ld in _ranks(small_store, 2, B // 2))
    for b, x, y in zip(one, r0, r1):
        assert torch.equal(b, torch.cat([x, y]))
    # Each rank's rows of epoch 0 come only from its own chunks.
    st = open_store(small_store)
    for ld, got in zip(_ranks(small_store, 2, B // 2), (r0, r1)):
        mine = [c for g in ld._plan(0, ld._mine[0]) for c in g]
        own = _counter(np.concatenate([st.read_rows(HOOK, 128 * c, 128 * c + 128) for c in mine]))
        rows = _counter(torch.cat(got).numpy()[:ld.n_rows])
        assert sum(rows.values()) == ld.n_rows and all(rows[k] <= own[k] for k in rows)
    # Every train row, exactly once, in the union of the ranks' first epochs.
    epoch0 = [torch.cat(got).numpy()[:ld.n_rows] for ld, got in zip(_ranks(small_store, 2, B // 2), (r0, r1))]
    np.testing.assert_array_equal(_multiset(np.concatenate(epoch0)), _multiset(st.read_rows(HOOK, 0, TRAIN_ROWS)))


def test_each_rank_resumes_its_position(small_store):
    n, cut = 24, 9
    ranks = _ranks(small_store, 2, B // 2)
    ref = [[b.clone() for b in ld.batches(n)] for ld in ranks]
    for r in range(2):
        ld = _ranks(small_store, 2, B // 2)[r]
        states = []
        for i, _ in enumerate(ld.batches(cut + 1)):
            states.append(json.loads(json.dumps(ld.state_dict())))
        resumed = _ranks(small_store, 2, B // 2, prefetch=False)[r]
        resumed.load_state_dict(states[cut])
        assert all(torch.equal(a, b) for a, b in zip(ref[r][cut + 1:], resumed.batches(n - cut - 1)))
        with pytest.raises(ActcacheError, match="rank"):
            _ranks(small_store, 2, B // 2)[1 - r].load_state_dict(states[cut])
    # A 1-rank loader holding both shards resumes both positions.
    one = ActivationLoader(small_store, HOOK, _cfg(shards=2))
    full = [b.clone() for b in one.batches(n)]
    one = ActivationLoader(small_store, HOOK, _cfg(shards=2))
    for _ in one.batches(cut + 1):
        pass
    state = one.state_dict()
    assert len(state["positions"]) == 2
    again = ActivationLoader(small_store, HOOK, _cfg(shards=2))
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(full[cut + 1:], again.batches(n - cut - 1)))


def test_kept_batches_are_never_overwritten(small_store):
    """Batches are views of reused group buffers: a buffer is refilled only once no batch of it is alive."""
    ld = ActivationLoader(small_store, HOOK, _cfg(batch_size=64))
    kept = list(ld.batches(30))  # 3 epochs, every batch kept
    clones = [b.clone() for b in ActivationLoader(small_store, HOOK, _cfg(batch_size=64)).batches(30)]
    assert all(torch.equal(a, b) for a, b in zip(kept, clones))
    # A consumer that drops its batches gets the two buffers refilled, never reallocated.
    ld = ActivationLoader(small_store, HOOK, _cfg(batch_size=64))
    it = ld.batches(30)
    for _ in it:
        pass
    assert ld.max_rows_in_memory <= ld.rows_bound


def test_bf16_decoding_is_exact(small_store):
    st = open_store(small_store)
    assert st.logical_dtype == "bfloat16"
    got = torch.cat(list(ActivationLoader(small_store, HOOK, _cfg(), split="heldout").batches()))
    bits = st.array(HOOK)[TRAIN_ROWS:768]
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    assert torch.equal(got, want)


def test_nothing_is_pinned_on_cpu(small_store, monkeypatch):
    def no_pin(*a, **k):
        raise AssertionError("pinned memory on a CPU loader")
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pin)
    real_empty = torch.empty

    def empty(*a, **k):
        assert not k.get("pin_memory"), "pinned buffer on a CPU loader"
        return real_empty(*a, **k)
    monkeypatch.setattr(torch, "empty", empty)
    batches = list(ActivationLoader(small_store, HOOK, _cfg(shards=2)).batches(12))
    assert all(b.device.type == "cpu" and not b.is_pinned() for b in batches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_group_buffers_are_pinned(small_store):
    ld = ActivationLoader(small_store, HOOK, _cfg(), device="cuda")
    src = []
    real = torch.Tensor.to

    def to(self, *a, **k):
        src.append((self.is_pinned(), k.get("non_blocking")))
        return real(self, *a, **k)
    torch.Tensor.to = to
    try:
        out = list(ld.batches(6))
    finally:
        torch.Tensor.to = real
    assert src and all(p and nb for p, nb in src) and all(b.is_cuda for b in out)
    two = [torch.cat([a, b]).cpu() for a, b in zip(*(ld.batches(6) for ld in _ranks(small_store, 2, B // 2)))]
    ones = [b.cpu() for b in ActivationLoader(small_store, HOOK, _cfg(shards=2), device="cuda").batches(6)]
    assert all(torch.equal(a, b) for a, b in zip(ones, two))
