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


_SCAN_BLOCK = 2048   # coordinates per block of the scan's vectorised pass


@nb.njit(inline="always", cache=True)
def _block_flags(key, i0, nblk, kind, param, round32, floor, ceil, u1_max, flag):
    """flag[t] for coordinate i0 + t: the exact band test (UNIFORM) or the
    Box-Muller prefilter u1 <= u1_max (NORMAL). Branch-free, so the loop is
    vectorised (the 64-bit hash, conversion and compares run on whole vectors)."""
    if kind == 0:
        for t in range(nblk):
            a = abs(_theta0_from_hash(_hash(key, i0 + t), 0, param, round32))
            flag[t] = (a >= floor) & (a < ceil)
    else:
        for t in range(nblk):
            z = _hash(key, i0 + t)
            flag[t] = (np.float64(z >> _S11) + 1.0) * _INV53 <= u1_max


@nb.njit(parallel=True, cache=True)
def _scan_kernel(key, start, stop, nparts, floor, ceil, kind, param, round32, skip, out, counts,
                 u1_max=2.0):
    """Per part p: flat indices in its slice of [start, stop) with floor <= |theta0|
    < ceil that are not in the sorted array ``skip``; at most out.shape[1] are stored,
    counts[p] gets the true number (so the caller can detect overflow).
    Blocks of :data:`_SCAN_BLOCK` coordinates: a vectorised pass flags them, the
    flagged ones are compacted without branches, then only those are checked against
    ``skip`` (and, for NORMAL, whose prefilter |theta0| <= param*sqrt(-2 ln u1) only
    rules coordinates out, get the exact value) and stored."""
    total = stop - start
    part_len = (total + nparts - 1) // nparts
    cap = out.shape[1]
    nskip = skip.shape[0]
    for p in nb.prange(nparts):
        s = start + p * part_len
        e = min(s + part_len, stop)
        c = 0
        if s < e:
            flag = np.empty(_SCAN_BLOCK, np.bool_)
            hit = np.empty(_SCAN_BLOCK, np.int64)
            j = np.searchsorted(skip, s)
            for i0 in range(s, e, _SCAN_BLOCK):
                nblk = min(_SCAN_BLOCK, e - i0)
                _block_flags(key, i0, nblk, kind, param, round32, floor, ceil, u1_max, flag)
                m = 0
                for t in range(nblk):
                    hit[m] = i0 + t
                    m += np.int64(flag[t])
                for q in range(m):
                    i = hit[q]
                    if kind == 1:
                        a = abs(_theta0_from_hash(_hash(key, i), 1, param, round32))
                        if a < floor or a >= ceil:
                            continue
                    while j < nskip and skip[j] < i:
                        j += 1
                    if j < nskip and skip[j] == i:
                        continue
                    if c < cap:
                        out[p, c] = i
                    c += 1
        counts[p] = c


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
    memory is O(result + chunk / nparts), never O(n_total)."""
    n_total = int(n_total)
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    skip = np.empty(0, np.int64) if skip is None else np.ascontiguousarray(skip, np.int64)
    if nparts is None:
        nparts = 4 * nb.get_num_threads()
    k = key_to_uint64(key)
    round32 = np.dtype(dtype) == np.float32
    p_hit = (magnitude_cdf(ceil, kind, param) if math.isfinite(ceil) else 1.0) \
        - magnitude_cdf(floor, kind, param)
    # prefilter bound for NORMAL (with slack for the float32 rounding of the value)
    u1_max = 2.0
    if kind == NORMAL and floor > 0:
        u1_max = math.exp(-0.5 * (floor * (1 - 1e-6) / param) ** 2) * (1 + 1e-12)
    # One result array sized from the expected hit count (grown by 1/4 in the rare
    # case it overflows), so the peak is the result plus one chunk's buffer, not
    # a list of pieces plus their concatenation.
    expect = n_total * max(p_hit, 0.0)
    res = np.empty(int(expect * 1.002 + 6 * math.sqrt(expect) + 1024), np.int64)
    m = 0

    def put(piece):
        nonlocal res, m
        if m + piece.shape[0] > res.shape[0]:
            grown = np.empty(max(m + piece.shape[0], res.shape[0] + res.shape[0] // 4), np.int64)
            grown[:m] = res[:m]
            res = grown
        res[m:m + piece.shape[0]] = piece
        m += piece.shape[0]

    for start in range(0, n_total, chunk):
        stop = min(start + chunk, n_total)
        part_len = -(-(stop - start) // nparts)
        cap = int(part_len * p_hit * 1.25) + 256
        cap = min(cap, part_len)
        out = np.empty((nparts, cap), np.int64)
        counts = np.zeros(nparts, np.int64)
        _scan_kernel(k, start, stop, nparts, float(floor), float(ceil), int(kind), float(param),
                     round32, skip, out, counts, u1_max)
        for p in range(nparts):
            c = int(counts[p])
            if c <= cap:
                put(out[p, :c])
            else:  # rare: more hits than the estimate; redo this part exactly
                s = start + p * part_len
                e = min(s + part_len, stop)
                big = np.empty((1, c), np.int64)
                cnt = np.zeros(1, np.int64)
                _scan_kernel(k, s, e, 1, float(floor), float(ceil), int(kind), float(param),
                             round32, skip, big, cnt, u1_max)
                put(big[0, :c])
    return res[:m]
