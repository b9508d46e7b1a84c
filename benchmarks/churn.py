"""How far B wanders over a realistic run: the union of the backward sets, the
pool and reserve sizes, trimming, and memory_report() against the compact ideal.

A small decoder transformer (memory_profile.transformer: byte vocabulary, d_model
128, 2 blocks, context 64) is trained as a byte-level language model on the Python
standard library's own sources, wrapped in ``sc.SparseModel`` (built on the meta
device) with ``refresh_every = 100``, AdamW (lr 1e-3, 100 warm-up steps, cosine decay
to 10%), batch 16. After every refresh it records, per sparse layer and in total:

* |union of B over all refreshes so far| / K_B (from ``layer.backward_indices()``,
  accumulated in a boolean mask per layer: the layers are small);
* pool size / K_B and reserve size / K_B (RAM), and the cold store / K_B (trained
  coordinates that left the RAM pool, on disk);
* the cumulative ``trimmed`` (untrained entries dropped) and ``unspilled`` (cold
  entries read back) counters and the streaming scans (``replenishes``);
* ``memory_report()['total']`` against the compact ideal (memory.compact_ideal_bytes
  of the current K_A, K_B, reserve + 16 B per dense parameter);
* the training loss (mean of the last 100 steps).

Usage::

    python benchmarks/churn.py            # 2000 steps at 99/98 and 90/80 (< 15 min)
    python benchmarks/churn.py --quick    # 300 steps

Writes benchmarks/results/churn[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch  # first, as user code does

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import sparsecore as sc  # noqa: E402
from _common import pyplot, save_figure, tree_state  # noqa: E402
from memory_profile import transformer  # noqa: E402
from sparsecore import memory as M  # noqa: E402

SPARSITIES = [(0.99, 0.98), (0.9, 0.8)]
D, LAYERS, CTX, BATCH, REFRESH_EVERY = 128, 2, 64, 16, 100


def corpus(limit: int = 8 << 20) -> torch.Tensor:
    """Bytes of the standard library's .py files (sorted, up to ``limit``)."""
    root = Path(os.__file__).parent
    out, n = [], 0
    for p in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        b = p.read_bytes()
        out.append(b)
        n += len(b)
        if n >= limit:
            break
    return torch.frombuffer(bytearray(b"\n".join(out)[:limit]), dtype=torch.uint8).long()


def compact_ideal(model, nominal: bool = False) -> int:
    """Compact ideal of the current sets (reserve as it is now, or at its nominal
    ceil(0.25 K_B)) + 16 B per dense parameter."""
    rep = model.memory_report()
    ideal = sum(M.compact_ideal_bytes(l.k_a, l.k_b, math.ceil(l.reserve * l.k_b) if nominal
                                      else l.sparse_state.n_reserve)
                for l in model.sparse_layers().values())
    return ideal + 4 * rep["dense_parameters"]


def run(sf: float, sb: float, steps: int, data: torch.Tensor, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    with torch.device("meta"):
        net = transformer(D, LAYERS, ctx=CTX)
    model = sc.SparseModel(net, forward_sparsity=sf, backward_sparsity=sb,
                           refresh_every=REFRESH_EVERY, seed=seed, verbose=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) if s < warm else
        0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.attach(opt)
    layers = model.sparse_layers()
    seen = {n: np.zeros(l.n_total, np.bool_) for n, l in layers.items()}

    def record(step, losses):
        per = {}
        for n, l in layers.items():
            seen[n][l.backward_indices().numpy()] = True
            per[n] = {"union_over_kb": float(seen[n].sum() / l.k_b),
                      "pool_over_kb": l.pool_size() / l.k_b,
                      "reserve_over_kb": l.sparse_state.n_reserve / l.k_b,
                      "trimmed": int(l.stats["trimmed"]), "replenishes": int(l.stats["replenishes"]),
                      "spilled_over_kb": l.stats["spilled"] / l.k_b,
                      "unspilled": int(l.stats["unspilled"]),
                      "changed_b": float(l.stats["changed_b"])}
        k_b = sum(l.k_b for l in layers.values())
        rep = model.memory_report(opt)
        return {"step": step,
                "loss": float(np.mean(losses[-REFRESH_EVERY:])) if losses else None,
                "union_over_kb": sum(seen[n].sum() for n in layers) / k_b,
                "pool_over_kb": sum(l.pool_size() for l in layers.values()) / k_b,
                "reserve_over_kb": sum(l.sparse_state.n_reserve for l in layers.values()) / k_b,
                "trimmed": sum(p["trimmed"] for p in per.values()),
                "replenishes": sum(p["replenishes"] for p in per.values()),
                "spilled_over_kb": sum(l.stats["spilled"] for l in layers.values()) / k_b,
                "unspilled": sum(p["unspilled"] for p in per.values()),
                "spilled_bytes": float(rep["spilled"]),
                "memory_report_total": float(rep["total"]),
                "compact_ideal": compact_ideal(model),
                "compact_ideal_nominal_reserve": compact_ideal(model, nominal=True),
                "layers": per}

    g = torch.Generator().manual_seed(seed)
    losses, history = [], [record(0, [])]
    t0 = time.perf_counter()
    t_refresh = 0.0
    for step in range(1, steps + 1):
        i = torch.randint(0, data.numel() - CTX - 1, (BATCH,), generator=g)
        chunk = torch.stack([data[j:j + CTX + 1] for j in i.tolist()])
        x, y = chunk[:, :-1], chunk[:, 1:]
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tr = time.perf_counter()
        opt.step()                      # refreshes (inside the step hook) every 100 steps
        if step % REFRESH_EVERY == 0:
            t_refresh += time.perf_counter() - tr
            history.append(record(step, losses + [loss.item()]))
            h = history[-1]
            print(f"  {sf:g}/{sb:g} step {step:5d} loss {h['loss']:.3f} union/K_B "
                  f"{h['union_over_kb']:.3f} reserve/K_B {h['reserve_over_kb']:.3f} "
                  f"spilled/K_B {h['spilled_over_kb']:.3f} scans {h['replenishes']} "
                  f"report/ideal {h['memory_report_total'] / h['compact_ideal']:.3f}", flush=True)
        sched.step()
        losses.append(loss.item())
    return {"sf": sf, "sb": sb, "steps": steps, "seconds": time.perf_counter() - t0,
            "refresh_seconds_upper_bound": t_refresh, "history": history,
            "k_a": sum(l.k_a for l in layers.values()), "k_b": sum(l.k_b for l in layers.values()),
            "dense_equivalent": sum(l.n_total for l in layers.values())}


def plot(runs, path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in runs:
        st = [h["step"] for h in r["history"]]
        lab = f"{r['sf']:g}/{r['sb']:g}"
        axes[0].plot(st, [h["union_over_kb"] for h in r["history"]], "o-", ms=3, label=lab)
        axes[1].plot(st, [h["pool_over_kb"] for h in r["history"]], "o-", ms=3,
                     label=f"pool {lab}")
        axes[1].plot(st, [h["reserve_over_kb"] for h in r["history"]], "s--", ms=3,
                     label=f"reserve {lab}")
        axes[1].plot(st, [h["spilled_over_kb"] for h in r["history"]], "^:", ms=3,
                     label=f"on disk {lab}")
        axes[2].plot(st, [h["memory_report_total"] / h["compact_ideal_nominal_reserve"]
                          for h in r["history"]], "o-", ms=3, label=lab)
    axes[0].set_title("|union of B so far| / K_B")
    axes[1].set_title("pool, reserve (RAM) and cold store (disk) / K_B")
    axes[2].set_title("memory_report total / compact ideal (nominal reserve)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 steps")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    steps = a.steps or (300 if a.quick else 2000)
    data = corpus()
    print(f"corpus: {data.numel():,} bytes of the standard library's sources")
    t0 = time.perf_counter()
    runs = [run(sf, sb, steps, data) for sf, sb in SPARSITIES]
    print(f"\n{'S_f/S_b':>10}{'K_B':>10}{'union/K_B':>11}{'pool/K_B':>10}{'reserve/K_B':>12}"
          f"{'trimmed':>10}{'scans':>7}{'report/ideal':>14}{'rep/nominal':>12}{'loss':>8}"
          f"{'time s':>8}")
    for r in runs:
        h = r["history"][-1]
        print(f"{r['sf']:g}/{r['sb']:g}".rjust(10) + f"{r['k_b']:>10,}{h['union_over_kb']:>11.3f}"
              f"{h['pool_over_kb']:>10.3f}{h['reserve_over_kb']:>12.3f}{h['trimmed']:>10,}"
              f"{h['replenishes']:>7}{h['memory_report_total'] / h['compact_ideal']:>14.3f}"
              f"{h['memory_report_total'] / h['compact_ideal_nominal_reserve']:>12.3f}"
              f"{h['loss']:>8.3f}{r['seconds']:>8.0f}")
    print("(values at the last refresh; union = distinct coordinates ever in B / K_B; "
          "scans = streaming replenishes incl. construction; report/ideal uses the current "
          "reserve, rep/nominal the nominal reserve 0.25 K_B)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "churn" + ("_quick" if a.quick else "")
    meta = {"d_model": D, "layers": LAYERS, "ctx": CTX, "batch": BATCH,
            "refresh_every": REFRESH_EVERY, "lr": "1e-3, 100 warm-up, cosine to 1e-4",
            "corpus_bytes": data.numel(), "wall_s": time.perf_counter() - t0,
            "machine": f"{os.cpu_count()} CPUs (shared)",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tree": tree_state()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"wrote {out / (stem + '.json')}")
    plot(runs, out / f"{stem}.png")


if __name__ == "__main__":
    main()
