"""trainer.schedules: exact values at the ends, the middle and beyond; monotonicity; rounding."""

from __future__ import annotations

import dataclasses
import math

import pytest

from trainer import schedules as sch


def test_cosine_k_exact_values():
    # offset 10, T = 100: k_start up to the offset, midpoint at 60, k_end from 110 on
    f = lambda t: sch.cosine_k(t, 128, 32, horizon=100, offset=10)  # noqa: E731
    assert [f(0), f(10), f(60), f(110), f(111), f(10_000)] == [128, 128, 80, 32, 32, 32]
    assert f(35) == sch.round_half_up(32 + 96 * (1 + math.cos(math.pi / 4)) / 2) == 114  # 113.94
    assert sch.cosine_k(0, 64, 64, 10) == sch.cosine_k(5, 64, 64, 10) == sch.cosine_k(99, 64, 64, 10) == 64


def test_cosine_k_rounds_half_up_and_is_monotone():
    # 2 + 3 * (1 + cos(pi / 2)) / 2 = 3.5 -> 4 (banker's rounding would give 4 here but 2.5 -> 2 elsewhere)
    assert sch.cosine_k(1, 5, 2, horizon=2) == 4
    assert sch.round_half_up(2.5) == 3 and sch.round_half_up(2.4999) == 2 and sch.round_half_up(3.0) == 3
    ks = [sch.cosine_k(t, 128, 32, horizon=997, offset=3) for t in range(1100)]
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert set(range(32, 129)) <= set(ks)  # every integer visited on a long enough horizon
    assert all(isinstance(k, int) for k in ks)
    ks_up = [sch.cosine_k(t, 8, 40, horizon=50) for t in range(60)]  # growing k also works
    assert ks_up[0] == 8 and ks_up[-1] == 40 and all(a <= b for a, b in zip(ks_up, ks_up[1:]))


def test_cosine_lambda_exact_values_and_alignment_with_k():
    f = lambda t: sch.cosine_lambda(t, 0.1, horizon=100, offset=10)  # noqa: E731
    assert f(0) == 0.0 and f(10) == 0.0
    assert f(60) == pytest.approx(0.05, abs=1e-15)
    assert f(110) == 0.1 and f(500) == 0.1
    lams = [f(t) for t in range(130)]
    assert all(a <= b for a, b in zip(lams, lams[1:]))
    # the penalty rises exactly as k falls: before rounding the two fractions sum to 1
    for t in range(0, 130, 7):
        u = sch.cosine_progress(t, 100, 10)
        k_raw = 32 + 96 * (1 + math.cos(math.pi * u)) / 2
        assert (k_raw - 32) / 96 + f(t) / 0.1 == pytest.approx(1.0, abs=1e-12)
        assert sch.cosine_k(t, 128, 32, 100, 10) == sch.round_half_up(k_raw)


def test_progress_edge_cases():
    assert sch.cosine_progress(5, 0, 5) == 1.0 and sch.cosine_progress(4, 0, 5) == 0.0
    assert sch.cosine_progress(50, 100) == 0.5
    with pytest.raises(ValueError):
        sch.cosine_progress(-1, 10)
    with pytest.raises(ValueError):
        sch.cosine_k(0, 0, 1, 10)


def test_lr_factor_warmup_then_cosine_to_min():
    f = lambda t: sch.lr_factor(t, total_steps=110, warmup_steps=10, lr_min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == 1.0 and f(10) == 1.0
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-15)
    assert f(110) == 0.1 and f(10_000) == 0.1
    assert 0.1 < f(109) < 0.1 + 1e-3  # the last step runs just above the floor
    vals = [f(t) for t in range(120)]
    assert all(a <= b for a, b in zip(vals[:10], vals[1:11])) and all(a >= b for a, b in zip(vals[10:], vals[11:]))
    assert sch.lr_factor(0, 100) == 1.0 and sch.lr_factor(100, 100) == 0.0  # no warm-up, lr_min 0 default
    assert sch.lr_factor(50, 100) == pytest.approx(0.5, abs=1e-15)


def test_linear_warmup():
    assert [sch.linear_warmup(t, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert sch.linear_warmup(0, 0) == 1.0
    with pytest.raises(ValueError):
        sch.linear_warmup(0, -1)


def test_schedule_aligns_everything_on_one_horizon():
    s = sch.Schedule(total_steps=1000, warmup_steps=50, penalty_warmup_steps=20, lr_min_ratio=0.0)
    assert s.start == 50 and s.T == 950
    # warm-up: k at its start, no penalty, lr ramping
    assert s.k(0, 128, 32) == 128 and s.lam(49, 0.1) == 0.0 and s.lr_factor(0) == pytest.approx(1 / 50)
    # middle of the horizon: all three at their midpoints together
    mid = 50 + 475
    assert s.k(mid, 128, 32) == 80 and s.lam(mid, 0.1) == pytest.approx(0.05) and s.lr_factor(mid) == pytest.approx(0.5)
    # end of training: k_end, lambda_max and lr_min reached together
    assert (s.k(1000, 128, 32), s.lam(1000, 0.1), s.lr_factor(1000)) == (32, 0.1, 0.0)
    assert s.penalty_warmup(0) == 0.05 and s.penalty_warmup(19) == 1.0
    custom = sch.Schedule(total_steps=1000, warmup_steps=50, horizon=100, offset=0)
    assert custom.k(100, 128, 32) == 32 and custom.lam(50, 1.0) == pytest.approx(0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.total_steps = 5  # type: ignore[misc]
    for bad in [dict(total_steps=0), dict(total_steps=10, warmup_steps=11), dict(total_steps=10, lr_min_ratio=2.0),
                dict(total_steps=10, horizon=-1)]:
        with pytest.raises(ValueError):
            sch.Schedule(**bad)
