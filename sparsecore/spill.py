"""The cold tier: trained coordinates that left the pool, kept exactly on disk.

A coordinate that was in B and left it holds a trained value that exactness must
keep (it differs from theta0), so without a disk tier the reserve grows with the
union of B over training. When a refresh finds the reserve above its cap, it keeps
the largest reserve entries in RAM, raises the floor to the smallest of them, and
moves the others out of RAM: entries still equal to theta0 are dropped (they are
recomputed on demand), trained ones are appended to the layer's :class:`ColdStore`.

Invariant (with the floor of :mod:`sparsecore.state`): every coordinate outside
the RAM pool either holds theta0 with |theta0| < floor, or is in the cold store
with its exact value and |value| < floor. A refresh whose K_B-th largest pool
magnitude is >= floor is therefore exact without touching the disk; otherwise the
replenishing scan lowers the floor and reads back, besides the theta0 band, every
cold entry whose magnitude reaches the new floor (:func:`replenish_pass`).

A store is one immutable run sorted by flat index: two files, ``<prefix>.idx``
(int64 flat indices) and ``<prefix>.val`` (values), in the layer's spill
directory (``spill_dir``, else ``$SPARSECORE_SPILL_DIR``, else a per-process
temporary directory). A refresh that changes the store writes a new run and the
old files are deleted when the last state holding them is dropped. Files are
read and written in chunks of :data:`CHUNK` entries (24 MiB with float32 values;
12 B per entry on disk), so RAM never holds the store; a refresh's spill buffer
is one such chunk.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
import weakref

import numba as nb
import numpy as np

from .kernels.cpu import pool as _pool

CHUNK = 1 << 21          # entries per read / write chunk (24 MiB with float32 values)
_DEFAULT_DIR: list = []  # the per-process temporary directory, created on first use


def default_dir() -> str:
    """``$SPARSECORE_SPILL_DIR`` if set, else a per-process temporary directory
    (removed at exit)."""
    env = os.environ.get("SPARSECORE_SPILL_DIR")
    if env:
        return env
    if not _DEFAULT_DIR:
        d = tempfile.mkdtemp(prefix="sparsecore-spill-")
        atexit.register(shutil.rmtree, d, True)
        _DEFAULT_DIR.append(d)
    return _DEFAULT_DIR[0]


def _unlink(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


class ColdStore:
    """An immutable, flat-index-sorted run of (flat index, value) pairs on disk
    (see the module docstring). ``n`` entries, values of ``dtype``, every |value|
    in [``min_abs``, ``max_abs``]. The files are deleted when the object is collected."""

    __slots__ = ("prefix", "n", "dtype", "min_abs", "max_abs", "__weakref__")

    def __init__(self, prefix: str | None, n: int, dtype, min_abs: float, max_abs: float):
        self.prefix, self.n, self.dtype = prefix, int(n), np.dtype(dtype)
        self.min_abs, self.max_abs = min_abs, max_abs
        if prefix is not None:
            weakref.finalize(self, _unlink, (prefix + ".idx", prefix + ".val"))

    @classmethod
    def empty(cls, dtype) -> "ColdStore":
        return cls(None, 0, dtype, 0.0, 0.0)

    def __deepcopy__(self, memo):   # immutable and file-backed: copies share it
        return self

    def __reduce__(self):
        if not self.n:
            return (ColdStore.empty, (self.dtype,))
        raise TypeError(f"a layer with {self.n} spilled entries cannot be pickled (its cold "
                        "store is a pair of files that live as long as the layer); save it "
                        "with sparsecore.save or state_dict()")

    def __repr__(self) -> str:
        return f"ColdStore(n={self.n}, dtype={self.dtype}, path={self.prefix!r})"

    @property
    def nbytes(self) -> int:
        return self.n * (8 + self.dtype.itemsize)

    def chunks(self, chunk: int = CHUNK):
        """Yield (flat, values) arrays of at most ``chunk`` entries, in order."""
        if not self.n:
            return
        with open(self.prefix + ".idx", "rb") as fi, open(self.prefix + ".val", "rb") as fv:
            for start in range(0, self.n, chunk):
                m = min(chunk, self.n - start)
                yield np.fromfile(fi, np.int64, m), np.fromfile(fv, self.dtype, m)

    def mapped(self):
        """(flat, values) as copy-on-write memory maps of the (immutable) files, or
        empty arrays for an empty store: what a state_dict exports without reading
        the files into RAM."""
        if not self.n:
            return np.empty(0, np.int64), np.empty(0, self.dtype)
        return (np.memmap(self.prefix + ".idx", np.int64, "c", shape=(self.n,)),
                np.memmap(self.prefix + ".val", self.dtype, "c", shape=(self.n,)))


class Writer:
    """Appends sorted chunks to a new run in ``directory``; :meth:`close` returns
    the :class:`ColdStore` (the files are deleted if it is never closed)."""

    def __init__(self, directory: str, dtype):
        os.makedirs(directory, exist_ok=True)
        self.prefix = os.path.join(directory, f"cold-{uuid.uuid4().hex}")
        self.dtype = np.dtype(dtype)
        self.fi = open(self.prefix + ".idx", "wb")
        self.fv = open(self.prefix + ".val", "wb")
        self.n, self.min_abs, self.max_abs, self.last = 0, np.inf, 0.0, -1
        self._fin = weakref.finalize(self, _unlink, (self.prefix + ".idx", self.prefix + ".val"))

    def write(self, flat: np.ndarray, val: np.ndarray) -> None:
        if not flat.shape[0]:
            return
        if flat[0] <= self.last:
            raise AssertionError("cold run written out of order")  # a bug, never user input
        flat.astype(np.int64, copy=False).tofile(self.fi)
        val.astype(self.dtype, copy=False).tofile(self.fv)
        self.n += flat.shape[0]
        a = np.abs(val)
        self.min_abs = min(self.min_abs, float(a.min()))
        self.max_abs = max(self.max_abs, float(a.max()))
        self.last = int(flat[-1])

    def close(self) -> ColdStore:
        self.fi.close()
        self.fv.close()
        self._fin.detach()
        if not self.n:
            _unlink((self.prefix + ".idx", self.prefix + ".val"))
            return ColdStore.empty(self.dtype)
        return ColdStore(self.prefix, self.n, self.dtype, self.min_abs, self.max_abs)


@nb.njit(parallel=True, cache=True)
def _mark_present(cands, flats, dup, nparts):
    """dup[i] |= cands[i] in flats (both sorted ascending), in ``nparts`` parallel
    parts of ``cands``, each starting in ``flats`` by binary search; the merge walk
    advances without data-dependent branches."""
    n = cands.shape[0]
    nf = flats.shape[0]
    for p in nb.prange(nparts):
        i = n * p // nparts
        i1 = n * (p + 1) // nparts
        if i == i1:
            continue
        j = np.searchsorted(flats, cands[i])
        while i < i1 and j < nf:
            a = cands[i]
            b = flats[j]
            dup[i] |= a == b
            i += np.int64(a <= b)
            j += np.int64(b <= a)


@nb.njit(cache=True)
def _compact(cands, dup):
    keep = 0
    for i in range(cands.shape[0]):
        if not dup[i]:
            cands[keep] = cands[i]
            keep += 1
    return keep


@nb.njit(parallel=True, cache=True)
def _band_marks(v, lo, hi, keep):
    """keep[i] = lo <= |v[i]| < hi; returns how many."""
    c = 0
    for i in nb.prange(v.shape[0]):
        a = abs(v[i])
        t = (a >= lo) & (a < hi)
        keep[i] = t
        c += np.int64(t)
    return c


def replenish_pass(store: ColdStore, cands: np.ndarray, lo: float, hi: float):
    """One read of the store for a replenishing scan over the magnitude band
    [lo, hi): compacts the sorted theta0 candidates ``cands`` in place, dropping
    coordinates that are in the store (their value is not theta0, whatever its
    magnitude), and returns (number kept, flat, values) of the store's entries with
    lo <= |value| < hi."""
    in_band = store.n and store.max_abs >= lo and store.min_abs < hi
    if not store.n or not (in_band or cands.shape[0]):
        return cands.shape[0], np.empty(0, np.int64), np.empty(0, store.dtype)
    dup = np.zeros(cands.shape[0], np.bool_)
    out_f, out_v = [], []
    for f, v in store.chunks():
        if cands.shape[0]:
            a, b = np.searchsorted(cands, [f[0], f[-1] + 1])
            if b > a:
                _mark_present(cands[a:b], f, dup[a:b],
                              np.int64(max(1, min((b - a) >> 16, 8 * nb.get_num_threads()))))
        if in_band:
            sel = np.empty(v.shape[0], np.bool_)
            if _band_marks(v, lo, hi, sel):
                out_f.append(f[sel])
                out_v.append(v[sel])
    m = _compact(cands, dup)
    if not out_f:
        return m, np.empty(0, np.int64), np.empty(0, store.dtype)
    return m, np.concatenate(out_f), np.concatenate(out_v)


def _below(store: ColdStore, bound: float):
    """The store's chunks restricted to |value| < ``bound`` (empty ones skipped),
    compared in float64 like every floor test (a float32 store must not round the
    bound: an entry just below it would count as neither below nor read back)."""
    for f, v in store.chunks():
        if store.max_abs >= bound:
            sel = np.abs(v) < np.float64(bound)
            f, v = f[sel], v[sel]
        if f.shape[0]:
            yield f, v


def rewrite(store: ColdStore, below: float, spilled: ColdStore, directory: str) -> ColdStore:
    """A new run holding the store's entries with |value| < ``below`` merged with
    ``spilled`` (disjoint, both sorted). Returns ``store`` itself when nothing
    changes."""
    if (not store.n or store.max_abs < below) and not spilled.n:
        return store
    if not store.n or store.min_abs >= below:    # nothing of the store stays
        return spilled
    w = Writer(directory, store.dtype)
    a_iter, b_iter = _below(store, below), _below(spilled, np.inf)
    (af, av), (bf, bv) = next(a_iter, (None, None)), next(b_iter, (None, None))
    while af is not None and bf is not None:   # merge up to the smaller of the two tails
        lim = min(af[-1], bf[-1])
        ia = int(np.searchsorted(af, lim, "right"))
        ib = int(np.searchsorted(bf, lim, "right"))
        fo = np.empty(ia + ib, np.int64)
        vo = np.empty(ia + ib, store.dtype)
        _pool.merge_sorted(af[:ia], av[:ia], bf[:ib], bv[:ib], fo, vo)
        w.write(fo, vo)
        af, av = (af[ia:], av[ia:]) if ia < af.shape[0] else next(a_iter, (None, None))
        bf, bv = (bf[ib:], bv[ib:]) if ib < bf.shape[0] else next(b_iter, (None, None))
    for f, v, it in ((af, av, a_iter), (bf, bv, b_iter)):
        while f is not None:
            w.write(f, v)
            f, v = next(it, (None, None))
    return w.close()


def cast(store: ColdStore, dtype) -> ColdStore:
    """The store with its values converted to ``dtype`` (a new run beside it)."""
    dtype = np.dtype(dtype)
    if dtype == store.dtype:
        return store
    if not store.n:
        return ColdStore.empty(dtype)
    w = Writer(os.path.dirname(store.prefix), dtype)
    for f, v in store.chunks():
        w.write(f, v.astype(dtype))
    return w.close()
