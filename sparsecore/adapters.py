"""Sparse counterparts of linear-like modules that are not a plain nn.Linear.

:class:`SparseModel` uses these to cover the projections found in common model
code; they are built only from :class:`TopKASTLinear`'s public constructor and
forward, so every sparse matrix is an ordinary Top-KAST layer (found by
``SparseModel.sparse_layers()``, refreshed, checkpointed and exported as such):

* :class:`TopKASTConv1d` replaces ``nn.Conv1d`` (groups=1, zero numeric padding);
* :class:`TopKASTMultiheadAttention` replaces ``nn.MultiheadAttention``;
* transformers' ``Conv1D`` (GPT-2's projections, weight stored as (in, out)) needs
  no adapter: it computes ``x @ W + b``, which is a :class:`TopKASTLinear` whose
  dense-equivalent weight is ``W.T``.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .layers import TopKASTLinear, conv2d_as_linear


def _int(v, name: str) -> int:
    if isinstance(v, (tuple, list)) and len(v) == 1:
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{name} must be an int (or a 1-tuple of int), got {v!r}")
    return v


class TopKASTConv1d(nn.Module):
    """A 1-D convolution (groups=1, zero padding) whose weight is a Top-KAST layer.

    The sparse matrix is ``self.linear``, a :class:`TopKASTLinear` of shape
    (out_channels, in_channels * kernel_size) in the order of
    ``nn.Conv1d.weight.flatten(1)``; the input is unfolded (im2col), so no dense
    weight exists. Accepts (N, C, L) or unbatched (C, L) input.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as
            ``nn.Conv1d`` (numeric padding only).
        **kwargs: passed to :class:`TopKASTLinear` (sparsities, exploration, seed,
            reserve, dtype, name, ...).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, **kwargs):
        super().__init__()
        for nm, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        k, s = _int(kernel_size, "kernel_size"), _int(stride, "stride")
        p, d = _int(padding, "padding"), _int(dilation, "dilation")
        if k < 1 or s < 1 or d < 1 or p < 0:
            raise ValueError(f"invalid convolution geometry: kernel_size={k}, stride={s}, "
                             f"padding={p}, dilation={d}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (k,), (s,), (p,), (d,)
        # the same im2col as TopKASTConv2d, on a (1, L) image with a (1, k) kernel
        self._geom = SimpleNamespace(in_channels=in_channels, out_channels=out_channels,
                                     kernel_size=(1, k), stride=(1, s), padding=(0, p),
                                     dilation=(1, d))
        self.linear = TopKASTLinear(in_channels * k, out_channels, bias, **kwargs)

    @property
    def bias(self):
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) \
                or x.shape[-2] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"input has shape {shape}; expected (N, C={self.in_channels}, L) "
                             f"or (C={self.in_channels}, L)")
        return conv2d_as_linear(self._geom, x.unsqueeze(-2), self.linear).squeeze(-2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")


class TopKASTMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with Top-KAST query/key/value/output projections.

    Same constructor arguments, forward signature and results as
    ``nn.MultiheadAttention`` (``batch_first``, unbatched input, ``key_padding_mask``,
    ``attn_mask`` (2-D or 3-D, bool or float), ``need_weights``,
    ``average_attn_weights``, ``is_causal``, ``add_bias_kv``, ``add_zero_attn``,
    ``kdim``/``vdim``, dropout on the attention weights in training).

    The packed ``in_proj_weight`` (3E x E) of the dense module becomes three
    :class:`TopKASTLinear` layers ``q_proj``, ``k_proj``, ``v_proj`` (each its own
    top-K), ``out_proj`` a fourth; the in-projection bias is split between them.
    ``bias_k`` / ``bias_v`` stay dense parameters. There is no fused fast path:
    torch's fused attention kernels read dense weights, so attention runs as
    projections + ``F.scaled_dot_product_attention`` (or an explicit softmax when
    the weights are requested).

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
            batch_first: as ``nn.MultiheadAttention``.
        name: qualified name of this module; the projections' layer keys derive from
            ``name + ".q_proj"`` etc. and ``seed``.
        **kwargs: passed to each :class:`TopKASTLinear` (sparsities, exploration,
            seed, reserve, dtype).
    """

    # No packed in-projection: its weight and bias live in q_proj/k_proj/v_proj. torch's
    # TransformerEncoderLayer reads these before its fused fast path; None sends it to
    # the regular path, which calls this module.
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, *, name: str = "",
                 **kwargs):
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim <= 0 or not isinstance(num_heads, int) \
                or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim!r}) must be a positive int divisible by "
                             f"num_heads ({num_heads!r})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        prefix = f"{name}." if name else ""
        self.q_proj = TopKASTLinear(embed_dim, embed_dim, bias, name=prefix + "q_proj", **kwargs)
        self.k_proj = TopKASTLinear(self.kdim, embed_dim, bias, name=prefix + "k_proj", **kwargs)
        self.v_proj = TopKASTLinear(self.vdim, embed_dim, bias, name=prefix + "v_proj", **kwargs)
        self.out_proj = TopKASTLinear(embed_dim, embed_dim, bias, name=prefix + "out_proj",
                                      **kwargs)
        if add_bias_kv:
            dtype = self.q_proj.values.dtype
            # nn.MultiheadAttention's init (xavier_normal_), from a generator seeded by
            # the layer key so that the same seed rebuilds the same module
            gen = torch.Generator().manual_seed(int(self.q_proj.sparse_state.key) & 0x7FFFFFFFFFFFFFFF)
            std = math.sqrt(2.0 / (1 + embed_dim))
            self.bias_k = nn.Parameter(torch.randn(1, 1, embed_dim, dtype=dtype, generator=gen)
                                       * std)
            self.bias_v = nn.Parameter(torch.randn(1, 1, embed_dim, dtype=dtype, generator=gen)
                                       * std)
        else:
            self.bias_k = self.bias_v = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """As ``nn.MultiheadAttention.forward``; returns ``(output, weights or None)``."""
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be 3-D (batched) or 2-D "
                             f"(unbatched); got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                               "nn.MultiheadAttention); see "
                               "nn.Transformer.generate_square_subsequent_mask")
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, _ = query.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        key_padding_mask = _float_mask(key_padding_mask, q.dtype)
        attn_mask = _float_mask(attn_mask, q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = (F.pad(key_padding_mask, (0, 1))
                                if key_padding_mask is not None else None)
        q = q.view(n, tgt_len, h, d).transpose(1, 2)          # (N, H, L, D)
        k = k.view(n, k.shape[1], h, d).transpose(1, 2)       # (N, H, S, D)
        v = v.view(n, v.shape[1], h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, d)], dim=2)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = (F.pad(key_padding_mask, (0, 1))
                                if key_padding_mask is not None else None)
        src_len = k.shape[2]
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                mask = attn_mask.view(1, 1, tgt_len, src_len)
            elif attn_mask.dim() == 3 and attn_mask.shape[0] in (1, n * h):
                mask = attn_mask.view(-1, h if attn_mask.shape[0] > 1 else 1, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}; expected "
                                 f"(L, S) or (N*num_heads, L, S)")
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(n, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.matmul(weights, v)
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, None if use_causal else mask,
                                                 dropout_p, is_causal=use_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt_len, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
                f"vdim={self.vdim}, dropout={self.dropout}, batch_first={self.batch_first}, "
                f"add_bias_kv={self.bias_k is not None}, add_zero_attn={self.add_zero_attn}")


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's mask convention: a bool mask is True where attention is
    *not* allowed (becomes -inf); a float mask is added to the scores."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)
