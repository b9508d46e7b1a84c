"""Bytes all-reduced per optimizer step by DistributedDataParallel for the
``sparsecore train`` model (Top-KAST) and the same model trained dense, measured
with a DDP communication hook (sparsecore.distributed.count_allreduce_bytes) on
two gloo ranks over loopback.

    python benchmarks/ddp_comm_bytes.py [--d-model 128 --layers 4]
"""
import argparse
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsecore import distributed as scd
from sparsecore.models.gpt import GPTConfig, build_model

STEPS = 3


def measure(rank, world, port, cfg, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    for dense in (False, True):
        model = build_model(cfg, dense=dense, refresh_every=2)
        ddp = DDP(model)
        counter = scd.count_allreduce_bytes(ddp)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        if not dense:
            model.attach(opt)
        x = torch.randint(0, 256, (2, cfg.context))
        for _ in range(STEPS):        # spans a refresh (after step 2)
            opt.zero_grad()
            logits = ddp(x)
            F.cross_entropy(logits.reshape(-1, 256), x.reshape(-1)).backward()
            opt.step()
        params = sum(p.numel() for p in model.parameters())
        extra = ""
        if not dense:
            layers = model.sparse_layers().values()
            k_b = sum(l.k_b for l in layers)
            pool = sum(l.pool_size() for l in layers)
            n_dense_eq = sum(l.n_total for l in layers)
            extra = (f" (K_B {k_b:,} of {n_dense_eq:,} dense-equivalent sparse weights; "
                     f"pool {pool:,} never sent)")
        rows.append(f"{'dense' if dense else 'Top-KAST'}: {counter.bytes / STEPS:,.0f} bytes/step "
                    f"in {counter.calls / STEPS:.0f} bucket(s); trainable parameters "
                    f"{params:,} x 4 B = {4 * params:,}{extra}")
    if rank == 0:
        with open(out, "w") as fh:
            fh.write("\n".join(rows) + "\n")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    a = ap.parse_args()
    cfg = GPTConfig(d_model=a.d_model, layers=a.layers, heads=a.heads, context=a.context)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/ddp_comm_bytes.{os.getpid()}.txt"
    mp.spawn(measure, args=(2, port, cfg, out), nprocs=2)
    with open(out) as fh:
        print(f"GPT d_model={a.d_model} layers={a.layers}, forward/backward sparsity 0.9/0.8:")
        print(fh.read(), end="")
    os.unlink(out)


if __name__ == "__main__":
    main()
