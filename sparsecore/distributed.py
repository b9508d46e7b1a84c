"""torch.distributed support: rank helpers, the topology check, process-group
setup for ``torchrun``, and a DDP communication hook that counts bytes.

Under DistributedDataParallel every rank holds the whole model: the ``values``
parameter of each Top-KAST layer (theta on B) and its :class:`SparseState`. DDP
all-reduces the gradients of ``values`` like any parameter; the sparse state is
not a buffer and is never communicated. Ranks stay consistent because a refresh
is a deterministic function of ``values`` (ties go to the smaller flat index),
and ``values`` are identical on every rank after each all-reduced step.

That argument breaks silently if one rank was built with another seed or
configuration, loaded another checkpoint, or diverged numerically. So
:class:`~sparsecore.SparseModel` verifies it (:func:`check_topology`) when an
optimizer is attached and after every refresh: each rank hashes every sparse
layer's sets into a 63-bit digest and one all-reduce of ``(d, -d)`` with MAX
tells every rank whether all digests agree (16 bytes per check). Only on a
mismatch are the per-layer digests gathered, so that every rank raises the same
:class:`TopologyError` naming the first differing layer and the ranks that differ
from rank 0. Every rank reaches the check at the same step by construction, and
every rank takes the same branch after the all-reduce, so the check never hangs.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .topkast import RefreshError

_MASK63 = (1 << 63) - 1


class TopologyError(RefreshError):
    """The ranks of a distributed run disagree on a sparse layer's configuration
    or sets (A, B minus A, reserve, floor, key)."""


# ------------------------------------------------------------------ ranks
def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the rank that logs and saves."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when unset)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={text!r} is not an integer") from None


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by ``torchrun``'s environment variables
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``):
    gloo for ``device="cpu"``, NCCL for ``"cuda"`` (after selecting GPU
    ``LOCAL_RANK``). Returns True if a group was initialised here; False when
    ``WORLD_SIZE`` is unset or 1, or a group already exists."""
    if not dist.is_available() or env_world_size() <= 1 or dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; "
                         "start distributed runs with torchrun")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _device(group=None) -> torch.device:
    """Where tensors of a collective must live for ``group``'s backend."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------ digests
def _hash(parts) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if torch.is_tensor(p):
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") & _MASK63


def layer_digests(layer) -> dict:
    """63-bit digests of one Top-KAST layer: ``config`` (shape, sparsities, K_A,
    K_B, dtype, key, exploration, reserve), ``A`` (its CSR), ``B minus A`` (its
    CSR) and ``reserve`` (indices and floor). Reading the indices costs O(K_B);
    values are not hashed."""
    st = layer.sparse_state
    cfg = dict(layer.config(), key=st.key, exploration=layer.exploration,
               reserve=layer.reserve)
    return {"config": _hash([json.dumps(cfg, sort_keys=True, default=str)]),
            "A": _hash([st.a_indptr, st.a_cols]),
            "B minus A": _hash([st.x_indptr, st.x_cols]),
            "reserve": _hash([st.reserve_idx, float(st.floor)])}


def topology_digests(model, names=None) -> dict:
    """``{layer name: layer_digests(layer)}`` for the sparse layers of a
    :class:`~sparsecore.SparseModel` (or only those in ``names``)."""
    layers = model.sparse_layers()
    if names is not None:
        layers = {n: layers[n] for n in names}
    return {n: layer_digests(l) for n, l in layers.items()}


def check_topology(model, *, names=None, when: str = "now", extra: dict | None = None,
                   group=None) -> None:
    """Collective: verify that every rank of ``group`` holds the same sparse
    configuration and sets for the layers of ``model`` (a SparseModel; ``names``
    restricts the check to some layers). ``extra`` adds rank-wide settings that
    must agree (e.g. ``refresh_every``, the step count). ``when`` describes the
    moment for the error message. Every rank must call it at the same point.

    Raises :class:`TopologyError` on every rank, naming the first layer (or
    setting) that differs and the ranks that differ from rank 0. A no-op
    unless torch.distributed is initialised with more than one rank."""
    if not is_distributed():
        return
    per_layer = topology_digests(model, names)
    extra = dict(extra or {})
    d = _hash([sorted(extra.items()), *((n, sorted(v.items())) for n, v in per_layer.items())])
    t = torch.tensor([d, -d], dtype=torch.int64, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) == -int(t[1]):     # max(d) == min(d): every rank agrees
        return
    mine = {"extra": extra, "layers": per_layer}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    raise TopologyError(_describe_mismatch(everyone, when))


def _describe_mismatch(everyone: list, when: str) -> str:
    """The error message for gathered digests (rank-independent, so every rank
    raises the same one)."""
    ref = everyone[0]
    head = f"distributed topology check ({when}): "
    for k in sorted(set().union(*(e["extra"] for e in everyone))):
        bad = [r for r, e in enumerate(everyone) if e["extra"].get(k) != ref["extra"].get(k)]
        if bad:
            got = ", ".join(f"rank {r}: {everyone[r]['extra'].get(k)!r}" for r in bad)
            return (head + f"{k} differs: rank 0 has {ref['extra'].get(k)!r}, {got}. Every "
                    "rank must build the same model and load the same checkpoint.")
    names0 = list(ref["layers"])
    for r, e in enumerate(everyone):
        if list(e["layers"]) != names0:
            only_r = [n for n in e["layers"] if n not in ref["layers"]]
            only_0 = [n for n in names0 if n not in e["layers"]]
            return (head + f"rank {r} has other sparse layers than rank 0 (only on rank {r}: "
                    f"{only_r[:5]}, only on rank 0: {only_0[:5]}); every rank must build the "
                    "same model with the same settings")
    for n in names0:
        for part in ("config", "A", "B minus A", "reserve"):
            bad = [r for r, e in enumerate(everyone) if e["layers"][n][part] !=
                   ref["layers"][n][part]]
            if bad:
                what = ("its configuration (shape, sparsities, dtype, seed/key) differs"
                        if part == "config" else f"its {part} set differs")
                return (head + f"layer {n!r} on rank(s) {bad} does not match rank 0: {what} "
                        f"(digest {everyone[bad[0]]['layers'][n][part]:#x} vs "
                        f"{ref['layers'][n][part]:#x}). Every rank must build the same model "
                        "(same seed and settings), load the same checkpoint, and train on "
                        "all-reduced gradients (DistributedDataParallel).")
    return head + "digests differ but no single difference was found"  # pragma: no cover


# ------------------------------------------------------------------ communication
@dataclass
class CommCounter:
    """Bytes and calls seen by :func:`count_allreduce_bytes`'s hook."""
    bytes: int = 0
    calls: int = 0
    per_bucket: list = field(default_factory=list)

    def reset(self) -> None:
        self.bytes, self.calls, self.per_bucket = 0, 0, []


def count_allreduce_bytes(ddp_model) -> CommCounter:
    """Register a DDP communication hook on ``ddp_model`` that all-reduces as DDP
    does by default (sum, then divide by the world size) and counts the bytes of
    every gradient bucket it sends. Returns the counter. A hook can be registered
    once per DDP model, before the first backward."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counter = CommCounter()

    def hook(state, bucket):
        buf = bucket.buffer()
        n = buf.numel() * buf.element_size()
        counter.bytes += n
        counter.calls += 1
        counter.per_bucket.append(n)
        return default_hooks.allreduce_hook(state, bucket)

    ddp_model.register_comm_hook(None, hook)
    return counter
