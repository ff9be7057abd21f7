"""The penalty's lent arrays (fused_pairs.LentArrays): reused only once nothing holds them."""

import gc

import numpy as np
import torch

from trainer.saes.fused_pairs import LentArrays


def test_a_held_buffer_is_never_lent_twice_and_a_dropped_one_comes_back():
    pool = LentArrays()
    a = pool.take("keys", 1000, np.int64)
    a[:] = 7
    t = torch.from_numpy(a)  # as PairMoments holds it
    del a
    gc.collect()
    b = pool.take("keys", 1000, np.int64)  # `a` is still held through the tensor: a new buffer
    assert not np.shares_memory(b, t.numpy())
    b[:] = 9
    assert (t == 7).all()
    del t
    gc.collect()
    c = pool.take("keys", 990, np.int64)  # the first buffer is back (U changes: 990 fits 1000 + headroom)
    c[:] = 1
    assert (b == 9).all() and c.size == 990


def test_sizes_and_dtypes_that_do_not_fit_get_a_new_buffer():
    pool = LentArrays()
    a = pool.take("q", 100, np.float32)
    buf = a.base
    del a
    gc.collect()
    assert not np.shares_memory(pool.take("q", 10_000, np.float32), buf)  # too small
    gc.collect()
    assert pool.take("q", 100, np.float64).dtype == np.float64


def test_the_pool_keeps_at_most_two_per_name():
    pool = LentArrays()
    views = [pool.take("keys", 64, np.int64) for _ in range(5)]
    del views
    gc.collect()
    assert pool.waiting("keys") == 2
