"""Refresh helpers (sparsecore.kernels.pool) against plain NumPy."""
import numpy as np
import pytest

from sparsecore.kernels import pool


@pytest.mark.parametrize("sizes", [(0, 0, 0), (5, 0, 3), (40, 17, 60), (1, 1, 1)])
def test_merge_sorted_equals_sort(sizes):
    rng = np.random.default_rng(sum(sizes))
    idx = rng.choice(10_000, size=sum(sizes), replace=False)
    pieces, start = [], 0
    for i, n in enumerate(sizes):
        f = np.sort(idx[start:start + n]).astype(np.int64)
        pieces.append((f, rng.standard_normal(n), np.full(n, i, np.int64)))
        start += n
    flat, val, src = pool.merge_sorted(pieces)
    allf = np.concatenate([p[0] for p in pieces])
    allv = np.concatenate([p[1] for p in pieces])
    alls = np.concatenate([p[2] for p in pieces])
    order = np.argsort(allf)
    assert np.array_equal(flat, allf[order])
    assert np.array_equal(val, allv[order]) and np.array_equal(src, alls[order])


def test_gather_or_zero():
    t = np.arange(10, dtype=np.float32) + 1
    src = np.array([3, -1, 0, 9, -1], np.int64)
    assert np.array_equal(pool.gather_or_zero(t, src), np.array([4, 0, 1, 10, 0], np.float32))


@pytest.mark.parametrize("n, k_b, k_a", [(50, 20, 7), (10, 10, 10), (10, 3, 0), (1, 1, 1)])
def test_split_pool_equals_masks(n, k_b, k_a):
    rng = np.random.default_rng(n + k_b)
    flat = np.sort(rng.choice(1000, n, replace=False)).astype(np.int64)
    val, src = rng.standard_normal(n), rng.integers(-1, 50, n).astype(np.int64)
    b_pos = np.sort(rng.choice(n, k_b, replace=False)).astype(np.int64)
    a_in_b = np.sort(rng.choice(k_b, k_a, replace=False)).astype(np.int64)
    a_f, x_f, v, s, r_f, r_v = pool.split_pool(flat, val, src, b_pos, a_in_b)
    is_a = np.zeros(k_b, bool)
    is_a[a_in_b] = True
    in_b = np.zeros(n, bool)
    in_b[b_pos] = True
    order = np.concatenate([b_pos[is_a], b_pos[~is_a]])
    assert np.array_equal(a_f, flat[b_pos[is_a]]) and np.array_equal(x_f, flat[b_pos[~is_a]])
    assert np.array_equal(v, val[order]) and np.array_equal(s, src[order])
    assert np.array_equal(r_f, flat[~in_b]) and np.array_equal(r_v, val[~in_b])
