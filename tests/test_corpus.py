"""Reading documents from the embedded stdlib corpus and from user files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from actcache import corpus
from actcache.corpus import STDLIB_DATASET, dataset_kind, iter_documents
from actcache.errors import ActcacheError


def _take(n: int, dataset: str = STDLIB_DATASET, **kwargs) -> list[str]:
    return list(itertools.islice(iter_documents(dataset, **kwargs), n))


# --- embedded stdlib docstrings ----------------------------------------------------------------


def test_stdlib_corpus_is_large_and_deterministic() -> None:
    first = _take(50)
    assert first == _take(50)
    docs = _take(1000)
    assert len(docs) == 1000
    assert all(isinstance(d, str) and len(d) >= 40 for d in docs)
    assert dataset_kind(STDLIB_DATASET) == "stdlib"
    assert iter_documents() is not None  # default dataset is the stdlib corpus
    assert _take(5, STDLIB_DATASET) == list(itertools.islice(iter_documents(), 5))


def test_stdlib_docstrings_are_cleaned() -> None:
    for doc in _take(200):
        assert doc == doc.strip()
        # cleandoc removes the common indentation of continuation lines.
        lines = [line for line in doc.splitlines()[1:] if line.strip()]
        if lines:
            assert min(len(line) - len(line.lstrip()) for line in lines) == 0


def test_stdlib_walk_skips_tests_and_tools() -> None:
    root = corpus.stdlib_root()
    files = list(corpus._iter_stdlib_files(root))
    assert len(files) > 300
    skipped = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    for path in files:
        assert not skipped & set(path.relative_to(root).parts[:-1]), path
    assert any(path.name == "argparse.py" for path in files)


# --- user files -----------------------------------------------------------------------------------


def test_txt_documents_split_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("first line\nsecond line\n\n\n   \n  another doc  \n\nlast", encoding="utf-8")
    assert dataset_kind(str(path)) == "txt"
    assert list(iter_documents(str(path))) == ["first line\nsecond line", "another doc", "last"]


def test_jsonl_reads_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"body": "alpha text", "id": 1}, {"body": "beta text", "id": 2}, {"body": "", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert dataset_kind(str(path)) == "jsonl"
    assert list(iter_documents(str(path), text_field="body")) == ["alpha text", "beta text"]


def test_jsonl_missing_field_names_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text key", "id": 7}\n', encoding="utf-8")
    docs = iter_documents(str(path))
    assert next(docs) == "ok"
    with pytest.raises(ActcacheError) as info:
        next(docs)
    message = str(info.value)
    for part in (str(path), "line 2", "'text'", "content", "id", "--text-field"):
        assert part in message
    assert "\n" not in message


def test_jsonl_invalid_json_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ActcacheError, match="line 2"):
        list(iter_documents(str(path)))


def test_parquet_reads_in_batches(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    texts = [f"document number {i}" for i in range(10)]
    table = pa.table({"body": texts + [None], "n": list(range(11))})
    pq.write_table(table, path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert dataset_kind(str(path)) == "parquet"
    assert list(iter_documents(str(path), text_field="body")) == texts


def test_parquet_missing_column_lists_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), path)
    with pytest.raises(ActcacheError, match=r"no column 'text'.*body.*--text-field"):
        iter_documents(str(path))


def test_hf_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["one doc", "two doc"], "n": [1, 2]}).save_to_disk(str(single))
    assert dataset_kind(str(single)) == "hf-disk"
    assert list(iter_documents(str(single))) == ["one doc", "two doc"]

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"content": ["held out"]}),
            "train": datasets.Dataset.from_dict({"content": ["train a", "train b"]}),
        }
    ).save_to_disk(str(splits))
    assert dataset_kind(str(splits)) == "hf-disk"
    assert list(iter_documents(str(splits), text_field="content")) == ["train a", "train b"]

    no_train = tmp_path / "no_train"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["only test"]})}).save_to_disk(str(no_train))
    assert list(iter_documents(str(no_train))) == ["only test"]

    with pytest.raises(ActcacheError, match=r"no column 'body'.*text.*--text-field"):
        iter_documents(str(single), text_field="body")


# --- errors -----------------------------------------------------------------------------------------


def test_missing_path_fails_at_the_call(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ActcacheError, match="does not exist"):
        iter_documents(str(missing))
    with pytest.raises(ActcacheError, match="does not exist"):
        dataset_kind(str(missing))


def test_unknown_extension_lists_supported_forms(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ActcacheError) as info:
        iter_documents(str(path))
    for form in (".txt", ".jsonl", ".parquet", "save_to_disk", STDLIB_DATASET):
        assert form in str(info.value)


def test_plain_directory_and_unknown_embedded_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ActcacheError, match="save_to_disk"):
        dataset_kind(str(tmp_path))
    with pytest.raises(ActcacheError, match=STDLIB_DATASET):
        dataset_kind("embedded:wikipedia")
