"""Top-KAST layers: nn.Modules over the pool/floor storage (no dense weight)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from . import kernels
from .functional import SparsePlan, topkast_linear
from .kernels import init as _init
from .kernels import pool as _pool
from .topkast import (InitSpec, RefreshError, csr_to_flat, flat_to_csr, layer_key,
                      refresh_pool, sizes)

DEFAULT_RESERVE = 0.25
TO_DENSE_LIMIT = 1 << 26  # elements; to_dense() refuses above this
_STATE_VERSION = 1
_BUFFERS = ("a_indptr", "a_cols", "x_indptr", "x_cols", "reserve_idx", "reserve_val",
            "floor", "key")


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
        reserve: extra pool entries kept beyond B, as a fraction of K_B (>= 0).
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
                 device=None, dtype=None, name: str = ""):
        super().__init__()
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
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        device = torch.device("cpu") if device is None else torch.device(device)
        kernels.backend_name(device)  # raises for devices without a backend
        self.in_features = in_features
        self.out_features = out_features
        self.forward_sparsity = float(forward_sparsity)
        self.backward_sparsity = float(backward_sparsity)
        self.exploration = float(exploration)
        self.reserve = float(reserve)
        self.init = init
        self.init_scale = float(init_scale) if init_scale is not None else 1.0 / math.sqrt(in_features)
        self.k_a, self.k_b = sizes(in_features, out_features, forward_sparsity, backward_sparsity)
        self.stats = {"refreshes": 0, "replenishes": 0, "changed_a": 0.0, "changed_b": 0.0,
                      "entered_a_from_outside_b": 0, "scanned_added": 0}

        with torch.device(device):  # a surrounding `with torch.device("meta")` must not leak in
            self._build(dtype, bias, seed, name)

    def _build(self, dtype, bias: bool, seed: int, name: str) -> None:
        """Construction: the streaming scan from an empty pool (floor = inf)."""
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        key = layer_key(seed, name)
        empty_i = np.empty(0, np.int64)
        res = refresh_pool(empty_i, empty_i, np.empty(0, np_dtype), empty_i,
                           np.empty(0, np_dtype), math.inf, k_a=self.k_a, k_b=self.k_b,
                           n_total=self.n_total, reserve_target=self._reserve_target(),
                           spec=InitSpec(key, _init.KINDS[self.init], self.init_scale, np_dtype),
                           name=name or "TopKASTLinear")
        self.values = nn.Parameter(torch.from_numpy(res.values))
        self.bias = nn.Parameter(self._init_bias(dtype, key)) if bias else None
        self.register_buffer("key", torch.tensor(key - (1 << 64) if key >= 1 << 63 else key,
                                                 dtype=torch.int64))
        self._commit(res)
        self.stats["replenishes"] = res.replenished
        self.stats["scanned_added"] = res.scanned_added

    # ------------------------------------------------------------------ basics
    @property
    def n_total(self) -> int:
        return self.in_features * self.out_features

    @property
    def density(self) -> float:
        return 1.0 - self.forward_sparsity

    def _reserve_target(self) -> int:
        return int(math.ceil(self.reserve * self.k_b))

    def _init_bias(self, dtype, key: int) -> torch.Tensor:
        """nn.Linear's bias init, U(-1/sqrt(in), 1/sqrt(in)), drawn from a generator
        seeded by the layer key so the same seed rebuilds the same layer."""
        bound = 1.0 / math.sqrt(self.in_features)
        gen = torch.Generator().manual_seed(key & 0x7FFFFFFFFFFFFFFF)
        return torch.empty(self.out_features, dtype=dtype).uniform_(-bound, bound, generator=gen)

    def _spec(self) -> InitSpec:
        np_dtype = np.float32 if self.values.dtype == torch.float32 else np.float64
        return InitSpec(int(self.key) & 0xFFFFFFFFFFFFFFFF, _init.KINDS[self.init],
                        self.init_scale, np_dtype)

    def _commit(self, res) -> None:
        """Install a RefreshResult: index buffers and the cached transpose of A.
        (``values`` and optimizer state are written by the caller.)"""
        a_indptr, a_cols = flat_to_csr(res.a_flat, self.out_features, self.in_features)
        x_indptr, x_cols = flat_to_csr(res.x_flat, self.out_features, self.in_features)
        self._set_buffers(a_indptr, a_cols, x_indptr, x_cols, res.r_flat, res.r_val, res.floor)

    def _set_buffers(self, a_indptr, a_cols, x_indptr, x_cols, r_flat, r_val, floor) -> None:
        t = torch.from_numpy
        for nm, arr in (("a_indptr", a_indptr), ("a_cols", a_cols), ("x_indptr", x_indptr),
                        ("x_cols", x_cols), ("reserve_idx", r_flat), ("reserve_val", r_val)):
            self.register_buffer(nm, t(np.ascontiguousarray(arr)))
        self.register_buffer("floor", torch.tensor(float(floor), dtype=torch.float64, device="cpu"))
        at = kernels.transpose_csr(self.a_indptr, self.a_cols, self.in_features, check=False)
        for nm, arr in zip(("at_indptr", "at_rows", "at_perm"), at):
            self.register_buffer(nm, arr, persistent=False)

    def plan(self) -> SparsePlan:
        return SparsePlan(self.in_features, self.out_features, self.k_a,
                          self.a_indptr, self.a_cols, self.x_indptr, self.x_cols,
                          self.at_indptr, self.at_rows, self.at_perm,
                          self.exploration, self.exploration / self.density)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {tuple(x.shape)}; expected last dimension "
                             f"in_features={self.in_features}")
        if x.dtype != self.values.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's {self.values.dtype}")
        if x.device != self.values.device:
            raise ValueError(f"input is on {x.device} but the layer is on {self.values.device}")
        return topkast_linear(x, self.values, self.plan(), self.bias)

    # ----------------------------------------------------------------- indices
    def active_indices(self) -> torch.Tensor:
        """Sorted int64 flat indices (row * in + col) of the forward set A."""
        return torch.from_numpy(self._a_flat())

    def backward_indices(self) -> torch.Tensor:
        """Sorted int64 flat indices of the backward set B (A included)."""
        return torch.from_numpy(np.sort(np.concatenate([self._a_flat(), self._x_flat()])))

    def _a_flat(self) -> np.ndarray:
        return csr_to_flat(self.a_indptr.numpy(), self.a_cols.numpy(), self.in_features)

    def _x_flat(self) -> np.ndarray:
        return csr_to_flat(self.x_indptr.numpy(), self.x_cols.numpy(), self.in_features)

    def pool_size(self) -> int:
        return self.k_b + int(self.reserve_idx.numel())

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
        v = self.values.detach()
        if which == "forward":
            dense = torch.zeros(self.n_total, dtype=v.dtype)
            dense[torch.from_numpy(self._a_flat())] = v[: self.k_a]
        else:
            spec = self._spec()
            dense = torch.from_numpy(_init.init_values(spec.key, np.arange(self.n_total),
                                                       spec.kind, spec.param, spec.dtype))
            dense[torch.from_numpy(self.reserve_idx.numpy())] = self.reserve_val
            dense[torch.from_numpy(self._a_flat())] = v[: self.k_a]
            dense[torch.from_numpy(self._x_flat())] = v[self.k_a:]
        return dense.view(self.out_features, self.in_features)

    # ----------------------------------------------------------------- refresh
    @torch.no_grad()
    def refresh(self, optimizer=None, *, name: str | None = None) -> dict:
        """Recompute A and B exactly, rewrite ``values`` in place and remap the state
        of ``optimizer`` (one or several): entries of every state tensor shaped like
        ``values`` follow their coordinate, are zero for coordinates new to B and are
        dropped for coordinates that left B. Raises :class:`RefreshError` (and changes
        nothing) if theta_B holds NaN/Inf. Returns this refresh's statistics."""
        old_a = self._a_flat()
        old_x = self._x_flat()
        res = refresh_pool(old_a, old_x, self.values.detach().numpy(),
                           self.reserve_idx.numpy(), self.reserve_val.numpy(),
                           float(self.floor), k_a=self.k_a, k_b=self.k_b, n_total=self.n_total,
                           reserve_target=self._reserve_target(), spec=self._spec(),
                           name=name or self._name())
        def remap(t: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(_pool.gather_or_zero(t.detach().numpy(), res.src))

        staged = []  # everything computed before anything is written
        for opt in _optimizers(optimizer):
            st = opt.state.get(self.values)
            if not st:
                continue
            for k, t in st.items():
                if torch.is_tensor(t) and t.shape == self.values.shape:
                    staged.append((t, remap(t)))
        if self.values.grad is not None:
            staged.append((self.values.grad, remap(self.values.grad)))
        # commit
        self.values.copy_(torch.from_numpy(res.values))
        for t, new in staged:
            t.copy_(new)
        self._commit(res)
        src_a = res.src[: self.k_a]
        info = {  # res.src: old position in values (< K_A: was in A), -1: was not in B
            "changed_a": 1.0 - int(((src_a >= 0) & (src_a < self.k_a)).sum()) / self.k_a,
            "changed_b": 1.0 - int((res.src >= 0).sum()) / self.k_b,
            "entered_a_from_outside_b": int((src_a < 0).sum()),
            "replenished": res.replenished,
            "scanned_added": res.scanned_added,
        }
        s = self.stats
        s["refreshes"] += 1
        s["replenishes"] += res.replenished
        s["scanned_added"] += res.scanned_added
        s["changed_a"], s["changed_b"] = info["changed_a"], info["changed_b"]
        s["entered_a_from_outside_b"] += info["entered_a_from_outside_b"]
        return info

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
        return self.config()

    def set_extra_state(self, state):  # handled in _load_from_state_dict
        pass

    def validate_state(self, state: dict, prefix: str = "") -> dict:
        """Check a state (as produced by ``state_dict()``) against this layer without
        changing anything; returns the arrays to install. Raises ValueError."""
        where = prefix or self._name()
        need = ["values", "_extra_state", *_BUFFERS] + (["bias"] if self.bias is not None else [])
        missing = [prefix + n for n in need if prefix + n not in state]
        if missing:
            raise ValueError(f"{where}: state is missing {missing}")
        cfg = state[prefix + "_extra_state"]
        mine = self.config()
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: config entry is not a dict: {cfg!r}")
        diff = {k: (cfg.get(k), v) for k, v in mine.items() if cfg.get(k) != v}
        if diff:
            raise ValueError(f"{where}: state was saved from another configuration "
                             f"(saved, this layer): {diff}")
        g = {n: state[prefix + n] for n in need if n != "_extra_state"}
        for n, t in g.items():
            if not torch.is_tensor(t):
                raise ValueError(f"{where}: {n} is not a tensor")
        dt = self.values.dtype
        expect = {"values": ((self.k_b,), dt), "a_indptr": ((self.out_features + 1,), torch.int64),
                  "x_indptr": ((self.out_features + 1,), torch.int64),
                  "a_cols": ((self.k_a,), torch.int32),
                  "x_cols": ((self.k_b - self.k_a,), torch.int32),
                  "floor": ((), torch.float64), "key": ((), torch.int64),
                  "reserve_idx": (None, torch.int64), "reserve_val": (None, dt),
                  "bias": ((self.out_features,), dt)}
        for n, t in g.items():
            shape, dtype = expect[n]
            if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
                raise ValueError(f"{where}: {n} has shape {tuple(t.shape)} and dtype {t.dtype}; "
                                 f"expected {shape if shape is not None else '(any,)'} {dtype}")
        if g["reserve_idx"].shape != g["reserve_val"].shape or g["reserve_idx"].dim() != 1:
            raise ValueError(f"{where}: reserve_idx and reserve_val differ in shape")
        for n in ("values", "reserve_val"):
            if not torch.isfinite(g[n]).all():
                raise ValueError(f"{where}: {n} contains NaN or Inf")
        n_cols = self.in_features
        flats = []
        for ip, cols, nm in (("a_indptr", "a_cols", "A"), ("x_indptr", "x_cols", "B minus A")):
            try:
                kernels._validate.check_csr(g[ip], g[cols], self.out_features, n_cols, nm)
            except (TypeError, ValueError, IndexError) as e:
                raise ValueError(f"{where}: {e}") from None
            flats.append(csr_to_flat(g[ip].numpy(), g[cols].numpy(), n_cols))
        r = g["reserve_idx"].numpy()
        for f, nm in ((flats[0], "A"), (flats[1], "B minus A"), (r, "reserve")):
            if f.size and (np.any(np.diff(f) <= 0) or f[0] < 0 or f[-1] >= self.n_total):
                raise ValueError(f"{where}: {nm} indices are not sorted, unique and in "
                                 f"[0, {self.n_total})")
        allf = np.concatenate(flats + [r])
        if np.unique(allf).size != allf.size:
            raise ValueError(f"{where}: A, B minus A and the reserve overlap")
        if not float(g["floor"]) >= 0:
            raise ValueError(f"{where}: floor {float(g['floor'])} is not >= 0")
        return g

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        try:
            g = self.validate_state(state_dict, prefix)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        with torch.no_grad():
            self.values.copy_(g["values"])
            if self.bias is not None:
                self.bias.copy_(g["bias"])
        self.key = g["key"].clone()
        self._set_buffers(g["a_indptr"].numpy().copy(), g["a_cols"].numpy().copy(),
                          g["x_indptr"].numpy().copy(), g["x_cols"].numpy().copy(),
                          g["reserve_idx"].numpy().copy(), g["reserve_val"].numpy().copy(),
                          float(g["floor"]))
        if strict:
            known = {prefix + n for n in ["values", "bias", "_extra_state", *_BUFFERS]}
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
