"""SparseModel under DistributedDataParallel: two gloo ranks over loopback train
exactly like one process with the whole batch (the oracle), through refreshes;
the topology check names the layer and rank when ranks disagree, without
hanging; a checkpoint written under DDP resumes in one process; DDP
communicates K_B values per sparse layer, nothing of the pool; and
``torchrun -m sparsecore train`` shards the data and resumes under another
world size."""
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback

import sparsecore as sc  # noqa: F401  (before torch: OpenMP wait policy)
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsecore import distributed as scd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
STEPS, EVERY, BATCH, SAVE_AT = 10, 3, 8, 5   # refreshes after steps 3, 6, 9
D_IN, H, D_OUT = 12, 16, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D_IN, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(),
                         nn.Linear(H, D_OUT)).double()


def _sparse(seed=0, sf=0.7, sb=0.4):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "discarded the dense weights"
        return sc.SparseModel(_net(), forward_sparsity=sf, backward_sparsity=sb,
                              refresh_every=EVERY, exploration=0.05, seed=seed,
                              verbose=False)


def _batch(step):
    """The global batch of ``step`` (a pure function of the step)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, D_OUT, generator=g, dtype=torch.float64)
    return x, y


def _opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.2, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)


def _snapshot(model):
    return {"values": {n: l.values.detach().clone() for n, l in model.sparse_layers().items()},
            "A": {n: l.active_indices() for n, l in model.sparse_layers().items()},
            "B": {n: l.backward_indices() for n, l in model.sparse_layers().items()},
            "dense": {n: p.detach().clone() for n, p in model.named_parameters()
                      if not n.endswith(".values")}}


def _train(model, opt, forward, steps, *, rank=0, world=1, start=0, on_refresh=None,
           on_step=None):
    """Steps ``start``..``steps``-1 on this rank's rows of each global batch; a
    snapshot after every refresh."""
    snaps = []
    per = BATCH // world
    for step in range(start, steps):
        x, y = _batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(forward(x), y).backward()
        opt.step()                          # refreshes after steps 3, 6, 9
        if model.step_count % EVERY == 0:
            snaps.append(_snapshot(model))
        if on_step is not None:
            on_step(step + 1)
    return snaps


def _oracle(kind):
    model = _sparse()
    opt = _opt(kind, model.parameters())
    model.attach(opt)
    snaps = _train(model, opt, model, STEPS)
    return model, snaps


# ------------------------------------------------------------------ spawning
def _entry(rank, world, port, out_dir, scenario):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        import numba
        numba.set_num_threads(1)
    except (ImportError, ValueError):
        pass
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = globals()[scenario](rank, world, out_dir)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(scenario, tmp_path, timeout=120):
    """Run ``scenario(rank, world, out_dir)`` on 2 gloo ranks; return each rank's
    result. Fails (killing the ranks) instead of hanging."""
    out = str(tmp_path)
    ctx = mp.start_processes(_entry, args=(WORLD, _free_port(), out, scenario), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError(f"{scenario}: ranks still running after {timeout}s (hang)")
    except mp.ProcessRaisedException as e:
        errs = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out))
                if f.endswith(".err")]
        raise AssertionError(f"{scenario} failed:\n" + "\n".join(errs)) from e
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


# ------------------------------------------------------------------ scenarios (in ranks)
def _scenario_ddp(rank, world, out_dir):
    """Train with DDP for SGD+momentum and AdamW; count bytes per step; rank 0
    saves a checkpoint at step SAVE_AT (AdamW run)."""
    res = {}
    for kind in ("sgd", "adamw"):
        model = _sparse()
        ddp = DDP(model)
        counter = scd.count_allreduce_bytes(ddp)
        opt = _opt(kind, ddp.parameters())
        model.attach(opt)

        def save(step, model=model, opt=opt, kind=kind):
            if kind == "adamw" and step == SAVE_AT and scd.is_main():
                sc.save(model, os.path.join(out_dir, "ckpt.safetensors"), optimizer=opt)
        snaps = _train(model, opt, ddp, STEPS, rank=rank, world=world, on_step=save)
        res[kind] = {"snaps": snaps, "final": _snapshot(model),
                     "bytes_per_step": counter.bytes / STEPS, "buckets": counter.calls / STEPS}
    dense = DDP(_net())
    counter = scd.count_allreduce_bytes(dense)
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    for step in range(2):
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(dense(x[:BATCH // world]), y[:BATCH // world]).backward()
        opt.step()
    res["dense_bytes_per_step"] = counter.bytes / 2
    return res


def _scenario_mismatch(rank, world, out_dir):
    """Three bad setups, each caught on both ranks with the same message."""
    msgs = {}
    # 1. rank 1 built with another seed: caught at attach (before any training)
    model = _sparse(seed=rank)
    try:
        model.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    except scd.TopologyError as e:
        msgs["seed"] = str(e)
    # 2. rank 1 built with another sparsity: caught at attach, before DDP sees it
    model = _sparse(sf=0.7 if rank == 0 else 0.6)
    try:
        model.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    except scd.TopologyError as e:
        msgs["config"] = str(e)
    # 3. rank 1's values corrupted before the first refresh: caught by that refresh
    model = _sparse()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    model.attach(opt)

    def corrupt(step):
        if step == EVERY - 1 and rank == 1:
            layer = model.sparse_layers()["2"]
            with torch.no_grad():
                layer.values[layer.k_a:] *= 100.0    # B minus A overtakes A
    try:
        _train(model, opt, ddp, EVERY, rank=rank, world=world, on_step=corrupt)
    except scd.TopologyError as e:
        msgs["refresh"] = str(e)
    # 4. sparsecore train refuses a global batch the ranks cannot share
    import contextlib
    import io
    from sparsecore import cli
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["train", "--quick", "--batch", "3", "--runs-dir", out_dir])
    msgs["cli"] = (rc, err.getvalue())
    # 5. the process group still works after these errors (nothing hung)
    t = torch.ones(1)
    dist.all_reduce(t)
    msgs["after"] = float(t)
    return msgs


def _scenario_all(rank, world, out_dir):
    """Both scenarios in one pair of processes (start-up dominates their cost)."""
    return {"ddp": _scenario_ddp(rank, world, out_dir),
            "mismatch": _scenario_mismatch(rank, world, out_dir)}


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    return _spawn("_scenario_all", d), d


@pytest.fixture(scope="module")
def ddp_run(spawned):
    return [r["ddp"] for r in spawned[0]], spawned[1]


@pytest.fixture(scope="module")
def ddp_results(ddp_run):
    return ddp_run[0]


def _assert_close(a, b, what, tol=1e-10):
    for k in a:
        assert a[k].shape == b[k].shape, (what, k)
        assert torch.allclose(a[k], b[k], rtol=0, atol=tol), \
            (what, k, (a[k] - b[k]).abs().max().item())


def _assert_same_sets(a, b, what):
    for kind in ("A", "B"):
        for n in a[kind]:
            assert torch.equal(a[kind][n], b[kind][n]), (what, kind, n)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_two_ranks_equal_one_process_with_the_whole_batch(ddp_results, kind):
    model, snaps = _oracle(kind)
    assert len(snaps) == 3
    changed = [s["A"] for s in snaps]
    assert any(not torch.equal(changed[0][n], changed[-1][n]) for n in changed[0]), \
        "A never changed: the test would not see a wrong refresh"
    for r, res in enumerate(ddp_results):
        got = res[kind]
        assert len(got["snaps"]) == len(snaps)
        for i, (s, o) in enumerate(zip(got["snaps"], snaps)):
            _assert_same_sets(s, o, f"rank {r} refresh {i}")
            _assert_close(s["values"], o["values"], f"rank {r} refresh {i}")
        _assert_close(got["final"]["values"], _snapshot(model)["values"], f"rank {r} final")
        _assert_close(got["final"]["dense"], _snapshot(model)["dense"], f"rank {r} dense")


def test_bytes_per_step_are_k_b_plus_dense(ddp_results):
    model = _sparse()
    k_b = sum(l.k_b for l in model.sparse_layers().values())
    pool = sum(l.pool_size() for l in model.sparse_layers().values())
    n_dense = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".values"))
    n_all = sum(p.numel() for p in _net().parameters())
    for res in ddp_results:
        for kind in ("sgd", "adamw"):
            assert res[kind]["bytes_per_step"] == 8 * (k_b + n_dense)
        assert res["dense_bytes_per_step"] == 8 * n_all
    assert k_b < pool and 8 * (k_b + n_dense) < 8 * n_all


def test_checkpoint_written_under_ddp_resumes_in_one_process(ddp_run):
    path = str(ddp_run[1] / "ckpt.safetensors")
    model = _sparse()
    opt = _opt("adamw", model.parameters())
    model.attach(opt)
    sc.load(path, model, optimizer=opt)
    assert model.step_count == SAVE_AT
    _train(model, opt, model, STEPS, start=SAVE_AT)
    oracle, _ = _oracle("adamw")
    _assert_close(_snapshot(model)["values"], _snapshot(oracle)["values"], "resumed")
    _assert_same_sets(_snapshot(model), _snapshot(oracle), "resumed")


def test_mismatched_ranks_raise_naming_layer_and_rank(spawned):
    res = [r["mismatch"] for r in spawned[0]]
    assert res[0] == res[1]          # every rank raises the same error
    m = res[0]
    assert set(m) == {"seed", "config", "refresh", "cli", "after"}, m
    assert "(attach): seed differs: rank 0 has 0, rank 1: 1" in m["seed"]
    assert "layer '0' on rank(s) [1]" in m["config"] and "configuration" in m["config"]
    assert f"refresh at step {EVERY}" in m["refresh"]
    assert "layer '2' on rank(s) [1]" in m["refresh"] and "A set differs" in m["refresh"]
    assert m["after"] == WORLD
    rc, err = m["cli"]
    assert rc == 2 and "--batch 3 is the global batch and must be divisible by the number " \
        "of ranks (2)" in err and len(err.strip().splitlines()) == 1


def test_single_process_check_is_a_no_op():
    model = _sparse()
    model.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    scd.check_topology(model)            # not initialised: nothing to compare
    assert scd.rank() == 0 and scd.world_size() == 1 and not scd.is_distributed()


def test_digests_see_every_part_of_the_topology():
    a, b = _sparse(), _sparse()
    da, db = scd.topology_digests(a), scd.topology_digests(b)
    assert da == db
    assert scd.topology_digests(_sparse(seed=1))["0"]["config"] != da["0"]["config"]
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    b.attach(opt)
    with torch.no_grad():
        layer = b.sparse_layers()["2"]
        layer.values[layer.k_a:] *= 100.0
    b.refresh()
    db = scd.topology_digests(b)
    assert db["2"]["A"] != da["2"]["A"] and db["0"] == da["0"]


# ------------------------------------------------------------------ torchrun
TINY = ["--quick", "--steps", "8", "--eval-every", "4", "--save-every", "4",
        "--refresh-every", "2", "--max-bytes", "64KiB", "--val-tokens", "512"]


def _records(run, kind):
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["type"] == kind]


def test_torchrun_train_then_resume_on_one_process(tmp_path):
    """2 ranks x 4 sequences for 4 steps (torchrun), then 1 process x 8 sequences
    for steps 5..8 (--resume) == 1 process x 8 sequences throughout."""
    from sparsecore import cli
    runs = str(tmp_path / "runs")
    assert cli.main(["train", "--runs-dir", runs, "--name", "one", *TINY]) == 0
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "sparsecore", "train", "--runs-dir", runs, "--name", "two", *TINY,
           "--stop-at", "4"]
    p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("done: 4 of 8 steps") == 1            # rank 0 alone reports
    assert "on 2 ranks (4 sequences per rank" in p.stdout
    two = os.path.join(runs, "two")
    assert [r["step"] for r in _records(two, "train")] == [1, 2, 3, 4]   # logged once
    assert cli.main(["train", "--runs-dir", runs, "--name", "two", "--resume"]) == 0
    one = os.path.join(runs, "one")
    assert [r["step"] for r in _records(two, "train")] == list(range(1, 9))
    for kind in ("train", "val"):
        a = [r["loss" if kind == "train" else "bpb"] for r in _records(one, kind)]
        b = [r["loss" if kind == "train" else "bpb"] for r in _records(two, kind)]
        assert len(a) == len(b)
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), kind
    assert a[-1] < a[0] - 0.3
