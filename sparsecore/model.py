"""SparseModel: turn the nn.Linear / nn.Conv2d layers of any model into Top-KAST
layers with one line, build it without dense memory, and refresh it from an
optimizer hook so the training loop stays unchanged."""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping

import torch
from torch import nn

from .memory import MemoryReport
from .layers import DEFAULT_RESERVE, TopKASTConv2d, TopKASTLinear, _check_sparsities
from .topkast import RefreshError

_LAYER_KEYS = ("forward_sparsity", "backward_sparsity", "exploration", "reserve")


def _is_candidate(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name == pattern


def _select(candidates: list[str], patterns: Iterable[str], what: str) -> set[str]:
    chosen = set()
    for pat in patterns:
        hit = {c for c in candidates if _match(c, pat)}
        if not hit:
            raise ValueError(f"{what} pattern {pat!r} matches no nn.Linear/nn.Conv2d; "
                             f"candidates are: {candidates}")
        chosen |= hit
    return chosen


class SparseModel(nn.Module):
    """Wrap ``module`` and replace its nn.Linear / nn.Conv2d (groups=1, zero padding)
    layers by :class:`TopKASTLinear` / :class:`TopKASTConv2d`.

    Args:
        module: any nn.Module, possibly built under ``torch.device("meta")``. Sparse
            layers are built by a streaming scan (no dense weight ever exists); the
            remaining meta parameters are materialised on the CPU and initialised
            by their module's ``reset_parameters()``.
        forward_sparsity, backward_sparsity, exploration, reserve: Top-KAST settings
            for every replaced layer (see :class:`TopKASTLinear`).
        refresh_every: optimizer steps between refreshes once :meth:`attach` is called.
        seed: model seed; each layer's key derives from it and the layer's qualified
            name, so the same seed builds the same model.
        include, exclude: qualified-name patterns (fnmatch, e.g. ``"blocks.*.fc1"``)
            choosing which candidate layers become sparse (default: all). A pattern
            that matches nothing is an error listing the candidates.
        overrides: ``{pattern: {"forward_sparsity": ..., "backward_sparsity": ...,
            "exploration": ..., "reserve": ...}}`` per-layer settings; the last
            matching pattern wins.

    The original dense weights of replaced layers are not used: initial values come
    from the layer key (nn.Linear's default distribution). Biases are kept when the
    model is materialised, re-initialised when it is on the meta device.
    """

    def __init__(self, module: nn.Module, *, forward_sparsity: float, backward_sparsity: float,
                 refresh_every: int = 100, exploration: float = 1e-4, seed: int = 0,
                 reserve: float = DEFAULT_RESERVE, include: Iterable[str] | None = None,
                 exclude: Iterable[str] = (), overrides: Mapping[str, Mapping] | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, SparseModel):
            raise TypeError("module is already a SparseModel")
        _check_sparsities(forward_sparsity, backward_sparsity)
        if not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive int, got {refresh_every!r}")
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError("include/exclude take a list of patterns, not a single string")
        self.refresh_every = refresh_every
        self.seed = int(seed)
        defaults = dict(forward_sparsity=forward_sparsity, backward_sparsity=backward_sparsity,
                        exploration=exploration, reserve=reserve)
        candidates = [n for n, m in module.named_modules() if n and _is_candidate(m)]
        if not candidates and _is_candidate(module):
            raise ValueError("module itself is a single layer; use TopKASTLinear/TopKASTConv2d "
                             "directly or wrap it in a container")
        chosen = set(candidates) if include is None else _select(candidates, include, "include")
        chosen -= _select(candidates, exclude, "exclude")
        if not chosen:
            raise ValueError(f"no layer to make sparse (candidates: {candidates}, "
                             f"include={include}, exclude={list(exclude)})")
        per_layer = {n: dict(defaults) for n in chosen}
        for pat, cfg in (overrides or {}).items():
            bad = set(cfg) - set(_LAYER_KEYS)
            if bad:
                raise ValueError(f"override {pat!r} has unknown settings {sorted(bad)}; "
                                 f"allowed: {list(_LAYER_KEYS)}")
            for n in _select(sorted(chosen), [pat], "overrides"):
                per_layer[n].update(cfg)
        for n, cfg in per_layer.items():
            try:
                _check_sparsities(cfg["forward_sparsity"], cfg["backward_sparsity"])
            except (TypeError, ValueError) as e:
                raise type(e)(f"layer {n!r}: {e}") from None

        with torch.device("cpu"):  # even inside a user's `with torch.device("meta")`
            # 1. materialise the dense part first (sparse layers are built on CPU below)
            self._materialise(module, exclude_prefixes=chosen)
            # 2. replace the chosen layers
            for name in sorted(chosen):
                old = module.get_submodule(name)
                new = self._build(old, name, per_layer[name])
                parent_name, _, attr = name.rpartition(".")
                setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
        self.module = module
        self._hooks: dict[int, tuple] = {}
        self._steps: dict[int, int] = {}
        self._opt_order: list[int] = []
        self._pending_steps = 0

    # ---------------------------------------------------------------- building
    def _materialise(self, module: nn.Module, exclude_prefixes: set[str]) -> None:
        def sparse(name):
            return any(name == p or name.startswith(p + ".") for p in exclude_prefixes)

        todo = []
        for name, m in module.named_modules():
            if sparse(name):
                continue
            direct = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
            if any(t.is_meta for t in direct):
                todo.append((name, m))
        if not todo:
            return
        for name, m in todo:
            if not hasattr(m, "reset_parameters"):
                raise ValueError(f"module {name or '<root>'} ({type(m).__name__}) has tensors on "
                                 "the meta device and no reset_parameters(); cannot initialise it")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for name, m in todo:
                m.to_empty(device="cpu", recurse=False)
                with torch.no_grad():
                    m.reset_parameters()

    def _build(self, old: nn.Module, name: str, cfg: dict) -> TopKASTLinear:
        w = old.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        common = dict(bias=old.bias is not None, seed=self.seed, name=name, dtype=dtype, **cfg)
        if isinstance(old, nn.Conv2d):
            new = TopKASTConv2d(old.in_channels, old.out_channels, old.kernel_size,
                                stride=old.stride, padding=old.padding, dilation=old.dilation,
                                **common)
        else:
            new = TopKASTLinear(old.in_features, old.out_features, **common)
        if old.bias is not None and not old.bias.is_meta:
            with torch.no_grad():
                new.bias.copy_(old.bias.to(dtype))
        return new

    # ---------------------------------------------------------------- running
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sparse_layers(self) -> dict[str, TopKASTLinear]:
        """Qualified name (inside the wrapped module) -> Top-KAST layer."""
        return {n: m for n, m in self.module.named_modules() if isinstance(m, TopKASTLinear)}

    @property
    def step_count(self) -> int:
        """Optimizer steps seen by the first attached optimizer."""
        return self._steps[self._opt_order[0]] if self._opt_order else self._pending_steps

    @step_count.setter
    def step_count(self, value: int) -> None:
        """Set the step count of the first attached optimizer; before any attach,
        the value is kept and given to the first optimizer attached (so a
        checkpoint can be loaded before or after :meth:`attach`)."""
        if not self._opt_order:
            self._pending_steps = int(value)
            return
        self._steps[self._opt_order[0]] = int(value)

    def attach(self, optimizer: torch.optim.Optimizer) -> "SparseModel":
        """Refresh (and remap ``optimizer``'s state) after every ``refresh_every``
        steps of ``optimizer``, through a step post-hook. Returns self."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if id(optimizer) in self._hooks:
            raise ValueError("this optimizer is already attached")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        mine = {id(l.values) for l in self.sparse_layers().values()}
        if not held & mine:
            raise ValueError("the optimizer holds none of this model's sparse parameters; "
                             "build it from model.parameters()")
        for oid, (opt, _) in self._hooks.items():
            other = {id(p) for g in opt.param_groups for p in g["params"]}
            if other & held:
                raise ValueError("this optimizer shares parameters with an already attached "
                                 "optimizer; each parameter must belong to one optimizer")
        oid = id(optimizer)
        handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(opt))
        self._hooks[oid] = (optimizer, handle)
        self._steps[oid] = self._pending_steps if not self._opt_order else 0
        self._pending_steps = 0
        self._opt_order.append(oid)
        return self

    def detach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Undo :meth:`attach`."""
        opt, handle = self._hooks.pop(id(optimizer))
        handle.remove()
        self._steps.pop(id(optimizer))
        self._opt_order.remove(id(optimizer))

    def _after_step(self, optimizer) -> None:
        oid = id(optimizer)
        self._steps[oid] += 1
        if self._steps[oid] % self.refresh_every == 0:
            self.refresh(only=optimizer)

    @torch.no_grad()
    def refresh(self, only: torch.optim.Optimizer | None = None) -> dict:
        """Refresh every sparse layer now (remapping the attached optimizers' state).
        With ``only``, refresh just the layers that optimizer trains. All layers are
        checked for NaN/Inf first, so a failure changes no layer."""
        opts = [only] if only is not None else [o for o, _ in self._hooks.values()]
        layers = self.sparse_layers()
        if only is not None:
            held = {id(p) for g in only.param_groups for p in g["params"]}
            layers = {n: l for n, l in layers.items() if id(l.values) in held}
        for n, l in layers.items():
            if not torch.isfinite(l.values).all():
                raise RefreshError(f"{n}: theta_B holds NaN or Inf; refusing to refresh "
                                   "(nothing was changed)")
        return {n: l.refresh(opts, name=n) for n, l in layers.items()}

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict:
        """Per layer and total: nnz of A/B/pool, fraction of A and B changed at the
        last refresh, cumulative coordinates that entered A from outside B,
        replenishing scans and refreshes."""
        per = {}
        for n, l in self.sparse_layers().items():
            s = l.stats
            per[n] = {"nnz_a": l.k_a, "nnz_b": l.k_b, "pool": l.pool_size(),
                      "dense_equivalent": l.n_total, "changed_a": s["changed_a"],
                      "changed_b": s["changed_b"],
                      "entered_a_from_outside_b": s["entered_a_from_outside_b"],
                      "replenishes": s["replenishes"], "refreshes": s["refreshes"]}
        tot = {k: sum(p[k] for p in per.values())
               for k in ("nnz_a", "nnz_b", "pool", "dense_equivalent",
                         "entered_a_from_outside_b", "replenishes")}
        tot["changed_a"] = (sum(p["changed_a"] * p["nnz_a"] for p in per.values())
                            / max(1, tot["nnz_a"]))
        tot["changed_b"] = (sum(p["changed_b"] * p["nnz_b"] for p in per.values())
                            / max(1, tot["nnz_b"]))
        tot["step_count"] = self.step_count
        return {"layers": per, "total": tot}

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None) -> "MemoryReport":
        """Analytic bytes by kind next to the dense-equivalent model (weights + grads +
        two Adam states). Optimizer state is counted from ``optimizer`` (or the first
        attached one); without any, as two Adam-like states per trainable element."""
        if optimizer is None and self._opt_order:
            optimizer = self._hooks[self._opt_order[0]][0]
        sparse = self.sparse_layers()
        sparse_params = {id(l.values) for l in sparse.values()}
        rep = dict.fromkeys(("values", "gradients", "indices", "reserve", "optimizer_state",
                             "dense_parameters", "dense_gradients", "buffers"), 0)
        dense_equiv = 0

        def opt_bytes(p):
            if optimizer is None:
                return 2 * p.numel() * p.element_size()
            st = optimizer.state.get(p, {})
            return sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))

        for l in sparse.values():
            es = l.values.element_size()
            rep["values"] += l.values.numel() * es
            rep["gradients"] += l.values.numel() * es
            nb = l.sparse_state.nbytes()
            rep["indices"] += nb["indices"]
            rep["reserve"] += nb["reserve"]
            rep["optimizer_state"] += opt_bytes(l.values)
            dense_equiv += 4 * l.n_total * es
        for p in self.parameters():
            if id(p) in sparse_params:
                continue
            b = p.numel() * p.element_size()
            rep["dense_parameters"] += b
            rep["dense_gradients"] += b if p.requires_grad else 0
            rep["optimizer_state"] += opt_bytes(p) if p.requires_grad else 0
            dense_equiv += 4 * b if p.requires_grad else b
        sparse_bufs = {id(getattr(l, b)) for l in sparse.values() for b, _ in l.named_buffers()}
        for b in self.buffers():
            if id(b) not in sparse_bufs:
                rep["buffers"] += b.numel() * b.element_size()
        dense_equiv += rep["buffers"]
        return MemoryReport(rep, dense_equiv)

