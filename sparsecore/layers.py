"""Top-KAST layers: nn.Modules over the pool/floor storage (no dense weight).

A layer holds its trainable values (theta on B) as one ``nn.Parameter`` and the
rest of its sparse structure as one immutable :class:`~sparsecore.state.SparseState`
(``layer.sparse_state``), which a refresh replaces whole.
"""
from __future__ import annotations

import dataclasses
import math
import os
import weakref
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import kernels
from .functional import topkast_linear
from .kernels.cpu import init as _init
from .kernels.cpu import pool as _pool
from .state import (OPTIONAL_NAMES, SparseState, TENSOR_NAMES, check_index_range,
                    empty_state)
from .topkast import InitSpec, RefreshError, layer_key, refresh as _refresh, sizes

DEFAULT_RESERVE = 0.25
RESERVE_SLACK = 0.25   # past (reserve + slack) * K_B a refresh cuts the reserve back
TO_DENSE_LIMIT = 1 << 26  # elements; to_dense() refuses above this
_STATE_VERSION = 2


def _check_sparsities(forward_sparsity, backward_sparsity):
    for nm, v in (("forward_sparsity", forward_sparsity), ("backward_sparsity", backward_sparsity)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise TypeError(f"{nm} must be a float in [0, 1), got {v!r}")
    if not 0.0 <= forward_sparsity < 1.0:
        raise ValueError(f"forward_sparsity must be in [0, 1), got {forward_sparsity}")
    if not 0.0 <= backward_sparsity <= forward_sparsity:
        raise ValueError(f"backward_sparsity must be in [0, forward_sparsity={forward_sparsity}],"
                         f" got {backward_sparsity}")


def _optimizers(optimizer) -> list:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


# values Parameter -> its layer (weakly both ways). One optimizer step pre-hook,
# installed on every torch optimizer at import, adds the exploration gradient of
# each Top-KAST layer whose values the stepping optimizer holds: exactly once per
# optimizer step, after any GradScaler unscaling, whatever the number of backward
# passes or uses of the layer.
# Keyed by id(values) (tensors compare elementwise, so they make poor dict keys);
# an entry counts only while its layer is alive and still owns that Parameter.
_LAYER_OF: dict[int, weakref.ref] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    if _LAYER_OF.get(key) is ref:
        del _LAYER_OF[key]


def _exploration_pre_hook(optimizer, args, kwargs) -> None:
    if not _LAYER_OF:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = _LAYER_OF.get(id(p))
            layer = ref() if ref is not None else None
            if layer is not None and layer.values is p:
                layer._optimizers_seen[id(optimizer)] = weakref.ref(optimizer)
                layer.apply_exploration()


from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

register_optimizer_step_pre_hook(_exploration_pre_hook)


class TopKASTLinear(nn.Module):
    """A linear layer trained with Top-KAST that never stores its dense weight.

    The dense-equivalent weight theta (out_features x in_features) exists only
    implicitly: ``values`` holds theta on the backward set B (the K_B largest
    magnitudes; its first K_A entries are the forward set A), a reserve holds a
    few more candidates, and every other coordinate is regenerated on demand
    from a hash of (layer key, flat index). See docs/design.md.

    Args:
        in_features, out_features: dense-equivalent shape.
        bias: add a dense, ordinary bias parameter.
        forward_sparsity: S_f in [0, 1); the forward weight has K_A = max(1,
            round((1-S_f) N)) non-zeros.
        backward_sparsity: S_b in [0, S_f]; K_B = max(K_A, round((1-S_b) N))
            coordinates get gradients and optimizer state.
        exploration: lambda of the Top-KAST regulariser (gradient lambda*theta on A,
            lambda*theta/D on B minus A, with D = 1 - S_f).
        seed, name: the layer key is derived from both (SparseModel passes the
            qualified module name), so the same seed rebuilds the same layer.
        reserve: extra pool entries kept beyond B, as a fraction of K_B (>= 0). When
            the reserve would exceed (reserve + 0.25) K_B it is cut back to
            reserve K_B: untrained entries are dropped and trained ones move to
            the cold store on disk, both exactly (see :mod:`sparsecore.spill`).
        spill_dir: directory of the cold store's files (default
            ``$SPARSECORE_SPILL_DIR``, else a per-process temporary directory);
            settable later as the ``spill_dir`` attribute.
        init: "uniform" (nn.Linear's U(-1/sqrt(in), 1/sqrt(in))) or "normal"
            (N(0, 1/in)); ``init_scale`` overrides the bound / std.
        device, dtype: CPU only for now; float32 (default) or float64.

    Call :meth:`refresh` (or let :class:`sparsecore.SparseModel` do it) after
    optimizer steps to recompute A and B and remap optimizer state.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 forward_sparsity: float, backward_sparsity: float,
                 exploration: float = 1e-4, seed: int = 0, reserve: float = DEFAULT_RESERVE,
                 init: str = "uniform", init_scale: float | None = None,
                 device=None, dtype=None, name: str = "", spill_dir: str | None = None):
        super().__init__()
        self._refresh_hooks: "OrderedDict[int, object]" = OrderedDict()  # weakref-able
        self._optimizers_seen: dict[int, weakref.ref] = {}  # optimizers that stepped values
        for nm, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        _check_sparsities(forward_sparsity, backward_sparsity)
        if not (isinstance(exploration, (int, float)) and exploration >= 0):
            raise ValueError(f"exploration must be a float >= 0, got {exploration!r}")
        if not (isinstance(reserve, (int, float)) and reserve >= 0 and math.isfinite(reserve)):
            raise ValueError(f"reserve must be a finite float >= 0, got {reserve!r}")
        if init not in _init.KINDS:
            raise ValueError(f"init must be one of {sorted(_init.KINDS)}, got {init!r}")
        dtype = torch.float32 if dtype is None else dtype
        device = torch.device("cpu") if device is None else torch.device(device)
        if dtype not in kernels.value_dtypes(device):  # also raises for devices without a backend
            raise TypeError(f"dtype must be one of {list(kernels.value_dtypes(device))} on "
                            f"{device}, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.forward_sparsity = float(forward_sparsity)
        self.backward_sparsity = float(backward_sparsity)
        self.exploration = float(exploration)
        self.reserve = float(reserve)
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
        self.init = init
        self.init_scale = float(init_scale) if init_scale is not None else 1.0 / math.sqrt(in_features)
        self.k_a, self.k_b = sizes(in_features, out_features, forward_sparsity, backward_sparsity)
        check_index_range(in_features, out_features, name or type(self).__name__)
        self.stats = {"refreshes": 0, "replenishes": 0, "changed_a": 0.0, "changed_b": 0.0,
                      "entered_a_from_outside_b": 0, "scanned_added": 0, "trimmed": 0,
                      "spilled": 0, "unspilled": 0, "ever_in_b": self.k_b}

        with torch.device("cpu"):  # a surrounding `with torch.device("meta")` must not leak in
            self._build(dtype, bias, seed, name)   # the streaming build runs on the host
        if device.type != "cpu":
            self.to(device)

    def _build(self, dtype, bias: bool, seed: int, name: str) -> None:
        """Construction: the streaming scan from an empty pool (floor = inf)."""
        key = layer_key(seed, name)
        start = empty_state(self.in_features, self.out_features, key, dtype)
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        res = _refresh(start, np.empty(0, np_dtype), k_a=self.k_a, k_b=self.k_b,
                       reserve_target=self._reserve_target(), reserve_cap=self._reserve_cap(),
                       spec=InitSpec(key, _init.KINDS[self.init], self.init_scale, np_dtype),
                       name=name or type(self).__name__, want_src=False,
                       spill_dir=self.spill_dir)
        self.values = nn.Parameter(torch.from_numpy(res.values))
        self._register()
        self.bias = nn.Parameter(self._init_bias(dtype, key)) if bias else None
        self._state = res.state
        self.stats["replenishes"] = res.info["replenished"]
        self.stats["scanned_added"] = res.info["scanned_added"]

    def _register(self) -> None:
        """Enter this layer in the exploration hook's registry (also for copies)."""
        ref = weakref.ref(self)
        _LAYER_OF[id(self.values)] = ref
        weakref.finalize(self, _forget, id(self.values), ref)

    def __setstate__(self, state):  # copy.deepcopy / pickle: the copy explores too
        super().__setstate__(state)
        self._optimizers_seen = {}
        self._register()

    # ------------------------------------------------------------------ basics
    @property
    def sparse_state(self) -> SparseState:
        """The layer's sparse structure (immutable; replaced whole by a refresh)."""
        return self._state

    @property
    def n_total(self) -> int:
        return self.in_features * self.out_features

    @property
    def density(self) -> float:
        return 1.0 - self.forward_sparsity

    def _reserve_target(self) -> int:
        return int(math.ceil(self.reserve * self.k_b))

    def _reserve_cap(self) -> int:
        return int(math.ceil((self.reserve + RESERVE_SLACK) * self.k_b))

    def _init_bias(self, dtype, key: int) -> torch.Tensor:
        """nn.Linear's bias init, U(-1/sqrt(in), 1/sqrt(in)), drawn from a generator
        seeded by the layer key so the same seed rebuilds the same layer."""
        bound = 1.0 / math.sqrt(self.in_features)
        gen = torch.Generator().manual_seed(key & 0x7FFFFFFFFFFFFFFF)
        return torch.empty(self.out_features, dtype=dtype).uniform_(-bound, bound, generator=gen)

    def _spec(self) -> InitSpec:
        np_dtype = np.float32 if self.values.dtype == torch.float32 else np.float64
        return InitSpec(self._state.key, _init.KINDS[self.init], self.init_scale, np_dtype)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.float()``, ``.double()``, ``.half()``, ``.cuda()``...: values and
        bias follow ``fn``; the sparse state moves to the same device, its reserve
        values follow the values' dtype, and its indices and floor are never cast.
        Unsupported dtypes and devices are refused before anything changes."""
        probe = fn(torch.empty(0, dtype=self.values.dtype, device=self.values.device))
        ok = kernels.value_dtypes(probe.device)   # raises for devices without a backend
        if probe.dtype not in ok:
            raise TypeError(f"{self._name()}: dtype {probe.dtype} is not supported for the "
                            f"sparse values on {probe.device}; supported: {list(ok)} (under "
                            "torch.autocast the values stay fp32 and the output follows autocast)")
        super()._apply(fn, recurse)
        self._state = self._state.to(self.values.device, self.values.dtype)
        return self

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W_A^T + b for x of shape (..., in_features).

        Under ``torch.autocast`` the product runs in the layer's dtype (``values``
        stay the fp32 master weights and the kernels accumulate in fp32) and the
        output comes in the autocast dtype; outside autocast the input must have the
        layer's dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {tuple(x.shape)}; expected last dimension "
                             f"in_features={self.in_features}")
        if x.device != self.values.device:
            raise ValueError(f"input is on {x.device} but the layer is on {self.values.device}")
        dt = self.values.dtype
        out_dtype = None
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dt)
        elif x.dtype != dt:
            raise TypeError(f"{self._name()}: input dtype {x.dtype} does not match the layer's "
                            f"{dt}; cast the input, or run under torch.autocast to use "
                            "lower-precision activations")
        y = topkast_linear(x, self.values, self._state, self.bias)
        return y if out_dtype is None else y.to(out_dtype)

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__} has no dense .weight: its weights exist only on the "
                "top-K set. Use .values (theta on B, A first), .sparse_state (the CSR "
                "structure), .to_dense() for small layers, or sparsecore.export for a "
                "torch sparse CSR / scipy matrix.")
        return super().__getattr__(name)

    # ------------------------------------------------------------- exploration
    @torch.no_grad()
    def apply_exploration(self) -> None:
        """Add the exploration term's gradient, lambda*theta on A and lambda*theta/D
        on B minus A, to ``values.grad`` (no-op without a gradient or with lambda =
        0). Called once per optimizer step by the step pre-hook that sparsecore
        installs on every optimizer; you never call it yourself."""
        g = self.values.grad
        if g is None or self.exploration == 0.0:
            return
        v, k = self.values.detach(), self.k_a
        g[:k].add_(v[:k], alpha=self.exploration)
        g[k:].add_(v[k:], alpha=self.exploration / self.density)

    # ----------------------------------------------------------------- indices
    def active_indices(self) -> torch.Tensor:
        """Sorted int64 flat indices (row * in + col) of the forward set A."""
        return torch.from_numpy(self._state.a_flat())

    def backward_indices(self) -> torch.Tensor:
        """Sorted int64 flat indices of the backward set B (A included)."""
        st = self._state
        return torch.from_numpy(np.sort(np.concatenate([st.a_flat(), st.x_flat()])))

    def pool_size(self) -> int:
        return self.k_b + self._state.n_reserve

    def to_dense(self, which: str = "theta", limit: int = TO_DENSE_LIMIT) -> torch.Tensor:
        """Dense (out, in) copy for small layers and tests: ``which="theta"`` gives
        every coordinate's current value (untouched ones regenerated), ``"forward"``
        the forward weight (theta on A, zero elsewhere). Refuses above ``limit``
        elements."""
        if which not in ("theta", "forward"):
            raise ValueError(f"which must be 'theta' or 'forward', got {which!r}")
        if self.n_total > limit:
            raise ValueError(
                f"to_dense() refused: {self.out_features}x{self.in_features} = {self.n_total} "
                f"elements exceeds the limit of {limit}; it exists for small layers and tests")
        v = self.values.detach().cpu()
        st = self._state
        if which == "forward":
            dense = torch.zeros(self.n_total, dtype=v.dtype)
            dense[torch.from_numpy(st.a_flat())] = v[: self.k_a]
        else:
            spec = self._spec()
            dense = torch.from_numpy(_init.init_values(spec.key, np.arange(self.n_total),
                                                       spec.kind, spec.param, spec.dtype))
            dense[st.reserve_idx.cpu()] = st.reserve_val.cpu()
            for f, val in st.cold.chunks():
                dense[torch.from_numpy(f)] = torch.from_numpy(val)
            dense[torch.from_numpy(st.a_flat())] = v[: self.k_a]
            dense[torch.from_numpy(st.x_flat())] = v[self.k_a:]
        return dense.view(self.out_features, self.in_features)

    # ----------------------------------------------------------------- refresh
    @torch.no_grad()
    def refresh(self, optimizer=None, *, name: str | None = None) -> dict:
        """Recompute A and B exactly, rewrite ``values`` in place and remap the state
        of ``optimizer`` (one or several): entries of every state tensor shaped like
        ``values`` follow their coordinate, are zero for coordinates new to B and are
        dropped for coordinates that left B. The gradient and every tensor given to
        a hook of :meth:`register_refresh_hook` are remapped the same way.

        Raises :class:`RefreshError` and changes nothing if theta_B holds NaN/Inf,
        or if an optimizer that has stepped these values holds state for them and
        is not among ``optimizer`` (its state would silently misalign).
        Returns this refresh's statistics.

        Memory: the new structure is built at its exact size next to the old one;
        the remaps then run one tensor at a time (one K_B temporary)."""
        where = name or self._name()
        given = _optimizers(optimizer)
        for ref in list(self._optimizers_seen.values()):
            opt = ref()
            if opt is not None and opt.state.get(self.values) and not any(opt is g for g in given):
                raise RefreshError(
                    f"{where}: optimizer {type(opt).__name__} at {id(opt):#x} holds state for "
                    "this layer's values but was not passed to refresh(); its state would "
                    "no longer match the coordinates (nothing was changed). Pass it: "
                    "layer.refresh(optimizer), or use SparseModel.attach(optimizer).")
        dev = self.values.device   # the refresh runs on the host (Numba), see docs/gpu.md
        res = _refresh(self._state.to("cpu"), self.values.detach().cpu().numpy(),
                       k_a=self.k_a, k_b=self.k_b, reserve_target=self._reserve_target(),
                       reserve_cap=self._reserve_cap(), spec=self._spec(), name=where,
                       spill_dir=self.spill_dir)
        remap = [t for opt in given for t in (opt.state.get(self.values) or {}).values()
                 if torch.is_tensor(t) and t.shape == self.values.shape]
        if self.values.grad is not None:
            remap.append(self.values.grad)
        # commit: nothing below can fail on valid input
        new_state, new_values, src, info = res
        del res
        self._state = new_state.to(dev)
        self.values.copy_(torch.from_numpy(new_values))
        del new_values
        src_dev = {}

        def remap_tensor(t: torch.Tensor) -> None:
            if t.shape != self.values.shape:
                raise ValueError(f"{where}: a remapped tensor must have the shape of values "
                                 f"{tuple(self.values.shape)}, got {tuple(t.shape)}")
            if t.device.type == "cpu":
                arr = t.detach().numpy()
                new = np.empty_like(arr)
                _pool.gather_or_zero(arr, src, new)
                arr[:] = new
                return
            if t.device not in src_dev:
                src_dev[t.device] = torch.from_numpy(src).to(t.device, torch.int64)
            s_t = src_dev[t.device]
            t.copy_(torch.where(s_t >= 0, t[s_t.clamp(min=0)], torch.zeros((), dtype=t.dtype,
                                                                           device=t.device)))

        for t in remap:
            remap_tensor(t)
        for hook in list(self._refresh_hooks.values()):
            hook(remap_tensor)
        s = self.stats
        s["refreshes"] += 1
        s["replenishes"] += info["replenished"]
        s["scanned_added"] += info["scanned_added"]
        s["trimmed"] += info["trimmed"]
        s["spilled"] = self._state.cold.n
        s["unspilled"] += info["unspilled"]
        s["changed_a"], s["changed_b"] = info["changed_a"], info["changed_b"]
        s["entered_a_from_outside_b"] += info["entered_a_from_outside_b"]
        # every coordinate that was ever in B is in B now or, trained, in the reserve
        # or the cold store
        s["ever_in_b"] = self.k_b + info["trained_in_reserve"] + self._state.cold.n
        return info

    def register_refresh_hook(self, hook) -> RemovableHandle:
        """Keep external per-coordinate state aligned with ``values``: after every
        refresh, ``hook(remap)`` is called, and ``remap(t)`` rewrites a tensor shaped
        like ``values`` in place (entries follow their coordinate, zero for new
        ones). E.g. an EMA of the weights::

            ema = layer.values.detach().clone()
            layer.register_refresh_hook(lambda remap: remap(ema))

        Returns a handle whose ``remove()`` unregisters the hook."""
        handle = RemovableHandle(self._refresh_hooks)
        self._refresh_hooks[handle.id] = hook
        return handle

    def _name(self) -> str:
        return f"TopKASTLinear({self.in_features}, {self.out_features})"

    # ------------------------------------------------------------- state dict
    def config(self) -> dict:
        return {"version": _STATE_VERSION, "type": type(self).__name__,
                "in_features": self.in_features, "out_features": self.out_features,
                "forward_sparsity": self.forward_sparsity,
                "backward_sparsity": self.backward_sparsity,
                "k_a": self.k_a, "k_b": self.k_b, "init": self.init,
                "init_scale": self.init_scale, "dtype": str(self.values.dtype),
                "bias": self.bias is not None}

    def get_extra_state(self):
        return {**self.config(), "stats": dict(self.stats)}

    def set_extra_state(self, state):  # handled in _load_from_state_dict
        pass

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for n, t in self._state.tensors().items():
            destination[prefix + n] = t

    def validate_state(self, state: dict, prefix: str = "", cold_chunks=None) -> dict:
        """Check a state (as produced by ``state_dict()``) against this layer without
        changing anything. Returns what to install: ``values``, ``bias`` (if any),
        the new :class:`SparseState` (``"sparse"``) and the saved ``stats``.
        ``cold_chunks``: the cold entries as an iterable of (flat, values) chunks
        instead of ``cold_idx``/``cold_val`` in ``state`` (how :func:`sparsecore.load`
        streams them). Raises ValueError naming the bad entry."""
        where = prefix or self._name()
        need = ["values", "_extra_state"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + n for n in need + list(TENSOR_NAMES)
                   if prefix + n not in state and n not in OPTIONAL_NAMES]
        if missing:
            raise ValueError(f"{where}: state is missing {missing}")
        cfg = state[prefix + "_extra_state"]
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: config entry is not a dict: {cfg!r}")
        diff = {k: (cfg.get(k), v) for k, v in self.config().items() if cfg.get(k) != v}
        if diff:
            raise ValueError(f"{where}: state was saved from another configuration "
                             f"(saved, this layer): {diff}")
        dt = self.values.dtype
        out = {}
        for n, shape in (("values", (self.k_b,)), ("bias", (self.out_features,))):
            if n not in need:
                continue
            t = state[prefix + n]
            if not torch.is_tensor(t) or t.dtype != dt or tuple(t.shape) != shape:
                got = (tuple(t.shape), t.dtype) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"{where}: {n} is {got}; expected {shape} {dt}")
            if n == "values" and not torch.isfinite(t).all():
                raise ValueError(f"{where}: values contains NaN or Inf")
            out[n] = t
        out["sparse"] = SparseState.from_tensors(
            {n: state[prefix + n] for n in TENSOR_NAMES if prefix + n in state},
            in_features=self.in_features,
            out_features=self.out_features, k_a=self.k_a, k_b=self.k_b, value_dtype=dt,
            where=where, spill_dir=self.spill_dir, cold_chunks=cold_chunks)
        out["stats"] = cfg.get("stats")
        return out

    def install_state(self, g: dict, cold=None) -> None:
        """Install what :meth:`validate_state` returned (``cold``: a cold store
        checked against the same structure, replacing the one in ``g``)."""
        with torch.no_grad():
            self.values.copy_(g["values"])
            if self.bias is not None:
                self.bias.copy_(g["bias"])
        st = g["sparse"] if cold is None else dataclasses.replace(g["sparse"], cold=cold)
        self._state = st.to(self.values.device, self.values.dtype)
        if isinstance(g["stats"], dict):
            self.stats.update({k: v for k, v in g["stats"].items() if k in self.stats})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        try:
            g = self.validate_state(state_dict, prefix)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        self.install_state(g)
        if strict:
            known = {prefix + n for n in ["values", "bias", "_extra_state", *TENSOR_NAMES]}
            for k in state_dict:
                if k.startswith(prefix) and k not in known and "." not in k[len(prefix):]:
                    unexpected_keys.append(k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, forward_sparsity={self.forward_sparsity}, "
                f"backward_sparsity={self.backward_sparsity}, nnz_A={self.k_a}, nnz_B={self.k_b}, "
                f"pool={self.pool_size()}, dtype={self.values.dtype}")


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    t = tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


def conv2d_as_linear(conv, x: torch.Tensor, linear) -> torch.Tensor:
    """Apply a convolution with ``conv``'s geometry (in_channels, out_channels,
    kernel_size, stride, padding, dilation) by unfolding ``x`` (im2col) and calling
    ``linear`` on the (n, L, C*kh*kw) patches. Shared by the training and the
    inference convolution."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != conv.in_channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input has shape {shape}; expected (N, C={conv.in_channels}, H, W) "
                         f"or (C={conv.in_channels}, H, W)")
    batched = x.dim() == 4
    if not batched:
        x = x.unsqueeze(0)
    n, _, h, w = x.shape
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = conv.padding, conv.dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input spatial size {(h, w)} is too small for kernel_size "
                         f"{conv.kernel_size} with padding {conv.padding}")
    cols = torch.nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation,
                                      padding=conv.padding, stride=conv.stride)
    y = linear(cols.transpose(1, 2))                       # (n, L, out)
    y = y.transpose(1, 2).reshape(n, conv.out_channels, ho, wo)
    return y if batched else y.squeeze(0)


class TopKASTConv2d(TopKASTLinear):
    """A 2-D convolution trained with Top-KAST over the same storage as
    :class:`TopKASTLinear`: the dense-equivalent weight is (out_channels,
    in_channels * kh * kw), in the order of ``nn.Conv2d.weight.flatten(1)``.

    The input is unfolded (im2col) and multiplied by the sparse weight, so the
    extra memory is that of the unfolded activations, never the dense weight.
    Supports stride, zero padding and dilation; groups = 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, **kwargs):
        for nm, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 \
                or min(self.padding) < 0:
            raise ValueError(f"invalid convolution geometry: kernel_size={self.kernel_size}, "
                             f"stride={self.stride}, padding={self.padding}, "
                             f"dilation={self.dilation}")
        self.in_channels, self.out_channels = in_channels, out_channels
        kh, kw = self.kernel_size
        super().__init__(in_channels * kh * kw, out_channels, bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_as_linear(self, x, super().forward)

    def _name(self) -> str:
        return f"TopKASTConv2d({self.in_channels}, {self.out_channels}, {self.kernel_size})"

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(in_channels=self.in_channels, out_channels=self.out_channels,
                   kernel_size=list(self.kernel_size), stride=list(self.stride),
                   padding=list(self.padding), dilation=list(self.dilation))
        return cfg

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                + super().extra_repr())
