"""Labelled texts for sparse probing, and the binary tasks made from them.

A source is a ``.jsonl`` file (one object per line), a ``.csv`` file with a header, or
``embedded:stdlib-packages``: docstrings of five packages of the installed Python standard
library, labelled by the package they come from. The embedded set is built at run time
(deterministically, like the embedded corpus), so it exists offline on any machine.

Two classes make one binary task; more make one task per class, that class against an
equal number of texts sampled from the others (SAEBench's one-vs-rest). Each task is split
into train and test per label (stratified, seeded).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actcache.corpus import iter_docstrings_under, iter_jsonl, stdlib_root
from actcache.errors import ActcacheError

PROBE_STDLIB = "embedded:stdlib-packages"
STDLIB_PACKAGES = ("asyncio", "email", "multiprocessing", "unittest", "xml")
MIN_PER_CLASS = 4  # at least 2 to train and 1 to test on, per label


@dataclass(frozen=True)
class LabelledTexts:
    name: str
    texts: list[str]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


@dataclass(frozen=True)
class ProbeTask:
    name: str
    index: np.ndarray  # rows of the feature matrices
    y: np.ndarray  # 0/1 per row
    train: np.ndarray  # bool per row: in the train split


def _stdlib_packages() -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for package in STDLIB_PACKAGES:
        root = stdlib_root() / package
        for doc in iter_docstrings_under(root) if root.is_dir() else ():
            texts.append(doc)
            labels.append(package)
    # A docstring found in two packages ("Return self.") would be a label with no signal.
    owners: dict[str, set[str]] = {}
    for t, lab in zip(texts, labels):
        owners.setdefault(t, set()).add(lab)
    seen: set[str] = set()
    keep = [i for i, t in enumerate(texts) if len(owners[t]) == 1 and not (t in seen or seen.add(t))]
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _read_rows(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [f for f in (text_field, label_field) if f not in (reader.fieldnames or [])]
            if missing:
                raise ActcacheError(f"{path} has no column {', '.join(map(repr, missing))} (columns: "
                                    f"{reader.fieldnames}): pass --probe-text-field / --probe-label-field")
            rows = [(r[text_field], r[label_field]) for r in reader]
    elif suffix == ".jsonl":
        rows = []
        for lineno, rec in iter_jsonl(path):
            missing = [f for f in (text_field, label_field) if not isinstance(rec, dict) or f not in rec]
            if missing:
                raise ActcacheError(f"{path} line {lineno} has no field {', '.join(map(repr, missing))}: "
                                    "pass --probe-text-field / --probe-label-field")
            rows.append((rec[text_field], rec[label_field]))
    else:
        raise ActcacheError(f"labelled file {path} is not .jsonl or .csv: pass one of those or {PROBE_STDLIB}")
    rows = [(t, lab) for t, lab in rows if isinstance(t, str) and t.strip() and lab is not None and str(lab) != ""]
    return [t for t, _ in rows], [str(lab) for _, lab in rows]


def load_labelled(source: str | Path, *, text_field: str = "text", label_field: str = "label",
                  max_per_class: int = 200, seed: int = 0) -> LabelledTexts:
    """Texts and labels, at most ``max_per_class`` per class (seeded sample; 0 = all)."""
    if str(source) == PROBE_STDLIB:
        texts, labels = _stdlib_packages()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ActcacheError(f"labelled file {source} does not exist: pass a .jsonl or .csv file or {PROBE_STDLIB}")
        texts, labels = _read_rows(path, text_field, label_field)
    counts = Counter(labels)
    if len(counts) < 2:
        raise ActcacheError(f"{source} has {len(counts)} class{'es' if len(counts) != 1 else ''} "
                            f"({', '.join(counts) or 'no labelled text'}): probing needs at least 2 labels")
    small = sorted(c for c, n in counts.items() if n < MIN_PER_CLASS)
    if small:
        raise ActcacheError(f"{source}: class {', '.join(map(repr, small))} has fewer than {MIN_PER_CLASS} texts: "
                            "give every class more examples or drop it")
    if max_per_class:
        rng = np.random.default_rng([seed, 1])
        keep: list[int] = []
        for c in sorted(counts):
            idx = np.flatnonzero(np.asarray(labels) == c)
            keep += sorted(rng.permutation(idx)[:max_per_class].tolist())
        keep.sort()
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return LabelledTexts(name=Path(str(source)).stem if str(source) != PROBE_STDLIB else PROBE_STDLIB,
                         texts=texts, labels=labels)


def _split(y: np.ndarray, rng: np.random.Generator, test_frac: float) -> np.ndarray:
    train = np.zeros(len(y), dtype=bool)
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = min(max(1, round(test_frac * len(idx))), len(idx) - 2)
        train[idx[n_test:]] = True
    return train


def make_tasks(data: LabelledTexts, *, seed: int = 0, test_frac: float = 0.2) -> list[ProbeTask]:
    labels = np.asarray(data.labels)
    classes = data.classes
    rng = np.random.default_rng([seed, 2])
    tasks = []
    for c in classes[1:] if len(classes) == 2 else classes:
        pos = np.flatnonzero(labels == c)
        neg = np.flatnonzero(labels != c)
        neg = np.sort(rng.choice(neg, size=min(len(pos), len(neg)), replace=False))
        index = np.concatenate([pos, neg])
        y = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
        tasks.append(ProbeTask(name=f"{data.name}/{c}", index=index, y=y, train=_split(y, rng, test_frac)))
    return tasks
