"""The LESS block as the authors compute it, re-implemented from their maths for side-by-side timing.

Written from a reading of ``uiuctml/GeospatialFM`` at ``3b53776`` (``models/low_rank_attention.py``:
``LowDimPool``, ``AttentionPool``, ``AttentionBranch``, ``LowRankAttention``, ``LowRankBlock``); no
code is taken from there. What their block computes on a grid ``x: [B, C+1, N+1, D]``:

1. ``y = LN(x)``; every token is mapped to both branch widths first: ``u_c = y W_c`` (``[.., h·d_c]``)
   and ``u_s = y W_s`` (``[.., h·d_s]``), over all ``(C+1)(N+1)`` tokens;
2. spectral pooling: ``x_c = u_c[:, :, 0] + Pool_c(LN(u_c))`` where ``Pool_c`` is single-query
   multi-head attention along the positions of each row (query from the row's summary token, keys and
   values projected at branch width, output projection), and likewise ``x_s`` along the rows of each
   position from ``u_s``;
3. branch attention on ``LN(x_c)`` and ``LN(x_s)``: ``r`` query/key pairs per head, one value set
   (``scaled_dot_product_attention``; the perception field masks the spatial branch);
4. the ``r`` outer products of the two branch outputs are **summed**, laid out as ``[B, C+1, N+1, D]``
   and projected; then residual, pre-norm MLP and residual as in a ViT block.

So their pooling runs at branch width (the big per-token projections are ``D → h·d_c`` and ``D → h·d_s``)
where gfm pools at the model width ``D``; the rest is the same maths. This block is used only by
``bench.model`` (row ``authors``): one encoder with gfm's embedding and these blocks, at the same sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import nn

from gfm.model import LESSViT
from gfm.model.attention import GridMask, LESSAttention


class _Pool(nn.Module):
    """Single-query multi-head attention from index 0 of axis 1 over that axis: ``[B', L, W] → [B', W]``."""

    def __init__(self, width: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=qkv_bias)
        self.kv = nn.Linear(width, 2 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(u[:, :1]), "b 1 (h d) -> b h 1 d", h=self.heads)
        k, v = rearrange(self.kv(u), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v)  # [B', h, 1, d]
        return self.proj(rearrange(y, "b h 1 d -> b (h d)"))


class _Branch(nn.Module):
    """``r`` query/key pairs per head over one value set: ``[B, L, W] → [B, r, h, L, W/h]``."""

    def __init__(self, width: int, heads: int, rank: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.rank = heads, rank
        self.qk = nn.Linear(width, 2 * rank * width, bias=qkv_bias)
        self.v = nn.Linear(width, width, bias=qkv_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k = rearrange(self.qk(x), "b l (two h r d) -> two b r h l d", two=2, h=self.heads, r=self.rank)
        v = rearrange(self.v(x), "b l (h d) -> b 1 h l d", h=self.heads).expand(-1, self.rank, -1, -1, -1)
        if mask is not None:
            mask = mask[:, None]  # [B|1, 1, 1, L, L] against [B, r, h, L, L]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class AuthorsLESSBlock(nn.Module):
    """One LESS block computed the authors' way (see the module docstring); ``forward(x, mask)`` like gfm's."""

    def __init__(self, dim: int, heads: int, rank: int, spectral_head_dim: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        w_c = heads * spectral_head_dim
        w_s = dim // spectral_head_dim
        self.heads, self.d_c, self.d_s = heads, spectral_head_dim, w_s // heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.to_spectral = nn.Linear(dim, w_c)
        self.to_spatial = nn.Linear(dim, w_s)
        self.pool_norm_c, self.pool_norm_s = nn.LayerNorm(w_c, eps=1e-6), nn.LayerNorm(w_s, eps=1e-6)
        self.pool_c, self.pool_s = _Pool(w_c, heads, qkv_bias), _Pool(w_s, heads, qkv_bias)
        self.norm_c, self.norm_s = nn.LayerNorm(w_c, eps=1e-6), nn.LayerNorm(w_s, eps=1e-6)
        self.branch_c, self.branch_s = _Branch(w_c, heads, rank, qkv_bias), _Branch(w_s, heads, rank, qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: GridMask | None = None) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]`` → same shape; only the perception field of ``mask`` is used."""
        B, R, P, _ = x.shape
        y = self.norm1(x)
        u_c, u_s = self.to_spectral(y), self.to_spatial(y)  # every token at both branch widths
        pooled_c = self.pool_c(self.pool_norm_c(u_c).reshape(B * R, P, -1)).reshape(B, R, -1)
        pooled_s = self.pool_s(self.pool_norm_s(u_s).transpose(1, 2).reshape(B * P, R, -1)).reshape(B, P, -1)
        x_c = u_c[:, :, 0] + pooled_c
        x_s = u_s[:, 0] + pooled_s
        a_c = self.branch_c(self.norm_c(x_c), None)  # [B, r, h, C+1, d_c]
        a_s = self.branch_s(self.norm_s(x_s), None if mask is None else mask.spatial)  # [B, r, h, N+1, d_s]
        heads = torch.einsum("brhci,brhnj->bhcnij", a_c, a_s)  # summed over the r terms
        heads = rearrange(heads, "b h c n i j -> b c n (h i j)")
        x = x + self.proj(heads)
        return x + self.mlp(self.norm2(x))


def authors_encoder(model: LESSViT, rank: int) -> LESSViT:
    """``model`` (a gfm LESS ViT: embedding, widths, depth) with each block replaced by :class:`AuthorsLESSBlock`."""
    first = model.blocks[0].attn
    if not isinstance(first, LESSAttention):
        raise TypeError(f"authors_encoder: expected a LESS model, got {type(first).__name__} blocks")
    dim = model.embed_dim
    heads, d_c = first.num_heads, first.spectral_head_dim
    model.blocks = nn.ModuleList(AuthorsLESSBlock(dim, heads, rank, d_c) for _ in model.blocks)
    return model
