"""The refresh's passes over the candidate pool (CPU, Numba), all O(pool + rows).

The pool of a layer is held in three pieces, each sorted by flat index
``i = row * n_cols + col``: the forward set A and the rest of the backward set,
X = B minus A (both as CSR row pointers + int32 columns, values in one array
``vals`` = [A row-major, X row-major]), and the reserve R (int64 flat indices
+ values). A replenishing scan adds a fourth piece, the candidates C (sorted
flat indices + values). No pass here materialises the merged pool: each walks
the pieces row by row as a four-way merge on the column, so the only arrays
allocated are the outputs, each of its exact final size.

Membership in a top set is decided by a threshold on the magnitude's bit key
(``key & mask`` orders like ``|value|``) and, for entries exactly at the
threshold, a cut on the flat index (ties go to the smaller index):
``in_top = key > t or (key == t and flat <= cut)``.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from . import init as _init

_BIG = np.int64(1) << np.int64(62)


@nb.njit(inline="always", cache=True)
def _next(n_cols, row, a_indptr, a_cols, pa, x_indptr, x_cols, px, r_flat, pr,
          c_flat, pc):
    """Smallest column among the four streams' heads in ``row`` and which stream
    holds it (0 A, 1 X, 2 R, 3 C; -1 when the row is exhausted)."""
    base = np.int64(row) * n_cols
    best = _BIG
    which = -1
    if pa < a_indptr[row + 1]:
        best = np.int64(a_cols[pa])
        which = 0
    if px < x_indptr[row + 1] and np.int64(x_cols[px]) < best:
        best = np.int64(x_cols[px])
        which = 1
    if pr < r_flat.shape[0] and r_flat[pr] < base + n_cols and r_flat[pr] - base < best:
        best = r_flat[pr] - base
        which = 2
    if pc < c_flat.shape[0] and c_flat[pc] < base + n_cols and c_flat[pc] - base < best:
        best = c_flat[pc] - base
        which = 3
    return best, which


@nb.njit(inline="always", cache=True)
def _pop(which, k_a, pa, px, pr, pc, vals, vkeys, r_val, rkeys, c_val, ckeys, mask):
    """Take the head of stream ``which`` (see :func:`_next`): returns its old position
    in ``vals`` (-1 for R and C), value, magnitude key, and the advanced heads."""
    if which == 0:
        return pa, vals[pa], vkeys[pa] & mask, pa + 1, px, pr, pc
    if which == 1:
        return k_a + px, vals[k_a + px], vkeys[k_a + px] & mask, pa, px + 1, pr, pc
    if which == 2:
        return -1, r_val[pr], rkeys[pr] & mask, pa, px, pr + 1, pc
    return -1, c_val[pc], ckeys[pc] & mask, pa, px, pr, pc + 1


@nb.njit(cache=True)
def dedupe_candidates(n_cols, a_indptr, a_cols, x_indptr, x_cols, r_flat, c_flat):
    """Compact ``c_flat`` (sorted) in place, dropping indices already in A, X or R;
    returns the number kept. O(pool + candidates)."""
    n_rows = a_indptr.shape[0] - 1
    pa = np.int64(0)
    px = np.int64(0)
    pr = np.int64(0)
    keep = np.int64(0)
    pc = np.int64(0)
    nc = c_flat.shape[0]
    while pc < nc:
        f = c_flat[pc]
        row = f // n_cols
        col = f - row * n_cols
        if row >= n_rows:
            break
        pa = max(pa, a_indptr[row])
        while pa < a_indptr[row + 1] and a_cols[pa] < col:
            pa += 1
        px = max(px, x_indptr[row])
        while px < x_indptr[row + 1] and x_cols[px] < col:
            px += 1
        while pr < r_flat.shape[0] and r_flat[pr] < f:
            pr += 1
        dup = ((pa < a_indptr[row + 1] and a_cols[pa] == col)
               or (px < x_indptr[row + 1] and x_cols[px] == col)
               or (pr < r_flat.shape[0] and r_flat[pr] == f))
        if not dup:
            c_flat[keep] = f
            keep += 1
        pc += 1
    return keep


@nb.njit(cache=True)
def tie_flats(n_cols, a_indptr, a_cols, x_indptr, x_cols, vals, vkeys, r_flat, r_val, rkeys,
              c_flat, c_val, ckeys, mask, t, out):
    """Flat indices of the pool entries whose magnitude key equals ``t``, written
    to ``out`` (ascending) up to its length; returns their total number."""
    n_rows = a_indptr.shape[0] - 1
    k_a = a_cols.shape[0]
    pa = px = pr = pc = np.int64(0)
    cnt = 0
    for row in range(n_rows):
        base = np.int64(row) * n_cols
        while True:
            col, which = _next(n_cols, row, a_indptr, a_cols, pa, x_indptr, x_cols, px,
                               r_flat, pr, c_flat, pc)
            if which < 0:
                break
            _, _, k, pa, px, pr, pc = _pop(which, k_a, pa, px, pr, pc, vals, vkeys, r_val,
                                           rkeys, c_val, ckeys, mask)
            if k == t:
                if cnt < out.shape[0]:
                    out[cnt] = base + col
                cnt += 1
    return cnt


@nb.njit(cache=True)
def split_rows(n_cols, a_indptr, a_cols, x_indptr, x_cols, vals, vkeys, r_flat, r_val, rkeys,
               c_flat, c_val, ckeys, mask, t_a, cut_a, t_b, cut_b, t_r, key, kind, param,
               round32, na_indptr, na_cols, nx_indptr, nx_cols, nvals, src, nr_flat, nr_val,
               sp_flat, sp_val, cur):
    """One pass over the pool, row by row: every entry goes to the new A, the new
    X, the new reserve, or, when its magnitude key is below ``t_r``, out of RAM:
    dropped if it still holds theta0(key, flat) (it is recomputed on demand), else
    written to the spill buffer ``sp_flat``/``sp_val`` (flat-index order). Writes
    the new CSR structures, the new values [A, X], ``src`` (the old position in
    ``vals`` of each new value, -1 when it comes from R or C; pass ``src`` of length
    0 to skip it) and the new reserve, each of its exact final size.

    Resumable: ``cur`` (int64[10], zeros to start) holds the position (row, the
    four stream heads, the three output counts, the number dropped) and the call
    returns the number of spilled entries it wrote when the spill buffer is full;
    call again with the same ``cur`` until ``cur[0]`` equals the number of rows."""
    n_rows = a_indptr.shape[0] - 1
    k_a_old = a_cols.shape[0]
    k_a_new = na_cols.shape[0]
    want_src = src.shape[0] > 0
    row, pa, px, pr, pc = cur[0], cur[1], cur[2], cur[3], cur[4]
    ia, ix, ir, dropped = cur[5], cur[6], cur[7], cur[8]
    ns = np.int64(0)
    cap = sp_flat.shape[0]
    if row == 0 and pa == 0 and px == 0 and pr == 0 and pc == 0:
        na_indptr[0] = 0
        nx_indptr[0] = 0
    full = False
    while row < n_rows:
        base = np.int64(row) * n_cols
        while True:
            col, which = _next(n_cols, row, a_indptr, a_cols, pa, x_indptr, x_cols, px,
                               r_flat, pr, c_flat, pc)
            if which < 0:
                break
            pos, v, k, qa, qx, qr, qc = _pop(which, k_a_old, pa, px, pr, pc, vals, vkeys,
                                             r_val, rkeys, c_val, ckeys, mask)
            f = base + col
            if k > t_a or (k == t_a and f <= cut_a):
                na_cols[ia] = col
                nvals[ia] = v
                if want_src:
                    src[ia] = pos
                ia += 1
            elif k > t_b or (k == t_b and f <= cut_b):
                nx_cols[ix] = col
                nvals[k_a_new + ix] = v
                if want_src:
                    src[k_a_new + ix] = pos
                ix += 1
            elif k >= t_r:
                nr_flat[ir] = f
                nr_val[ir] = v
                ir += 1
            elif v == _init._theta0(key, f, kind, param, round32):
                dropped += 1
            else:
                if ns == cap:      # buffer full: stop before this entry
                    full = True
                    break
                sp_flat[ns] = f
                sp_val[ns] = v
                ns += 1
            pa, px, pr, pc = qa, qx, qr, qc
        if full:
            break
        na_indptr[row + 1] = ia
        nx_indptr[row + 1] = ix
        row += 1
    cur[0], cur[1], cur[2], cur[3], cur[4] = row, pa, px, pr, pc
    cur[5], cur[6], cur[7], cur[8] = ia, ix, ir, dropped
    return ns


@nb.njit(cache=True)
def merge_sorted(fa, va, fb, vb, fo, vo):
    """Merge two (flat, value) runs sorted by flat index with disjoint indices."""
    i = j = k = 0
    na, nb_ = fa.shape[0], fb.shape[0]
    while i < na or j < nb_:
        if j >= nb_ or (i < na and fa[i] < fb[j]):
            fo[k] = fa[i]
            vo[k] = va[i]
            i += 1
        else:
            fo[k] = fb[j]
            vo[k] = vb[j]
            j += 1
        k += 1


@nb.njit(parallel=True, cache=True)
def gather_or_zero(t, src, out):
    """out[i] = t[src[i]] where src[i] >= 0, else 0."""
    for i in nb.prange(src.shape[0]):
        s = src[i]
        out[i] = t[s] if s >= 0 else 0


@nb.njit(parallel=True, cache=True)
def _reserve_order_kernel(r_flat, n_total):
    """Smallest position i where the reserve is not strictly ascending inside
    [0, n_total), or len(r_flat) when it is."""
    n = r_flat.shape[0]
    first = n
    for i in nb.prange(n):
        if r_flat[i] < 0 or r_flat[i] >= n_total or (i > 0 and r_flat[i] <= r_flat[i - 1]):
            first = min(first, i)
    return first


@nb.njit(parallel=True, cache=True)
def _rows_disjoint_kernel(n_cols, a_indptr, a_cols, x_indptr, x_cols, r_flat, codes, where):
    """Per row (in parallel): codes[row] = 1 (A unsorted), 2 (X unsorted) or 4 (A, X
    and the reserve overlap), with the position in ``where``; 0 when the row is fine.
    The reserve must already be sorted (checked first)."""
    n_rows = a_indptr.shape[0] - 1
    for row in nb.prange(n_rows):
        codes[row] = 0
        base = np.int64(row) * n_cols
        bad = False
        for k in range(a_indptr[row] + 1, a_indptr[row + 1]):
            if not bad and a_cols[k] <= a_cols[k - 1]:
                codes[row] = 1
                where[row] = k
                bad = True
        for k in range(x_indptr[row] + 1, x_indptr[row + 1]):
            if not bad and x_cols[k] <= x_cols[k - 1]:
                codes[row] = 2
                where[row] = k
                bad = True
        if bad:
            continue
        pr = np.searchsorted(r_flat, base)
        pa = a_indptr[row]
        px = x_indptr[row]
        prev = np.int64(-1)
        while True:
            col, which = _next(n_cols, row, a_indptr, a_cols, pa, x_indptr, x_cols, px,
                               r_flat, pr, r_flat[:0], 0)
            if which < 0:
                break
            if col == prev:
                codes[row] = 4
                where[row] = base + col
                break
            prev = col
            if which == 0:
                pa += 1
            elif which == 1:
                px += 1
            else:
                pr += 1


def check_disjoint(n_cols, a_indptr, a_cols, x_indptr, x_cols, r_flat, n_total) -> str:
    """Empty string when the pool pieces are well formed (A and B minus A with
    strictly ascending columns in every row, the reserve strictly ascending inside
    [0, n_total), the three disjoint), else a message naming the first problem.
    Parallel over rows."""
    code, pos = 0, 0
    bad_r = _reserve_order_kernel(r_flat, np.int64(n_total))
    if bad_r < r_flat.shape[0]:
        code, pos = 3, bad_r
    else:
        n_rows = a_indptr.shape[0] - 1
        codes = np.empty(n_rows, np.int8)
        where = np.zeros(n_rows, np.int64)
        _rows_disjoint_kernel(np.int64(n_cols), a_indptr, a_cols, x_indptr, x_cols, r_flat,
                              codes, where)
        bad_rows = np.flatnonzero(codes)
        if bad_rows.size:
            code, pos = int(codes[bad_rows[0]]), int(where[bad_rows[0]])
    return {0: "", 1: f"A's columns are not strictly ascending within a row (entry {pos})",
            2: f"B minus A's columns are not strictly ascending within a row (entry {pos})",
            3: f"reserve indices are not sorted, unique and in [0, {n_total}) (entry {pos})",
            4: f"A, B minus A and the reserve overlap at flat index {pos}"}[int(code)]


@nb.njit(cache=True)
def _in_row(indptr, cols, row, col):
    lo = indptr[row]
    hi = indptr[row + 1]
    while lo < hi:
        mid = (lo + hi) // 2
        if cols[mid] < col:
            lo = mid + 1
        else:
            hi = mid
    return lo < indptr[row + 1] and cols[lo] == col


@nb.njit(parallel=True, cache=True)
def _cold_kernel(n_cols, a_indptr, a_cols, x_indptr, x_cols, r_flat, c_flat, c_val, floor,
                 n_total, codes):
    """Per cold entry (in parallel): codes[i] = 1 (out of order or range), 2 (|value|
    not below the floor) or 3 (also in A, B minus A or the reserve); 0 when fine."""
    for i in nb.prange(c_flat.shape[0]):
        f = c_flat[i]
        codes[i] = 0
        if f < 0 or f >= n_total or (i > 0 and f <= c_flat[i - 1]):
            codes[i] = 1
        elif not abs(c_val[i]) < floor:
            codes[i] = 2
        else:
            row = f // n_cols
            col = f - row * n_cols
            j = np.searchsorted(r_flat, f)
            if (_in_row(a_indptr, a_cols, row, col) or _in_row(x_indptr, x_cols, row, col)
                    or (j < r_flat.shape[0] and r_flat[j] == f)):
                codes[i] = 3


def check_cold(n_cols, a_indptr, a_cols, x_indptr, x_cols, r_flat, c_flat, c_val, floor,
               n_total) -> str:
    """Empty string when the cold entries are well formed (strictly ascending flat
    indices in [0, n_total), magnitudes below the floor, none in the pool), else a
    message naming the first problem. Parallel over the entries."""
    if not c_flat.shape[0]:
        return ""
    codes = np.empty(c_flat.shape[0], np.int8)
    _cold_kernel(np.int64(n_cols), a_indptr, a_cols, x_indptr, x_cols, r_flat, c_flat, c_val,
                 float(floor), np.int64(n_total), codes)
    bad = np.flatnonzero(codes)
    if not bad.size:
        return ""
    i = int(bad[0])
    return {1: f"cold indices are not sorted, unique and in [0, {n_total}) (entry {i})",
            2: f"cold value {c_val[i]} at entry {i} is not below the floor {floor}",
            3: f"cold entry {i} (flat index {c_flat[i]}) is also in the pool"}[int(codes[i])]
