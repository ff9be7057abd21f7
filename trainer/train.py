"""``sae train``: the training loop (``Trainer.fit``) and its setup.

``fit`` stays short: ``train_on`` runs one batch (``_step``: one optimiser step, or a skipped
non-finite one; then ``_log`` and ``_maybe_checkpoint``, or ``_rollback``). Everything it needs
to resume exactly (weights, buffers, optimiser, every rank's loader position, counters, RNG) is in
the checkpoint. Data parallel (torchrun, ``sae train --nproc N``): ``dp`` is the process group
(trainer/distributed.py) and rank 0 alone writes the run directory. Several runs from one read:
trainer/multi.py calls ``train_on`` of several Trainers that share their loaders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Iterator, Protocol

import torch

from actcache.errors import ActcacheError
from actcache.store import ActivationStore, open_store
from actcache.urls import redact
from trainer import artifacts as A
from trainer import schedules as sch
from trainer.checkpoint import (RUNTIME_FIELDS, atomic_write_text, find_checkpoint, load_checkpoint,  # noqa: F401
                                prepare_run_dir, save_checkpoint)
from trainer.config import RunConfig, absolute_store
from trainer.distributed import LOCAL, Collective, session
from trainer.evaluation.reconstruction import evaluate
from trainer.export import export_saelens, folded_weights, saelens_cfg, write_weights
from trainer.rows import drop_norm_outliers
from trainer.loader import ActivationLoader
from trainer.metrics import append_record, batch_means, step_record
from trainer.saes import ARCHS, SAE, SAEOutput, StepContext, build_sae

log = logging.getLogger(__name__)
_MAX_ROLLBACKS = 20
EIG_BLOCK = 256  # latents in the sampled block for Sigma's eigenvalue metrics


def make_optimizer(sae: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The one optimiser construction (the memory profiler reuses it).

    fused: one kernel for all parameters (measured 334 -> 103 ms per step at d_sae 16384 on this CPU)."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)


class Progress(Protocol):
    def start(self, total_steps: int, done_steps: int, batch_size: int) -> None: ...
    def update(self, step: int, record: dict[str, Any]) -> None: ...


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written first."""


@contextlib.contextmanager
def handle_signals(on_signal: Callable[[int, Any], None]) -> Iterator[None]:
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def resolve_config(cfg: RunConfig, store: ActivationStore) -> RunConfig:
    """``cfg`` checked against the store, with the hook and the width-dependent defaults filled in."""
    hook = cfg.train.hook or (store.hooks[0] if len(store.hooks) == 1 else "")
    if not hook:
        raise ActcacheError(f"the store holds several hooks ({', '.join(store.hooks)}): choose one with --hook")
    store.array(hook)  # unknown hook -> one-line error
    if cfg.sae.arch not in ARCHS:
        raise ActcacheError(f"unknown arch {cfg.sae.arch!r}: use one of {', '.join(ARCHS)}")
    if not getattr(ARCHS[cfg.sae.arch], "trainable", True):  # jumprelu: sae import only
        raise ActcacheError(f"--arch {cfg.sae.arch} is inference-only (sae import): train baseline, topk or dyncorr")
    train = replace(cfg.train, hook=hook, store=absolute_store(cfg.train.store))
    return replace(cfg, train=train, sae=cfg.sae.resolved(store.d_model))


def make_loader(store: ActivationStore, cfg: RunConfig, dp: Collective, device: torch.device) -> ActivationLoader:
    """This rank's loader of a (resolved) run: ``batch_size / world_size`` rows of every batch."""
    B, W = cfg.train.batch_size, dp.world_size
    if B % W:
        raise ActcacheError(f"--batch-size {B} is not divisible by the {W} processes: "
                            f"each reads batch_size / {W} rows of every step")
    return ActivationLoader(store, cfg.train.hook, replace(cfg.loader, batch_size=B // W), device=device,
                            rank=dp.rank, world_size=W)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``, bit for bit while the norm is finite, minus its multiplication by
    exactly 1.0 when the norm is below ``max_norm`` (two passes over the 150 MB weight gradients
    at d_sae 16k, for nothing). A non-finite norm leaves the gradients as they are (the step is
    skipped and they are dropped; ``clip_grad_norm_`` would multiply them by NaN).
    Returns the total norm; the caller reads it on the host anyway (the finiteness check)."""
    U = torch.nn.utils
    if not hasattr(U, "get_total_norm"):  # torch < 2.6
        return U.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    total = U.get_total_norm(grads)
    if math.isfinite(max_norm) and max_norm / (float(total) + 1e-6) < 1.0:
        U.clip_grads_with_norm_(params, max_norm, total)
    return total


class Trainer:
    dp: Collective = LOCAL  # one process; the memory profiler's StepHarness inherits this

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 progress: Progress | None = None, dp: Collective | None = None,
                 loader: ActivationLoader | None = None):
        """``dp``: the process group of a data-parallel run (default: one process). ``loader``:
        one shared with other runs (trainer/multi.py); default: this run's own (this rank's share)."""
        cfg.validate()  # every field, before the store is even opened
        store = open_store(cfg.train.store)  # refuses missing or incomplete stores
        self.cfg = cfg = resolve_config(cfg, store)
        self.dp = dp = dp or LOCAL
        self.device = dp.device_for(cfg.train.device)
        self.store, self.hook = store, cfg.train.hook
        self.progress = progress if dp.is_main else None
        self.loader = loader or make_loader(store, cfg, dp, self.device)
        self.n_steps = self._count_steps()
        warm = int(cfg.train.lr_warmup_frac * self.n_steps)
        self.sched = sch.Schedule(total_steps=self.n_steps, warmup_steps=warm,
                                  penalty_warmup_steps=int(cfg.train.penalty_warmup_frac * self.n_steps),
                                  lr_min_ratio=cfg.train.lr_min_ratio)
        torch.manual_seed(cfg.train.seed)
        self.sae: SAE = build_sae(cfg.sae, seed=cfg.train.seed).to(self.device)
        self.sae.dp = dp  # batch statistics of the global batch (trainer/distributed.py)
        self.opt = make_optimizer(self.sae, cfg.train.lr)
        g = torch.Generator().manual_seed(cfg.train.seed + 1)
        self.eig_block = torch.randperm(cfg.sae.d_sae, generator=g)[: min(EIG_BLOCK, cfg.sae.d_sae)].to(self.device)
        self.state: dict[str, Any] = initial_state()
        self.loader_state: dict[str, Any] | None = None  # this rank's position in the last checkpoint
        # Only now, with every input checked and the SAE and optimiser built, is anything written.
        self.paths, has_ckpt = self._prepare_run_dir(resume, overwrite)
        if has_ckpt:
            self._restore()
        self._stop = False
        self._t0 = time.perf_counter()

    # -- setup helpers -------------------------------------------------------------------
    def _count_steps(self) -> int:
        t = self.cfg.train
        rows = int(self.dp.sum(torch.tensor(self.loader.n_rows, device=self.device)))  # every rank's share
        tokens = t.n_tokens or rows
        if tokens > t.epochs * rows:
            raise ActcacheError(f"--n-tokens {tokens:,} exceeds {t.epochs} epoch(s) of the store's {rows:,} train rows: "
                                "pass --epochs N or lower --n-tokens")
        steps = tokens // t.batch_size
        if steps < 1:
            raise ActcacheError(f"--batch-size {t.batch_size} is larger than the {tokens:,} training tokens")
        return steps

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> tuple[A.RunPaths, bool]:
        """Rank 0 prepares the run directory; every other rank gets its answer, or its error."""
        result: Any = None
        if self.dp.is_main:
            try:
                result = prepare_run_dir(self.cfg.to_flat(), self.cfg.train.out, resume, overwrite)
            except ActcacheError as e:
                if self.dp.world_size == 1:
                    raise
                result = e
        result = self.dp.broadcast_object(result)
        if isinstance(result, ActcacheError):
            raise result
        return result

    def _restore(self, *, data_position: bool = True) -> None:
        ckpt = find_checkpoint(self.paths.checkpoint)
        self.state = load_checkpoint(ckpt, model=self.sae, optimizer=self.opt, device=self.device)
        self.state.setdefault("rows_dropped", 0)  # checkpoints from before max_norm_ratio
        loader_state = self.state.pop("loader")
        ranks = self.state.pop("loader_ranks", [loader_state])
        if len(ranks) != self.dp.world_size:
            raise ActcacheError(f"{ckpt} was written by a run on {len(ranks)} process(es), this one has "
                                f"{self.dp.world_size}: resume with --nproc {len(ranks)}")
        if not data_position:
            return
        self.loader_state = ranks[self.dp.rank]
        self.loader.load_state_dict(self.loader_state)
        # Metrics written after the checkpoint belong to steps that will be redone.
        if self.dp.is_main and self.paths.metrics.exists():
            keep = [ln for ln in self.paths.metrics.read_text().splitlines() if json.loads(ln)["step"] <= self.state["step"]]
            atomic_write_text(self.paths.metrics, "".join(ln + "\n" for ln in keep))
        log.info("resumed %s at step %d", self.paths.root, self.state["step"])

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        with handle_signals(self._on_signal):
            self.begin()
            batches = self.loader.batches()
            while not self.done:
                self.train_on(next(batches))
                if self.dp.any_true(self._stop):  # every rank stops at the same step
                    self._checkpoint()
                    raise Interrupted()
            return self.end()

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.n_steps

    def begin(self) -> None:
        if self.progress:
            self.progress.start(self.n_steps, self.state["step"], self.cfg.train.batch_size)
        self._t0 = time.perf_counter() - self.state["wall_s"]

    def train_on(self, x: torch.Tensor) -> None:
        """Everything one batch does: b_dec from the first one, the step (or a rollback), log, checkpoint."""
        st = self.state
        x, dropped = drop_norm_outliers(x, self.cfg.train.max_norm_ratio)
        st["rows_dropped"] += dropped
        if st["step"] == 0 and st["tokens"] == 0:
            self.sae.init_b_dec(self.dp.gather_rows(x))  # from the global batch
            self._checkpoint()  # a rollback target exists from the start
        out = self._step(x)
        st["wall_s"] = time.perf_counter() - self._t0
        if out is None:
            if st["nonfinite_in_row"] >= self.cfg.train.max_nonfinite_in_row:
                self._rollback()
            return
        self._log(out, x)
        self._maybe_checkpoint()

    def end(self) -> dict[str, Any]:
        self._checkpoint()
        return self._finish()

    def _on_signal(self, signum, frame) -> None:
        self._stop = True

    def _ctx(self) -> StepContext:
        c, step = self.cfg.sae, self.state["step"]
        k = self.sched.k(step, c.k_start, c.k_end) if c.arch == "dyncorr" else c.k
        return StepContext(step=step, k=k, sparsity_coef=c.sparsity_penalty * self.sched.penalty_warmup(step),
                           lam=self.sched.lam(step, c.lambda_max) if c.arch == "dyncorr" else 0.0)

    def _step(self, x: torch.Tensor) -> SAEOutput | None:
        """One optimiser step; None (and nothing changed) when the loss or gradient is non-finite."""
        st = self.state
        lr = self.cfg.train.lr * st["lr_scale"] * self.sched.lr_factor(st["step"])
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.sae.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.sae(x, self._ctx())
        self.opt.zero_grad(set_to_none=True)
        ok = self.dp.all_true(torch.isfinite(out.loss))  # a non-finite loss on any rank skips the step on all
        if ok:
            out.loss.backward()
            self.dp.average_grads(self.sae.parameters())
            self.sae.project_decoder_grad()
            clip = self.cfg.train.grad_clip or math.inf
            grad_norm = clip_gradients(list(self.sae.parameters()), clip)
            ok = bool(torch.isfinite(grad_norm))
        rows = x.shape[0] * self.dp.world_size
        if not ok:
            st["nonfinite_events"] += 1
            st["skipped_steps"] += 1
            st["nonfinite_in_row"] += 1
            st["tokens"] += rows
            self.opt.zero_grad(set_to_none=True)
            log.warning("non-finite loss or gradient at step %d: step skipped", st["step"])
            return None
        self.opt.step()
        self.sae.normalize_decoder()
        self.sae.after_step(out)
        out.extras["grad_norm"] = grad_norm.detach()
        out.extras["lr"] = torch.tensor(lr)
        st["nonfinite_in_row"] = 0
        st["step"] += 1
        st["tokens"] += rows
        return out

    def _rollback(self) -> None:
        """Too many non-finite steps in a row: weights back to the last checkpoint, half the lr.

        The data keeps moving forward (the loader is not rewound): replaying the same batches
        would replay a bad stretch of data forever."""
        st = self.state
        if st["rollbacks"] >= _MAX_ROLLBACKS:
            raise ActcacheError(f"training diverged: {st['rollbacks']} rollbacks without recovering; "
                                "lower --lr, or check the store with actcache verify")
        kept = {k: st[k] for k in ("nonfinite_events", "skipped_steps", "rollbacks", "tokens", "wall_s", "rows_dropped")}
        lr_scale = st["lr_scale"] / 2
        self._restore(data_position=False)
        self.state.update(kept, lr_scale=lr_scale, nonfinite_in_row=0)
        self.state["rollbacks"] += 1
        log.warning("rolled back to step %d with lr scale %.3g", self.state["step"], lr_scale)

    def _log(self, out: SAEOutput, x: torch.Tensor) -> None:
        st = self.state
        if st["step"] % self.cfg.train.log_every and st["step"] != self.n_steps:
            return
        means, ev = batch_means(out, x, self.dp)  # a collective: every rank
        if not self.dp.is_main:
            return
        rec = step_record(self.sae, out, means, ev, self._ctx(), st, self.eig_block)
        append_record(self.paths.metrics, rec)
        if self.progress:
            self.progress.update(st["step"], rec)

    def _maybe_checkpoint(self) -> None:
        if self.state["step"] % self.cfg.train.checkpoint_every == 0:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Rank 0 writes (atomically) every rank's loader position with the shared state."""
        positions = self.dp.gather_objects(self.loader.state_dict())
        if self.dp.is_main:
            ranks = {"loader_ranks": positions} if self.dp.world_size > 1 else {}
            save_checkpoint(self.paths.checkpoint, model=self.sae, optimizer=self.opt,
                            state={**self.state, "loader": positions[0], **ranks})
        self.dp.barrier()  # nobody reads a checkpoint (rollback) before it is complete

    # -- the end -------------------------------------------------------------------------
    def _final_k(self) -> int:
        c = self.cfg.sae
        return c.k_end if c.arch == "dyncorr" else c.k

    def _finish(self) -> dict[str, Any]:
        """Rank 0 evaluates on the held-out chunks and writes weights, export and summary."""
        return self.dp.broadcast_object(self._export() if self.dp.is_main else None)

    def _export(self) -> dict[str, Any]:
        heldout = ActivationLoader(self.store, self.hook, self.cfg.loader, device=self.device, split="heldout")
        ratio = self.cfg.train.max_norm_ratio
        metrics = evaluate(self.sae, (drop_norm_outliers(b, ratio)[0] for b in heldout.batches()),
                           k=self._final_k() if self.cfg.sae.arch != "baseline" else None)
        attrs = self.store.attrs
        # SAELens' metadata keys (trainer/export.py), then ours.
        metadata = {"model_name": attrs["model"]["id"], "hook_name": self.hook, "hook_head_index": None,
                    "context_size": attrs["context_size"], "prepend_bos": attrs["prepend_bos"],
                    "dataset_path": attrs["dataset"]["path"], "exclude_bos": attrs.get("exclude_bos", False),
                    "store": redact(self.cfg.train.store), "arch": self.cfg.sae.arch,
                    "training_tokens": self.state["tokens"], "scaling_factor_folded": self.loader.scaling_factor}
        meta = {"sae": asdict(self.cfg.sae), "saelens_cfg": saelens_cfg(self.sae, final_k=self._final_k(), metadata=metadata)}
        write_weights(self.paths.weights, folded_weights(self.sae, self.loader.scaling_factor), meta)
        export_saelens(self.paths.weights, self.paths.saelens)
        summary = {"arch": self.cfg.sae.arch, "steps": self.state["step"], "tokens": self.state["tokens"],
                   "wall_s": self.state["wall_s"], "heldout": metrics.to_dict(),
                   **{k: self.state[k] for k in ("nonfinite_events", "skipped_steps", "rollbacks", "rows_dropped")}}
        atomic_write_text(self.paths.summary, json.dumps(summary, indent=2))
        return summary


def initial_state() -> dict[str, Any]:
    """A fresh run's counters (the checkpointed ``state``)."""
    return {"step": 0, "tokens": 0, "lr_scale": 1.0, "nonfinite_events": 0, "skipped_steps": 0, "rollbacks": 0,
            "nonfinite_in_row": 0, "wall_s": 0.0, "rows_dropped": 0}


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
          progress: Progress | None = None) -> dict[str, Any]:
    """Train one SAE (data parallel when launched by torchrun); returns the summary (also in ``summary.json``)."""
    with session(cfg.train.device) as dp:
        if dp.world_size > 1 and cfg.train.max_norm_ratio:  # ranks would hold different row counts
            raise ActcacheError("--max-norm-ratio is not supported with torchrun yet: train on one process, or use 0")
        return Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress, dp=dp).fit()
