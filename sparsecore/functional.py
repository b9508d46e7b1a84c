"""The autograd function of a Top-KAST linear layer.

Forward:  y = x W_A^T                         (spmm over the forward set A)
Backward: dx = dy W_A                          (spmm_t over A's cached transpose)
          g_k = sum_n dy[n,row_k] x[n,col_k] + lambda c_k theta_k   for every k in B
          with c = 1 on A and 1/D on B minus A  (sddmm, regulariser fused)

The weight gradient on B minus A is the gradient with respect to the (zero)
forward weight at those positions, which is what lets them grow into A. It is
therefore *not* the derivative of y with respect to ``values[K_A:]`` (which is 0):
gradcheck applies only with B = A and lambda = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


@dataclass(frozen=True)
class SparsePlan:
    """Index structures of one layer at one moment (replaced, never mutated, by a
    refresh, so a forward pass keeps the plan it started with)."""

    in_features: int
    out_features: int
    k_a: int
    a_indptr: torch.Tensor      # (out+1,) int64: CSR of A
    a_cols: torch.Tensor        # (K_A,) int32
    x_indptr: torch.Tensor      # (out+1,) int64: CSR of B minus A
    x_cols: torch.Tensor        # (K_B-K_A,) int32
    at_indptr: torch.Tensor     # (in+1,) int64: CSR of A^T
    at_rows: torch.Tensor       # (K_A,) int32
    at_perm: torch.Tensor       # (K_A,) int64: position in values[:K_A]
    reg_a: float                # lambda
    reg_x: float                # lambda / D


class TopKASTLinearFunction(torch.autograd.Function):
    """``apply(x2d, values, plan) -> y2d``; x2d is (n, in), values is theta_B."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, plan: SparsePlan):
        xt = x2d.t().contiguous()
        wa = values.detach()[: plan.k_a]
        yt = kernels.spmm(plan.a_indptr, plan.a_cols, wa, xt, check=False)
        ctx.save_for_backward(xt, values)
        ctx.plan = plan
        return yt.t().contiguous()

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xt, values = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        gt = dy.t().contiguous()
        v = values.detach()
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dxt = kernels.spmm_t(plan.at_indptr, plan.at_rows, plan.at_perm, v[: plan.k_a], gt,
                                 check=False)
            dx = dxt.t().contiguous()
        if ctx.needs_input_grad[1]:
            dvalues = torch.empty_like(v)
            k = plan.k_a
            kernels.sddmm(plan.a_indptr, plan.a_cols, gt, xt, theta=v[:k], reg=plan.reg_a,
                          out=dvalues[:k], check=False)
            kernels.sddmm(plan.x_indptr, plan.x_cols, gt, xt, theta=v[k:], reg=plan.reg_x,
                          out=dvalues[k:], check=False)
        return dx, dvalues, None


def topkast_linear(x: torch.Tensor, values: torch.Tensor, plan: SparsePlan,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the layer to x of shape (..., in_features)."""
    lead = x.shape[:-1]
    y = TopKASTLinearFunction.apply(x.reshape(-1, plan.in_features), values, plan)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, plan.out_features)
