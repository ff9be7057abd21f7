"""Bad input to ``sae train / eval / export / compare / profile-memory`` (issue 12, the sae half).

Each case must exit 2 with one line naming the problem (``error: ...``, no traceback), and leave
every store, run, export and file of the test's world byte-for-byte as it was: every file is
hashed before and after, and no path may appear or disappear (a refused run writes no config.json).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from sae_cli import app
from synthetic import HOOK, sparse_data, write_store
from trainer import artifacts as A
from trainer.config import RunConfig
from trainer.train import train

runner = CliRunner()


@dataclass(frozen=True)
class World:
    root: Path
    store: Path
    run: Path  # a finished run
    run_args: list[str]  # the sae train options that made it
    export: Path  # its SAELens export
    damaged: Path  # a copy of the run with sae.safetensors cut in half
    file: Path  # a regular file
    notrun: Path  # a directory that is neither a run nor an export

    @property
    def new(self) -> str:
        return str(self.root / "new")  # must never appear

    def train(self, *extra: str) -> list[str]:
        return ["train", "--store", str(self.store), "--out", self.new, "--d-sae", "32", "--batch-size", "64",
                "--n-tokens", str(64 * 4), "--device", "cpu", "--quiet", *extra]

    def config(self, name: str, text: str) -> list[str]:
        path = self.root / "configs" / name
        assert path.read_text() == text  # written by the fixture: the snapshot covers it
        return ["train", "--store", str(self.store), "--out", self.new, "--device", "cpu", "--quiet", "--config", str(path)]


CONFIGS = {
    "types.json": json.dumps({"d_sae": "big"}),
    "bool.json": json.dumps({"prefetch": "yes"}),
    "unknown.json": json.dumps({"learning_rate": 1}),
    "list.json": json.dumps([1, 2]),
    "broken.json": "{",
    "frac.json": json.dumps({"lr_warmup_frac": 2}),
    "clip.json": json.dumps({"grad_clip": -1.0}),
    "shards.json": json.dumps({"shards": 0}),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    x, _ = sparse_data(n=16 * 16 * 8, d=16, n_features=24, k=3, seed=1)
    store = write_store(root / "s.zarr", x * 5.0)  # 8 chunks of 256 rows
    flat = dict(store=str(store), out=str(root / "run"), arch="topk", d_sae=32, k=3, batch_size=64, n_tokens=64 * 8,
                device="cpu", log_every=4, checkpoint_every=4, seed=3)
    train(RunConfig.from_flat(flat))
    run_args = [a for k, v in flat.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    export = root / "export"
    res = runner.invoke(app, ["export", str(root / "run"), "--out", str(export)])
    assert res.exit_code == 0, res.output
    damaged = root / "damaged"
    shutil.copytree(root / "run", damaged)
    w = damaged / A.WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (root / "file.txt").write_text("not a directory\n")
    (root / "notrun").mkdir()
    (root / "notrun" / "keep.txt").write_text("someone's notes\n")
    (root / "configs").mkdir()
    for name, text in CONFIGS.items():
        (root / "configs" / name).write_text(text)
    return World(root, store, root / "run", run_args, export, damaged, root / "file.txt", root / "notrun")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: the sha256 of a file, "dir" for a directory."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


Case = Callable[[World], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    # sae train: every field validated before anything is written
    "lr-negative": (lambda w: w.train("--lr", "-0.001"), "--lr -0.001 must be a positive finite number"),
    "lr-nan": (lambda w: w.train("--lr", "nan"), "--lr nan must be a positive finite number"),
    "lr-inf": (lambda w: w.train("--lr", "inf"), "--lr inf must be a positive finite number"),
    "log-every-0": (lambda w: w.train("--log-every", "0"), "--log-every 0 must be >= 1"),
    "checkpoint-every-0": (lambda w: w.train("--checkpoint-every", "0"), "--checkpoint-every 0 must be >= 1"),
    "n-tokens-negative": (lambda w: w.train("--n-tokens", "-256"), "--n-tokens -256 must be positive"),
    "d-sae-negative": (lambda w: w.train("--d-sae", "-5"), "--d-sae -5 must be positive"),
    "k-0": (lambda w: w.train("--k", "0"), "--k 0 must be >= 1"),
    "k-over-d-sae": (lambda w: w.train("--k", "33"), "--k 33 must be in 1..d_sae (32)"),
    "k-end-over-k-start": (lambda w: w.train("--arch", "dyncorr", "--k-start", "2", "--k-end", "3"), "k must not grow"),
    "beta-0": (lambda w: w.train("--arch", "dyncorr", "--k-start", "8", "--k-end", "4", "--beta", "0"), "--beta 0.0 must be in (0, 1]"),
    "beta-over-1": (lambda w: w.train("--beta", "1.5"), "--beta 1.5 must be in (0, 1]"),
    "eps-negative": (lambda w: w.train("--eps", "-1"), "--eps -1.0 must be a finite number >= 0 (0 = no damping"),
    "eps-nan": (lambda w: w.train("--eps", "nan"), "--eps nan must be a finite number >= 0"),
    "lambda-max-negative": (lambda w: w.train("--lambda-max", "-0.1"), "--lambda-max -0.1 must be a finite number >= 0"),
    "sparsity-penalty-inf": (lambda w: w.train("--sparsity-penalty", "inf"), "--sparsity-penalty inf must be a finite"),
    "dead-after-tokens-0": (lambda w: w.train("--dead-after-tokens", "0"), "--dead-after-tokens 0 must be >= 1"),
    "batch-size-0": (lambda w: w.train("--batch-size", "0"), "--batch-size 0 must be >= 1"),
    "epochs-0": (lambda w: w.train("--epochs", "0"), "--epochs 0 must be >= 1"),
    "seed-negative": (lambda w: w.train("--seed", "-1"), "--seed -1 must be >= 0"),
    "shuffle-buffer-0": (lambda w: w.train("--shuffle-buffer-mb", "0"), "--shuffle-buffer-mb 0.0 must be a positive size"),
    "heldout-chunks-negative": (lambda w: w.train("--heldout-chunks", "-1"), "--heldout-chunks -1 must be >= 0"),
    "heldout-chunks-all": (lambda w: w.train("--heldout-chunks", "8"), "leaves no training chunks"),
    "arch-unknown": (lambda w: w.train("--arch", "gated"), "unknown arch 'gated'"),
    "normalize-unknown": (lambda w: w.train("--normalize", "layer_norm"), "--normalize 'layer_norm': use one of"),
    "device-unknown": (lambda w: w.train("--device", "tpu"), "--device 'tpu': use auto, cpu, cuda or cuda:N"),
    "config-wrong-type": (lambda w: w.config("types.json", CONFIGS["types.json"]), "d_sae='big' is a str, expected int"),
    "config-bool-as-str": (lambda w: w.config("bool.json", CONFIGS["bool.json"]), "prefetch='yes' is a str, expected bool"),
    "config-unknown-field": (lambda w: w.config("unknown.json", CONFIGS["unknown.json"]), "unknown config keys learning_rate"),
    "config-not-an-object": (lambda w: w.config("list.json", CONFIGS["list.json"]), "not an object of fields"),
    "config-invalid-json": (lambda w: w.config("broken.json", CONFIGS["broken.json"]), "cannot read --config"),
    "config-fraction": (lambda w: w.config("frac.json", CONFIGS["frac.json"]), "--lr-warmup-frac 2 must be in [0, 1]"),
    "config-grad-clip": (lambda w: w.config("clip.json", CONFIGS["clip.json"]), "--grad-clip -1.0 must be a finite number >= 0"),
    "config-shards-0": (lambda w: w.config("shards.json", CONFIGS["shards.json"]), "shards=0: use a positive number"),
    "too-many-tokens": (lambda w: w.train("--n-tokens", str(10**7)), "pass --epochs N or lower --n-tokens"),
    "batch-over-tokens": (lambda w: w.train("--batch-size", "4096", "--n-tokens", "512"), "--batch-size 4096 is larger than"),
    "store-missing": (lambda w: w.train("--store", str(w.root / "none.zarr")), "is not a store"),
    "store-is-a-run": (lambda w: w.train("--store", str(w.run)), "is not a store"),
    "hook-missing": (lambda w: w.train("--hook", "blocks.9.hook_resid_post"), "is not in store"),
    "sweep-no-values": (lambda w: w.train("--sweep", "d_sae"), "--sweep 'd_sae': write FIELD=V1,V2"),
    "sweep-unknown-field": (lambda w: w.train("--sweep", "width=1,2"), "unknown field 'width'"),
    "sweep-bad-value": (lambda w: w.train("--sweep", "d_sae=16,-4"), "--d-sae -4 must be positive"),
    # sae train: the run directory
    "out-is-a-file": (lambda w: w.train("--out", str(w.file)), "is a file, not a directory"),
    "out-under-a-file": (lambda w: w.train("--out", str(w.file / "run")), "is a file, not a directory"),
    "out-not-a-run": (lambda w: w.train("--out", str(w.notrun)), "exists and is not a run directory"),
    "resume-missing-dir": (lambda w: w.train("--resume"), "nothing to resume"),
    "resume-not-a-run": (lambda w: w.train("--out", str(w.notrun), "--resume"), "nothing to resume"),
    "existing-run": (lambda w: ["train", "--quiet", *w.run_args], "holds another run: pass --resume"),
    "resume-other-parameters": (lambda w: ["train", "--quiet", *w.run_args, "--lr", "0.01", "--resume"], "cannot resume"),
    "resume-and-overwrite": (lambda w: ["train", "--quiet", *w.run_args, "--resume", "--overwrite"], "exclude each other"),
    # sae eval
    "eval-missing-run": (lambda w: ["eval", str(w.root / "none"), "--no-splice"], "does not exist"),
    "eval-not-a-run": (lambda w: ["eval", str(w.notrun), "--no-splice"], "is not a run directory"),
    "eval-truncated-weights": (lambda w: ["eval", str(w.damaged), "--no-splice", "--device", "cpu"],
                               f"{A.WEIGHTS} (Error while deserializing header"),
    "eval-unknown-split": (lambda w: ["eval", str(w.run), "--no-splice", "--split", "bogus", "--device", "cpu"],
                           "unknown split 'bogus'"),
    "eval-store-missing": (lambda w: ["eval", str(w.run), "--no-splice", "--store", str(w.root / "none.zarr"),
                                      "--device", "cpu"], "is not a store"),
    # sae export
    "export-out-is-a-file": (lambda w: ["export", str(w.run), "--out", str(w.file)], "is a file: choose a directory"),
    "export-out-exists": (lambda w: ["export", str(w.run), "--out", str(w.export)], "pass --overwrite to replace it"),
    "export-out-not-an-export": (lambda w: ["export", str(w.run), "--out", str(w.notrun), "--overwrite"],
                                 "is not a SAELens export"),
    "export-truncated-weights": (lambda w: ["export", str(w.damaged), "--out", w.new], f"{A.WEIGHTS} (Error while deserializing header"),
    "export-unknown-format": (lambda w: ["export", str(w.run), "--out", w.new, "--format", "onnx"], "unknown format 'onnx'"),
    "export-missing-run": (lambda w: ["export", str(w.root / "none"), "--out", w.new], "does not exist"),
    "export-not-a-run": (lambda w: ["export", str(w.notrun), "--out", w.new], "is not a run directory"),
    # sae compare
    "compare-missing-run": (lambda w: ["compare", str(w.root / "none"), "--out", w.new], "does not exist"),
    "compare-not-a-run": (lambda w: ["compare", str(w.notrun), "--out", w.new], "has no config.json"),
    # sae profile-memory (profiling/: the cases that already give exit 2)
    "profile-d-sae-negative": (lambda w: ["profile-memory", "--no-extract", "--d-sae", "-5"], "--d-sae -5 must be > 0"),
    "profile-arch-unknown": (lambda w: ["profile-memory", "--no-extract", "--arch", "gated"], "unknown arch 'gated'"),
    "profile-budget": (lambda w: ["profile-memory", "--no-extract", "--budget", "lots"], "--budget 'lots' is not a size"),
    "profile-k-grows": (lambda w: ["profile-memory", "--no-extract", "--k-start", "2", "--k-end", "3"], "k must not grow"),
    "profile-run-not-a-run": (lambda w: ["profile-memory", "--no-extract", "--run", str(w.notrun)], "no readable config.json"),
    "profile-out-is-a-dir": (lambda w: ["profile-memory", "--no-extract", "--d-sae", "2304", "--arch", "topk",
                                        "--dtype", "float32", "--out", str(w.notrun)], "cannot write --out"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(world, name):
    make_args, needle = CASES[name]
    args = make_args(world)
    before = snapshot(world.root)
    res = runner.invoke(app, args)
    out = res.output.strip()
    assert res.exit_code == 2, f"{args}: exit {res.exit_code}\n{out}\n{res.exception!r}"
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in out and len(out.splitlines()) == 1 and out.startswith("error:"), out
    assert needle in out, out
    assert snapshot(world.root) == before, f"{name} changed the files"


def test_the_corrected_command_runs_after_a_refused_one(world, tmp_path):
    """A refused run leaves nothing that blocks the next command: no config.json to trip
    "holds another run" or a resume check against the bad value."""
    out = tmp_path / "run"
    args = ["train", "--store", str(world.store), "--out", str(out), "--d-sae", "32", "--batch-size", "64",
            "--n-tokens", str(64 * 4), "--device", "cpu", "--quiet"]
    assert runner.invoke(app, args + ["--lr", "-0.001"]).exit_code == 2
    assert not out.exists()
    res = runner.invoke(app, args + ["--lr", "0.001"])
    assert res.exit_code == 0, res.output
    assert (out / A.WEIGHTS).exists()


def test_messages_name_the_damaged_file(world):
    """The truncated sae.safetensors is named by path, with the fix."""
    for args in (["eval", str(world.damaged), "--no-splice", "--device", "cpu"],
                 ["export", str(world.damaged), "--out", world.new]):
        out = runner.invoke(app, args).output
        assert str(world.damaged / A.WEIGHTS) in out and "retrain the run" in out, out


def test_every_hook_of_the_world_is_used(world):
    """Guard against a world whose run silently trained on nothing."""
    summary = json.loads((world.run / A.SUMMARY).read_text())
    assert summary["steps"] == 8 and json.loads((world.run / A.CONFIG).read_text())["hook"] == HOOK
