"""Text documents from offline sources.

A *dataset* argument names where documents come from:

* ``embedded:stdlib-docstrings`` (the default): docstrings of the installed Python standard
  library, read with :mod:`ast` so nothing is imported. Always available, no download.
* a ``.txt`` file: documents separated by blank lines.
* a ``.jsonl`` file: one JSON object per line, the text under ``text_field``.
* a ``.parquet`` file: the ``text_field`` column, read a batch at a time.
* a directory written by Hugging Face ``datasets`` ``save_to_disk`` (Dataset or DatasetDict).

Every reader is a generator, so taking the first N documents of a large corpus is cheap.
Empty documents are skipped; deciding that a corpus is empty is left to the caller.
"""

from __future__ import annotations

import ast
import codecs
import inspect
import json
import logging
import os
import sysconfig
import warnings
from collections.abc import Iterator
from typing import Any
from pathlib import Path

from actcache.errors import ActcacheError

logger = logging.getLogger(__name__)

STDLIB_DATASET = "embedded:stdlib-docstrings"

# Test suites and tools are huge and repetitive; site-packages is not the standard library.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
# Very short docstrings ("Return self.") carry almost no text and would dominate the stream.
_MIN_DOCSTRING_CHARS = 40
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_BATCH_ROWS = 1024
_SNIFF_BYTES = 1 << 16  # head of a text corpus checked before extraction starts
_SUPPORTED = (
    f"'{STDLIB_DATASET}', a .txt file (blank-line separated), a .jsonl file, a .parquet file, "
    "or a directory saved with datasets' save_to_disk"
)
_DATA_EXTRA_HINT = "pip install 'actcache-sae[data]'"


def dataset_kind(dataset: str) -> str:
    """Classify ``dataset`` as "stdlib", "txt", "jsonl", "parquet" or "hf-disk".

    Raises ActcacheError for a missing path or a form no reader handles.
    """
    if dataset.startswith("embedded:"):
        if dataset == STDLIB_DATASET:
            return "stdlib"
        raise ActcacheError(
            f"unknown embedded dataset {dataset!r}: the only embedded corpus is '{STDLIB_DATASET}'"
        )
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ActcacheError(f"dataset {dataset} does not exist: pass an existing path or {_SUPPORTED}")
    if path.is_dir():
        if any((path / marker).is_file() for marker in _HF_DISK_MARKERS):
            return "hf-disk"
        raise ActcacheError(
            f"dataset directory {dataset} is not a datasets save_to_disk folder (no "
            f"{'/'.join(_HF_DISK_MARKERS)}): pass {_SUPPORTED}"
        )
    suffix = path.suffix.lower()
    kinds = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
    if suffix not in kinds:
        raise ActcacheError(f"unsupported dataset file {dataset} ({suffix or 'no extension'}): pass {_SUPPORTED}")
    return kinds[suffix]


def check_corpus(dataset: str) -> str:
    """:func:`dataset_kind`, plus a look at the head of a text corpus: a binary or non-UTF-8
    file fails here, before anything is written, rather than deep inside tokenisation."""
    kind = dataset_kind(dataset)
    if kind in ("txt", "jsonl"):
        path = Path(dataset).expanduser()
        try:
            with path.open("rb") as fh:
                head = fh.read(_SNIFF_BYTES)
        except OSError as err:
            raise ActcacheError(f"cannot read dataset {dataset} ({err.strerror}): check its permissions") from None
        if b"\x00" in head:
            raise ActcacheError(f"dataset {dataset} is a binary file, not text: pass a UTF-8 .txt or .jsonl corpus")
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as err:
            raise _not_utf8(path, err, None) from None
    return kind


def _not_utf8(path: Path, err: UnicodeDecodeError, lineno: int | None) -> ActcacheError:
    where = f"line {lineno}" if lineno else f"byte {err.start}"
    return ActcacheError(f"dataset {path} is not UTF-8 text ({where}: {err.reason}): "
                         "convert it to UTF-8 or pass another --dataset")


def iter_documents(dataset: str = STDLIB_DATASET, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of ``dataset`` lazily, in a deterministic order.

    The source is validated now, so a bad path fails at the call rather than at first use.
    """
    kind = dataset_kind(dataset)
    if kind == "stdlib":
        return _iter_stdlib_docstrings()
    path = Path(dataset).expanduser()
    if kind == "txt":
        return _iter_txt(path)
    if kind == "jsonl":
        return _iter_jsonl(path, text_field)
    if kind == "parquet":
        return _iter_parquet(path, text_field)
    return _iter_hf_disk(path, text_field)


# --- embedded standard-library docstrings -------------------------------------------------


def stdlib_root() -> Path:
    """The installed Python standard library (the embedded corpora's source)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _iter_stdlib_files(root: Path) -> Iterator[Path]:
    """Walk ``root`` in sorted order, pruning directories that are not library code."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place both fixes the walk order and lets the pruning take effect.
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Docstrings of a module and of its classes and functions, in source order."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=False)
        if doc:
            # cleandoc keeps a whitespace-only last line when there is no indented body line.
            yield inspect.cleandoc(doc).strip()
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings(child)


def _parse_file(path: Path) -> ast.AST | None:
    try:
        source = path.read_bytes()
        # Old modules have invalid escape sequences; their warnings are noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, OSError) as err:
        logger.debug("skipping %s: %s", path, err)
        return None


def iter_docstrings_under(root: Path) -> Iterator[str]:
    """Cleaned docstrings of every library ``.py`` file under ``root``, in a fixed order; too short
    ones (``_MIN_DOCSTRING_CHARS``) dropped. The embedded corpus and probing set both read this."""
    for path in _iter_stdlib_files(root):
        tree = _parse_file(path)
        if tree is None:
            continue
        for doc in _docstrings(tree):
            if len(doc) >= _MIN_DOCSTRING_CHARS:
                yield doc


def _iter_stdlib_docstrings() -> Iterator[str]:
    return iter_docstrings_under(stdlib_root())


# --- user files ------------------------------------------------------------------------------


def _iter_txt(path: Path) -> Iterator[str]:
    """Paragraphs of a text file; one or more blank lines end a document."""
    lines: list[str] = []
    for line in _utf8_lines(path):
        if line.strip():
            lines.append(line)
            continue
        if lines:
            yield "".join(lines).strip()
            lines = []
    if lines:
        yield "".join(lines).strip()


def _utf8_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file; a byte sequence that is not UTF-8 is a user error naming the line."""
    lineno = 0
    with path.open(encoding="utf-8") as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                yield line
        except UnicodeDecodeError as err:
            raise _not_utf8(path, err, lineno + 1) from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` of every non-blank line; invalid JSON is a user error naming the line."""
    for lineno, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise ActcacheError(
                f"{path} line {lineno} is not valid JSON ({err.msg}): fix the file so each line "
                "is one JSON object"
            ) from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise ActcacheError(
                f"{path} line {lineno} is a JSON {type(record).__name__}, not an object: "
                f"write one object per line with the text under a key such as {text_field!r}"
            )
        if text_field not in record:
            raise ActcacheError(
                f"{path} line {lineno} has no field {text_field!r} (keys: {sorted(record)}): "
                "pass --text-field naming the key that holds the text"
            )
        text = _check_text(record[text_field], f"{path} line {lineno}", text_field)
        if text:
            yield text


def _check_text(value: object, where: str, text_field: str) -> str | None:
    """The text of one record, None for a null; anything but a string is a user error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ActcacheError(
            f"{where}: field {text_field!r} holds a {type(value).__name__}, not text: "
            "pass --text-field naming a string field"
        )
    return value if value.strip() else None


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ActcacheError(f"reading {path} needs pyarrow: {_DATA_EXTRA_HINT}") from None
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ActcacheError(
            f"{path} has no column {text_field!r} (columns: {columns}): "
            "pass --text-field naming the text column"
        )
    # Checked before the generator starts, so a wrong column fails at the call.
    return _parquet_texts(parquet, path, text_field)


def _parquet_texts(parquet, path: Path, text_field: str) -> Iterator[str]:
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            text = _check_text(value, str(path), text_field)
            if text:
                yield text


def _load_hf_split(path: Path):  # -> datasets.Dataset, kept untyped so `datasets` stays optional
    try:
        import datasets
    except ImportError:
        raise ActcacheError(f"reading {path} needs the datasets package: {_DATA_EXTRA_HINT}") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise ActcacheError(f"{path} is an empty DatasetDict: save a dataset with at least one split")
        split = "train" if "train" in loaded else next(iter(loaded))
        logger.info("using split %r of %s", split, path)
        return loaded[split]
    return loaded


def _iter_hf_disk(path: Path, text_field: str) -> Iterator[str]:
    dataset = _load_hf_split(path)
    if text_field not in dataset.column_names:
        raise ActcacheError(
            f"{path} has no column {text_field!r} (columns: {dataset.column_names}): "
            "pass --text-field naming the text column"
        )
    return _hf_texts(dataset.select_columns([text_field]), path, text_field)


def _hf_texts(dataset, path: Path, text_field: str) -> Iterator[str]:
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        for value in batch[text_field]:
            text = _check_text(value, str(path), text_field)
            if text:
                yield text
