"""Labelled texts for sparse probing, and the binary tasks made from them.

A source is a ``.jsonl`` file (one object per line), a ``.csv`` file with a header, or an
embedded set, built at run time from the installation (deterministic for a given Python and
torch), so it exists offline on any machine:

* ``embedded:stdlib-packages``: docstrings of five packages of the standard library, labelled
  by the package they come from (a topic task);
* ``embedded:code-languages``: 8-line snippets of source code labelled by language: Python
  (the standard library), C++ (torch's headers), CMake (torch's CMake package files), the
  offline stand-in for SAEBench's GitHub-code language task.

Two classes make one binary task; more make one task per class, that class against an
equal number of texts sampled from the others (SAEBench's one-vs-rest). Each task is split
into train and test per label (stratified, seeded), or, given a separate test set, trained
on the first and tested on the second (:func:`make_split_tasks`).
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actcache.corpus import iter_docstrings_under, iter_jsonl, stdlib_root
from actcache.errors import ActcacheError

PROBE_STDLIB = "embedded:stdlib-packages"
PROBE_CODE = "embedded:code-languages"
STDLIB_PACKAGES = ("asyncio", "email", "multiprocessing", "unittest", "xml")
SNIPPET_LINES = 8  # non-blank lines per code snippet (~100 tokens, SAEBench cuts texts at 128)
SNIPPETS_PER_LANGUAGE = 1000  # candidates per language before the per-class sample
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
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
    return _unique_owner(texts, labels)


def _source_files(root: Path, suffix: str) -> list[Path]:
    """Files under ``root`` ending in ``suffix``, sorted, test and package directories pruned."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffix)]
    return found


def _snippets(files: list[Path], cap: int) -> list[str]:
    """Consecutive ``SNIPPET_LINES``-line blocks (blank lines dropped; from the second block on when
    there are two) of files spread evenly over ``files``, as many per file as it takes to offer
    about ``cap`` (so that a few big files fill a language with few files)."""
    files = files[::max(1, len(files) // cap)]
    per_file = max(1, math.ceil(cap / max(1, len(files))))
    out = []
    for path in files:
        try:
            lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        except OSError:
            continue
        lines = [ln for ln in lines if ln.strip()]
        n_blocks = len(lines) // SNIPPET_LINES
        first = 1 if n_blocks > 1 else 0  # the first block is often a licence or include guard, shared by many
        for b in range(first, min(first + per_file, n_blocks)):
            text = "\n".join(lines[b * SNIPPET_LINES:(b + 1) * SNIPPET_LINES])
            if len(text) >= 80:
                out.append(text)
    return out


def _code_languages() -> tuple[list[str], list[str]]:
    import torch

    root = Path(torch.__file__).parent
    sources = {"python": _source_files(stdlib_root(), ".py"), "c++": _source_files(root / "include", ".h"),
               "cmake": _source_files(root / "share" / "cmake", ".cmake")}
    texts, labels = [], []
    for language, files in sources.items():
        for text in _snippets(files, SNIPPETS_PER_LANGUAGE):
            texts.append(text)
            labels.append(language)
    return _unique_owner(texts, labels)


def _unique_owner(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """Each text once, and none that two labels share (a licence header, "Return self.")."""
    owners: dict[str, set[str]] = {}
    for t, lab in zip(texts, labels):
        owners.setdefault(t, set()).add(lab)
    seen: set[str] = set()
    keep = [i for i, t in enumerate(texts) if len(owners[t]) == 1 and not (t in seen or seen.add(t))]
    return [texts[i] for i in keep], [labels[i] for i in keep]


EMBEDDED = {PROBE_STDLIB: _stdlib_packages, PROBE_CODE: _code_languages}


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
        raise ActcacheError(f"labelled file {path} is not .jsonl or .csv: pass one of those or {' or '.join(EMBEDDED)}")
    rows = [(t, lab) for t, lab in rows if isinstance(t, str) and t.strip() and lab is not None and str(lab) != ""]
    return [t for t, _ in rows], [str(lab) for _, lab in rows]


def load_labelled(source: str | Path, *, text_field: str = "text", label_field: str = "label",
                  max_per_class: int = 200, seed: int = 0) -> LabelledTexts:
    """Texts and labels, at most ``max_per_class`` per class (seeded sample; 0 = all)."""
    if str(source) in EMBEDDED:
        texts, labels = EMBEDDED[str(source)]()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ActcacheError(f"labelled file {source} does not exist: pass a .jsonl or .csv file or "
                                f"{' or '.join(EMBEDDED)}")
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
    return LabelledTexts(name=str(source) if str(source) in EMBEDDED else Path(str(source)).stem,
                         texts=texts, labels=labels)


def _split(y: np.ndarray, rng: np.random.Generator, test_frac: float) -> np.ndarray:
    train = np.zeros(len(y), dtype=bool)
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = min(max(1, round(test_frac * len(idx))), len(idx) - 2)
        train[idx[n_test:]] = True
    return train


def _one_vs_rest(labels: np.ndarray, c: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of class ``c`` (y = 1) and as many sampled from the others (y = 0)."""
    pos = np.flatnonzero(labels == c)
    neg = np.flatnonzero(labels != c)
    neg = np.sort(rng.choice(neg, size=min(len(pos), len(neg)), replace=False))
    return np.concatenate([pos, neg]), np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])


def _task_classes(classes: list[str]) -> list[str]:
    return classes[1:] if len(classes) == 2 else classes


def make_tasks(data: LabelledTexts, *, seed: int = 0, test_frac: float = 0.2) -> list[ProbeTask]:
    """One-vs-rest tasks on one set, each split ``1 - test_frac`` / ``test_frac`` per label."""
    labels = np.asarray(data.labels)
    rng = np.random.default_rng([seed, 2])
    tasks = []
    for c in _task_classes(data.classes):
        index, y = _one_vs_rest(labels, c, rng)
        tasks.append(ProbeTask(name=f"{data.name}/{c}", index=index, y=y, train=_split(y, rng, test_frac)))
    return tasks


def make_split_tasks(train: LabelledTexts, test: LabelledTexts, *, seed: int = 0) -> list[ProbeTask]:
    """One-vs-rest tasks trained on ``train`` and tested on ``test`` (SAEBench's protocol).

    Feature rows are ``train``'s texts followed by ``test``'s, so ``index`` of a test row is
    offset by ``len(train.texts)``."""
    if train.classes != test.classes:
        raise ActcacheError(f"the probe test set {test.name} has labels {test.classes} but the train set {train.name} "
                            f"has {train.classes}: give both files the same labels")
    rng = np.random.default_rng([seed, 2])
    offset = len(train.texts)
    tasks = []
    for c in _task_classes(train.classes):
        i_tr, y_tr = _one_vs_rest(np.asarray(train.labels), c, rng)
        i_te, y_te = _one_vs_rest(np.asarray(test.labels), c, rng)
        tasks.append(ProbeTask(name=f"{train.name}/{c}", index=np.concatenate([i_tr, i_te + offset]),
                               y=np.concatenate([y_tr, y_te]),
                               train=np.concatenate([np.ones(len(y_tr), bool), np.zeros(len(y_te), bool)])))
    return tasks
