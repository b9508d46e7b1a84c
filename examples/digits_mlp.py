"""Train a Top-KAST MLP on scikit-learn's bundled 8x8 digits (no download).

90% of every weight matrix is zero in the forward pass (forward_sparsity=0.9),
80% never receives a gradient (backward_sparsity=0.8); the dense weights are
never allocated. The training loop is a plain PyTorch loop: SparseModel.attach()
makes the optimizer refresh the sparse sets every ``refresh_every`` steps.

    python examples/digits_mlp.py            # a few seconds on a laptop CPU
"""
from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import sparsecore as sc


def load_data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed,
                                              stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6   # standardise with training statistics

    def to_tensor(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return to_tensor(x_tr), torch.tensor(y_tr), to_tensor(x_te), torch.tensor(y_te)


def main(epochs: int = 10, seed: int = 0, verbose: bool = True) -> float:
    t0 = time.perf_counter()
    torch.manual_seed(seed)   # the dense biases come from torch's RNG (SparseModel keeps them)
    x_tr, y_tr, x_te, y_te = load_data(seed)

    # 1. an ordinary PyTorch model ...
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(),
                        nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    # 2. ... whose nn.Linear layers become Top-KAST layers (the dense weights above
    #    are discarded; sparse initial values come from the seed and layer names)
    model = sc.SparseModel(net, forward_sparsity=0.9, backward_sparsity=0.8,
                           refresh_every=10, seed=seed)
    # 3. any torch optimizer over model.parameters(); attach() installs the refresh hook
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.attach(opt)

    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()           # every 10th step also refreshes A and B
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    if verbose:
        total = model.stats()["total"]
        print(f"steps {model.step_count}, refreshes {model.step_count // model.refresh_every}, "
              f"forward non-zeros {total['nnz_a']:,} of {total['dense_equivalent']:,} weights")
        print(f"test accuracy {acc:.4f} ({time.perf_counter() - t0:.1f}s)")
    return acc


if __name__ == "__main__":
    main()
