"""What the speed targets of issue 10 allow on this machine: each target's step with
its sparse products at their roofline.

For the layer targets (one 4096 x 4096 TopKASTLinear, n = 512, forward + backward
with dx + AdamW, against nn.Linear: >= 2.5x / 10x / 30x at 80/50 / 95/90 / 99/98)
and the whole-model targets (the GPT of ``step_time.py``: d_model 1024, 2 blocks,
2 x 256 tokens, AdamW, against the same model dense: >= 1.2x / 3x / 6x):

1. the dense and the sparse step are timed in one process, interleaved; the sparse
   step is split into its products (spmm, spmm_t, sddmm as the layer calls them,
   packing included, timed by ``layer.py``'s KernelTimer) and the rest ("other":
   autograd, the bias gradient, AdamW; in the model also attention, GELU, layer
   norms, the dense head and the loss, which the dense model runs too);
2. the shape of every product call of one sparse step is recorded and each call
   gets the roof of ``roofline.py`` (``max(compute, gather) + stream``, from the
   dense GEMM rate, the gather-only kernel and torch's copy, each measured in this
   run, the best over the run);
3. reported beside the target: the measured speedup; ``at roof``, the speedup with
   every product at its roof and the rest as measured; ``products only``, dense /
   (sum of the roofs), the rest free as well.

A target above ``at roof`` cannot be reached by faster kernels for this format on
this machine; one above ``products only`` not even with a free rest. The roofs are
generous: they take the best ceiling of the run and let nothing else overlap.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/targets.py            # ~1.5 min, 2 cores
    OMP_WAIT_POLICY=PASSIVE python benchmarks/targets.py --quick    # 99/98 only

Writes benchmarks/results/targets[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch  # noqa: I001  (torch first, as user code does)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

import sparsecore as sc  # noqa: E402
from _common import tree_state  # noqa: E402
from kernels import machine_info  # noqa: E402
from layer import LR, KernelTimer, timed_step  # noqa: E402
from roofline import (_BEST, best, gemm_rate, measure_ceilings, roof_terms,  # noqa: E402
                      roof_time, traffic)

LAYER_TARGETS = {(0.8, 0.5): 2.5, (0.95, 0.9): 10.0, (0.99, 0.98): 30.0}
MODEL_TARGETS = {(0.8, 0.5): 1.2, (0.95, 0.9): 3.0, (0.99, 0.98): 6.0}


def call_shape(name: str, a: tuple, k: dict) -> tuple:
    """(product, stored values, n, features read by the gather, other features,
    itemsize) of one call of ``sparsecore.kernels.<name>`` with row-major activations
    (how the layer calls them)."""
    if k.get("layout") != "row":
        raise ValueError(f"{name} was called with layout={k.get('layout')!r}; the roofs "
                         "assume the layer's row-major activations")
    if name == "spmm":        # (indptr, indices, values, x): y (n, rows) = x W^T
        indptr, indices, _, x = a[:4]
        return name, indices.numel(), x.shape[0], x.shape[1], indptr.numel() - 1, x.element_size()
    if name == "spmm_t":      # (t_indptr, t_rows, t_perm, values, g): dx = g W
        t_indptr, t_rows, _, _, g = a[:5]
        return name, t_rows.numel(), g.shape[0], g.shape[1], t_indptr.numel() - 1, g.element_size()
    if name == "sddmm":       # (indptr, indices, g, x, more=...): every structure of the call
        _, indices, g, x = a[:4]
        nnz = indices.numel() + sum(m[1].numel() for m in k.get("more", ()))
        return name, nnz, x.shape[0], x.shape[1], g.shape[1], x.element_size()
    raise ValueError(f"unknown product {name!r}")


class CallRecorder(KernelTimer):
    """layer.py's KernelTimer that also records :func:`call_shape` of every call."""

    def __init__(self):
        self.calls: list[tuple] = []
        super().__init__()

    def _wrap(self, name, fn):
        timed = super()._wrap(name, fn)

        def recorded(*a, **k):
            self.calls.append(call_shape(name, a, k))
            return timed(*a, **k)
        return recorded


def measure_calls(calls: list[tuple]) -> list[tuple]:
    """Measure (again) the ceilings each call needs; returns per call (flops, gathered
    bytes, streamed bytes, ceiling keys, flops of the whole product done densely)."""
    out = []
    for product, nnz, n, f_read, f_other, isz in calls:
        P, rows, gathered, streamed, act = traffic(product, nnz, n, f_read, f_other, isz)
        keys = measure_ceilings(P, rows, act, np.dtype(np.float32 if isz == 4 else np.float64))
        out.append((2 * nnz * n, gathered, streamed, keys, 2 * n * f_read * f_other))
    return out


def roof_of(measured: list[tuple]) -> float:
    """Seconds of the products at their roofs, from each ceiling's best over the run.
    A call's roof is the lower of the format's roof and the dense GEMM of the whole
    product at the peak rate, since the product can always be computed densely in
    tiles (sddmm does so from 30% density)."""
    peak = _BEST[("gemm",)]
    return sum(min(roof_time(roof_terms(flops, gathered, streamed, keys)), dense / peak)
               for flops, gathered, streamed, keys, dense in measured)


def layer_steps(sf: float, sb: float, rounds: int, steps: int, rec: CallRecorder):
    """(dense step, sparse step, products) seconds of the 4096^2 layer, n = 512, one
    sparse step's calls in ``rec.calls``."""
    torch.manual_seed(0)
    n, f = 512, 4096
    x = torch.randn(n, f).requires_grad_(True)
    dy = torch.randn(n, f) / math.sqrt(n * f)
    dense, sparse = nn.Linear(f, f), sc.TopKASTLinear(f, f, forward_sparsity=sf,
                                                       backward_sparsity=sb)
    dopt = torch.optim.AdamW(dense.parameters(), lr=LR)
    sopt = torch.optim.AdamW(sparse.parameters(), lr=LR)

    def dstep():
        return timed_step(dense, dopt, x, dy, None)["step"]

    def sstep():
        r = timed_step(sparse, sopt, x, dy, rec)
        return r["step"], sum(r.get(p, 0.0) for p in KernelTimer.NAMES)
    return _interleave(dstep, sstep, rounds, steps, rec)


def model_steps(sf: float, sb: float, rounds: int, steps: int, rec: CallRecorder):
    """The same for the GPT of step_time.py against the same model dense."""
    from sparsecore.models.gpt import GPTConfig, build_model
    cfg = GPTConfig(d_model=1024, context=256, heads=8, layers=2, vocab=256)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (2, 256), generator=g)
    tgt = torch.randint(0, 256, (2, 256), generator=g)
    dense = build_model(cfg, dense=True)
    sparse = build_model(cfg, forward_sparsity=sf, backward_sparsity=sb, refresh_every=10 ** 9)
    dopt = torch.optim.AdamW(dense.parameters(), lr=1e-4)
    sopt = torch.optim.AdamW(sparse.parameters(), lr=1e-4)
    sparse.attach(sopt)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(idx)
        nn.functional.cross_entropy(logits.reshape(-1, 256), tgt.reshape(-1)).backward()
        opt.step()
        return time.perf_counter() - t0

    def sstep():
        rec.take()
        t = step(sparse, sopt)
        return t, sum(rec.take().values())
    return _interleave(lambda: step(dense, dopt), sstep, rounds, steps, rec)


def _interleave(dstep, sstep, rounds, steps, rec):
    for _ in range(2):   # warm-up: compile / cache load, optimizer state
        dstep()
        sstep()
    d, s, p = [], [], []
    for r in range(rounds):
        for which in (("d", "s") if r % 2 == 0 else ("s", "d")):
            if which == "d":
                d.append(statistics.median(dstep() for _ in range(steps)))
            else:
                st = [sstep() for _ in range(steps)]
                s.append(statistics.median(t for t, _ in st))
                p.append(statistics.median(q for _, q in st))
    rec.calls.clear()
    sstep()                      # one more step: the calls whose roofs are summed
    return statistics.median(d), statistics.median(s), statistics.median(p)


def evaluate(kind: str, pairs, rounds: int, steps: int) -> list[dict]:
    """Time each configuration and measure the ceilings its calls need; the roofs
    are added by :func:`add_roofs` once every ceiling has its best of the run."""
    targets = LAYER_TARGETS if kind == "layer" else MODEL_TARGETS
    run = layer_steps if kind == "layer" else model_steps
    out = []
    for sf, sb in pairs:
        rec = CallRecorder()
        try:
            dense, sparse, prods = run(sf, sb, rounds, steps, rec)
            calls = list(rec.calls)
        finally:
            rec.restore()
        best(("gemm",), gemm_rate(torch.float32, rounds=3))
        out.append({"kind": kind, "forward_sparsity": sf, "backward_sparsity": sb,
                    "dense_ms": 1e3 * dense, "sparse_ms": 1e3 * sparse,
                    "products_ms": 1e3 * prods, "other_ms": 1e3 * (sparse - prods),
                    "calls": len(calls), "speedup": dense / sparse,
                    "target": targets[(sf, sb)], "_measured": measure_calls(calls)})
        print(f"[{kind} {sf:.2f}/{sb:.2f} timed]", flush=True)
    return out


def add_roofs(recs: list[dict]) -> None:
    """Fill in each record's roofs and the speedups they allow."""
    for r in recs:
        roof = 1e3 * roof_of(r.pop("_measured"))
        dense, other = r["dense_ms"], r["other_ms"]
        r.update({"products_at_roof_ms": roof,
                  "products_fraction_of_roof": roof / r["products_ms"],
                  "speedup_at_roof": dense / (other + roof),
                  "speedup_products_only": dense / roof})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="99/98 only, fewer rounds")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds per config")
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    args = ap.parse_args(argv)
    pairs = [(0.99, 0.98)] if args.quick else list(LAYER_TARGETS)
    rounds = 3 if args.quick else args.rounds
    info = machine_info()
    print(json.dumps(info), flush=True)
    best(("gemm",), gemm_rate(torch.float32))
    recs = evaluate("layer", pairs, rounds, args.steps) + evaluate("model", pairs, rounds,
                                                                   args.steps)
    add_roofs(recs)
    print(f"{'':5} {'S_f/S_b':>9} {'dense':>8} {'sparse':>8} {'products':>8} {'other':>7} "
          f"{'roof':>7} {'speedup':>8} {'at roof':>8} {'prod only':>9} {'target':>7}  (ms)")
    for r in recs:
        print(f"{r['kind']:5} {r['forward_sparsity']:.2f}/{r['backward_sparsity']:.2f} "
              f"{r['dense_ms']:8.1f} {r['sparse_ms']:8.1f} {r['products_ms']:8.1f} "
              f"{r['other_ms']:7.1f} {r['products_at_roof_ms']:7.1f} {r['speedup']:7.2f}x "
              f"{r['speedup_at_roof']:7.2f}x {r['speedup_products_only']:8.2f}x "
              f"{r['target']:6.1f}x")
    ceilings = {" ".join(map(str, k)): v for k, v in _BEST.items()}
    out = HERE / "results" / f"targets{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"machine": info, "tree": tree_state(),
                               "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "ceilings": ceilings, "records": recs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
