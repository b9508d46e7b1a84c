"""The memory planner: its predictions against built, trained small models (the
analytic state against memory_report(), the predicted peak against the measured
RSS of a subprocess), and the planner command on a model far bigger than RAM."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sparsecore import cli
from sparsecore.memory import parse_bytes
from sparsecore.models import GPTConfig, build_model, count_parameters
from sparsecore.plan import format_plan, plan_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_step(model, opt, cfg, batch):
    x = torch.randint(0, 256, (batch, cfg.context + 1), generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("d, layers, heads, ctx, fs, bs, optim", [
    (32, 2, 2, 16, 0.9, 0.8, "adamw"),
    (64, 1, 4, 16, 0.95, 0.5, "sgd"),
    (48, 2, 2, 8, 0.8, 0.8, "adam"),
])
def test_plan_matches_built_model(d, layers, heads, ctx, fs, bs, optim):
    cfg = GPTConfig(d_model=d, layers=layers, heads=heads, context=ctx)
    model = build_model(cfg, forward_sparsity=fs, backward_sparsity=bs, seed=1)
    opt = cli._make_optimizer(optim, model.parameters(), 1e-3, 0.0)
    model.attach(opt)
    one_step(model, opt, cfg, batch=2)
    p = plan_training(cfg, forward_sparsity=fs, backward_sparsity=bs, optimizer=optim, batch=2)
    layers_ = model.sparse_layers()
    # exact: element counts
    assert p["k_a"] == sum(l.k_a for l in layers_.values())
    assert p["k_b"] == sum(l.k_b for l in layers_.values())
    assert p["dense_equivalent_params"] == count_parameters(cfg)
    sparse_ids = {id(l.values) for l in layers_.values()}
    stored = p["k_b"] + sum(p_.numel() for p_ in model.parameters() if id(p_) not in sparse_ids)
    assert p["stored_params"] == stored
    rep = model.memory_report(opt)
    # exact where the layout is fixed
    for kind in ("values", "gradients", "dense_parameters", "dense_gradients"):
        assert p["sparsecore"][kind] == rep[kind], kind
    # the whole state within 1.2x of what the built model reports after a step
    ratio = p["sparsecore"]["state"] / rep["total"]
    assert 1 / 1.2 <= ratio <= 1.2, (ratio, dict(rep), p["sparsecore"])
    if optim != "sgd":   # memory_report's dense equivalent assumes two Adam states
        assert p["dense"]["state"] == rep["dense_equivalent"]


_PROBE = r"""
import json, sys
import sparsecore, torch
from sparsecore.models import GPTConfig, build_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

d, layers, ctx, batch = (int(a) for a in sys.argv[1:5])
# compile the kernels on a throw-away model first, so their memory is not counted
w = build_model(GPTConfig(d_model=16, layers=1, heads=2, context=8))
o = torch.optim.AdamW(w.parameters()); w.attach(o)
x = torch.randint(0, 256, (2, 9))
torch.nn.functional.cross_entropy(w(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1)).backward()
o.step(); del w, o
cfg = GPTConfig(d_model=d, layers=layers, heads=4, context=ctx)
x = torch.randint(0, 256, (batch, ctx + 1))
before = status("VmRSS")
model = build_model(cfg, forward_sparsity=0.9, backward_sparsity=0.8)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3); model.attach(opt)
for _ in range(2):
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
print(json.dumps({"peak_delta": status("VmHWM") - before}))
"""


def test_plan_peak_against_measured_rss():
    """Predicted peak (state + activations) vs the measured peak RSS growth of a
    training process. glibc is told to return freed blocks (mmap threshold 64 KiB)
    so the high-water mark is live memory, not the allocator's cache."""
    d, layers, ctx, batch = 128, 2, 256, 64
    env = dict(os.environ, PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", _PROBE, str(d), str(layers), str(ctx),
                          str(batch)], capture_output=True, text=True, env=env, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_delta"]
    cfg = GPTConfig(d_model=d, layers=layers, heads=4, context=ctx)
    predicted = plan_training(cfg, forward_sparsity=0.9, backward_sparsity=0.8,
                              batch=batch)["sparsecore"]["total"]
    assert 1 / 1.2 <= predicted / measured <= 1.2, (predicted, measured)


def test_plan_command_huge_model(capsys):
    """48 layers of d_model 16384 (155 billion dense weights): planned without
    allocating; the parameter count matches an independent formula."""
    d, L = 16384, 48
    rss0 = cli.rss_bytes()
    rc = cli.main(["plan", "--d-model", str(d), "--layers", str(L), "--heads", "128",
                   "--context", "1024", "--batch", "1", "--forward-sparsity", "0.99",
                   "--backward-sparsity", "0.98", "--gpu-memory", "80GB", "--json"])
    assert rc == 0
    assert cli.rss_bytes() - rss0 < 64 * 2 ** 20
    p = json.loads(capsys.readouterr().out)
    per_block = 12 * d * d + 13 * d          # qkv, proj, fc, proj (+ biases) and 2 norms
    expected = L * per_block + 256 * d + 2 * d + 256 * d + 256
    assert p["dense_equivalent_params"] == expected
    assert p["dense"]["state"] == 16 * expected             # Adam: 16 B per parameter
    assert p["masked_dense"]["state"] == 18 * expected      # + two boolean masks
    assert p["sparsecore"]["state"] < p["dense"]["state"] / 20
    assert p["gpu_memory"] == 80 * 10 ** 9


def test_plan_text_and_fit_verdicts(capsys):
    cfg = GPTConfig(d_model=64, layers=2, heads=2, context=64)
    p = plan_training(cfg, forward_sparsity=0.9, backward_sparsity=0.8, batch=4)
    roomy = format_plan(p, cfg=cfg, forward_sparsity=0.9, backward_sparsity=0.8,
                        optimizer="adamw", batch=4, ram=(2 ** 40, 2 ** 40), gpu_memory=2 ** 40)
    assert roomy.count("RAM fits") == 3 and roomy.count("GPU fits") == 3
    # between the sparse and the dense need: only sparsecore fits
    between = (p["sparsecore"]["total"] + p["dense"]["total"]) // 2
    text = format_plan(p, cfg=cfg, forward_sparsity=0.9, backward_sparsity=0.8,
                       optimizer="adamw", batch=4, ram=(between, between))
    assert text.count("RAM fits") == 1 and text.count("RAM does NOT fit") == 2
    assert cli.main(["plan", "--d-model", "64", "--layers", "2", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "dense-equivalent" in out and "predicted peak" in out and "masked-dense" in out


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10 ** 9
    assert parse_bytes("16 GiB") == 16 * 2 ** 30
    assert parse_bytes("512M") == 512 * 10 ** 6
    assert parse_bytes("1000") == 1000
    for bad in ("", "-1GB", "GB", "12 parsecs", "nan"):
        with pytest.raises(ValueError, match="positive size"):
            parse_bytes(bad)
