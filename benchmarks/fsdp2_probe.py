"""Try FSDP2 (fully_shard) on a SparseModel with gloo on CPU and report what
happens at each stage (docs/distributed.md, "FSDP2").

    python benchmarks/fsdp2_probe.py            # sparsecore as it is
    DLPACK=1 python benchmarks/fsdp2_probe.py   # with the proposed as_numpy fix
    TB=1 ...                                  # print tracebacks
"""
import os, socket, traceback, datetime, warnings
import torch, torch.distributed as dist, torch.multiprocessing as mp
import sparsecore as sc
from torch import nn

def _as_numpy(t, name):
    import numpy as np
    if t.requires_grad:
        t = t.detach()
    return np.from_dlpack(t.contiguous())


def stage(rank, name, fn):
    try:
        out = fn()
        if rank == 0: print(f"[ok]   {name}" + (f": {out}" if out is not None else ""), flush=True)
        return True, out
    except Exception as e:
        if rank == 0:
            print(f"[FAIL] {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            if os.environ.get("TB"): traceback.print_exc()
        return False, None

def run(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    warnings.simplefilter("ignore")
    if os.environ.get("DLPACK"):
        from sparsecore.kernels import _validate
        _validate.as_numpy.__code__ = _as_numpy.__code__
        if rank == 0: print("(patched kernels/_validate.as_numpy to use np.from_dlpack)")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    model = sc.SparseModel(net, forward_sparsity=0.7, backward_sparsity=0.4, refresh_every=2, verbose=False,
                           check_distributed=False)
    layer = model.sparse_layers()["0"]
    kb = layer.k_b
    old_values = layer.values
    ok, mesh = stage(rank, "init_device_mesh('cpu', (2,))", lambda: init_device_mesh("cpu", (world,)))
    ok, _ = stage(rank, "fully_shard(each sparse layer) + fully_shard(model)", lambda: (
        [fully_shard(l, mesh=mesh) for l in model.sparse_layers().values()], fully_shard(model, mesh=mesh))[1] and None)
    if not ok: return
    v = layer.values
    stage(rank, "values after fully_shard", lambda: f"{type(v).__name__} {type(v.data).__name__ if hasattr(v,'data') else ''} "
          f"placements={getattr(v,'placements',None)} local shape={tuple(v.to_local().shape) if hasattr(v,'to_local') else None} of K_B={kb}; "
          f"same Parameter object as before: {v is old_values}")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 12); y = torch.randn(8, 4)
    ok, _ = stage(rank, "forward + backward", lambda: nn.functional.mse_loss(model(x[rank*4:(rank+1)*4]), y[rank*4:(rank+1)*4]).backward())
    if ok:
        stage(rank, "values.grad after backward", lambda: f"{type(layer.values.grad).__name__} local {tuple(layer.values.grad.to_local().shape)}")
        stage(rank, "optimizer step (exploration pre-hook)", lambda: opt.step())
        from sparsecore.layers import _LAYER_OF
        stage(rank, "exploration registry still knows values", lambda: id(layer.values) in _LAYER_OF)
        stage(rank, "Adam state shape", lambda: {k: (type(t).__name__, tuple(t.to_local().shape) if hasattr(t, 'to_local') else tuple(t.shape)) for k, t in opt.state[layer.values].items()})
    stage(rank, "layer.refresh(opt) on the sharded values", lambda: layer.refresh(opt))
    stage(rank, "SparseModel.attach(opt)", lambda: model.attach(opt))
    stage(rank, "state_dict()", lambda: {k: type(v).__name__ for k, v in model.state_dict().items() if "0." in k})
    dist.destroy_process_group()

if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(run, args=(2, port), nprocs=2)
