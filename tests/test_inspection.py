"""actcache info / verify, including the damage verify must catch."""

import json
import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from actcache import store as S
from actcache.cli import app
from actcache.inspection import store_info, verify_store

runner = CliRunner()
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def store_copy(small_store, tmp_path):
    dst = tmp_path / "copy.zarr"
    shutil.copytree(small_store, dst)
    return dst


def test_info_reports_layout_and_bytes(small_store):
    d = store_info(small_store)
    assert d["complete"] and d["n_rows"] == 768 and d["n_chunks"] == 6 and d["chunks_done"] == 6
    h = d["hooks"][0]
    assert h["bytes_raw"] == 768 * 64 * 2
    on_disk = sum(p.stat().st_size for p in (small_store / h["hook"]).rglob("*") if p.is_file())
    assert h["bytes_on_disk"] == on_disk and h["ratio"] == pytest.approx(h["bytes_raw"] / on_disk)
    r = runner.invoke(app, ["info", str(small_store), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["n_rows"] == 768
    r = runner.invoke(app, ["info", str(small_store)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and HOOK in r.output and "bfloat16 (stored as uint16)" in r.output


def test_verify_passes_on_a_good_store_with_recompute(small_store):
    rep = verify_store(small_store, recompute=3, device="cpu")
    assert rep.ok, rep.problems
    assert rep.chunks_checked == 6 and rep.windows_recomputed == 3
    assert rep.max_recompute_error is not None and rep.max_recompute_error < 2e-2


def test_verify_names_a_corrupted_chunk(store_copy):
    chunk = store_copy / HOOK / "c" / "2" / "0"
    chunk.write_bytes(b"garbage" + chunk.read_bytes()[7:])
    rep = verify_store(store_copy)
    assert not rep.ok and any(f"{HOOK} chunk 2" in p for p in rep.problems)
    r = runner.invoke(app, ["verify", str(store_copy)])
    assert r.exit_code == 1 and "chunk 2" in r.output


def test_verify_flags_nan_and_inf(store_copy):
    arr = zarr.open_group(str(store_copy), mode="r+")[HOOK]
    row = arr[130]
    row[3] = 0x7FC0  # bfloat16 NaN
    row[4] = 0x7F80  # bfloat16 +Inf
    arr[130] = row
    rep = verify_store(store_copy)
    assert rep.problems == [f"{HOOK} chunk 1: 2 NaN/Inf values"]


def test_verify_flags_an_incomplete_manifest(store_copy):
    zarr.open_group(str(store_copy), mode="r+")[S.MANIFEST][4] = 0
    rep = verify_store(store_copy)
    assert any("manifest incomplete: 1 of 6" in p for p in rep.problems)


def test_recompute_catches_activations_that_are_not_the_model_s(store_copy):
    arr = zarr.open_group(str(store_copy), mode="r+")[HOOK]
    a = arr[:]
    arr[:] = np.roll(a, 1, axis=1)  # finite, plausible, but wrong
    rep = verify_store(store_copy, recompute=2, device="cpu")
    assert not rep.ok and all("recomputed activations differ" in p for p in rep.problems)


def test_verify_flags_a_missing_chunk_file(store_copy):
    (store_copy / HOOK / "c" / "3" / "0").unlink()
    rep = verify_store(store_copy)
    assert any(f"{HOOK} chunk 3: chunk file is missing" in p for p in rep.problems)
