"""CPU fast paths of the LESS block: the same numbers as :mod:`gfm.model.attention`, computed leaner.

:mod:`gfm.model.attention` is the model as the paper writes it, and what CUDA (eager or compiled) runs.
On a CPU, where a step is bound by memory traffic and by the BLAS calls' size, three rewritings of the
block's maths pay (``python -m bench.model --rows less,less-ref`` and ``python -m bench.train --rows
"less 1 rank,less reference"`` print the comparison):

- **folded pools** (:func:`summary_pools`): each pool's key and value maps are folded into its query
  (``q·W_k z = (W_kᵀ q)·z``; the attention weights sum to one, so ``Σ a·W_v z = W_v Σ a·z``), so keys
  and values are never formed per token, and both pools run as one autograd function that reads the
  grid four times each way;
- **folded output projection** (:func:`project`): the projection goes through the spatial branch first,
  so the ``[C+1, N+1, D]`` outer products of the heads are never formed nor kept;
- **a recomputing MLP** (:func:`pre_norm_mlp`): ``fc2(gelu(fc1(LayerNorm(x))))`` worked a cache-sized
  slice of tokens at a time, keeping only ``x``, the norm statistics and (unless ``fc1`` is frozen)
  the hidden pre-activation, with oneDNN's matmul for the token products.

Each applies only to layers it can take apart (:func:`linear_parts`: a plain ``nn.Linear``, or a LoRA
layer whose update is a plain low-rank product); anything else runs as a module in the reference
path, so nothing an adapter adds is ever bypassed. Nothing here runs on other devices or inside
``torch.compile`` (:func:`active`); ``GFM_FUSED=0`` in the environment, or :func:`use_fused`, turns it
off. This module imports nothing of gfm's: :mod:`gfm.model.attention` calls it, passing its modules.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

_enabled = os.environ.get("GFM_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def use_fused(enabled: bool) -> Iterator[None]:
    """Within the block, take the CPU fast paths (True) or always the reference path (False)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


#: grids of fewer tokens per sample than this run the reference path: there the fast paths' fixed work per
#: call outweighs what they save (blocks of width 192 forward + backward on the 2-core EPYC here, reference
#: time over fast: 3 × 2 tokens 0.92-0.96, 5 × 2 1.03, 9 × 2 1.04-1.24, 14 × 65 1.16-1.20, 201 × 65 1.52-1.68)
_MIN_GRID_TOKENS = 16


def active(x: torch.Tensor) -> bool:
    """Whether the fast paths may run on a grid ``x: [B, C+1, N+1, D]``.

    They may when enabled, on the CPU, not being compiled, with at least :data:`_MIN_GRID_TOKENS` tokens a
    sample.
    """
    return (_enabled and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and x.shape[1] * x.shape[2] >= _MIN_GRID_TOKENS)


class _Pools(Protocol):
    """What :func:`summary_pools` reads of a ``gfm.model.attention.SummaryPool``."""

    @property
    def num_heads(self) -> int: ...
    @property
    def kv(self) -> nn.Module: ...
    @property
    def q_spectral(self) -> nn.Module: ...
    @property
    def q_spatial(self) -> nn.Module: ...


class _Attention(Protocol):
    """What :func:`project` reads of a ``gfm.model.attention.LESSAttention``."""

    @property
    def num_heads(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def spectral_head_dim(self) -> int: ...
    @property
    def proj(self) -> nn.Module: ...


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
# The summary pools


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
    column), each with its key and value maps folded into the query: per head ``q·(W_k z + b_k) =
    (W_kᵀ q)·z + q·b_k``, the second term constant along the pooled axis (the softmax drops it), and
    ``Σ_m a_m (W_v z_m + b_v) = W_v (Σ_m a_m z_m) + b_v``, so the work per token is ``O(h·D)`` instead of
    the ``O(D²)`` of projecting keys and values. What the composition of autograd ops would spend on the
    grid, this does once: the column pool reads the grid through strided views instead of
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



def summary_pools(
    pool: _Pools, x: torch.Tensor, spectral_keys: torch.Tensor | None, spatial_keys: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The summary tokens plus their pools (before the maps to branch width) of a ``SummaryPool``.

    The same as the reference ``x[:, :, 0] + Pool_c(x)`` and ``x[:, 0] + Pool_s(x)`` (value bias
    included) by :class:`_SummaryPools`; None when a layer cannot be taken apart (the caller runs the
    reference).
    """
    kv, q_c, q_s = linear_parts(pool.kv), linear_parts(pool.q_spectral), linear_parts(pool.q_spatial)
    if kv is None or q_c is None or q_s is None:
        return None
    w_k, w_v = rearrange(kv.merged_weight(), "(two h d) k -> two h d k", two=2, h=pool.num_heads)
    b_v = kv.bias.chunk(2)[1] if kv.bias is not None else None
    tokens: tuple[torch.Tensor, torch.Tensor] = _SummaryPools.apply(
        x, q_c.merged_weight(), q_c.bias, q_s.merged_weight(), q_s.bias, w_k, w_v, b_v, spectral_keys, spatial_keys
    )
    return tokens


# ------------------------------------------------------------------------------------------------
# The output projection


def project_spatial_first(attn: _Attention, rows: int, cols: int) -> bool:
    """Whether :func:`project` folds the output projection into the spatial branch (fewer FLOPs).

    Per sample, in multiply-adds: folded ``r·cols·D² + rows·cols·r·h·d_c·D``, against outer products
    then projection ``r·rows·cols·D + rows·cols·D²``; folded wins unless there are few rows and a high
    rank. Only for a projection :func:`linear_parts` can take apart.
    """
    proj = linear_parts(attn.proj)
    return proj is not None and _folding_pays(attn, proj, rows, cols)


def _folding_pays(attn: _Attention, proj: LinearParts, rows: int, cols: int) -> bool:
    """The comparison of :func:`project_spatial_first` for a projection already taken apart."""
    dim, r, w_c = proj.weight.shape[1], attn.rank, attn.num_heads * attn.spectral_head_dim
    return bool(r * cols * dim * dim + rows * cols * r * w_c * dim <= r * rows * cols * dim + rows * cols * dim * dim)


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


def project(attn: _Attention, a_c: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor | None:
    """``proj`` of a ``LESSAttention``'s heads from its branch outputs, the projection folded first; or None.

    ``proj(head(c, n)) = Σ_{r,h,i} a_c[r,h,c,i] · (Σ_j a_s[r,h,n,j] W[:, (h,i,j)])``: the spatial side goes
    through the projection first (``cols × D`` per term), then one matmul over ``r·h·d_c`` per token. With
    gradients, the spatial factor (most of a grid at small ``C``) is remade in the backward pass rather
    than kept. None when folding does not pay (:func:`project_spatial_first`) or the layer is wrapped.
    """
    rows, cols = a_c.shape[3], a_s.shape[3]
    proj = linear_parts(attn.proj)  # taken apart once: for a LoRA layer it stacks the adapters' factors
    if proj is None or not _folding_pays(attn, proj, rows, cols):
        return None
    weight = rearrange(proj.merged_weight(), "o (h i j) -> h i j o", h=attn.num_heads, i=attn.spectral_head_dim)
    spectral = rearrange(a_c, "b r h c i -> b c (r h i)") / attn.rank
    if torch.is_grad_enabled():
        out = checkpoint(_folded_projection, spectral, a_s, weight, proj.bias, use_reentrant=False)
    else:
        out = _folded_projection(spectral, a_s, weight, proj.bias)
    return rearrange(out, "b c (n o) -> b c n o", n=cols)


# ------------------------------------------------------------------------------------------------
# The MLP


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


def pre_norm_mlp(norm: nn.Module, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``mlp(norm(x))`` for a timm ``Mlp`` by :class:`_PreNormMLP`, or None where it does not apply.

    It applies to a ``LayerNorm``, a GELU MLP of layers :func:`linear_parts` takes apart (plain
    ``nn.Linear`` or LoRA-wrapped), no hidden norm and no active dropout between the layers, with
    gradients recorded (without them there is nothing to save, and the modules run as they are).
    """
    fc1, act, drop1, hidden_norm, fc2, drop2 = (
        getattr(mlp, n) for n in ("fc1", "act", "drop1", "norm", "fc2", "drop2")
    )
    fusable = (
        type(norm) is nn.LayerNorm and type(act) is nn.GELU and isinstance(hidden_norm, nn.Identity)
        and (not mlp.training or drop1.p == 0) and torch.is_grad_enabled()
    )
    first = linear_parts(fc1) if fusable else None
    second = linear_parts(fc2) if first is not None else None
    if first is None or second is None:
        return None
    y: torch.Tensor = drop2(_PreNormMLP.apply(
        x, norm.weight, norm.bias, norm.eps, first.weight, first.bias, first.down, first.up,
        second.weight, second.bias, second.down, second.up, act.approximate,
    ))
    return y
