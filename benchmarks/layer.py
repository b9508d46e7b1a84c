"""Layer-level training-step benchmark: TopKASTLinear vs dense nn.Linear vs masked-dense Top-KAST.

One training step = zero_grad + forward + backward (from a fixed upstream gradient,
including the input gradient dx, as for a layer inside a network) + AdamW step, batch n = 512, float32, on one (out x in) = 4096 x 4096 layer with bias.
Three implementations run in the *same process*, interleaved round by round so that
load from other users of the machine hits all of them alike:

* ``dense``:   torch.nn.Linear (the baseline of every ratio),
* ``masked``:  masked-dense Top-KAST, what peer libraries do: a dense weight W, a
  forward mask A and a backward mask B; y = x (W*A)^T + b, dW = (dy^T x)*B plus the
  exploration term; refresh = torch.topk over |W|. Same dense memory as ``dense``.
* ``sparse``:  sparsecore.TopKASTLinear (no dense tensor anywhere).

Reported (medians over rounds):
* speedup = dense step time / sparse step time (also masked / sparse),
* the sparse step broken into forward / backward / optimizer step, and the
  kernels inside them (spmm with the bias fused, spmm_t, and one sddmm call that
  serves A and B minus A, including the activation packing each kernel does; the
  remainder of forward/backward, "other", is autograd, the bias gradient and
  allocation: the layer makes no layout copies of its own),
* ``layer.refresh(opt)`` time and its share of training time amortised over
  ``refresh_every`` = 100 steps: refresh / (100 * sparse step), plus a cProfile
  breakdown of one refresh.

The refresh is called after every round (every ``--steps`` sparse steps), i.e. more
often than every 100 steps, so each refresh sees fewer changes than in real use.

Usage::

    python benchmarks/layer.py            # full run (a few minutes)
    python benchmarks/layer.py --quick    # subset, < 60 s
    OMP_WAIT_POLICY=PASSIVE python benchmarks/layer.py --tag omp_passive

Writes benchmarks/results/layer[_TAG].json (and .png unless --no-png).
"""
from __future__ import annotations

import os

# the OpenMP settings this process started with (recorded with the results: the wait
# policy decides timings on a shared machine, see docs/benchmarks.md)
_ENV_AT_START = {k: os.environ[k] for k in (
    "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER", "MKL_NUM_THREADS", "KMP_BLOCKTIME") if k in os.environ}

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402  (first, as user code does)
from torch import nn  # noqa: E402

import sparsecore as sc  # noqa: E402
from sparsecore import kernels as _kernels  # noqa: E402
from _common import pyplot, save_figure, tree_state  # noqa: E402

SPARSITIES = [(0.8, 0.5), (0.95, 0.9), (0.99, 0.98)]
TARGETS = {(0.8, 0.5): 2.5, (0.95, 0.9): 10.0, (0.99, 0.98): 30.0}
REFRESH_EVERY = 100
REFRESH_TARGET = 0.02
LR = 1e-3
ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS",
            "NUMBA_THREADING_LAYER", "MKL_NUM_THREADS", "KMP_BLOCKTIME")


# --------------------------------------------------------------- kernel timing hooks
class KernelTimer:
    """Wraps sparsecore.kernels.{spmm, spmm_t, sddmm} (the functions the autograd
    function calls) to accumulate their wall time; costs one perf_counter per call."""

    NAMES = ("spmm", "spmm_t", "sddmm")

    def __init__(self):
        self.acc: dict[str, float] = {}
        self._orig = {n: getattr(_kernels, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(_kernels, n, self._wrap(n, self._orig[n]))

    def _wrap(self, name, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            dt = time.perf_counter() - t0
            key = name  # one sddmm call serves A and B minus A (activations packed once)
            self.acc[key] = self.acc.get(key, 0.0) + dt
            return r
        return timed

    def take(self) -> dict:
        out, self.acc = self.acc, {}
        return out

    def restore(self):
        for n, f in self._orig.items():
            setattr(_kernels, n, f)


# --------------------------------------------------------------- masked-dense baseline
class _MaskedTopKASTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, mask_a, mask_b, coef):
        wa = w * mask_a
        ctx.save_for_backward(x, w, wa, mask_b, coef)
        return x @ wa.t()

    @staticmethod
    def backward(ctx, dy):
        x, w, wa, mask_b, coef = ctx.saved_tensors
        dx = dy @ wa
        dw = dy.t() @ x                 # dense gradient wrt the (masked) forward weight
        dw.mul_(mask_b).addcmul_(coef, w)   # keep B only, + exploration regulariser
        return dx, dw, None, None, None


class MaskedDenseTopKAST(nn.Module):
    """Top-KAST the way peer libraries implement it: dense W plus masks."""

    def __init__(self, in_f, out_f, forward_sparsity, backward_sparsity, exploration=1e-4):
        super().__init__()
        lin = nn.Linear(in_f, out_f)
        self.weight = nn.Parameter(lin.weight.detach().clone())
        self.bias = nn.Parameter(lin.bias.detach().clone())
        self.k_a, self.k_b = sc.topkast.sizes(in_f, out_f, forward_sparsity, backward_sparsity)
        self.lam = exploration
        self.density = 1.0 - forward_sparsity
        self.refresh()

    @torch.no_grad()
    def refresh(self, optimizer=None):
        mag = self.weight.detach().abs().flatten()
        ib = torch.topk(mag, self.k_b, sorted=True).indices
        mb = torch.zeros_like(mag)
        mb[ib] = 1.0
        ma = torch.zeros_like(mag)
        ma[ib[: self.k_a]] = 1.0
        shape = self.weight.shape
        self.mask_a, self.mask_b = ma.view(shape), mb.view(shape)
        self.coef = (self.lam * self.mask_a
                     + (self.lam / self.density) * (self.mask_b - self.mask_a))

    def forward(self, x):
        return _MaskedTopKASTFn.apply(x, self.weight, self.mask_a, self.mask_b, self.coef) + self.bias


# --------------------------------------------------------------- one timed step
def timed_step(mod, opt, x, dy, ktimer: KernelTimer | None) -> dict:
    opt.zero_grad(set_to_none=True)
    x.grad = None
    if ktimer is not None:
        ktimer.take()
    t0 = time.perf_counter()
    y = mod(x)
    t1 = time.perf_counter()
    y.backward(dy)
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    r = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}
    if ktimer is not None:
        r.update(ktimer.take())
    return r


def med(xs):
    return float(statistics.median(xs)) if xs else math.nan


def profile_refresh(layer, opt) -> dict:
    """cProfile one refresh; cumulative seconds of the interesting callees."""
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    layer.refresh(opt)
    pr.disable()
    total = time.perf_counter() - t0
    st = pstats.Stats(pr)
    want = {  # (file suffix, function) -> label
        ("topkast.py", "refresh"): "topkast.refresh (pure refresh, total)",
        ("select.py", "topk_thresholds"): "  thresholds (select over the pool)",
        ("pool.py", "tie_flats_sorted"): "  tie lookup",
        ("pool.py", "split_pool"): "  split (parallel, total)",
        ("pool.py", "_split_counts"): "    split counts",
        ("pool.py", "_split_write"): "    split write",
        ("pool.py", "split_rows"): "  split_rows (serial fallback)",
        ("init.py", "scan"): "  replenish scan",
        ("spill.py", "replenish_pass"): "  cold store read-back",
        ("spill.py", "rewrite"): "  cold store rewrite",
        ("state.py", "_transpose"): "new state: transpose of A",
        ("layers.py", "remap_tensor"): "optimizer/grad state remap",
        ("pool.py", "gather_or_zero"): "  gather_or_zero",
    }
    out: dict[str, float] = {"total": total}
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        for (suffix, f), label in want.items():
            if func == f and fname.endswith(suffix):
                out[label] = out.get(label, 0.0) + ct
    return out


# --------------------------------------------------------------- one configuration
def bench_config(sf, sb, *, in_f, out_f, n, rounds, steps, with_masked, seed=0, log=print):
    torch.manual_seed(seed)
    # x requires grad: the layer sits inside a network, so dx (spmm_t) is computed too
    x = torch.randn(n, in_f).requires_grad_(True)
    dy = torch.randn(n, out_f) / math.sqrt(n * out_f)

    t0 = time.perf_counter()
    sparse = sc.TopKASTLinear(in_f, out_f, forward_sparsity=sf, backward_sparsity=sb, seed=seed)
    build_s = time.perf_counter() - t0
    dense = nn.Linear(in_f, out_f)
    mods = {"dense": dense, "sparse": sparse}
    if with_masked:
        mods["masked"] = MaskedDenseTopKAST(in_f, out_f, sf, sb)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=LR) for k, m in mods.items()}
    ktimer = KernelTimer()
    try:
        # warm-up (Numba compile / cache load, allocator, optimizer state creation)
        for k in mods:
            for _ in range(2):
                timed_step(mods[k], opts[k], x, dy, ktimer if k == "sparse" else None)
        sparse.refresh(opts["sparse"])
        if with_masked:
            mods["masked"].refresh()

        per = {k: [] for k in mods}            # per-round median step records
        refresh_s, masked_refresh_s, replenished = [], [], 0
        changed_a = []
        order = list(mods)
        for r in range(rounds):
            order = order[1:] + order[:1]       # rotate who goes first
            for k in order:
                recs = [timed_step(mods[k], opts[k], x, dy, ktimer if k == "sparse" else None)
                        for _ in range(steps)]
                per[k].append({f: med([rc.get(f, 0.0) for rc in recs]) for f in recs[0]})
            t0 = time.perf_counter()
            info = sparse.refresh(opts["sparse"])
            refresh_s.append(time.perf_counter() - t0)
            replenished += info["replenished"]
            changed_a.append(float(info["changed_a"]))
            if with_masked:
                t0 = time.perf_counter()
                mods["masked"].refresh()
                masked_refresh_s.append(time.perf_counter() - t0)
        for _ in range(steps):  # profile a refresh that has something to do
            timed_step(sparse, opts["sparse"], x, dy, ktimer)
        prof = profile_refresh(sparse, opts["sparse"])
    finally:
        ktimer.restore()

    def summary(k):
        fields = per[k][0].keys()
        return {f: med([rr[f] for rr in per[k]]) for f in fields}

    res = {
        "forward_sparsity": sf, "backward_sparsity": sb, "k_a": sparse.k_a, "k_b": sparse.k_b,
        "pool_size": sparse.pool_size(), "build_s": build_s,
        "dense": summary("dense"), "sparse": summary("sparse"),
        "speedup_vs_dense": med([d["step"] / s["step"] for d, s in zip(per["dense"], per["sparse"])]),
        "speedup_per_round": [d["step"] / s["step"] for d, s in zip(per["dense"], per["sparse"])],
        "target_speedup": TARGETS.get((sf, sb)),
        "refresh_s_median": med(refresh_s), "refresh_s_max": max(refresh_s),
        "refresh_s_all": refresh_s, "refresh_replenishes": replenished,
        "refresh_fraction": med(refresh_s) / (REFRESH_EVERY * summary("sparse")["step"]),
        "refresh_fraction_of_dense_step": med(refresh_s) / (REFRESH_EVERY * summary("dense")["step"]),
        "refresh_profile": prof,
        "refresh_changed_a": changed_a,
        "flops_forward": 2 * n * sparse.k_a,
        "flops_backward": 2 * n * sparse.k_a + 2 * n * sparse.k_b,
    }
    if with_masked:
        res["masked"] = summary("masked")
        res["speedup_vs_masked"] = med([m["step"] / s["step"]
                                        for m, s in zip(per["masked"], per["sparse"])])
        res["masked_refresh_s_median"] = med(masked_refresh_s)
    return res


# --------------------------------------------------------------- output
def fmt_ms(s):
    return f"{1e3 * s:8.1f}"


def print_tables(results, meta):
    print(f"\nLayer {meta['out_features']}x{meta['in_features']}, batch n={meta['batch']}, "
          f"float32, AdamW; {meta['rounds']} rounds x {meta['steps_per_round']} steps; "
          f"torch threads {meta['torch_threads']}, numba threads {meta['numba_threads']} "
          f"({meta['numba_threading_layer']}); env at start {meta['env']}, "
          f"after import {meta['env_after_import']}")
    print("\nStep time relative to dense (median of per-round ratios):")
    hdr = f"{'S_f/S_b':>10} {'K_A':>9} {'K_B':>9} {'dense/sparse':>13} {'target':>7} {'met':>4}"
    hdr += f" {'masked/sparse':>14} {'dense/masked':>13}"
    print(hdr)
    for r in results:
        tgt = r["target_speedup"]
        met = "yes" if tgt is not None and r["speedup_vs_dense"] >= tgt else "no"
        line = (f"{r['forward_sparsity']:.2f}/{r['backward_sparsity']:.2f} {r['k_a']:>9} "
                f"{r['k_b']:>9} {r['speedup_vs_dense']:>12.2f}x {tgt:>6.1f}x {met:>4}")
        if "masked" in r:
            line += (f" {r['speedup_vs_masked']:>13.2f}x "
                     f"{r['dense']['step'] / r['masked']['step']:>12.2f}x")
        print(line)

    print("\nWhere the time goes, ms per step (medians; absolute times are from a shared,"
          " noisy machine: compare within a row):")
    print(f"{'S_f/S_b':>10} {'impl':>7} {'fwd':>8} {'bwd':>8} {'opt':>8} {'step':>8}"
          f" | {'spmm':>7} {'spmm_t':>7} {'sddmm B':>8} {'other':>7} {'other%':>7}")
    for r in results:
        lab = f"{r['forward_sparsity']:.2f}/{r['backward_sparsity']:.2f}"
        for impl in ("dense", "masked", "sparse"):
            if impl not in r:
                continue
            d = r[impl]
            line = (f"{lab:>10} {impl:>7} {fmt_ms(d['forward'])} {fmt_ms(d['backward'])} "
                    f"{fmt_ms(d['optimizer'])} {fmt_ms(d['step'])}")
            if impl == "sparse":
                kern = sum(d.get(k, 0.0) for k in ("spmm", "spmm_t", "sddmm"))
                other = d["forward"] + d["backward"] - kern
                line += (f" | {1e3 * d.get('spmm', 0):7.1f} {1e3 * d.get('spmm_t', 0):7.1f} "
                         f"{1e3 * d.get('sddmm', 0):8.1f} {1e3 * other:7.1f} "
                         f"{other / d['step']:7.1%}")
            print(line)

    print("\nSparse kernel throughput (GFLOP/s, 2 flops per multiply-add; medians):")
    print(f"{'S_f/S_b':>10} {'spmm':>7} {'spmm_t':>7} {'sddmm B':>8} {'dense step':>11}")
    for r in results:
        d, n = r["sparse"], meta["batch"]
        fl_a, fl_b = 2 * n * r["k_a"], 2 * n * r["k_b"]
        g = lambda fl, t: fl / t / 1e9 if t else math.nan  # noqa: E731
        dense_fl = 3 * 2 * n * meta["in_features"] * meta["out_features"]
        dd = r["dense"]
        print(f"{r['forward_sparsity']:.2f}/{r['backward_sparsity']:.2f} "
              f"{g(fl_a, d.get('spmm')):7.1f} {g(fl_a, d.get('spmm_t')):7.1f} "
              f"{g(fl_b, d.get('sddmm')):8.1f} "
              f"{g(dense_fl, dd['forward'] + dd['backward']):11.1f}")

    print(f"\nRefresh (layer.refresh(opt)), amortised over refresh_every={REFRESH_EVERY} "
          f"(target <= {REFRESH_TARGET:.0%} of training time):")
    print(f"{'S_f/S_b':>10} {'refresh ms':>11} {'max ms':>8} {'replen.':>8} "
          f"{'refresh/step':>13} {'fraction':>9} {'met':>4} {'masked topk ms':>15}")
    for r in results:
        met = "yes" if r["refresh_fraction"] <= REFRESH_TARGET else "no"
        print(f"{r['forward_sparsity']:.2f}/{r['backward_sparsity']:.2f} "
              f"{1e3 * r['refresh_s_median']:11.1f} {1e3 * r['refresh_s_max']:8.1f} "
              f"{r['refresh_replenishes']:>8} "
              f"{r['refresh_s_median'] / r['sparse']['step']:12.1f}x "
              f"{r['refresh_fraction']:9.2%} {met:>4} "
              f"{1e3 * r.get('masked_refresh_s_median', math.nan):15.1f}")
    print("\nOne refresh under cProfile (ms, cumulative per callee):")
    for r in results:
        p = r["refresh_profile"]
        parts = ", ".join(f"{k.strip()} {1e3 * v:.0f}" for k, v in p.items() if k != "total")
        print(f"  {r['forward_sparsity']:.2f}/{r['backward_sparsity']:.2f}: total "
              f"{1e3 * p['total']:.0f}: {parts}")


def plot(results, path):
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{r['forward_sparsity']:.2f}/{r['backward_sparsity']:.2f}" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    xs = np.arange(len(results))
    w = 0.38
    ax.bar(xs - w / 2, [r["speedup_vs_dense"] for r in results], w, label="measured dense/sparse")
    ax.bar(xs + w / 2, [r["target_speedup"] for r in results], w, label="target", alpha=0.5)
    if all("masked" in r for r in results):
        ax.plot(xs, [r["speedup_vs_masked"] for r in results], "ko--", label="masked-dense/sparse")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("S_f / S_b")
    ax.set_ylabel("training-step speedup (x)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("4096x4096, n=512: step speedup vs dense nn.Linear")
    ax = axes[1]
    parts = [("spmm (fwd)", lambda d: d.get("spmm", 0)),
             ("fwd other", lambda d: d["forward"] - d.get("spmm", 0)),
             ("spmm_t", lambda d: d.get("spmm_t", 0)),
             ("sddmm (B)", lambda d: d.get("sddmm", 0)),
             ("bwd other", lambda d: d["backward"] - sum(d.get(k, 0) for k in
                                                        ("spmm_t", "sddmm"))),
             ("AdamW step", lambda d: d["optimizer"])]
    refresh = [r["refresh_s_median"] / REFRESH_EVERY / r["dense"]["step"] for r in results]
    bottom = np.zeros(len(results))
    for name, f in parts:
        vals = np.array([max(0.0, f(r["sparse"])) / r["dense"]["step"] for r in results])
        ax.bar(xs, vals, 0.6, bottom=bottom, label=name)
        bottom += vals
    ax.bar(xs, refresh, 0.6, bottom=bottom, label="refresh / 100", hatch="//")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("S_f / S_b")
    ax.set_ylabel("sparse step time / dense step time")
    ax.set_title("Sparse step breakdown (fraction of a dense step)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subset (< 60 s)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round and impl")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--no-masked", action="store_true", help="skip the masked-dense baseline")
    ap.add_argument("--only", nargs="*", metavar="SF/SB",
                    help="run only these sparsity pairs, e.g. --only 0.99/0.98")
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    rounds = a.rounds or (3 if a.quick else 9)
    steps = a.steps or (2 if a.quick else 3)
    sparsities = SPARSITIES[1:] if a.quick else SPARSITIES
    if a.only:
        want = {tuple(float(v) for v in o.split("/")) for o in a.only}
        sparsities = [p for p in SPARSITIES if p in want] or sorted(want)
    with_masked = not a.no_masked

    import numba
    meta = {
        "in_features": a.features, "out_features": a.features, "batch": a.batch,
        "dtype": "float32", "optimizer": f"AdamW(lr={LR})", "rounds": rounds,
        "steps_per_round": steps, "quick": a.quick, "refresh_every": REFRESH_EVERY,
        "torch": torch.__version__, "numba": numba.__version__,
        "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
        "env": _ENV_AT_START,
        "env_after_import": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_avg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tree": tree_state(),
    }
    t_start = time.perf_counter()
    results = []
    for sf, sb in sparsities:
        print(f"[{time.perf_counter() - t_start:6.1f}s] S_f={sf} S_b={sb} ...", flush=True)
        results.append(bench_config(sf, sb, in_f=a.features, out_f=a.features, n=a.batch,
                                    rounds=rounds, steps=steps, with_masked=with_masked))
    meta["numba_threading_layer"] = numba.threading_layer()
    meta["load_avg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    print_tables(results, meta)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "layer" + ("_quick" if a.quick else "") + (f"_{a.tag}" if a.tag else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwrote {out / (stem + '.json')}  ({meta['wall_s']:.0f} s)")
    if not a.no_png:
        plot(results, out / f"{stem}.png")


if __name__ == "__main__":
    main()
