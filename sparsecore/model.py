"""SparseModel: turn the linear-like layers of any model (nn.Linear and subclasses,
transformers' Conv1D, nn.MultiheadAttention, nn.Conv1d, nn.Conv2d) into Top-KAST
layers with one line, build it without dense memory (also for Hugging Face and
nanoGPT-style models created under ``torch.device("meta")``), and refresh it from
an optimizer hook so the training loop stays unchanged."""
from __future__ import annotations

import fnmatch
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .adapters import TopKASTConv1d, TopKASTMultiheadAttention
from .memory import MemoryReport
from .layers import DEFAULT_RESERVE, TopKASTConv2d, TopKASTLinear, _check_sparsities
from .distributed import check_topology
from .topkast import RefreshError

_LAYER_KEYS = ("forward_sparsity", "backward_sparsity", "exploration", "reserve")
_SPARSE_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------- discovery

@dataclass
class _Unit:
    """One linear-like module of the model and what SparseModel does with it."""
    name: str
    module: nn.Module
    kind: str                      # Linear, Conv1D, MultiheadAttention, Conv1d, Conv2d, ...
    shape: str                     # human-readable geometry
    weights: dict                  # relative name -> dense weight Parameter it would discard
    unsupported: str | None        # why it cannot become sparse (None: it can)
    tied: str | None = None        # description of a tie with a parameter outside it
    sparse: bool = False
    reason: str = ""               # why it stayed dense / notes on its sparse form
    notes: list = field(default_factory=list)


def _hf_conv1d_type():
    """transformers' ``Conv1D`` class, if transformers is loaded (a model can only
    hold one then). Not imported otherwise: transformers is optional."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _forward_overridden(m: nn.Module, base: type) -> str | None:
    if type(m).forward is not base.forward:
        return f"{type(m).__name__} overrides {base.__name__}.forward"
    return None


def _conv_problem(m: nn.Module) -> str | None:
    if m.groups != 1:
        return f"groups={m.groups} is not supported"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} is not supported"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r} is not supported (numeric padding only)"
    return None


def _linear_like(name: str, m: nn.Module) -> _Unit | None:
    """Describe ``m`` if it is a linear-like projection (else None)."""
    hf_conv1d = _hf_conv1d_type()
    if isinstance(m, nn.MultiheadAttention):
        w = {k: getattr(m, k) for k in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                        "v_proj_weight") if getattr(m, k, None) is not None}
        w["out_proj.weight"] = m.out_proj.weight
        return _Unit(name, m, "MultiheadAttention",
                     f"embed_dim={m.embed_dim}, num_heads={m.num_heads}", w,
                     _forward_overridden(m, nn.MultiheadAttention))
    if isinstance(m, nn.Linear):
        unit = _Unit(name, m, type(m).__name__, f"{m.in_features}->{m.out_features}",
                     {"weight": m.weight}, _forward_overridden(m, nn.Linear))
    elif hf_conv1d is not None and isinstance(m, hf_conv1d):
        nx, nf = m.weight.shape
        unit = _Unit(name, m, "Conv1D", f"{nx}->{nf}", {"weight": m.weight},
                     _forward_overridden(m, hf_conv1d))
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
        base = nn.Conv1d if isinstance(m, nn.Conv1d) else nn.Conv2d
        unit = _Unit(name, m, base.__name__,
                     f"{m.in_channels}->{m.out_channels}, kernel_size={tuple(m.kernel_size)}",
                     {"weight": m.weight}, _forward_overridden(m, base) or _conv_problem(m))
    elif isinstance(m, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                        nn.Bilinear)):
        unit = _Unit(name, m, type(m).__name__, "", {"weight": m.weight},
                     f"{type(m).__name__} has no sparse counterpart")
    else:
        return None
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        unit.unsupported = "lazy module not initialised yet (run a forward pass first)"
    return unit


def _find_units(module: nn.Module) -> list[_Unit]:
    """Linear-like modules in ``named_modules`` order (the inside of one is not
    searched: an nn.MultiheadAttention's out_proj belongs to the attention), with
    ties to parameters outside each unit recorded."""
    units, inside = [], []
    for name, m in module.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        u = _linear_like(name, m)
        if u is not None:
            units.append(u)
            inside.append(name)
    owners: dict[int, list[str]] = {}
    for pname, p in module.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for u in units:
        for rel, w in u.weights.items():
            others = [o for o in owners.get(id(w), []) if not o.startswith(u.name + ".")]
            if others:
                u.tied = f"{u.name}.{rel} is the same Parameter as {', '.join(others)}"
                break
    return units


def _match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name == pattern


def _under(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _group_name(text: str) -> str:
    """``blocks.3.fc1`` -> ``blocks.*.fc1``, also inside a sentence (for compact
    summaries); numbers such as ``0.9`` are left alone."""
    return re.sub(r"(?:(?<=[A-Za-z_]\.)|^)\d+(?=[.\s,;)]|$)", "*", text)


# --------------------------------------------------- initialising meta tensors

def _model_init_for(root: nn.Module, name: str):
    """The model's own per-module initialiser: ``_init_weights(module)`` of the
    nearest module on the path from ``name`` up to the root that defines one (every
    Hugging Face ``PreTrainedModel`` does, and so does nanoGPT's GPT)."""
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        anc = root.get_submodule(".".join(parts[:i]))
        fn = getattr(anc, "_init_weights", None)
        if callable(fn):
            return fn, f"{type(anc).__name__}._init_weights"
    return None, None


def _init_norm_identity(m: nn.Module) -> None:
    """Normalisation layers (class name containing "Norm": LayerNorm, RMSNorm, custom
    ones) start as the identity: weight 1, bias 0."""
    if "norm" not in type(m).__name__.lower():
        return
    for k, fill in (("weight", 1.0), ("bias", 0.0)):
        t = getattr(m, k, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.fill_(fill)


def _rebuild_from_config(m: nn.Module) -> None:
    """A module that owns only buffers derived from a ``config`` attribute (e.g. Hugging
    Face rotary embeddings' ``inv_freq``) is rebuilt on the CPU from that config and its
    buffers copied over."""
    cfg = getattr(m, "config", None)
    if cfg is None or any(p is not None for p in m._parameters.values()):
        return
    try:
        fresh = type(m)(cfg)
    except (TypeError, ValueError):   # its constructor takes more than the config
        return
    for k, t in m._buffers.items():
        src = fresh._buffers.get(k)
        if t is not None and src is not None and src.shape == t.shape:
            t.copy_(src.to(t.dtype))


class SparseModel(nn.Module):
    """Wrap ``module`` and replace its linear-like layers by Top-KAST layers:

    ============================================  =========================================
    ``nn.Linear`` and subclasses (same forward)   :class:`TopKASTLinear`
    transformers' ``Conv1D`` (weight (in, out))   :class:`TopKASTLinear` (weight transposed)
    ``nn.MultiheadAttention``                     :class:`TopKASTMultiheadAttention`
    ``nn.Conv1d`` (groups=1, zero numeric pad.)    :class:`TopKASTConv1d`
    ``nn.Conv2d`` (groups=1, zero numeric pad.)    :class:`TopKASTConv2d`
    ============================================  =========================================

    Args:
        module: any nn.Module, possibly built under ``torch.device("meta")``. Sparse
            layers are built by a streaming scan (no dense weight ever exists); the
            remaining meta tensors are materialised on the CPU and initialised, per
            module, by the first of: ``init_fn(module)``; the model's own
            ``_init_weights(module)`` (nearest ancestor defining it: Hugging Face
            models, nanoGPT); ``reset_parameters()``; ``_reset_parameters()``; the
            identity for normalisation layers; rebuilding a buffer-only module from
            its ``config``. A tensor none of these initialises is an error naming it.
            All of it runs under a generator seeded by ``seed``.
        forward_sparsity, backward_sparsity, exploration, reserve: Top-KAST settings
            for every replaced layer (see :class:`TopKASTLinear`).
        refresh_every: optimizer steps between refreshes once :meth:`attach` is called.
        seed: model seed; each layer's key derives from it and the layer's qualified
            name, so the same seed builds the same model.
        include, exclude: qualified-name patterns (fnmatch, e.g. ``"blocks.*.fc1"``)
            choosing which linear-like modules become sparse (default: all). A pattern
            that matches nothing, or only modules that cannot be sparse, is an error.
        untie: patterns naming modules whose weight is tied to another parameter
            (e.g. ``lm_head`` tied to the token embedding) that should become sparse
            anyway; this breaks the tie (the other module keeps the dense tensor).
            Without it a tied module stays dense, with a warning naming the tie.
        overrides: ``{pattern: {"forward_sparsity": ..., "backward_sparsity": ...,
            "exploration": ..., "reserve": ...}}`` per-module settings; the last
            matching pattern wins.
        init_fn: ``callable(module)`` that initialises, in place, the tensors a
            module directly owns (tried first for every module with meta tensors).
        spill_dir: directory for the sparse layers' cold stores (trained coordinates
            that left the RAM pool, on disk; see :mod:`sparsecore.spill`). Default
            ``$SPARSECORE_SPILL_DIR``, else a per-process temporary directory.
        verbose: print :meth:`summary` (compact) after construction.
        check_distributed: when torch.distributed is initialised with several ranks,
            verify at :meth:`attach` and after every refresh that all ranks hold the
            same sparse configuration and sets (a collective; see
            :func:`sparsecore.distributed.check_topology` and docs/distributed.md).
            Turn it off only if the ranks train independent models.

    The original dense weights of replaced layers are not used (a warning lists them
    when they were real tensors): initial values come from the layer key. Biases are
    kept when the model is materialised, re-initialised when it is on the meta device.
    Sparse layers compute in float32 or float64; a replaced layer of another dtype is
    built in float32 (the summary says so). If construction fails, ``module`` is left
    as it was.
    """

    def __init__(self, module: nn.Module, *, forward_sparsity: float, backward_sparsity: float,
                 refresh_every: int = 100, exploration: float = 1e-4, seed: int = 0,
                 reserve: float = DEFAULT_RESERVE, include: Iterable[str] | None = None,
                 exclude: Iterable[str] = (), untie: Iterable[str] = (),
                 overrides: Mapping[str, Mapping] | None = None,
                 init_fn: Callable[[nn.Module], None] | None = None, verbose: bool = True,
                 check_distributed: bool = True, spill_dir: str | os.PathLike | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, SparseModel):
            raise TypeError("module is already a SparseModel")
        _check_sparsities(forward_sparsity, backward_sparsity)
        if not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive int, got {refresh_every!r}")
        if any(isinstance(p, str) for p in (include, exclude, untie)):
            raise TypeError("include/exclude/untie take a list of patterns, not a single string")
        if init_fn is not None and not callable(init_fn):
            raise TypeError(f"init_fn must be a callable(module), got {type(init_fn).__name__}")
        self.refresh_every = refresh_every
        self.seed = int(seed)
        self.check_distributed = bool(check_distributed)
        defaults = dict(forward_sparsity=forward_sparsity, backward_sparsity=backward_sparsity,
                        exploration=exploration, reserve=reserve)
        if _linear_like("", module) is not None:
            raise ValueError("module itself is a single layer; use TopKASTLinear/TopKASTConv2d "
                             "directly or wrap it in a container")
        units = _find_units(module)
        chosen = self._decide(units, include, list(exclude), list(untie))
        per_layer = {u.name: dict(defaults) for u in chosen}
        for pat, cfg in (overrides or {}).items():
            bad = set(cfg) - set(_LAYER_KEYS)
            if bad:
                raise ValueError(f"override {pat!r} has unknown settings {sorted(bad)}; "
                                 f"allowed: {list(_LAYER_KEYS)}")
            hit = [n for n in per_layer if _match(n, pat)]
            if not hit:
                raise ValueError(f"overrides pattern {pat!r} matches no module chosen to become "
                                 f"sparse; candidates are: {list(per_layer)}")
            for n in hit:
                per_layer[n].update(cfg)
        for n, cfg in per_layer.items():
            try:
                _check_sparsities(cfg["forward_sparsity"], cfg["backward_sparsity"])
            except (TypeError, ValueError) as e:
                raise type(e)(f"layer {n!r}: {e}") from None

        with torch.device("cpu"):  # even inside a user's `with torch.device("meta")`
            # 1. materialise the dense part (the chosen modules are still the originals,
            #    so a model's own initialiser sees the structure it expects)
            undo = self._materialise(module, {u.name for u in chosen}, init_fn)
            try:
                # 2. build every sparse replacement before touching the module
                new = {}
                for u in chosen:
                    try:
                        new[u.name] = self._build(u, per_layer[u.name])
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"layer {u.name!r}: {e}") from e
            except BaseException:
                undo()
                raise
        for u in chosen:
            cfg = per_layer[u.name]
            u.reason = " ".join([*u.notes, f"S_f={cfg['forward_sparsity']}, "
                                 f"S_b={cfg['backward_sparsity']}"])
        # 3. swap them in (cannot fail), then tell the module about it
        for name, layer in new.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer)
        _disable_torch_fused_paths(module)
        _forget_hf_ties(module, [u.name for u in chosen if u.tied])
        self.module = module
        self._units = [(u.name, u.kind, u.shape, u.sparse, u.reason) for u in units]
        self._hooks: dict[int, tuple] = {}
        self._steps: dict[int, int] = {}
        self._opt_order: list[int] = []
        self._pending_steps = 0

        for u in units:
            if u.tied and not u.sparse:
                warnings.warn(f"SparseModel: {u.name} stays dense because its weight is tied "
                              f"({u.tied}); pass untie=[{u.name!r}] to make it sparse and break "
                              f"the tie", UserWarning, stacklevel=2)
        discarded = [u.name for u in chosen if any(not w.is_meta for w in u.weights.values())]
        if discarded:
            shown = ", ".join(discarded[:6]) + (f", ... ({len(discarded)} in all)"
                                                if len(discarded) > 6 else "")
            warnings.warn(f"SparseModel discarded the dense weights of {len(discarded)} replaced "
                          f"module(s) ({shown}); the sparse layers start from their own "
                          f"initialisation (seed={self.seed}), not from those weights. Build "
                          f"the model under torch.device('meta') to never allocate them.",
                          UserWarning, stacklevel=2)
        if spill_dir is not None:
            for layer in self.sparse_layers().values():
                layer.spill_dir = os.fspath(spill_dir)
        if verbose:
            print(self.summary())

    # ---------------------------------------------------------------- selection
    def _decide(self, units: list[_Unit], include, exclude: list, untie: list) -> list[_Unit]:
        """Decide, for every linear-like unit, sparse or dense (with the reason); raise
        for patterns that match nothing. Returns the units to make sparse."""
        possible = [u.name for u in units if not u.unsupported]
        if include is not None:
            include = list(include)
            for pat in include:
                hit = [u for u in units if _match(u.name, pat)]
                if not hit:
                    raise ValueError(f"include pattern {pat!r} matches no linear-like module; "
                                     f"candidates are: {possible}")
                if all(u.unsupported for u in hit):
                    why = "; ".join(f"{u.name} ({u.kind}: {u.unsupported})" for u in hit[:5])
                    raise ValueError(f"include pattern {pat!r} names only modules that cannot be "
                                     f"made sparse: {why}; candidates are: {possible}")
        for pat in exclude:
            if not any(_match(u.name, pat) for u in units):
                raise ValueError(f"exclude pattern {pat!r} matches no linear-like module; "
                                 f"candidates are: {possible}")
        tied = [u.name for u in units if u.tied]
        for pat in untie:
            if not any(_match(n, pat) for n in tied):
                raise ValueError(f"untie pattern {pat!r} matches no tied module; tied modules "
                                 f"are: {tied}")
        chosen = []
        for u in units:
            ex = next((p for p in exclude if _match(u.name, p)), None)
            if u.unsupported:
                u.reason = f"unsupported: {u.unsupported}"
            elif include is not None and not any(_match(u.name, p) for p in include):
                u.reason = "not matched by include"
            elif ex is not None:
                u.reason = f"excluded by pattern {ex!r}"
            elif u.tied and not any(_match(u.name, p) for p in untie):
                u.reason = (f"tied: {u.tied}; pass untie=[{u.name!r}] to make it sparse "
                            f"(which breaks the tie)")
            else:
                u.sparse = True
                if u.tied:
                    u.notes.append(f"tie broken by untie ({u.tied})")
                chosen.append(u)
        if not chosen:
            raise ValueError(f"no layer to make sparse (candidates: {possible}, "
                             f"include={include}, exclude={exclude})")
        return chosen

    # ---------------------------------------------------------------- building
    def _materialise(self, module: nn.Module, replaced: set[str], init_fn) -> Callable[[], None]:
        """Move every meta tensor outside the replaced modules to the CPU and initialise
        it (see the class docstring). Tensors shared between modules (ties) stay
        shared and are initialised once, by their first owner. Returns an ``undo``
        callable; on an error here the module is restored before raising."""
        todo = [(n, m) for n, m in module.named_modules() if not _under(n, replaced)
                and any(t is not None and t.is_meta
                        for t in (*m._parameters.values(), *m._buffers.values()))]
        saved = [(m, dict(m._parameters), dict(m._buffers)) for _, m in todo]

        def undo():
            for m, params, bufs in saved:
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(bufs)

        if not todo:
            return undo
        memo: dict[int, torch.Tensor] = {}
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(self.seed)
                for name, m in todo:
                    fresh = {}
                    for store in (m._parameters, m._buffers):
                        for k, t in store.items():
                            if t is None or not t.is_meta:
                                continue
                            if id(t) not in memo:
                                new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                                if isinstance(t, nn.Parameter):
                                    new = nn.Parameter(new, requires_grad=t.requires_grad)
                                new.fill_(math.nan) if new.is_floating_point() else new.zero_()
                                memo[id(t)] = new
                                fresh[(id(store), k)] = (store, k, new)
                            store[k] = memo[id(t)]
                    if fresh:
                        self._initialise(module, name, m, list(fresh.values()), init_fn)
            left = [n for n, t in (*module.named_parameters(), *module.named_buffers())
                    if t.is_meta and not _under(n.rpartition(".")[0], replaced)]
            if left:
                by = "init_fn" if init_fn is not None else "initialisation"
                raise ValueError(f"tensors left on the meta device after {by}: {left[:8]}; an "
                                 f"init_fn must initialise tensors in place on the CPU, not "
                                 f"replace them by meta tensors")
        except BaseException:
            undo()
            raise
        return undo

    def _initialise(self, root, name, m, fresh, init_fn) -> None:
        """Run the initialisers of ``m`` in order until every fresh tensor of it has been
        written (detected by its version counter); tensors already written (by an
        earlier initialiser or another owner) are protected from later ones."""
        stages = []
        if init_fn is not None:
            stages.append(("init_fn", lambda: init_fn(m)))
        own, label = _model_init_for(root, name)
        if own is not None:
            stages.append((label, lambda: own(m)))
        for meth in ("reset_parameters", "_reset_parameters"):
            if callable(getattr(m, meth, None)):
                stages.append((f"{meth}()", getattr(m, meth)))
        stages.append(("norm identity", lambda: _init_norm_identity(m)))
        stages.append(("rebuild from config", lambda: _rebuild_from_config(m)))
        pending = {(id(s), k): (s, k, t, t._version) for s, k, t in fresh}
        for _, run in stages:
            done = [(t, t.clone()) for t in (*m._parameters.values(), *m._buffers.values())
                    if t is not None and not any(t is p[2] for p in pending.values())]
            run()
            for key, (store, k, t, v0) in list(pending.items()):
                if store.get(k) is not t or t._version != v0:
                    del pending[key]
            for t, before in done:
                if not torch.equal(t, before):
                    t.copy_(before)
            for key, (store, k, t, _) in list(pending.items()):
                pending[key] = (store, k, t, t._version)
            if not pending:
                return
        names = [k for _, k, _, _ in pending.values()]
        raise ValueError(
            f"module {name or '<root>'} ({type(m).__name__}) has tensors on the meta device "
            f"that nothing could initialise: {names} (tried: "
            f"{', '.join(l for l, _ in stages)}; it has no reset_parameters()). Pass "
            f"init_fn=callable(module) to SparseModel to initialise them in place.")

    def _build(self, u: _Unit, cfg: dict) -> nn.Module:
        """The sparse replacement of unit ``u`` (biases copied when they are real)."""
        old, w = u.module, next(iter(u.weights.values()))
        dtype = w.dtype if w.dtype in _SPARSE_DTYPES else torch.float32
        if w.dtype != dtype:
            u.notes.append(f"built in float32 (the model's {w.dtype} is not supported by "
                           f"sparse layers)")
        common = dict(seed=self.seed, dtype=dtype, **cfg)
        if u.kind == "MultiheadAttention":
            new = TopKASTMultiheadAttention(
                old.embed_dim, old.num_heads, dropout=old.dropout,
                bias=old.in_proj_bias is not None, add_bias_kv=old.bias_k is not None,
                add_zero_attn=old.add_zero_attn, kdim=old.kdim, vdim=old.vdim,
                batch_first=old.batch_first, name=u.name, **common)
            if old.in_proj_bias is not None:
                for part, b in zip((new.q_proj, new.k_proj, new.v_proj),
                                   old.in_proj_bias.chunk(3)):
                    _copy_real(part.bias, b)
                _copy_real(new.out_proj.bias, old.out_proj.bias)
            _copy_real(new.bias_k, old.bias_k)
            _copy_real(new.bias_v, old.bias_v)
            u.notes.append("-> TopKASTMultiheadAttention (q/k/v/out projections sparse)")
            return new
        if u.kind == "Conv1d":
            new = TopKASTConv1d(old.in_channels, old.out_channels, old.kernel_size,
                                stride=old.stride, padding=old.padding, dilation=old.dilation,
                                bias=old.bias is not None, name=u.name + ".linear", **common)
            _copy_real(new.bias, old.bias)
            u.notes.append("-> TopKASTConv1d")
            return new
        if u.kind == "Conv2d":
            new = TopKASTConv2d(old.in_channels, old.out_channels, old.kernel_size,
                                stride=old.stride, padding=old.padding, dilation=old.dilation,
                                bias=old.bias is not None, name=u.name, **common)
            u.notes.append("-> TopKASTConv2d")
        elif u.kind == "Conv1D":
            nx, nf = old.weight.shape
            new = TopKASTLinear(nx, nf, bias=old.bias is not None, name=u.name, **common)
            u.notes.append("-> TopKASTLinear (weight stored transposed)")
        else:
            new = TopKASTLinear(old.in_features, old.out_features, bias=old.bias is not None,
                                name=u.name, **common)
            u.notes.append("-> TopKASTLinear")
        _copy_real(new.bias, old.bias)
        return new

    # ---------------------------------------------------------------- running
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sparse_layers(self) -> dict[str, TopKASTLinear]:
        """Qualified name (inside the wrapped module) -> Top-KAST layer. An attention
        module contributes its four projections (``attn.q_proj`` ...), a Conv1d its
        ``conv.linear``."""
        return {n: m for n, m in self.module.named_modules() if isinstance(m, TopKASTLinear)}

    def summary(self, expand: bool = False) -> str:
        """Which linear-like modules became sparse (and as what, at which sparsities),
        and which stayed dense and why. Modules that differ only by a numeric index
        (``h.0.mlp``, ``h.1.mlp``) and are treated alike share one line (``h.*.mlp
        (x2)``) unless ``expand``."""
        groups: dict[tuple, list[str]] = {}
        for name, kind, shape, sparse, reason in self._units:
            key = ((name, reason) if expand else (_group_name(name), _group_name(reason)))
            groups.setdefault((*key, kind, shape, sparse), []).append(name)
        n_sparse = sum(1 for u in self._units if u[3])
        lines = [f"SparseModel (seed={self.seed}): {n_sparse} module(s) sparse, "
                 f"{len(self._units) - n_sparse} linear-like module(s) dense"]
        for title, flag in (("sparse:", True), ("dense:", False)):
            sel = [(k, v) for k, v in groups.items() if k[4] == flag]
            if sel:
                lines.append(title)
            for (gname, greason, kind, shape, _), names in sel:
                shown = f"{gname} (x{len(names)})" if len(names) > 1 else names[0]
                reason = greason if len(names) > 1 else next(
                    u[4] for u in self._units if u[0] == names[0])
                lines.append(f"  {shown}  {kind}({shape})  {reason}")
        if n_sparse:
            lines.append("note: sparse weights are 1-D `values` parameters; recipes that decay "
                         "only p.dim() >= 2 skip them: build groups with "
                         "sparsecore.param_groups(model, weight_decay)")
        return "\n".join(lines)

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        """The step count and every sparse layer's statistics travel in
        ``state_dict()`` (JSON-serialisable, as sparsecore checkpoints require)."""
        return {"step_count": int(self.step_count),
                "stats": {n: dict(l.stats) for n, l in self.sparse_layers().items()}}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"SparseModel extra state must be a dict, got {type(state).__name__}")
        if state.get("step_count") is not None:
            self.step_count = int(state["step_count"])
        layers = self.sparse_layers()
        for n, s in (state.get("stats") or {}).items():
            if n in layers and isinstance(s, dict):
                layers[n].stats.update(s)

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
        if self.check_distributed:
            try:
                check_topology(self, when="attach", extra={
                    "refresh_every": self.refresh_every, "seed": self.seed,
                    "step_count": self._steps[oid], "attached optimizers": len(self._opt_order)})
            except BaseException:
                self.detach_optimizer(optimizer)
                raise
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
        out = {n: l.refresh(opts, name=n) for n, l in layers.items()}
        if self.check_distributed:
            step = self._steps.get(id(only)) if only is not None else self.step_count
            check_topology(self, names=list(layers), when=f"after the refresh at step {step}",
                           extra={"step_count": step})
        return out

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict:
        """Per layer and total: nnz of A/B/pool, fraction of A and B changed at the
        last refresh, cumulative coordinates that entered A from outside B, the size
        of the union of B over training so far (``ever_in_b``), reserve entries
        dropped (``trimmed``, untrained), entries in the cold store on disk now
        (``spilled``) and read back from it so far (``unspilled``), replenishing scans
        and refreshes."""
        per = {}
        for n, l in self.sparse_layers().items():
            s = l.stats
            per[n] = {"nnz_a": l.k_a, "nnz_b": l.k_b, "pool": l.pool_size(),
                      "dense_equivalent": l.n_total, "changed_a": s["changed_a"],
                      "changed_b": s["changed_b"],
                      "entered_a_from_outside_b": s["entered_a_from_outside_b"],
                      "replenishes": s["replenishes"], "refreshes": s["refreshes"],
                      "ever_in_b": s["ever_in_b"], "trimmed": s["trimmed"],
                      "spilled": s["spilled"], "unspilled": s["unspilled"]}
        tot = {k: sum(p[k] for p in per.values())
               for k in ("nnz_a", "nnz_b", "pool", "dense_equivalent",
                         "entered_a_from_outside_b", "replenishes", "ever_in_b", "trimmed",
                         "spilled", "unspilled")}
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
        dense_equiv = spilled = 0

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
            spilled += nb["spilled"]
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
        for b in self.buffers():   # sparse layers hold no buffers (their state is not one)
            rep["buffers"] += b.numel() * b.element_size()
        dense_equiv += rep["buffers"]
        return MemoryReport(rep, dense_equiv, off_ram={"spilled": spilled})


# ---------------------------------------------------------------- helpers after the swap

def _copy_real(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    """Copy a real (non-meta) dense tensor such as a bias into its sparse counterpart."""
    if dst is not None and src is not None and not src.is_meta:
        with torch.no_grad():
            dst.copy_(src.detach().to(dst.dtype))


def _disable_torch_fused_paths(module: nn.Module) -> None:
    """torch's ``TransformerEncoder``/``TransformerEncoderLayer`` have an eval-mode fast
    path that reads the dense ``.weight`` of their projections. Where one of them now
    holds a sparse layer, turn the fast path off (the regular path, which calls the
    sub-modules, computes the same thing)."""
    for m in module.modules():
        if not any(isinstance(c, TopKASTLinear) for c in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoderLayer):
            m.activation_relu_or_gelu = False   # read only by the fast-path check
        elif isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False


def _forget_hf_ties(module: nn.Module, untied: list[str]) -> None:
    """Hugging Face models re-tie weights (``tie_weights()``) from
    ``all_tied_weights_keys`` or, when recomputing, from ``config.tie_word_embeddings``.
    For a tie the user broke with ``untie``, drop its entry and set
    ``tie_word_embeddings=False`` on that model's config, which is how transformers
    describes an untied model."""
    if not untied:
        return
    for prefix, m in module.named_modules():
        keys = getattr(m, "all_tied_weights_keys", None)
        if not isinstance(keys, dict):
            continue
        p = prefix + "." if prefix else ""
        broken = [k for k, v in keys.items() if _under(p + k, untied) or _under(p + str(v), untied)]
        for k in broken:
            del keys[k]
        cfg = getattr(m, "config", None)
        if broken and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
