"""One Top-KAST layer far past dense reach on one GPU: build, AdamW step, refresh.

For each square size (out = in) at 99/98, in this process, on ``cuda``: build the layer
(the streaming theta0 scan runs on the host, the state then moves to the GPU), run
``--steps`` training steps on ``n`` random tokens (forward, backward, AdamW), then one
refresh (on the host, see docs/gpu.md). Reported per size: dense-equivalent
parameters, K_A / K_B, wall time per phase, the GPU's peak allocated bytes per phase
(``torch.cuda.max_memory_allocated``, reset per phase), the host's peak RSS so far,
``memory_report()``'s total, and what dense AdamW would need (16 B per parameter).
A size is skipped, not crashed into, when ``--budget-s`` is spent.

Usage::

    python benchmarks/gpu_scale.py --sizes 50000 100000 --out results/gpu_scale.json
"""
from __future__ import annotations

import torch

import argparse
import json
import resource
import time

import sparsecore as sc


def _sync():
    torch.cuda.synchronize()


def run_size(size: int, n: int, steps: int, sf: float, sb: float) -> dict:
    rec = {"out": size, "in": size, "n": n, "forward_sparsity": sf, "backward_sparsity": sb,
           "dense_equivalent": size * size, "dense_adamw_bytes": 16 * size * size}

    def phase(name, fn):
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        rec[f"{name}_s"] = time.perf_counter() - t0
        rec[f"{name}_gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        rec[f"{name}_host_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return out

    def build():
        with torch.device("meta"):     # never materialised dense
            net = torch.nn.Sequential(torch.nn.Linear(size, size))
        return sc.SparseModel(net, forward_sparsity=sf, backward_sparsity=sb).cuda()

    layer = phase("build", build)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    layer.attach(opt)
    x = torch.randn(n, size, device="cuda")

    def step():
        y = layer(x)
        y.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    phase("first_step", step)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
    rec["step_s"] = sorted(times)[len(times) // 2]
    rec["steady_gpu_bytes"] = torch.cuda.memory_allocated()
    phase("refresh", layer.refresh)
    rec["memory_report_total"] = layer.memory_report(opt)["total"]
    rec["stats"] = layer.stats()["total"]
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sparsity", type=float, nargs=2, default=[0.99, 0.98])
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t0, recs = time.perf_counter(), []
    for size in a.sizes:
        if time.perf_counter() - t0 > a.budget_s:
            recs.append({"out": size, "skipped": "budget spent"})
            continue
        try:
            rec = run_size(size, a.n, a.steps, *a.sparsity)
        except torch.cuda.OutOfMemoryError as e:
            rec = {"out": size, "error": f"CUDA OOM: {str(e)[:200]}"}
            torch.cuda.empty_cache()
        torch.cuda.empty_cache()      # the last size's layer is gone with run_size
        recs.append(rec)
        print(json.dumps(rec), flush=True)
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()
