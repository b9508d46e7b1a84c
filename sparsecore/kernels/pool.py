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
