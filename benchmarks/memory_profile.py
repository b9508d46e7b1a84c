"""Peak memory of one Top-KAST layer: measured RSS vs the analytic model vs dense.

Every configuration runs in a fresh subprocess that

1. imports torch and sparsecore and compiles/loads every kernel on a tiny layer
   (build, forward, backward, AdamW step, refresh) -- the *baseline* work;
2. builds the layer through the public API: ``nn.Sequential(nn.Linear(in, out))``
   created on the meta device, wrapped in ``sc.SparseModel`` (so no dense weight
   can exist), then runs a few AdamW steps (forward + backward including dx) on a
   batch of n rows and one ``layer.refresh(opt)``;
3. reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after each phase (build,
   steps, refresh), the current RSS at the end, the bytes of every tensor the layer
   and the optimizer hold, and ``SparseModel.memory_report(opt)``.

A baseline subprocess does step 1 only; its peak RSS is subtracted. For sizes that
fit in RAM, a dense nn.Linear child (same steps, no sparsecore kernels after the
warm-up) checks the dense model 16*out*in bytes and the RSS method itself.

Analytic model (float32 values, int32 columns, int64 pointers), per layer:

* values + grad + AdamW exp_avg + exp_avg_sq on B:        16 K_B
* CSR of A and of B minus A: 2 int64 indptr + int32 cols: 16 (out+1) + 4 K_B
* transpose of A: int64 indptr over in, int32 rows, int64 perm: 8 (in+1) + 12 K_A
* reserve, int64 flat index + float32 value:              12 R,  R = ceil(reserve K_B)
* bias (param, grad, 2 Adam states):                      16 out
* activations alive during backward: x, x^T (saved), dx^T, dx (in-sized) and
  y, dy, dy^T (out-sized):                                4 n (4 in + 3 out)

Dense equivalent: 16 out in (weight, grad, two Adam states) + the same bias and
activations. Usage::

    python benchmarks/memory_profile.py            # all configurations (several minutes)
    python benchmarks/memory_profile.py --quick    # skips the huge layers

Writes benchmarks/results/memory[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _common import pyplot, tree_state  # noqa: E402
from sparsecore.topkast import sizes  # noqa: E402  (K_A, K_B exactly as the engine)
MiB = 1024.0 ** 2
RESERVE = 0.25  # TopKASTLinear default; the analytic model uses it

# (name, in, out, S_f, S_b, batch n, steps, kind)
CONFIGS = [
    ("4k-80/50", 4096, 4096, 0.8, 0.5, 512, 3, "sparse"),
    ("4k-95/90", 4096, 4096, 0.95, 0.9, 512, 3, "sparse"),
    ("4k-99/98", 4096, 4096, 0.99, 0.98, 512, 3, "sparse"),
    ("4k-dense", 4096, 4096, None, None, 512, 3, "dense"),
    ("16k-99/98", 16384, 16384, 0.99, 0.98, 64, 3, "sparse"),
    ("16k-dense", 16384, 16384, None, None, 64, 3, "dense"),
    ("64k-99.9/99.8", 65536, 65536, 0.999, 0.998, 16, 3, "sparse"),
    ("100k-99.999/99.998", 100_000, 100_000, 0.99999, 0.99998, 16, 3, "sparse"),
]
QUICK = {"4k-95/90", "4k-99/98", "4k-dense", "16k-99/98"}


# ---------------------------------------------------------------------------- model
def analytic(in_f, out_f, sf, sb, n, reserve=RESERVE):
    """Bytes by item of the steady state (after a step and a refresh)."""
    act = 4 * n * (4 * in_f + 3 * out_f)
    bias = 16 * out_f
    if sf is None:
        return {"dense weight+grad+adam": 16 * in_f * out_f, "bias": bias, "activations": act}
    k_a, k_b = sizes(in_f, out_f, sf, sb)
    r = math.ceil(reserve * k_b)
    return {
        "values+grad+adam (16 K_B)": 16 * k_b,
        "CSR A, B-A (16(out+1) + 4 K_B)": 16 * (out_f + 1) + 4 * k_b,
        "A^T (8(in+1) + 12 K_A)": 8 * (in_f + 1) + 12 * k_a,
        "reserve (12 R)": 12 * r,
        "bias": bias,
        "activations": act,
    }


# ---------------------------------------------------------------------------- child
def _rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _tensor_bytes(ts):
    seen, total = set(), 0
    for t in ts:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _steps(mod, opt, x, dy, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x.grad = None
        y = mod(x)
        y.backward(dy)
        opt.step()
    return y


def child(spec: dict) -> dict:
    import sparsecore as sc  # before torch: see the OpenMP note in docs
    import torch
    from torch import nn

    torch.manual_seed(0)
    # 1. baseline work: compile / load every kernel on a tiny layer
    tiny = sc.TopKASTLinear(256, 192, forward_sparsity=0.9, backward_sparsity=0.8)
    topt = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    xt = torch.randn(8, 256, requires_grad=True)
    _steps(tiny, topt, xt, torch.randn(8, 192), 2)
    tiny.refresh(topt)
    dn = nn.Linear(64, 64)
    dopt = torch.optim.AdamW(dn.parameters(), lr=1e-3)
    _steps(dn, dopt, torch.randn(4, 64, requires_grad=True), torch.randn(4, 64), 2)
    del tiny, topt, xt, dn, dopt
    out = {"peak_baseline_work": _peak(), "rss_after_warmup": _rss_now()}
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_after_warmup_trimmed"] = _rss_now()
    except OSError:
        out["rss_after_warmup_trimmed"] = out["rss_after_warmup"]
    if spec["kind"] == "baseline":
        out["peak_end"] = out["peak_baseline_work"]
        return out

    in_f, out_f, n = spec["in"], spec["out"], spec["n"]
    t0 = time.perf_counter()
    if spec["kind"] == "dense":
        mod = nn.Linear(in_f, out_f)
        layer = mod
    else:
        with torch.device("meta"):
            net = nn.Sequential(nn.Linear(in_f, out_f))
        mod = sc.SparseModel(net, forward_sparsity=spec["sf"], backward_sparsity=spec["sb"],
                             seed=0)
        layer = next(iter(mod.sparse_layers().values()))
    out["build_s"] = time.perf_counter() - t0
    out["peak_after_build"] = _peak()

    opt = torch.optim.AdamW(mod.parameters(), lr=spec["lr"])
    x = torch.randn(n, in_f, requires_grad=True)
    dy = torch.randn(n, out_f) / math.sqrt(n * out_f)
    t0 = time.perf_counter()
    y = _steps(mod, opt, x, dy, spec["steps"])
    out["steps_s"] = time.perf_counter() - t0
    out["peak_after_steps"] = _peak()
    if spec["kind"] == "sparse":
        t0 = time.perf_counter()
        info = layer.refresh(opt)
        out["refresh_s"] = time.perf_counter() - t0
        out["refresh_info"] = {k: float(v) for k, v in info.items()}
        out["peak_after_refresh"] = _peak()
        out["k_a"], out["k_b"], out["pool"] = layer.k_a, layer.k_b, layer.pool_size()
        out["reserve_entries"] = int(layer.sparse_state.n_reserve)
        rep = mod.memory_report(opt)
        out["memory_report"] = {k: float(v) for k, v in rep.items()}
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    params = list(layer.parameters())
    out["counted"] = {
        "parameters": _tensor_bytes(params),
        "gradients": _tensor_bytes([p.grad for p in params]),
        "optimizer_state": _tensor_bytes(state),
        "buffers (indices, reserve)": _tensor_bytes(list(layer.buffers())),
        "activations (x, dx, y, dy)": _tensor_bytes([x, x.grad, y, dy]),
    }
    out["rss_end"] = _rss_now()
    out["peak_end"] = _peak()
    try:  # give freed heap pages back: what stays is live memory, not allocator retention
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_end_trimmed"] = _rss_now()
    except OSError:
        out["rss_end_trimmed"] = out["rss_end"]
    return out


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    if p.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------- report
def fmt(b):
    b = float(b)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def print_table(rows, base):
    print(f"\nBaseline (import torch + sparsecore, kernels compiled): peak RSS "
          f"{fmt(base['peak_end'])}; all numbers below are peak RSS minus that baseline.")
    print(f"\n{'config':<20} {'K_B':>9} {'n':>4} {'analytic':>11} {'counted':>11} "
          f"{'RSS end':>11} {'trimmed':>11} {'peak RSS':>11} {'peak/anal.':>10} {'dense equiv':>12} "
          f"{'peak/dense':>10} {'max rise in':>11}")
    for r in rows:
        m = r["measured"]
        dense_eq = r["dense_equivalent_bytes"]
        print(f"{r['name']:<20} {r.get('k_b', '-')!s:>9} {r['n']:>4} "
              f"{fmt(r['analytic_total']):>11} {fmt(r['counted_total']):>11} "
              f"{fmt(m['rss_end_delta']):>11} {fmt(m['rss_end_trimmed_delta']):>11} "
              f"{fmt(m['peak_delta']):>11} "
              f"{m['peak_delta'] / r['analytic_total']:>9.2f}x {fmt(dense_eq):>12} "
              f"{m['peak_delta'] / dense_eq:>10.2e} {m['peak_phase']:>11}")
    print("\nanalytic = the model in this file's docstring (state + activations); counted = "
          "bytes of the tensors the layer, optimizer and step hold at the end; RSS end = "
          "current RSS after the refresh; trimmed = the same after malloc_trim(0) (freed heap "
          "returned); max rise in = build / steps / refresh, whichever raised the peak most; "
          "dense equiv = 16*out*in + bias + the same activations.")
    print("\nWeight state only (no activations): analytic vs memory_report() vs dense 16*out*in")
    print(f"{'config':<20} {'analytic':>11} {'memory_report':>14} {'dense 16N':>12} {'ratio':>9}"
          f" {'build s':>8} {'refresh s':>9} {'replen.':>7}")
    for r in rows:
        if r["kind"] != "sparse":
            continue
        a = r["analytic_total"] - r["analytic"]["activations"]
        mr = r.get("memory_report", {}).get("total", math.nan)
        d = 16 * r["in"] * r["out"]
        print(f"{r['name']:<20} {fmt(a):>11} {fmt(mr):>14} {fmt(d):>12} {a / d:>9.2e}"
              f" {r['build_s']:>8.1f} {r.get('refresh_s', math.nan):>9.1f}"
              f" {int(r.get('refresh_info', {}).get('replenished', 0)):>7}")


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in rows if r["kind"] == "sparse"]
    names = [r["name"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    w = 0.2
    ax.bar([x - 1.5 * w for x in xs], [r["analytic_total"] / MiB for r in rows], w,
           label="analytic (state + activations)")
    ax.bar([x - 0.5 * w for x in xs], [r["measured"]["rss_end_delta"] / MiB for r in rows], w,
           label="RSS at end - baseline")
    ax.bar([x + 0.5 * w for x in xs], [r["measured"]["peak_delta"] / MiB for r in rows], w,
           label="peak RSS - baseline")
    ax.bar([x + 1.5 * w for x in xs], [r["dense_equivalent_bytes"] / MiB for r in rows], w,
           label="dense equivalent (16 out in + act.)", color="grey")
    ax.axhline(24 * 1024, color="r", ls="--", lw=1, label="machine RAM (24 GiB)")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=15, fontsize=8)
    ax.set_ylabel("MiB (log)")
    ax.set_title("One TopKASTLinear trained with AdamW: memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the huge layers")
    ap.add_argument("--only", nargs="*", help="config names to run")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        res = child(json.loads(a.child))
        print("RESULT " + json.dumps(res), flush=True)
        return

    t_start = time.perf_counter()
    cfgs = [c for c in CONFIGS if (not a.quick or c[0] in QUICK) and (not a.only or c[0] in a.only)]
    print("baseline child ...", flush=True)
    base = run_child({"kind": "baseline"}, a.timeout)
    rows = []
    for name, in_f, out_f, sf, sb, n, steps, kind in cfgs:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name} ...", flush=True)
        spec = {"kind": kind, "in": in_f, "out": out_f, "sf": sf, "sb": sb, "n": n,
                "steps": steps, "lr": a.lr}
        res = run_child(spec, a.timeout)
        anal = analytic(in_f, out_f, sf, sb, n)
        peaks = {"build": res["peak_after_build"], "steps": res["peak_after_steps"],
                 "refresh": res.get("peak_after_refresh", res["peak_after_steps"])}
        prev, phase = res["peak_baseline_work"], "baseline"
        for ph, v in peaks.items():  # the phase during which the peak grew the most
            if v - prev > 0 and (phase == "baseline" or v - prev > best):
                phase, best = ph, v - prev
            prev = max(prev, v)
        row = {
            "name": name, "kind": kind, "in": in_f, "out": out_f, "sf": sf, "sb": sb, "n": n,
            "steps": steps, **{k: v for k, v in res.items() if not k.startswith("peak")},
            "peaks": {k: v for k, v in res.items() if k.startswith("peak")},
            "analytic": anal, "analytic_total": sum(anal.values()),
            "counted_total": sum(res["counted"].values()),
            "dense_equivalent_bytes": 16 * in_f * out_f + anal["bias"] + anal["activations"],
            "measured": {
                "peak_delta": res["peak_end"] - base["peak_end"],
                "rss_end_delta": res["rss_end"] - base["rss_after_warmup"],
                "rss_end_trimmed_delta": (res["rss_end_trimmed"]
                                          - base["rss_after_warmup_trimmed"]),
                "peak_phase": phase,
                "peak_delta_by_phase": {ph: v - base["peak_end"] for ph, v in peaks.items()},
            },
        }
        rows.append(row)
        m = row["measured"]
        print(f"    peak-baseline {fmt(m['peak_delta'])}, analytic {fmt(row['analytic_total'])}, "
              f"dense equiv {fmt(row['dense_equivalent_bytes'])} ({res['wall_s']:.0f} s)",
              flush=True)
    print_table(rows, base)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "memory" + ("_quick" if a.quick else "")
    meta = {"baseline": base, "lr": a.lr, "reserve": RESERVE,
            "wall_s": time.perf_counter() - t_start, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": sys.version.split()[0], "tree": tree_state()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"\nwrote {out / (stem + '.json')}  ({meta['wall_s']:.0f} s)")
    if not a.no_png:
        plot(rows, out / f"{stem}.png")


if __name__ == "__main__":
    main()
