"""The CPU fast paths (``gfm.model.fused``) compute what the reference block computes, keep less, and never
bypass an adapter.

Three rewritings change how, not what: the pools fold the key/value map into the queries
(``fused.summary_pools``), the output projection is folded into the spatial branch (``fused.project``),
and the pre-norm MLP recomputes its norm and GELU in the backward pass (``fused.pre_norm_mlp``). Each is
compared here with the reference path of ``gfm.model.attention`` (``fused.use_fused(False)``), in fp64,
fp32 and bf16 autocast, forward and backward, plain and LoRA-wrapped. A layer behind a wrapper the fast
paths cannot take apart runs in the reference path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gfm.model import fused
from gfm.model.attention import Block, GridMask, LESSAttention, SummaryPool, grid_mask
from gfm.model.fused import linear_parts, pre_norm_mlp, project_spatial_first


class Wrapped(nn.Module):
    """A layer behind a module that is not an ``nn.Linear`` (like peft's LoRA layer), optionally adding ``x·Δᵀ``."""

    def __init__(self, base: nn.Linear, delta: torch.Tensor | None = None) -> None:
        super().__init__()
        self.base = base
        self.delta = delta
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.delta is None else y + x @ self.delta.T


def test_fast_paths_run_only_on_cpu_grids_large_enough_and_when_enabled() -> None:
    torch.manual_seed(0)
    block = Block(24, "less", 3, 1, 2)
    large, small = torch.randn(2, 5, 7, 24), torch.randn(64, 3, 2, 24)
    assert fused.active(large) and not fused.active(small)
    assert not fused.active(torch.empty(2, 5, 7, 24, device="meta"))  # any other device: the reference
    with fused.use_fused(False):
        assert not fused.active(large)
    assert fused.active(large)

    def took_fast_paths(x: torch.Tensor) -> bool:
        names, seen = set(), set()
        todo = [block(x.requires_grad_(True)).sum().grad_fn]
        while todo:
            n = todo.pop()
            if n is not None and n not in seen:  # the nodes themselves: ids of dropped wrappers are reused
                seen.add(n)
                names.add(type(n).__name__)
                todo.extend(f for f, _ in n.next_functions)
        return any(n.startswith("_PreNormMLP") for n in names) and any(n.startswith("_SummaryPools") for n in names)

    assert took_fast_paths(large) and not took_fast_paths(small)


def _mask(B: int, rows: int, cols: int) -> GridMask:
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(B, rows - 1, cols - 1, generator=g) > 0.3
    field = torch.rand(1, 1, cols, cols, generator=g) > 0.4
    field[..., 0] = True
    return grid_mask(valid, field)


def _grads(
    module: nn.Module, x: torch.Tensor, *args: object, fast: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and input gradient (one flat tensor) and the parameters' gradients, fast or reference path."""
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    with fused.use_fused(fast):
        y = module(x, *args)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    assert x.grad is not None
    grads = {n.replace("base.", ""): p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return torch.cat([y.flatten(), x.grad.flatten()]), grads


@pytest.mark.parametrize("masked", [False, True])
def test_folded_pools_are_the_reference_pools(masked: bool) -> None:
    torch.manual_seed(0)
    pool = SummaryPool(24, 3, 6, 12).double()
    x = torch.randn(2, 5, 7, 24, dtype=torch.double)
    mask = _mask(2, 5, 7) if masked else GridMask()
    assert fused.summary_pools(pool, x, mask.spectral_pool, mask.spatial_pool) is not None
    lean = pool(x, mask.spectral_pool, mask.spatial_pool)
    with fused.use_fused(False):
        plain = pool(x, mask.spectral_pool, mask.spatial_pool)
    pool.kv = Wrapped(pool.kv)  # type: ignore[assignment]
    assert fused.summary_pools(pool, x, mask.spectral_pool, mask.spatial_pool) is None  # the reference runs
    for a, b in zip(lean, plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_summary_pools_backward_is_the_derivative(masked: bool, strided: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused pools' hand-written backward pass against finite differences, every input at once, with the
    column pool's gradient added whole (few rows) and column by column (many rows)."""
    monkeypatch.setattr(fused, "_STRIDED_ROWS", 1 if strided else 10**6)
    torch.manual_seed(0)
    B, R, P, D, h = 2, 4, 5, 12, 3
    mask = _mask(B, R, P) if masked else GridMask()
    args = [torch.randn(*shape, dtype=torch.double, requires_grad=True) for shape in
            [(B, R, P, D), (D, D), (D,), (D, D), (D,), (h, D // h, D), (h, D // h, D), (D,)]]
    assert torch.autograd.gradcheck(
        lambda *a: fused._SummaryPools.apply(*a, mask.spectral_pool, mask.spatial_pool), args
    )


def test_pools_with_a_wrapped_query_layer_fold_the_same_way() -> None:
    """A query layer :func:`linear_parts` cannot take apart keeps the fused pools off; the reference pools
    give the same numbers."""
    torch.manual_seed(0)
    pool = SummaryPool(24, 3, 6, 12).double()
    x = torch.randn(2, 5, 7, 24, dtype=torch.double)
    mask = _mask(2, 5, 7)
    lean = pool(x, mask.spectral_pool, mask.spatial_pool)
    pool.q_spatial = Wrapped(pool.q_spatial)  # type: ignore[assignment]
    plain = pool(x, mask.spectral_pool, mask.spatial_pool)
    for a, b in zip(lean, plain):
        torch.testing.assert_close(a, b)
        assert type(b.grad_fn).__name__ != "_SummaryPoolsBackward"


@pytest.mark.parametrize("frozen", [False, True])
def test_mlp_over_many_slices(frozen: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward a few tokens at a time (a last slice short): the modules' numbers."""
    monkeypatch.setattr(fused, "_CHUNK_ELEMENTS", 3 * 64)  # 3 tokens of hidden width 64
    torch.manual_seed(0)
    block = Block(16, "less", 2, 1, 2).double()
    block.mlp.fc1.weight.requires_grad_(not frozen)
    x = torch.randn(2, 5, 16, dtype=torch.double)  # 10 tokens: slices of 3, 3, 3, 1

    class MLP(nn.Module):
        def __init__(self, lean: bool) -> None:
            super().__init__()
            self.norm, self.mlp, self.lean = block.norm2, block.mlp, lean

        def forward(self, xi: torch.Tensor) -> torch.Tensor:
            y = pre_norm_mlp(self.norm, self.mlp, xi) if self.lean else self.mlp(self.norm(xi))
            assert y is not None and type(y.grad_fn).__name__.startswith("_PreNormMLP") == self.lean
            return y

    out_lean, grads_lean = _grads(MLP(True), x)
    out_plain, grads_plain = _grads(MLP(False), x)
    assert grads_lean.keys() == grads_plain.keys() and len(grads_lean) == (5 if frozen else 6)
    for name in grads_lean:
        torch.testing.assert_close(grads_lean[name], grads_plain[name], msg=name)
    torch.testing.assert_close(out_lean, out_plain)


@pytest.mark.parametrize("onednn", [True, False])
def test_mlp_in_fp32_on_either_cpu_matmul(onednn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on CPU: the row-wise products go through oneDNN where PyTorch has it, else ``F.linear``;
    either way the numbers are the modules' (to fp32 rounding); the switch is PyTorch's own flag."""
    monkeypatch.setattr(fused, "_CHUNK_ELEMENTS", 7 * 256)  # 7 tokens a slice, the last one short
    torch.manual_seed(0)
    block = Block(64, "less", 2, 1, 4)
    x = torch.randn(3, 11, 64)

    def run(lean: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        class MLP(nn.Module):
            def forward(self, xi: torch.Tensor) -> torch.Tensor:
                y = pre_norm_mlp(block.norm2, block.mlp, xi) if lean else block.mlp(block.norm2(xi))
                assert y is not None
                return y
        return _grads(MLP(), x)

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    with torch.profiler.profile() as prof:
        out_lean, grads_lean = run(True)
    calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    # forward fc1 and fc2, backward both input gradients: 4 products a slice, 5 slices of the 33 tokens
    assert calls == (4 * 5 if onednn and fused._ONEDNN_LINEAR else 0)
    out_plain, grads_plain = run(False)
    assert grads_lean.keys() == grads_plain.keys()
    for name in grads_lean:
        torch.testing.assert_close(grads_lean[name], grads_plain[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(out_lean, out_plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "heads,rank,d_c,rows,folded", [(3, 1, 4, 9, True), (2, 2, 2, 12, True), (2, 3, 2, 6, False), (2, 8, 2, 3, False)]
)
def test_lean_block_matches_plain_block(heads: int, rank: int, d_c: int, rows: int, folded: bool) -> None:
    """Outputs and every gradient. With few rows and a high rank the projection is cheaper after the
    outer products, so both recombination orders are covered."""
    torch.manual_seed(0)
    dim = heads * d_c * 4
    block = Block(dim, "less", heads, rank, d_c).double()
    attn = block.attn
    assert isinstance(attn, LESSAttention)
    cols = 10
    assert project_spatial_first(attn, rows, cols) == folded
    x = torch.randn(2, rows, cols, dim, dtype=torch.double)
    mask = _mask(2, rows, cols)
    out_lean, grads_lean = _grads(block, x, mask)
    out_plain, grads_plain = _grads(block, x, mask, fast=False)
    torch.testing.assert_close(out_lean, out_plain)
    assert grads_lean.keys() == grads_plain.keys()
    for name in grads_lean:
        torch.testing.assert_close(grads_lean[name], grads_plain[name], msg=name)


def test_adapters_are_never_bypassed() -> None:
    """A wrapped layer that adds ``x·Δᵀ`` (LoRA) gives the block whose plain layers hold ``W + Δ``."""
    torch.manual_seed(0)
    block = Block(24, "less", 3, 1, 2).double()
    merged = Block(24, "less", 3, 1, 2).double()
    merged.load_state_dict(block.state_dict())
    attn, attn_m = block.attn, merged.attn
    assert isinstance(attn, LESSAttention) and isinstance(attn_m, LESSAttention)
    x = torch.randn(2, 5, 7, 24, dtype=torch.double)
    base = block(x)
    for get in (lambda b: b.attn.pool.kv, lambda b: b.attn.proj, lambda b: b.mlp.fc2):
        layer = get(block)
        delta = 0.1 * torch.randn_like(layer.weight)
        with torch.no_grad():
            get(merged).weight += delta
        if layer is attn.pool.kv:
            attn.pool.kv = Wrapped(layer, delta)  # type: ignore[assignment]
        elif layer is attn.proj:
            attn.proj = Wrapped(layer, delta)  # type: ignore[assignment]
        else:
            block.mlp.fc2 = Wrapped(layer, delta)  # type: ignore[assignment]
    torch.testing.assert_close(block(x), merged(x))
    assert not torch.allclose(block(x), base)  # the adapters do change the output


def test_mlp_recomputes_only_when_it_may() -> None:
    torch.manual_seed(0)
    block = Block(16, "less", 2, 1, 2, proj_drop=0.5).double()
    x = torch.randn(3, 16, dtype=torch.double, requires_grad=True)
    block.eval()  # dropout off: the recomputing path, same numbers as the modules
    y = pre_norm_mlp(block.norm2, block.mlp, x)
    assert y is not None and type(y.grad_fn).__name__.startswith("_PreNormMLP")
    torch.testing.assert_close(y, block.mlp(block.norm2(x)))
    block.train()  # dropout between the layers: the modules themselves run
    assert pre_norm_mlp(block.norm2, block.mlp, x) is None
    with torch.no_grad():  # nothing to keep: the modules run
        block.eval()
        assert pre_norm_mlp(block.norm2, block.mlp, x) is None


def _saved_bytes(
    module: nn.Module, x: torch.Tensor, mask: GridMask, parameters: bool = True, fast: bool = True
) -> int:
    """Bytes of distinct storages autograd keeps for the backward pass of ``module(x, mask)`` (without the
    module's parameters when ``parameters`` is false), on the fast or the reference path."""
    seen: dict[int, int] = {}
    skip = set() if parameters else {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused.use_fused(fast):
        module(x, mask)
    return sum(seen.values())


def test_lean_block_keeps_half_of_what_the_plain_block_keeps() -> None:
    """What one block keeps for the backward pass at C = 200 (grid 201 × 65, D 192): the reference keeps
    the keys and values, the outer products, the normed MLP input and the MLP activation (15.3 grids of
    201 × 65 × D); the lean block keeps its input, its normed input, the MLP input and the hidden
    pre-activation (4 + 1 + 1 + 1 = 7, and ~0.4 of small tensors)."""
    torch.manual_seed(0)
    block = Block(192, "less", 3, 1, 4)
    x = torch.randn(1, 201, 65, 192)
    mask = GridMask()
    lean = _saved_bytes(block, x, mask)
    plain = _saved_bytes(block, x, mask, fast=False)
    token_grid = x.numel() * 4
    assert lean <= 7.6 * token_grid, lean / token_grid
    assert lean <= 0.5 * plain, (lean / token_grid, plain / token_grid)


def test_folded_projection_keeps_no_spatial_factor() -> None:
    """At C = 13 the folded projection's spatial factor ([r·h·d_c + 1, (N+1)·D] per sample) is most of a grid;
    it is remade in the backward pass, so the attention keeps its input and small tensors only."""
    torch.manual_seed(0)
    attn = Block(192, "less", 3, 1, 4).attn
    assert isinstance(attn, LESSAttention) and project_spatial_first(attn, 14, 65)
    x = torch.randn(2, 14, 65, 192)
    kept = _saved_bytes(attn, x, GridMask(), parameters=False)
    assert kept <= 2.0 * x.numel() * 4, kept / (x.numel() * 4)  # the input (1 grid) and ~0.85 of small tensors


def test_block_flops_count_the_reference_and_the_fast_path_does_fewer() -> None:
    """``flops()`` is the model's count: the reference path's, exactly. The folded pools and projection do
    less work for the same numbers."""
    torch.manual_seed(0)
    block = Block(48, "less", 3, 2, 2).eval()
    x = torch.randn(2, 6, 9, 48)
    measured = {}
    for fast in (False, True):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad(), \
                fused.use_fused(fast):
            block(x)
        measured[fast] = counter.get_total_flops()
    assert abs(2 * block.flops(6, 9) - measured[False]) / measured[False] < 1e-9
    assert measured[True] < 0.9 * measured[False]


# ------------------------------------------------------------------------------------------------
# LoRA-wrapped layers (peft) take the lean paths with their low-rank updates


LORA_TARGETS = r"attn\.(?:pool\.kv|pool\.q_spectral|proj|spectral\.qkv)|mlp\.fc[12]"


def _lora_block(dim: int = 24, heads: int = 3, rank: int = 1, d_c: int = 2, **lora: object) -> nn.Module:
    """A LESS block with peft LoRA adapters (B random, so they change the output) on the rewritten layers."""
    import peft

    torch.manual_seed(0)
    block = Block(dim, "less", heads, rank, d_c).double()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False, **lora)
    return peft.inject_adapter_in_model(cfg, block)


@pytest.mark.parametrize("rows,folded", [(9, True), (3, False)])
def test_lora_layers_take_the_lean_paths_with_the_same_numbers(rows: int, folded: bool) -> None:
    """Outputs and the gradients of the input and of every adapter factor, lean vs reference, both
    recombination orders; the frozen base weights get no gradient on either path."""
    block = _lora_block(rank=2 if folded else 8)
    attn = block.attn
    assert isinstance(attn, LESSAttention)
    parts = linear_parts(attn.pool.kv)
    assert parts is not None and parts.down is not None
    assert project_spatial_first(attn, rows, 10) == folded
    x = torch.randn(2, rows, 10, 24, dtype=torch.double)
    mask = _mask(2, rows, 10)
    out_lean, grads_lean = _grads(block, x, mask)
    assert {n for n in grads_lean if "lora_" not in n} == set()  # only adapters train
    out_plain, grads_plain = _grads(block, x, mask, fast=False)
    torch.testing.assert_close(out_lean, out_plain)
    assert grads_lean.keys() == grads_plain.keys() and len(grads_lean) == 2 * 6
    for name in grads_lean:
        torch.testing.assert_close(grads_lean[name], grads_plain[name], msg=name)


def test_lora_mlp_takes_the_recomputing_path() -> None:
    block = _lora_block()
    x = torch.randn(3, 24, dtype=torch.double, requires_grad=True)
    y = pre_norm_mlp(block.norm2, block.mlp, x)
    assert type(y.grad_fn).__name__.startswith("_PreNormMLP")
    torch.testing.assert_close(y, block.mlp(block.norm2(x)))


def test_lora_layers_peft_computes_otherwise_run_as_modules() -> None:
    """Dropout on the adapter input while training, DoRA, a merged layer: the module runs, nothing is bypassed."""
    dropped = _lora_block(lora_dropout=0.5)
    assert linear_parts(dropped.mlp.fc1) is None
    dropped.eval()  # no dropout in eval: the lean path again
    assert linear_parts(dropped.mlp.fc1) is not None
    assert linear_parts(_lora_block(use_dora=True).mlp.fc1) is None
    merged = _lora_block()
    merged.mlp.fc1.merge()
    assert linear_parts(merged.mlp.fc1) is None


def test_a_lora_block_keeps_half_of_what_the_lean_block_keeps() -> None:
    """At C = 200 (grid 201 × 65, D 192) a LoRA block keeps its input, the normed input, the MLP input and
    small tensors (~3.5 grids): its frozen MLP recomputes the hidden pre-activation (4 grids) rather than
    keep it, and the rank-wide intermediates are small; the plain paths kept ~15."""
    import peft

    torch.manual_seed(0)
    block = Block(192, "less", 3, 1, 4)
    x = torch.randn(1, 201, 65, 192)
    lean = _saved_bytes(block, x, GridMask())
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)
    lora = _saved_bytes(peft.inject_adapter_in_model(cfg, block), x, GridMask())
    assert lora <= 0.55 * lean, lora / lean
    assert lora <= 3.8 * x.numel() * 4, lora / (x.numel() * 4)


@pytest.mark.parametrize("frozen", [False, True])
def test_recomputing_mlp_under_autocast(frozen: bool) -> None:
    """bf16 autocast on the CPU: the recomputing MLP (hidden pre-activation kept, or recomputed when fc1 is
    frozen) gives the modules' output and gradients to bf16 rounding."""
    torch.manual_seed(0)
    block = Block(32, "less", 2, 1, 2)
    block.mlp.fc1.weight.requires_grad_(not frozen)
    x = torch.randn(4, 6, 32)

    def run(fused: bool) -> list[torch.Tensor]:
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = pre_norm_mlp(block.norm2, block.mlp, xi) if fused else block.mlp(block.norm2(xi))
        assert type(y.grad_fn).__name__.startswith("_PreNormMLP") == fused
        if fused and not frozen:  # the kept hidden pre-activation is in the dtype autocast gives fc1
            assert y.grad_fn.saved_tensors[-1].dtype == torch.bfloat16  # type: ignore[union-attr]
        (y.float() * torch.linspace(-1, 1, 32)).sum().backward()
        grads = [p.grad for p in (block.norm2.weight, block.mlp.fc1.weight, block.mlp.fc2.weight) if p.grad is not None]
        assert xi.grad is not None
        return [y.float(), xi.grad, *grads]

    fused, plain = run(True), run(False)
    assert len(fused) == len(plain) == (4 if frozen else 5)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------------------------------------
# bf16 autocast: the whole block, fast against reference


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("rows", [14, 3])
def test_block_under_bf16_autocast_matches_the_reference(lora: bool, rows: int) -> None:
    """fp32 weights under CPU bf16 autocast, as pretraining and fine-tuning run: output and every gradient of
    the fast block agree with the reference block's to bf16 rounding, with and without LoRA, both
    recombination orders."""
    if lora:
        block = _lora_block(dim=48, heads=3, rank=2 if rows > 3 else 8, d_c=2).float()
    else:
        torch.manual_seed(0)
        block = Block(48, "less", 3, 2 if rows > 3 else 8, 2)
    x = torch.randn(2, rows, 10, 48)
    mask = _mask(2, rows, 10)
    results = []
    for fast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_grads(block, x, mask, fast=fast))
    (out_fast, grads_fast), (out_ref, grads_ref) = results
    assert grads_fast.keys() == grads_ref.keys() and grads_fast
    assert _cosine(out_fast, out_ref) > 0.999
    for name in grads_fast:
        assert _cosine(grads_fast[name], grads_ref[name]) > 0.99, name
