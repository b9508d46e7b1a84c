"""Checkpoints: safetensors for tensors, a JSON header for everything else.

``save`` writes every tensor of the model's state (sparse values, index arrays,
reserve, floor, key, dense parameters and buffers) and of the optimizer's state
into one safetensors file; configuration, optimizer hyper-parameters, the step
count and versions go into the file's metadata as JSON. Loading parses no pickle
and executes no code. ``load`` validates the whole file against the model (and
optimizer) before changing anything, so a corrupt or mismatched file raises
:class:`CheckpointError` and leaves both untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .layers import TopKASTLinear

FORMAT = "sparsecore-checkpoint"
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """The checkpoint is corrupt or does not match the model/optimizer."""


def _model_state(model: torch.nn.Module):
    tensors, configs = {}, {}
    for k, v in model.state_dict().items():
        if k.endswith("_extra_state"):
            configs[k] = v
        elif torch.is_tensor(v):
            tensors[k] = v
        else:
            raise CheckpointError(f"state entry {k!r} is neither a tensor nor a config")
    return tensors, configs


def _jsonable(v, where):
    try:
        json.dumps(v)
    except TypeError:
        raise CheckpointError(f"{where} is not JSON-serialisable: {v!r}") from None
    return v


def _digest(t: torch.Tensor) -> str:
    """blake2b of a tensor's bytes (detects silent corruption of tensor data)."""
    return hashlib.blake2b(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy(),
                           digest_size=16).hexdigest()


def save(model: torch.nn.Module, path, optimizer: torch.optim.Optimizer | None = None,
         extra: dict | None = None) -> None:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically (temp file + rename).
    ``extra`` is any JSON-serialisable dict, returned by :func:`load`."""
    tensors, configs = _model_state(model)
    out = {f"model/{k}": v for k, v in tensors.items()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "sparsecore": __version__, "torch": torch.__version__,
              "model_class": type(model).__name__, "configs": configs,
              "extra": _jsonable(extra, "extra") if extra is not None else None,
              "step_count": getattr(model, "step_count", None)}
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


def _read(path):
    try:
        tensors = load_file(os.fspath(path))
        from safetensors import safe_open
        with safe_open(os.fspath(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    try:
        header = json.loads(meta["sparsecore"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: missing or corrupt sparsecore header") from None
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format {header.get('format')!r} "
                              f"version {header.get('format_version')!r}")
    digests = header.get("digests")
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        raise CheckpointError(f"{path}: tensor digests missing or not matching the tensors")
    for k, v in tensors.items():
        if _digest(v) != digests[k]:
            raise CheckpointError(f"{path}: tensor {k!r} is corrupt (checksum mismatch)")
    return tensors, header


def _validate_model(model, tensors, header, path) -> dict:
    sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    sd.update(header.get("configs", {}))
    mine = model.state_dict()
    missing = sorted(set(mine) - set(sd))
    unexpected = sorted(set(sd) - set(mine))
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint is of another model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    sparse_prefixes = []
    for name, m in model.named_modules():
        if isinstance(m, TopKASTLinear):
            prefix = f"{name}." if name else ""
            sparse_prefixes.append(prefix)
            try:
                m.validate_state(sd, prefix)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
    for k, v in mine.items():
        if any(k.startswith(p) and "." not in k[len(p):] for p in sparse_prefixes):
            continue
        if torch.is_tensor(v) and (v.shape != sd[k].shape or v.dtype != sd[k].dtype):
            raise CheckpointError(f"{path}: {k} has shape {tuple(sd[k].shape)} {sd[k].dtype}; "
                                  f"the model has {tuple(v.shape)} {v.dtype}")
    return sd


def _validate_optimizer(optimizer, model_sd_after, tensors, header, path) -> dict:
    info = header.get("optimizer")
    if info is None:
        raise CheckpointError(f"{path}: checkpoint holds no optimizer state")
    if info["class"] != type(optimizer).__name__:
        raise CheckpointError(f"{path}: optimizer state is for {info['class']}, "
                              f"not {type(optimizer).__name__}")
    groups = info["param_groups"]
    mine = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
        raise CheckpointError(f"{path}: optimizer parameter groups differ in size")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in mine for i in g["params"]]
    by_id = dict(zip(ids, params))
    state: dict = {}
    for k, v in tensors.items():
        if not k.startswith("optim/"):
            continue
        _, pid, name = k.split("/", 2)
        state.setdefault(int(pid), {})[name] = v
    for k, v in info["scalars"].items():
        pid, name = k.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in state.items():
        if pid not in by_id:
            raise CheckpointError(f"{path}: optimizer state for unknown parameter {pid}")
        p = by_id[pid]
        for name, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                raise CheckpointError(f"{path}: optimizer state {name} of parameter {pid} has "
                                      f"shape {tuple(v.shape)}; the parameter has {tuple(p.shape)}")
    return {"state": state, "param_groups": groups}


def load(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``).
    Everything is validated first; on any error nothing is changed. Returns the
    ``extra`` dict given to :func:`save` (or None)."""
    tensors, header = _read(path)
    sd = _validate_model(model, tensors, header, path)
    opt_sd = _validate_optimizer(optimizer, sd, tensors, header, path) if optimizer else None
    model.load_state_dict(sd)
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    steps = header.get("step_count")
    order = getattr(model, "_opt_order", None)
    if steps is not None and order is not None:
        # the schedule belongs to the first attached optimizer; before any attach the
        # count is kept and applied by attach()
        if not order or optimizer is None or order[0] == id(optimizer):
            model.step_count = steps
    return header.get("extra")
