"""``actcache verify --repair``: make a damaged store whole again without re-extracting all of it.

Chunks are pure functions of their windows (docs/architecture.md), so a damaged activation,
statistics or manifest chunk is simply *un-committed* (``manifest[c] = 0``, ``complete = false``)
and ``actcache extract ... --resume`` computes it again, bit for bit. ``tokens``, ``window`` and
``position`` are functions of the stored windows and ``window_source`` of the seed: they are
rewritten in place. Damaged ``windows`` (the model inputs) cannot be rebuilt from the store.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from actcache import store as S
from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.inspection import Finding
from actcache.lock import StoreLock


@dataclass
class RepairReport:
    uncommitted: list[int] = field(default_factory=list)  # chunks that --resume recomputes
    rewritten: list[str] = field(default_factory=list)  # "tokens chunk 3": rebuilt in place
    unrepairable: list[str] = field(default_factory=list)
    resume_command: str | None = None


def resume_command(extract_config: dict[str, Any], out: str) -> str:
    """The extract command line that finishes the store ``out``: its stored identity plus ``--resume``."""
    cfg = ExtractConfig.from_dict({**extract_config, "out": out})
    args = ["actcache", "extract"]
    defaults = {f.name: f.default for f in fields(ExtractConfig)}
    for name, value in cfg.to_dict().items():
        if name in ("device", "queue_depth") or (name in defaults and value == defaults[name]
                                                 and name not in ("model", "hooks", "out")):
            continue
        opt = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(opt if value else f"--no-{name.replace('_', '-')}")
        elif value is not None:
            args += [opt, ",".join(value) if isinstance(value, list) else str(value)]
    return shlex.join([*args, "--resume"])


def _rewrite(st: S.ActivationStore, g, f: Finding) -> str | None:
    """Rebuild a derived chunk in place; the reason it cannot be, or None once done."""
    lay = st.layout
    w0, w1 = lay.chunk_windows(f.chunk)
    if f.array == S.WINDOW_SOURCE:
        seed = st.attrs.get("seed")
        if not isinstance(seed, int):
            return "the store records no seed"
        g[S.WINDOW_SOURCE][w0:w1] = np.random.default_rng(seed).permutation(lay.n_windows)[w0:w1]
        return None
    try:
        windows = st.read_windows(w0, w1)
    except ActcacheError:
        return f"windows chunk {f.chunk} is damaged too"
    r0, r1 = lay.chunk_rows_range(f.chunk)
    first = lay.first_position
    value = {S.TOKENS: windows[:, first:].reshape(-1),
             S.WINDOW: np.repeat(np.arange(w0, w1), lay.rows_per_window),
             S.POSITION: np.tile(np.arange(first, lay.context_size), w1 - w0)}[f.array]
    g[f.array][r0:r1] = value.astype(g[f.array].dtype)
    return None


def repair_store(path: str | Path, findings: list[Finding]) -> RepairReport:
    """Act on ``findings`` (from :func:`actcache.inspection.verify_store`) under the store's lock."""
    report = RepairReport()
    if not findings:
        return report
    with StoreLock(path, S.LOCK_FILE):  # no extract may write the store meanwhile
        st = S.open_store(path, require_complete=False)
        g = S.open_group(st.location, "r+")
        for f in sorted(findings, key=lambda f: (f.chunk, f.array)):
            if f.repair == "recompute":
                if f.chunk not in report.uncommitted:
                    report.uncommitted.append(f.chunk)
            elif f.repair == "rewrite":
                why = _rewrite(st, g, f)
                (report.rewritten if why is None else report.unrepairable).append(
                    f"{f.array} chunk {f.chunk}" + (f" ({why})" if why else ""))
            else:
                report.unrepairable.append(f"{f.array} chunk {f.chunk} (the model inputs are lost)")
        if report.uncommitted:
            manifest = g[S.MANIFEST]
            for c in report.uncommitted:
                manifest[c] = 0  # a whole-chunk write: the damaged object is replaced, never read
            g.attrs["complete"] = False  # readers refuse the store until --resume has recomputed them
            stored = st.attrs.get("extract_config")
            report.resume_command = resume_command(stored, str(path)) if stored else None
    return report
