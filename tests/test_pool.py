"""The refresh's pool passes (sparsecore.kernels.cpu.pool) against plain NumPy."""
import numpy as np
import pytest

from sparsecore import spill
from sparsecore.kernels.cpu import init, pool, select
from sparsecore.state import csr_to_flat, flat_to_csr

N_ROWS, N_COLS = 13, 17
KEY = init.key_to_uint64(1234)


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
    cur = np.zeros(10, np.int64)
    sp = np.empty(0, np.int64), np.empty(0, np.float32)
    assert pool.split_rows(*pool_args, mask, t_a, np.int64(cut_a), t_b, np.int64(cut_b),
                           mask.dtype.type(0), KEY, 0, 1.0, True, na_ip, na_c, nx_ip, nx_c,
                           nv, src, nr_f, nr_v, *sp, cur) == 0
    assert cur[0] == N_ROWS and cur[7] == len(nr_f) and cur[8] == 0
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


@pytest.mark.parametrize("cap", [1, 2, 1000])
def test_split_rows_spills_below_the_reserve_rank_and_resumes(cap):
    """Entries below the reserve threshold leave: dropped when they still hold
    theta0, else written to the spill buffer in flat order, across as many
    resumed calls as the buffer size needs."""
    rng = np.random.default_rng(9)
    (fa, va), (fx, vx), (fr, vr), (fc, vc) = _pieces(rng, 20, 20, 40, 30)
    vr[::3] = init.init_values(1234, fr[::3], 0, 1.0, np.float32)   # untrained: theta0
    a_ip, a_c = flat_to_csr(fa, N_ROWS, N_COLS)
    x_ip, x_c = flat_to_csr(fx, N_ROWS, N_COLS)
    vals = np.concatenate([va, vx])
    allf = np.concatenate([fa, fx, fr, fc])
    allv = np.concatenate([vals, vr, vc])
    k_a, k_b, keep = 15, 35, 25
    vkeys, mask = select._as_keys(vals)
    pieces = [vals, vr, vc]
    pool_args = (np.int64(N_COLS), a_ip, a_c, x_ip, x_c, vals, vkeys, fr, vr,
                 select._as_keys(vr)[0], fc, vc, select._as_keys(vc)[0])
    t_a = select.topk_threshold(pieces, k_a)[0]
    t_b = select.topk_threshold(pieces, k_b)[0]
    t_r = select.topk_threshold(pieces, k_b + keep)[0]    # no ties: normal values
    n_res = keep
    out = [np.empty(n, dt) for n, dt in ((N_ROWS + 1, np.int64), (k_a, np.int32),
                                         (N_ROWS + 1, np.int64), (k_b - k_a, np.int32),
                                         (k_b, np.float32), (k_b, np.int32),
                                         (n_res, np.int64), (n_res, np.float32))]
    sp_f, sp_v = np.empty(cap, np.int64), np.empty(cap, np.float32)
    cur = np.zeros(10, np.int64)
    got_f, got_v, calls = [], [], 0
    while cur[0] < N_ROWS:
        ns = pool.split_rows(*pool_args, mask, t_a, np.int64(1 << 62), t_b, np.int64(1 << 62),
                             t_r, KEY, 0, 1.0, True, *out, sp_f, sp_v, cur)
        got_f += sp_f[:ns].tolist()
        got_v += sp_v[:ns].tolist()
        calls += 1
    below = set(allf.tolist()) - _top(allf, allv, k_b + keep)
    theta0 = dict(zip(allf.tolist(), init.init_values(1234, allf, 0, 1.0, np.float32).tolist()))
    value_of = dict(zip(allf.tolist(), allv.tolist()))
    dropped = {f for f in below if value_of[f] == theta0[f]}
    assert dropped and int(cur[8]) == len(dropped)
    assert got_f == sorted(below - dropped) and got_v == [value_of[f] for f in got_f]
    assert calls >= len(got_f) // cap
    assert sorted(out[6].tolist()) == sorted(_top(allf, allv, k_b + keep) - _top(allf, allv, k_b))


def _store(tmp_path, flat, val):
    w = spill.Writer(str(tmp_path), np.float32)
    w.write(np.asarray(flat, np.int64), np.asarray(val, np.float32))
    return w.close()


def test_cold_store_replenish_pass_and_rewrite(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "CHUNK", 3)     # several chunks per pass
    st = _store(tmp_path, [2, 5, 7, 11, 13, 20, 31], [0.1, -0.5, 0.3, 0.05, -0.45, 0.2, 0.4])
    assert st.n == 7 and st.max_abs == np.float32(0.5)
    cands = np.array([1, 5, 6, 13, 14, 31, 40], np.int64)
    m, f, v = spill.replenish_pass(st, cands, 0.3, 0.5)
    assert cands[:m].tolist() == [1, 6, 14, 40]            # 5, 13, 31 hold cold values
    assert f.tolist() == [7, 13, 31] and np.allclose(v, [0.3, -0.45, 0.4])
    spilled = _store(tmp_path, [3, 12, 50], [0.01, -0.02, 0.03])
    new = spill.rewrite(st, 0.3, spilled, str(tmp_path))
    nf, nv = (a.tolist() for a in new.mapped())
    assert nf == [2, 3, 11, 12, 20, 50] and np.allclose(nv, [0.1, 0.01, 0.05, -0.02, 0.2, 0.03])
    assert spill.rewrite(st, np.inf, spill.ColdStore.empty(np.float32), str(tmp_path)) is st
    assert spill.cast(new, np.float64).mapped()[1].dtype == np.float64
    prefix = new.prefix
    del new, nf, nv
    import gc
    gc.collect()
    assert not (tmp_path / (prefix.rsplit("/", 1)[1] + ".idx")).exists()


def test_check_cold_finds_each_defect():
    rng = np.random.default_rng(7)
    (fa, _), (fx, _), (fr, _), (fc, vc) = _pieces(rng, 20, 15, 25, 10)
    a_ip, a_c = flat_to_csr(fa, N_ROWS, N_COLS)
    x_ip, x_c = flat_to_csr(fx, N_ROWS, N_COLS)
    n = N_ROWS * N_COLS
    floor = float(np.abs(vc).max()) + 1

    def check(f, v=vc, fl=floor):
        return pool.check_cold(N_COLS, a_ip, a_c, x_ip, x_c, fr, f, v, fl, n)
    assert check(fc) == ""
    for other in (fa, fx, fr):
        bad = np.sort(np.concatenate([fc[1:], other[:1]]))
        assert "also in the pool" in check(bad)
    assert "not sorted" in check(fc[::-1].copy())
    assert "not sorted" in check(np.concatenate([fc[:-1], [n]]))
    assert "not below the floor" in check(fc, fl=float(np.abs(vc).max()))


# --------------------------------------------------------------------------------------
# the parallel split (split_pool) and tie lookup (tie_flats_sorted) against the serial
# merge walk (split_rows, tie_flats)
# --------------------------------------------------------------------------------------

def _layer_pieces(rng, n_rows, n_cols, sizes, dtype, style, empty_rows=()):
    """Disjoint random A, X, R, C (sorted flat indices, values) over n_rows x n_cols,
    avoiding ``empty_rows``; ``style`` "ties" draws few distinct magnitudes, "theta0"
    makes a third of the entries hold theta0 (they are dropped, not spilled)."""
    allowed = np.array([f for f in range(n_rows * n_cols) if f // n_cols not in empty_rows])
    idx = rng.choice(allowed, size=sum(sizes), replace=False).astype(np.int64)
    if style == "ties":
        vals = rng.choice(np.array([-2, -1, -0.5, 0.5, 1, 2, 0.0], dtype), idx.shape[0])
    else:
        vals = rng.standard_normal(idx.shape[0]).astype(dtype)
    if style == "theta0":
        vals[::3] = init.init_values(1234, idx[::3], 0, 1.0, dtype)
    out, s = [], 0
    for n in sizes:
        order = np.argsort(idx[s:s + n])
        out.append((idx[s:s + n][order], vals[s:s + n][order]))
        s += n
    return out


def _split_both(n_rows, n_cols, pieces, k_a, k_b, keep, cap, want_src=True):
    """Run split_rows (resumed until done) and split_pool on the same pool and
    thresholds; return both results (outputs, spilled stream, reserve size, dropped)."""
    (fa, va), (fx, vx), (fr, vr), (fc, vc) = pieces
    dtype = va.dtype
    a_ip, a_c = flat_to_csr(fa, n_rows, n_cols)
    x_ip, x_c = flat_to_csr(fx, n_rows, n_cols)
    vals = np.concatenate([va, vx])
    vkeys, mask = select._as_keys(vals)
    pool_args = (np.int64(n_cols), a_ip, a_c, x_ip, x_c, vals, vkeys, fr, vr,
                 select._as_keys(vr)[0], fc, vc, select._as_keys(vc)[0])
    ths = select.topk_thresholds([vals, vr, vc], [k_a, k_b] + ([k_b + keep] if keep else []))
    cuts = []
    for t, n_taken, _, n_eq in ths[:2]:
        ties = pool.tie_flats_sorted(*pool_args, mask, t)
        out = np.empty(max(n_eq, 1), np.int64)
        assert pool.tie_flats(*pool_args, mask, t, out) == n_eq == ties.shape[0]
        assert np.array_equal(np.sort(out[:n_eq]), ties)
        cuts.append((t, ties[n_taken - 1] if n_taken < n_eq else 1 << 62))
    (t_a, cut_a), (t_b, cut_b) = cuts
    n_pool = len(fa) + len(fx) + len(fr) + len(fc)
    if keep:
        t_r, n_r, _, eq_r = ths[2]
        n_res = keep - n_r + eq_r
    else:
        t_r, n_res = mask.dtype.type(0), n_pool - k_b
    results = []
    for parallel in (False, True):
        outs = [np.full(n, -7, dt) for n, dt in (
            (n_rows + 1, np.int64), (k_a, np.int32), (n_rows + 1, np.int64),
            (k_b - k_a, np.int32), (k_b, dtype), (k_b if want_src else 0, np.int32),
            (n_res, np.int64), (n_res, dtype))]
        sp_f, sp_v = np.empty(cap, np.int64), np.empty(cap, dtype)
        got_f, got_v, calls = [], [], []
        args = (*pool_args, mask, t_a, np.int64(cut_a), t_b, np.int64(cut_b), t_r, KEY, 0, 1.0,
                dtype == np.float32, *outs, sp_f, sp_v)
        if parallel:
            def emit(lo, hi):
                assert 0 <= lo < hi <= cap
                got_f.extend(sp_f[lo:hi].tolist())
                got_v.extend(sp_v[lo:hi].tolist())
                calls.append(hi - lo)
            n_kept, dropped = pool.split_pool(*args, emit)
        else:
            cur = np.zeros(10, np.int64)
            while cur[0] < n_rows:
                ns = pool.split_rows(*args, cur)
                got_f += sp_f[:ns].tolist()
                got_v += sp_v[:ns].tolist()
            n_kept, dropped = int(cur[7]), int(cur[8])
        results.append((outs, got_f, got_v, n_kept, dropped))
    return results


def _assert_same(results):
    (o1, f1, v1, n1, d1), (o2, f2, v2, n2, d2) = results
    for a, b in zip(o1, o2):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert f1 == f2 and v1 == v2 and (n1, d1) == (n2, d2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("style", ["normal", "ties", "theta0"])
@pytest.mark.parametrize("shape,sizes,empty_rows", [
    ((13, 17), (30, 30, 30, 30), ()),
    ((40, 150), (900, 700, 1200, 0), (0, 5, 6, 39)),       # several bitmap words per row
    ((40, 150), (600, 0, 900, 400), (3,)),                 # X empty
    ((7, 64), (100, 90, 0, 0), (1,)),                      # only B
    ((5, 200), (1, 0, 0, 300), ()),                        # one A entry, C only
])
def test_split_pool_equals_split_rows(dtype, style, shape, sizes, empty_rows):
    rng = np.random.default_rng(sum(sizes) + len(style))
    n_rows, n_cols = shape
    pieces = _layer_pieces(rng, n_rows, n_cols, sizes, dtype, style, empty_rows)
    n_pool = sum(sizes)
    for k_b in sorted({1, n_pool // 3, (2 * n_pool) // 3, n_pool}):
        for k_a in sorted({1, max(1, k_b // 2), k_b}):
            _assert_same(_split_both(n_rows, n_cols, pieces, k_a, k_b, 0, 0))
            if n_pool - k_b >= 4:
                keep = (n_pool - k_b) // 3
                for cap in (n_cols, n_pool):
                    _assert_same(_split_both(n_rows, n_cols, pieces, k_a, k_b, keep, cap))
    _assert_same(_split_both(n_rows, n_cols, pieces, 1, n_pool // 2, 0, 0, want_src=False))


def test_split_pool_spills_in_flat_order_across_buffer_fills():
    rng = np.random.default_rng(3)
    pieces = _layer_pieces(rng, 40, 150, (300, 300, 2500, 500), np.float32, "theta0")
    res = _split_both(40, 150, pieces, 100, 500, 300, 150)
    _assert_same(res)
    outs, got_f, _, _, dropped = res[1]
    assert len(got_f) > 3 * 150 and dropped > 0 and got_f == sorted(got_f)


def test_split_pool_refuses_a_buffer_smaller_than_a_row():
    rng = np.random.default_rng(4)
    pieces = _layer_pieces(rng, 13, 17, (20, 20, 150, 0), np.float32, "normal")
    with pytest.raises(pool.SpillBufferTooSmall):
        _split_both(13, 17, pieces, 10, 30, 10, 2)


def test_row_starts():
    flat = np.array([0, 3, 4, 17, 40, 41], np.int64)
    assert pool.row_starts(flat, np.int64(10), 5).tolist() == [0, 3, 4, 4, 4, 6]
    assert pool.row_starts(flat[:0], np.int64(10), 2).tolist() == [0, 0, 0]


@pytest.mark.parametrize("n_cand", [0, 1, 7, 90, 1000])
def test_dedupe_candidates_parallel_parts_equal_setdiff(n_cand):
    """Candidates split into parallel parts, duplicates at part boundaries, empty rows,
    and indices past the last row (dropped)."""
    rng = np.random.default_rng(n_cand)
    n_rows, n_cols = 40, 150
    (fa, _), (fx, _), (fr, _), _ = _layer_pieces(rng, n_rows, n_cols, (900, 700, 1200, 0),
                                                 np.float32, "normal", (0, 5, 6))
    a_ip, a_c = flat_to_csr(fa, n_rows, n_cols)
    x_ip, x_c = flat_to_csr(fx, n_rows, n_cols)
    n = n_rows * n_cols
    cand = np.sort(rng.choice(n + 50, n_cand, replace=False)).astype(np.int64)
    expect = np.setdiff1d(cand[cand < n], np.concatenate([fa, fx, fr]))
    m = pool.dedupe_candidates(np.int64(n_cols), a_ip, a_c, x_ip, x_c, fr, cand)
    assert np.array_equal(cand[:m], expect)


@pytest.mark.parametrize("na, nb_", [(0, 0), (0, 5), (7, 0), (1, 1), (40_000, 3), (25_000, 31_000)])
def test_merge_sorted_in_parallel_parts(monkeypatch, na, nb_):
    """The parallel merge (parts of 1,000 entries: many starts found by the merge path
    search, including runs that take a whole part from one side) equals a sort."""
    monkeypatch.setattr(pool, "MERGE_PART", 1000)
    rng = np.random.default_rng(na + 3 * nb_)
    idx = rng.choice(10 * (na + nb_) + 10, size=na + nb_, replace=False).astype(np.int64)
    if na > 30_000:   # one long run of a below all of b, then interleaved
        idx = np.sort(idx)
    fa, fb = np.sort(idx[:na]), np.sort(idx[na:])
    va, vb = fa.astype(np.float32) * 0.5, fb.astype(np.float32) * -0.25
    fo = np.empty(na + nb_, np.int64)
    vo = np.empty(na + nb_, np.float32)
    pool.merge_sorted(fa, va, fb, vb, fo, vo)
    order = np.argsort(np.concatenate([fa, fb]), kind="stable")
    np.testing.assert_array_equal(fo, np.concatenate([fa, fb])[order])
    np.testing.assert_array_equal(vo, np.concatenate([va, vb])[order])


def test_mark_present_in_parallel_parts():
    rng = np.random.default_rng(5)
    cands = np.unique(rng.integers(0, 2_000_000, 400_000)).astype(np.int64)
    flats = np.unique(rng.integers(0, 2_000_000, 300_000)).astype(np.int64)
    for nparts in (1, 3, 16):
        dup = np.zeros(cands.shape[0], np.bool_)
        spill._mark_present(cands, flats, dup, np.int64(nparts))
        np.testing.assert_array_equal(dup, np.isin(cands, flats))


def test_cold_store_bounds_and_rewrite_without_reading(tmp_path, monkeypatch):
    """A store keeps the magnitude range of its values; a rewrite that keeps none of
    them (all were read back) returns the spilled run without opening the store."""
    st = _store(tmp_path, [2, 5, 7], [0.1, -0.5, 0.3])
    assert st.min_abs == np.float32(0.1) and st.max_abs == np.float32(0.5)
    spilled = _store(tmp_path, [3, 12], [0.01, -0.02])

    def no_reading(*a, **k):
        raise AssertionError("the store was read")
    monkeypatch.setattr(spill.ColdStore, "chunks", no_reading)
    assert spill.rewrite(st, 0.1, spilled, str(tmp_path)) is spilled
    with pytest.raises(AssertionError, match="was read"):
        spill.rewrite(st, 0.2, spilled, str(tmp_path))   # 0.1 stays: the store is read


def test_replenish_drops_candidates_held_by_a_cold_store_below_the_band(tmp_path):
    """A trained coordinate spilled with a tiny value whose theta0 lies in a later
    replenishing band: the store holds nothing in the band (its largest magnitude is
    below it), yet the scanned candidate must still be dropped, else the pool would
    get theta0 for a coordinate whose real value is in the store. Regression: the
    read of the store used to be skipped whenever no stored value was in the band."""
    import torch
    from sparsecore import topkast
    from sparsecore.state import SparseState, flat_to_csr
    n_rows, n_cols, key, param = 1000, 1000, 99, 1.0
    spec = topkast.InitSpec(key, init.UNIFORM, param, np.float32)
    theta0 = init.init_values(key, np.arange(n_rows * n_cols), init.UNIFORM, param, np.float32)
    floor = 0.99995
    top = np.flatnonzero(np.abs(theta0) >= floor)        # all in the pool, trained down
    band = np.flatnonzero((np.abs(theta0) >= floor - 4e-5) & (np.abs(theta0) < floor))
    cold_i = int(band[np.argmax(np.abs(theta0[band]))])  # the largest theta0 below the floor
    b, r = top[:4], top[4:]
    b_val = np.full(4, 0.01, np.float32)
    a_ip, a_c = flat_to_csr(b[:2], n_rows, n_cols)
    x_ip, x_c = flat_to_csr(b[2:], n_rows, n_cols)
    w = spill.Writer(str(tmp_path), np.float32)
    w.write(np.array([cold_i], np.int64), np.array([1e-3], np.float32))
    store = w.close()
    st = SparseState(n_cols, n_rows, torch.from_numpy(a_ip), torch.from_numpy(a_c),
                     torch.from_numpy(x_ip), torch.from_numpy(x_c), torch.from_numpy(r),
                     torch.full((r.size,), 0.02), floor, key, cold=store)
    res = topkast.refresh(st, b_val, k_a=2, k_b=4, reserve_target=0, spec=spec,
                          spill_dir=str(tmp_path))
    assert res.info["replenished"] >= 1
    # the oracle: theta0 everywhere, B's trained values, the cold value
    dense = theta0.astype(np.float64)
    dense[b] = 0.01
    dense[r] = 0.02
    dense[cold_i] = 1e-3
    order = np.lexsort((np.arange(dense.size), -np.abs(dense)))
    new = res.state
    got_b = np.sort(np.concatenate([new.a_flat(), new.x_flat()]))
    np.testing.assert_array_equal(got_b, np.sort(order[:4]))
    assert cold_i not in set(new.reserve_idx.tolist()) | set(got_b.tolist())


def test_read_back_and_rewrite_agree_at_a_bound_between_float32_values(tmp_path):
    """A float32 value just below a float64 band edge: the read-back (lo <= |v|) and
    the rewrite (|v| < lo) compare in float64 alike, so the entry is in exactly one
    of them (a float32 comparison rounds the edge onto the value)."""
    v = np.float32(0.3)
    lo = float(v) + 1e-12                     # rounds to v in float32
    st = _store(tmp_path, [4, 8], [v, 0.9])
    cands = np.empty(0, np.int64)
    m, f, _ = spill.replenish_pass(st, cands, lo, 1.0)
    kept = spill.rewrite(st, lo, spill.ColdStore.empty(np.float32), str(tmp_path))
    kf = kept.mapped()[0].tolist()
    assert f.tolist() == [8] and kf == [4]
