"""Roofline of the three CPU products: where each lands and what limits it.

For each product (spmm ``Y = X W^T``, spmm_t ``dX = G W``, sddmm ``dW = G^T X`` on
W's pattern), shape (out = in = N, n samples, density d) and dtype, the product is
timed through ``sparsecore.kernels`` exactly as the layer calls it (row-major
activations, packing included) and set beside a roof built from three ceilings
measured on this machine in the same run:

* ``compute``: the dense GEMM rate (``torch.mm``, 2048^3, the best of the rounds):
  the useful flops ``2 * nnz * n`` at that rate;
* ``gather``: every stored value reads its panel row of the packed activation once
  per panel of samples, ``nnz * n * itemsize`` bytes in all (spmm / spmm_t: X or G;
  sddmm: X; G's row is reused across the row's values). The ceiling is a kernel
  that only gathers random panel rows of the width the product uses from an
  L2-resident buffer (the panel, or 512 KiB of it when larger: sddmm's column
  tiles hold that much) and adds them up, with no stores;
* ``stream``: the passes over activation-sized arrays the product must make: the
  pack of each operand (read + write), the output written (spmm, spmm_t) or the
  output vector read and written once per panel (sddmm), at the best rate of
  torch's ``copy_`` between two arrays of the activation's size (same cache tier).

Each ceiling is measured again at every shape that needs it and the roofs use its
best over the whole run (a ceiling measured while the shared machine was busy would
read low). ``roof = max(compute, gather) + stream`` (the packs and stores are separate passes
that do not overlap the gathers), and the report gives the achieved useful GFLOP/s,
the roof's GFLOP/s, ``fraction = roof time / achieved time`` and the term that
bounds the roof. A fraction near 1 means the product already runs at what these
ceilings allow; the remaining gap to the dense rate is then the gather term, i.e.
the format (one panel-row read per stored value), not the code.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/roofline.py           # ~10 min, 2 cores
    OMP_WAIT_POLICY=PASSIVE python benchmarks/roofline.py --quick   # < 1 min

Writes benchmarks/results/roofline[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch  # noqa: I001  (torch first, as user code does)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

import numba as nb  # noqa: E402
import numpy as np  # noqa: E402

from _common import tree_state  # noqa: E402
from kernels import _time_once, interleaved, machine_info, random_csr  # noqa: E402
from sparsecore import kernels as K  # noqa: E402
from sparsecore.kernels.cpu.sddmm import sddmm_panel_width  # noqa: E402
from sparsecore.kernels.cpu.spmm import U, _stack_buffer, panel_width, wide_vectors  # noqa: E402

_GATHER_KERNELS: dict = {}
_BEST: dict = {}   # each ceiling's best rate over the whole run, by key


def best(key, rate: float) -> float:
    """Record a measurement of ceiling ``key`` and return its best so far (a ceiling
    measured while the shared machine was busy reads low; the roofs use the best)."""
    _BEST[key] = max(_BEST.get(key, 0.0), rate)
    return _BEST[key]


_GATHER_BYTES = 512 << 10   # the gathered buffer: sddmm's X column tile, spmm's 1024-wide panels


def _gather_kernel(P: int):
    """A kernel that sums random rows of P values of a per-thread buffer into two
    register-held P-vectors (the products' inner loop without multiplies or stores)."""
    if P not in _GATHER_KERNELS:
        @nb.njit(parallel=True, fastmath=True, boundscheck=False)
        def gather_sum(buf, idx, reps):
            T = buf.shape[0]
            m = idx.shape[1]
            res = np.zeros(T)
            for t in nb.prange(T):
                wide_vectors()
                a0 = nb.carray(_stack_buffer(P, buf.dtype), P)
                a1 = nb.carray(_stack_buffer(P, buf.dtype), P)
                for j in range(P):
                    a0[j] = 0.0
                    a1[j] = 0.0
                for _ in range(reps):
                    for q in range(0, m - 1, 2):
                        c0 = U(idx[t, q])
                        c1 = U(idx[t, q + 1])
                        for j in range(P):
                            a0[j] += buf[t, c0, j]
                            a1[j] += buf[t, c1, j]
                s = 0.0
                for j in range(P):
                    s += a0[j] + a1[j]
                res[t] = s
            return res
        _GATHER_KERNELS[P] = gather_sum
    return _GATHER_KERNELS[P]


def gather_rate(P: int, rows: int, dtype, rounds: int = 25) -> float:
    """Bytes per second of random P-value rows gathered from an L2-resident buffer of
    ``rows`` rows per thread (all threads at once; the best of ``rounds``: a ceiling)."""
    T = nb.get_num_threads()
    rng = np.random.default_rng(0)
    buf = rng.standard_normal((T, rows, P)).astype(dtype)
    m = 1 << 16
    idx = rng.integers(0, rows, (T, m)).astype(np.int32)
    f = _gather_kernel(P)
    f(buf, idx, 1)
    reps = 8
    t = min(_time_once(lambda: f(buf, idx, reps)) for _ in range(rounds))
    return T * m * reps * P * buf.itemsize / t


def copy_rate(nbytes: int, dtype, rounds: int = 15) -> float:
    """Bytes per second moved (read + write) by torch's copy_ between two arrays of
    ``nbytes`` (the best of ``rounds``: a ceiling)."""
    n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
    a, b = torch.randn(n).to(dtype), torch.empty(n, dtype=dtype)
    b.copy_(a)
    t = min(_time_once(lambda: b.copy_(a)) for _ in range(rounds))
    return 2 * n * a.element_size() / t


def gemm_rate(dtype, rounds: int = 5) -> float:
    """The dense GEMM's flop rate (torch.mm, 2048^3, best of ``rounds``)."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    return 2 * 2048 ** 3 / min(_time_once(lambda: a @ b) for _ in range(rounds))


def traffic(product: str, nnz: int, n: int, f_read: int, f_other: int, isz: int):
    """The roof's inputs for one call of ``product`` on ``nnz`` stored values and n
    samples: (panel width P, rows of the gather ceiling's buffer, gathered bytes,
    streamed bytes, bytes of the gathered activation). ``f_read``: features of the
    activation whose panel rows are gathered (spmm: x's in, spmm_t: g's out, sddmm:
    x's in); ``f_other``: features of the other activation (spmm, spmm_t: the output;
    sddmm: G)."""
    if product == "sddmm":   # both operands packed; out read + written per panel
        P = sddmm_panel_width(n, isz)
        streamed = 2 * n * (f_read + f_other) * isz + 2 * -(-n // P) * nnz * isz
    else:                    # one operand packed, the output written
        P = panel_width(f_read, isz, n)
        streamed = 2 * n * f_read * isz + n * f_other * isz
    rows = max(16, min(f_read, _GATHER_BYTES // (P * isz)))
    return P, rows, nnz * n * isz, streamed, n * f_read * isz


def measure_ceilings(P: int, rows: int, act: int, npdt) -> tuple:
    """Measure (again) the gather ceiling for panels of P values over ``rows`` rows
    and the stream ceiling for arrays of ``act`` bytes; returns their keys in _BEST."""
    gather_key = ("gather", P, rows, str(npdt))
    best(gather_key, gather_rate(P, rows, npdt))
    stream_key = ("stream", act, str(npdt))
    best(stream_key, copy_rate(act, torch.float64 if npdt == np.float64 else torch.float32))
    return gather_key, stream_key


def roof_terms(flops: float, gathered: float, streamed: float, keys: tuple) -> dict:
    """Seconds of each ceiling's term for one call, from the run's best ceilings."""
    gather_key, stream_key = keys
    return {"compute": flops / _BEST[("gemm",)], "gather": gathered / _BEST[gather_key],
            "stream": streamed / _BEST[stream_key]}


def roof_time(terms: dict) -> float:
    """``max(compute, gather) + stream`` (packs and stores do not overlap the gathers)."""
    return max(terms["compute"], terms["gather"]) + terms["stream"]


def bench_shape(N: int, n: int, d: float, dtype, rounds: int, budget: float) -> list[dict]:
    """Time the three products on one shape (interleaved rounds) and measure the
    ceilings they need; the roofs are filled in by :func:`add_roofs` at the end."""
    indptr, indices, values = random_csr(N, N, d, seed=0)
    nnz = indices.numel()
    g = torch.Generator().manual_seed(1)
    values = values.to(dtype)
    X = torch.randn(n, N, generator=g, dtype=dtype)
    G = torch.randn(n, N, generator=g, dtype=dtype)
    t_indptr, t_rows, t_perm = K.transpose_csr(indptr, indices, N, check=False)
    fns = {
        "spmm": lambda: K.spmm(indptr, indices, values, X, layout="row", check=False),
        "spmm_t": lambda: K.spmm_t(t_indptr, t_rows, t_perm, values, G, layout="row",
                                   check=False),
        "sddmm": lambda: K.sddmm(indptr, indices, G, X, layout="row", check=False),
    }
    times = interleaved(fns, rounds, budget_s=budget)
    isz = X.element_size()
    npdt = np.dtype(X.numpy().dtype)
    recs = []
    for prod, (t, nr) in times.items():
        P, rows, gathered, streamed, act = traffic(prod, nnz, n, N, N, isz)
        gather_key, stream_key = measure_ceilings(P, rows, act, npdt)
        recs.append({
            "product": prod, "N": N, "n": n, "density": d, "dtype": str(npdt),
            "nnz": nnz, "time_s": t, "rounds": nr, "flops": 2 * nnz * n,
            "gflops": 2 * nnz * n / t / 1e9, "panel": P,
            "gathered_bytes": gathered, "streamed_bytes": streamed,
            "_keys": (gather_key, stream_key),
        })
    return recs


def add_roofs(recs: list[dict]) -> None:
    """Fill in each record's roof from the best ceilings of the whole run."""
    peak = _BEST[("gemm",)]
    for r in recs:
        keys = r.pop("_keys")
        terms = roof_terms(r["flops"], r["gathered_bytes"], r["streamed_bytes"], keys)
        roof = roof_time(terms)
        r.update({"roof_gflops": r["flops"] / roof / 1e9,
                  "fraction_of_roof": roof / r["time_s"], "bound": max(terms, key=terms.get),
                  "terms_s": terms, "dense_gemm_gflops": peak / 1e9,
                  "ratio_to_dense_rate": r["flops"] / r["time_s"] / peak,
                  "gather_gbs": _BEST[keys[0]] / 1e9, "stream_gbs": _BEST[keys[1]] / 1e9})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes (< 1 min)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--sizes", default="1024,4096,16384",
                    help="comma-separated out = in sizes of the full run")
    ap.add_argument("--rounds", type=int, default=200,
                    help="interleaved rounds per shape, at most (fewer past --budget)")
    ap.add_argument("--budget", type=float, default=15.0,
                    help="seconds of rounds per shape (at least one round)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.quick:
        shapes = [(1024, 512, 0.01), (1024, 512, 0.1), (4096, 64, 0.01)]
    else:
        sizes = [int(v) for v in args.sizes.split(",")]
        shapes = [(N, n, d) for N in sizes for n in (64, 512, 2048)
                  for d in (0.1, 0.01)]
    info = machine_info()
    print(json.dumps(info), flush=True)
    best(("gemm",), gemm_rate(dtype))
    recs = []
    t0 = time.perf_counter()
    for N, n, d in shapes:
        recs += bench_shape(N, n, d, dtype, args.rounds, args.budget)
        best(("gemm",), gemm_rate(dtype, rounds=2))
        print(f"[{time.perf_counter() - t0:5.0f}s] {N}x{N} n={n} d={d}", flush=True)
    add_roofs(recs)
    print(f"dense GEMM (2048^3, {args.dtype}): {_BEST[('gemm',)] / 1e9:.0f} GFLOP/s")
    print(f"{'product':8} {'N':>6} {'n':>5} {'d':>5} {'GF/s':>6} {'roof':>6} {'frac':>5} "
          f"{'bound':8} {'/dense':>6}  gather GB/s  stream GB/s")
    for r in recs:
        print(f"{r['product']:8} {r['N']:6} {r['n']:5} {r['density']:5.2f} {r['gflops']:6.1f} "
              f"{r['roof_gflops']:6.1f} {r['fraction_of_roof']:5.2f} {r['bound']:8} "
              f"{r['ratio_to_dense_rate']:6.2f}  {r['gather_gbs']:10.0f}  "
              f"{r['stream_gbs']:10.1f}")
    peak = _BEST[("gemm",)]
    suffix = "_quick" if args.quick else ("" if args.dtype == "float32" else "_" + args.dtype)
    out = HERE / "results" / f"roofline{suffix}.json"
    out.write_text(json.dumps({"machine": info, "tree": tree_state(),
                               "dense_gemm_gflops": peak / 1e9, "records": recs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
