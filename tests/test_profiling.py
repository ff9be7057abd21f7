"""sae profile-memory: the memory model against real tensors and real measured peaks, the CLI."""

import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from profiling.cli import PIN_MALLOC, profile_memory
from profiling.extract_side import (ExtractSpec, ModelShape, estimate_extraction, measured_part, model_config,
                                    model_shape)
from profiling.measure import _harness_class, measure_training, measure_trainings, run_child
from profiling.cov_cost import covariance_cost
from profiling.model import TrainSpec, covariance_bytes, estimate_training, loader_bytes, train_spec, unique_pairs
from profiling.plan import parse_size, store_shape
from trainer.config import RunConfig
from trainer.saes import build_sae
from trainer.saes.covariance import LatentStatistics

TOLERANCE = 0.10  # |predicted / measured - 1| for the training step (the allocators' deterministic peak)
REPEAT = 0.02  # two measurements of one configuration
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
app.callback()(lambda: None)
app.command("profile-memory")(profile_memory)
runner = CliRunner()
QUICK = ["profile-memory", "--no-extract", "--device", "cpu"]

# Small configs whose peaks are different phases: baseline's B x d_sae int64 cast, AuxK's dense
# (B, n_dead) blocks with every latent dead (the default) and with a quarter dead (W_dec's
# dead rows and the encoder backward then matter: d_in 256), the dyncorr penalty's unique pairs
# (+ its covariance buffer), through its dense-triangle path (the first two) and its sorted one
# (the last: its triangle is 24x its row pairs). name -> (flat config, d_in, dead fraction)
MEASURED = {
    "baseline": ({"arch": "baseline", "d_sae": 4096, "batch_size": 1024}, 32, 1.0),
    "baseline-wide": ({"arch": "baseline", "d_sae": 2048, "batch_size": 512}, 256, 1.0),
    "topk": ({"arch": "topk", "d_sae": 8192, "batch_size": 1024}, 32, 1.0),
    "topk-quarter-dead": ({"arch": "topk", "d_sae": 4096, "batch_size": 1024, "k_aux": 256}, 256, 0.25),
    "dyncorr": ({"arch": "dyncorr", "d_sae": 1024, "batch_size": 1024, "k_start": 64}, 32, 1.0),
    "dyncorr-none-dead": ({"arch": "dyncorr", "d_sae": 2048, "batch_size": 512, "k_start": 48}, 64, 0.0),
    "dyncorr-sorted-pairs": ({"arch": "dyncorr", "d_sae": 3072, "batch_size": 256, "k_start": 48}, 32, 0.0),
}
# CUDA steps traced on CPU tensors (bf16 autocast, the torch penalty path): the --target cuda model.
TRACED_CUDA = {
    "cuda-baseline": ({"arch": "baseline", "d_sae": 4096, "batch_size": 1024}, 64, 1.0),
    "cuda-topk": ({"arch": "topk", "d_sae": 4096, "batch_size": 1024}, 64, 1.0),
    "cuda-topk-quarter-dead": ({"arch": "topk", "d_sae": 4096, "batch_size": 1024, "k_aux": 256}, 256, 0.25),
    "cuda-dyncorr": ({"arch": "dyncorr", "d_sae": 1024, "batch_size": 1024, "k_start": 64}, 32, 1.0),
}
# One thread per child: the measurements run side by side on a small machine.
ENV = {**PIN_MALLOC, "OMP_NUM_THREADS": "1"}


def _spec(flat: dict, d_in: int, dead_fraction: float = 1.0) -> TrainSpec:
    cfg = RunConfig.from_flat({"device": "cpu", **flat})
    return train_spec(replace(cfg, sae=cfg.sae.resolved(d_in)), dead_fraction=dead_fraction)


def _extract_setup(tmp: Path) -> tuple[ExtractSpec, ModelShape]:
    from transformers import Gemma2Config

    Gemma2Config(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=96, vocab_size=32000).save_pretrained(tmp)
    spec = ExtractSpec(model=str(tmp), hook_layer=2, compute_dtype="float32", context_size=64, batch=4)
    return spec, model_shape(model_config(str(tmp)), 2)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Every measurement at once, in four fresh subprocesses side by side: the CPU configurations
    one after the other in one (their allocators' peaks are each their own), the dyncorr
    configuration again in its own (the repeat), the CUDA traces in one, the extraction."""
    spec, _ = _extract_setup(tmp_path_factory.mktemp("extract"))

    def run(job):
        if job == "extract":
            return {"extract": run_child("extract", {"extract": vars(spec), "compute_dtype": "float32",
                                                     "n_windows": 8}, 300, ENV)}
        if job == "again":
            flat, d_in, dead = MEASURED["dyncorr"]
            return {"dyncorr-again": measure_training({"device": "cpu", **flat}, d_in, steps=2, env=ENV,
                                                      dead_fraction=dead)}
        configs = TRACED_CUDA if job == "cuda" else MEASURED
        items = [({"device": "cpu", **flat}, d_in, dead) for flat, d_in, dead in configs.values()]
        return dict(zip(configs, measure_trainings(items, steps=2, env=ENV, target="cuda" if job == "cuda" else "")))

    with ThreadPoolExecutor(4) as pool:
        out = {k: v for part in pool.map(run, ["cpu", "again", "cuda", "extract"]) for k, v in part.items()}
    return {**out, "extract_spec": spec}


@pytest.mark.parametrize("name", list(MEASURED))
def test_predicted_peak_within_tolerance_of_measured(measured, name):
    flat, d_in, dead = MEASURED[name]
    m = measured[name]
    assert m.peak_bytes, m.note
    est = estimate_training(_spec(flat, d_in, dead))
    ratio = est.step_total / m.peak_bytes
    assert abs(ratio - 1) <= TOLERANCE, (name, est.peak_phase, est.step_total, m.peak_bytes, ratio)


def test_measured_grid_takes_both_penalty_paths():
    """The CPU grid measures the fused penalty's dense-triangle path and its sorted one."""
    from profiling.model import _dense

    paths = {_dense(_spec(flat, d_in, dead)) for name, (flat, d_in, dead) in MEASURED.items() if "dyncorr" in name}
    assert paths == {True, False}


def test_repeated_measurements_agree(measured):
    a, b = measured["dyncorr"], measured["dyncorr-again"]
    assert a.peak_bytes and b.peak_bytes, (a.note, b.note)
    assert abs(a.peak_bytes / b.peak_bytes - 1) <= REPEAT, (a.peak_bytes, b.peak_bytes)
    assert a.numpy_bytes and a.torch_bytes and a.rss_bytes  # both allocators seen; RSS reported beside


@pytest.mark.parametrize("name", list(TRACED_CUDA))
def test_cuda_prediction_within_tolerance_of_the_traced_step(measured, name):
    flat, d_in, dead = TRACED_CUDA[name]
    m = measured[name]
    assert m.peak_bytes, m.note
    assert "CUDA step traced on CPU" in m.method
    cuda = replace(_spec(flat, d_in, dead), device="cuda", dtype="bfloat16")
    assert cuda.effective_dtype == "bfloat16"
    # The traced step runs CPU kernels. The differences the model knows: a bool sum's int64 copy
    # (CPU only); W_enc's gradient, which CUDA's sparse.mm builds from a zeros buffer (one
    # d_sae x d_in more than the CPU kernel that writes it once); AuxK's gradient mask, two
    # (B, n_dead) bool masks on CUDA (a kernel on CPU tensors).
    est = estimate_training(replace(cuda, traced_on_cpu=True))
    ratio = est.step_total / m.peak_bytes
    assert abs(ratio - 1) <= TOLERANCE, (name, est.peak_phase, est.step_total, m.peak_bytes, ratio)
    cuda_only = 4 * cuda.d_sae * cuda.d_in + 2 * cuda.batch_size * cuda.n_dead
    assert estimate_training(cuda).step_total <= est.step_total + cuda_only


@pytest.mark.parametrize("dead_fraction", [0.0, 0.3, 1.0])
def test_harness_marks_the_dead_latents_the_model_assumes(dead_fraction):
    from profiling.measure import dead_latents

    s = _spec({"arch": "topk", "d_sae": 100, "k_aux": 8}, 16, dead_fraction)
    dead = dead_latents(100, dead_fraction)
    assert len(dead) == s.n_dead == round(100 * dead_fraction) and len(set(dead.tolist())) == len(dead)
    assert s.ka == min(8, s.n_dead)
    assert _spec({"arch": "baseline", "d_sae": 100}, 16, dead_fraction).n_dead == 0
    if dead_fraction == 0:  # no dead latent: no AuxK phase
        assert not any("aux" in p for p in estimate_training(s).phases)


@pytest.mark.parametrize("d_sae,cov_dtype", [(1, "float32"), (300, "float32"), (777, "float64")])
def test_covariance_bytes_are_the_buffers_real_nbytes(d_sae, cov_dtype):
    stats = LatentStatistics(d_sae, beta=0.01, dtype=getattr(torch, cov_dtype))
    assert covariance_bytes(d_sae, cov_dtype) == stats.nbytes == stats.M_buf.nbytes + stats.mu.nbytes
    cfg = RunConfig.from_flat({"arch": "dyncorr", "d_sae": d_sae, "k_start": 1, "k_end": 1, "cov_dtype": cov_dtype})
    cfg = replace(cfg, sae=cfg.sae.resolved(8))
    sae = build_sae(cfg.sae)
    assert estimate_training(train_spec(cfg)).components["covariance"] == sae.stats.nbytes


@pytest.mark.parametrize("shards,prefetch", [(None, True), (2, True), (2, False)])
def test_parameter_and_loader_terms_match_the_real_objects(tmp_path, shards, prefetch):
    from synthetic import sparse_data, write_store
    from trainer.loader import ActivationLoader

    flat = {"arch": "topk", "d_sae": 96, "k": 4, "batch_size": 64, "shuffle_buffer_mb": 0.25, "shards": shards,
            "prefetch": prefetch}
    cfg = RunConfig.from_flat(flat)
    cfg = replace(cfg, sae=cfg.sae.resolved(40))
    sae = build_sae(cfg.sae)
    comps = estimate_training(train_spec(cfg, chunk_rows=256)).components
    assert comps["parameters"] == sum(p.nbytes for p in sae.parameters())
    assert comps["buffers"] == sum(b.nbytes for b in sae.buffers())
    # A real loader (8 chunks of 256 rows, 7 to train on): its bound, and its group buffers once
    # capped by a shard's share of the training chunks.
    x, _ = sparse_data(n=16 * 16 * 8, d=40, n_features=24, k=3)
    store = write_store(tmp_path / "s.zarr", x)
    loader = ActivationLoader(store, "blocks.0.hook_resid_post", cfg.loader)
    assert store_shape(str(store), 1) == (40, 256, 7, 0)  # uncompressed: memory-mapped, nothing decoded
    assert store_shape(str(store), 1, memmap=False)[3] == 4  # zarr decodes a float32 chunk
    ld = loader_bytes(train_spec(cfg, chunk_rows=256, decode_bytes=0))
    assert ld["groups"] + ld["batch"] == 4 * 40 * loader.rows_bound and ld["decoded_chunk"] == 0
    capped = loader_bytes(train_spec(cfg, chunk_rows=256, train_chunks=7, decode_bytes=2))
    n_bufs = loader.shards * (2 if prefetch else 1)
    assert capped["groups"] == n_bufs * 4 * 40 * loader._buffer_rows
    assert capped["decoded_chunk"] == loader.shards * 2 * 256 * 40


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A real Trainer (and its run dir) over a small synthetic store: 4 chunks of 256 rows, d = 16."""
    from synthetic import sparse_data, write_store
    from trainer.train import Trainer

    tmp = tmp_path_factory.mktemp("run")
    x, _ = sparse_data(n=16 * 16 * 4, d=16, n_features=24, k=3)
    store = write_store(tmp / "s.zarr", x)
    cfg = RunConfig.from_flat({"store": str(store), "out": str(tmp / "run"), "arch": "dyncorr", "d_sae": 32,
                               "k_start": 8, "k_end": 3, "batch_size": 64, "device": "cpu", "seed": 5})
    return Trainer(cfg)


def test_harness_builds_what_trainer_builds(trainer):
    from trainer.train import Trainer

    real = trainer
    harness = _harness_class()(real.cfg, real.device, real.n_steps)
    assert type(harness)._step is Trainer._step and type(harness)._ctx is Trainer._ctx
    assert type(harness.sae) is type(real.sae) and harness.sched == real.sched and harness.state == real.state
    for (n1, a), (n2, b) in zip(harness.sae.state_dict().items(), real.sae.state_dict().items()):
        assert n1 == n2 and (not torch.is_tensor(a) or torch.equal(a, b)), n1
    assert type(harness.opt) is type(real.opt) and harness.opt.defaults == real.opt.defaults
    assert [p.shape for p in harness.opt.param_groups[0]["params"]] == [p.shape for p in real.opt.param_groups[0]["params"]]
    assert harness.dp is real.dp and harness.sae.dp is real.sae.dp and torch.equal(harness.eig_block, real.eig_block)
    assert harness.loader_state == real.loader_state and harness.n_steps == real.n_steps
    # Every attribute the Trainer has, the harness has (store, loader, run dir as None).
    assert set(vars(real)) - {"_t0"} <= set(vars(harness)), set(vars(real)) - set(vars(harness))


def test_run_dir_profiles_its_store(trainer):
    r = runner.invoke(app, ["profile-memory", "--no-extract", "--run", str(trainer.paths.root), "--format", "json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)["rows"]
    assert (row["arch"], row["d_in"], row["d_sae"], row["k"], row["batch_size"]) == ("dyncorr", 16, 32, 8, 64)
    # The loader's groups hold at most the store's 3 training chunks of 256 rows (+ one batch).
    assert row["bytes_loader"] == row["loader_host_bytes"] == 4 * 16 * (2 * 3 * 256 + 64)


def test_config_on_a_real_store_profiles_the_extraction_that_wrote_it(small_store, tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"store": str(small_store), "hook": "blocks.1.hook_resid_post", "d_sae": 64,
                               "batch_size": 32, "device": "cpu"}))
    r = runner.invoke(app, ["profile-memory", "--config", str(cfg), "--format", "json"])
    assert r.exit_code == 0, r.output
    (e,) = [x for x in json.loads(r.output)["rows"] if x["section"] == "extraction"]
    # The store's model (the tiny Gemma-2), its deepest hooked block (3 of 4) and window size.
    assert (e["spec_model"], e["spec_hook_layer"], e["spec_context_size"]) == ("embedded:tiny-gemma2", 3, 32)
    assert e["n_layers"] == 4


def test_extraction_counts_the_weights_load_model_keeps():
    from transformers import AutoModelForCausalLM, Gemma2Config

    from actcache.models import _truncate

    cfg = Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, vocab_size=500)
    shape = model_shape(cfg, hook_layer=2)
    model = AutoModelForCausalLM.from_config(cfg)
    assert shape.full_params == sum(p.numel() for p in model.parameters())
    _truncate(model, 3)  # what load_model(keep_layers=3) does
    assert shape.kept_params == sum(p.numel() for p in model.parameters())
    est = estimate_extraction(ExtractSpec(model="unused", hook_layer=2, compute_dtype="float32", chunk_rows=640,
                                          context_size=128, writer_threads=2), shape)
    assert est.weights == 4 * shape.kept_params and est.chunk_rows == 640
    # queue_depth 2 + 2 writer threads + 1 chunks of bf16 rows, and each thread's float32 statistics chunk
    assert est.writer_queue == 5 * 640 * 64 * 2 + 2 * 640 * 64 * 4


def test_extraction_measurement_runs_actcache_code(measured):
    spec = measured["extract_spec"]
    shape = model_shape(model_config(spec.model), spec.hook_layer)
    m = measured["extract"]
    assert m.peak_bytes, m.note
    ratio = measured_part(estimate_extraction(spec, shape), spec, shape, 8) / m.peak_bytes
    assert 0.75 <= ratio <= 1.25, ratio


def test_covariance_cost_dense_vs_lazy():
    s = _spec({"arch": "dyncorr", "d_sae": 16384, "batch_size": 4096}, 2304)
    c = covariance_cost(s)
    assert c.dense_flops == 2 * 4096 * 16384**2 + 3 * 16384**2
    assert c.pairs == unique_pairs(s) <= 4096 * 128 * 127 // 2  # the penalty's distinct pairs
    assert c.fold_every == 688  # (1 - 0.01)^688 < 1e-3 <= 0.99^687
    assert c.lazy_flops < c.dense_flops / 1000


def test_bf16_is_cuda_only_and_halves_the_pre_activations():
    s = _spec({"arch": "topk", "d_sae": 65536, "batch_size": 4096}, 2304, dead_fraction=0.0)
    assert replace(s, dtype="bfloat16").effective_dtype == "float32"
    cuda32, cuda16 = replace(s, device="cuda"), replace(s, device="cuda", dtype="bfloat16")
    assert cuda16.effective_dtype == "bfloat16"
    p32 = estimate_training(cuda32).phases["forward.encode"]
    p16 = estimate_training(cuda16).phases["forward.encode"]
    assert p32 - p16 >= 2 * 4096 * 65536 - 2 * (65536 * 2304 + 4096 * 2304 + 65536)


def test_optimizer_temporaries_follow_make_optimizer(monkeypatch):
    import profiling.model as M

    assert M.adam_mode() == "fused"  # what trainer.train.make_optimizer builds today: no temporaries
    s = _spec({"arch": "topk", "d_sae": 4096, "batch_size": 256}, 512)
    for mode, temps in (("fused", 0), ("default", 3 * 4 * 4096 * 512)):
        monkeypatch.setattr(M, "adam_mode", lambda: mode)
        assert M._step_phases(s)["optimizer"]["optimizer"] == temps
    monkeypatch.setattr(M, "adam_mode", lambda: "default")
    assert M._step_phases(replace(s, device="cuda"))["optimizer"]["optimizer"] == M.param_bytes(512, 4096)


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("1.5 TB", 15 * 10**11),
                                           ("512MiB", 2**29), ("4096", 4096), ("2g", 2 * 2**30)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_default_command_prints_the_gemma_tables():
    r = runner.invoke(app, ["profile-memory"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(ln) for ln in lines) <= 120
    assert "gemma-2-2b" in r.output and "Covariance update" in r.output
    rows = [ln for ln in lines if ln.split()[:1] in (["baseline"], ["topk"], ["dyncorr"])]
    assert len(rows) == 3 * 3 * (2 if "bf16*" in r.output else 1)
    assert all(ln.split()[1] in ("2304", "16384", "65536") for ln in rows)


@pytest.mark.parametrize("fmt", ["json", "csv", "markdown"])
def test_formats_to_file(tmp_path, fmt):
    out = tmp_path / f"p.{fmt}"
    r = runner.invoke(app, QUICK + ["--d-sae", "64,128", "--d-in", "32", "--k-start", "16", "--k-end", "4",
                                    "--k", "8", "--k-aux", "8",
                                    "--format", fmt, "--out", str(out), "--budget", "1GiB"])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    if fmt == "json":
        rows = json.loads(text)["rows"]
        assert len(rows) == 3 * 2 * 2 and {r["runs_as"] for r in rows} == {"float32"}
        assert all(sum(v for k, v in r.items() if k.startswith("bytes_")) == r["total_bytes"] for r in rows)
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert len(rows) == 12 and rows[0]["section"] == "training"
    else:
        assert text.count("| dyncorr |") == 4 and "| arch |" in text


def test_config_file_profiles_that_run(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"arch": "dyncorr", "d_in": 48, "d_sae": 96, "k_start": 12, "k_end": 4,
                               "batch_size": 256, "device": "cpu", "cov_dtype": "float64"}))
    r = runner.invoke(app, ["profile-memory", "--no-extract", "--config", str(cfg), "--format", "json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)["rows"]
    assert (row["arch"], row["d_in"], row["d_sae"], row["k"], row["batch_size"]) == ("dyncorr", 48, 96, 12, 256)
    assert row["bytes_covariance"] == 8 * (96 * 96 + 96) and row["runs_as"] == "float32"
    run_dir = tmp_path / "rundir"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(cfg.read_text())
    r = runner.invoke(app, ["profile-memory", "--no-extract", "--run", str(run_dir), "--d-sae", "48,64",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    assert [x["d_sae"] for x in json.loads(r.output)["rows"]] == [48, 64]  # options given here win


@pytest.mark.parametrize("args,needle", [
    (["--arch", "topk,sparse"], "unknown arch 'sparse'"),
    (["--dtype", "float16"], "unknown dtype 'float16'"),
    (["--d-sae", "2304,0"], "--d-sae 0 must be > 0"),
    (["--batch-size", "-4"], "--batch-size -4 must be > 0"),
    (["--arch", "topk", "--d-sae", "16", "--k", "32"], "--k 32 must be in 1..d_sae (16)"),
    (["--budget", "lots"], "--budget 'lots' is not a size"),
    (["--format", "yaml"], "unknown --format 'yaml'"),
    (["--d-in", "0"], "--d-in 0 must be > 0"),
    (["--dead-fraction", "1.5"], "--dead-fraction 1.5 must be in 0..1"),
    (["--shards", "0"], "--shards 0 must be >= 1"),
])
def test_bad_input_is_one_line(args, needle):
    _assert_user_error(runner.invoke(app, QUICK + args), needle)


def test_bad_config_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"arch": "topk", "lr_schedule": "cosine"}))
    _assert_user_error(runner.invoke(app, QUICK + ["--config", str(bad)]), "unknown config keys lr_schedule")
    bad.write_text("{not json")
    _assert_user_error(runner.invoke(app, QUICK + ["--config", str(bad)]), "cannot read --config")
    _assert_user_error(runner.invoke(app, QUICK + ["--run", str(tmp_path)]), "no readable config.json")
    _assert_user_error(runner.invoke(app, ["profile-memory", "--extract-model", str(tmp_path / "nope")]),
                       "does not exist")


def _assert_user_error(result, needle: str) -> None:
    out = result.output.strip()
    assert result.exit_code not in (0, None), out
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(out.splitlines()) == 1 and out.startswith("error:") and "Traceback" not in out, out
    assert needle in out, out


def _allocate_both() -> None:
    import numpy as np

    a = torch.ones(1 << 20)  # 4 MiB (torch)
    b = np.ones(1 << 21)  # 16 MiB (numpy)
    c = a * 2  # 4 MiB: the peak, 24 MiB, holds a, b and c
    del b
    d = a + 1  # after b is gone: 12 MiB
    del c, d


def test_allocation_trace_sums_torch_and_numpy_on_one_timeline():
    from profiling.alloc_trace import AllocationTrace

    with AllocationTrace() as t:
        _allocate_both()
    r = t.result()
    MiB = 2**20
    assert 12 * MiB <= r.torch_peak < 12 * MiB + 4096 and r.numpy_peak >= 16 * MiB  # (+ a few scalars)
    assert 8 * MiB <= r.torch_bytes < 8 * MiB + 4096  # at the peak: a and c, and numpy's b
    assert 16 * MiB <= r.numpy_bytes <= 17 * MiB  # + Python's own objects (tracemalloc): under 1 MiB
    assert r.peak_bytes == r.torch_bytes + r.numpy_bytes and 24 * MiB <= r.peak_bytes <= 25 * MiB


def test_target_cuda_plans_a_gpu_run_without_one():
    args = ["profile-memory", "--target", "cuda", "--d-sae", "16384,65536", "--arch", "topk,dyncorr",
            "--budget", "80GB"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "predicted peak on cuda" in r.output and "Largest d_sae" in r.output and "max_memory_allocated" in r.output
    r = runner.invoke(app, args + ["--format", "json", "--no-extract"])
    doc = json.loads(r.output)
    rows = doc["rows"]
    assert {(x["arch"], x["d_sae"]) for x in rows} == {(a, n) for a in ("topk", "dyncorr") for n in (16384, 65536)}
    assert all(x["device"] == "cuda" and x["runs_as"] == "bfloat16" and x["bytes_loader"] == 0 for x in rows)
    assert all(x["need_bytes"] > x["total_bytes"] and x["fits"] == (x["need_bytes"] <= 80 * 10**9) for x in rows)
    assert all(sum(v for k, v in x.items() if k.startswith("bytes_")) == x["total_bytes"] for x in rows)
    largest = {g["arch"]: g["d_sae"] for g in doc["largest_d_sae"]}
    assert largest["dyncorr"]["l4-24gb"] < largest["dyncorr"]["a100-40gb"] < largest["dyncorr"]["h100-80gb"]
    assert largest["dyncorr"]["h100-80gb"] < largest["topk"]["h100-80gb"]  # the d_sae^2 covariance buffer


def test_largest_d_sae_is_the_edge_of_fitting():
    from profiling.gpu import GPUS, cuda_need, largest_d_sae

    s = replace(_spec({"arch": "dyncorr", "d_sae": 2304, "batch_size": 4096}, 2304), device="cuda", dtype="bfloat16")
    n = largest_d_sae(s, GPUS["a100-40gb"])
    assert n % 1024 == 0 and n > 0
    assert cuda_need(estimate_training(replace(s, d_sae=n)).total) <= GPUS["a100-40gb"]
    assert cuda_need(estimate_training(replace(s, d_sae=n + 1024)).total) > GPUS["a100-40gb"]


@pytest.mark.parametrize("args,needle", [
    (["--gpu", "h100"], "unknown --gpu 'h100'"),
    (["--gpu", "l4-24gb", "--budget", "24GB"], "--budget and --gpu exclude each other"),
    (["--target", "tpu"], "unknown --target 'tpu'"),
])
def test_bad_gpu_options_are_one_line(args, needle):
    _assert_user_error(runner.invoke(app, QUICK + args), needle)
