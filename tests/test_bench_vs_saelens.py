"""The vs-SAELens benchmark's verdicts: each dyncorr row against the topk of its own worker
process, and the dyncorr / topk goal judged on the median over processes when there are several."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_vs_saelens", BENCH / "bench_vs_saelens.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _rounds(wall: float, n: int = 3, **extra: float) -> list[dict]:
    return [{"wall": wall, "cpu": 2 * wall, "reps": 10, **extra} for _ in range(n)]


def _results(bench, pairs: list[tuple[float, float]]) -> dict[str, list[dict]]:
    res = {"sae-lens": _rounds(0.040)}
    for i, (topk, dyncorr) in enumerate(pairs, start=1):
        res[bench.ours_name("topk", i, len(pairs))] = _rounds(topk, mm=0.004, opt=0.0007)
        res[bench.ours_name("dyncorr", i, len(pairs))] = _rounds(dyncorr, mm=0.004, opt=0.0022)
    return res


def test_one_process_judges_each_dyncorr_row(bench):
    lines, ok = bench._section("s", _results(bench, [(0.010, 0.0125)]), 512, False)
    assert not ok
    row = next(line for line in lines if line.startswith("| ours dyncorr |"))
    assert "1.25x" in row and "+2.5 ms" in row and "NOT met" in row
    lines, ok = bench._section("s", _results(bench, [(0.010, 0.0115)]), 512, False)
    assert ok


def test_several_processes_pair_rows_and_judge_the_median(bench):
    # Ratios 1.10, 1.30, 1.15 (each dyncorr against its own process's topk): median 1.15, met.
    pairs = [(0.010, 0.011), (0.013, 0.0169), (0.012, 0.0138)]
    lines, ok = bench._section("s", _results(bench, pairs), 512, False)
    assert ok
    text = "\n".join(lines)
    assert "1.10x, 1.30x, 1.15x; median **1.15x**" in text
    rows = [line for line in lines if line.startswith("| ours dyncorr, process")]
    assert [r.split("|")[12].strip() for r in rows] == ["1.10x", "1.30x", "1.15x"]
    # Ratios 1.25, 1.35, 1.21: every process above the goal, and so the median.
    pairs = [(0.010, 0.0125), (0.010, 0.0135), (0.010, 0.0121)]
    lines, ok = bench._section("s", _results(bench, pairs), 512, False)
    assert not ok
    assert "median **1.25x** (goal <= 1.2x: NOT met)" in "\n".join(lines)


def test_saelens_goals_at_the_main_size(bench):
    res = _results(bench, [(0.005, 0.0055)])  # 8x and 7.3x SAELens' 0.040 s
    lines, ok = bench._section("s", res, 4096, True)
    assert ok
    res = _results(bench, [(0.008, 0.0085)])  # 5x and 4.7x: both below their goals
    lines, ok = bench._section("s", res, 4096, True)
    assert not ok
    assert sum("NOT met" in line for line in lines) == 2
