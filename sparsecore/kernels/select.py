"""Exact top-K by magnitude with the Top-KAST tie rule, without a full sort.

Magnitudes of IEEE floats order like the unsigned integers of their bit patterns,
so the K-th largest magnitude is found by a radix (histogram) select on those
bits: a parallel 16-bit histogram narrows the threshold to one bucket, then the
next 16 bits inside that bucket, and so on. The winners are every position with
magnitude above the threshold plus the first positions (in array order) that equal
it; the caller keeps arrays sorted by flat index, so array order is flat-index
order and "ties go to the smaller flat index" holds.
"""
from __future__ import annotations

import numba as nb
import numpy as np

_BITS = 16
_NB = 1 << _BITS


@nb.njit(parallel=True, cache=True)
def _histogram(keys, absmask, shift, prefix, prefix_shift, nparts):
    """Histogram of bits [shift, shift+16) over keys whose bits above
    ``prefix_shift`` equal ``prefix`` (all keys when prefix_shift == 64)."""
    n = keys.shape[0]
    part = (n + nparts - 1) // nparts
    hist = np.zeros((nparts, _NB), np.int64)
    sh = np.uint64(shift)
    psh = np.uint64(prefix_shift)
    mask = np.uint64(_NB - 1)
    full = prefix_shift >= 64
    for p in nb.prange(nparts):
        s = p * part
        e = min(s + part, n)
        for i in range(s, e):
            k = keys[i] & absmask
            if full or (k >> psh) == prefix:
                hist[p, (k >> sh) & mask] += 1
    return hist.sum(axis=0)


@nb.njit(parallel=True, cache=True)
def _collect(keys, absmask, thresh, n_ties, nparts, out):
    """Write, in ascending order, positions with key > thresh and the first
    n_ties positions with key == thresh."""
    n = keys.shape[0]
    part = (n + nparts - 1) // nparts
    above = np.zeros(nparts, np.int64)
    equal = np.zeros(nparts, np.int64)
    for p in nb.prange(nparts):
        s = p * part
        e = min(s + part, n)
        a = 0
        q = 0
        for i in range(s, e):
            k = keys[i] & absmask
            if k > thresh:
                a += 1
            elif k == thresh:
                q += 1
        above[p] = a
        equal[p] = q
    # ties allowed per part (earlier parts first) and output offsets
    take = np.zeros(nparts, np.int64)
    offs = np.zeros(nparts + 1, np.int64)
    left = n_ties
    for p in range(nparts):
        t = min(left, equal[p])
        take[p] = t
        left -= t
        offs[p + 1] = offs[p] + above[p] + t
    for p in nb.prange(nparts):
        s = p * part
        e = min(s + part, n)
        o = offs[p]
        t = take[p]
        for i in range(s, e):
            k = keys[i] & absmask
            if k > thresh:
                out[o] = i
                o += 1
            elif k == thresh and t > 0:
                out[o] = i
                o += 1
                t -= 1


def _as_keys(values: np.ndarray):
    """The values' bit patterns (a view, no copy) and the mask that clears the
    sign bit: ``bits & mask`` orders exactly like ``|value|``."""
    if values.dtype == np.float64:
        return values.view(np.uint64), np.uint64(0x7FFFFFFFFFFFFFFF)
    return values.view(np.uint32), np.uint32(0x7FFFFFFF)


def topk_threshold(values: np.ndarray, k: int, nparts: int | None = None):
    """(key, n_ties, (keys, mask)): the magnitude bit-key of the k-th largest
    |value|, how many entries equal to it belong to the top k, and the key view."""
    n = values.shape[0]
    keys, absmask = _as_keys(values)
    if nparts is None:
        nparts = 4 * nb.get_num_threads()
    width = 64 if values.dtype == np.float64 else 32
    prefix = np.uint64(0)
    remaining = k  # rank still to find inside the current bucket (1-based from top)
    shift = width - _BITS
    prefix_shift = 64
    while True:
        hist = _histogram(keys, absmask, shift, prefix, prefix_shift, nparts)
        # walk buckets from the top until the k-th largest is inside
        csum = np.cumsum(hist[::-1])
        b_rev = int(np.searchsorted(csum, remaining))
        bucket = _NB - 1 - b_rev
        above = int(csum[b_rev - 1]) if b_rev > 0 else 0
        remaining -= above
        prefix = (prefix << np.uint64(_BITS)) | np.uint64(bucket)
        prefix_shift = shift
        if shift == 0:
            return keys.dtype.type(prefix), remaining, (keys, absmask)
        shift -= _BITS


def select_topk(values: np.ndarray, k: int) -> np.ndarray:
    """Positions (int64, ascending) of the k largest |values|; among equal
    magnitudes the smaller position wins. NaN is not allowed (checked by callers)."""
    n = values.shape[0]
    if k < 0 or k > n:
        raise ValueError(f"k={k} is out of range [0, {n}]")
    if k == 0:
        return np.empty(0, np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    thresh, n_ties, (keys, absmask) = topk_threshold(values, k)
    out = np.empty(k, np.int64)
    _collect(keys, absmask, thresh, n_ties, 4 * nb.get_num_threads(), out)
    return out


def kth_largest_magnitude(values: np.ndarray, k: int) -> float:
    """|value| of the k-th largest magnitude (k >= 1)."""
    thresh, _, _ = topk_threshold(values, k)
    assert k >= 1
    fdtype = np.float64 if values.dtype == np.float64 else np.float32
    return float(np.array([thresh]).view(fdtype)[0])
