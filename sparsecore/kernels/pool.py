"""Linear-time helpers for the refresh: merging sorted pool pieces and remapping
per-coordinate state. Both replace O(P log P) sorts / boolean-mask gathers."""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True)
def _merge2(fa, va, sa, fb, vb, sb, fo, vo, so):
    i = j = k = 0
    na, nb_ = fa.shape[0], fb.shape[0]
    while i < na and j < nb_:
        if fa[i] <= fb[j]:
            fo[k] = fa[i]
            vo[k] = va[i]
            so[k] = sa[i]
            i += 1
        else:
            fo[k] = fb[j]
            vo[k] = vb[j]
            so[k] = sb[j]
            j += 1
        k += 1
    while i < na:
        fo[k] = fa[i]
        vo[k] = va[i]
        so[k] = sa[i]
        i += 1
        k += 1
    while j < nb_:
        fo[k] = fb[j]
        vo[k] = vb[j]
        so[k] = sb[j]
        j += 1
        k += 1


def merge_sorted(pieces):
    """Merge (flat, values, src) triples, each sorted by flat index with disjoint
    indices, into one sorted triple in O(total)."""
    flat, val, src = pieces[0]
    for f2, v2, s2 in pieces[1:]:
        n = flat.shape[0] + f2.shape[0]
        fo = np.empty(n, np.int64)
        vo = np.empty(n, val.dtype)
        so = np.empty(n, np.int64)
        _merge2(flat, val, src, f2, v2.astype(val.dtype, copy=False), s2, fo, vo, so)
        flat, val, src = fo, vo, so
    return flat, val, src


@nb.njit(parallel=True, cache=True)
def _gather_or_zero(t, src, out):
    for i in nb.prange(src.shape[0]):
        s = src[i]
        out[i] = t[s] if s >= 0 else 0


def gather_or_zero(t: np.ndarray, src: np.ndarray) -> np.ndarray:
    """out[i] = t[src[i]] where src[i] >= 0, else 0."""
    out = np.empty(src.shape[0], t.dtype)
    _gather_or_zero(t, src, out)
    return out


@nb.njit(cache=True)
def _split(flat, val, src, b_pos, a_in_b, a_flat, x_flat, v_out, s_out, r_flat, r_val):
    k_a = a_flat.shape[0]
    ia = 0
    ix = 0
    ja = 0  # walks a_in_b (ascending positions inside b_pos)
    for q in range(b_pos.shape[0]):
        p = b_pos[q]
        if ja < a_in_b.shape[0] and a_in_b[ja] == q:
            a_flat[ia] = flat[p]
            v_out[ia] = val[p]
            s_out[ia] = src[p]
            ia += 1
            ja += 1
        else:
            x_flat[ix] = flat[p]
            v_out[k_a + ix] = val[p]
            s_out[k_a + ix] = src[p]
            ix += 1
    ir = 0
    q = 0
    for p in range(flat.shape[0]):
        if q < b_pos.shape[0] and b_pos[q] == p:
            q += 1
        else:
            r_flat[ir] = flat[p]
            r_val[ir] = val[p]
            ir += 1


def split_pool(flat, val, src, b_pos, a_in_b):
    """Split a sorted pool into A, B minus A and the reserve in one pass, given the
    ascending positions ``b_pos`` of B in the pool and ``a_in_b`` of A inside B.
    Returns (a_flat, x_flat, values [A then X], src [A then X], r_flat, r_val)."""
    k_b, k_a = b_pos.shape[0], a_in_b.shape[0]
    a_flat = np.empty(k_a, np.int64)
    x_flat = np.empty(k_b - k_a, np.int64)
    v_out = np.empty(k_b, val.dtype)
    s_out = np.empty(k_b, np.int64)
    r_flat = np.empty(flat.shape[0] - k_b, np.int64)
    r_val = np.empty(flat.shape[0] - k_b, val.dtype)
    _split(flat, val, src, b_pos, a_in_b, a_flat, x_flat, v_out, s_out, r_flat, r_val)
    return a_flat, x_flat, v_out, s_out, r_flat, r_val
