"""The LESS block (low-rank spatial-spectral attention) and the dense joint-attention reference.

Joint attention over a ``(C+1) × (N+1)`` token grid costs ``O(N²C²D)``. LESS factorises it: the grid
is pooled into ``C+1`` spectral tokens and ``N+1`` spatial tokens; each of ``r`` heads runs spectral
attention (``C×C``, head width ``d_c``) and spatial attention (``N×N``, head width ``d_s``) and the
two value outputs are recombined by an outer product into a ``d_c·d_s`` head for every grid cell::

    head_k(c, n) = (A_c^k V_c^k)[c] ⊗ (A_s^k V_s^k)[n]  =  ((A_c^k ⊗ A_s^k)(V_c^k ⊗ V_s^k))[(c, n)]

i.e. each head is joint attention whose attention matrix and values are Kronecker products, and the
block output ``proj(concat_k head_k)`` is a rank-``r`` sum of such terms, with ``D = r·d_c·d_s``.
Cost ``O(r N² d_s + r C² d_c + N C D)`` (the last term from pooling, projection and MLP).

The **perception field mask** restricts the spatial branch to patches within a radius in metres (a
local receptive field like a convolution's); the summary column (index 0) is always visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn


def perception_field_mask(coords: torch.Tensor, radius_m: float) -> torch.Tensor:
    """Which patches may attend to which: ``coords: [B, N, 2]`` metres → ``[B, 1, N+1, N+1]`` bool.

    True = may attend. Patches see patches within ``radius_m`` (themselves included); index 0, the
    summary token of the spatial axis, sees and is seen by all, so no row is ever fully masked.
    """
    near = torch.cdist(coords.double(), coords.double()) <= radius_m  # [B, N, N]
    near = F.pad(near, (1, 0, 1, 0), value=True)
    return rearrange(near, "b n m -> b 1 n m")


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """``scaled_dot_product_attention`` over the last two axes (any leading batch axes)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class AxisAttention(nn.Module):
    """Multi-head self-attention along one axis, returning per-head outputs (no output projection).

    ``x: [B, L, dim] → [B, h, L, dim/h]``; used for the spectral (L = C+1) and spatial (L = N+1)
    branches of :class:`LESSAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"branch width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B, L, dim]``, ``mask: [B|1, 1, L, L]`` bool (True = attend) → ``[B, h, L, dim/h]``."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        return _attention(q, k, v, mask, self.attn_drop if self.training else 0.0)

    def flops(self, length: int) -> int:
        """Forward matmul FLOPs for one sample of ``length`` tokens."""
        dim = self.num_heads * self.head_dim
        return 2 * length * dim * 3 * dim + 4 * length * length * dim


def _pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: int) -> torch.Tensor:
    """Single-query attention along one grid axis.

    ``q`` broadcasts against ``k, v: [B, C+1, N+1, h, d]`` and has size 1 on ``axis``; returns
    ``[B, L, h, d]`` with ``axis`` reduced. Written elementwise rather than with
    ``scaled_dot_product_attention``: with one query per row the work is a weighted sum, and this
    way the grid-sized keys and values are not copied into head-major layout (twice, once per pooling
    direction) and kept for the backward pass.
    """
    logits = (q * k).sum(-1) * k.shape[-1] ** -0.5  # [B, C+1, N+1, h]
    weights = logits.softmax(dim=axis)
    return (weights[..., None] * v).sum(dim=axis)


class SummaryPool(nn.Module):
    """Pool the grid into spectral and spatial tokens by attention from the summary tokens.

    Spectral token ``c`` = summary-column token ``x[c, 0]`` + attention from it over row ``c``;
    spatial token ``n`` = summary-row token ``x[0, n]`` + attention from it over column ``n``. Keys and
    values of the grid are projected once and shared by both pools. Each pooled token is then mapped
    to its branch width (``r·d_c`` spectral, ``r·d_s`` spatial).
    """

    def __init__(self, dim: int, num_heads: int, spectral_dim: int, spatial_dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q_spectral = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_spatial = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_spectral = nn.Linear(dim, spectral_dim)
        self.to_spatial = nn.Linear(dim, spatial_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, C+1, N+1, D]`` → spectral ``[B, C+1, r·d_c]``, spatial ``[B, N+1, r·d_s]``."""
        h = self.num_heads
        k, v = rearrange(self.kv(x), "b c n (two h d) -> two b c n h d", two=2, h=h)  # views, no copies
        # spectral: the summary token of each row queries that row's N+1 positions
        q = rearrange(self.q_spectral(x[:, :, 0]), "b c (h d) -> b c 1 h d", h=h)
        pooled = rearrange(_pool(q, k, v, axis=2), "b c h d -> b c (h d)")
        spectral = self.to_spectral(x[:, :, 0] + pooled)
        # spatial: the summary token of each column queries that column's C+1 observations
        q = rearrange(self.q_spatial(x[:, 0]), "b n (h d) -> b 1 n h d", h=h)
        pooled = rearrange(_pool(q, k, v, axis=1), "b n h d -> b n (h d)")
        spatial = self.to_spatial(x[:, 0] + pooled)
        return spectral, spatial

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``)."""
        dim = self.kv.in_features
        kv = 2 * rows * cols * dim * 2 * dim
        queries = 2 * (rows + cols) * dim * dim
        attn = 2 * 4 * rows * cols * dim  # QK and AV, once per pooling direction (elementwise in code)
        out = 2 * rows * dim * self.to_spectral.out_features + 2 * cols * dim * self.to_spatial.out_features
        return kv + queries + attn + out


class LESSAttention(nn.Module):
    """Low-rank spatial-spectral attention: ``[B, C+1, N+1, D] → [B, C+1, N+1, D]``.

    Args:
        dim: token width ``D``.
        rank: ``r``, the number of Kronecker terms (heads).
        spectral_head_dim: ``d_c``; the spatial head width is ``d_s = D / (r·d_c)``.
        qkv_bias, qk_norm, attn_drop, proj_drop: as in a ViT attention layer.
        norm_layer: normalisation type (for the branch inputs and optional qk-norm).
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        spectral_head_dim: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if dim % (rank * spectral_head_dim):
            raise ValueError(f"dim {dim} must be a multiple of rank × spectral_head_dim = {rank * spectral_head_dim}")
        self.rank = rank
        self.spectral_head_dim = spectral_head_dim
        self.spatial_head_dim = dim // (rank * spectral_head_dim)
        spectral_dim, spatial_dim = rank * spectral_head_dim, rank * self.spatial_head_dim
        self.pool = SummaryPool(dim, rank, spectral_dim, spatial_dim, qkv_bias)
        self.spectral_norm = norm_layer(spectral_dim)
        self.spatial_norm = norm_layer(spatial_dim)
        self.spectral = AxisAttention(spectral_dim, rank, qkv_bias, qk_norm, attn_drop, norm_layer)
        self.spatial = AxisAttention(spatial_dim, rank, qkv_bias, qk_norm, attn_drop, norm_layer)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def branches(self, x: torch.Tensor, spatial_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two branch outputs: spectral ``[B, r, C+1, d_c]`` and spatial ``[B, r, N+1, d_s]``."""
        spectral, spatial = self.pool(x)
        return self.spectral(self.spectral_norm(spectral)), self.spatial(self.spatial_norm(spatial), spatial_mask)

    def forward(self, x: torch.Tensor, spatial_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]``, ``spatial_mask: [B|1, 1, N+1, N+1]`` bool → ``[B, C+1, N+1, D]``."""
        a_c, a_s = self.branches(x, spatial_mask)
        heads = torch.einsum("brci,brnj->bcnrij", a_c, a_s)  # per-head outer products
        return self.proj_drop(self.proj(rearrange(heads, "b c n r i j -> b c n (r i j)")))

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``)."""
        dim = self.proj.in_features
        outer = 2 * rows * cols * dim  # the einsum runs as a batched matmul with a contraction of 1
        return (
            self.pool.flops(rows, cols)
            + self.spectral.flops(rows)
            + self.spatial.flops(cols)
            + outer
            + 2 * rows * cols * dim * dim
        )


class JointAttention(nn.Module):
    """Dense attention over all ``(C+1)(N+1)`` grid tokens (ChannelViT-style reference).

    With a spatial mask, token ``(c, n)`` attends ``(c', n')`` iff ``n`` may attend ``n'``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.attn = AxisAttention(dim, num_heads, qkv_bias, qk_norm, attn_drop, norm_layer)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, spatial_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]`` → ``[B, C+1, N+1, D]``."""
        rows = x.shape[1]
        mask = None
        if spatial_mask is not None:
            mask = repeat(spatial_mask, "b 1 n m -> b 1 (c n) (k m)", c=rows, k=rows)
        y = self.attn(rearrange(x, "b c n d -> b (c n) d"), mask)
        y = rearrange(y, "b h (c n) d -> b c n (h d)", c=rows)
        return self.proj_drop(self.proj(y))

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid."""
        dim = self.proj.in_features
        return self.attn.flops(rows * cols) + 2 * rows * cols * dim * dim


class Block(nn.Module):
    """Pre-norm transformer block on the token grid: attention, MLP, LayerScale, drop-path.

    Args:
        dim: token width ``D``.
        attention: ``"less"`` (:class:`LESSAttention`) or ``"dense"`` (:class:`JointAttention`).
        rank: LESS rank ``r`` / number of heads of the dense block.
        spectral_head_dim: LESS ``d_c`` (ignored by the dense block).
        mlp_ratio: MLP hidden width / ``D``.
        drop_path: stochastic-depth probability of this block.
        init_values: LayerScale initial value (None = no LayerScale).
        norm_layer, act_layer: normalisation and activation types.
    """

    def __init__(
        self,
        dim: int,
        attention: str = "less",
        rank: int = 3,
        spectral_head_dim: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn: LESSAttention | JointAttention
        if attention == "less":
            self.attn = LESSAttention(dim, rank, spectral_head_dim, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        elif attention == "dense":
            self.attn = JointAttention(dim, rank, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        else:
            raise ValueError(f"attention must be 'less' or 'dense', got {attention!r}")
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.dim, self.mlp_hidden = dim, int(dim * mlp_ratio)
        self.mlp = Mlp(dim, self.mlp_hidden, act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, spatial_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]`` → same shape."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), spatial_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``)."""
        return self.attn.flops(rows, cols) + 2 * 2 * rows * cols * self.dim * self.mlp_hidden
