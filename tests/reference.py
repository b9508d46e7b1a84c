"""Dense reference Top-KAST (the oracle for the engine; small layers only).

Holds the full dense theta, boolean masks A and B, and a torch optimizer over the
dense theta. Semantics follow ../shared/DESIGN.md §2 literally:
  * A = TopK(|theta|, K_A), B = TopK(|theta|, K_B), ties to the smaller flat index;
  * forward uses alpha = theta on A, 0 elsewhere;
  * the weight gradient exists only on B: dL/dalpha + lambda * c * theta with
    c = 1 on A and 1/D on B minus A;
  * theta outside B never changes; optimizer state lives only on B (kept for
    coordinates that stay in B, zero for those entering, dropped for leavers).
"""
from __future__ import annotations

import torch


def topk_mask(theta: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |theta| (flattened), ties to the smaller index."""
    flat = theta.detach().flatten()
    idx = torch.arange(flat.numel())
    # sort by (-|theta|, index): stable sort on index order, key -|theta|
    order = torch.sort(-flat.abs(), stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[idx[order[:k]]] = True
    return mask.view_as(theta)


class DenseTopKAST(torch.nn.Module):
    def __init__(self, theta0: torch.Tensor, bias: torch.Tensor | None, *, k_a: int, k_b: int,
                 exploration: float, density: float):
        super().__init__()
        self.theta = torch.nn.Parameter(theta0.clone())
        self.bias = torch.nn.Parameter(bias.clone()) if bias is not None else None
        self.k_a, self.k_b = k_a, k_b
        self.exploration, self.density = exploration, density
        self.a = topk_mask(self.theta, k_a)
        self.b = topk_mask(self.theta, k_b)
        self._alpha = None

    def forward(self, x):
        # one alpha leaf per optimizer step, shared by every use of the layer in it, so
        # several forwards/backwards (accumulation, a layer used twice) sum into it
        if self._alpha is None:
            self._alpha = (self.theta.detach() * self.a).requires_grad_(True)
        y = x @ self._alpha.t()
        return y + self.bias if self.bias is not None else y

    def weight_grad(self):
        """Turn dL/dalpha (after loss.backward) into theta.grad per Top-KAST."""
        c = torch.where(self.a, torch.ones_like(self.theta), torch.full_like(self.theta, 1 / self.density))
        g = (self._alpha.grad + self.exploration * c * self.theta.detach()) * self.b
        self.theta.grad = g
        self._alpha = None

    def _theta_state(self, opt):
        st = opt.state.get(self.theta, {})
        return [t for t in st.values() if torch.is_tensor(t) and t.shape == self.theta.shape]

    @torch.no_grad()
    def step(self, opt):
        self.weight_grad()
        before = self.theta.detach().clone()
        opt.step()
        outside = ~self.b
        self.theta[outside] = before[outside]
        for t in self._theta_state(opt):
            t[outside] = 0

    @torch.no_grad()
    def refresh(self, opt=None):
        self._alpha = None
        old_b = self.b
        self.a = topk_mask(self.theta, self.k_a)
        self.b = topk_mask(self.theta, self.k_b)
        if opt is not None:
            keep = old_b & self.b
            for t in self._theta_state(opt):
                t[~keep] = 0

    def active_indices(self):
        return torch.nonzero(self.a.flatten()).flatten()

    def backward_indices(self):
        return torch.nonzero(self.b.flatten()).flatten()
