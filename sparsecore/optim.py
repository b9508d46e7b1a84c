"""Optimizer conventions for sparse weights.

A Top-KAST layer's weights are one 1-D parameter, ``values`` (theta on B). Recipes
that choose weight decay by dimension (``p.dim() >= 2``: nanoGPT's
``configure_optimizers`` and many Hugging Face / timm recipes) would put every sparse
weight in the no-decay group. :func:`param_groups` builds the groups such recipes
mean: matrices, dense or sparse, are decayed; biases, norms and other vectors are not.

Why not give ``values`` two dimensions instead? Common code also *acts* on 2-D
parameters as if they were dense weight matrices (``nn.init.xavier_uniform_`` over
``p.dim() > 1``, orthogonalising optimizers such as Muon or Shampoo), which would
silently corrupt a list of top-K values; a 1-D parameter is skipped by such code,
and the decay choice is made explicit here instead.
"""
from __future__ import annotations

from torch import nn

from .layers import TopKASTLinear


def sparse_values(module: nn.Module) -> list[nn.Parameter]:
    """The ``values`` parameter of every Top-KAST layer inside ``module``."""
    return [m.values for m in module.modules() if isinstance(m, TopKASTLinear)]


def param_groups(module: nn.Module, weight_decay: float, *, no_decay_weight_decay: float = 0.0
                 ) -> list[dict]:
    """Two optimizer parameter groups: ``weight_decay`` for every Top-KAST layer's
    ``values`` and every dense parameter with ``dim() >= 2``; ``no_decay_weight_decay``
    (default 0) for the rest (biases, norm scales). Parameters that do not require
    grad are left out; a parameter shared by several modules appears once. Use::

        opt = torch.optim.AdamW(sc.param_groups(model, weight_decay=0.1), lr=3e-4)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    sparse = {id(p) for p in sparse_values(module)}
    decay, rest = [], []
    for p in module.parameters():   # deduplicated by torch
        if not p.requires_grad:
            continue
        (decay if id(p) in sparse or p.dim() >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": rest, "weight_decay": float(no_decay_weight_decay)}]
