"""Peak memory of whole models trained with Top-KAST, per phase, against the analytic
model (``SparseModel.memory_report()``), the compact ideal, dense Adam training and
masked-dense Top-KAST.

Two model families, both built under ``torch.device("meta")`` and wrapped in
``sc.SparseModel`` (so no dense weight ever exists):

* ``transformer``: a decoder (byte vocabulary of 256, learned positions, L blocks
  of LayerNorm + causal attention with q/k/v/o ``nn.Linear(d, d)`` + LayerNorm +
  MLP ``nn.Linear(d, 4d)`` / ``nn.Linear(4d, d)``, final LayerNorm, head
  ``nn.Linear(d, 256)``); dense-equivalent parameters ~ 12 L d^2;
* ``mlp``: L layers ``nn.Linear(d, d)`` with ReLU; ~ L d^2.

Every configuration runs in a fresh subprocess (``OMP_WAIT_POLICY=PASSIVE``; torch
imported first, as user code does). The subprocess first runs every phase on a tiny
model of the same family (all kernels compiled / loaded), calls ``malloc_trim`` and
takes its RSS as the baseline. Then, for each phase -- build, step (two AdamW steps
on batch 1 x context 16; the first allocates gradients and AdamW state), refresh
(``model.refresh()``), save, load (``sc.save`` / ``sc.load`` with the optimizer) --
it resets the kernel's RSS high-water mark (write "5" to ``/proc/self/clear_refs``)
and records ``VmHWM - baseline``: the peak RSS of that phase, whatever allocated it.

A configuration runs only if its predicted peak (memory.py's steady state plus
1.6x the largest layer's steady state for the transients of build/refresh/load,
measured by tests/test_memory_phases.py, plus activations) plus the child's
baseline leaves >= 1.5 GiB of the machine's *currently available* memory; otherwise
it is marked "does not fit". A watchdog kills a child (reported as an error) if
the available memory falls below 1 GiB, so nothing is ever OOM-killed.

Usage::

    python benchmarks/memory_profile.py            # both families, up to 1e9 (~10 min)
    python benchmarks/memory_profile.py --quick    # up to 1e8 dense-equivalent (~5 min)

Writes benchmarks/results/memory_models[_quick].json and .png.
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

from _common import pyplot, reference_lines, save_figure, tree_state  # noqa: E402
from sparsecore import memory as M  # noqa: E402
from sparsecore.topkast import sizes  # noqa: E402

GiB = float(1 << 30)
RESERVE = 0.25
VOCAB, CTX, BATCH = 256, 16, 1
HEADROOM = 3 * (1 << 30)  # scale.py: a predicted peak must leave this much available
FIT_HEADROOM = 3 << 29    # memory_profile.py: 1.5 GiB (sizes here are far from the RAM)
BASE_RSS = 800 << 20      # the child before the model: python, torch, numba, kernels
PHASES = ("build", "step", "refresh", "save", "load")
SPARSITIES = [(0.8, 0.5), (0.9, 0.8), (0.95, 0.9), (0.99, 0.98)]
LAYERS = {"transformer": 4, "mlp": 4}
# dense-equivalent parameter targets per forward sparsity (d is chosen to match). The
# largest sizes that fit are scale.py's job; here the time per configuration grows
# with K_B (refresh and load cost ~0.4-1 us per B entry on the shared machine: 1e8 at
# 80/50 alone takes ~3 min), so the lower sparsities stop earlier. --quick: <= 1e8.
TARGETS = {"transformer": {0.8: [1e7], 0.9: [1e7], 0.95: [1e7, 1e8],
                           0.99: [1e7, 1e8, 1e9]},
           "mlp": {0.8: [1e7], 0.9: [1e7], 0.95: [1e7], 0.99: [1e7, 1e8, 1e9]}}
DENSE_TARGETS = {"transformer": [1e7, 1e8], "mlp": []}


# ---------------------------------------------------------------------------- models
def transformer(d: int, n_layers: int, vocab: int = VOCAB, ctx: int = 64):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = max(1, d // 64)       # head dimension 64 (d is a multiple of 64)
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)
            q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2)
                       for f in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.proj(F.gelu(self.fc(self.ln2(x))))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

        def forward(self, idx):
            x = self.emb(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln(x))

    return Decoder()


def mlp(d: int, n_layers: int):
    from torch import nn
    mods = []
    for _ in range(n_layers):
        mods += [nn.Linear(d, d), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def shapes(family: str, d: int, n_layers: int) -> tuple[list, int]:
    """(in, out) of every linear layer, and the other (dense) parameters."""
    if family == "transformer":
        lin = [(d, d)] * 4 * n_layers + [(d, 4 * d), (4 * d, d)] * n_layers + [(d, VOCAB)]
        dense = VOCAB * d + 64 * d + 4 * d * n_layers + 2 * d       # embeddings + norms
    else:
        lin, dense = [(d, d)] * n_layers, 0
    return lin, dense


def predict(family: str, d: int, n_layers: int, sf: float | None, sb: float | None) -> dict:
    """Analytic bytes (memory.py) of a configuration: steady state, compact ideal,
    dense Adam, masked-dense Top-KAST, and the predicted peak."""
    lin, dense = shapes(family, d, n_layers)
    n_dense_equiv = sum(i * o for i, o in lin)
    biases = sum(o for _, o in lin)
    dense_total = dense + biases
    out = {"dense_equivalent": n_dense_equiv + dense_total,
           "dense_adam": M.dense_training_bytes(n_dense_equiv + dense_total),
           "masked_dense_topkast": M.masked_dense_topkast_bytes(n_dense_equiv + dense_total)}
    if sf is None:     # dense training: weights, grads, AdamW state + the step's temporaries
        out["steady"] = out["dense_adam"]
        out["peak"] = out["steady"] + 12 * max(i * o for i, o in lin) + (256 << 20)
        return out
    steady, ideal, largest, stored = 16 * dense_total, 16 * dense_total, 0, dense_total
    for i, o in lin:
        k_a, k_b = sizes(i, o, sf, sb)
        r = math.ceil(RESERVE * k_b)
        layer = sum(M.sparse_layer_bytes(i, o, k_a, k_b, r).values())
        steady += layer
        ideal += M.compact_ideal_bytes(k_a, k_b, r)
        largest = max(largest, layer)
        stored += k_b
    out.update(steady=steady, compact_ideal=ideal, stored_params=stored,
               peak=steady + int(1.6 * largest) + (256 << 20))
    return out


def d_for(family: str, target: float, n_layers: int) -> int:
    """d (a multiple of 64) whose dense-equivalent size is closest to ``target``."""
    per = 12 * n_layers if family == "transformer" else n_layers
    return max(64, int(round(math.sqrt(target / per) / 64)) * 64)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {l.split(":")[0]: int(l.split()[1]) << 10 for l in f}
    return info["MemAvailable"]


# ---------------------------------------------------------------------------- child
def child(spec: dict) -> dict:
    import torch  # first, as user code does
    import ctypes
    import gc
    import sparsecore as sc

    libc = ctypes.CDLL("libc.so.6")

    def status():
        with open("/proc/self/status") as f:
            return {l.split(":")[0]: int(l.split()[1]) << 10 for l in f
                    if l.startswith(("VmRSS", "VmHWM"))}

    def reset():
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status()["VmRSS"]

    family, sparse = spec["family"], spec["sf"] is not None
    torch.manual_seed(0)

    def build(d, n_layers):
        if not sparse:
            return transformer(d, n_layers) if family == "transformer" else mlp(d, n_layers)
        with torch.device("meta"):
            net = transformer(d, n_layers) if family == "transformer" else mlp(d, n_layers)
        return sc.SparseModel(net, forward_sparsity=spec["sf"], backward_sparsity=spec["sb"],
                              refresh_every=1 << 30, reserve=RESERVE, verbose=False)

    def batch(d):
        if family == "transformer":
            idx = torch.randint(0, VOCAB, (BATCH, CTX + 1))
            return idx[:, :-1], idx[:, 1:]
        return torch.randn(BATCH * CTX, d), torch.randn(BATCH * CTX, d)

    def step(model, opt, d):
        x, t = batch(d)
        y = model(x)
        if family == "transformer":
            loss = torch.nn.functional.cross_entropy(y.reshape(-1, VOCAB), t.reshape(-1))
        else:
            loss = torch.nn.functional.mse_loss(y, t)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    path = spec["path"]
    phases = spec.get("phases", PHASES)

    def run(d, n_layers, record):
        times, peaks, info = {}, {}, {}
        state = {}

        def phase(name, fn):
            if name not in phases:
                return
            r0 = reset()
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
            s = status()
            peaks[name] = s["VmHWM"] - record["base"] if record else 0
            info.setdefault("transient", {})[name] = s["VmHWM"] - r0

        phase("build", lambda: state.update(model=build(d, n_layers)))
        model = state["model"]
        opt = torch.optim.AdamW(model.parameters(), lr=spec.get("lr", 1e-3))
        if sparse:
            model.attach(opt)       # the refresh below remaps this optimizer's state

        def two_steps():
            t0 = time.perf_counter()
            step(model, opt, d)
            info["first_step_s"] = time.perf_counter() - t0
            step(model, opt, d)
        phase("step", two_steps)
        if "step" in times:
            times["step"] -= info["first_step_s"]      # time of the second (steady) step
        if sparse:
            def refresh():
                res = model.refresh()
                info["replenished"] = sum(v["replenished"] for v in res.values())
                info["changed_a"] = (sum(v["changed_a"] * model.sparse_layers()[n].k_a
                                         for n, v in res.items())
                                     / sum(l.k_a for l in model.sparse_layers().values()))
            phase("refresh", refresh)
        phase("save", lambda: sc.save(model, path, optimizer=opt))
        phase("load", lambda: sc.load(path, model, optimizer=opt))
        if sparse:
            rep = model.memory_report(opt)
            info["memory_report"] = {k: float(v) for k, v in rep.items()}
            layers = list(model.sparse_layers().values())
            info["compact_ideal"] = sum(M.compact_ideal_bytes(l.k_a, l.k_b,
                                                              l.sparse_state.n_reserve)
                                        for l in layers)
            info["compact_ideal"] += (rep["dense_parameters"] + rep["dense_gradients"]
                                      + 2 * rep["dense_parameters"])
            info["stored_params"] = sum(l.k_b for l in layers)
            info["reserve_entries"] = sum(l.sparse_state.n_reserve for l in layers)
            info["k_b"] = sum(l.k_b for l in layers)
        else:
            info["params"] = sum(p.numel() for p in model.parameters())
        if os.path.exists(path):
            os.unlink(path)
        return {"peaks": peaks, "times": times, **info}

    run(64, 1, None)                              # warm-up: every kernel, every phase
    record = {"base": reset()}
    res = run(spec["d"], spec["layers"], record)
    res["baseline_rss"] = record["base"]
    return res


def run_child(spec: dict, timeout: float, guard: int = 1 << 30) -> dict:
    """Run one configuration in a fresh interpreter. A watchdog polls the machine's
    available memory and kills the child (reported as an error) when it falls below
    ``guard``, so a wrong prediction never ends in the kernel's OOM killer."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    min_avail = available_bytes()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=str(ROOT), env=env) as p:
        import threading
        chunks = {}
        readers = [threading.Thread(target=lambda n, f: chunks.__setitem__(n, f.read()),
                                    args=(n, f)) for n, f in (("out", p.stdout), ("err", p.stderr))]
        for r in readers:
            r.start()
        killed = None
        while p.poll() is None:
            avail = available_bytes()
            min_avail = min(min_avail, avail)
            if avail < guard:
                killed = f"killed by the watchdog: available memory fell to {fmt(avail)}"
            elif time.perf_counter() - t0 > timeout:
                killed = f"timeout after {timeout:.0f} s"
            if killed:
                p.kill()
                break
            time.sleep(0.2)
        p.wait()
        for r in readers:
            r.join()
    if os.path.exists(spec["path"]):
        os.unlink(spec["path"])
    if killed or p.returncode != 0:
        return {"error": killed or f"exit {p.returncode}: {chunks.get('err', '')[-1500:]}",
                "min_available": min_avail}
    line = [ln for ln in chunks["out"].splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    res["min_available"] = min_avail
    return res


def timeout_for(pred: dict, sparse: bool) -> float:
    """Generous: start-up, 10 ns per dense-equivalent coordinate (build scan and a
    possible replenishing scan), 1.5 us per B entry (steps, refresh, checkpoint
    hashing and the load's structure validation, twice)."""
    n = pred["dense_equivalent"]
    if not sparse:
        return 120 + 5e-8 * n
    return 150 + 1e-8 * n + 1.5e-6 * pred["stored_params"]


# ---------------------------------------------------------------------------- report
def fmt(b):
    return M.fmt_bytes(b) if b == b else "-"


def print_table(rows):
    print(f"\n{'family':<12}{'S_f/S_b':>10}{'d':>7}{'dense-eq':>10}{'report':>12}"
          + "".join(f"{p:>11}" for p in PHASES)
          + f"{'peak/rep':>9}{'rep/ideal':>10}{'adam/peak':>10}{'mask/peak':>10}")
    for r in rows:
        lead = (f"{r['family']:<12}{r['sparsity']:>10}{r['d']:>7}"
                f"{r['predicted']['dense_equivalent']:>10.2e}")
        if "error" in r or "skipped" in r:
            print(lead + "  " + (r.get("skipped") or "FAILED: " + r["error"][:80]))
            continue
        rep = r.get("memory_report", {}).get("total", r["predicted"]["steady"])
        peak = max(r["peaks"].values())
        cells = "".join(f"{fmt(r['peaks'].get(p, math.nan)):>11}" for p in PHASES)
        ideal = r.get("compact_ideal")
        print(lead + f"{fmt(rep):>12}" + cells + f"{peak / rep:>9.2f}"
              + (f"{rep / ideal:>10.2f}" if ideal else f"{'-':>10}")
              + f"{r['predicted']['dense_adam'] / peak:>10.1f}"
              + f"{r['predicted']['masked_dense_topkast'] / peak:>10.1f}")
    print("\nreport = memory_report(opt)['total'] (analytic steady state; dense rows: 16 B/param);"
          " phase columns = peak RSS during the phase minus the baseline (process after the"
          " warm-up); peak/rep = largest phase peak / report; rep/ideal = report / compact"
          " ideal (20 B per B entry + 8 per A entry + 12 per reserve entry, + 16 B per dense"
          " parameter); adam/peak, mask/peak = dense Adam (16 B/param) and masked-dense Top-KAST"
          " (18 B/param) analytic bytes / measured peak.")


def plot(rows, path, ram):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, family in zip(axes, ("transformer", "mlp")):
        fam = [r for r in rows if r["family"] == family and "peaks" in r]
        for sp in sorted({r["sparsity"] for r in fam if r["sparsity"] != "dense"}):
            pts = sorted((r["predicted"]["dense_equivalent"], max(r["peaks"].values()))
                         for r in fam if r["sparsity"] == sp)
            ax.plot(*zip(*pts), "o-", label=f"Top-KAST {sp} (measured peak)")
        dn = sorted((r["predicted"]["dense_equivalent"], max(r["peaks"].values()))
                    for r in fam if r["sparsity"] == "dense")
        if dn:
            ax.plot(*zip(*dn), "ks", ms=7, label="dense AdamW (measured peak)")
        xs = sorted({r["predicted"]["dense_equivalent"] for r in rows if r["family"] == family})
        reference_lines(ax, xs, ram)
        ax.set_title(f"{family}: peak RSS over the phases (minus baseline)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("bytes")
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


def configs(quick: bool):
    out = []
    for family in ("transformer", "mlp"):
        n_layers = LAYERS[family]
        for sf, sb in SPARSITIES:
            for t in TARGETS[family][sf]:
                if not quick or t <= 1e8:
                    out.append((family, d_for(family, t, n_layers), n_layers, sf, sb))
        for t in DENSE_TARGETS[family]:                       # dense AdamW, measured
            out.append((family, d_for(family, t, n_layers), n_layers, None, None))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes up to 1e9 only")
    ap.add_argument("--family", choices=("transformer", "mlp"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return
    t_start = time.perf_counter()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    tmp = Path(a.out) / ".memory_profile.ckpt"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    for family, d, n_layers, sf, sb in configs(a.quick):
        if a.family and family != a.family:
            continue
        sparse = sf is not None
        pred = predict(family, d, n_layers, sf, sb)
        row = {"family": family, "d": d, "layers": n_layers, "sf": sf, "sb": sb,
               "sparsity": f"{sf:g}/{sb:g}" if sparse else "dense", "predicted": pred}
        avail = available_bytes()
        label = f"{family} {row['sparsity']} d={d} ({pred['dense_equivalent']:.2e})"
        if BASE_RSS + pred["peak"] + FIT_HEADROOM > avail:
            row["skipped"] = (f"does not fit: predicted peak {fmt(pred['peak'])} + base + 1.5 GiB > "
                              f"available {fmt(avail)}")
            print(f"[{time.perf_counter() - t_start:6.0f}s] {label}: {row['skipped']}", flush=True)
            rows.append(row)
            continue
        print(f"[{time.perf_counter() - t_start:6.0f}s] {label}: predicted peak "
              f"{fmt(pred['peak'])} ...", flush=True)
        spec = {"family": family, "d": d, "layers": n_layers, "sf": sf, "sb": sb,
                "path": str(tmp)}
        row.update(run_child(spec, timeout_for(pred, sparse)))
        if "peaks" in row:
            print("    " + ", ".join(f"{k} {fmt(v)}" for k, v in row["peaks"].items())
                  + f"  ({row['wall_s']:.0f} s)", flush=True)
        else:
            print("    " + row["error"][:300], flush=True)
        rows.append(row)
    print_table(rows)
    out = Path(a.out)
    stem = "memory_models" + ("_quick" if a.quick else "")
    meta = {"machine": f"{os.cpu_count()} CPUs, {ram / GiB:.1f} GiB RAM (shared)",
            "ram_bytes": ram, "batch": BATCH, "ctx": CTX, "reserve": RESERVE,
            "wall_s": time.perf_counter() - t_start, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": sys.version.split()[0], "tree": tree_state()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"\nwrote {out / (stem + '.json')}  ({meta['wall_s']:.0f} s)")
    if not a.no_png:
        plot(rows, out / f"{stem}.png", ram)


if __name__ == "__main__":
    main()
