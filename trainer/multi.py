"""Several SAEs from one read of the store: ``sae train`` with several ``--config`` or ``--sweep``.

Every run is a normal :class:`~trainer.train.Trainer` with its own SAE, optimiser and run
directory (resumable on its own terms); the runs on one hook share one loader, so each batch is
read and decoded once and handed to every run's ``train_on`` in turn. Runs on different hooks get
one loader per hook, all with the same seed and batch size, so they see the rows of the same
windows in the same order. The runs therefore agree on everything that fixes the data stream
(:data:`SHARED_FIELDS`); everything else (architecture, width, lr, penalties, ...) may differ.

Resume: each run's checkpoint holds the loader position it was taken at. After a crash between
the checkpoints of two runs they differ by one checkpoint interval: the shared loader restarts at
the earliest, and the runs that are ahead skip the batches they have already trained on.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from actcache.errors import ActcacheError
from actcache.store import open_store
from trainer.checkpoint import check_run_dir
from trainer.config import RunConfig
from trainer.distributed import LOCAL, Collective, session
from trainer.train import Interrupted, Progress, Trainer, handle_signals, make_loader, resolve_config

SHARED_FIELDS = ("store", "n_tokens", "epochs", "batch_size", "seed", "device")  # + every loader field


def expand_runs(bases: list[dict[str, Any]], sweeps: list[str]) -> list[RunConfig]:
    """One RunConfig per (base, sweep point). ``bases``: flat configs (one per ``--config``);
    ``sweeps``: ``FIELD=V1,V2,...`` each, crossed into a grid. A sweep point trains in
    ``<base out>/FIELD=V,FIELD=V``."""
    grid: list[list[tuple[str, Any]]] = []
    for spec in sweeps:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ActcacheError(f"--sweep {spec!r}: write FIELD=V1,V2,... (e.g. d_sae=2304,16384)")
        if name == "out":
            raise ActcacheError("--sweep out=...: sweep points get OUT/<point> automatically")
        grid.append([(name, RunConfig.parse_value(name, v.strip())) for v in values.split(",") if v.strip()])
    runs = []
    for flat in bases:
        for point in itertools.product(*grid):
            sub = ",".join(f"{k}={v}" for k, v in point)
            out = str(Path(flat.get("out", "")) / sub) if sub and flat.get("out") else flat.get("out", "")
            runs.append(RunConfig.from_flat({**flat, **dict(point), "out": out}))
    outs = [r.train.out for r in runs]
    clash = sorted({o for o in outs if o and outs.count(o) > 1})
    if clash:
        raise ActcacheError(f"several runs would write to {', '.join(map(repr, clash))}: give each config its own out")
    return runs


def check_shared(cfgs: list[RunConfig]) -> None:
    """The runs read one stream of batches: the fields that fix it must agree."""
    def key(c: RunConfig) -> dict[str, Any]:
        return {**{f: getattr(c.train, f) for f in SHARED_FIELDS}, **asdict(c.loader)}

    outs = [c.train.out for c in cfgs]
    if not all(outs):
        raise ActcacheError("no run directory: pass --out RUN_DIR (several runs train in RUN_DIR/<name>)")
    if len(set(outs)) < len(outs):
        raise ActcacheError(f"several runs would write to the same out ({', '.join(outs)}): give each its own")
    first = key(cfgs[0])
    for c in cfgs[1:]:
        diff = [f"{k}: {v!r} vs {key(c)[k]!r}" for k, v in first.items() if key(c)[k] != v]
        if diff:
            raise ActcacheError(f"runs trained from one read must agree on {', '.join(first)}; "
                                f"{cfgs[0].train.out} and {c.train.out} differ ({'; '.join(diff)}): "
                                "train them separately")


def preflight(cfgs: list[RunConfig], *, resume: bool, overwrite: bool, nproc: int = 1) -> list[RunConfig]:
    """Every check that needs no training, for every run, before anything is written; the runs resolved."""
    if not cfgs:
        raise ActcacheError("no runs to train")
    for c in cfgs:
        c.validate()
    for c in cfgs:
        if c.train.batch_size % nproc:
            raise ActcacheError(f"--batch-size {c.train.batch_size} is not divisible by --nproc {nproc}: "
                                f"each process reads batch_size / {nproc} rows of every step")
    if len(cfgs) > 1:
        check_shared(cfgs)
    store = open_store(cfgs[0].train.store)  # refuses missing or incomplete stores
    resolved = [resolve_config(c, store) for c in cfgs]
    for c in resolved:
        check_run_dir(c.to_flat(), c.train.out, resume, overwrite)
    return resolved


class MultiTrainer:
    """Train several runs from one pass over the store (module docstring)."""

    def __init__(self, cfgs: list[RunConfig], *, resume: bool = False, overwrite: bool = False,
                 progress: Callable[[RunConfig], Progress | None] | None = None, dp: Collective | None = None):
        resolved = preflight(cfgs, resume=resume, overwrite=overwrite)  # before any run dir is touched
        self.dp = dp = dp or LOCAL
        store = open_store(cfgs[0].train.store)
        device = dp.device_for(cfgs[0].train.device)
        self.loaders = {}
        for c in resolved:
            if c.train.hook not in self.loaders:
                self.loaders[c.train.hook] = make_loader(store, c, dp, device)
        fresh = {h: ld.state_dict() for h, ld in self.loaders.items()}
        self.trainers = [Trainer(c, resume=resume, overwrite=overwrite, dp=dp, loader=self.loaders[r.train.hook],
                                 progress=progress(c) if progress and dp.is_main else None)
                         for c, r in zip(cfgs, resolved)]
        self.skip = self._align(fresh)
        self._stop = False

    def _align(self, fresh: dict[str, dict[str, Any]]) -> list[int]:
        """Put each shared loader at its runs' earliest position; how many batches each run skips."""
        pos = [t.loader_state or fresh[t.hook] for t in self.trainers]
        for hook, loader in self.loaders.items():
            mine = [p for p, t in zip(pos, self.trainers) if t.hook == hook]
            loader.load_state_dict(min(mine, key=lambda p: p["batches"]))
        start = {h: ld.state_dict()["batches"] for h, ld in self.loaders.items()}
        return [p["batches"] - start[t.hook] for p, t in zip(pos, self.trainers)]

    def fit(self) -> list[dict[str, Any]]:
        with handle_signals(self._on_signal):
            for t in self.trainers:
                t.begin()
            streams = {h: ld.batches() for h, ld in self.loaders.items()}
            while not all(t.done for t in self.trainers):
                for hook, stream in streams.items():
                    group = [i for i, t in enumerate(self.trainers) if t.hook == hook and not t.done]
                    if group:
                        self._feed(group, next(stream))
                if self.dp.any_true(self._stop):
                    for t, skip in zip(self.trainers, self.skip):
                        if not skip:  # a run still skipping is ahead of the loader: its checkpoint stands
                            t._checkpoint()
                    raise Interrupted()
            return [t.end() for t in self.trainers]

    def _feed(self, group: list[int], x) -> None:
        for i in group:
            if self.skip[i]:  # this run trained on this batch before the resume
                self.skip[i] -= 1
            else:
                self.trainers[i].train_on(x)

    def _on_signal(self, signum, frame) -> None:
        self._stop = True


def train_many(cfgs: list[RunConfig], *, resume: bool = False, overwrite: bool = False,
               progress: Callable[[RunConfig], Progress | None] | None = None) -> list[dict[str, Any]]:
    """Train every run of ``cfgs`` from one read (data parallel under torchrun); their summaries."""
    if len(cfgs) == 1:
        from trainer.train import train

        return [train(cfgs[0], resume=resume, overwrite=overwrite, progress=progress(cfgs[0]) if progress else None)]
    with session(cfgs[0].train.device) as dp:
        return MultiTrainer(cfgs, resume=resume, overwrite=overwrite, progress=progress, dp=dp).fit()
