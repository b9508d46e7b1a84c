"""The refresh's pool passes (sparsecore.kernels.cpu.pool) against plain NumPy."""
import numpy as np
import pytest

from sparsecore.kernels.cpu import pool, select
from sparsecore.state import csr_to_flat, flat_to_csr

N_ROWS, N_COLS = 13, 17


def _pieces(rng, n_a, n_x, n_r, n_c, ties=False):
    """Disjoint random A, X, R, C over a 13 x 17 layer (sorted flat indices) with
    values; with ``ties`` many magnitudes coincide."""
    idx = rng.choice(N_ROWS * N_COLS, size=n_a + n_x + n_r + n_c, replace=False)
    vals = (rng.integers(-3, 4, idx.shape[0]).astype(np.float32) if ties
            else rng.standard_normal(idx.shape[0]).astype(np.float32))
    vals[vals == 0] = 0.5
    out, s = [], 0
    for n in (n_a, n_x, n_r, n_c):
        order = np.argsort(idx[s:s + n])
        out.append((idx[s:s + n][order].astype(np.int64), vals[s:s + n][order]))
        s += n
    return out


def _top(flat, val, k):
    order = np.lexsort((flat, -np.abs(val)))   # by |v| descending, then flat ascending
    return set(flat[order[:k]].tolist())


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sizes", [(10, 8, 12, 0), (10, 8, 0, 9), (5, 0, 20, 20), (30, 30, 30, 30)])
def test_split_rows_equals_sorting(sizes, ties):
    rng = np.random.default_rng(sum(sizes) + ties)
    (fa, va), (fx, vx), (fr, vr), (fc, vc) = _pieces(rng, *sizes, ties=ties)
    a_ip, a_c = flat_to_csr(fa, N_ROWS, N_COLS)
    x_ip, x_c = flat_to_csr(fx, N_ROWS, N_COLS)
    vals = np.concatenate([va, vx])
    allf = np.concatenate([fa, fx, fr, fc])
    allv = np.concatenate([vals, vr, vc])
    k_b = (len(allf) * 2) // 3
    k_a = max(1, k_b // 2)
    vkeys, mask = select._as_keys(vals)
    pool_args = (np.int64(N_COLS), a_ip, a_c, x_ip, x_c, vals, vkeys, fr, vr,
                 select._as_keys(vr)[0], fc, vc, select._as_keys(vc)[0])
    cuts = []
    for k in (k_a, k_b):
        t, n_taken, _, n_eq = select.topk_threshold([vals, vr, vc], k)
        out = np.empty(len(allf), np.int64)
        cnt = pool.tie_flats(*pool_args, mask, t, out)
        assert cnt == n_eq
        cuts.append((t, int(np.sort(out[:cnt])[n_taken - 1])))
    (t_a, cut_a), (t_b, cut_b) = cuts
    na_ip = np.empty(N_ROWS + 1, np.int64)
    nx_ip = np.empty(N_ROWS + 1, np.int64)
    na_c = np.empty(k_a, np.int32)
    nx_c = np.empty(k_b - k_a, np.int32)
    nv = np.empty(k_b, np.float32)
    src = np.empty(k_b, np.int32)
    nr_f = np.empty(len(allf) - k_b, np.int64)
    nr_v = np.empty(len(allf) - k_b, np.float32)
    pool.split_rows(*pool_args, mask, t_a, np.int64(cut_a), t_b, np.int64(cut_b),
                    na_ip, na_c, nx_ip, nx_c, nv, src, nr_f, nr_v)
    new_a = csr_to_flat(na_ip, na_c, N_COLS)
    new_x = csr_to_flat(nx_ip, nx_c, N_COLS)
    assert set(new_a.tolist()) == _top(allf, allv, k_a)
    assert set(new_a.tolist()) | set(new_x.tolist()) == _top(allf, allv, k_b)
    assert np.all(np.diff(new_a) > 0) and np.all(np.diff(new_x) > 0) and np.all(np.diff(nr_f) > 0)
    value_of = dict(zip(allf.tolist(), allv.tolist()))
    old_pos = {f: i for i, f in enumerate(np.concatenate([fa, fx]).tolist())}
    for f, v, s in zip(np.concatenate([new_a, new_x]).tolist(), nv.tolist(), src.tolist()):
        assert v == value_of[f] and s == old_pos.get(f, -1)
    assert sorted(nr_f.tolist()) == sorted(set(allf.tolist()) - _top(allf, allv, k_b))
    assert all(value_of[f] == v for f, v in zip(nr_f.tolist(), nr_v.tolist()))


def test_dedupe_candidates_equals_setdiff():
    rng = np.random.default_rng(5)
    (fa, _), (fx, _), (fr, _), _ = _pieces(rng, 20, 15, 25, 0)
    a_ip, a_c = flat_to_csr(fa, N_ROWS, N_COLS)
    x_ip, x_c = flat_to_csr(fx, N_ROWS, N_COLS)
    cand = np.sort(rng.choice(N_ROWS * N_COLS, 90, replace=False)).astype(np.int64)
    expect = np.setdiff1d(cand, np.concatenate([fa, fx, fr]))
    m = pool.dedupe_candidates(np.int64(N_COLS), a_ip, a_c, x_ip, x_c, fr, cand)
    assert np.array_equal(cand[:m], expect)


def test_check_disjoint_finds_each_defect():
    rng = np.random.default_rng(6)
    (fa, _), (fx, _), (fr, _), _ = _pieces(rng, 20, 15, 25, 0)
    a_ip, a_c = flat_to_csr(fa, N_ROWS, N_COLS)
    x_ip, x_c = flat_to_csr(fx, N_ROWS, N_COLS)
    n = N_ROWS * N_COLS
    assert pool.check_disjoint(N_COLS, a_ip, a_c, x_ip, x_c, fr, n) == ""
    overlap = np.sort(np.concatenate([fr, fa[:1]]))
    assert "overlap" in pool.check_disjoint(N_COLS, a_ip, a_c, x_ip, x_c, overlap, n)
    assert "reserve" in pool.check_disjoint(N_COLS, a_ip, a_c, x_ip, x_c, fr[::-1].copy(), n)
    row = int(np.flatnonzero(np.diff(a_ip) >= 2)[0])
    bad = a_c.copy()
    bad[a_ip[row]], bad[a_ip[row] + 1] = bad[a_ip[row] + 1], bad[a_ip[row]]
    assert "A's columns" in pool.check_disjoint(N_COLS, a_ip, bad, x_ip, x_c, fr, n)


def test_gather_or_zero():
    t = np.arange(10, dtype=np.float32) + 1
    src = np.array([3, -1, 0, 9, -1], np.int32)
    out = np.empty(5, np.float32)
    pool.gather_or_zero(t, src, out)
    assert np.array_equal(out, np.array([4, 0, 1, 10, 0], np.float32))


def test_trim_reserve_keeps_trained_and_large():
    f = np.arange(6, dtype=np.int64)
    v = np.array([0.1, 0.5, 0.2, 0.05, 0.9, 0.01], np.float32)
    untrained = np.array([True, True, False, True, True, False])
    keep = pool.trim_reserve(f, v, untrained, 0.3)
    assert f[:keep].tolist() == [1, 2, 4, 5]
