"""A byte-level decoder-only transformer (vocabulary 256: bytes are tokens).

Pre-norm blocks of causal self-attention (fused ``qkv`` and output ``proj``
nn.Linear, rotary positions) and an MLP (``fc`` / ``proj`` nn.Linear, GELU). The
token embedding, the LayerNorms and the output head ``lm_head`` stay dense; every
projection inside the blocks becomes a Top-KAST layer when the model is wrapped by
:func:`build_model`. The model is meant to be declared on the meta device, so its
dense form is never allocated: every module that directly owns a parameter has a
``reset_parameters()`` (nn.Embedding, nn.LayerNorm, nn.Linear), and the rotary
tables are computed in ``forward``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

#: Layers that stay dense when the model is made sparse (the vocabulary-sized head).
DENSE_LAYERS = ["lm_head"]


@dataclass(frozen=True)
class GPTConfig:
    """Model sizes. ``context`` is the longest sequence the model is trained on."""
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128
    vocab: int = 256
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("d_model", "layers", "heads", "context", "vocab", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if (self.d_model // self.heads) % 2:
            raise ValueError(f"head size d_model/heads = {self.d_model // self.heads} must be "
                             "even (rotary positions rotate pairs of channels)")

    def to_dict(self) -> dict:
        return asdict(self)


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` shaped (batch, heads, time, head_size):
    channel pairs (i, i + hs/2) are rotated by angle t * 10000^(-2i/hs)."""
    t, hs = x.shape[-2], x.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float32, device=x.device) / hs)
    ang = torch.outer(torch.arange(t, dtype=torch.float32, device=x.device), inv_freq)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Two projections with a GELU between them."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level decoder-only transformer: ``forward(idx)`` maps int64 bytes of
    shape (batch, time) to logits of shape (batch, time, 256)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.shape[1] > self.config.context:
            raise ValueError(f"idx must be (batch, time) with time <= context="
                             f"{self.config.context}, got shape {tuple(idx.shape)}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def count_parameters(cfg: GPTConfig) -> int:
    """Dense-equivalent parameter count of the model (built on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())


def _materialise_dense(module: nn.Module, seed: int) -> None:
    """Allocate a meta-device model on the CPU and initialise every module that owns
    tensors by its ``reset_parameters()``, under ``seed`` (global RNG untouched)."""
    module.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in module.modules():
            if any(True for _ in m.parameters(recurse=False)) and hasattr(m, "reset_parameters"):
                m.reset_parameters()


def build_model(cfg: GPTConfig, *, dense: bool = False, forward_sparsity: float = 0.9,
                backward_sparsity: float = 0.8, refresh_every: int = 100,
                exploration: float = 1e-4, seed: int = 0, verbose: bool = False,
                spill_dir: str | None = None) -> nn.Module:
    """Build the reference model without ever allocating its dense form.

    Sparse (default): a :class:`sparsecore.SparseModel` whose attention and MLP
    projections are Top-KAST layers; the embedding, norms and ``lm_head`` stay dense.
    ``dense=True``: the same architecture trained dense (for comparison), initialised
    from the same distributions under the same seed. ``verbose`` prints SparseModel's
    summary of what became sparse. ``spill_dir`` holds the layers' cold stores (see
    :mod:`sparsecore.spill`).
    """
    from ..model import SparseModel

    with torch.device("meta"):
        net = GPT(cfg)
    if dense:
        _materialise_dense(net, seed)
        return net
    return SparseModel(net, forward_sparsity=forward_sparsity,
                       backward_sparsity=backward_sparsity, refresh_every=refresh_every,
                       exploration=exploration, seed=seed, exclude=DENSE_LAYERS, verbose=verbose,
                       spill_dir=spill_dir)
