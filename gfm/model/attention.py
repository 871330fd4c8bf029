"""The LESS block (low-rank spatial-spectral attention) and the dense joint-attention reference.

Joint attention over a ``(C+1) × (N+1)`` token grid (``T`` tokens) costs ``O(T²D)``. LESS factorises
it: the grid is pooled into ``C+1`` spectral tokens and ``N+1`` spatial tokens; each of ``h`` heads
approximates the joint attention matrix by a sum of ``r`` Kronecker products of a spectral attention
(``(C+1)²``, head width ``d_c``) and a spatial attention (``(N+1)²``, head width ``d_s``), applied to
the Kronecker product of the head's spectral and spatial values::

    A^k = 1/r Σ_j A_c^{k,j} ⊗ A_s^{k,j}                      (k = 1..h, j = 1..r)
    head_k = A^k (V_c^k ⊗ V_s^k)
    head_k(c, n) = 1/r Σ_j (A_c^{k,j} V_c^k)[c] ⊗ (A_s^{k,j} V_s^k)[n]      ∈ R^{d_c·d_s}

and the block output is ``proj(concat_k head_k)`` with ``D = h·d_c·d_s``. Each rank term has its own
queries and keys; the values are shared by a head's ``r`` terms (as in the authors' code). The
``1/r`` keeps ``A^k`` row-stochastic like any attention matrix (gfm's choice; the authors sum, which
the output projection can absorb, but it scales the residual branch by ``r`` at initialisation).

Cost of one block for one sample, in multiply-adds (``T = (C+1)(N+1)`` tokens, ``D_mlp`` the MLP
width, ``W_c = h·d_c`` and ``W_s = h·d_s`` the branch widths)::

    LESS   3·T·D²  (pool keys/values 2, output projection 1)  + 2·T·D·D_mlp  (MLP)
           + r·T·D  (Kronecker recombination)  + 4·T·D  (pool scores and weighted sums)
           + 2·h·r·((C+1)²·d_c + (N+1)²·d_s)  (branch attention)
           + (2r+1)·((C+1)·W_c² + (N+1)·W_s²)  (branch projections)
           + (C+N+2)·D² + (C+1)·D·W_c + (N+1)·D·W_s  (pool queries, maps to branch widths)
    dense  4·T·D²  (qkv, output projection)  + 2·T·D·D_mlp  + 2·T²·D  (attention)

Both grow linearly in ``C`` through the ``T·D²`` terms; dense adds ``T²·D``, quadratic in ``C·N``.

The **perception field mask** restricts the spatial branch to patches within a radius in metres (a
local receptive field like a convolution's); the summary column (index 0) is always visible. Tokens
with no valid pixel are masked as keys in both pools and both branches (:class:`GridMask`, gfm
extension), so they are never attended and cannot influence valid tokens.

This module is the model as written above, one batched implementation on standard modules and
``scaled_dot_product_attention``: what CUDA runs, eager or compiled. On the CPU the block takes three
leaner computations of the same numbers where they apply (:mod:`gfm.model.fused`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from gfm.model import fused

# ------------------------------------------------------------------------------------------------
# Masks


@functools.lru_cache(maxsize=64)
def grid_sq_distances(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Squared distances between the cells of an ``h × w`` grid in grid steps: ``[N, N]`` int32, cached."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return ((rows[:, None] - rows[None]).square() + (cols[:, None] - cols[None]).square()).int()


def max_sq_steps(radius_m: float, pitch: torch.Tensor) -> torch.Tensor:
    """Largest integer ``k`` with ``sqrt(k) · pitch ≤ radius_m``, per sample: ``pitch: [B]`` → ``[B]`` int64.

    A grid pair at squared step distance ``d²`` lies within the radius iff ``d² ≤ k``. The float
    square may land one off at the boundary, so ``k`` is settled with the metric comparison itself.
    """
    pitch = pitch.double()
    k = torch.floor((radius_m / pitch).square())
    k = torch.where((k + 1).sqrt() * pitch <= radius_m, k + 1, k)
    k = torch.where(k.sqrt() * pitch > radius_m, k - 1, k)
    return k.long()


def perception_field_mask(
    grid_hw: tuple[int, int], pitch: torch.Tensor, radius_m: float, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Which patches may attend to which: ``[B|1, 1, L+1, L+1]`` bool (True = may attend).

    Args:
        grid_hw: the full patch grid ``(h, w)``.
        pitch: ``[B]`` metres between neighbouring patches (``p × GSD``).
        radius_m: the radius; patches see patches within it, themselves included.
        positions: ``[B, L]`` grid indices of the positions present (a masked-autoencoder subset), or
            None for the whole grid (``L = N``).

    Index 0, the summary token of the spatial axis, sees and is seen by all, so no row is ever fully
    masked. Built from the cached integer distances of the grid and one threshold per sample: no
    per-sample metric distance matrix.
    """
    d2 = grid_sq_distances(*grid_hw, pitch.device)
    if positions is None:
        d2 = d2[None]  # [1, N, N]
    else:
        d2 = d2[positions[:, :, None], positions[:, None, :]]  # [B, L, L]
    near = d2 <= max_sq_steps(radius_m, pitch)[:, None, None]
    return rearrange(F.pad(near, (1, 0, 1, 0), value=True), "b n m -> b 1 n m")


@dataclass
class GridMask:
    """What the tokens of a ``[B, C+1, N+1, D]`` grid may attend; None = no restriction.

    A token is valid when its patch holds a valid pixel; a summary token when its row (column) holds a
    valid token; CLS always. Invalid tokens are never keys, so nothing valid ever reads them.

    Attributes:
        cell: ``[B, C+1, N+1]`` bool token validity (the dense reference's key mask).
        spectral_pool: ``[B, C+1, N+1]`` key mask of the spectral pools (``cell`` with each row's own
            summary token always a key, so no pool is empty).
        spatial_pool: ``[B, C+1, N+1]`` key mask of the spatial pools (``cell`` with each column's own
            summary token always a key).
        spectral: ``[B, 1, 1, C+1]`` key mask of the spectral branch (valid rows).
        spatial: ``[B|1, 1, N+1, N+1]`` mask of the spatial branch: the perception field and the
            valid positions.
    """

    cell: torch.Tensor | None = None
    spectral_pool: torch.Tensor | None = None
    spatial_pool: torch.Tensor | None = None
    spectral: torch.Tensor | None = None
    spatial: torch.Tensor | None = None


def grid_mask(token_valid: torch.Tensor | None, field: torch.Tensor | None) -> GridMask:
    """Combine token validity ``[B, C, N]`` (None = all valid) and a perception field ``[B|1, 1, N+1, N+1]``."""
    if token_valid is None:
        return GridMask(spatial=field)
    rows = token_valid.any(dim=2)  # [B, C]
    cols = token_valid.any(dim=1)  # [B, N]
    top = F.pad(cols, (1, 0), value=True)  # CLS and the summary row
    cell = torch.cat([top[:, None], torch.cat([rows[..., None], token_valid], dim=2)], dim=1)  # [B, C+1, N+1]
    spectral_pool = cell.clone()
    spectral_pool[:, :, 0] = True
    spatial_pool = cell.clone()
    spatial_pool[:, 0] = True
    spectral = rearrange(F.pad(rows, (1, 0), value=True), "b c -> b 1 1 c")
    spatial = rearrange(top, "b n -> b 1 1 n")
    return GridMask(cell, spectral_pool, spatial_pool, spectral, spatial if field is None else field & spatial)


def make_grid_mask(
    token_valid: torch.Tensor,
    pitch: torch.Tensor,
    grid_hw: tuple[int, int],
    radius_m: float,
    positions: torch.Tensor | None = None,
) -> GridMask:
    """The :class:`GridMask` of a (sub)grid.

    Args:
        token_valid: ``[B, C, L]`` bool, True = the token has a valid pixel.
        pitch: ``[B]`` metres between neighbouring patches.
        grid_hw: the full patch grid ``(h, w)``.
        radius_m: perception field radius (0 = global spatial attention).
        positions: ``[B, L]`` full-grid indices of the ``L`` positions present (None = all, ``L = N``).
    """
    field = perception_field_mask(grid_hw, pitch, radius_m, positions) if radius_m > 0 else None
    # host sync: an all-valid batch (the common case) keeps the unmasked paths
    return grid_mask(None if bool(token_valid.all()) else token_valid, field)


# ------------------------------------------------------------------------------------------------
# Branches and pools


class AxisAttention(nn.Module):
    """Multi-head self-attention along one axis with ``r`` query/key pairs per head sharing its values.

    ``x: [B, L, W] → [B, r, h, L, W/h]`` (no output projection); ``W = h·d``. With ``rank = 1`` this
    is ordinary multi-head attention (the dense reference uses it so). The projection is one linear
    map to ``(2r + 1)·W``: queries ``[r, h, d]``, keys ``[r, h, d]``, values ``[h, d]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        rank: int = 1,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"branch width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.rank = rank
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, (2 * rank + 1) * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B, L, W]``, ``mask: [B|1, 1, L|1, L]`` bool (True = attend) → ``[B, r, h, L, d]``."""
        h, r = self.num_heads, self.rank
        qk, v = self.qkv(x).split([2 * r * h * self.head_dim, h * self.head_dim], dim=-1)
        q, k = rearrange(qk, "b l (two r h d) -> two b (r h) l d", two=2, r=r, h=h)
        q, k = self.q_norm(q), self.k_norm(k)
        v = repeat(v, "b l (h d) -> b (r h) l d", r=r, h=h)  # one value set per head, shared by its r terms
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        return rearrange(y, "b (r h) l d -> b r h l d", r=r)

    def flops(self, length: int) -> int:
        """Forward matmul FLOPs for one sample of ``length`` tokens."""
        dim = self.num_heads * self.head_dim
        return 2 * length * dim * (2 * self.rank + 1) * dim + 4 * self.rank * length * length * dim


class SummaryPool(nn.Module):
    """Pool the grid into spectral and spatial tokens by attention from the summary tokens.

    Spectral token ``c`` = summary-column token ``x[c, 0]`` + attention from it over row ``c``;
    spatial token ``n`` = summary-row token ``x[0, n]`` + attention from it over column ``n``. Keys and
    values of the grid are one linear map at width ``D`` shared by both pools; each pool has its own
    query map. Each pooled token is then mapped to its branch width (``h·d_c`` spectral, ``h·d_s``
    spatial).
    """

    def __init__(self, dim: int, num_heads: int, spectral_dim: int, spatial_dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q_spectral = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_spatial = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_spectral = nn.Linear(dim, spectral_dim)
        self.to_spatial = nn.Linear(dim, spatial_dim)

    def forward(
        self, x: torch.Tensor, spectral_keys: torch.Tensor | None = None, spatial_keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, C+1, N+1, D]``, key masks ``[B, C+1, N+1]`` (None = all; summary keys always set).

        Returns spectral tokens ``[B, C+1, h·d_c]`` and spatial tokens ``[B, N+1, h·d_s]``.
        """
        tokens = fused.summary_pools(self, x, spectral_keys, spatial_keys) if fused.active(x) else None
        if tokens is None:
            h = self.num_heads
            k, v = rearrange(self.kv(x), "b c n (two h d) -> two b c n h d", two=2, h=h)
            q_c = rearrange(self.q_spectral(x[:, :, 0]), "b c (h d) -> b c h d", h=h)  # one query per row
            q_s = rearrange(self.q_spatial(x[:, 0]), "b n (h d) -> b n h d", h=h)  # one query per column
            logits_c = torch.einsum("bchd,bcnhd->bcnh", q_c, k) * q_c.shape[-1] ** -0.5
            logits_s = torch.einsum("bnhd,bcnhd->bcnh", q_s, k) * q_s.shape[-1] ** -0.5
            if spectral_keys is not None:
                logits_c = logits_c.masked_fill(~spectral_keys[..., None], float("-inf"))
            if spatial_keys is not None:
                logits_s = logits_s.masked_fill(~spatial_keys[..., None], float("-inf"))
            pooled_c = torch.einsum("bcnh,bcnhd->bchd", logits_c.softmax(dim=2), v)  # over the row's positions
            pooled_s = torch.einsum("bcnh,bcnhd->bnhd", logits_s.softmax(dim=1), v)  # over the column's rows
            tokens = (x[:, :, 0] + rearrange(pooled_c, "b c h d -> b c (h d)"),
                      x[:, 0] + rearrange(pooled_s, "b n h d -> b n (h d)"))
        return self.to_spectral(tokens[0]), self.to_spatial(tokens[1])

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``).

        Keys and values of every token, the queries, per pool its scores and weighted sums, and the maps
        to branch width.
        """
        dim = self.q_spectral.in_features
        kv = 2 * rows * cols * dim * 2 * dim
        queries = 2 * (rows + cols) * dim * dim
        pools = 2 * 4 * rows * cols * dim
        out = 2 * rows * dim * self.to_spectral.out_features + 2 * cols * dim * self.to_spatial.out_features
        return kv + queries + pools + out


# ------------------------------------------------------------------------------------------------
# Attention layers and the block


class LESSAttention(nn.Module):
    """Low-rank spatial-spectral attention: ``[B, C+1, N+1, D] → [B, C+1, N+1, D]``.

    Args:
        dim: token width ``D``.
        num_heads: ``h``; the head width is ``D/h = d_c·d_s``.
        rank: ``r``, Kronecker terms per head.
        spectral_head_dim: ``d_c``; the spatial head width is ``d_s = D / (h·d_c)``.
        qkv_bias, qk_norm, attn_drop, proj_drop: as in a ViT attention layer.
        norm_layer: normalisation type (for the branch inputs and optional qk-norm).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        rank: int,
        spectral_head_dim: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if rank < 1 or dim % (num_heads * spectral_head_dim):
            raise ValueError(
                f"dim {dim} must be a multiple of num_heads × spectral_head_dim = {num_heads * spectral_head_dim}"
                f" and rank ({rank}) at least 1"
            )
        self.num_heads = num_heads
        self.rank = rank
        self.spectral_head_dim = spectral_head_dim
        self.spatial_head_dim = dim // (num_heads * spectral_head_dim)
        spectral_dim, spatial_dim = num_heads * spectral_head_dim, num_heads * self.spatial_head_dim
        self.pool = SummaryPool(dim, num_heads, spectral_dim, spatial_dim, qkv_bias)
        self.spectral_norm = norm_layer(spectral_dim)
        self.spatial_norm = norm_layer(spatial_dim)
        self.spectral = AxisAttention(spectral_dim, num_heads, rank, qkv_bias, qk_norm, attn_drop, norm_layer)
        self.spatial = AxisAttention(spatial_dim, num_heads, rank, qkv_bias, qk_norm, attn_drop, norm_layer)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def branches(self, x: torch.Tensor, mask: GridMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two branch outputs: spectral ``[B, r, h, C+1, d_c]`` and spatial ``[B, r, h, N+1, d_s]``."""
        mask = mask or GridMask()
        spectral, spatial = self.pool(x, mask.spectral_pool, mask.spatial_pool)
        return (self.spectral(self.spectral_norm(spectral), mask.spectral),
                self.spatial(self.spatial_norm(spatial), mask.spatial))

    def forward(self, x: torch.Tensor, mask: GridMask | None = None) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]`` → ``[B, C+1, N+1, D]``."""
        a_c, a_s = self.branches(x, mask)
        out = fused.project(self, a_c, a_s) if fused.active(x) else None
        if out is None:
            heads = torch.einsum("brhci,brhnj->bcnhij", a_c, a_s) / self.rank  # rank-r sums of outer products
            out = self.proj(rearrange(heads, "b c n h i j -> b c n (h i j)"))
        return self.proj_drop(out)

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``)."""
        dim, r = self.proj.in_features, self.rank
        recombine = 2 * r * rows * cols * dim + 2 * rows * cols * dim * dim  # outer products over r, projection
        return self.pool.flops(rows, cols) + self.spectral.flops(rows) + self.spatial.flops(cols) + recombine


class JointAttention(nn.Module):
    """Dense attention over all ``(C+1)(N+1)`` grid tokens (ChannelViT-style reference).

    With a mask, token ``(c, n)`` attends ``(c', n')`` iff ``n`` may attend ``n'`` (perception field,
    valid position) and ``(c', n')`` is a valid token.
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
        self.attn = AxisAttention(dim, num_heads, 1, qkv_bias, qk_norm, attn_drop, norm_layer)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: GridMask | None = None) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]`` → ``[B, C+1, N+1, D]``."""
        B, rows, cols, _ = x.shape
        full = None
        if mask is not None and (mask.spatial is not None or mask.cell is not None):
            spatial = mask.spatial if mask.spatial is not None else x.new_ones(1, 1, cols, cols, dtype=torch.bool)
            full = repeat(spatial, "b 1 n m -> b 1 (c n) (k m)", c=rows, k=rows)
            if mask.cell is not None:
                full = full & rearrange(mask.cell, "b k m -> b 1 1 (k m)")
        y = self.attn(rearrange(x, "b c n d -> b (c n) d"), full)
        y = rearrange(y, "b 1 h (c n) d -> b c n (h d)", c=rows)
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
        num_heads: heads ``h`` (LESS and dense).
        rank: LESS rank ``r``, Kronecker terms per head (ignored by the dense block).
        spectral_head_dim: LESS ``d_c`` (ignored by the dense block).
        mlp_ratio: MLP hidden width / ``D``.
        qkv_bias, qk_norm: attention options.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on attention weights.
        drop_path: stochastic-depth probability of this block.
        init_values: LayerScale initial value (None = no LayerScale).
        norm_layer, act_layer: normalisation and activation types.
    """

    def __init__(
        self,
        dim: int,
        attention: str = "less",
        num_heads: int = 3,
        rank: int = 1,
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
            self.attn = LESSAttention(
                dim, num_heads, rank, spectral_head_dim, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer
            )
        elif attention == "dense":
            self.attn = JointAttention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        else:
            raise ValueError(f"attention must be 'less' or 'dense', got {attention!r}")
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.dim, self.mlp_hidden = dim, int(dim * mlp_ratio)
        self.mlp = Mlp(dim, self.mlp_hidden, act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: GridMask | None = None) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]`` → same shape."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), mask)))
        y = fused.pre_norm_mlp(self.norm2, self.mlp, x) if fused.active(x) else None
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)) if y is None else y))

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``)."""
        return self.attn.flops(rows, cols) + 2 * 2 * rows * cols * self.dim * self.mlp_hidden
