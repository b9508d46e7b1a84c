"""The differentiable Top-KAST linear product: two operators and one autograd.Function.

Forward:  y = x W_A^T + b                      (spmm over the forward set A)
Backward: dx = dy W_A                          (spmm_t over A's cached transpose)
          g_k = sum_n dy[n,row_k] x[n,col_k]   for every k in B  (sddmm)

The weight gradient on B minus A is the gradient with respect to the (zero)
forward weight at those positions, which is what lets them grow into A. It is
therefore *not* the derivative of y with respect to ``values[K_A:]`` (which is 0):
gradcheck applies only with B = A.

The exploration regulariser (lambda c theta) is *not* part of this product: it
is a term of the loss that enters the gradient once per optimizer step, added by
an optimizer step pre-hook (see :mod:`sparsecore.layers`), never per backward.

The products are the operators ``sparsecore::linear`` and ``sparsecore::linear_backward``
(``torch.library.define`` / ``impl`` for every device, with fake implementations),
and :class:`_Linear`, a plain ``torch.autograd.Function``, connects them: its forward
calls the first, its backward the second. ``torch.compile(model, fullgraph=True)``
traces the Function and keeps each operator as one opaque node. The autograd
formula is not registered on the operators themselves (``register_autograd``)
because that wrapper costs ~0.1-0.3 ms of Python per call (it re-binds every
argument against the schema on each forward), as much as the products of a small
layer (docs/benchmarks.md, "Per-call overhead").
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .state import SparseState

_STRUCTURE = ("Tensor a_indptr, Tensor a_cols, Tensor x_indptr, Tensor x_cols, "
              "Tensor at_indptr, Tensor at_rows, Tensor at_perm")
_LIB = torch.library.Library("sparsecore", "DEF")
_LIB.define(f"linear(Tensor x2d, Tensor values, Tensor? bias, {_STRUCTURE}) -> Tensor")
_LIB.define(f"linear_backward(Tensor dy, Tensor x2d, Tensor values, {_STRUCTURE}, "
            "bool need_dx, bool need_dvalues) -> (Tensor, Tensor)")


def _linear(x2d: Tensor, values: Tensor, bias: Optional[Tensor], a_indptr: Tensor,
            a_cols: Tensor, x_indptr: Tensor, x_cols: Tensor, at_indptr: Tensor,
            at_rows: Tensor, at_perm: Tensor) -> Tensor:
    """y (n, out) = x2d (n, in) W_A^T + bias; W_A = values[:K_A] on A's CSR.
    Activations are read row-major as given and the bias is added inside the kernel."""
    return kernels.spmm(a_indptr, a_cols, values[: a_cols.numel()], x2d, bias=bias,
                        layout="row", check=False)


def _linear_fake(x2d, values, bias, a_indptr, a_cols, x_indptr, x_cols, at_indptr, at_rows,
                 at_perm):
    return x2d.new_empty(x2d.shape[0], a_indptr.shape[0] - 1)


def _linear_backward(dy: Tensor, x2d: Tensor, values: Tensor, a_indptr: Tensor, a_cols: Tensor,
                     x_indptr: Tensor, x_cols: Tensor, at_indptr: Tensor, at_rows: Tensor,
                     at_perm: Tensor, need_dx: bool, need_dvalues: bool
                     ) -> tuple[Tensor, Tensor]:
    """(dx (n, in), dvalues (K_B,)); an empty tensor for a gradient not needed.
    dy and x2d are read row-major as given (no transposed copies)."""
    k = a_cols.numel()
    with kernels.share_packing(dy):   # dy is packed once for both products (CPU)
        if need_dx:   # contiguous (n, in), written by the kernel directly
            dx = kernels.spmm_t(at_indptr, at_rows, at_perm, values[:k], dy, layout="row",
                                check=False)
        else:
            dx = dy.new_empty(0)
        if need_dvalues:
            dvalues = torch.empty_like(values)
            # A and B minus A in one call: dy and x are packed for the kernel once
            kernels.sddmm(a_indptr, a_cols, dy, x2d, out=dvalues[:k], layout="row",
                          more=((x_indptr, x_cols, dvalues[k:]),), check=False)
        else:
            dvalues = values.new_empty(0)
    return dx, dvalues


def _linear_backward_fake(dy, x2d, values, a_indptr, a_cols, x_indptr, x_cols, at_indptr,
                          at_rows, at_perm, need_dx, need_dvalues):
    # the real dx is a contiguous (n, in) tensor
    dx = dy.new_empty(dy.shape[0], at_indptr.shape[0] - 1) if need_dx else dy.new_empty(0)
    dv = values.new_empty(values.shape) if need_dvalues else values.new_empty(0)
    return dx, dv


# One implementation for every device: the kernels pick the backend by device (the
# single dispatch point) and raise a clear error for devices without one.
_LIB.impl("linear", _linear, "CompositeExplicitAutograd")
_LIB.impl("linear_backward", _linear_backward, "CompositeExplicitAutograd")
torch.library.register_fake("sparsecore::linear", _linear_fake, lib=_LIB)
torch.library.register_fake("sparsecore::linear_backward", _linear_backward_fake, lib=_LIB)


class _Linear(torch.autograd.Function):
    """y = x W_A^T + b with gradients for x, the whole of ``values`` (B) and the bias.

    ``forward`` takes ``ctx`` itself rather than defining ``setup_context``: for a
    Function with ``setup_context``, every ``apply`` binds its arguments against
    ``inspect.signature(forward)`` (torch 2.13), ~70-100 us per call for these ten
    arguments, as much as the product of a small layer (docs/benchmarks.md,
    "Per-call overhead"). What that style would add, functorch transforms (vmap,
    grad) over the layer, the sparse operators could not serve anyway: they have
    no batching rules."""

    @staticmethod
    def forward(ctx, x2d, values, bias, *structure):
        ctx.save_for_backward(x2d, values, *structure)
        ctx.has_bias = bias is not None
        return torch.ops.sparsecore.linear(x2d, values, bias, *structure)

    @staticmethod
    def backward(ctx, dy):
        x2d, values, *structure = ctx.saved_tensors
        need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dvalues = dbias = None
        if need_dx or need_dv:
            gx, gv = torch.ops.sparsecore.linear_backward(dy, x2d, values, *structure,
                                                          need_dx, need_dv)
            dx = gx if need_dx else None
            dvalues = gv if need_dv else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(dim=0)
        return (dx, dvalues, dbias) + (None,) * 7


def topkast_linear(x: Tensor, values: Tensor, state: SparseState,
                   bias: Optional[Tensor] = None) -> Tensor:
    """Apply a Top-KAST layer to x of shape (..., in_features): y = x W_A^T + b,
    with gradients for x, the whole of ``values`` (theta on B) and the bias."""
    lead = x.shape[:-1]
    y = _Linear.apply(x.reshape(-1, state.in_features), values, bias, *state.index_tensors())
    return y.reshape(*lead, state.out_features)
