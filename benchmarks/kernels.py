"""Kernel benchmark: sparsecore's Numba kernels vs torch.sparse CSR vs dense torch matmul.

Products (W is out x in with density d, X is (n, in), G = dY is (n, out)):

* ``spmm``:   Y  = X W^T             (forward)
* ``spmm_t``: dX = G W               (input gradient; sparsecore uses W^T's cached
  index structure, torch.sparse a CSR copy of W^T built once, like the engine)
* ``sddmm``:  dW = G^T X on W's stored pattern only (weight gradient)

Useful work is 2 * nnz * n flops for every product; the dense baseline does
2 * out * in * n. For each shape the backends run in the *same process*,
interleaved round by round, so machine load hits all of them alike; every number
is a median over rounds. Reported per (product, out, in, n, density, backend):

* ``gflops``:               2 * nnz * n / time (useful GFLOP/s),
* ``dense_gflops``:         2 * out * in * n / dense time (same process, same rounds),
* ``ratio_to_dense_rate``:  gflops / dense_gflops (target >= 0.6 at d = 0.1, n = 512),
* ``speedup_vs_dense``:     dense time / time.

Backends:

* ``sparsecore``:        torch API (``sparsecore.kernels``, ``check=False``,
  ``layout="row"``) on X and G exactly as torch holds them, (n, features) row-major,
  returning (n, features): what the layer calls, no copies outside the kernel (the
  kernels pack their operands internally; that time is included).
* ``sparsecore-kernel``: the same kernels through the feature-major API
  (``layout="feature"``, inputs (features, n) already transposed).
* ``torch-csr``:         ``W_csr @ X^T`` / ``W^T_csr @ G^T`` (torch.sparse CSR, MKL) and
  ``torch.sparse.sampled_addmm`` for sddmm (n/a where it fails).
* ``dense``:             ``X @ W.t()``, ``G @ W``, ``G.t() @ X`` (torch, MKL/oneDNN).

Also measured: top-K ``select`` (positions) and ``threshold`` (the exact K-th
largest magnitude with its tie counts, ``select.topk_threshold``, what the
refresh uses, over the vector split into three pieces like the pool) vs one
memory pass over the same vector (numpy ``np.abs(v, out=buf)``, single-threaded
read + write, and a 2-thread Numba pass sum(|v|)), and the counter-based init: ``init_values`` and the streaming
``scan`` in ns per coordinate.

Usage::

    python benchmarks/kernels.py            # full run (~30-60 min on 2 cores)
    python benchmarks/kernels.py --quick    # subset, < 60 s
    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernels.py --skip-products --tag omp_passive

Writes benchmarks/results/kernels[_quick].json (product records),
kernels_select[_quick].json (select / init / scan) and kernels.png (full run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import warnings

HERE_ = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE_.parent))

import numba as nb  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

HERE = HERE_
sys.path.insert(0, str(HERE))
from _common import pyplot  # noqa: E402

from sparsecore import kernels as K  # noqa: E402
from sparsecore.kernels.cpu import select as _select  # noqa: E402

SIZES = [1024, 4096, 16384]
DENSITIES = [0.1, 0.01]
NS = [64, 512, 2048]
DTYPE = torch.float32
PRODUCTS = ["spmm", "spmm_t", "sddmm"]
BACKENDS = ["sparsecore", "sparsecore-kernel", "torch-csr", "dense"]


# ----------------------------------------------------------------------------- helpers
def machine_info() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numba": nb.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "numba_threads": nb.get_num_threads(),
            "numba_threading_layer": _threading_layer()}


def _threading_layer() -> str:
    try:
        return nb.threading_layer()
    except ValueError:  # no parallel function has run yet
        return "unset"


def _time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, rounds: int, budget_s: float = 60.0) -> dict:
    """Median time of each callable over ``rounds`` interleaved rounds (fewer, but
    at least 1, once a round exceeds ``budget_s / rounds``). One warm-up call each."""
    warm = {k: _time_once(f) for k, f in fns.items()}
    per_round = sum(warm.values())
    rounds = max(1, min(rounds, int(budget_s / max(per_round, 1e-9))))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(_time_once(f))
    return {k: (statistics.median(v), len(v)) for k, v in times.items()}


def random_csr(rows: int, cols: int, density: float, seed: int):
    """Random pattern with each position kept with probability ``density``; rows
    sorted by column. Returns torch (indptr int64, indices int32, values float32)."""
    g = torch.Generator().manual_seed(seed)
    counts, idx_parts, val_parts = [], [], []
    chunk = max(1, (1 << 26) // cols)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        mask = torch.rand(r1 - r0, cols, generator=g) < density
        counts.append(mask.sum(1))
        nz = mask.nonzero()
        idx_parts.append(nz[:, 1].to(torch.int32))
        val_parts.append(torch.randn(nz.shape[0], generator=g))
        del mask, nz
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.cat(counts), 0)
    return indptr, torch.cat(idx_parts), torch.cat(val_parts)


# ----------------------------------------------------------------------------- products
def bench_shape(N: int, n: int, d: float, rounds: int, seed: int = 0) -> list[dict]:
    out_f = in_f = N
    indptr, indices, values = random_csr(out_f, in_f, d, seed)
    nnz = indices.numel()
    g = torch.Generator().manual_seed(seed + 1)
    values = values.to(DTYPE)
    X = torch.randn(n, in_f, generator=g, dtype=DTYPE)
    G = torch.randn(n, out_f, generator=g, dtype=DTYPE)
    xt = X.t().contiguous()
    gt = G.t().contiguous()
    t_indptr, t_rows, t_perm = K.transpose_csr(indptr, indices, in_f, check=False)
    W_csr = torch.sparse_csr_tensor(indptr, indices.to(torch.int64), values, (out_f, in_f))
    WT_csr = torch.sparse_csr_tensor(t_indptr, t_rows.to(torch.int64), values[t_perm],
                                     (in_f, out_f))
    W = W_csr.to_dense()  # dense baseline operand (same values, zeros elsewhere)

    def sc_spmm():
        return K.spmm(indptr, indices, values, X, layout="row", check=False)

    def sc_spmm_t():
        return K.spmm_t(t_indptr, t_rows, t_perm, values, G, layout="row", check=False)

    def sc_sddmm():
        return K.sddmm(indptr, indices, G, X, layout="row", check=False)

    fns = {
        "spmm": {
            "sparsecore": sc_spmm,
            "sparsecore-kernel": lambda: K.spmm(indptr, indices, values, xt, check=False),
            "torch-csr": lambda: (W_csr @ X.t()).t(),
            "dense": lambda: X @ W.t(),
        },
        "spmm_t": {
            "sparsecore": sc_spmm_t,
            "sparsecore-kernel": lambda: K.spmm_t(t_indptr, t_rows, t_perm, values, gt,
                                                  check=False),
            "torch-csr": lambda: (WT_csr @ G.t()).t(),
            "dense": lambda: G @ W,
        },
        "sddmm": {
            "sparsecore": sc_sddmm,
            "sparsecore-kernel": lambda: K.sddmm(indptr, indices, gt, xt, check=False),
            "torch-csr": lambda: torch.sparse.sampled_addmm(W_csr, G.t(), X, beta=0.0),
            "dense": lambda: G.t() @ X,
        },
    }
    # correctness spot check (float32 tolerances) and n/a detection
    ok = {}
    ref = {"spmm": X @ W.t(), "spmm_t": G @ W}
    rows_of = torch.repeat_interleave(torch.arange(out_f), indptr.diff())
    for prod in PRODUCTS:
        for be, f in fns[prod].items():
            try:
                r = f()
                if prod == "sddmm":
                    if be == "torch-csr":
                        r = r.values()
                    elif be == "dense":
                        ok[prod, be] = True
                        continue
                    sel = torch.randint(0, max(nnz, 1), (min(nnz, 2000),), generator=g)
                    exp = (G[:, rows_of[sel]] * X[:, indices[sel].long()]).sum(0)
                    good = torch.allclose(r[sel], exp, rtol=1e-3, atol=1e-3 * (n ** 0.5))
                elif be != "dense":
                    if be == "sparsecore-kernel":
                        r = r.t()
                    good = torch.allclose(r.to(ref[prod].dtype), ref[prod], rtol=1e-3,
                                          atol=1e-3 * (N * d) ** 0.5)
                else:
                    good = True
                ok[prod, be] = bool(good)
                if not good:
                    print(f"WARNING: {prod}/{be} disagrees with the reference", flush=True)
            except (RuntimeError, NotImplementedError, TypeError) as e:
                print(f"  {prod}/{be}: n/a ({type(e).__name__}: {str(e)[:80]})", flush=True)
                ok[prod, be] = None
    del ref
    recs = []
    useful = 2.0 * nnz * n
    dense_flops = 2.0 * out_f * in_f * n
    for prod in PRODUCTS:
        run = {be: f for be, f in fns[prod].items() if ok.get((prod, be)) is not None}
        med = interleaved(run, rounds)
        td = med["dense"][0]
        dense_gflops = dense_flops / td / 1e9
        for be in BACKENDS:
            rec = {"product": prod, "out": out_f, "in": in_f, "n": n, "density": d,
                   "nnz": nnz, "backend": be, "dense_gflops": dense_gflops}
            if be not in med:
                rec.update(gflops=None, ratio_to_dense_rate=None, speedup_vs_dense=None,
                           time_ms=None, rounds=0, note="n/a")
            else:
                t, cnt = med[be]
                flops = dense_flops if be == "dense" else useful
                gf = flops / t / 1e9
                rec.update(gflops=gf, ratio_to_dense_rate=gf / dense_gflops,
                           speedup_vs_dense=td / t, time_ms=t * 1e3, rounds=cnt,
                           correct=ok[prod, be])
            recs.append(rec)
    return recs


def print_products(recs: list[dict]) -> None:
    hdr = (f"{'product':7} {'out=in':>6} {'n':>4} {'dens':>5} {'dense GF/s':>10} | "
           + " | ".join(f"{b:>17}" for b in BACKENDS[:3]) + "   (GF/s useful, ratio to dense rate)")
    print(hdr)
    keyf = lambda r: (r["product"], r["out"], r["n"], -r["density"])  # noqa: E731
    groups: dict = {}
    for r in recs:
        groups.setdefault(keyf(r), {})[r["backend"]] = r
    for k in sorted(groups, key=lambda k: (PRODUCTS.index(k[0]), k[1], k[2], k[3])):
        row = groups[k]
        any_r = next(iter(row.values()))
        cells = []
        for b in BACKENDS[:3]:
            r = row.get(b)
            if r is None or r["gflops"] is None:
                cells.append(f"{'n/a':>17}")
            else:
                cells.append(f"{r['gflops']:8.1f} ({r['ratio_to_dense_rate']:5.2f})")
        print(f"{k[0]:7} {k[1]:6d} {k[2]:4d} {any_r['density']:5.2f} "
              f"{any_r['dense_gflops']:10.1f} | " + " | ".join(cells), flush=True)


# ----------------------------------------------------------------------------- select / init
@nb.njit(parallel=True, cache=True)
def _abs_sum(v):
    s = 0.0
    for i in nb.prange(v.shape[0]):
        s += abs(v[i])
    return s


def bench_select(n: int, fracs, rounds: int) -> list[dict]:
    v_t = torch.randn(n, generator=torch.Generator().manual_seed(7))
    v = v_t.numpy()
    buf = np.empty_like(v)
    recs = []
    for frac in fracs:
        k = int(n * frac)
        pieces = [v[: n // 2], v[n // 2: (4 * n) // 5], v[(4 * n) // 5:]]   # like A+X, R, C
        fns = {"select": lambda: K.select_topk(v_t, k),
               "threshold": lambda: _select.topk_threshold(pieces, k),
               "np_abs": lambda: np.abs(v, out=buf),
               "numba_abs_sum": lambda: _abs_sum(v)}
        med = interleaved(fns, rounds)
        ts = med["select"][0]
        tt = med["threshold"][0]
        recs.append({"product": "select", "n": n, "k": k, "k_frac": frac,
                     "select_ms": ts * 1e3, "threshold_ms": tt * 1e3,
                     "np_abs_ms": med["np_abs"][0] * 1e3,
                     "numba_abs_sum_ms": med["numba_abs_sum"][0] * 1e3,
                     "ratio_to_np_abs": ts / med["np_abs"][0],
                     "ratio_to_numba_pass": ts / med["numba_abs_sum"][0],
                     "threshold_ratio_to_numba_pass": tt / med["numba_abs_sum"][0],
                     "rounds": med["select"][1]})
        r = recs[-1]
        print(f"select n={n:.0e} k={frac:>5}: {r['select_ms']:8.1f} ms = "
              f"{r['ratio_to_np_abs']:5.2f} x np.abs pass, {r['ratio_to_numba_pass']:5.2f} x "
              f"2-thread Numba pass; threshold {r['threshold_ms']:7.1f} ms = "
              f"{r['threshold_ratio_to_numba_pass']:5.2f} x Numba pass", flush=True)
    return recs


def bench_init(n_scan: int, rounds: int) -> list[dict]:
    recs = []
    idx = torch.randint(0, 1 << 40, (10 ** 7,), generator=torch.Generator().manual_seed(3))
    for kind, floor in [("uniform", 0.999), ("normal", 3.3)]:
        K.init_values(1234, idx[:10], kind=kind, param=1.0)
        K.scan(1234, 1000, floor, kind=kind, param=1.0)
        med = interleaved({
            "init": lambda: K.init_values(1234, idx, kind=kind, param=1.0),
            "scan": lambda: K.scan(1234, n_scan, floor, kind=kind, param=1.0),
        }, rounds, budget_s=120.0)
        hits = K.scan(1234, min(n_scan, 10 ** 8), floor, kind=kind, param=1.0).numel()
        rec = {"product": "init", "kind": kind, "param": 1.0,
               "init_ns_per_value": med["init"][0] / idx.numel() * 1e9,
               "scan_coords": n_scan, "scan_floor": floor,
               "scan_hit_rate": hits / min(n_scan, 10 ** 8),
               "scan_ns_per_coord": med["scan"][0] / n_scan * 1e9,
               "rounds": med["scan"][1]}
        recs.append(rec)
        print(f"init {kind:7}: init_values {rec['init_ns_per_value']:.2f} ns/value, "
              f"scan {rec['scan_ns_per_coord']:.3f} ns/coord over {n_scan:.0e} "
              f"(floor {floor}, hit rate {rec['scan_hit_rate']:.1e})", flush=True)
    return recs


# ----------------------------------------------------------------------------- plot
def plot(recs: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    sizes = sorted({r["out"] for r in recs})
    ns = sorted({r["n"] for r in recs})
    fig, axes = plt.subplots(len(PRODUCTS), len(sizes) * len(ns),
                             figsize=(4 * len(sizes) * len(ns), 3.2 * len(PRODUCTS)),
                             squeeze=False, sharey=True)
    for i, prod in enumerate(PRODUCTS):
        for j, (N, n) in enumerate([(N, n) for N in sizes for n in ns]):
            ax = axes[i][j]
            for be, st in [("sparsecore", "o-"), ("sparsecore-kernel", "o--"),
                           ("torch-csr", "s-")]:
                pts = sorted((r["density"], r["ratio_to_dense_rate"]) for r in recs
                             if r["product"] == prod and r["out"] == N and r["n"] == n
                             and r["backend"] == be and r["gflops"] is not None)
                if pts:
                    ax.plot(*zip(*pts), st, label=be)
            ax.axhline(0.6, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_title(f"{prod}  {N}x{N}  n={n}", fontsize=9)
            if j == 0:
                ax.set_ylabel("useful GFLOP/s / dense GFLOP/s")
            if i == len(PRODUCTS) - 1:
                ax.set_xlabel("density")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subset, < 60 s")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per shape")
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--skip-products", action="store_true",
                    help="only select / init / scan")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--sizes", type=int, nargs="*", default=SIZES, help="out = in")
    ap.add_argument("--ns", type=int, nargs="*", default=NS, help="batch sizes n")
    ap.add_argument("--densities", type=float, nargs="*", default=DENSITIES)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args(argv)
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    if args.dtype != "float32":
        args.tag = (args.tag + "_" if args.tag else "") + args.dtype
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    if args.quick:
        shapes = [(4096, 512, 0.1), (4096, 64, 0.1)]
        rounds = args.rounds or 3
        sel_ns, sel_fracs, n_scan = [10 ** 7], [0.1], 10 ** 8
    else:
        shapes = [(N, n, d) for N in args.sizes for n in args.ns for d in args.densities]
        rounds = args.rounds or 5
        sel_ns, sel_fracs, n_scan = [10 ** 7, 10 ** 8], [0.01, 0.1, 0.5], 10 ** 9
    if args.skip_products:
        shapes = []
        rounds = args.rounds or 5
        sel_ns, sel_fracs, n_scan = [10 ** 7, 10 ** 8], [0.01, 0.1, 0.5], 10 ** 9
    # warm up / compile every Numba path once (compile time is excluded)
    for wn in (64, 512):
        bench_shape(256, wn, 0.1, 1)
    K.select_topk(torch.randn(1 << 18), 1000)
    _abs_sum(np.ones(10, np.float32))
    info = machine_info()
    print(json.dumps(info), flush=True)
    t0 = time.perf_counter()
    recs = []
    for N, n, d in shapes:
        recs += bench_shape(N, n, d, rounds)
        print(f"[{time.perf_counter() - t0:6.0f}s] done {N}x{N} n={n} d={d}", flush=True)
    print()
    print_products(recs)
    print()
    sel = []
    for sn in sel_ns:
        sel += bench_select(sn, sel_fracs, 5 if sn <= 10 ** 7 else 3)
    sel += bench_init(n_scan, 3)
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    if recs:
        (results / f"kernels{suffix}.json").write_text(json.dumps(
            {"machine": info, "records": recs}, indent=1))
    (results / f"kernels_select{suffix}.json").write_text(json.dumps(
        {"machine": info, "records": sel}, indent=1))
    if recs and not args.no_png and not args.quick:
        plot(recs, results / "kernels.png")
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {results}/kernels*{suffix}.json")


if __name__ == "__main__":
    main()
