"""Export a trained sparse model for inference and analysis.

Only the forward weights (theta on A) leave: no reserve, no B minus A, no
optimizer state. Formats: torch sparse CSR tensors, ``scipy.sparse.csr_array``,
and an inference-only copy of the model that runs the same CPU kernels.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import kernels
from .layers import TopKASTConv2d, TopKASTLinear, conv2d_as_linear


def _layers(model: nn.Module) -> dict[str, TopKASTLinear]:
    """Top-KAST layers by name; for a SparseModel, names inside the wrapped module
    (the names of ``SparseModel.sparse_layers()`` and ``stats()``)."""
    from .model import SparseModel
    if isinstance(model, SparseModel):
        model = model.module
    found = {n: m for n, m in model.named_modules() if isinstance(m, TopKASTLinear)}
    if not found:
        raise ValueError("model contains no Top-KAST layer")
    return found


def forward_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: torch sparse CSR tensor (out, in) of the forward weight}."""
    import warnings
    out = {}
    for n, l in _layers(model).items():
        with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
            warnings.simplefilter("ignore", UserWarning)
            out[n] = torch.sparse_csr_tensor(l.sparse_state.a_indptr.clone(), l.sparse_state.a_cols.to(torch.int64),
                                             l.values.detach()[: l.k_a].clone(),
                                             size=(l.out_features, l.in_features),
                                             check_invariants=False)
    return out


def to_scipy(model: nn.Module) -> dict:
    """{layer name: scipy.sparse.csr_array (out, in) of the forward weight}."""
    import scipy.sparse as sp
    return {n: sp.csr_array((l.values.detach()[: l.k_a].numpy().copy(), l.sparse_state.a_cols.numpy().copy(),
                             l.sparse_state.a_indptr.numpy().copy()), shape=(l.out_features, l.in_features))
            for n, l in _layers(model).items()}


class SparseLinearInference(nn.Module):
    """Forward-only sparse linear layer: the forward weight as CSR buffers. Output
    does not track gradients."""

    def __init__(self, layer: TopKASTLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("indptr", layer.sparse_state.a_indptr.clone())
        self.register_buffer("cols", layer.sparse_state.a_cols.clone())
        self.register_buffer("weight_values", layer.values.detach()[: layer.k_a].clone())
        self.register_buffer("bias", layer.bias.detach().clone() if layer.bias is not None else None)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {tuple(x.shape)}; expected last dimension "
                             f"in_features={self.in_features}")
        if x.dtype != self.weight_values.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match {self.weight_values.dtype}")
        lead = x.shape[:-1]   # row-major activations, bias fused: no transposed copies
        y = kernels.spmm(self.indptr, self.cols, self.weight_values,
                         x.reshape(-1, self.in_features), bias=self.bias, layout="row",
                         check=False)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.weight_values.numel()}")


class SparseConv2dInference(SparseLinearInference):
    """Forward-only counterpart of :class:`TopKASTConv2d`."""

    def __init__(self, layer: TopKASTConv2d):
        super().__init__(layer)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_as_linear(self, x, super().forward)


def inference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference: every Top-KAST layer replaced by a
    forward-only layer holding just A; other modules deep-copied. The sparse
    layers' training state is never copied. For a :class:`SparseModel` the copy is
    of the wrapped module (the wrapper's optimizer hooks are training state)."""
    from .model import SparseModel
    if isinstance(model, SparseModel):
        model = model.module
    memo = {}
    for _, l in _layers(model).items():
        memo[id(l)] = (SparseConv2dInference(l) if isinstance(l, TopKASTConv2d)
                       else SparseLinearInference(l))
    inf = copy.deepcopy(model, memo)
    return inf.eval()
