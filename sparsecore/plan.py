"""The memory planner behind ``sparsecore plan``: predicted training memory of the
reference model for sparsecore, dense training and masked-dense Top-KAST, computed
from the shapes of a meta-device model and the formulas of :mod:`sparsecore.memory`
(the same ones ``SparseModel.memory_report()`` uses), so nothing is allocated.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .memory import (dense_training_bytes, fmt_bytes, masked_dense_topkast_bytes,
                     sparse_layers_bytes)
from .models.gpt import DENSE_LAYERS, GPT, GPTConfig

#: Tensors of optimizer state per trainable element (SGD: the momentum buffer).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}


def model_shapes(cfg: GPTConfig) -> tuple[list[tuple[int, int]], int]:
    """``(in, out)`` of every projection that becomes sparse, and the number of
    parameters that stay dense (embedding, norms, lm_head, biases). Built on the
    meta device: no memory is allocated whatever the sizes."""
    with torch.device("meta"):
        net = GPT(cfg)
    shapes, dense = [], 0
    for name, m in net.named_modules():
        if type(m) is nn.Linear and name not in DENSE_LAYERS:
            shapes.append((m.in_features, m.out_features))
            dense += m.bias.numel() if m.bias is not None else 0
        else:
            dense += sum(p.numel() for p in m.parameters(recurse=False))
    return shapes, dense


def activation_bytes(cfg: GPTConfig, batch: int, value_bytes: int = 4) -> int:
    """Estimate of the activations alive at the peak of a training step (forward
    tensors saved for backward plus the logits' gradient), for a batch of ``batch``
    sequences of ``cfg.context`` bytes. Per block about (11 + 2 r) B T d values
    (norm inputs/outputs, q/k/v and their rotated copies, attention output, the MLP's
    hidden layer before and after GELU; r = mlp_ratio); at the top the logits, their
    log-softmax and gradient (3 B T V) and a few B T d tensors."""
    bt = batch * cfg.context
    per_block = (11 + 2 * cfg.mlp_ratio) * bt * cfg.d_model
    top = 3 * bt * cfg.vocab + 3 * bt * cfg.d_model
    return (cfg.layers * per_block + top) * value_bytes


def plan_training(cfg: GPTConfig, *, forward_sparsity: float, backward_sparsity: float,
                  optimizer: str = "adamw", batch: int = 16, reserve: float = 0.25,
                  value_bytes: int = 4) -> dict:
    """Predicted peak bytes by kind of one training step in three layouts.

    Returns ``{"dense_equivalent_params", "stored_params", "k_a", "k_b", "sparsecore",
    "dense", "masked_dense"}``; each layout is a dict of bytes by kind with a
    ``state`` (everything but activations) and ``total`` entry. The sparsecore
    ``state`` is what ``model.memory_report(opt)["total"]`` reports after a step.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    s = OPTIMIZER_STATES[optimizer]
    shapes, n_dense = model_shapes(cfg)
    n_sparse = sum(i * o for i, o in shapes)
    n_params = n_sparse + n_dense
    sp = sparse_layers_bytes(shapes, forward_sparsity, backward_sparsity, reserve=reserve,
                             value_bytes=value_bytes, optimizer_states=s)
    act = activation_bytes(cfg, batch, value_bytes)
    dense_b = n_dense * value_bytes
    sparse = {"values": sp["values"], "gradients": sp["gradients"], "indices": sp["indices"],
              "reserve": sp["reserve"], "optimizer_state": sp["optimizer_state"] + dense_b * s,
              "dense_parameters": dense_b, "dense_gradients": dense_b}
    # dense training by kind; its sum is memory.dense_training_bytes, and masked-dense
    # Top-KAST adds what memory.masked_dense_topkast_bytes counts on top (the masks)
    dense = {"weights": n_params * value_bytes, "gradients": n_params * value_bytes,
             "optimizer_state": n_params * value_bytes * s}
    dense_total = dense_training_bytes(n_params, value_bytes=value_bytes, optimizer_states=s)
    masked = dict(dense, masks=masked_dense_topkast_bytes(
        n_params, value_bytes=value_bytes, optimizer_states=s) - dense_total)
    for layout in (sparse, dense, masked):
        layout["state"] = sum(layout.values())
        layout["activations"] = act
        layout["total"] = layout["state"] + act
    return {"dense_equivalent_params": n_params, "stored_params": sp["k_b"] + n_dense,
            "k_a": sp["k_a"], "k_b": sp["k_b"], "sparse_layers": len(shapes),
            "sparsecore": sparse, "dense": dense, "masked_dense": masked}


def machine_ram() -> tuple[int, int]:
    """(total, available) bytes of RAM on this machine (psutil, else /proc/meminfo)."""
    try:
        import psutil
        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        info = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])


_ROWS = [("weights / values on B", ("values", "weights")),
         ("gradients", ("gradients",)),
         ("optimizer state", ("optimizer_state",)),
         ("indices (CSR of A, B)", ("indices",)),
         ("reserve", ("reserve",)),
         ("masks (A and B)", ("masks",)),
         ("dense embed/norms/head", ("dense_parameters", "dense_gradients")),
         ("model + optimizer", ("state",)),
         ("activations (estimate)", ("activations",)),
         ("predicted peak", ("total",))]


def format_plan(p: dict, *, cfg: GPTConfig, forward_sparsity: float, backward_sparsity: float,
                optimizer: str, batch: int, gpu_memory: int | None = None,
                ram: tuple[int, int] | None = None) -> str:
    """The planner's report: parameters, a table of bytes by kind for the three
    layouts, and whether each fits this machine's RAM (and ``gpu_memory``)."""
    ram = machine_ram() if ram is None else ram
    lay = {"sparsecore": p["sparsecore"], "dense Adam" if optimizer != "sgd" else "dense":
           p["dense"], "masked-dense Top-KAST": p["masked_dense"]}
    n = p["dense_equivalent_params"]
    lines = [f"model: GPT d_model={cfg.d_model} layers={cfg.layers} heads={cfg.heads} "
             f"context={cfg.context}; batch {batch}, optimizer {optimizer}, "
             f"sparsity forward {forward_sparsity} / backward {backward_sparsity}",
             f"parameters: {n:,} dense-equivalent; sparsecore stores {p['stored_params']:,} "
             f"({p['stored_params'] / n:.2%}: K_B={p['k_b']:,} values in "
             f"{p['sparse_layers']} sparse layers + dense embed/norms/head/biases), "
             f"forward uses K_A={p['k_a']:,}",
             "",
             f"{'predicted bytes':<24}" + "".join(f"{k:>24}" for k in lay)]
    for label, keys in _ROWS:
        vals = [sum(l.get(k, 0) for k in keys) for l in lay.values()]
        if label.startswith("model +") or label.startswith("predicted"):
            lines.append("-" * (24 + 24 * len(lay)))
        lines.append(f"{label:<24}" + "".join(f"{fmt_bytes(v) if v else '-':>24}" for v in vals))
    lines.append("")
    total_ram, avail = ram
    for name, l in lay.items():
        verdict = [f"RAM {'fits' if l['total'] <= avail else 'does NOT fit'} "
                   f"({fmt_bytes(avail)} available of {fmt_bytes(total_ram)})"]
        if gpu_memory is not None:
            verdict.append(f"GPU {'fits' if l['total'] <= gpu_memory else 'does NOT fit'} "
                           f"({fmt_bytes(gpu_memory)})")
        lines.append(f"{name + ':':<24}" + "; ".join(verdict))
    lines.append("note: the reserve is at its nominal size (ceil(reserve * K_B) per layer); "
                 "during training it may reach (reserve + 0.25) * K_B before a refresh cuts "
                 "it back, moving trained coordinates that left B to the cold store on disk "
                 "(12 B each, not counted here; docs/design.md).")
    if gpu_memory is not None:
        lines.append("note: on a GPU the sparse layers run on the Triton kernels (checked on an "
                     "H200, about half of cuSPARSE's speed; docs/gpu.md); refreshes run on the "
                     "host.")
    lines.append(f"machine: {os.cpu_count()} CPU cores; nothing was allocated to make this plan.")
    return "\n".join(lines)
