"""GPU benchmark of the Triton backend: one prepared script for a session with a GPU.

What it does, in order (total well under 8 minutes on one H100/H200; ``--budget-s``
is a hard cap on the timing part, the rest is skipped and marked when it runs out):

1. prints and records the device, driver-visible versions (torch, CUDA, Triton);
2. correctness: ``pytest -q tests/test_triton.py`` with the kernels *compiled*
   (``SPARSECORE_TRITON_COMPILED=1``, CUDA tensors; see that file), in a subprocess
   with a timeout; then, for every benchmark shape, the Triton spmm result is compared
   with the dense product (``max_rel_err`` in the records);
3. a small tuning sweep of the kernels' tile sizes on one shape (out = in = 16384,
   n = 512, density 5%); the best config per product is used below;
4. timings: products (W is out x in at density d, feature-major activations, so
   spmm is ``yt = W xt``, spmm_t ``dxt = W^T gt``, sddmm ``dW = (gt xt^T)[pattern]``)
   for out = in in {4096, 16384}, n in {512, 2048}, d in {1%, 5%, 10%, 20%}:

   * ``triton-fp32`` / ``triton-bf16``: sparsecore's Triton kernels, fp32 or bf16
     activations (values fp32, fp32 accumulation), ``check=False``, row order
     computed once per structure (not timed);
   * ``torch-csr-fp32`` / ``torch-csr-bf16``: torch.sparse CSR (cuSPARSE) with int32
     indices: ``W_csr @ xt``, ``Wt_csr @ gt`` (a CSR copy of W^T built once, not timed),
     ``torch.sparse.sampled_addmm`` for sddmm; "n/a: <error>" where torch refuses;
   * ``dense-fp32`` (TF32 off), ``dense-tf32``, ``dense-bf16``: cuBLAS ``W @ xt``,
     ``W^T @ gt``, ``gt @ xt^T`` (the full dense product), once per shape.

   Times are CUDA-event medians over repetitions (after one warm-up call, which also
   compiles). Each sparse record carries ``gflops`` (useful: 2 nnz n / time) and
   ``speedup_vs_<dense variant>`` = dense time / its time, from the same process.

Results go to the JSON file given by ``--out`` (rewritten after every shape, so a
run cut short keeps what it measured).

``--dry-run`` runs every code path on the CPU in Triton's interpreter with tiny shapes
(perf_counter timing instead of CUDA events) to check the script itself; its numbers
mean nothing.

Usage::

    python benchmarks/gpu.py --out benchmarks/results/gpu_h100.json
    python benchmarks/gpu.py --dry-run --out /tmp/gpu_dry.json
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/benchmarks.md, OpenMP wait policy

import torch  # noqa: E402  (torch first: the GPU runtime does not care about OpenMP order)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

SIZES = [4096, 16384]
NS = [512, 2048]
DENSITIES = [0.01, 0.05, 0.10, 0.20]
PRODUCTS = ["spmm", "spmm_t", "sddmm"]
TUNE_SHAPE = (16384, 512, 0.05)  # (out = in, n, density)
ROWS_CFGS = [  # spmm / spmm_t: (rows_per_program, block_k, block_n, num_warps)
    (1, 32, 128, 4), (1, 16, 64, 4), (1, 32, 64, 4), (1, 64, 128, 8), (4, 32, 128, 4),
    (1, 16, 128, 4)]
SDDMM_CFGS = [  # (rows_per_program, block_e, block_n, num_warps)
    (1, 32, 128, 4), (1, 32, 64, 4), (1, 16, 128, 4), (1, 64, 64, 8), (1, 64, 128, 8)]

DRY = dict(sizes=[64], ns=[48], densities=[0.2], tune_shape=(64, 48, 0.2),
           rows_cfgs=ROWS_CFGS[:2], sddmm_cfgs=SDDMM_CFGS[:1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path of the JSON results file")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU in Triton's interpreter (checks the script)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="time cap for tuning + timings in seconds (default 270)")
    p.add_argument("--test-timeout-s", type=float, default=140.0,
                   help="timeout of the compiled pytest run (default 140)")
    p.add_argument("--skip-tests", action="store_true", help="do not run tests/test_triton.py")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=15)
    p.add_argument("--target-s", type=float, default=0.25,
                   help="stop repeating a timing after about this many seconds")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

class Timer:
    """Median time of a callable in ms: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device, min_reps, max_reps, target_s):
        self.cuda = torch.device(device).type == "cuda"
        self.min_reps, self.max_reps, self.target_s = min_reps, max_reps, target_s

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def one(self, fn) -> float:
        if self.cuda:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            return float(s.elapsed_time(e))
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def __call__(self, fn) -> dict:
        fn()  # warm-up (and compilation)
        self.sync()
        times, spent = [], 0.0
        while len(times) < self.max_reps and (len(times) < self.min_reps
                                              or spent < self.target_s * 1e3):
            times.append(self.one(fn))
            spent += times[-1]
        return {"ms": statistics.median(times), "ms_min": min(times), "reps": len(times)}


# --------------------------------------------------------------------------------------------
# Problem construction (on the device; the dense W exists only for the baselines)
# --------------------------------------------------------------------------------------------

class Problem:
    """A random W (out x in, density d) as CSR + cached transpose + dense copies."""

    def __init__(self, size, n, density, device, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        out = inn = size
        mask = torch.rand(out, inn, device=device, generator=g) < density
        w = torch.randn(out, inn, device=device, generator=g) * mask
        rc = mask.nonzero()  # row-major: columns ascend in each row
        rows, cols = rc[:, 0], rc[:, 1]
        del rc
        self.out, self.inn, self.n, self.density = out, inn, n, density
        self.nnz = rows.numel()
        self.indptr = torch.zeros(out + 1, dtype=torch.int64, device=device)
        self.indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=out), 0)
        self.indices = cols.to(torch.int32)
        self.values = w[mask].contiguous()
        # W^T: entries sorted by column (stable: rows ascend), t_perm into values
        t_perm = torch.sort(cols, stable=True).indices
        self.t_indptr = torch.zeros(inn + 1, dtype=torch.int64, device=device)
        self.t_indptr[1:] = torch.cumsum(torch.bincount(cols, minlength=inn), 0)
        self.t_rows = rows[t_perm].to(torch.int32)
        self.t_perm = t_perm
        del rows, cols, mask
        self.w = {torch.float32: w}
        self.xt = {torch.float32: torch.randn(inn, n, device=device, generator=g)}
        self.gt = {torch.float32: torch.randn(out, n, device=device, generator=g)}
        for dt in (torch.bfloat16,):
            self.w[dt] = w.to(dt)
            self.xt[dt] = self.xt[torch.float32].to(dt)
            self.gt[dt] = self.gt[torch.float32].to(dt)


def dense_fns(pb: Problem, dtype):
    w, xt, gt = pb.w[dtype], pb.xt[dtype], pb.gt[dtype]
    return {"spmm": lambda: w @ xt, "spmm_t": lambda: w.t() @ gt, "sddmm": lambda: gt @ xt.t()}


def triton_fns(tb, pb: Problem, dtype, cfg_rows, cfg_sddmm, orders):
    xt, gt = pb.xt[dtype], pb.gt[dtype]
    r_rpp, r_bk, r_bn, r_nw = cfg_rows
    s_rpp, s_be, s_bn, s_nw = cfg_sddmm
    out = torch.empty(pb.nnz, dtype=torch.float32, device=xt.device)
    kw = dict(check=False, rows_per_program=r_rpp, block_k=r_bk, block_n=r_bn, num_warps=r_nw)
    return {
        "spmm": lambda: tb.spmm(pb.indptr, pb.indices, pb.values, xt,
                                row_order=orders["w"], **kw),
        "spmm_t": lambda: tb.spmm_t(pb.t_indptr, pb.t_rows, pb.t_perm, pb.values, gt,
                                    row_order=orders["wt"], **kw),
        "sddmm": lambda: tb.sddmm(pb.indptr, pb.indices, gt, xt, out=out, check=False,
                                  row_order=orders["w"], rows_per_program=s_rpp,
                                  block_e=s_be, block_n=s_bn, num_warps=s_nw),
    }


def torch_csr_fns(tb, pb: Problem, dtype):
    xt, gt = pb.xt[dtype], pb.gt[dtype]
    w_csr = tb.to_torch_csr(pb.indptr, pb.indices, pb.values, (pb.out, pb.inn), dtype)
    wt_csr = tb.to_torch_csr(pb.t_indptr, pb.t_rows, pb.values[pb.t_perm], (pb.inn, pb.out),
                             dtype)
    return {"spmm": lambda: w_csr @ xt, "spmm_t": lambda: wt_csr @ gt,
            "sddmm": lambda: torch.sparse.sampled_addmm(w_csr, gt, xt.t(), beta=0.0)}


def set_tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

def meta(device, dry) -> dict:
    import triton
    m = {"device": str(device), "dry_run": dry, "python": platform.python_version(),
         "torch": torch.__version__, "triton": triton.__version__,
         "cuda": torch.version.cuda, "host": platform.node()}
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30,
                 capability=f"{p.major}.{p.minor}")
    try:
        m["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        m["commit"] = ""
    return m


def run_tests(dry, timeout_s) -> dict:
    """tests/test_triton.py compiled on CUDA (interpreted on the CPU in a dry run)."""
    env = dict(os.environ)
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env.pop("SPARSECORE_TRITON_COMPILED", None)
        cmd_k = ["-k", "index_dtypes"]  # the script check, not the test suite
    else:
        env.pop("TRITON_INTERPRET", None)
        env["SPARSECORE_TRITON_COMPILED"] = "1"
        cmd_k = []
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_triton.py"), *cmd_k]
    t = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout_s)
        res = {"rc": r.returncode, "tail": (r.stdout + r.stderr)[-3000:]}
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        res = {"rc": "timeout", "tail": out[-3000:]}
    res["seconds"] = round(time.time() - t, 1)
    print(f"tests/test_triton.py: rc={res['rc']} in {res['seconds']} s")
    print("\n".join(res["tail"].strip().splitlines()[-3:]))
    return res


def max_rel_err(got, ref) -> float:
    ref = ref.float()
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def tune(tb, timer, device, size, n, density, rows_cfgs, sddmm_cfgs, deadline):
    """Time each tile config on one shape (fp32 and bf16); best per product (bf16 time)."""
    pb = Problem(size, n, density, device)
    orders = {"w": tb.row_order(pb.indptr), "wt": tb.row_order(pb.t_indptr)}
    rec = []
    best = {}
    for prod, cfgs in (("spmm", rows_cfgs), ("spmm_t", rows_cfgs), ("sddmm", sddmm_cfgs)):
        for cfg in cfgs:
            if time.time() > deadline:
                break
            row = {"product": prod, "cfg": list(cfg)}
            for dt in (torch.float32, torch.bfloat16):
                fns = triton_fns(tb, pb, dt, cfg if prod != "sddmm" else rows_cfgs[0],
                                 cfg if prod == "sddmm" else sddmm_cfgs[0], orders)
                try:
                    row[str(dt).split(".")[1]] = timer(fns[prod])["ms"]
                except Exception as e:  # a config that does not compile/fit is skipped
                    row[str(dt).split(".")[1]] = f"n/a: {type(e).__name__}: {e}"[:300]
            rec.append(row)
            print(f"  tune {prod:6s} {cfg}: fp32 {row['float32']} bf16 {row['bfloat16']}")
            t = row["bfloat16"]
            if isinstance(t, float) and (prod not in best or t < best[prod][1]):
                best[prod] = (cfg, t)
    del pb
    return rec, {k: list(v[0]) for k, v in best.items()}


def bench_shape(tb, timer, device, size, n, densities, cfg, deadline, records):
    dense = {}
    pb = None
    for density in densities:
        if time.time() > deadline:
            records.append({"size": size, "n": n, "density": density,
                            "skipped": "time budget"})
            continue
        pb = Problem(size, n, density, device)
        if not dense:  # dense baselines once per (size, n): they do not depend on density
            for name, dt, tf32 in (("dense-fp32", torch.float32, False),
                                   ("dense-tf32", torch.float32, True),
                                   ("dense-bf16", torch.bfloat16, False)):
                set_tf32(tf32)
                for prod, fn in dense_fns(pb, dt).items():
                    t = timer(fn)
                    dense[(name, prod)] = t["ms"]
                    records.append({"product": prod, "backend": name, "size": size, "n": n,
                                    "density": 1.0, **t,
                                    "gflops": 2 * size * size * n / t["ms"] / 1e6})
            set_tf32(False)
        orders = {"w": tb.row_order(pb.indptr), "wt": tb.row_order(pb.t_indptr)}
        # correctness against the dense product of this very problem
        err = {}
        for dt in (torch.float32, torch.bfloat16):
            y = tb.spmm(pb.indptr, pb.indices, pb.values, pb.xt[dt], row_order=orders["w"])
            ref = pb.w[torch.float32] @ pb.xt[dt].float()
            err[dt] = max_rel_err(y, ref)
        backends = [("triton-fp32", torch.float32, "triton"),
                    ("triton-bf16", torch.bfloat16, "triton"),
                    ("torch-csr-fp32", torch.float32, "csr"),
                    ("torch-csr-bf16", torch.bfloat16, "csr")]
        for name, dt, kind in backends:
            try:
                fns = (triton_fns(tb, pb, dt, tuple(cfg["spmm"]), tuple(cfg["sddmm"]), orders)
                       if kind == "triton" else torch_csr_fns(tb, pb, dt))
            except Exception as e:
                fns = {p: e for p in PRODUCTS}
            for prod in PRODUCTS:
                rec = {"product": prod, "backend": name, "size": size, "n": n,
                       "density": density, "nnz": pb.nnz}
                if kind == "triton" and prod == "spmm":
                    rec["max_rel_err"] = err[dt]
                fn = fns[prod]
                try:
                    if isinstance(fn, Exception):
                        raise fn
                    if kind == "triton" and prod == "spmm_t":
                        fn = triton_fns(tb, pb, dt, tuple(cfg["spmm_t"]),
                                        tuple(cfg["sddmm"]), orders)["spmm_t"]
                    t = timer(fn)
                    rec.update(t, gflops=2 * pb.nnz * n / t["ms"] / 1e6)
                    for dn in ("dense-fp32", "dense-tf32", "dense-bf16"):
                        rec[f"speedup_vs_{dn}"] = dense[(dn, prod)] / t["ms"]
                except Exception as e:
                    rec["error"] = f"n/a: {type(e).__name__}: {e}"[:300]
                records.append(rec)
                sp = rec.get("speedup_vs_dense-bf16" if dt == torch.bfloat16
                             else "speedup_vs_dense-fp32")
                print(f"  {size:6d} n={n:5d} d={density:4.2f} {prod:6s} {name:15s} "
                      + (f"{rec['ms']:9.3f} ms {rec['gflops']:8.1f} GF/s x{sp:6.2f} vs dense"
                         if "ms" in rec else rec["error"][:100]))
        del pb
        if timer.cuda:
            torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --dry-run to check the script")
    from sparsecore.kernels import triton_backend as tb

    device = "cpu" if args.dry_run else "cuda"
    cfg = DRY if args.dry_run else dict(sizes=SIZES, ns=NS, densities=DENSITIES,
                                        tune_shape=TUNE_SHAPE, rows_cfgs=ROWS_CFGS,
                                        sddmm_cfgs=SDDMM_CFGS)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta(device, args.dry_run), "config": {k: v for k, v in cfg.items()}}
    print(json.dumps(result["meta"], indent=1))

    def save():
        out_path.write_text(json.dumps(result, indent=1, default=str))

    result["tests"] = ({"skipped": True} if args.skip_tests
                       else run_tests(args.dry_run, args.test_timeout_s))
    save()

    if args.dry_run:  # interpreted calls take ~0.2 s each: one timed call is enough
        args.min_reps, args.max_reps = 1, 1
    timer = Timer(device, args.min_reps, args.max_reps, args.target_s)
    start = time.time()
    deadline = start + args.budget_s
    set_tf32(False)
    size, n, density = cfg["tune_shape"]
    print(f"tuning on out=in={size}, n={n}, density={density}")
    result["tuning"], best = tune(tb, timer, device, size, n, density, cfg["rows_cfgs"],
                                  cfg["sddmm_cfgs"], start + 0.25 * args.budget_s)
    for prod, default in (("spmm", cfg["rows_cfgs"][0]), ("spmm_t", cfg["rows_cfgs"][0]),
                          ("sddmm", cfg["sddmm_cfgs"][0])):
        best.setdefault(prod, list(default))
    result["best_cfg"] = best
    print("best configs:", best)
    save()

    result["records"] = records = []
    for size in cfg["sizes"]:
        for n in cfg["ns"]:
            bench_shape(tb, timer, device, size, n, cfg["densities"], best, deadline, records)
            save()
    result["seconds"] = round(time.time() - start, 1)
    save()
    print(f"wrote {out_path} ({len(records)} records, {result['seconds']} s of timings)")


if __name__ == "__main__":
    main()
