"""The actcache half of the bad-input battery: every case exits 2 with one line naming the problem
and the fix (verify's findings: exit 1), no traceback, and every store already on disk is
byte-for-byte unchanged; an extract that fails leaves no new directory behind."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from actcache import store as S
from actcache.cli import app

runner = CliRunner()
HOOK = "blocks.1.hook_resid_post"
NEW = "{tmp}/new.zarr"  # where an extract would write: must not exist afterwards


def _extract(*extra: str, out: str = NEW) -> list[str]:
    base = {"--model": "embedded:tiny-gemma2", "--hooks": HOOK, "--context-size": "32", "--n-tokens": "256",
            "--chunk-rows": "64", "--device": "cpu", "--out": out}
    args = list(extra)
    for k, v in base.items():
        if k not in args:
            args += [k, v]
    return ["extract", *args, "--quiet"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_store):
    """Files and stores the cases point at; every one of them is hashed before and after each case."""
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "junk.bin").write_bytes(bytes(range(256)) * 8)
    (d / "junk.txt").write_bytes(bytes(range(256)) * 8)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (d / "nofield.jsonl").write_text(json.dumps({"body": "hello " * 200}) + "\n")
    (d / "a-file").write_text("not a directory")
    (d / "notstore").mkdir()
    (d / "notstore" / "precious.txt").write_text("keep me")
    shutil.copytree(small_store, d / "store.zarr")
    for name, target in [("root-json.zarr", "zarr.json"), ("hook-json.zarr", f"{HOOK}/zarr.json")]:
        shutil.copytree(small_store, d / name)
        text = (d / name / target).read_text()
        (d / name / target).write_text(text[: len(text) // 2])  # half-written
    shutil.copytree(small_store, d / "future.zarr")
    g = zarr.open_group(str(d / "future.zarr"), mode="r+")
    g.attrs["format"] = {"name": "actcache", "version": S.FORMAT_VERSION + 1}
    zarr.open_group(str(d / "plain.zarr"), mode="w").attrs["hello"] = "world"
    shutil.copytree(small_store, d / "flipped.zarr")
    chunk = d / "flipped.zarr" / HOOK / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return d


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (id, argv with {tmp}, expected exit code, needles that the one line must hold)
CASES = [
    ("dataset-binary-ext", _extract("--dataset", "{tmp}/junk.bin"), 2, ["junk.bin", "unsupported dataset file"]),
    ("dataset-binary-txt", _extract("--dataset", "{tmp}/junk.txt"), 2, ["binary file", "UTF-8"]),
    ("dataset-not-utf8", _extract("--dataset", "{tmp}/latin1.txt"), 2, ["not UTF-8", "convert it"]),
    ("dataset-bad-json", _extract("--dataset", "{tmp}/bad.jsonl"), 2, ["line 2 is not valid JSON"]),
    ("dataset-no-field", _extract("--dataset", "{tmp}/nofield.jsonl"), 2, ["--text-field"]),
    ("dataset-missing", _extract("--dataset", "{tmp}/none.txt"), 2, ["does not exist"]),
    ("dataset-embedded-unknown", _extract("--dataset", "embedded:nope"), 2, ["unknown embedded dataset"]),
    ("context-1-exclude-bos", _extract("--context-size", "1", "--exclude-bos"), 2, ["--context-size 1", "at least 2"]),
    ("context-0", _extract("--context-size", "0"), 2, ["--context-size", ">= 1"]),
    ("context-too-long", _extract("--context-size", "100000"), 2, ["exceeds the model"]),
    ("n-tokens-negative", _extract("--n-tokens", "-256"), 2, ["--n-tokens", "positive"]),
    ("n-tokens-zero", _extract("--n-tokens", "0"), 2, ["--n-tokens", "positive"]),
    ("batch-size-0", _extract("--batch-size", "0"), 2, ["--batch-size", ">= 1"]),
    ("chunk-rows-negative", _extract("--chunk-rows", "-5"), 2, ["--chunk-rows", ">= 1"]),
    ("seed-negative", _extract("--seed", "-1"), 2, ["--seed -1"]),
    ("workers-negative", _extract("--workers", "-1"), 2, ["--workers -1"]),
    ("hook-unknown", _extract("--hooks", "blocks.1.hook_attn_out"), 2, ["unknown hook name"]),
    ("hook-out-of-range", _extract("--hooks", "blocks.99.hook_resid_post"), 2, ["out of range"]),
    ("hook-twice", _extract("--hooks", f"{HOOK},{HOOK}"), 2, ["listed twice"]),
    ("hooks-empty", _extract("--hooks", ","), 2, ["no hooks given"]),
    ("model-missing", _extract("--model", "{tmp}/no-model"), 2, ["does not exist"]),
    ("dtype-unknown", _extract("--dtype", "int8"), 2, ["unknown dtype"]),
    ("compute-dtype-unknown", _extract("--compute-dtype", "float64"), 2, ["unknown dtype"]),
    ("codec-unknown", _extract("--codec", "gzip"), 2, ["unknown codec"]),
    ("codec-level-bad", _extract("--codec", "zstd-x"), 2, ["unknown codec"]),
    ("device-unknown", _extract("--device", "tpu"), 2, ["device"]),
    ("exclude-bos-without-bos", _extract("--exclude-bos", "--no-prepend-bos"), 2, ["--exclude-bos needs BOS"]),
    ("out-existing-store", _extract(out="{tmp}/store.zarr"), 2, ["already exists", "--resume", "--overwrite"]),
    ("out-resume-and-overwrite", _extract("--resume", "--overwrite", out="{tmp}/store.zarr"), 2, ["exclude each other"]),
    ("out-resume-other-params", _extract("--resume", out="{tmp}/store.zarr"), 2, ["cannot resume"]),
    ("out-is-a-file", _extract(out="{tmp}/a-file"), 2, ["is a file"]),
    ("out-not-a-store", _extract("--overwrite", out="{tmp}/notstore"), 2, ["not an actcache store"]),
    ("out-resume-damaged-json", _extract("--resume", out="{tmp}/root-json.zarr"), 2, ["zarr.json is damaged"]),
    ("out-url-scheme", _extract(out="ftp://host/s.zarr"), 2, ["unsupported store URL scheme"]),
    ("out-memory-with-workers", _extract("--workers", "2", out="memory://bad/s.zarr"), 2, ["this process only"]),
    ("info-missing", ["info", "{tmp}/none.zarr"], 2, ["not a store"]),
    ("info-file", ["info", "{tmp}/a-file"], 2, ["is a file"]),
    ("info-root-json", ["info", "{tmp}/root-json.zarr"], 2, ["root-json.zarr/zarr.json is damaged"]),
    ("info-hook-json", ["info", "--json", "{tmp}/hook-json.zarr"], 2, [f"{HOOK}/zarr.json is damaged"]),
    ("info-plain-zarr", ["info", "{tmp}/plain.zarr"], 2, ["not an actcache store"]),
    ("info-future-format", ["info", "{tmp}/future.zarr"], 2, ["newer than this actcache reads", "upgrade"]),
    ("verify-root-json", ["verify", "{tmp}/root-json.zarr"], 2, ["zarr.json is damaged", "--overwrite"]),
    ("verify-hook-json", ["verify", "{tmp}/hook-json.zarr"], 2, [f"{HOOK}/zarr.json is damaged"]),
    ("verify-recompute-negative", ["verify", "{tmp}/store.zarr", "--recompute", "-1"], 2, ["--recompute -1"]),
    ("verify-device-unknown", ["verify", "{tmp}/store.zarr", "--recompute", "1", "--device", "tpu"], 2, ["device"]),
    ("verify-missing", ["verify", "{tmp}/none.zarr"], 2, ["not a store"]),
    ("verify-flipped-byte", ["verify", "{tmp}/flipped.zarr"], 1, [f"{HOOK} chunk 2", "checksum mismatch"]),
]


@pytest.mark.parametrize("argv,code,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(env, tiny_model_dir, argv, code, needles):
    argv = [a.replace("{tmp}", str(env)) for a in argv]
    before = _hashes(env)
    r = runner.invoke(app, argv)
    out = r.output.strip()
    assert r.exit_code == code, out
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in out
    lines = out.splitlines()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error:"), out
    else:  # verify's findings: one line per problem, then the summary
        assert all(line.startswith(("problem:", "error:")) for line in lines), out
    for n in needles:
        assert n in out, out
    assert _hashes(env) == before
    assert not (env / "new.zarr").exists()  # a failed extract leaves nothing behind


def test_at_least_twenty_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20
