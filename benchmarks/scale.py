"""The scale record: the largest dense-equivalent transformer that builds, trains
and refreshes on this machine, per sparsity, next to the largest dense AdamW model.

For each (S_f, S_b) the size is chosen from the analytic model (memory.py, via
memory_profile.predict) by a binary search over d_model (a multiple of 64) of a
decoder transformer with L = 16 blocks (memory_profile.transformer, byte
vocabulary): the largest d whose predicted peak, plus the child's baseline
(~0.8 GiB) and 3 GiB of headroom, fits the machine's *currently available* memory.
The prediction counts memory_report's steady state with the reserve at its cap,
0.5 K_B (beyond it a refresh spills trained coordinates to the cold store on disk)
plus 1.6x the largest layer's steady state (the build / refresh transients,
see tests/test_memory_phases.py).

That configuration then runs in a fresh subprocess (memory_profile.child): build on
the meta device + SparseModel, two AdamW steps (lr 1e-4) on batch 1 x context 16
(the first allocates gradients and AdamW state; the second is timed), one refresh
of every layer. Peak RSS per phase is the kernel's high-water mark (VmHWM, reset
per phase) minus the child's baseline. A watchdog kills the child if the machine's
available memory falls below 1 GiB (reported, never an OOM kill).

Dense AdamW (the same family on the CPU, no sparsecore) is sized the same way
(16 B/param + the step's temporaries) and measured once.

Usage::

    python benchmarks/scale.py                 # 99/98, 80/50, 95/90, 90/80, dense, 99.9/99.8
    python benchmarks/scale.py --quick         # sizes capped at 1e9 (a few minutes)
    python benchmarks/scale.py --only 0.99     # one forward sparsity (or "dense")
    python benchmarks/scale.py --cap 1e10 --max-stored 2e8   # what ran on the shared machine

Runs stop starting new configurations after --budget minutes (default 25).
Writes benchmarks/results/scale[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import memory_profile as mp  # noqa: E402
from _common import pyplot, reference_lines, save_figure, tree_state  # noqa: E402
from sparsecore import memory as M  # noqa: E402

LAYERS = 16
ORDER = [(0.99, 0.98), (0.8, 0.5), "dense", (0.95, 0.9), (0.9, 0.8), (0.999, 0.998)]
GOALS = {"0.99/0.98": 3e10, "0.8/0.5": 1.3e9, "0.999/0.998": 1e11}
RESERVE_AFTER = 0.5   # the reserve's cap: past it a refresh spills to the cold store


def predicted(d: int, sf, sb) -> dict:
    p = mp.predict("transformer", d, LAYERS, sf, sb)
    if sf is not None:   # the reserve grows at the refresh: count it at RESERVE_AFTER K_B
        p["peak"] += int(12 * (RESERVE_AFTER - mp.RESERVE) * p["stored_params"])
    return p


def largest_d(sf, sb, avail: int, cap: float | None, max_stored: float | None = None) -> int:
    """Largest d (multiple of 64) whose predicted peak fits ``avail`` (and, if
    given, whose dense-equivalent size and stored B entries stay under the caps)."""
    def fits(d):
        p = predicted(d, sf, sb)
        return (mp.BASE_RSS + p["peak"] + mp.HEADROOM <= avail
                and (cap is None or p["dense_equivalent"] <= cap)
                and (max_stored is None or p.get("stored_params", 0) <= max_stored))
    lo, hi = 1, 1
    while fits(64 * hi * 2):
        hi *= 2
    hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(64 * mid) else (lo, mid)
    return 64 * lo if fits(64 * lo) else 0


def plot(rows, path, ram):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for r in rows:
        if "peaks" not in r:
            continue
        x = r["predicted"]["dense_equivalent"]
        y = max(r["peaks"].values())
        ax.plot([x], [y], "s" if r["sparsity"] == "dense" else "o", ms=8,
                label=f"{r['sparsity']}: {x:.2g} params, peak {y / mp.GiB:.1f} GiB")
    reference_lines(ax, [1e8, 2e11], ram)
    ax.set_ylabel("peak RSS (minus baseline), bytes")
    ax.set_title("Largest model trained per sparsity (build + AdamW step + refresh)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="cap sizes at 1e9")
    ap.add_argument("--only", nargs="*", help="forward sparsities (e.g. 0.99) or 'dense'")
    ap.add_argument("--budget", type=float, default=25.0, help="minutes")
    ap.add_argument("--cap", type=float, help="largest dense-equivalent size to try")
    ap.add_argument("--max-stored", type=float,
                    help="largest total K_B to try (steps, refresh cost ~1 us per B entry)")
    ap.add_argument("--headroom-gib", type=float,
                    help=f"free memory to leave (default {mp.HEADROOM / 2**30:g} GiB)")
    ap.add_argument("--timeout-factor", type=float, default=1.0,
                    help="multiply each child's time limit (a loaded machine is slower)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--stem", help="result file name (default scale / scale_quick)")
    a = ap.parse_args(argv)
    if a.headroom_gib is not None:
        mp.HEADROOM = int(a.headroom_gib * 2**30)
    t_start = time.perf_counter()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    stem = a.stem or ("scale" + ("_quick" if a.quick else ""))

    def save(rows):   # after every configuration, so an interrupted run keeps its results
        meta = {"machine": f"{os.cpu_count()} CPUs, {ram / mp.GiB:.1f} GiB RAM (shared)",
                "layers": LAYERS, "batch": mp.BATCH, "ctx": mp.CTX, "lr": 1e-4,
                "headroom": mp.HEADROOM, "reserve_after": RESERVE_AFTER, "argv": sys.argv[1:],
                "wall_s": time.perf_counter() - t_start,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tree": tree_state()}
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))

    for cfg in ORDER:
        sf, sb = (None, None) if cfg == "dense" else cfg
        name = "dense" if sf is None else f"{sf:g}/{sb:g}"
        if a.only and not any(o == name or (sf is not None and o == f"{sf:g}") for o in a.only):
            continue
        if a.quick and sf == 0.999:
            continue
        elapsed = (time.perf_counter() - t_start) / 60
        avail = mp.available_bytes()
        cap = 1e9 if a.quick else a.cap
        d = largest_d(sf, sb, avail, cap, a.max_stored)
        d_mem = largest_d(sf, sb, avail, None)         # what memory alone would allow
        pred = predicted(d, sf, sb) if d else {}
        row = {"sparsity": name, "sf": sf, "sb": sb, "d": d, "layers": LAYERS,
               "available_at_start": avail, "predicted": pred, "d_memory_bound": d_mem,
               "dense_equivalent_memory_bound": predicted(d_mem, sf, sb)["dense_equivalent"]
               if d_mem else 0}
        if elapsed > a.budget:
            row["skipped"] = f"not run: time budget ({a.budget:g} min) spent"
        elif not d:
            row["skipped"] = "nothing fits"
        if "skipped" in row:
            print(f"{name}: {row['skipped']}")
            rows.append(row)
            save(rows)
            continue
        print(f"[{elapsed:5.1f} min] {name}: d={d}, L={LAYERS}, dense-equivalent "
              f"{pred['dense_equivalent']:.3g}, stored {pred.get('stored_params', 0):.3g}, "
              f"predicted peak {mp.fmt(pred['peak'])} (available {mp.fmt(avail)}; memory alone "
              f"would allow d={d_mem}: {row['dense_equivalent_memory_bound']:.3g})", flush=True)
        spec = {"family": "transformer", "d": d, "layers": LAYERS, "sf": sf, "sb": sb,
                "phases": ["build", "step", "refresh"], "lr": 1e-4,
                "path": str(out / ".scale.ckpt")}
        timeout = mp.timeout_for(pred, sf is not None) * a.timeout_factor + 300
        row.update(mp.run_child(spec, timeout))
        if "peaks" in row:
            print("    " + ", ".join(f"{k} {mp.fmt(v)} ({row['times'][k]:.1f} s)"
                                     for k, v in row["peaks"].items())
                  + f"; first step {row['first_step_s']:.1f} s; total {row['wall_s']:.0f} s",
                  flush=True)
        else:
            print("    FAILED: " + row["error"][:400], flush=True)
        rows.append(row)
        save(rows)

    print(f"\n{'sparsity':>12}{'d':>7}{'dense-eq':>10}{'stored':>10}{'report':>11}"
          f"{'build':>11}{'step':>11}{'refresh':>11}{'t build':>9}{'t step':>8}"
          f"{'t refr.':>8}{'dense Adam':>12}{'adam/peak':>10}{'goal':>8}")
    for r in rows:
        p = r["predicted"]
        lead = f"{r['sparsity']:>12}{r['d']:>7}{p.get('dense_equivalent', 0):>10.3g}"
        if "peaks" not in r:
            print(lead + "  " + r.get("skipped", r.get("error", ""))[:100])
            continue
        stored = r.get("stored_params", p.get("dense_equivalent"))
        rep = r.get("memory_report", {}).get("total", p["steady"])
        pk, t = r["peaks"], r["times"]
        goal = GOALS.get(r["sparsity"])
        print(lead + f"{stored:>10.3g}{mp.fmt(rep):>11}"
              + "".join(f"{mp.fmt(pk.get(k, float('nan'))):>11}" for k in ("build", "step", "refresh"))
              + "".join(f"{t.get(k, float('nan')):>9.1f}" for k in ("build", "step", "refresh"))
              + f"{mp.fmt(M.dense_training_bytes(p['dense_equivalent'])):>12}"
              + f"{M.dense_training_bytes(p['dense_equivalent']) / max(pk.values()):>10.1f}"
              + (f"{'met' if p['dense_equivalent'] >= goal else 'short':>8}" if goal else f"{'':>8}"))
    print("(peaks: RSS high-water during the phase minus the child's baseline; t step: the "
          "second AdamW step, batch 1 x 16 tokens; t refr.: one refresh of every layer)")
    save(rows)
    print(f"wrote {out / (stem + '.json')}")
    plot(rows, out / f"{stem}.png", ram)


if __name__ == "__main__":
    main()
