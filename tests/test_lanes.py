"""trainer.saes.lanes: vector lanes give the scalar loop's very bits, lane by lane."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numba import njit

from trainer.saes.lanes import (WIDTH, lanes_abs, lanes_add, lanes_get, lanes_load, lanes_over, lanes_sq, lanes_store,
                                lanes_zero)


@njit
def _vector(x, g, start):
    sq, ab = lanes_load(start, 0), lanes_load(start, WIDTH)
    ad = lanes_zero()
    over = 0
    for j in range(0, x.size - WIDTH + 1, WIDTH):
        sq = lanes_sq(sq, x, j)
        ab = lanes_abs(ab, x, j)
        ad = lanes_add(ad, g, j)
        over += lanes_over(x, j, 1.5)
    out = np.empty(3 * WIDTH)
    lanes_store(sq, out, 0)
    lanes_store(ab, out, WIDTH)
    for i in range(WIDTH):
        out[2 * WIDTH + i] = lanes_get(ad, i)
    return out, over


def _scalar(x, g, start):
    out = np.concatenate([start, np.zeros(WIDTH)])
    for j in range(x.size // WIDTH * WIDTH):
        i = j % WIDTH
        out[i] = out[i] + x[j] * x[j]
        out[WIDTH + i] = out[WIDTH + i] + abs(x[j])
        out[2 * WIDTH + i] = out[2 * WIDTH + i] + np.float64(g[j])
    over = sum(not abs(v) <= 1.5 for v in x[: x.size // WIDTH * WIDTH])
    return out, over


@pytest.mark.parametrize("g_dtype", [np.float64, np.float32])
def test_lanes_equal_the_scalar_loop_bit_for_bit(g_dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(37 * WIDTH + 5) * 10.0 ** rng.integers(-8, 8, 37 * WIDTH + 5)
    x[[3, 40, 77]] = [math.nan, math.inf, -math.inf]
    g = rng.standard_normal(x.size).astype(g_dtype)
    start = rng.standard_normal(2 * WIDTH)
    got, over = _vector(x, g, start)
    want, want_over = _scalar(x, g, start)
    assert np.array_equal(got, want, equal_nan=True)
    assert over == want_over and over > 3
