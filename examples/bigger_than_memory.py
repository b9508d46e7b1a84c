"""Build, train, refresh, checkpoint and export a model whose dense form does not
fit in this machine's memory.

Four 40,000 x 40,000 linear layers hold 6.4 billion weights: 25.6 GB in float32,
~102 GB with gradients and two Adam states. The model is declared on the meta
device (no memory), SparseModel builds the sparse layers by a streaming scan and
materialises the small dense parts (LayerNorm, biases) on the CPU.

    python examples/bigger_than_memory.py        # ~10-40 s on 2 cores, < 1 GB RSS
"""
from __future__ import annotations

import os
import resource
import tempfile
import time

import torch

import sparsecore as sc
from torch import nn

WIDTH = 40_000


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def build(seed: int = 0) -> sc.SparseModel:
    with torch.device("meta"):                      # nothing is allocated here
        net = nn.Sequential(Block(WIDTH), Block(WIDTH), nn.LayerNorm(WIDTH))
    return sc.SparseModel(net, forward_sparsity=0.9999, backward_sparsity=0.9998,
                          refresh_every=3, seed=seed,
                          overrides={"1.fc2": {"forward_sparsity": 0.99995,
                                               "backward_sparsity": 0.9999}})


def main() -> None:
    t0 = time.perf_counter()
    model = build()
    print(f"built in {time.perf_counter() - t0:.1f}s")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.attach(opt)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, WIDTH, generator=g)
    target = torch.randn(4, WIDTH, generator=g)
    for step in range(3):                           # the third step also refreshes
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {model.step_count}: loss {loss.item():.5f}")

    print(model.memory_report())
    total = model.stats()["total"]
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in total.items()})

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "big.sparsecore")
        sc.save(model, path, optimizer=opt, extra={"note": "demo"})
        print(f"checkpoint: {os.path.getsize(path) / 1e6:.1f} MB")

    weights = sc.export.to_scipy(model)
    print("exported:", {n: f"{a.shape}, nnz={a.nnz}" for n, a in weights.items()})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB, total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
