"""The Top-KAST selection algorithm over the candidate pool (no dense theta).

The pool P of a layer is B (= A + X, whose current values are the trainable
parameter) plus the reserve R of further coordinates with their exact current
values. The floor guarantees: every coordinate outside P is either in the cold
store on disk (:mod:`sparsecore.spill`) with its exact value, or has never been
trained and still holds theta0(key, i); either way its magnitude is < floor.

:func:`refresh` computes the new A and B exactly as dense Top-KAST would (TopK
over all N coordinates, ties to the smaller flat index): inside the pool when
the K_B-th largest pool magnitude is >= floor, after replenishing the pool from a
streaming scan of theta0 when it is not. Construction is the same function
from the empty pool (floor = inf). It is pure: it returns a new
:class:`~sparsecore.state.SparseState` and the new values and mutates nothing,
so a failure leaves the layer untouched.

Memory (see docs/design.md): the pool is never merged into one array. The
thresholds come from a radix select over the pieces, the ties at a threshold
are resolved by flat index from the (few) tied entries, and one row-by-row pass
writes the new structure into arrays of their exact final size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numba as nb
import numpy as np
import torch

from .kernels.cpu import init as _init
from .kernels.cpu import pool as _pool
from .kernels.cpu import select as _select
from . import spill as _spill
from .memory import INT32_MAX
from .state import SparseState


class RefreshError(ValueError):
    """A refresh could not be carried out (the layer is left unchanged)."""


@dataclass(frozen=True)
class InitSpec:
    key: int            # 64-bit layer key
    kind: int           # init.UNIFORM or init.NORMAL
    param: float        # bound (uniform) or std (normal)
    dtype: np.dtype     # np.float32 or np.float64


class Refresh(NamedTuple):
    """What :func:`refresh` returns: the new state, the new ``values`` (A then X),
    ``src`` (old position in ``values`` of each new entry, -1 if it was not in B;
    empty when not requested) and this refresh's statistics."""
    state: SparseState
    values: np.ndarray
    src: np.ndarray
    info: dict


def _scan_floor(floor: float, need: int, n_total: int, spec: InitSpec) -> float:
    """A floor f < ``floor`` such that about ``need`` (with margin) coordinates with
    |theta0| in [f, floor) are expected among the n_total."""
    want = need * 1.05 + 64
    g_hi = _init.magnitude_cdf(floor, spec.kind, spec.param) if math.isfinite(floor) else 1.0
    g_lo = g_hi - want / n_total
    if g_lo <= 0.0:
        return 0.0
    f = _init.magnitude_quantile(g_lo, spec.kind, spec.param)
    return min(f, np.nextafter(floor, 0.0)) if math.isfinite(floor) else f


@nb.njit(parallel=True, cache=True)
def _count_at_least(a, t):
    c = 0
    for i in nb.prange(a.shape[0]):
        c += np.int64(abs(a[i]) >= t)
    return c


@nb.njit(cache=True)
def _src_counts(src, k_a_new, k_a_old):
    """(entries of the new A that were in the old A, entries of the new B that were
    in the old B, entries of the new A that were outside the old B)."""
    a_kept = 0
    b_kept = 0
    a_new = 0
    for i in range(src.shape[0]):
        s = src[i]
        if s >= 0:
            b_kept += 1
            if i < k_a_new and s < k_a_old:
                a_kept += 1
        elif i < k_a_new:
            a_new += 1
    return a_kept, b_kept, a_new


@nb.njit(parallel=True, cache=True)
def _count_trained(key, flat, val, kind, param, round32):
    """How many entries no longer hold theta0(key, flat) (coordinates that were in B)."""
    c = 0
    for i in nb.prange(flat.shape[0]):
        if val[i] != _init._theta0(key, flat[i], kind, param, round32):
            c += 1
    return c


_ALL = 1 << 62  # a cut above every flat index: all tied entries are taken


def _cut(pool_args: tuple, mask, t, n_taken: int, n_equal: int) -> int:
    """The flat index of the ``n_taken``-th smallest tied entry at key ``t``
    (``pool_args`` as :func:`sparsecore.kernels.cpu.pool.tie_flats` takes them)."""
    if n_taken == n_equal:
        return _ALL
    ties = _pool.tie_flats_sorted(*pool_args, mask, t)
    return int(ties[n_taken - 1])


def refresh(state: SparseState, values: np.ndarray, *, k_a: int, k_b: int,
            reserve_target: int, reserve_cap: int | None = None, spec: InitSpec,
            name: str = "layer", want_src: bool = True, spill_dir: str | None = None
            ) -> Refresh:
    """Exact Top-KAST refresh over the pool (see the module docstring).

    ``values`` is theta on the current B (A first, then X). With ``reserve_cap``,
    a reserve that would exceed it keeps only its ``reserve_target`` largest
    entries (plus ties) in RAM and the floor rises to their smallest magnitude;
    entries below it leave RAM: those still equal to theta0 are dropped, trained
    ones go to the cold store on disk (:mod:`sparsecore.spill`, in ``spill_dir``).
    Both are exact. Raises :class:`RefreshError` before computing anything if a
    value is NaN/Inf."""
    values = np.asarray(values)
    r_flat = state.reserve_idx.numpy()
    r_val = state.reserve_val.numpy()
    for arr, what in ((values, "theta_B"), (r_val, "the reserve")):
        if arr.size and not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise RefreshError(f"{name}: {what} holds a non-finite value ({arr[bad]}) at "
                               f"position {bad}; refusing to refresh (nothing was changed)")
    n_cols, n_rows = state.in_features, state.out_features
    n_total = n_cols * n_rows
    a_indptr, a_cols = state.a_indptr.numpy(), state.a_cols.numpy()
    x_indptr, x_cols = state.x_indptr.numpy(), state.x_cols.numpy()
    dtype = values.dtype
    cold = state.cold
    c_flat = np.empty(0, np.int64)
    c_val = np.empty(0, dtype)
    floor = state.floor
    replenished = added = unspilled = 0
    while True:
        # the K_B-th largest pool magnitude is >= floor iff K_B pool entries reach the
        # floor: then the pool decides exactly (the thresholds are read once, below)
        pieces = [values, r_val, c_val]
        have = sum(_count_at_least(p, floor) for p in pieces) if math.isfinite(floor) else 0
        if have >= k_b:
            break
        # the pool cannot decide exactly: lower the floor and bring in the coordinates
        # whose magnitude lies in the band [new floor, floor): theta0 from a streaming
        # scan (minus the pool and the cold store), trained values from the cold store
        new_floor = float(_scan_floor(floor, k_b + reserve_target - have, n_total, spec))
        new = _init.scan(spec.key, n_total, new_floor, spec.kind, spec.param,
                         dtype=spec.dtype, ceil=floor)
        m = _pool.dedupe_candidates(np.int64(n_cols), a_indptr, a_cols, x_indptr, x_cols,
                                   r_flat, new)
        m, back_f, back_v = _spill.replenish_pass(cold, new[:m], new_floor, floor)
        new = new[:m]      # a view: copying would hold both at once
        new_val = _init.init_values(spec.key, new, spec.kind, spec.param, dtype)
        if back_f.shape[0]:
            new, new_val = _merged(new, new_val, back_f, back_v.astype(dtype, copy=False))
            unspilled += back_f.shape[0]
        if c_flat.shape[0]:
            c_flat, c_val = _merged(c_flat, c_val, new, new_val)
        else:
            c_flat, c_val = new, new_val
        del new, new_val, back_f, back_v
        floor = new_floor
        replenished += 1
        added += int(m)

    n_pool = sum(p.shape[0] for p in pieces)
    ks = [k_b, k_a]
    if reserve_cap is not None and n_pool - k_b > reserve_cap:
        ks.append(k_b + reserve_target)
    sel = _select.topk_thresholds(pieces, ks)
    vkeys, mask = _select._as_keys(values)
    rkeys = _select._as_keys(r_val)[0]
    ckeys = _select._as_keys(c_val)[0]
    pool_args = (np.int64(n_cols), a_indptr, a_cols, x_indptr, x_cols, values, vkeys,
                 r_flat, r_val, rkeys, c_flat, c_val, ckeys)
    t_b, n_b, _, eq_b = sel[0]
    t_a, n_a, _, eq_a = sel[1]
    cut_b = _cut(pool_args, mask, t_b, n_b, eq_b)
    cut_a = _cut(pool_args, mask, t_a, n_a, eq_a)

    n_res = n_pool - k_b
    floor_read = floor    # every cold entry at or above it was read back into the pool
    t_r = mask.dtype.type(0)          # no key is below 0: everything stays in RAM
    if reserve_cap is not None and n_res > reserve_cap:
        # keep the reserve_target largest non-B entries and every entry tied with
        # the smallest of them; the floor rises to that magnitude
        t_r, n_r, _, eq_r = sel[2]
        n_res = reserve_target - n_r + eq_r
        floor = max(floor, float(np.array([t_r], mask.dtype).view(dtype)[0]))
    na_indptr = np.empty(n_rows + 1, np.int64)
    nx_indptr = np.empty(n_rows + 1, np.int64)
    na_cols = np.empty(k_a, np.int32)
    nx_cols = np.empty(k_b - k_a, np.int32)
    nvals = np.empty(k_b, dtype)
    src = np.empty(k_b if want_src else 0, np.int32 if k_b <= INT32_MAX else np.int64)
    nr_flat = np.empty(n_res, np.int64)
    nr_val = np.empty(n_res, dtype)
    sp_n = min(_spill.CHUNK, n_pool - k_b - n_res)
    sp_flat, sp_val = np.empty(sp_n, np.int64), np.empty(sp_n, dtype)
    writer = None
    key_u = _init.key_to_uint64(spec.key)
    directory = spill_dir or _spill.default_dir()
    split_args = (*pool_args, mask, t_a, np.int64(cut_a), t_b, np.int64(cut_b), t_r, key_u,
                  spec.kind, spec.param, spec.dtype == np.float32, na_indptr, na_cols,
                  nx_indptr, nx_cols, nvals, src, nr_flat, nr_val, sp_flat, sp_val)

    def emit(lo, hi):
        nonlocal writer
        writer = writer or _spill.Writer(directory, dtype)
        writer.write(sp_flat[lo:hi], sp_val[lo:hi])

    try:    # two parallel passes; the serial merge walk when a row outgrows the buffer
        n_kept, n_dropped = _pool.split_pool(*split_args, emit)
    except _pool.SpillBufferTooSmall:
        cur = np.zeros(10, np.int64)
        while True:
            ns = _pool.split_rows(*split_args, cur)
            if ns:
                emit(0, ns)
            if cur[0] == n_rows:
                break
        n_kept, n_dropped = int(cur[7]), int(cur[8])
    if n_kept != n_res:
        raise AssertionError(f"reserve size {n_kept} != {n_res}")   # a bug, never user input
    del c_flat, c_val, pool_args, split_args   # the candidates go before the cold rewrite
    spilled = writer.close() if writer is not None else _spill.ColdStore.empty(dtype)
    new_cold = _spill.rewrite(cold, floor_read if unspilled else math.inf, spilled, directory)
    new_state = SparseState(n_cols, n_rows, torch.from_numpy(na_indptr),
                            torch.from_numpy(na_cols), torch.from_numpy(nx_indptr),
                            torch.from_numpy(nx_cols), torch.from_numpy(nr_flat),
                            torch.from_numpy(nr_val), float(floor), state.key, cold=new_cold)
    trained = _count_trained(key_u, nr_flat, nr_val, spec.kind, spec.param,
                             spec.dtype == np.float32)
    info = {"replenished": replenished, "scanned_added": added, "trimmed": n_dropped,
            "spilled": spilled.n, "unspilled": unspilled,
            "trained_in_reserve": int(trained)}
    if want_src:
        k_a_old = a_cols.shape[0]
        a_kept, b_kept, a_new = _src_counts(src, k_a, k_a_old)
        info.update(changed_a=1.0 - a_kept / k_a, changed_b=1.0 - b_kept / k_b,
                    entered_a_from_outside_b=int(a_new))
    return Refresh(new_state, nvals, src, info)


def _merged(fa, va, fb, vb):
    """Two (flat, value) runs, sorted and disjoint, merged into new arrays."""
    fo = np.empty(fa.shape[0] + fb.shape[0], np.int64)
    vo = np.empty(fo.shape[0], va.dtype)
    _pool.merge_sorted(fa, va, fb, vb, fo, vo)
    return fo, vo


def layer_key(seed: int, name: str = "") -> int:
    """64-bit key of a layer, derived from the model seed and its qualified name."""
    import hashlib
    h = hashlib.blake2b(f"sparsecore/{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def sizes(in_features: int, out_features: int, forward_sparsity: float,
          backward_sparsity: float) -> tuple[int, int]:
    """(K_A, K_B) for a layer: K_A = max(1, round(D N)), K_B = max(K_A, round((1-S_b) N))."""
    n = in_features * out_features
    k_a = max(1, round((1.0 - forward_sparsity) * n))
    k_b = max(k_a, round((1.0 - backward_sparsity) * n))
    return k_a, min(k_b, n)
