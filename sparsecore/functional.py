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

import torch

from . import kernels
from .state import SparseState


class TopKASTLinearFunction(torch.autograd.Function):
    """``apply(x2d, values, bias, state, reg_a, reg_x) -> y2d``; x2d is (n, in),
    values is theta_B (A first), bias may be None, ``state`` the layer's
    :class:`~sparsecore.state.SparseState`, reg_a / reg_x the regulariser
    coefficients fused into the weight gradient on A / B minus A. The bias add is fused into the copy that turns the kernel's
    feature-major output into (n, out); the input gradient is returned as a
    transposed view of the kernel's output (a following Top-KAST layer's backward
    then needs no copy)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, bias, state: SparseState,
                reg_a: float, reg_x: float):
        xt = x2d.t().contiguous()
        wa = values.detach()[: state.k_a]
        yt = kernels.spmm(state.a_indptr, state.a_cols, wa, xt, check=False)
        y = torch.empty(yt.shape[1], yt.shape[0], dtype=yt.dtype)
        if bias is None:
            y.copy_(yt.t())
        else:
            torch.add(yt.t(), bias.detach(), out=y)
        ctx.save_for_backward(xt, values)
        ctx.state = state
        ctx.reg = (reg_a, reg_x)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xt, values = ctx.saved_tensors
        st: SparseState = ctx.state
        reg_a, reg_x = ctx.reg
        gt = dy.t().contiguous()
        v = values.detach()
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0]:
            dx = kernels.spmm_t(st.at_indptr, st.at_rows, st.at_perm, v[: st.k_a], gt,
                                check=False).t()
        if ctx.needs_input_grad[1]:
            dvalues = torch.empty_like(v)
            k = st.k_a
            kernels.sddmm(st.a_indptr, st.a_cols, gt, xt, theta=v[:k], reg=reg_a,
                          out=dvalues[:k], check=False)
            kernels.sddmm(st.x_indptr, st.x_cols, gt, xt, theta=v[k:], reg=reg_x,
                          out=dvalues[k:], check=False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = gt.sum(dim=1)
        return dx, dvalues, dbias, None, None, None


def topkast_linear(x: torch.Tensor, values: torch.Tensor, state: SparseState,
                   bias: torch.Tensor | None = None, reg_a: float = 0.0,
                   reg_x: float = 0.0) -> torch.Tensor:
    """Apply the layer to x of shape (..., in_features)."""
    lead = x.shape[:-1]
    y = TopKASTLinearFunction.apply(x.reshape(-1, state.in_features), values, bias, state,
                                    reg_a, reg_x)
    return y.reshape(*lead, state.out_features)
