"""Peer benchmark: one layer's training step at equal work (B = A) against sparselab,
SparseProp, masked-dense Top-KAST and dense nn.Linear.

One step = zero_grad + forward + backward from a fixed upstream gradient (the input
gradient dx included, as for a layer inside a network) + AdamW, float32, with bias.
Equal work: sparsecore runs with forward_sparsity = backward_sparsity (B = A), so every
sparse implementation computes the same three products over the same number of weights.

Implementations (all in this one process, interleaved round by round: machine load hits
them alike; reported numbers are medians of per-round ratios):

* ``sparsecore``: sparsecore.TopKASTLinear(sf = sb = s);
* ``sparselab``:  sparselab.SparseLinear(sparsity=s) (sparselab 0.2.2, PyPI);
* ``sparseprop``: sparseprop SparseLinear.from_dense of a layer pruned to s (0.1.14);
* ``masked``:     masked-dense Top-KAST (benchmarks/layer.py: dense W and masks);
* ``dense``:      torch.nn.Linear.

The peers are not sparsecore dependencies: install them in a separate venv, e.g.
``python -m venv /work/bench-venv && /work/bench-venv/bin/pip install -e . sparselab==0.2.2
sparseprop==0.1.14``. A peer that fails to import is reported as n/a with the reason.

Usage::

    python benchmarks/peers.py            # full grid
    python benchmarks/peers.py --quick    # a few configurations, ~1-2 min

Writes benchmarks/results/peers[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch  # first, as user code does
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore", category=RuntimeWarning, module="sparsecore")
import sparsecore as sc  # noqa: E402
from _common import tree_state  # noqa: E402
from layer import MaskedDenseTopKAST  # noqa: E402

LR = 1e-3
PEER_ERRORS: dict[str, str] = {}

try:
    import sparselab
    import sparselab.ops
except Exception as e:  # noqa: BLE001 - record exactly why
    sparselab = None
    PEER_ERRORS["sparselab"] = f"{type(e).__name__}: {e}"
try:
    from sparseprop.modules.linear import SparseLinear as SPLinear
except Exception as e:  # noqa: BLE001
    SPLinear = None
    PEER_ERRORS["sparseprop"] = f"{type(e).__name__}: {e}"


def build(impl, in_f, out_f, s, seed=0):
    torch.manual_seed(seed)
    if impl == "sparsecore":
        return sc.TopKASTLinear(in_f, out_f, forward_sparsity=s, backward_sparsity=s, seed=seed)
    if impl == "sparselab":
        # sparselab caches each weight's transpose under id(W) (its documented v0.1
        # limitation): a new layer that reuses a freed layer's id would read the stale
        # transpose (an IndexError at 4096^2, n=2048, 0.95). Each configuration
        # starts from an empty cache.
        sparselab.ops._transpose_cache.clear()
        return sparselab.SparseLinear(in_f, out_f, sparsity=s)
    if impl == "sparseprop":
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            w = lin.weight
            k = int(round((1 - s) * w.numel()))
            keep = torch.topk(w.abs().flatten(), k).indices
            m = torch.zeros(w.numel())
            m[keep] = 1
            w.mul_(m.view_as(w))
        return SPLinear.from_dense(lin)
    if impl == "masked":
        return MaskedDenseTopKAST(in_f, out_f, s, s)
    if impl == "dense":
        return nn.Linear(in_f, out_f)
    raise ValueError(impl)


def step(mod, opt, x, dy):
    opt.zero_grad(set_to_none=True)
    x.grad = None
    t0 = time.perf_counter()
    mod(x).backward(dy)
    opt.step()
    return time.perf_counter() - t0


def bench(in_f, out_f, n, s, impls, rounds, steps):
    x = torch.randn(n, in_f).requires_grad_(True)
    dy = torch.randn(n, out_f) / math.sqrt(n * out_f)
    mods, opts, failed = {}, {}, {}
    for k in impls:
        try:
            mods[k] = build(k, in_f, out_f, s)
            opts[k] = torch.optim.AdamW(mods[k].parameters(), lr=LR)
            for _ in range(2):
                step(mods[k], opts[k], x, dy)
        except Exception as e:  # noqa: BLE001 - a peer's failure is a result, recorded
            if k == "sparsecore":
                raise
            failed[k] = f"{type(e).__name__}: {e}"
            mods.pop(k, None)
    impls = [k for k in impls if k not in failed]
    per = {k: [] for k in impls}
    order = list(impls)
    for _ in range(rounds):
        order = order[1:] + order[:1]
        for k in order:
            per[k].append(statistics.median(step(mods[k], opts[k], x, dy) for _ in range(steps)))
    med = {k: statistics.median(v) for k, v in per.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(per[k], per["sparsecore"]))
             for k in impls if k != "sparsecore"}
    return {"in": in_f, "out": out_f, "n": n, "sparsity": s, "step_ms": {k: 1e3 * v for k, v in med.items()},
            "time_over_sparsecore": ratio, "failed": failed}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    impls = ["sparsecore"] + [p for p, ok in (("sparselab", sparselab), ("sparseprop", SPLinear)) if ok] \
        + ["masked", "dense"]
    if a.quick:
        grid = [(4096, 4096, 512, 0.99), (4096, 4096, 256, 0.9), (1024, 1024, 64, 0.9),
                (1024, 4096, 512, 0.95)]
        rounds = a.rounds or 3
    else:
        grid = [(i, o, n, s) for (i, o) in ((1024, 1024), (4096, 4096), (1024, 4096), (4096, 1024))
                for n in (64, 256, 512, 2048) for s in (0.8, 0.9, 0.95, 0.99)]
        rounds = a.rounds or 5
    print(f"peers: {impls}; unavailable: {PEER_ERRORS or 'none'}; torch threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()}", flush=True)
    recs = []
    t0 = time.perf_counter()
    out = HERE / "results" / ("peers" + ("_quick" if a.quick else "") + (f"_{a.tag}" if a.tag else "") + ".json")
    out.parent.mkdir(exist_ok=True)
    hdr = f"{'in':>5} {'out':>5} {'n':>5} {'sparsity':>8} {'sc ms':>8} | " + " ".join(
        f"{k + '/sc':>14}" for k in impls[1:])
    print("time of each implementation over sparsecore's (>1: sparsecore faster)\n" + hdr)
    for i, o, n, s in grid:
        r = bench(i, o, n, s, impls, rounds, a.steps)
        recs.append(r)
        print(f"{i:>5} {o:>5} {n:>5} {s:>8.2f} {r['step_ms']['sparsecore']:8.1f} | " + " ".join(
            f"{r['time_over_sparsecore'][k]:>13.2f}x" if k in r["time_over_sparsecore"]
            else f"{'failed':>14}" for k in impls[1:]), flush=True)
        for k, why in r["failed"].items():
            print(f"      {k} failed: {why[:200]}", flush=True)
        # written after every configuration: a long grid keeps what it measured
        out.write_text(json.dumps({"meta": {"impls": impls, "unavailable": PEER_ERRORS,
                                            "rounds": rounds, "steps": a.steps,
                                            "load_avg": os.getloadavg(),
                                            "torch": torch.__version__, "tree": tree_state(),
                                            "wall_s": time.perf_counter() - t0},
                                   "results": recs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
