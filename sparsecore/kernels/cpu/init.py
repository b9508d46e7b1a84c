"""Counter-based initial values theta0(key, i) and the streaming candidate scan.

theta0 is a pure function of a 64-bit layer key and the flat index i: a
splitmix64-style finaliser turns ``key + (i + 1) * golden`` into 64 random bits.
The value therefore does not depend on chunking, thread count or call order,
which is what lets the engine forget every untouched weight and regenerate it.

Distributions (``kind``):
  * ``UNIFORM``: U(-param, param), from the top 53 bits.
  * ``NORMAL``:  N(0, param^2), Box-Muller on two hashes.

Values are computed in float64 and, with ``round32``, rounded to float32 so the
scan compares exactly the magnitudes a float32 layer stores.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import types
from numba.cpython.unsafe.numbers import trailing_zeros   # tzcnt; the bit width for 0
from numba.extending import intrinsic

from .spmm import wide_vectors

UNIFORM = 0
NORMAL = 1
KINDS = {"uniform": UNIFORM, "normal": NORMAL}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STREAM2 = np.uint64(0xD1B54A32D192ED03)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_ONE = np.uint64(1)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53


@nb.njit(inline="always", cache=True)
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@nb.njit(inline="always", cache=True)
def _hash(key, i):
    return _mix(key + (np.uint64(i) + _ONE) * _GOLDEN)


@nb.njit(inline="always", cache=True)
def _theta0(key, i, kind, param, round32):
    return _theta0_from_hash(_hash(key, i), kind, param, round32)


@nb.njit(inline="always", cache=True)
def _theta0_from_hash(z, kind, param, round32):
    if kind == 0:
        u = np.float64(z >> _S11) * _INV53
        v = param * (2.0 * u - 1.0)
    else:
        u1 = (np.float64(z >> _S11) + 1.0) * _INV53
        u2 = np.float64(_mix(z ^ _STREAM2) >> _S11) * _INV53
        v = param * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    if round32:
        v = np.float64(np.float32(v))
    return v


@nb.njit(parallel=True, cache=True)
def _values_kernel(key, idx, kind, param, round32, out):
    for k in nb.prange(idx.shape[0]):
        out[k] = _theta0(key, idx[k], kind, param, round32)


# ---------------------------------------------------------------------------------------
# Streaming scan.
#
# Each part is walked in blocks of _BLOCK indices. Pass 1 (_masks_*) is branch-free and
# vectorises (512-bit vpmullq on AVX-512DQ, see wide_vectors): it hashes every index of
# the block (the (i + 1) * golden term as an induction, so two multiplies per hash) and
# packs a per-index flag into one bit of a 64-bit word per 64 indices. The flag is an
# integer test on m = z >> 11:
#   * UNIFORM: v = param * (2u - 1) with u = m 2^-53, and 2u - 1 = +-d 2^-52 exactly,
#     d = |m - 2^52|. The rounding of param * x (and to float32) is monotone and
#     symmetric, so |v| is a non-decreasing function of d and the band floor <= |v| <
#     ceil is exactly one interval dlo <= d <= dhi, found once by a binary search on the
#     same compiled value function (_uniform_d_bounds). The flags are final.
#   * NORMAL: |v| = |param| R |cos(2 pi u2)| with R = sqrt(-2 ln u1), u1 = (m + 1) 2^-53
#     and u2 from a second hash. Pass 1 keeps m in [lo, hi], the range of R that can give
#     a hit for some u2 (a u1 <= u1_max prefilter, and its ceil-side counterpart), and
#     stores z for pass 2.
# Pass 2 walks the set bits (trailing-zero count; a fixed number of unconditional stores
# per word, sized from the block's hit density, so no per-index branch). For NORMAL each
# candidate's u2 bin (top _NBITS bits of the second hash) gives conservative m intervals
# (_normal_bins): outside [plo, phi] no hit is possible, inside [slo, shi] it is surely a
# hit whatever the rounding, and only in between is the exact value computed, as
# _theta0_from_hash does. Then the indices in ``skip`` are dropped and the rest stored.
# ---------------------------------------------------------------------------------------

_BLOCK = 4096                    # indices per block (a multiple of 64)
_NBITS = 10                      # NORMAL: 2^_NBITS bins of u2
_NBINS = 1 << _NBITS
_H52 = 1 << 52
_M53 = (1 << 53) - 1             # largest z >> 11
_S64 = np.uint64(64 - _NBITS)


@intrinsic
def _popcount(typingctx, x):
    """Number of set bits (popcnt)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return x(x), codegen


@nb.njit(cache=True)
def _uniform_hit(d, floor, ceil, param, round32, upper):
    """Whether |theta0| at distance d = |(z >> 11) - 2^52| is >= floor (upper=True) or
    < ceil (upper=False), evaluated exactly as the scan would (on the side z >> 11 >= 2^52
    while it exists, else at m = 0; both sides give the same magnitude by symmetry)."""
    m = np.uint64(_H52) + np.uint64(d) if d < _H52 else np.uint64(0)
    v = abs(_theta0_from_hash(m << _S11, 0, param, round32))
    return v >= floor if upper else v < ceil


@nb.njit(cache=True)
def _uniform_d_bounds(floor, ceil, param, round32):
    """(dlo, dhi) with floor <= |theta0| < ceil  <=>  dlo <= d <= dhi (empty if dlo > dhi)."""
    # smallest d with |v(d)| >= floor (2^52 + 1 if none): the predicate is an up-set
    lo, hi = 0, _H52 + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _uniform_hit(mid, floor, ceil, param, round32, True):
            hi = mid
        else:
            lo = mid + 1
    dlo = lo
    # largest d with |v(d)| < ceil (-1 if none): a down-set
    lo, hi = -1, _H52
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _uniform_hit(mid, floor, ceil, param, round32, False):
            lo = mid
        else:
            hi = mid - 1
    return dlo, lo


@nb.njit(cache=True, boundscheck=False)
def _masks_uniform(key, b0, n, dlo, dhi, masks):
    """Bit k of masks[k >> 6]: dlo <= |(hash(b0 + k) >> 11) - 2^52| <= dhi, k < n.
    Returns the number of set bits."""
    wide_vectors()
    x = key + (np.uint64(b0) + _ONE) * _GOLDEN
    c52 = np.uint64(_H52)
    tot = np.uint64(0)
    for q in range((n + 63) >> 6):
        k0 = q << 6
        y = x + np.uint64(k0) * _GOLDEN
        w = np.uint64(0)
        for k in range(min(64, n - k0)):
            m = _mix(y) >> _S11
            y += _GOLDEN
            d = m - c52 if m >= c52 else c52 - m
            w |= np.uint64((d >= dlo) & (d <= dhi)) << np.uint64(k)
        masks[q] = w
        tot += _popcount(w)
    return np.int64(tot)


@nb.njit(cache=True, boundscheck=False)
def _masks_normal(key, b0, n, mlo, mhi, masks, zbuf):
    """As _masks_uniform with the test mlo <= hash >> 11 <= mhi; zbuf[k] = hash(b0 + k)."""
    wide_vectors()
    x = key + (np.uint64(b0) + _ONE) * _GOLDEN
    tot = np.uint64(0)
    for q in range((n + 63) >> 6):
        k0 = q << 6
        y = x + np.uint64(k0) * _GOLDEN
        w = np.uint64(0)
        for k in range(min(64, n - k0)):
            z = _mix(y)
            y += _GOLDEN
            zbuf[k0 + k] = z
            m = z >> _S11
            w |= np.uint64((m >= mlo) & (m <= mhi)) << np.uint64(k)
        masks[q] = w
        tot += _popcount(w)
    return np.int64(tot)


@nb.njit(inline="always", cache=True)
def _unroll(cnt, n):
    """Stores per 64-bit word in _emit: the expected set bits plus ~3 sd, in steps of 8,
    so a word rarely has more (those take a short extra loop)."""
    mean = 64.0 * cnt / n
    u = mean + 3.0 * math.sqrt(mean * (1.0 - cnt / n)) + 1.0
    return min(64, (int(u) + 8) & ~7)


@nb.njit(cache=True, boundscheck=False)
def _emit(masks, n, b0, cnt, dst, pos):
    """dst[pos:pos + cnt] = b0 + the set bits of masks (the first n bits), ascending.
    Writes up to _unroll(cnt, n) entries past pos + cnt (dst must have the room)."""
    if cnt == n:
        for k in range(n):
            dst[pos + k] = b0 + k
        return
    u = _unroll(cnt, n)
    c = pos
    for q in range((n + 63) >> 6):
        w = masks[q]
        base = b0 + (q << 6)
        pc = np.int64(_popcount(w))
        for r in range(u):
            dst[c + r] = base + np.int64(trailing_zeros(w))
            w &= w - _ONE
        for r in range(u, pc):
            dst[c + r] = base + np.int64(trailing_zeros(w))
            w &= w - _ONE
        c += pc


@nb.njit(cache=True, boundscheck=False)
def _emit_normal(masks, n, cnt, b0, zbuf, bins, floor, ceil, param, round32, dst, unsure):
    """dst[:count] = the hits among the cnt candidates of masks (zbuf: their hashes), by
    the bin test and, where that cannot decide, the exact value. Returns the count.
    Branch-free per candidate: the candidates' offsets are listed first (in ``unsure``),
    the undecided ones are noted (positions in dst) and checked afterwards."""
    _emit(masks, n, 0, cnt, unsure, 0)   # candidate offsets k, ascending
    c = 0
    u = 0
    for t in range(cnt):
        k = np.uint64(unsure[t])
        z = zbuf[k]
        m = z >> _S11
        r = (_mix(z ^ _STREAM2) >> _S64) << np.uint64(2)
        poss = np.uint64((m >= bins[r]) & (m <= bins[r + _ONE]))
        sure = np.uint64((m >= bins[r + np.uint64(2)]) & (m <= bins[r + np.uint64(3)]))
        dst[np.uint64(c)] = b0 + np.int64(k)
        unsure[np.uint64(u)] = c      # u <= t: overwrites only offsets already read
        c += np.int64(poss)
        u += np.int64(poss & (sure ^ _ONE))
    if u == 0:
        return c
    bad = 0
    for t in range(u):
        i = dst[unsure[t]]
        v = abs(_theta0_from_hash(zbuf[i - b0], 1, param, round32))
        if not (v >= floor and v < ceil):
            dst[unsure[t]] = -1
            bad += 1
    if bad == 0:
        return c
    m = 0
    for t in range(c):
        i = dst[t]
        dst[m] = i
        m += i >= 0
    return m


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _scan_kernel(key, start, stop, nparts, floor, ceil, kind, param, round32, skip, out, counts,
                 lo, hi, bins):
    """Per part p: flat indices in its slice of [start, stop) with floor <= |theta0|
    < ceil that are not in the sorted array ``skip``; at most out.shape[1] are stored,
    counts[p] gets the true number (so the caller can detect overflow).
    UNIFORM: ``lo``/``hi`` are the exact d interval of _uniform_d_bounds (empty when
    lo > hi). NORMAL: the m prefilter interval and the u2 bins of _normal_bins."""
    total = stop - start
    part_len = (total + nparts - 1) // nparts
    cap = out.shape[1]
    nskip = skip.shape[0]
    ulo = np.uint64(max(lo, 0))
    uhi = np.uint64(max(hi, 0))
    for p in nb.prange(nparts):
        s = start + p * part_len
        e = min(s + part_len, stop)
        c = 0
        if s < e and lo <= hi:
            masks = np.empty(_BLOCK // 64, np.uint64)
            buf = np.empty(_BLOCK + 64, np.int64)
            zbuf = np.empty(_BLOCK if kind != 0 else 0, np.uint64)
            unsure = np.empty(_BLOCK + 64 if kind != 0 else 0, np.int64)
            j = np.searchsorted(skip, s)
            for b0 in range(s, e, _BLOCK):
                n = min(_BLOCK, e - b0)
                if kind == 0:
                    cnt = _masks_uniform(key, b0, n, ulo, uhi, masks)
                else:
                    cnt = _masks_normal(key, b0, n, ulo, uhi, masks, zbuf)
                if cnt == 0:
                    continue
                while j < nskip and skip[j] < b0:
                    j += 1
                clean = j >= nskip or skip[j] >= b0 + n
                if kind == 0:
                    if clean and c + cnt + 64 <= cap:
                        _emit(masks, n, b0, cnt, out[p], c)   # straight into the output
                        c += cnt
                        continue
                    _emit(masks, n, b0, cnt, buf, 0)
                else:
                    cnt = _emit_normal(masks, n, cnt, b0, zbuf, bins, floor, ceil, param,
                                       round32, buf, unsure)
                if not clean:
                    m = 0
                    for t in range(cnt):
                        i = buf[t]
                        while j < nskip and skip[j] < i:
                            j += 1
                        buf[m] = i
                        m += not (j < nskip and skip[j] == i)
                    cnt = m
                if c < cap:
                    r = min(cnt, cap - c)
                    out[p, c:c + r] = buf[:r]
                c += cnt
        counts[p] = c


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _gather_parts(out, counts, res, m):
    """res[m + sum(counts[:p]):][:counts[p]] = out[p, :counts[p]] for each part p whose
    hits all fit in its row (counts[p] <= out.shape[1]); the others are left to the caller."""
    nparts = counts.shape[0]
    offs = np.empty(nparts, np.int64)
    o = m
    for p in range(nparts):
        offs[p] = o
        o += counts[p]
    for p in nb.prange(nparts):
        c = counts[p]
        if c <= out.shape[1]:
            res[offs[p]:offs[p] + c] = out[p, :c]


def _normal_bins(floor: float, ceil: float, param: float) -> np.ndarray:
    """Per u2 bin (top _NBITS bits of the second hash) the m = z >> 11 intervals
    (plo, phi): outside no hit is possible, and (slo, shi): inside surely a hit; uint64,
    shape (_NBINS, 4), an empty interval as lo > hi.

    With u1 = (m + 1) 2^-53 and R = sqrt(-2 ln u1): R >= r <=> m <= 2^53 exp(-r^2/2) - 1.
    The scan computes |v| = |float32(param * R' * cos(2 pi u2)')| (primes: libm results);
    |v| lies within |param| R c (1 +- 1e-6) +- 1e-44 (c the exact |cos|; this covers the
    float64 roundings, log/cos ulps and the float32 rounding incl. subnormals, as long as
    1e-30 <= |param| <= 1e37: no overflow, no subnormal products; otherwise everything is
    checked exactly), c lies within 1e-9 of the bin's |cos| range (bins are aligned to
    quarter turns, so |cos| is monotone in each and the range is given by its edges), and
    the exp() bounds are widened (or narrowed) by 1e-9 relative plus a few units."""
    bins = np.empty((_NBINS, 4), np.uint64)
    a = abs(param)
    if not (1e-30 <= a <= 1e37 and not math.isnan(floor) and not math.isnan(ceil)):
        bins[:] = (0, _M53, _M53 + 1, 0)   # all possible, none sure: exact checks only
        return bins
    dl, eps, two53 = 1e-6, 1e-44, 2.0 ** 53
    edge = np.abs(np.cos(2.0 * math.pi * np.arange(_NBINS + 1) / _NBINS))
    cl = np.maximum(np.minimum(edge[:-1], edge[1:]) - 1e-9, 0.0)
    ch = np.minimum(np.maximum(edge[:-1], edge[1:]) + 1e-9, 1.0)

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        def ratio(x, y):   # x / y with x / 0 = inf (y >= 0; only where that is the bound)
            return np.where(y > 0, x / np.where(y > 0, y, 1.0), math.inf)

        def m_out(r):   # >= max{m : R >= r}
            e = np.exp(-0.5 * np.square(np.maximum(r, 0.0)))
            return np.minimum(np.floor(e * (1 + 1e-9) * two53).astype(np.int64) + 2, _M53)

        def m_in(r):    # <= max{m : R >= r} (-1: none)
            e = np.exp(-0.5 * np.square(np.maximum(r, 0.0)))
            return np.maximum(np.floor(e * (1 - 1e-9) * two53).astype(np.int64) - 3, -1)

        # possible: R >= (floor - eps) / (a ch (1 + dl)) and R < (ceil + eps) / (a cl (1 - dl))
        phi = m_out((floor - eps) / (a * ch * (1 + dl)))
        r_pc = ratio(ceil + eps, a * cl * (1 - dl))
        plo = np.where(np.isinf(r_pc), 0, m_in(r_pc) + 1)
        # sure: R >= (floor + eps) / (a cl (1 - dl)) and R < (ceil - eps) / (a ch (1 + dl))
        shi = m_in(ratio(floor + eps, a * cl * (1 - dl)))
        if floor <= 0:
            shi[:] = _M53                                   # |v| >= 0 >= floor: always
        r_sc = (ceil - eps) / (a * ch * (1 + dl))
        if ceil - eps <= 0:
            slo = np.full(_NBINS, _M53 + 1, np.int64)     # R < r_sc <= 0: never
        else:
            slo = np.where(np.isinf(r_sc), 0, m_out(r_sc) + 1)
    plo = np.maximum(plo, 0)
    slo = np.maximum(slo, 0)
    bins[:, 0] = np.where(plo <= phi, plo, _M53 + 1)
    bins[:, 1] = np.maximum(phi, 0)
    bins[:, 2] = np.where(slo <= shi, slo, _M53 + 1)
    bins[:, 3] = np.maximum(shi, 0)
    return bins


def key_to_uint64(key: int) -> np.uint64:
    return np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF)


def init_values(key: int, flat_idx: np.ndarray, kind: int, param: float,
                dtype=np.float32) -> np.ndarray:
    """theta0 at the given flat indices, as ``dtype`` (float32 or float64)."""
    idx = np.ascontiguousarray(flat_idx, dtype=np.int64)
    out = np.empty(idx.shape[0], dtype=dtype)  # float32 values are computed exactly rounded
    if idx.shape[0]:
        _values_kernel(key_to_uint64(key), idx, int(kind), float(param),
                       np.dtype(dtype) == np.float32, out)
    return out


def magnitude_cdf(t: float, kind: int, param: float) -> float:
    """P(|theta0| < t) for the given init distribution (used to size scans)."""
    if t <= 0:
        return 0.0
    if kind == UNIFORM:
        return min(1.0, t / param)
    return math.erf(t / (param * math.sqrt(2.0)))


def magnitude_quantile(p: float, kind: int, param: float) -> float:
    """Inverse of :func:`magnitude_cdf`: the t with P(|theta0| < t) = p."""
    p = min(max(p, 0.0), 1.0)
    if kind == UNIFORM:
        return p * param
    if p >= 1.0:
        return math.inf
    from scipy.special import erfinv
    return float(param * math.sqrt(2.0) * erfinv(p))


def scan(key: int, n_total: int, floor: float, kind: int, param: float, *,
         dtype=np.float32, skip: np.ndarray | None = None,
         chunk: int = 1 << 26, nparts: int | None = None,
         ceil: float = math.inf) -> np.ndarray:
    """Sorted flat indices i in [0, n_total) with floor <= |theta0(key, i)| < ceil
    and i not in ``skip`` (sorted int64). Streams over the index range in chunks;
    memory is O(result + chunk), never O(n_total)."""
    n_total = int(n_total)
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    skip = np.empty(0, np.int64) if skip is None else np.ascontiguousarray(skip, np.int64)
    if nparts is None:
        nparts = 4 * nb.get_num_threads()
    k = key_to_uint64(key)
    round32 = np.dtype(dtype) == np.float32
    p_hit = max((magnitude_cdf(ceil, kind, param) if math.isfinite(ceil) else 1.0)
                - magnitude_cdf(floor, kind, param), 0.0)   # (an empty band: ceil <= floor)
    # the band as integer tests on the hash (exact for UNIFORM, conservative for NORMAL)
    if kind == UNIFORM:
        lo, hi = _uniform_d_bounds(float(floor), float(ceil), float(param), round32)
        bins = np.zeros(4, np.uint64)
    else:
        bins = _normal_bins(float(floor), float(ceil), float(param))
        lo, hi = int(bins[:, 0].min()), int(bins[:, 1].max())
        bins = bins.ravel()
    # One result array sized from the expected hit count (grown by 1/4 in the rare
    # case it overflows), so the peak is the result plus one chunk's buffer, not
    # a list of pieces plus their concatenation.
    expect = n_total * p_hit
    res = np.empty(int(expect * 1.002 + 6 * math.sqrt(expect) + 1024), np.int64)
    m = 0
    for start in range(0, n_total, chunk):
        stop = min(start + chunk, n_total)
        part_len = -(-(stop - start) // nparts)
        cap = int(part_len * p_hit * 1.25) + 256
        cap = min(cap, part_len)
        out = np.empty((nparts, cap), np.int64)
        counts = np.zeros(nparts, np.int64)
        _scan_kernel(k, start, stop, nparts, float(floor), float(ceil), int(kind), float(param),
                     round32, skip, out, counts, lo, hi, bins)
        total = int(counts.sum())
        if m + total > res.shape[0]:
            grown = np.empty(max(m + total, res.shape[0] + res.shape[0] // 4), np.int64)
            grown[:m] = res[:m]
            res = grown
        _gather_parts(out, counts, res, m)   # the parts that fit, copied in parallel
        del out
        offs = m + np.cumsum(counts) - counts
        for p in np.flatnonzero(counts > cap):
            # rare: more hits than the estimate; redo this part exactly
            s = start + p * part_len
            e = min(s + part_len, stop)
            c = int(counts[p])
            big = np.empty((1, c), np.int64)
            cnt = np.zeros(1, np.int64)
            _scan_kernel(k, s, e, 1, float(floor), float(ceil), int(kind), float(param),
                         round32, skip, big, cnt, lo, hi, bins)
            res[offs[p]:offs[p] + c] = big[0]
        m += total
    return res[:m]
