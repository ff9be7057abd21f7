"""Reading finished (or unfinished) ``sae train`` run directories for the comparison."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actcache.errors import ActcacheError
from trainer import artifacts as A

# Fields that may differ between runs that are "the same run with another seed".
NOT_SETTINGS = ("seed", "out", "device", "log_every", "checkpoint_every")


@dataclass
class Run:
    path: Path
    name: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    label: str = field(default="")  # the settings group (runs that differ only by seed share it)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def counters(self) -> dict[str, Any]:
        src = self.summary or (self.records[-1] if self.records else {})
        return {k: src.get(k, math.nan) for k in ("nonfinite_events", "skipped_steps", "rollbacks")}

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if k not in NOT_SETTINGS}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ActcacheError(f"cannot read {what} {path} ({e.strerror})") from None
    except ValueError as e:
        raise ActcacheError(f"{path} is not valid JSON ({e}): re-run the command that wrote it") from None


def load_run(path: str | Path) -> Run:
    """One run directory: config.json and metrics.jsonl required; summary.json and eval.json optional."""
    p = A.existing_run(path)
    if not p.metrics.exists():
        raise ActcacheError(f"{p.root} has no {A.METRICS}: the run has not logged a step yet (train it, then compare)")
    records = []
    for i, line in enumerate(p.metrics.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ActcacheError(f"{p.metrics} line {i + 1} is not JSON: the file is damaged") from None
    if not records:
        raise ActcacheError(f"{p.metrics} is empty: the run has not logged a step yet")
    summary = _read_json(p.summary, "summary") if p.summary.exists() else None
    ev = p.eval  # written by sae eval (trainer.evaluation.evaluate_run)
    return Run(path=p.root, name=p.root.name, config=_read_json(p.config, "config"), records=records,
               summary=summary, eval=_read_json(ev, "eval") if ev.exists() else None)


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Load and check that the runs are comparable (same hook and d_in); names made unique."""
    if not paths:
        raise ActcacheError("no runs to compare: pass one or more RUN_DIRs")
    runs = [load_run(p) for p in paths]
    for key, what in (("hook", "hooks"), ("d_in", "widths (d_in)")):
        seen: dict[Any, list[str]] = {}
        for r in runs:
            seen.setdefault(r.config.get(key), []).append(str(r.path))
        if len(seen) > 1:
            parts = "; ".join(f"{v}: {', '.join(ps)}" for v, ps in seen.items())
            raise ActcacheError(f"runs trained on different {what} cannot be compared ({parts}): compare them separately")
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    _label_groups(runs)
    return runs


def _label_groups(runs: list[Run]) -> None:
    """Runs with identical settings apart from the seed share a label: the arch plus the
    settings that tell the groups apart (e.g. ``dyncorr eps=0``)."""
    groups: list[tuple[dict[str, Any], list[Run]]] = []
    for r in runs:
        for settings, members in groups:
            if settings == r.settings():
                members.append(r)
                break
        else:
            groups.append((r.settings(), [r]))
    for settings, members in groups:
        arch = settings.get("arch", "?")
        same_arch = [s for s, _ in groups if s.get("arch") == arch and s is not settings]
        diff = sorted({k for s in same_arch for k in settings if s.get(k) != settings.get(k)})
        label = arch + "".join(f" {k}={settings.get(k)}" for k in diff[:3])
        if any(m.label == label for _, ms in groups for m in ms):
            label += f" ({members[0].name})"  # more differences than fit in a label
        for r in members:
            r.label = label


def seed_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Groups of more than one run that differ only by seed, by label."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return {k: v for k, v in out.items() if len(v) > 1 and len({r.config.get("seed") for r in v}) == len(v)}
