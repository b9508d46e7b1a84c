"""Experiment, not a supported path: FSDP2 (fully_shard) over a SparseModel on CPU/gloo with a *gathered*
refresh (all-gather values and optimizer state, refresh identically on every rank,
keep the local shard). Compared with the one-process oracle (float64, Adam).

It patches two things sparsecore does not do yet (docs/distributed.md, "FSDP2"):
the CPU kernels' numpy view of their inputs (``.numpy()`` makes a tensor's
storage non-resizable, which breaks FSDP's resharding; ``np.from_dlpack`` does
not), and the refresh, done here by hand on gathered tensors. Exploration is 0:
the exploration hook does not find FSDP's replacement parameters.

    python benchmarks/fsdp2_prototype.py
"""
import socket, datetime, warnings
import numpy as np
import torch, torch.distributed as dist, torch.multiprocessing as mp
import sparsecore as sc
from torch import nn

STEPS, EVERY, B = 7, 3, 8


def _as_numpy(t, name):     # stand-in for the proposed kernels/_validate.as_numpy fix
    if t.requires_grad:
        t = t.detach()
    return np.from_dlpack(t.contiguous())


def build():
    warnings.simplefilter("ignore")
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    return sc.SparseModel(net, forward_sparsity=0.7, backward_sparsity=0.4, refresh_every=EVERY,
                          exploration=0.0, verbose=False, check_distributed=False)


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(B, 12, generator=g, dtype=torch.float64), torch.randn(B, 5, generator=g, dtype=torch.float64)


@torch.no_grad()
def gathered_refresh(layer, opt, rank, world):
    from torch.distributed.tensor import DTensor
    p = layer.values
    full = p.full_tensor()
    st = opt.state.get(p, {})
    full_st = {k: v.full_tensor() for k, v in st.items() if isinstance(v, DTensor)}
    tmp = nn.Parameter(full.clone())
    layer._parameters["values"] = tmp
    proxy = torch.optim.SGD([tmp], lr=0.0)
    proxy.state[tmp] = full_st
    try:
        layer.refresh(proxy)
    finally:
        layer._parameters["values"] = p
    p.to_local().copy_(tmp.detach().chunk(world)[rank])
    for k, v in full_st.items():
        st[k].to_local().copy_(v.chunk(world)[rank])


def run(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from sparsecore.kernels import _validate
    _validate.as_numpy.__code__ = _as_numpy.__code__
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    model = build()
    layers = model.sparse_layers()
    for l in layers.values():
        fully_shard(l, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    per = B // world
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[rank*per:(rank+1)*per]), y[rank*per:(rank+1)*per]).backward()
        opt.step()
        if (step + 1) % EVERY == 0:
            for l in layers.values():
                gathered_refresh(l, opt, rank, world)
    got = {n: (l.values.full_tensor(), l.active_indices(), l.backward_indices()) for n, l in layers.items()}
    local = {n: tuple(l.values.to_local().shape) for n, l in layers.items()}
    if rank == 0:
        ref = build()
        o = torch.optim.Adam(ref.parameters(), lr=0.05)
        ref.attach(o)
        for step in range(STEPS):
            x, y = batch(step)
            o.zero_grad(set_to_none=True)
            nn.functional.mse_loss(ref(x), y).backward()
            o.step()
        for n, l in ref.sparse_layers().items():
            v, a, b = got[n]
            print(f"layer {n}: K_B={l.k_b} local shard {local[n]}, refreshes {l.stats['refreshes']}, "
                  f"A changed at last refresh {l.stats['changed_a']:.0%}, A same: {torch.equal(a, l.active_indices())}, B same: {torch.equal(b, l.backward_indices())}, "
                  f"max |values - oracle| = {(v - l.values.detach()).abs().max().item():.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(run, args=(2, port), nprocs=2)
