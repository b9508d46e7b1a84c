"""Whole-model step time: a decoder transformer (sparsecore.models.gpt) sparse vs dense,
plus the import-order A/B.

Model mode (default): GPTConfig(d_model=1024, context=256, heads=8, layers=--layers,
vocab=256), batch --batch sequences of 256 tokens, AdamW, float32. For each
(S_f, S_b) in 80/50, 90/80, 95/90, 99/98 the sparse model (build_model(cfg, ...)) and
the same architecture dense run in *one process*, interleaved round by round; reported:
dense step / sparse step (median of per-round ratios), and the same ratio with one
``model.refresh()`` amortised over refresh_every in {1, 10, 100} steps.

Import-order mode (``--import-order``): the step of one 4096x4096 TopKASTLinear
(n = 512, 99/98), of a small MLP (784-1024-1024-10 at 90/80, batch 128) and, as the
control, of the same MLP dense (torch only), in three cases, each in a fresh
subprocess: torch imported first, sparsecore imported first, and
OMP_WAIT_POLICY=PASSIVE set in the environment; rounds alternate the cases.
``--load K`` runs K busy-looping processes beside the measurement (an oversubscribed
machine, where OpenMP's wait policy matters).

Usage::

    python benchmarks/step_time.py [--quick]
    python benchmarks/step_time.py --import-order [--quick] [--load K]

Writes benchmarks/results/step_time[_quick].json / import_order[_quick][_loadK].json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r'''
import os, sys, time, statistics, warnings
warnings.simplefilter("ignore")
case, what = sys.argv[1], sys.argv[2]
if case == "torch_first":
    import torch
    import sparsecore as sc
else:
    import sparsecore as sc
    import torch
import numba
torch.manual_seed(0)
if what == "layer":
    n, N = 512, 4096
    mod = sc.TopKASTLinear(N, N, forward_sparsity=0.99, backward_sparsity=0.98)
    x = torch.randn(n, N).requires_grad_(True)
    fwd = lambda: mod(x)
elif what == "dense_mlp":
    mod = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    x = torch.randn(128, 784)
    yl = torch.randint(0, 10, (128,))
    fwd = lambda: torch.nn.functional.cross_entropy(mod(x), yl)
else:
    net = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    mod = sc.SparseModel(net, forward_sparsity=0.9, backward_sparsity=0.8, verbose=False)
    x = torch.randn(128, 784)
    yl = torch.randint(0, 10, (128,))
    fwd = lambda: torch.nn.functional.cross_entropy(mod(x), yl)
opt = torch.optim.AdamW(mod.parameters(), lr=1e-3)
def step():
    opt.zero_grad(set_to_none=True)
    t = time.perf_counter()
    y = fwd()
    (y.sum() if y.dim() else y).backward()
    opt.step()
    return time.perf_counter() - t
for _ in range(3):
    step()
ts = [step() for _ in range(int(sys.argv[3]))]
try:
    layer = numba.threading_layer()
except ValueError:   # no parallel Numba region ran (the dense control)
    layer = "none"
print(statistics.median(ts), layer)
'''


def import_order(quick: bool, load: int) -> dict:
    cases = ["torch_first", "sparsecore_first", "env_passive"]
    whats = ("layer", "mlp", "dense_mlp")
    rounds = 3 if quick else 5
    steps = 5 if quick else 10
    res = {w: {c: [] for c in cases} for w in whats}
    layer_used = {}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        _import_order_rounds(cases, whats, rounds, steps, res, layer_used)
    finally:
        for h in hogs:
            h.kill()
    summary = {}
    print(f"\nImport order, {load} busy processes beside (median step ms over fresh "
          "subprocesses; ratio to env_passive):")
    for what in res:
        med = {c: statistics.median(v) for c, v in res[what].items()}
        summary[what] = {c: {"ms": 1e3 * m, "over_env_passive": m / med["env_passive"]}
                         for c, m in med.items()}
        print(f"  {what:9}: " + ", ".join(f"{c} {1e3 * m:.1f} ms ({m / med['env_passive']:.2f}x)"
                                          for c, m in med.items()))
    print(f"  numba threading layer: {layer_used}")
    return {"summary": summary, "raw_s": res, "threading_layer": layer_used, "load": load,
            "load_avg": os.getloadavg()}


def _import_order_rounds(cases, whats, rounds, steps, res, layer_used):
    for r in range(rounds):
        for what in whats:
            for c in (cases if r % 2 == 0 else cases[::-1]):
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                env.pop("OMP_WAIT_POLICY", None)
                if c == "env_passive":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                out = subprocess.run([sys.executable, "-c", CHILD, "torch_first" if c == "env_passive" else c,
                                      what, str(steps)], env=env, capture_output=True, text=True,
                                     timeout=600)
                if out.returncode:
                    raise RuntimeError(out.stderr[-2000:])
                t, layer = out.stdout.split()
                res[what][c].append(float(t))
                layer_used[f"{what}/{c}"] = layer


def model_steps(quick: bool, layers: int, batch: int) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    warnings.simplefilter("ignore")
    from sparsecore.models.gpt import GPTConfig, build_model
    cfg = GPTConfig(d_model=1024, context=256, heads=8, layers=layers, vocab=256)
    pairs = [(0.8, 0.5), (0.9, 0.8), (0.95, 0.9), (0.99, 0.98)]
    if quick:
        pairs = [(0.9, 0.8), (0.99, 0.98)]
    rounds = 3 if quick else 5
    steps = 2
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (batch, 256), generator=g)
    tgt = torch.randint(0, 256, (batch, 256), generator=g)

    def make_step(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            t = time.perf_counter()
            logits = model(idx)
            torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tgt.reshape(-1)).backward()
            opt.step()
            return time.perf_counter() - t
        return step

    dense = build_model(cfg, dense=True)
    dstep = make_step(dense, torch.optim.AdamW(dense.parameters(), lr=1e-4))
    for _ in range(2):
        dstep()
    out = []
    print(f"\nGPT d_model=1024 layers={layers} context=256 batch={batch} "
          f"({batch * 256} tokens), AdamW; dense/sparse step time:")
    print(f"{'S_f/S_b':>10} {'dense ms':>9} {'sparse ms':>10} {'refresh ms':>11} "
          f"{'no refresh':>11} {'every 100':>10} {'every 10':>9} {'every 1':>8}")
    for sf, sb in pairs:
        sparse = build_model(cfg, forward_sparsity=sf, backward_sparsity=sb, refresh_every=10 ** 9)
        sopt = torch.optim.AdamW(sparse.parameters(), lr=1e-4)
        sparse.attach(sopt)
        sstep = make_step(sparse, sopt)
        for _ in range(2):
            sstep()
        d_t, s_t, r_t = [], [], []
        for r in range(rounds):
            a = [dstep() for _ in range(steps)]
            b = [sstep() for _ in range(steps)]
            t0 = time.perf_counter()
            sparse.refresh()
            r_t.append(time.perf_counter() - t0)
            d_t.append(statistics.median(a))
            s_t.append(statistics.median(b))
        rec = {"forward_sparsity": sf, "backward_sparsity": sb,
               "dense_ms": 1e3 * statistics.median(d_t), "sparse_ms": 1e3 * statistics.median(s_t),
               "refresh_ms": 1e3 * statistics.median(r_t),
               "speedup": statistics.median(d / s for d, s in zip(d_t, s_t))}
        for every in (1, 10, 100):
            rec[f"speedup_refresh_every_{every}"] = statistics.median(
                d / (s + rr / every) for d, s, rr in zip(d_t, s_t, r_t))
        out.append(rec)
        print(f"{sf:.2f}/{sb:.2f} {rec['dense_ms']:9.1f} {rec['sparse_ms']:10.1f} "
              f"{rec['refresh_ms']:11.1f} {rec['speedup']:10.2f}x "
              f"{rec['speedup_refresh_every_100']:9.2f}x {rec['speedup_refresh_every_10']:8.2f}x "
              f"{rec['speedup_refresh_every_1']:7.2f}x", flush=True)
        del sparse, sopt
    return {"config": cfg.to_dict(), "batch": batch, "rounds": rounds, "results": out,
            "load_avg": os.getloadavg()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--import-order", action="store_true")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--load", type=int, default=0,
                    help="busy-looping processes beside the import-order measurement")
    a = ap.parse_args(argv)
    q = "_quick" if a.quick else ""
    if a.import_order:
        res, stem = import_order(a.quick, a.load), "import_order"
        q += f"_load{a.load}" if a.load else ""
    else:
        res, stem = model_steps(a.quick, a.layers, a.batch), "step_time"
    sys.path.insert(0, str(HERE))
    from _common import tree_state
    res["tree"] = tree_state()
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    p = HERE / "results" / f"{stem}{q}.json"
    p.write_text(json.dumps(res, indent=1))
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
