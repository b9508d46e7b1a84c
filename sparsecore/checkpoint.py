"""Checkpoints: safetensors for tensors, a JSON header for everything else.

``save`` writes every tensor of the model's state (sparse values, index arrays,
reserve, floor, key, dense parameters and buffers) and of the optimizer's state
into one safetensors file; configurations (every ``_extra_state``, among them the
SparseModel's step count and per-layer statistics), optimizer hyper-parameters and
versions go into the file's metadata as JSON. Loading parses no pickle and
executes no code.

Memory: ``save`` hands safetensors pointers to the live tensors (no copy; only
tensors that share storage are cloned). ``load`` streams: it reads one tensor at a
time with ``pread`` (no memory map, whose touched pages would count as resident),
in two passes over the file:

1. validation: every tensor's checksum, shape and dtype, each sparse layer's
   structure (``layer.validate_state`` with only that layer's tensors alive) and
   the optimizer state are checked; nothing is changed, so a corrupt or
   mismatched file raises :class:`CheckpointError` and leaves model and optimizer
   untouched;
2. apply: module by module (each module's own tensors only) through the
   module's ``_load_from_state_dict``, then the optimizer, whose state tensors are
   overwritten in place where they already exist.

The transient is the largest module's tensors (about twice for a sparse layer,
whose new structure is built next to the old one), never a second copy of the
model. Checksums are verified again in the apply pass: a file changed between
the passes raises CheckpointError (and may leave the model partly loaded).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._version import __version__
from .layers import TopKASTLinear
from . import spill as _spill
from .state import OPTIONAL_NAMES, TENSOR_NAMES

FORMAT = "sparsecore-checkpoint"
FORMAT_VERSION = 2
_EXTRA = "_extra_state"


class CheckpointError(ValueError):
    """The checkpoint is corrupt or does not match the model/optimizer."""


def _model_state(model: torch.nn.Module):
    tensors, configs = {}, {}
    for k, v in model.state_dict().items():
        if k.endswith(_EXTRA):
            configs[k] = v
        elif torch.is_tensor(v):
            tensors[k] = v
        else:
            raise CheckpointError(f"state entry {k!r} is neither a tensor nor a config")
    return tensors, configs


def _jsonable(v, where):
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where} is not JSON-serialisable: {v!r}") from None
    return v


def _digest(t: torch.Tensor) -> str:
    """blake2b of a tensor's bytes (detects silent corruption of tensor data). A
    tensor on another device is copied to the host, one tensor at a time."""
    data = t.detach().cpu().contiguous().reshape(-1)
    data = data.view(torch.uint8).numpy() if data.numel() else b""   # empty: stride may be 0
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# ====================================================================== save

def save(model: torch.nn.Module, path, optimizer: torch.optim.Optimizer | None = None,
         extra: dict | None = None) -> None:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically (temp file + rename).
    ``extra`` is any JSON-serialisable dict, returned by :func:`load`. The step
    count travels in the SparseModel's own ``_extra_state`` config."""
    tensors, configs = _model_state(model)
    out = {f"model/{k}": v for k, v in tensors.items()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "sparsecore": __version__, "torch": torch.__version__,
              "model_class": type(model).__name__,
              "configs": _jsonable(configs, "a module's extra state"),
              "extra": _jsonable(extra, "extra") if extra is not None else None}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars = {}
        for pid, st in sd["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):
                    out[f"optim/{pid}/{name}"] = v
                else:
                    scalars[f"{pid}/{name}"] = _jsonable(v, f"optimizer state {name}")
        header["optimizer"] = {"class": type(optimizer).__name__, "scalars": scalars,
                               "param_groups": _jsonable(sd["param_groups"], "param_groups")}
    seen, final = set(), {}
    for k, v in out.items():  # safetensors refuses shared storage: copy duplicates
        v = v.detach().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr in seen:
            v = v.clone()
        seen.add(ptr)
        final[k] = v
    header["digests"] = {k: _digest(v) for k, v in final.items()}
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".sparsecore-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(final, tmp, metadata={"sparsecore": json.dumps(header)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ====================================================================== load

class _File:
    """An open checkpoint: its header, and tensors read one at a time (checked
    against their digests)."""

    def __init__(self, handle, path):
        self.f, self.path = handle, path
        try:
            meta = handle.metadata() or {}
            self.names = set(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise self.error(f"not a readable safetensors checkpoint ({e})") from None
        try:
            header = json.loads(meta["sparsecore"])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise self.error("missing or corrupt sparsecore header") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise self.error("missing or corrupt sparsecore header (not a sparsecore "
                             "checkpoint)")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise self.error(f"checkpoint format version {version!r} is not supported: this "
                             f"sparsecore ({__version__}) reads format version {FORMAT_VERSION} "
                             "only (format 1 predates the SparseState layout and cannot be "
                             "converted)")
        digests = header.get("digests")
        if not isinstance(digests, dict) or set(digests) != self.names:
            raise self.error("tensor digests missing or not matching the tensors")
        if not isinstance(header.get("configs", {}), dict):
            raise self.error("corrupt sparsecore header (configs)")
        self.header, self.digests = header, digests

    def error(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")

    def meta(self, name: str):
        """(shape, torch dtype name) of a stored tensor, without reading it."""
        try:
            s = self.f.get_slice(name)
            return tuple(s.get_shape()), s.get_dtype()
        except (SafetensorError, OSError, ValueError) as e:
            raise self.error(f"tensor {name!r} unreadable ({e})") from None

    def chunks(self, idx_name: str, val_name: str, chunk: int):
        """Yield (indices, values) NumPy chunks of two equally long 1-D tensors, read
        piece by piece (never whole) and checked against their digests at the end."""
        (si, _), (sv, _) = self.meta(idx_name), self.meta(val_name)
        if len(si) != 1 or si != sv:
            raise self.error(f"{idx_name} {si} and {val_name} {sv} must be 1-D of one length")
        hashes = [hashlib.blake2b(digest_size=16) for _ in range(2)]
        try:
            slices = [self.f.get_slice(n) for n in (idx_name, val_name)]
            for a in range(0, si[0], chunk):
                pair = [s[a:min(a + chunk, si[0])] for s in slices]
                for h, t in zip(hashes, pair):
                    h.update(t.contiguous().view(torch.uint8).numpy())
                yield tuple(t.numpy() for t in pair)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.error(f"tensor {idx_name!r} / {val_name!r} unreadable ({e})") from None
        for h, n in zip(hashes, (idx_name, val_name)):
            if h.hexdigest() != self.digests[n]:
                raise self.error(f"tensor {n!r} is corrupt (checksum mismatch)")

    def get(self, name: str) -> torch.Tensor:
        try:
            t = self.f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.error(f"tensor {name!r} unreadable ({e})") from None
        if _digest(t) != self.digests[name]:
            raise self.error(f"tensor {name!r} is corrupt (checksum mismatch)")
        return t


@contextmanager
def _open(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        handle = safe_open(path, "pt", backend="pread")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    with handle as h:
        yield _File(h, path)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


def _same_meta(f: _File, name: str, like: torch.Tensor) -> bool:
    shape, dtype = f.meta(name)
    return shape == tuple(like.shape) and dtype == _SAFETENSORS_DTYPES.get(like.dtype, "?")


def _modules(model):
    """(prefix, module, own state keys) for every module, parents first; own keys
    are those its ``_load_from_state_dict`` reads (sparse layers: their values,
    bias and sparse-state tensors)."""
    sd = model.state_dict()
    keys = set(sd)
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(m, TopKASTLinear):
            own = ["values", "bias", *TENSOR_NAMES]
        else:
            own = [n for n, _ in m.named_parameters(recurse=False, remove_duplicate=False)]
            own += [n for n, _ in m.named_buffers(recurse=False, remove_duplicate=False)]
        own = [prefix + n for n in [*own, _EXTRA] if prefix + n in keys]
        out.append((prefix, m, own))
    return out, sd


def _validate_model(model, f: _File):
    """Pass 1 for the model (reads every model tensor once, one at a time or one
    sparse layer at a time). Returns the module plan and the state_dict metadata."""
    plan, mine = _modules(model)
    configs = f.header.get("configs", {})
    theirs = {k[len("model/"):] for k in f.names if k.startswith("model/")} | set(configs)
    missing, unexpected = sorted(set(mine) - theirs), sorted(theirs - set(mine))
    # checkpoints from before the cold tier have no cold entries: an empty store
    missing = [k for k in missing if not _is_cold(k)]
    if missing or unexpected:
        raise f.error(f"checkpoint is of another model: missing {missing[:8]}, "
                      f"unexpected {unexpected[:8]}")
    for k, v in mine.items():
        if k.endswith(_EXTRA) and k not in configs:
            raise f.error(f"{k} must be a config, not a tensor")
        if not k.endswith(_EXTRA) and k in configs:
            raise f.error(f"{k} must be a tensor, not a config")
    if _EXTRA in configs and hasattr(model, "_opt_order"):
        st = configs[_EXTRA]
        if not isinstance(st, dict) or not isinstance(st.get("step_count", 0), (int, type(None))):
            raise f.error(f"corrupt model extra state {st!r}")
    colds = {}
    for prefix, m, own in plan:
        if isinstance(m, TopKASTLinear):
            sub = _sparse_local(f, configs, own)
            cold = None
            if "model/" + prefix + "cold_idx" in f.names:
                cold = f.chunks("model/" + prefix + "cold_idx", "model/" + prefix + "cold_val",
                                _spill.CHUNK)
            try:   # builds (and drops) the new structure; keeps the cold store (on disk)
                colds[prefix] = m.validate_state(sub, prefix, cold_chunks=cold)["sparse"].cold
            except CheckpointError:
                raise
            except ValueError as e:
                raise f.error(str(e)) from None
            del sub
            continue
        for k in own:
            if k.endswith(_EXTRA):
                continue
            if not _same_meta(f, "model/" + k, mine[k]):
                shape, dtype = f.meta("model/" + k)
                raise f.error(f"{k} has shape {shape} {dtype}; the model has "
                              f"{tuple(mine[k].shape)} {mine[k].dtype}")
            f.get("model/" + k)                      # checksum
    meta = getattr(mine, "_metadata", {})
    return plan, meta, colds


def _sparse_local(f: _File, configs: dict, own: list) -> dict:
    """A sparse layer's entries without its cold entries (those are streamed)."""
    return {k: (configs[k] if k.endswith(_EXTRA) else f.get("model/" + k)) for k in own
            if not _is_cold(k) and (k.endswith(_EXTRA) or "model/" + k in f.names)}


def _is_cold(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in OPTIONAL_NAMES


def _validate_optimizer(optimizer, f: _File) -> dict:
    """Pass 1 for the optimizer. Returns {param id: {name: stored tensor name or
    scalar}} and the saved param_groups."""
    info = f.header.get("optimizer")
    if info is None:
        raise f.error("checkpoint holds no optimizer state")
    if not isinstance(info, dict) or info.get("class") != type(optimizer).__name__:
        got = info.get("class") if isinstance(info, dict) else info
        raise f.error(f"optimizer state is for {got}, not {type(optimizer).__name__}")
    groups = info.get("param_groups")
    mine = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(
            g.get("params"), list) for g in groups) or \
            [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
        raise f.error("optimizer parameter groups differ in size")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip([i for g in groups for i in g["params"]], params))
    state: dict = {}
    for k in f.names:
        if k.startswith("optim/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = ("tensor", k)
    for k, v in (info.get("scalars") or {}).items():
        pid, name = k.split("/", 1)
        state.setdefault(int(pid), {})[name] = ("scalar", v)
    for pid, st in state.items():
        if pid not in by_id:
            raise f.error(f"optimizer state for unknown parameter {pid}")
        p = by_id[pid]
        for name, (kind, v) in st.items():
            if kind != "tensor":
                continue
            shape, _ = f.meta(v)
            if len(shape) > 0 and shape != tuple(p.shape):
                raise f.error(f"optimizer state {name} of parameter {pid} has shape {shape}; "
                              f"the parameter has {tuple(p.shape)}")
            f.get(v)                                 # checksum
    return {"state": state, "param_groups": groups, "by_id": by_id}


def _apply_model(model, f: _File, plan, meta, colds) -> None:
    configs = f.header.get("configs", {})
    errors: list = []
    for prefix, m, own in plan:
        if not own:
            continue
        if isinstance(m, TopKASTLinear):   # the cold store checked in pass 1 is reused
            local = _sparse_local(f, configs, own)
            try:
                g = m.validate_state(local, prefix)
            except ValueError as e:
                raise f.error(f"loading {prefix} failed after validation (the model may be "
                              f"partly loaded): {e}") from None
            del local
            m.install_state(g, cold=colds[prefix])
            del g
            continue
        local = {k: (configs[k] if k.endswith(_EXTRA) else f.get("model/" + k)) for k in own
                 if k.endswith(_EXTRA) or "model/" + k in f.names}
        missing, unexpected = [], []
        m._load_from_state_dict(local, prefix, meta.get(prefix[:-1], {}), True, missing,
                                unexpected, errors)
        del local
        if errors or missing or unexpected:  # validated above: only a changed file gets here
            raise f.error(f"loading {prefix or 'the model'} failed after validation (the model "
                          f"may be partly loaded): {errors or missing or unexpected}")


def _apply_optimizer(optimizer, f: _File, plan) -> None:
    state = {}
    for pid, st in plan["state"].items():
        cur = optimizer.state.get(plan["by_id"][pid], {})
        out = {}
        for name, (kind, v) in st.items():
            if kind == "scalar":
                out[name] = v
                continue
            t = f.get(v)
            old = cur.get(name)
            if torch.is_tensor(old) and old.shape == t.shape and old.dtype == t.dtype:
                old.copy_(t)                         # in place: no second copy of the state
                t = old
            out[name] = t
        state[pid] = out
    optimizer.load_state_dict({"state": state, "param_groups": plan["param_groups"]})


def load(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``).
    Everything is validated first; on any error nothing is changed. Returns the
    ``extra`` dict given to :func:`save` (or None).

    The step count (in the SparseModel's extra state) belongs to the first
    attached optimizer: it is restored when ``optimizer`` is that one, when no
    optimizer is given, or when none is attached yet (then :meth:`attach` applies
    it); loading another optimizer's checkpoint leaves it unchanged."""
    with _open(path) as f:
        plan, meta, colds = _validate_model(model, f)
        opt_plan = _validate_optimizer(optimizer, f) if optimizer is not None else None
        order = getattr(model, "_opt_order", None)
        keep_steps = (order and optimizer is not None and order[0] != id(optimizer))
        steps_before = model.step_count if keep_steps else None
        with torch.no_grad():
            _apply_model(model, f, plan, meta, colds)
        if opt_plan is not None:
            _apply_optimizer(optimizer, f, opt_plan)
        if keep_steps:
            model.step_count = steps_before
        return f.header.get("extra")
