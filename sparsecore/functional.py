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
    """``apply(x2d, values, bias, plan) -> y2d``; x2d is (n, in), values is theta_B,
    bias may be None. The bias add is fused into the copy that turns the kernel's
    feature-major output into (n, out); the input gradient is returned as a
    transposed view of the kernel's output (a following Top-KAST layer's backward
    then needs no copy)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, bias, plan: SparsePlan):
        xt = x2d.t().contiguous()
        wa = values.detach()[: plan.k_a]
        yt = kernels.spmm(plan.a_indptr, plan.a_cols, wa, xt, check=False)
        y = torch.empty(yt.shape[1], yt.shape[0], dtype=yt.dtype)
        if bias is None:
            y.copy_(yt.t())
        else:
            torch.add(yt.t(), bias.detach(), out=y)
        ctx.save_for_backward(xt, values)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xt, values = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        gt = dy.t().contiguous()
        v = values.detach()
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0]:
            dx = kernels.spmm_t(plan.at_indptr, plan.at_rows, plan.at_perm, v[: plan.k_a], gt,
                                check=False).t()
        if ctx.needs_input_grad[1]:
            dvalues = torch.empty_like(v)
            k = plan.k_a
            kernels.sddmm(plan.a_indptr, plan.a_cols, gt, xt, theta=v[:k], reg=plan.reg_a,
                          out=dvalues[:k], check=False)
            kernels.sddmm(plan.x_indptr, plan.x_cols, gt, xt, theta=v[k:], reg=plan.reg_x,
                          out=dvalues[k:], check=False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = gt.sum(dim=1)
        return dx, dvalues, dbias, None


def topkast_linear(x: torch.Tensor, values: torch.Tensor, plan: SparsePlan,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the layer to x of shape (..., in_features)."""
    lead = x.shape[:-1]
    y = TopKASTLinearFunction.apply(x.reshape(-1, plan.in_features), values, bias, plan)
    return y.reshape(*lead, plan.out_features)
