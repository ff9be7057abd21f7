"""End-to-end extraction on the tiny Gemma-2: contents, layout, attributes, statistics."""

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from actcache import store as S
from actcache.capture import ResidualCapture
from actcache.dtypes import to_float32
from actcache.extract import extract
from actcache.hooks import parse_hooks
from actcache.models import load_model
from conftest import small_config

HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


def test_plain_zarr_and_dask_can_read(small_store):
    g = zarr.open_group(str(small_store), mode="r")
    assert g.attrs["format"] == {"name": "actcache", "version": S.FORMAT_VERSION}
    for h in HOOKS:
        arr = g[h]
        assert arr.shape == (24 * 32, 64) and arr.dtype == np.uint16 and arr.chunks == (128, 64)
        assert arr.attrs["logical_dtype"] == "bfloat16"
        assert da.from_zarr(arr).shape == arr.shape
    assert g[S.TOKENS].dtype == np.int32 and g[S.TOKENS].shape == (24 * 32,)


def test_attributes_describe_the_run(small_store):
    a = S.open_store(small_store).attrs
    assert a["hooks"] == HOOKS and a["layers"] == [1, 3] and a["d_model"] == 64
    assert a["context_size"] == 32 and a["prepend_bos"] is True and a["dtype"] == "bfloat16"
    assert a["model"]["id"] == "embedded:tiny-gemma2" and len(a["model"]["config_hash"]) == 64
    assert a["model"]["architecture"] == "Gemma2ForCausalLM"
    assert a["dataset"]["path"] == "embedded:stdlib-docstrings" and len(a["dataset"]["sha256"]) == 64
    assert a["seed"] == 7 and a["package_version"] and a["created"] and a["tokenizer_id"]
    assert a["complete"] is True


def test_rows_equal_a_direct_forward_of_the_stored_windows(small_store):
    st = S.open_store(small_store)
    compute = {"bfloat16": torch.bfloat16, "float32": torch.float32}[st.attrs["compute_dtype"]]
    lm = load_model("embedded:tiny-gemma2", dtype=compute, device="cpu")
    windows = st.group[S.WINDOWS][:]
    assert (windows[:, 0] == lm.tokenizer.bos_token_id).all()
    with ResidualCapture(lm.model, parse_hooks(HOOKS)) as cap:
        acts = cap.run(torch.from_numpy(windows[:4].astype(np.int64)))
    for h in HOOKS:
        got = st.read_chunk(h, 0)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, acts[h].reshape(-1, 64).to(torch.bfloat16))


def test_tokens_window_position_rows(small_store):
    st = S.open_store(small_store)
    g = st.group
    windows, tokens = g[S.WINDOWS][:], g[S.TOKENS][:]
    w, p = g[S.WINDOW][:], g[S.POSITION][:]
    np.testing.assert_array_equal(tokens, windows[w, p])
    assert p[:32].tolist() == list(range(32))


def test_windows_are_shuffled_so_chunks_mix_documents(small_store):
    src = S.open_store(small_store).group[S.WINDOW_SOURCE][:]
    assert sorted(src.tolist()) == list(range(24))
    assert src.tolist() != list(range(24))
    first_chunk = src[:4]
    assert first_chunk.max() - first_chunk.min() > 4  # not four neighbouring windows


def test_statistics_match_float64_reference(small_store):
    st = S.open_store(small_store)
    for h in HOOKS:
        x = to_float32(st.array(h)[:], "bfloat16").astype(np.float64)
        assert np.isfinite(x).all()
        s = st.stats(h)
        np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-6, atol=1e-9)
        norms = np.linalg.norm(x, axis=1)
        assert s.mean_sq_norm == pytest.approx((norms**2).mean(), rel=1e-5)
        assert s.mean_norm == pytest.approx(norms.mean(), rel=1e-5)
        assert s.n_rows == 24 * 32


def test_exclude_bos_and_float32_and_uncompressed(tmp_path):
    out = extract(small_config(tmp_path / "s.zarr", exclude_bos=True, dtype="float32", codec="none",
                               hooks=("blocks.0.hook_resid_pre",), n_tokens=31 * 8))
    st = S.open_store(out)
    assert st.layout.rows_per_window == 31 and st.n_rows == 31 * 8
    assert st.array("blocks.0.hook_resid_pre").dtype == np.float32
    assert (st.group[S.POSITION][:] >= 1).all()
    # Uncompressed chunks are raw little-endian bytes followed by their 4-byte crc32c: a memory map reads them.
    chunk = out / "blocks.0.hook_resid_pre" / "c" / "0" / "0"
    import google_crc32c

    raw = chunk.read_bytes()
    assert int.from_bytes(raw[-4:], "little") == google_crc32c.value(raw[:-4])
    mm = np.memmap(chunk, dtype="<f4", mode="r", shape=((len(raw) - 4) // 4,)).reshape(-1, 64)
    np.testing.assert_array_equal(mm, st.read_rows("blocks.0.hook_resid_pre", 0, len(mm)))


def test_same_seed_same_store_other_seed_other_order(tmp_path, small_store):
    a = extract(small_config(tmp_path / "a.zarr"))
    b = extract(small_config(tmp_path / "b.zarr", seed=8))
    ga, gb, g0 = (zarr.open_group(str(p), mode="r") for p in (a, b, small_store))
    for h in HOOKS:
        np.testing.assert_array_equal(ga[h][:], g0[h][:])
    assert not np.array_equal(gb[S.WINDOW_SOURCE][:], g0[S.WINDOW_SOURCE][:])
    # Same windows, other order: the multiset of token windows is unchanged.
    assert sorted(map(tuple, gb[S.WINDOWS][:])) == sorted(map(tuple, g0[S.WINDOWS][:]))


@pytest.mark.parametrize("compute", ["bfloat16", "float32"])
def test_compute_dtype_is_honoured_and_recorded(tmp_path, compute):
    out = extract(small_config(tmp_path / "s.zarr", compute_dtype=compute, n_tokens=32 * 4))
    st = S.open_store(out)
    assert st.attrs["compute_dtype"] == compute and st.logical_dtype == "bfloat16"
    lm = load_model("embedded:tiny-gemma2", dtype=getattr(torch, compute), device="cpu")
    with ResidualCapture(lm.model, parse_hooks(HOOKS)) as cap:
        acts = cap.run(torch.from_numpy(st.group[S.WINDOWS][:].astype(np.int64)))
    assert torch.equal(st.read_chunk(HOOKS[0], 0), acts[HOOKS[0]].reshape(-1, 64).to(torch.bfloat16))
