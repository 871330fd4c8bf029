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
           + r·T·D  (Kronecker recombination)
           + 2·h·r·((C+1)²·d_c + (N+1)²·d_s)  (branch attention)
           + (2r+1)·((C+1)·W_c² + (N+1)·W_s²)  (branch projections)
           + (C+N+2)·D² + (C+1)·D·W_c + (N+1)·D·W_s  (pool queries, maps to branch widths)
    dense  4·T·D²  (qkv, output projection)  + 2·T·D·D_mlp  + 2·T²·D  (attention)

Both grow linearly in ``C`` through the ``T·D²`` terms; dense adds ``T²·D``, quadratic in ``C·N``.

The **perception field mask** restricts the spatial branch to patches within a radius in metres (a
local receptive field like a convolution's); the summary column (index 0) is always visible. Tokens
with no valid pixel are masked as keys in both pools and both branches (:class:`GridMask`, gfm
extension), so they are never attended and cannot influence valid tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """``scaled_dot_product_attention`` over the last two axes (any leading batch axes)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


# ------------------------------------------------------------------------------------------------
# Linear layers, plain or LoRA-wrapped


def _merged(w: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor:
    """``W + U·D`` (or ``W``) in one product (``O(out·in·r)``), instead of a rank-``r`` pass per token."""
    return w if down is None or up is None else torch.addmm(w, up, down)


@dataclass
class LinearParts:
    """A linear layer as tensors: ``y = x·Wᵀ + b + (x·Dᵀ)·Uᵀ``, the last term a low-rank update (or none).

    Attributes:
        weight: ``W``, ``[out, in]``.
        bias: ``b``, ``[out]`` or None.
        down: ``D``, ``[r, in]``, the adapters' down-projections stacked, each times its scaling; or None.
        up: ``U``, ``[out, r]``, the matching up-projections side by side; or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None

    def merged_weight(self) -> torch.Tensor:
        """``W + U·D``: the weight the layer applies (gradients reach the adapters through it)."""
        return _merged(self.weight, self.down, self.up)


def linear_parts(layer: nn.Module) -> LinearParts | None:
    """The :class:`LinearParts` of a plain ``nn.Linear`` or of a LoRA-wrapped one; None for anything else.

    A LoRA layer is recognised by peft's attributes (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``,
    ``active_adapters``; ``gfm.model`` does not import peft) and taken apart only when its adapters are
    plain low-rank products, as peft computes them: ``base(x) + Σ_a s_a·B_a(A_a(x))``, no dropout in
    training, no DoRA or other variant, no adapter bias, not merged. Anything else returns None and the
    caller runs the layer as a module, so nothing an adapter adds is ever bypassed.
    """
    if isinstance(layer, nn.Linear):
        return LinearParts(layer.weight, layer.bias)
    base, lora_a, lora_b = (getattr(layer, n, None) for n in ("base_layer", "lora_A", "lora_B"))
    if not (isinstance(base, nn.Linear) and isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict)):
        return None
    if getattr(layer, "merged", True) or getattr(layer, "fan_in_fan_out", True):
        return None  # a merged layer's base holds the sum (the module may unmerge it first)
    if getattr(layer, "disable_adapters", True):
        return LinearParts(base.weight, base.bias)
    variants = getattr(layer, "lora_variant", {})
    dora = getattr(layer, "use_dora", {})
    downs: list[torch.Tensor] = []
    ups: list[torch.Tensor] = []
    dropouts = layer.lora_dropout
    assert isinstance(dropouts, nn.ModuleDict)
    for name in getattr(layer, "active_adapters", ()):
        if name not in lora_a:
            continue
        a, b, drop = lora_a[name], lora_b[name], dropouts[name]
        if name in variants or dora.get(name, False):
            return None
        if layer.training and not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0)):
            return None
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
            return None
        downs.append(a.weight * layer.scaling[name])
        ups.append(b.weight)
    if not downs:
        return LinearParts(base.weight, base.bias)
    down = downs[0] if len(downs) == 1 else torch.cat(downs)
    up = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
    return LinearParts(base.weight, base.bias, down, up)


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
        y = _attention(q, k, v, mask, self.attn_drop if self.training else 0.0)
        return rearrange(y, "b (r h) l d -> b r h l d", r=r)

    def flops(self, length: int) -> int:
        """Forward matmul FLOPs for one sample of ``length`` tokens."""
        dim = self.num_heads * self.head_dim
        return 2 * length * dim * (2 * self.rank + 1) * dim + 4 * self.rank * length * length * dim


def _pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Single-query attention along one grid axis, from projected keys and values.

    ``q`` broadcasts against ``k, v: [B, C+1, N+1, h, d]`` and has size 1 on ``axis``; ``valid:
    [B, C+1, N+1]`` masks keys. Returns ``[B, L, h, d]`` with ``axis`` reduced. The path of a pool
    whose key/value layer cannot be taken apart (:func:`linear_parts`); see :func:`_absorbed_pool`.
    """
    logits = (q * k).sum(-1) * k.shape[-1] ** -0.5  # [B, C+1, N+1, h]
    if valid is not None:
        logits = logits.masked_fill(~valid[..., None], float("-inf"))  # summary keys stay: never all masked
    weights = logits.softmax(dim=axis)
    return (weights[..., None] * v).sum(dim=axis)


def _absorbed_pool(
    z: torch.Tensor, q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Single-query attention over axis 2 of ``z`` with the key and value maps folded into the query side.

    Args:
        z: ``[B, L, M, D]`` tokens, pooled over ``M`` (one query per ``L``).
        q: ``[B, L, h, d]`` queries.
        w_k: ``[h, d, D]`` key weights (rows of the pool's key/value layer).
        w_v: ``[h, d, D]`` value weights.
        valid: ``[B, L, M]`` key mask, or None.

    Returns ``[B, L, h, d]``, without the value bias. The same numbers as projecting every token and
    attending (:func:`_pool`), since for each head ``q·(W_k z + b_k) = (W_kᵀ q)·z + q·b_k``, and the
    second term is constant along the pooled axis, so the softmax drops it; and since the weights sum to
    one, ``Σ_m a_m (W_v z_m + b_v) = W_v (Σ_m a_m z_m) + b_v``. The work per token is ``O(h·D)`` instead of
    the ``O(D²)`` of projecting keys and values, and nothing grid-sized beyond ``z`` is kept for the
    backward pass.
    """
    q_abs = torch.einsum("blhd,hdk->blhk", q, w_k) * q.shape[-1] ** -0.5  # [B, L, h, D]
    logits = torch.matmul(z, q_abs.transpose(-1, -2))  # [B, L, M, h]
    if valid is not None:
        logits = logits.masked_fill(~valid[..., None], float("-inf"))  # summary keys stay: never all masked
    weights = logits.softmax(dim=2)
    z_bar = torch.matmul(weights.transpose(-1, -2), z)  # [B, L, h, D]: per head, the weighted mean token
    return torch.einsum("blhk,hdk->blhd", z_bar, w_v)


#: rows from which the column pool's gradient is added column by column (one small product per column)
#: rather than formed whole and added: per-column calls cost ~15 µs each, a grid-sized temporary a pass
_STRIDED_ROWS = 64


def _columns(x: torch.Tensor, b: int) -> torch.Tensor:
    """Sample ``b`` of ``x: [B, C+1, N+1, D]`` column by column, ``[N+1, C+1, D]``: a strided view, no copy."""
    return x[b].transpose(0, 1)


#: per-sample grids of fewer elements than this are read column-major through one batched product (a copy
#: of the grid) rather than one strided product per sample: at ~15 µs a call, the per-sample loop costs more
#: than the copy below ~2^15 elements (measured on this 2-core CPU: a batch of 1,024 one-pixel grids, 3 × 2
#: tokens of width 192, runs the pools 1.6x faster batched; 32 grids of 9 × 65 tokens 1.25x faster per sample)
_BATCHED_GRID_ELEMENTS = 2**15


def _batched(x: torch.Tensor) -> bool:
    return x.shape[1] * x.shape[2] * x.shape[3] < _BATCHED_GRID_ELEMENTS


def _columns_times(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per column, the grid's column times a matrix: ``[B, C+1, N+1, D]``, ``[B, N+1, D, k]`` → ``[B, N+1, C+1, k]``."""
    if _batched(x):
        return torch.matmul(x.transpose(1, 2), m)
    return torch.stack([torch.bmm(_columns(x, b), m[b]) for b in range(x.shape[0])])


def _times_columns(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per column, a matrix times the grid's column: ``[B, N+1, k, C+1]``, ``[B, C+1, N+1, D]`` → ``[B, N+1, k, D]``."""
    if _batched(x):
        return torch.matmul(m, x.transpose(1, 2))
    return torch.stack([torch.bmm(m[b], _columns(x, b)) for b in range(x.shape[0])])


class _SummaryPools(torch.autograd.Function):
    """Both summary pools of a grid with the key/value map folded into the queries, in one pass of autograd.

    ``tokens_c = x[:, :, 0] + Pool_c(x) + b_v`` (the summary-column token of each row attends that row)
    and ``tokens_s = x[:, 0] + Pool_s(x) + b_v`` (the summary-row token of each column attends that
    column), each pool as :func:`_absorbed_pool` computes it. What the composition of autograd ops would
    spend on the grid, this does once: the column pool reads the grid through strided views instead of
    a column-major copy, and the backward pass writes the grid's gradient once, the two pools and the
    summary tokens together, instead of materialising a zero-filled grid per summary-token slice and a
    gradient per product to be summed. The grid is read four times forward (scores and weighted means of
    each pool) and four times backward; everything else is ``[*, h, D]`` or ``[*, h]`` per row or column.
    Computed in ``x``'s dtype with autocast off: each product reads the grid once in its own precision.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w_qc: torch.Tensor, b_qc: torch.Tensor | None,
        w_qs: torch.Tensor, b_qs: torch.Tensor | None, w_k: torch.Tensor, w_v: torch.Tensor,
        b_v: torch.Tensor | None, keys_c: torch.Tensor | None, keys_s: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, R, P, D = x.shape
        h, d = w_k.shape[:2]
        dt = x.dtype
        ctx.dtypes = [None if t is None else t.dtype for t in (w_qc, b_qc, w_qs, b_qs, w_k, w_v, b_v)]  # type: ignore[attr-defined]
        with torch.autocast(x.device.type, enabled=False):
            w_qc, w_qs, w_k, w_v = (w.to(dt) for w in (w_qc, w_qs, w_k, w_v))
            col, row = x[:, :, 0], x[:, 0]  # [B, R, D], [B, P, D]
            q_c = F.linear(col, w_qc, None if b_qc is None else b_qc.to(dt)).view(B, R, h, d)
            q_s = F.linear(row, w_qs, None if b_qs is None else b_qs.to(dt)).view(B, P, h, d)
            qa_c = torch.einsum("bchd,hdk->bchk", q_c, w_k) * d**-0.5  # [B, R, h, D]
            qa_s = torch.einsum("bnhd,hdk->bnhk", q_s, w_k) * d**-0.5  # [B, P, h, D]
            logits_c = torch.matmul(x, qa_c.transpose(-1, -2))  # [B, R, P, h]
            logits_s = _columns_times(x, qa_s.transpose(-1, -2))
            if keys_c is not None:  # summary keys stay: never all masked
                logits_c = logits_c.masked_fill(~keys_c[..., None], float("-inf"))
            if keys_s is not None:
                logits_s = logits_s.masked_fill(~keys_s.transpose(1, 2)[..., None], float("-inf"))
            a_c, a_s = logits_c.softmax(dim=2), logits_s.softmax(dim=2)  # [B, R, P, h], [B, P, R, h]
            zbar_c = torch.matmul(a_c.transpose(-1, -2), x)  # [B, R, h, D]: per head, the weighted mean token
            zbar_s = _times_columns(a_s.transpose(-1, -2), x)
            tokens_c = col + torch.einsum("bchk,hdk->bchd", zbar_c, w_v).reshape(B, R, D)
            tokens_s = row + torch.einsum("bnhk,hdk->bnhd", zbar_s, w_v).reshape(B, P, D)
            if b_v is not None:
                tokens_c, tokens_s = tokens_c + b_v.to(dt), tokens_s + b_v.to(dt)
        ctx.save_for_backward(x, w_qc, w_qs, w_k, w_v, q_c, q_s, qa_c, qa_s, a_c, a_s, zbar_c, zbar_s)
        return tokens_c, tokens_s

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g_c: torch.Tensor, g_s: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, w_qc, w_qs, w_k, w_v, q_c, q_s, qa_c, qa_s, a_c, a_s, zbar_c, zbar_s = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        B, R, P, D = x.shape
        h, d = w_k.shape[:2]
        with torch.autocast(x.device.type, enabled=False):
            g_c, g_s = g_c.to(x.dtype), g_s.to(x.dtype)
            gp_c, gp_s = g_c.view(B, R, h, d), g_s.view(B, P, h, d)
            # tokens = summary + zbar·W_vᵀ + b_v
            gz_c = torch.einsum("bchd,hdk->bchk", gp_c, w_v)  # [B, R, h, D]
            gz_s = torch.einsum("bnhd,hdk->bnhk", gp_s, w_v)  # [B, P, h, D]
            # zbar = aᵀ·x, then the softmax: the scores' gradient, [B, R, P, h] and [B, P, R, h]
            ga_c = torch.matmul(x, gz_c.transpose(-1, -2))
            ga_s = _columns_times(x, gz_s.transpose(-1, -2))
            gl_c = a_c * (ga_c - (a_c * ga_c).sum(dim=2, keepdim=True))
            gl_s = a_s * (ga_s - (a_s * ga_s).sum(dim=2, keepdim=True))
            # scores = x·qa: the folded queries' gradient, [B, R, h, D] and [B, P, h, D]
            gqa_c = torch.matmul(gl_c.transpose(-1, -2), x)
            gqa_s = _times_columns(gl_s.transpose(-1, -2), x)
            grad_x = None
            if need[0]:  # both pools, both uses of x in each (scores and means): one write of the grid, one update
                grad_x = torch.matmul(torch.cat([a_c, gl_c], dim=-1), torch.cat([gz_c, qa_c], dim=2))
                left, right = torch.cat([a_s, gl_s], dim=-1), torch.cat([gz_s, qa_s], dim=2)
                if R >= _STRIDED_ROWS:  # into the grid's gradient column by column, no grid-sized temporary
                    for b in range(B):
                        _columns(grad_x, b).baddbmm_(left[b], right[b])
                else:  # few rows: one product, then one strided addition
                    grad_x += torch.matmul(left, right).transpose(1, 2)
            # qa = (x_summary·W_qᵀ + b_q)·W_k / √d
            gq_c = torch.einsum("bchk,hdk->bchd", gqa_c, w_k).reshape(B, R, D) * d**-0.5
            gq_s = torch.einsum("bnhk,hdk->bnhd", gqa_s, w_k).reshape(B, P, D) * d**-0.5
            if grad_x is not None:
                grad_x[:, :, 0] += g_c + gq_c @ w_qc
                grad_x[:, 0] += g_s + gq_s @ w_qs
            col, row = x[:, :, 0].reshape(-1, D), x[:, 0].reshape(-1, D)
            grads = [
                grad_x,
                gq_c.reshape(-1, D).t() @ col if need[1] else None,
                gq_c.sum(dim=(0, 1)) if need[2] else None,
                gq_s.reshape(-1, D).t() @ row if need[3] else None,
                gq_s.sum(dim=(0, 1)) if need[4] else None,
                (torch.einsum("bchk,bchd->hdk", gqa_c, q_c) + torch.einsum("bnhk,bnhd->hdk", gqa_s, q_s)) * d**-0.5
                if need[5] else None,
                torch.einsum("bchd,bchk->hdk", gp_c, zbar_c) + torch.einsum("bnhd,bnhk->hdk", gp_s, zbar_s)
                if need[6] else None,
                g_c.sum(dim=(0, 1)) + g_s.sum(dim=(0, 1)) if need[7] else None,
            ]
        dtypes = [x.dtype, *ctx.dtypes]  # type: ignore[attr-defined]
        return (*(None if g is None else g.to(t) for g, t in zip(grads, dtypes)), None, None)


class SummaryPool(nn.Module):
    """Pool the grid into spectral and spatial tokens by attention from the summary tokens.

    Spectral token ``c`` = summary-column token ``x[c, 0]`` + attention from it over row ``c``;
    spatial token ``n`` = summary-row token ``x[0, n]`` + attention from it over column ``n``. Keys and
    values of the grid are one linear map at width ``D`` shared by both pools; they are never formed
    per token (:func:`_absorbed_pool`). Both pools run as one autograd function (:class:`_SummaryPools`)
    when the key/value and query layers are plain or LoRA-wrapped (:func:`linear_parts`), and as the
    composition of autograd ops inside ``torch.compile`` (inductor fuses it) or with other wrappers.
    Each pooled token is then mapped to its branch width (``h·d_c`` spectral, ``h·d_s`` spatial).
    """

    def __init__(self, dim: int, num_heads: int, spectral_dim: int, spatial_dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q_spectral = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_spatial = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_spectral = nn.Linear(dim, spectral_dim)
        self.to_spatial = nn.Linear(dim, spatial_dim)

    @property
    def absorbed(self) -> bool:
        """Whether keys and values are folded into the queries.

        They are when the key/value layer is a plain ``nn.Linear`` or a LoRA-wrapped one whose weight is
        ``W + U·D`` (:func:`linear_parts`). Any other wrapper is applied as a module to every token
        instead, so what it adds is never bypassed.
        """
        return linear_parts(self.kv) is not None

    def forward(
        self, x: torch.Tensor, spectral_keys: torch.Tensor | None = None, spatial_keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, C+1, N+1, D]``, key masks ``[B, C+1, N+1]`` (None = all).

        Returns spectral tokens ``[B, C+1, h·d_c]`` and spatial tokens ``[B, N+1, h·d_s]``.
        """
        h = self.num_heads
        kv = linear_parts(self.kv)
        if kv is not None:  # keys and values folded into the queries
            w_k, w_v = rearrange(kv.merged_weight(), "(two h d) k -> two h d k", two=2, h=h)
            b_v = kv.bias.chunk(2)[1] if kv.bias is not None else None
            parts_c, parts_s = linear_parts(self.q_spectral), linear_parts(self.q_spatial)
            if parts_c is not None and parts_s is not None and not torch.compiler.is_compiling():
                tokens_c, tokens_s = _SummaryPools.apply(
                    x, parts_c.merged_weight(), parts_c.bias, parts_s.merged_weight(), parts_s.bias, w_k, w_v, b_v,
                    spectral_keys, spatial_keys,
                )
                return self.to_spectral(tokens_c), self.to_spatial(tokens_s)
        # spectral: the summary token of each row queries that row's N+1 positions
        q_c = rearrange(self.q_spectral(x[:, :, 0]), "b c (h d) -> b c h d", h=h)
        # spatial: the summary token of each column queries that column's C+1 observations
        q_s = rearrange(self.q_spatial(x[:, 0]), "b n (h d) -> b n h d", h=h)
        if kv is not None:  # inside torch.compile (inductor fuses), or a wrapped query layer
            keys_s = None if spatial_keys is None else rearrange(spatial_keys, "b c n -> b n c")
            pooled_c = _absorbed_pool(x, q_c, w_k, w_v, spectral_keys)
            pooled_s = _absorbed_pool(rearrange(x, "b c n k -> b n c k"), q_s, w_k, w_v, keys_s)
            pooled_c = rearrange(pooled_c, "b c h d -> b c (h d)")
            pooled_s = rearrange(pooled_s, "b n h d -> b n (h d)")
            if b_v is not None:
                pooled_c, pooled_s = pooled_c + b_v, pooled_s + b_v
        else:
            k, v = rearrange(self.kv(x), "b c n (two h d) -> two b c n h d", two=2, h=h)  # views, no copies
            pooled_c = rearrange(_pool(q_c[:, :, None], k, v, 2, spectral_keys), "b c h d -> b c (h d)")
            pooled_s = rearrange(_pool(q_s[:, None], k, v, 1, spatial_keys), "b n h d -> b n (h d)")
        return self.to_spectral(x[:, :, 0] + pooled_c), self.to_spatial(x[:, 0] + pooled_s)

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``).

        Folded keys and values (:attr:`absorbed`): the queries, their products with the key and value
        weights (``2·(rows + cols)·D²`` each), and per pool the scores and weighted sums as matmuls
        (``4·rows·cols·h·D``). Otherwise the per-token key/value projection, with the pools' scores and
        weighted sums elementwise (not counted, like norms and softmax).
        """
        dim = self.q_spectral.in_features
        queries = 2 * (rows + cols) * dim * dim
        out = 2 * rows * dim * self.to_spectral.out_features + 2 * cols * dim * self.to_spatial.out_features
        if self.absorbed:
            folded = 2 * 2 * (rows + cols) * dim * dim
            pools = 2 * 4 * rows * cols * self.num_heads * dim
            return queries + folded + pools + out
        kv = 2 * rows * cols * dim * 2 * dim
        return kv + queries + out


# ------------------------------------------------------------------------------------------------
# Attention layers and the block


def _folded_projection(
    spectral: torch.Tensor, a_s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``proj`` of the heads' outer products with the projection folded into the spatial branch.

    ``spectral: [B, C+1, r·h·d_c]`` (already over ``r``), ``a_s: [B, r, h, N+1, d_s]``, ``weight: [h, d_c, d_s,
    D]`` → ``[B, C+1, (N+1)·D]``: the spatial side goes through the projection first, then one matmul
    over ``r·h·d_c`` per token, the bias as one more term of it (no pass over the grid of its own).
    """
    cols = a_s.shape[3]
    spatial = rearrange(torch.einsum("brhnj,hijo->brhino", a_s, weight), "b r h i n o -> b (r h i) (n o)")
    if bias is not None:
        spectral = F.pad(spectral, (0, 1), value=1.0)
        spatial = torch.cat([spatial, bias.to(spatial.dtype).repeat(cols).expand(spatial.shape[0], 1, -1)], dim=1)
    return torch.matmul(spectral, spatial)


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
        rows, cols = x.shape[1], x.shape[2]
        proj = linear_parts(self.proj)
        if proj is None or not self.project_spatial_first(rows, cols):
            heads = torch.einsum("brhci,brhnj->bcnhij", a_c, a_s) / self.rank  # rank-r sums of outer products
            return self.proj_drop(self.proj(rearrange(heads, "b c n h i j -> b c n (h i j)")))
        # proj(head(c, n)) = Σ_{r,h,i} a_c[r,h,c,i] · (Σ_j a_s[r,h,n,j] W[:, (h,i,j)]): the spatial side
        # goes through the projection first (cols × D per term), then one matmul over r·h·d_c per token;
        # the [C+1, N+1, D] outer products are never formed (nor kept for the backward pass)
        weight = rearrange(proj.merged_weight(), "o (h i j) -> h i j o", h=self.num_heads, i=self.spectral_head_dim)
        spectral = rearrange(a_c, "b r h c i -> b c (r h i)") / self.rank
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # the spatial factor ([r·h·d_c, (N+1)·D] per sample: most of a grid at small C) is remade in the
            # backward pass from the branch output and the weight rather than kept
            out = checkpoint(_folded_projection, spectral, a_s, weight, proj.bias, use_reentrant=False)
        else:
            out = _folded_projection(spectral, a_s, weight, proj.bias)
        return self.proj_drop(rearrange(out, "b c (n o) -> b c n o", n=cols))

    def project_spatial_first(self, rows: int, cols: int) -> bool:
        """Whether :meth:`forward` folds the output projection into the spatial branch (fewer FLOPs).

        Per sample, in multiply-adds: folded ``r·cols·D² + rows·cols·r·h·d_c·D``, against outer products
        then projection ``r·rows·cols·D + rows·cols·D²``; folded wins unless there are few rows and a
        high rank. Only for a projection :func:`linear_parts` can take apart (plain or LoRA-wrapped): any
        other is applied as a module.
        """
        if linear_parts(self.proj) is None:
            return False
        dim, r, w_c = self.proj.in_features, self.rank, self.num_heads * self.spectral_head_dim
        return r * cols * dim * dim + rows * cols * r * w_c * dim <= r * rows * cols * dim + rows * cols * dim * dim

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``)."""
        dim, r = self.proj.in_features, self.rank
        if self.project_spatial_first(rows, cols):
            terms = r * self.num_heads * self.spectral_head_dim + (self.proj.bias is not None)  # bias: one more term
            recombine = 2 * r * cols * dim * dim + 2 * rows * cols * terms * dim
        else:  # the einsum runs as a batched matmul contracting r, then the projection
            recombine = 2 * r * rows * cols * dim + 2 * rows * cols * dim * dim
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


#: hidden-activation elements the MLP works on at a time (:class:`_PreNormMLP`): 4 MB in fp32, within a
#: CPU's last-level cache share (2**22 measured 5 % slower at C = 200 on a 2-core EPYC)
_CHUNK_ELEMENTS = 2**20


def _onednn_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's linear kernel (x86 and Arm builds do)."""
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018  (the lookup raises where it was not built)
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


_ONEDNN_LINEAR = _onednn_linear_available()


def _use_onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    return (
        _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
        and (b is None or b.dtype == torch.float32) and bool(torch.backends.mkldnn.enabled)
        and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")  # autocast: F.linear casts
    )


def _rows_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D ``x`` of many rows inside a Function's passes (no autograd).

    On CPU in fp32 it runs oneDNN's matmul (the kernel PyTorch's own CPU fusions call): on a 2-core
    AMD EPYC (Zen 4) it ran the MLP's ``rows × 192 ↔ 768`` products 1.1-1.5× faster than the MKL
    sgemm behind ``F.linear``, to the same fp32 rounding. Weight gradients (a contraction over the
    rows) stay with MKL, which was faster there.
    ``torch.backends.mkldnn.enabled = False`` turns it off, as it does PyTorch's other oneDNN
    paths. Elsewhere (CUDA, under autocast, gradients recorded) it is ``F.linear``. With ``out`` (a
    slice of a larger tensor) the result is written there.
    """
    if _use_onednn(x, w, b):
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return y if out is None else out.copy_(y)
    if out is None:
        return F.linear(x, w, b)
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``: one BLAS call with no temporary when the dtypes agree, else a product and a sum.

    For the MLP's second weight gradient, summed over slices, the single call took 2.7 instead of
    3.2-3.5 ms a slice on the 2-core EPYC (the first weight's gradient took the same either way).
    """
    if acc.dtype == a.dtype == b.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


class _PreNormMLP(torch.autograd.Function):
    """``fc2(gelu(fc1(LayerNorm(x))))`` keeping only ``x``, the norm statistics and the hidden pre-activation.

    The plain composition keeps the normed input (``D`` per token), the pre-activation and the
    activation (``2 × 4D``): most of what a block stores for the backward pass. Here both passes work a
    slice of tokens at a time (:data:`_CHUNK_ELEMENTS`): forward, a slice's hidden activation is still in
    cache when the second layer reads it; backward recomputes the normed input and the activation
    (elementwise work, no matmul), so neither they nor the hidden gradient are ever whole. Gradients are
    those of the composition, also under autocast: the norm runs in the input's dtype with autocast off
    for it (whatever a device's autocast does with norms, the statistics match what the backward pass's
    ``native_layer_norm_backward`` reads), the products in the dtype of the incoming gradient, and weight gradients are
    summed over slices in fp32 (or wider) and returned in their parameters' dtype.

    Either layer may carry a low-rank update (LoRA, :class:`LinearParts`): ``y = x·(W + U·D)ᵀ + b``.
    Tokens go through the merged weight (one matmul, as without the update); the rank-wide
    ``x·Dᵀ`` is recomputed per slice for the gradients of ``D`` and ``U``, and a frozen ``W`` costs no
    weight gradient at all. When the first layer's weight is frozen (LoRA) the hidden pre-activation is
    not kept either but recomputed a slice at a time (one matmul, about what its weight gradient would
    have cost): the MLP then keeps only ``x`` and its statistics.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, ln_w: torch.Tensor | None,
        ln_b: torch.Tensor | None, eps: float, w1: torch.Tensor, b1: torch.Tensor | None, d1: torch.Tensor | None,
        u1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, d2: torch.Tensor | None,
        u2: torch.Tensor | None, approximate: str,
    ) -> torch.Tensor:
        dim = x.shape[-1]
        xs = x.reshape(-1, dim)
        w1m, w2m = _merged(w1, d1, u1), _merged(w2, d2, u2)
        keep_h = ctx.needs_input_grad[4]  # type: ignore[attr-defined]  # else recomputed: the weight is frozen
        tokens, hidden = xs.shape[0], w1.shape[0]
        # without autocast every product is in x's dtype: the second layer writes the output in place
        direct = not torch.is_autocast_enabled(x.device.type)
        out = xs.new_empty(tokens, w2.shape[0]) if direct else None
        # The hidden pre-activation is kept slice by slice: allocations of a few MB, which the allocator
        # serves again step after step, where one [T, 4D] tensor is mapped fresh (page fault after page
        # fault) every step (glibc maps anything over 32 MB; at C = 200: 57k → 26k faults a step, -6 % time).
        h_kept: list[torch.Tensor] = []
        stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        step = max(1, _CHUNK_ELEMENTS // hidden)
        for start in range(0, tokens, step):  # the hidden slice stays in cache from fc1 to fc2
            rows = slice(start, start + step)
            with torch.autocast(x.device.type, enabled=False):  # statistics in the dtype backward reads
                normed, mean_c, rstd_c = torch.native_layer_norm(xs[rows], (dim,), ln_w, ln_b, eps)
            h_c = _rows_linear(normed, w1m, b1)
            act = F.gelu(h_c, approximate=approximate)
            if direct and out is not None:
                _rows_linear(act, w2m, b2, out=out[rows])
            else:
                out_c = F.linear(act, w2m, b2)
                if out is None:  # in the dtype autocast chose
                    out = out_c.new_empty(tokens, out_c.shape[1])
                out[rows] = out_c
            if keep_h:
                h_kept.append(h_c)
            stats.append((mean_c, rstd_c))
            hidden_dtype = h_c.dtype
        assert out is not None
        mean, rstd = (torch.cat(s) for s in zip(*stats))
        ctx.save_for_backward(
            x, mean, rstd, ln_w, ln_b, w1, b1, d1, u1, w2, d2, u2, *h_kept  # type: ignore[arg-type]
        )
        ctx.hidden_dtype = hidden_dtype  # type: ignore[attr-defined]
        ctx.step = step  # type: ignore[attr-defined]
        ctx.approximate = approximate  # type: ignore[attr-defined]
        ctx.bias_dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)  # type: ignore[attr-defined]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, ln_w, ln_b, w1, b1, d1, u1, w2, d2, u2, *h_kept = ctx.saved_tensors  # type: ignore[attr-defined]
        approximate: str = ctx.approximate  # type: ignore[attr-defined]
        hidden_dtype: torch.dtype = ctx.hidden_dtype  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        dim = x.shape[-1]
        xs, go = x.reshape(-1, dim), grad_out.reshape(-1, grad_out.shape[-1])
        hs = h_kept or None  # slice by slice, as the forward pass kept them
        means, rstds = mean.reshape(-1, 1), rstd.reshape(-1, 1)
        dtype = go.dtype

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        w1c, w2c = _merged(w1, d1, u1).to(dtype), _merged(w2, d2, u2).to(dtype)
        b1c, d1c, u1c, d2c, u2c = (cast(t) for t in (b1, d1, u1, d2, u2))

        def zeros(p: torch.Tensor | None, i: int) -> torch.Tensor | None:  # an accumulator, fp32 at least
            if p is None or not need[i]:
                return None
            return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))

        grad_x = torch.empty_like(xs) if need[0] else None
        g_lnw, g_lnb, g_w1, g_b1 = zeros(ln_w, 1), zeros(ln_b, 2), zeros(w1, 4), zeros(w1[:, 0], 5)
        g_d1, g_u1, g_w2, g_d2, g_u2 = zeros(d1, 6), zeros(u1, 7), zeros(w2, 8), zeros(d2, 10), zeros(u2, 11)
        upstream = any(g is not None for g in (grad_x, g_lnw, g_lnb, g_w1, g_b1, g_d1, g_u1))
        step: int = ctx.step  # type: ignore[attr-defined]  # the slices of the forward pass
        for start in range(0, xs.shape[0], step):
            rows = slice(start, start + step)
            go_c = go[rows]
            normed = None
            if hs is None or g_w1 is not None or g_d1 is not None or g_u1 is not None:
                normed = (xs[rows] - means[rows]) * rstds[rows]  # recomputed
                if ln_w is not None:
                    normed = normed * ln_w
                if ln_b is not None:
                    normed = normed + ln_b
                normed = normed.to(dtype)
            if hs is not None:
                h_c = hs[start // step]  # the same slicing as forward
            else:  # recomputed, as the forward pass computed it
                assert normed is not None
                h_c = _rows_linear(normed, w1c, b1c).to(hidden_dtype)
            act = None
            if g_w2 is not None or g_d2 is not None or g_u2 is not None:
                act = F.gelu(h_c, approximate=approximate).to(dtype)
            if g_w2 is not None and act is not None:
                _add_product(g_w2, go_c.t(), act)
            if d2c is not None and u2c is not None and act is not None:
                if g_u2 is not None:
                    _add_product(g_u2, go_c.t(), act @ d2c.t())
                if g_d2 is not None:
                    _add_product(g_d2, (go_c @ u2c).t(), act)
            if not upstream:
                continue
            grad_h = torch.ops.aten.gelu_backward(_rows_linear(go_c, w2c.t()).to(hidden_dtype), h_c,
                                                  approximate=approximate)
            gh = grad_h.to(dtype)
            if g_w1 is not None and normed is not None:
                _add_product(g_w1, gh.t(), normed)
            if g_b1 is not None:
                g_b1 += grad_h.sum(0)
            if d1c is not None and u1c is not None and normed is not None:
                if g_u1 is not None:
                    _add_product(g_u1, gh.t(), normed @ d1c.t())
                if g_d1 is not None:
                    _add_product(g_d1, (gh @ u1c).t(), normed)
            if grad_x is not None or g_lnw is not None or g_lnb is not None:
                dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                    _rows_linear(gh, w1c.t()).to(x.dtype), xs[rows], (dim,), means[rows], rstds[rows], ln_w, ln_b,
                    [grad_x is not None, g_lnw is not None, g_lnb is not None],
                )
                if grad_x is not None:
                    grad_x[rows] = dx
                if g_lnw is not None:
                    g_lnw += dw
                if g_lnb is not None:
                    g_lnb += db
        b1_dtype, b2_dtype = ctx.bias_dtypes  # type: ignore[attr-defined]
        g_b2 = go.sum(0, dtype=torch.promote_types(go.dtype, torch.float32)).to(b2_dtype) if need[9] else None

        def back(g: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None or p is None else g.to(p.dtype)

        return (
            None if grad_x is None else grad_x.view(x.shape), back(g_lnw, ln_w), back(g_lnb, ln_b), None,
            back(g_w1, w1), None if g_b1 is None else g_b1.to(b1_dtype), back(g_d1, d1), back(g_u1, u1),
            back(g_w2, w2), g_b2, back(g_d2, d2), back(g_u2, u2), None,
        )


def pre_norm_mlp(norm: nn.Module, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mlp(norm(x))`` for a timm ``Mlp``, recomputing the norm and GELU in the backward pass when it can.

    That is (:class:`_PreNormMLP`): a ``LayerNorm``, a GELU MLP of layers :func:`linear_parts` takes
    apart (plain ``nn.Linear`` or LoRA-wrapped), no hidden norm and no active dropout between the
    layers, gradients recorded, and not inside ``torch.compile`` (where inductor decides itself what to
    recompute). Otherwise the modules run as they are.
    """
    fc1, act, drop1, hidden_norm, fc2, drop2 = (
        getattr(mlp, n) for n in ("fc1", "act", "drop1", "norm", "fc2", "drop2")
    )
    fusable = (
        type(norm) is nn.LayerNorm and type(act) is nn.GELU and isinstance(hidden_norm, nn.Identity)
        and (not mlp.training or drop1.p == 0) and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    )
    first = linear_parts(fc1) if fusable else None
    second = linear_parts(fc2) if first is not None else None
    if first is None or second is None:
        out: torch.Tensor = mlp(norm(x))
        return out
    y: torch.Tensor = drop2(_PreNormMLP.apply(
        x, norm.weight, norm.bias, norm.eps, first.weight, first.bias, first.down, first.up,
        second.weight, second.bias, second.down, second.up, act.approximate,
    ))
    return y


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
        return x + self.drop_path2(self.ls2(pre_norm_mlp(self.norm2, self.mlp, x)))

    def flops(self, rows: int, cols: int) -> int:
        """Forward matmul FLOPs for one sample with a ``rows × cols`` grid (``C+1``, ``N+1``)."""
        return self.attn.flops(rows, cols) + 2 * 2 * rows * cols * self.dim * self.mlp_hidden
