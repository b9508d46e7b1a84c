"""``python -m sparsecore``: print version, kernel backend and threads, then run a
tiny Top-KAST training smoke test (a few steps and one refresh)."""
from __future__ import annotations

import sys
import time


def main(argv=None) -> int:
    import numba
    import torch

    import sparsecore as sc
    from sparsecore import kernels

    print(f"sparsecore {sc.__version__}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads, "
          f"layer {numba.config.THREADING_LAYER})")
    print(f"kernel backend (cpu): {kernels.backend_name('cpu')}; "
          f"cuda available: {torch.cuda.is_available()}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    layer = sc.TopKASTLinear(256, 128, forward_sparsity=0.9, backward_sparsity=0.8)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x, target = torch.randn(64, 256), torch.randn(64, 128)
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    info = layer.refresh(opt)
    print(f"smoke: {layer}")
    print(f"smoke: loss {loss.item():.4f}, refresh changed {info['changed_a']:.1%} of A, "
          f"{time.perf_counter() - t0:.2f}s (includes first-call compilation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
