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

from numba.cpython.unsafe.numbers import trailing_zeros

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


@nb.njit(parallel=True, cache=True)
def _dedupe_keep(n_cols, a_indptr, a_cols, x_indptr, x_cols, r_flat, r_ptr, c_flat, c_ptr,
                 nchunks, keep):
    """keep[i] = 1 when c_flat[i] (sorted) is inside the layer and in none of A, X,
    R. Row blocks in parallel; per row, the pool's columns are set in a bitmap and
    each candidate tests its bit (no merge walk, no data-dependent branch)."""
    n_rows = a_indptr.shape[0] - 1
    w = (n_cols + 63) >> 6
    per = (n_rows + nchunks - 1) // nchunks
    one = np.uint64(1)
    for ch in nb.prange(nchunks):
        r0 = ch * per
        r1 = min(r0 + per, n_rows)
        if r0 >= r1:
            continue
        bits = np.zeros(w, np.uint64)
        for row in range(r0, r1):
            if c_ptr[row] == c_ptr[row + 1]:
                continue
            base = np.int64(row) * n_cols
            for p in range(a_indptr[row], a_indptr[row + 1]):
                col = np.int64(a_cols[p])
                bits[col >> 6] |= one << np.uint64(col & 63)
            for p in range(x_indptr[row], x_indptr[row + 1]):
                col = np.int64(x_cols[p])
                bits[col >> 6] |= one << np.uint64(col & 63)
            for p in range(r_ptr[row], r_ptr[row + 1]):
                col = r_flat[p] - base
                bits[col >> 6] |= one << np.uint64(col & 63)
            for p in range(c_ptr[row], c_ptr[row + 1]):
                col = c_flat[p] - base
                keep[p] = 1 - np.uint8((bits[col >> 6] >> np.uint64(col & 63)) & one)
            bits[:] = 0
    for p in range(c_ptr[n_rows], c_flat.shape[0]):     # past the last row
        keep[p] = 0


@nb.njit(cache=True)
def _compact(c_flat, keep):
    m = np.int64(0)
    for i in range(c_flat.shape[0]):
        c_flat[m] = c_flat[i]
        m += np.int64(keep[i])
    return m


def dedupe_candidates(n_cols, a_indptr, a_cols, x_indptr, x_cols, r_flat, c_flat):
    """Compact ``c_flat`` (sorted) in place, dropping indices already in A, X or R
    (and any past the last row); returns the number kept. O(pool + candidates):
    a parallel marking pass over the rows holding candidates, then one serial
    compaction."""
    n_rows = a_indptr.shape[0] - 1
    n_cols = np.int64(n_cols)
    keep = np.empty(c_flat.shape[0], np.uint8)
    _dedupe_keep(n_cols, a_indptr, a_cols, x_indptr, x_cols, r_flat,
                 row_starts(r_flat, n_cols, n_rows), c_flat, row_starts(c_flat, n_cols, n_rows),
                 np.int64(4 * nb.get_num_threads()), keep)
    return int(_compact(c_flat, keep))


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
def _corank(k, fa, fb):
    """How many of the first ``k`` merged entries come from ``fa`` (merge path of two
    sorted runs with disjoint values)."""
    lo = max(0, k - fb.shape[0])
    hi = min(k, fa.shape[0])
    while lo < hi:
        i = (lo + hi) // 2
        if fa[i] < fb[k - i - 1]:   # fa[i] precedes the last b entry taken: take more of a
            lo = i + 1
        else:
            hi = i
    return lo


MERGE_PART = 1 << 18   # merged entries per parallel part


def merge_sorted(fa, va, fb, vb, fo, vo):
    """Merge two (flat, value) runs sorted by flat index with disjoint indices into
    fo/vo, in parallel parts of the output whose starts come from a binary search."""
    n = fa.shape[0] + fb.shape[0]
    nparts = max(1, min(-(-n // MERGE_PART), 8 * nb.get_num_threads()))
    _merge_parts(fa, va, fb, vb, fo, vo, np.int64(nparts))


@nb.njit(parallel=True, cache=True)
def _merge_parts(fa, va, fb, vb, fo, vo, nparts):
    na, nb_ = fa.shape[0], fb.shape[0]
    n = na + nb_
    for p in nb.prange(nparts):
        k0 = n * p // nparts
        k1 = n * (p + 1) // nparts
        i = _corank(k0, fa, fb)
        j = k0 - i
        k = k0
        while k < k1 and i < na and j < nb_:
            # branch-free steps, as many as cannot exhaust either run
            for _ in range(min(k1 - k, na - i, nb_ - j)):
                a = fa[i]
                b = fb[j]
                take_a = a < b
                fo[k] = a if take_a else b
                vo[k] = va[i] if take_a else vb[j]
                i += np.int64(take_a)
                j += np.int64(not take_a)
                k += 1
        while k < k1 and i < na:
            fo[k] = fa[i]
            vo[k] = va[i]
            i += 1
            k += 1
        while k < k1:
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


# ------------------------------------------------------------------ parallel split
# The same split as :func:`split_rows`, without the four-way merge walk: every pool
# entry's destination depends only on its own key and flat index, so a first
# parallel pass counts per row (giving every output offset), and a second writes
# each row by scattering its entries into a row-sized scratch (value, old position,
# one bit per column in the bitmap of its destination) and reading the bitmaps back
# in column order. No data-dependent branch per entry in either pass.

class SpillBufferTooSmall(ValueError):
    """:func:`split_pool` cannot run: one row has more entries leaving RAM than the
    spill buffer holds."""


@nb.njit(inline="always", cache=True)
def _levels(k, f, t_a, cut_a, t_b, cut_b, t_r):
    """(in the new A, in the new B, kept in RAM) as 0/1, branch-free."""
    return (np.int64(k > t_a) | (np.int64(k == t_a) & np.int64(f <= cut_a)),
            np.int64(k > t_b) | (np.int64(k == t_b) & np.int64(f <= cut_b)),
            np.int64(k >= t_r))


@nb.njit(inline="always", cache=True)
def _level(k, f, t_a, cut_a, t_b, cut_b, t_r):
    """Destination of an entry with magnitude key ``k`` at flat index ``f``:
    0 new A, 1 new X, 2 reserve, 3 out of RAM (branch-free)."""
    in_a, in_b, in_r = _levels(k, f, t_a, cut_a, t_b, cut_b, t_r)
    return 3 - in_a - in_b - in_r


@nb.njit(parallel=True, cache=True)
def row_starts(flat, n_cols, n_rows):
    """out[row] = first position in the sorted ``flat`` at or after row * n_cols
    (n_rows + 1 entries): CSR row pointers of a flat-index run."""
    out = np.empty(n_rows + 1, np.int64)
    for row in nb.prange(n_rows + 1):
        out[row] = np.searchsorted(flat, np.int64(row) * n_cols)
    return out


@nb.njit(parallel=True, cache=True)
def _split_counts(n_cols, a_indptr, a_cols, x_indptr, x_cols, vals, vkeys, r_flat, r_ptr,
                  r_val, rkeys, c_flat, c_ptr, c_val, ckeys, mask, t_a, cut_a, t_b, cut_b,
                  t_r, cnt):
    """Per row: cnt[row] = (new A, new X, new reserve, out of RAM) counts."""
    n_rows = a_indptr.shape[0] - 1
    k_a = a_cols.shape[0]
    for row in nb.prange(n_rows):
        base = np.int64(row) * n_cols
        ge_a = np.int64(0)     # entries at level <= 0, <= 1, <= 2 (nested sets)
        ge_b = np.int64(0)
        ge_r = np.int64(0)
        for p in range(a_indptr[row], a_indptr[row + 1]):
            da, db, dr = _levels(vkeys[p] & mask, base + a_cols[p], t_a, cut_a, t_b, cut_b, t_r)
            ge_a, ge_b, ge_r = ge_a + da, ge_b + db, ge_r + dr
        for p in range(x_indptr[row], x_indptr[row + 1]):
            da, db, dr = _levels(vkeys[k_a + p] & mask, base + x_cols[p], t_a, cut_a, t_b,
                                 cut_b, t_r)
            ge_a, ge_b, ge_r = ge_a + da, ge_b + db, ge_r + dr
        for p in range(r_ptr[row], r_ptr[row + 1]):
            da, db, dr = _levels(rkeys[p] & mask, r_flat[p], t_a, cut_a, t_b, cut_b, t_r)
            ge_a, ge_b, ge_r = ge_a + da, ge_b + db, ge_r + dr
        for p in range(c_ptr[row], c_ptr[row + 1]):
            da, db, dr = _levels(ckeys[p] & mask, c_flat[p], t_a, cut_a, t_b, cut_b, t_r)
            ge_a, ge_b, ge_r = ge_a + da, ge_b + db, ge_r + dr
        total = (a_indptr[row + 1] - a_indptr[row] + x_indptr[row + 1] - x_indptr[row]
                 + r_ptr[row + 1] - r_ptr[row] + c_ptr[row + 1] - c_ptr[row])
        cnt[row, 0] = ge_a
        cnt[row, 1] = ge_b - ge_a
        cnt[row, 2] = ge_r - ge_b
        cnt[row, 3] = total - ge_r


@nb.njit(inline="always", cache=True)
def _put(bits, w, col, lvl, sval, ssrc, v, pos):
    sval[col] = v
    ssrc[col] = pos
    bits[lvl * w + (col >> 6)] |= np.uint64(1) << np.uint64(col & 63)


@nb.njit(parallel=True, cache=True)
def _split_write(n_cols, a_indptr, a_cols, x_indptr, x_cols, vals, vkeys, r_flat, r_ptr, r_val,
                 rkeys, c_flat, c_ptr, c_val, ckeys, mask, t_a, cut_a, t_b, cut_b, t_r,
                 na_indptr, na_cols, nx_indptr, nx_cols, nvals, src, r_off, nr_flat, nr_val,
                 key, kind, param, round32, row0, row1, out_off, sp_flat, sp_val, nsp, nchunks):
    """Rows [row0, row1) in parallel (``nchunks`` row blocks): write the new A, X,
    values, ``src`` and reserve at the offsets from :func:`_split_counts`, and the
    entries that leave RAM and no longer hold theta0 (they are spilled) to
    sp_flat/sp_val in flat-index order, each block's from out_off[its first row] -
    out_off[row0] on (room for all its leaving entries); nsp[block] = (where they
    start, how many), (0, 0) for an empty block."""
    k_a = a_cols.shape[0]
    k_a_new = na_cols.shape[0]
    want_src = src.shape[0] > 0
    w = (n_cols + 63) >> 6
    nsp[:] = 0
    nchunks = max(min(row1 - row0, nchunks), 1)
    per = (row1 - row0 + nchunks - 1) // nchunks
    for ch in nb.prange(nchunks):
        r0 = row0 + ch * per
        r1 = min(r0 + per, row1)
        if r0 >= r1:
            continue
        sval = np.empty(n_cols, vals.dtype)
        ssrc = np.empty(n_cols, np.int64)
        bits = np.zeros(4 * w, np.uint64)
        o0 = out_off[r0] - out_off[row0]
        o = o0
        for row in range(r0, r1):
            base = np.int64(row) * n_cols
            for p in range(a_indptr[row], a_indptr[row + 1]):
                col = np.int64(a_cols[p])
                lvl = _level(vkeys[p] & mask, base + col, t_a, cut_a, t_b, cut_b, t_r)
                _put(bits, w, col, lvl, sval, ssrc, vals[p], p)
            for p in range(x_indptr[row], x_indptr[row + 1]):
                col = np.int64(x_cols[p])
                lvl = _level(vkeys[k_a + p] & mask, base + col, t_a, cut_a, t_b, cut_b, t_r)
                _put(bits, w, col, lvl, sval, ssrc, vals[k_a + p], k_a + p)
            for p in range(r_ptr[row], r_ptr[row + 1]):
                col = r_flat[p] - base
                lvl = _level(rkeys[p] & mask, r_flat[p], t_a, cut_a, t_b, cut_b, t_r)
                _put(bits, w, col, lvl, sval, ssrc, r_val[p], -1)
            for p in range(c_ptr[row], c_ptr[row + 1]):
                col = c_flat[p] - base
                lvl = _level(ckeys[p] & mask, c_flat[p], t_a, cut_a, t_b, cut_b, t_r)
                _put(bits, w, col, lvl, sval, ssrc, c_val[p], -1)
            ia = na_indptr[row]
            ix = nx_indptr[row]
            ir = r_off[row]
            for j in range(w):
                b = bits[j]
                bits[j] = 0
                while b:
                    col = (np.int64(j) << 6) + np.int64(trailing_zeros(b))
                    b &= b - np.uint64(1)
                    na_cols[ia] = col
                    nvals[ia] = sval[col]
                    if want_src:
                        src[ia] = ssrc[col]
                    ia += 1
                b = bits[w + j]
                bits[w + j] = 0
                while b:
                    col = (np.int64(j) << 6) + np.int64(trailing_zeros(b))
                    b &= b - np.uint64(1)
                    nx_cols[ix] = col
                    nvals[k_a_new + ix] = sval[col]
                    if want_src:
                        src[k_a_new + ix] = ssrc[col]
                    ix += 1
                b = bits[2 * w + j]
                bits[2 * w + j] = 0
                while b:
                    col = (np.int64(j) << 6) + np.int64(trailing_zeros(b))
                    b &= b - np.uint64(1)
                    nr_flat[ir] = base + col
                    nr_val[ir] = sval[col]
                    ir += 1
                b = bits[3 * w + j]
                bits[3 * w + j] = 0
                while b:
                    col = (np.int64(j) << 6) + np.int64(trailing_zeros(b))
                    b &= b - np.uint64(1)
                    v = sval[col]
                    if v != _init._theta0(key, base + col, kind, param, round32):
                        sp_flat[o] = base + col
                        sp_val[o] = v
                        o += 1
        nsp[ch, 0] = o0
        nsp[ch, 1] = o - o0


def split_pool(n_cols, a_indptr, a_cols, x_indptr, x_cols, vals, vkeys, r_flat, r_val, rkeys,
               c_flat, c_val, ckeys, mask, t_a, cut_a, t_b, cut_b, t_r, key, kind, param,
               round32, na_indptr, na_cols, nx_indptr, nx_cols, nvals, src, nr_flat, nr_val,
               sp_flat, sp_val, emit):
    """:func:`split_rows` in two parallel passes (same arguments and outputs; no
    ``cur``): the spilled entries are written to ``sp_flat``/``sp_val`` in
    flat-index order, one buffer-full at a time, handed to ``emit(lo, hi)`` (the
    entries sp_*[lo:hi], in order, several calls per buffer-full) before the buffer
    is reused. Returns (reserve entries, dropped entries), i.e. ``cur[7]`` and
    ``cur[8]`` of :func:`split_rows`.

    Raises :class:`SpillBufferTooSmall` (before writing anything) when one row has
    more entries leaving RAM than the spill buffer holds (the caller then uses
    :func:`split_rows`)."""
    n_rows = a_indptr.shape[0] - 1
    n_cols = np.int64(n_cols)
    r_ptr = row_starts(r_flat, n_cols, n_rows)
    c_ptr = row_starts(c_flat, n_cols, n_rows)
    cnt = np.empty((n_rows, 4), np.int64)
    args = (n_cols, a_indptr, a_cols, x_indptr, x_cols, vals, vkeys, r_flat, r_ptr, r_val,
            rkeys, c_flat, c_ptr, c_val, ckeys, mask)
    _split_counts(*args, t_a, cut_a, t_b, cut_b, t_r, cnt)
    tot = cnt.sum(axis=0)
    if (tot[0] != na_cols.shape[0] or tot[1] != nx_cols.shape[0]
            or tot[2] != nr_flat.shape[0]):
        raise AssertionError(f"split sizes {tot[:3].tolist()} != outputs "
                             f"{[na_cols.shape[0], nx_cols.shape[0], nr_flat.shape[0]]}")
    n_out = int(tot[3])
    cap = sp_flat.shape[0]
    if n_out and cnt[:, 3].max() > cap:
        raise SpillBufferTooSmall("a row has more entries leaving RAM than the spill "
                                  "buffer holds")
    na_indptr[0] = 0
    np.cumsum(cnt[:, 0], out=na_indptr[1:])
    nx_indptr[0] = 0
    np.cumsum(cnt[:, 1], out=nx_indptr[1:])
    r_off = np.zeros(n_rows + 1, np.int64)
    np.cumsum(cnt[:, 2], out=r_off[1:])
    # one pass over the rows, in windows whose leaving entries fit the spill buffer
    # (each block of rows at room for all of them: theta0 is evaluated once); each
    # window's spilled entries are emitted, block by block in row order, before the
    # buffer is reused
    nchunks = 4 * nb.get_num_threads()
    out_off = np.zeros(n_rows + 1, np.int64)
    np.cumsum(cnt[:, 3], out=out_off[1:])
    nsp = np.zeros((nchunks, 2), np.int64)
    n_sp = 0
    row0 = 0
    while row0 < n_rows:
        row1 = int(np.searchsorted(out_off, out_off[row0] + cap, side="right")) - 1
        row1 = min(max(row1, row0 + 1), n_rows)
        _split_write(*args, t_a, cut_a, t_b, cut_b, t_r, na_indptr, na_cols, nx_indptr,
                     nx_cols, nvals, src, r_off, nr_flat, nr_val, key, kind, param, round32,
                     np.int64(row0), np.int64(row1), out_off, sp_flat, sp_val, nsp,
                     np.int64(nchunks))
        for lo, ns in nsp.tolist():     # the row blocks' spilled entries, in order
            if ns:
                emit(lo, lo + ns)
                n_sp += ns
        row0 = row1
    return int(tot[2]), n_out - n_sp


@nb.njit(parallel=True, cache=True)
def _equal_positions(keys, mask, t, nparts):
    """Ascending positions i with keys[i] & mask == t (two parallel passes)."""
    n = keys.shape[0]
    part = (n + nparts - 1) // nparts
    cnt = np.zeros(nparts + 1, np.int64)
    for p in nb.prange(nparts):
        c = np.int64(0)
        for i in range(p * part, min(p * part + part, n)):
            c += np.int64(keys[i] & mask == t)
        cnt[p + 1] = c
    for p in range(nparts):
        cnt[p + 1] += cnt[p]
    out = np.empty(cnt[nparts], np.int64)
    for p in nb.prange(nparts):
        o = cnt[p]
        if o == cnt[p + 1]:
            continue
        for i in range(p * part, min(p * part + part, n)):
            if keys[i] & mask == t:
                out[o] = i
                o += 1
    return out


def tie_flats_sorted(n_cols, a_indptr, a_cols, x_indptr, x_cols, vals, vkeys, r_flat, r_val,
                     rkeys, c_flat, c_val, ckeys, mask, t):
    """The flat indices (ascending, int64) of the pool entries whose magnitude key
    equals ``t``: what :func:`tie_flats` writes, from parallel passes over each
    piece's keys instead of the merge walk."""
    nparts = np.int64(4 * nb.get_num_threads())
    k_a = a_cols.shape[0]
    pos = _equal_positions(vkeys, mask, t, nparts)
    pa, px = pos[pos < k_a], pos[pos >= k_a] - k_a
    fa = (np.searchsorted(a_indptr, pa, side="right") - 1) * np.int64(n_cols) + a_cols[pa]
    fx = (np.searchsorted(x_indptr, px, side="right") - 1) * np.int64(n_cols) + x_cols[px]
    fr = r_flat[_equal_positions(rkeys, mask, t, nparts)]
    fc = c_flat[_equal_positions(ckeys, mask, t, nparts)]
    out = np.concatenate([fa.astype(np.int64), fx.astype(np.int64), fr, fc])
    out.sort()
    return out
