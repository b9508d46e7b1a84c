"""Exact top-K by magnitude with the Top-KAST tie rule, without a full sort.

Magnitudes of IEEE floats order like the unsigned integers of their bit patterns,
so the K-th largest magnitude is found by a radix (histogram) select on those
bits: a parallel 16-bit histogram narrows the threshold to one bucket, then the
next 16 bits inside that bucket, and so on. The winners are every position with
magnitude above the threshold plus the first positions (in array order) that equal
it; the caller keeps arrays sorted by flat index, so array order is flat-index
order and "ties go to the smaller flat index" holds.

For large arrays a cheaper route runs first (two reads of the keys instead of
four): a strided sample of 32768 keys brackets the threshold, one pass counts the
keys above the bracket and compacts the positions inside it, the exact threshold
is selected among those candidates, and one pass writes the winners. If the
bracket misses (rare; e.g. very many equal magnitudes overflow the candidate
buffers) the exact histogram route above is used, so results are identical.
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
def _write_pass(keys, absmask, thresh, nparts, offs, take, out):
    """Part p writes, from out[offs[p]] on and in ascending order, its positions
    with key > thresh and its first take[p] positions with key == thresh.
    Branch-free on the comparison (every position is stored, the cursor only
    advances for winners), and a part stops as soon as its winners are written."""
    n = keys.shape[0]
    part = (n + nparts - 1) // nparts
    for p in nb.prange(nparts):
        s = p * part
        e = min(s + part, n)
        o = offs[p]
        end = offs[p + 1]
        t = take[p]
        if o == end:
            continue
        for i in range(s, e):
            k = keys[i] & absmask
            eq = k == thresh
            win = (k > thresh) | (eq & (t > 0))
            t -= np.int64(eq)
            out[o] = i
            o += np.int64(win)
            if o == end:
                break


@nb.njit(cache=True)
def _offsets(above, equal, n_ties):
    """Ties allowed per part (earlier parts first) and each part's output offset."""
    nparts = above.shape[0]
    take = np.zeros(nparts, np.int64)
    offs = np.zeros(nparts + 1, np.int64)
    left = n_ties
    for p in range(nparts):
        t = min(left, equal[p])
        take[p] = t
        left -= t
        offs[p + 1] = offs[p] + above[p] + t
    return offs, take


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
    offs, take = _offsets(above, equal, n_ties)
    _write_pass(keys, absmask, thresh, nparts, offs, take, out)


@nb.njit(parallel=True, cache=True)
def _bracket_pass(keys, absmask, lo, hi, nparts, cand, ccount, above):
    """One read of the keys: per part p, above[p] = #keys > hi, and the positions
    with lo <= key <= hi stored in cand[p] (ccount[p] = their true number, which
    may exceed cand.shape[1]: the caller then falls back)."""
    n = keys.shape[0]
    part = (n + nparts - 1) // nparts
    cap = cand.shape[1]
    for p in nb.prange(nparts):
        s = p * part
        e = min(s + part, n)
        a = 0
        c = 0
        for i in range(s, e):
            k = keys[i] & absmask
            a += np.int64(k > hi)
            if k >= lo and k <= hi:
                if c < cap:
                    cand[p, c] = i
                c += 1
        above[p] = a
        ccount[p] = c


@nb.njit(parallel=True, cache=True)
def _cand_counts(keys, absmask, thresh, cand, ccount, above):
    """Per part: keys > thresh (above hi plus candidates above thresh) and == thresh."""
    nparts = cand.shape[0]
    gt = above.copy()
    eq = np.zeros(nparts, np.int64)
    for p in nb.prange(nparts):
        a = 0
        q = 0
        for c in range(ccount[p]):
            k = keys[cand[p, c]] & absmask
            a += np.int64(k > thresh)
            q += np.int64(k == thresh)
        gt[p] += a
        eq[p] = q
    return gt, eq


_SAMPLE = 32768


def _select_sampled(keys, absmask, k, nparts):
    """Two reads of the keys: a strided sample brackets the threshold key, one
    pass counts the keys above the bracket and compacts those inside it, the
    exact threshold is found among the candidates, and a second pass writes the
    winners. Returns None when the bracket misses (the caller falls back)."""
    n = keys.shape[0]
    m = min(n, _SAMPLE)
    samp = np.sort(keys[(np.arange(m, dtype=np.int64) * n) // m] & absmask)[::-1]
    ks = k * m / n                       # expected rank of the threshold in the sample
    delta = 6.0 * np.sqrt(ks * (1.0 - k / n)) + 16.0
    r_hi = int(ks - delta)
    r_lo = int(np.ceil(ks + delta))
    hi = samp[r_hi] if r_hi >= 0 else absmask
    lo = samp[r_lo] if r_lo < m else keys.dtype.type(0)
    # expected candidates: those between the two sample ranks, with slack
    part = -(-n // nparts)
    frac = (min(r_lo, m) - max(r_hi, 0) + 1) / m
    cap = min(part, int(part * frac * 1.5) + 4096)
    cand = np.empty((nparts, cap), np.int64)
    ccount = np.zeros(nparts, np.int64)
    above = np.zeros(nparts, np.int64)
    _bracket_pass(keys, absmask, lo, hi, nparts, cand, ccount, above)
    if ccount.max() > cap:
        return None
    n_above = int(above.sum())
    r = k - n_above                      # rank of the threshold among the candidates
    nc = int(ccount.sum())
    if r <= 0 or r > nc:
        return None
    ck = np.concatenate([keys[cand[p, :ccount[p]]] for p in range(nparts)]) & absmask
    thresh = np.partition(ck, nc - r)[nc - r]
    gt, eq = _cand_counts(keys, absmask, thresh, cand, ccount, above)
    n_ties = k - int(gt.sum())
    offs, take = _offsets(gt, eq, n_ties)
    out = np.empty(k, np.int64)
    _write_pass(keys, absmask, thresh, nparts, offs, take, out)
    return out


def _as_keys(values: np.ndarray):
    """The values' bit patterns (a view, no copy) and the mask that clears the
    sign bit: ``bits & mask`` orders exactly like ``|value|``."""
    if values.dtype == np.float64:
        return values.view(np.uint64), np.uint64(0x7FFFFFFFFFFFFFFF)
    return values.view(np.uint32), np.uint32(0x7FFFFFFF)


_BLOCK = 16384    # keys per block; part p of the bracket pass reads blocks p, p + nparts, ...


@nb.njit(parallel=True, cache=True)
def _bracket1(keys, absmask, lo, hi, nparts, first, cand, ccount, above):
    """One read of the keys: part p (the blocks b of :data:`_BLOCK` keys with
    (first + b) % nparts == p, so that every part sees every region of the pieces
    alike; ``first`` = blocks in the earlier pieces) adds to
    above[p] its keys > hi and appends its keys in [lo, hi] to cand[p,
    ccount[p]:] (ccount counts past the capacity: the caller then falls back).
    The bracket test is one unsigned compare."""
    n = keys.shape[0]
    cap = cand.shape[1]
    nblocks = (n + _BLOCK - 1) // _BLOCK
    lo0 = np.uint64(lo)
    w0 = np.uint64(hi) - lo0
    h0 = np.uint64(hi)
    for p in nb.prange(nparts):
        a0 = np.int64(0)
        c0 = ccount[p]
        for b in range((p - first) % nparts, nblocks, nparts):
            for i in range(b * _BLOCK, min(b * _BLOCK + _BLOCK, n)):
                k = np.uint64(keys[i] & absmask)
                a0 += np.int64(k > h0)
                if k - lo0 <= w0:
                    if c0 < cap:
                        cand[p, c0] = k
                    c0 += 1
        above[p] += a0
        ccount[p] = c0


@nb.njit(parallel=True, cache=True)
def _bracket2(keys, absmask, lo0, hi0, lo1, hi1, nparts, first, cand0, ccount0, above0,
              cand1, ccount1, above1):
    """:func:`_bracket1` for two brackets in the same read."""
    n = keys.shape[0]
    cap0 = cand0.shape[1]
    cap1 = cand1.shape[1]
    nblocks = (n + _BLOCK - 1) // _BLOCK
    l0 = np.uint64(lo0)
    w0 = np.uint64(hi0) - l0
    h0 = np.uint64(hi0)
    l1 = np.uint64(lo1)
    w1 = np.uint64(hi1) - l1
    h1 = np.uint64(hi1)
    for p in nb.prange(nparts):
        a0 = np.int64(0)
        a1 = np.int64(0)
        c0 = ccount0[p]
        c1 = ccount1[p]
        for b in range((p - first) % nparts, nblocks, nparts):
            for i in range(b * _BLOCK, min(b * _BLOCK + _BLOCK, n)):
                k = np.uint64(keys[i] & absmask)
                a0 += np.int64(k > h0)
                a1 += np.int64(k > h1)
                if k - l0 <= w0:
                    if c0 < cap0:
                        cand0[p, c0] = k
                    c0 += 1
                if k - l1 <= w1:
                    if c1 < cap1:
                        cand1[p, c1] = k
                    c1 += 1
        above0[p] += a0
        above1[p] += a1
        ccount0[p] = c0
        ccount1[p] = c1


_MIN_SAMPLED = 4 * _SAMPLE    # below this many keys the histogram route is used


def _thresholds_sampled(keyed, absmask, ks, nparts):
    """Top-k thresholds from one read of the keys per two k: a strided sample
    brackets each threshold key, one pass counts the keys above each bracket and
    copies the keys inside it, and the exact threshold, its tie quota and the
    number of equal keys come from those candidates. An entry of the result is
    None when its bracket missed (the caller uses the histogram route)."""
    sizes = [kk.shape[0] for kk in keyed]
    n = sum(sizes)
    m = min(n, _SAMPLE)
    samp = []
    for kk, ni in zip(keyed, sizes):
        mi = min(ni, -(-m * ni // n))
        if mi:
            samp.append(kk[(np.arange(mi, dtype=np.int64) * ni) // mi])
    samp = np.sort(np.concatenate(samp) & absmask)[::-1]
    m = samp.shape[0]
    blocks = [-(-ni // _BLOCK) for ni in sizes]
    part_max = -(-sum(blocks) // nparts) * _BLOCK      # keys per part at most
    lo, hi, caps = [], [], []
    for k in ks:
        ks_ = k * m / n                       # expected rank of the threshold in the sample
        delta = 6.0 * np.sqrt(ks_ * (1.0 - k / n)) + 16.0
        r_hi = int(ks_ - delta)
        r_lo = int(np.ceil(ks_ + delta))
        hi.append(samp[r_hi] if r_hi >= 0 else absmask)
        lo.append(samp[r_lo] if r_lo < m else absmask & 0)
        # expected candidates per part (the parts interleave blocks), with slack
        frac = (min(r_lo, m) - max(r_hi, 0) + 1) / m
        caps.append(min(part_max, int(part_max * frac * 1.5) + 4096))
    cand = [np.empty((nparts, c), keyed[0].dtype) for c in caps]
    ccount = [np.zeros(nparts, np.int64) for _ in ks]
    above = [np.zeros(nparts, np.int64) for _ in ks]
    first = 0
    for kk, nbk in zip(keyed, blocks):
        j = 0
        while nbk and j < len(ks):
            if j + 1 < len(ks):
                _bracket2(kk, absmask, lo[j], hi[j], lo[j + 1], hi[j + 1], nparts, first,
                          cand[j], ccount[j], above[j], cand[j + 1], ccount[j + 1],
                          above[j + 1])
                j += 2
            else:
                _bracket1(kk, absmask, lo[j], hi[j], nparts, first, cand[j], ccount[j],
                          above[j])
                j += 1
        first = (first + nbk) % nparts
    out = []
    for j, k in enumerate(ks):
        nc = int(ccount[j].sum())
        r = k - int(above[j].sum())          # rank of the threshold among the candidates
        if (ccount[j] > caps[j]).any() or r <= 0 or r > nc:
            out.append(None)
            continue
        ck = np.concatenate([cand[j][p, :ccount[j][p]] for p in range(nparts)])
        thresh = np.partition(ck, nc - r)[nc - r]
        n_gt = k - r + int(np.count_nonzero(ck > thresh))
        out.append((keyed[0].dtype.type(thresh), k - n_gt, absmask,
                    int(np.count_nonzero(ck == thresh))))
    return out


def topk_thresholds(values, ks, nparts: int | None = None) -> list:
    """:func:`topk_threshold` for several k (each 1 <= k <= total size) from one
    read of the keys where possible (sampled brackets, two per read, see
    :func:`_thresholds_sampled`), else the histogram route. Results are exact and
    identical to calling :func:`topk_threshold` for each k."""
    arrays = values if isinstance(values, (list, tuple)) else [values]
    keyed = [_as_keys(a)[0] for a in arrays]
    absmask = _as_keys(arrays[0])[1]
    ks = [int(k) for k in ks]
    if nparts is None:
        nparts = 4 * nb.get_num_threads()
    n = sum(kk.shape[0] for kk in keyed)
    res = [None] * len(ks)
    if n >= _MIN_SAMPLED:
        res = _thresholds_sampled(keyed, absmask, ks, nparts)
    return [r if r is not None else _topk_threshold_hist(keyed, absmask, k, nparts)
            for r, k in zip(res, ks)]


def topk_threshold(values, k: int, nparts: int | None = None):
    """(key, n_ties, mask, n_equal): the magnitude bit-key of the k-th largest
    |value| over ``values`` (one array, or a list of arrays of one dtype taken
    together, never concatenated), how many entries equal to it belong to the top
    k, the mask that clears the sign bit, and how many entries equal it in all."""
    return topk_thresholds(values, [k], nparts)[0]


def _topk_threshold_hist(keys_list, absmask, k, nparts):
    """:func:`topk_threshold` by the radix-histogram route (16 bits per pass)."""
    width = 64 if keys_list[0].dtype == np.uint64 else 32
    prefix = np.uint64(0)
    remaining = k  # rank still to find inside the current bucket (1-based from top)
    shift = width - _BITS
    prefix_shift = 64
    while True:
        hist = sum(_histogram(kk, absmask, shift, prefix, prefix_shift, nparts)
                   for kk in keys_list)
        # walk buckets from the top until the k-th largest is inside
        csum = np.cumsum(hist[::-1])
        b_rev = int(np.searchsorted(csum, remaining))
        bucket = _NB - 1 - b_rev
        above = int(csum[b_rev - 1]) if b_rev > 0 else 0
        remaining -= above
        prefix = (prefix << np.uint64(_BITS)) | np.uint64(bucket)
        prefix_shift = shift
        if shift == 0:
            return keys_list[0].dtype.type(prefix), remaining, absmask, int(hist[bucket])
        shift -= _BITS


def key_to_magnitude(key, dtype) -> float:
    """The float magnitude whose bit pattern is ``key``."""
    fdtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    return float(np.array([key]).view(fdtype)[0])


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
    keys, absmask = _as_keys(values)
    nparts = 4 * nb.get_num_threads()
    if n >= 4 * _SAMPLE:
        out = _select_sampled(keys, absmask, int(k), nparts)
        if out is not None:
            return out
    thresh, n_ties, absmask, _ = topk_threshold(values, k)
    out = np.empty(k, np.int64)
    _collect(keys, absmask, thresh, n_ties, nparts, out)
    return out


def kth_largest_magnitude(values, k: int) -> float:
    """|value| of the k-th largest magnitude (k >= 1) over one array or a list."""
    assert k >= 1
    thresh = topk_threshold(values, k)[0]
    first = values[0] if isinstance(values, (list, tuple)) else values
    return key_to_magnitude(thresh, first.dtype)
