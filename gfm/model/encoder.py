"""The LESS ViT encoder: any band set, any sensor mix, any tile size, on one token grid.

``forward_features`` embeds a :class:`~gfm.batch.Batch` into the ``[B, C+1, N+1, D]`` grid
(summary row, summary column, CLS; see :mod:`gfm.model.embed`) and runs the blocks;
``forward_intermediates`` returns per-position feature maps for segmentation necks;
``forward_head`` maps the CLS token to logits. :class:`~gfm.model.mae.HyperMAE` reuses
:meth:`LESSViT.embed` and :meth:`LESSViT.forward_tokens` on the visible part of the grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from gfm.batch import Batch
from gfm.model.attention import Block, GridMask, make_grid_mask
from gfm.model.embed import (
    Descriptors,
    KindEmbedding,
    PatchEmbed,
    PosChanEmbed,
    SpectralGroups,
    SpectralPatchEmbed,
    TileMeta,
    add_summary_tokens,
    grid_coords,
    group_descriptors,
    known,
    pad_to_multiple,
    patchify,
    spectral_groups,
)
from gfm.sensors import KIND_CODE

#: LayerNorm with the epsilon ViTs use (encoder and decoder alike).
DEFAULT_NORM: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6)  # type: ignore[assignment]

Inputs = Batch | Mapping[str, torch.Tensor]


def as_batch(inputs: Inputs) -> Batch:
    """A :class:`Batch` from a Batch or a mapping of its tensor fields.

    Only ``pixels [B, C, H, W]`` and ``wavelength [B, C]`` are required in a mapping; missing fields
    are unknown (bandwidth, time and GSD NaN, no location, no sensor ids), except kind (reflectance)
    and valid (every pixel). Unknown values get the model's learned "unknown" embeddings.
    """
    if isinstance(inputs, Batch):
        return inputs
    try:
        pixels, wavelength = inputs["pixels"], inputs["wavelength"]
    except KeyError as e:
        raise KeyError(f"model inputs need {e.args[0]!r}; got {sorted(inputs)}") from None
    B, C = pixels.shape[:2]

    def get(name: str, default: torch.Tensor) -> torch.Tensor:
        return inputs[name] if name in inputs else default

    return Batch(
        pixels=pixels,
        wavelength=wavelength,
        bandwidth=get("bandwidth", torch.full_like(wavelength, math.nan)),
        kind=get("kind", torch.full((B, C), KIND_CODE["reflectance"], dtype=torch.long, device=pixels.device)),
        time=get("time", torch.full_like(wavelength, math.nan)),
        valid=get("valid", torch.ones(pixels.shape, dtype=torch.bool, device=pixels.device)),
        gsd=get("gsd", torch.full((B,), math.nan, device=pixels.device)),
        lonlat=inputs.get("lonlat"),
        sensor=inputs.get("sensor"),
    )


@dataclass
class Tokens:
    """The embedded token grid of a batch and what is needed to read it back.

    Attributes:
        x: ``[B, G+1, N+1, D]`` tokens with the positional-channel-metadata embedding added.
        coords: ``[B, N, 2]`` patch offsets in metres (row, col).
        pitch: ``[B]`` metres between neighbouring patches (``p ×`` GSD, the nominal GSD when unknown).
        desc: token-row descriptors ``[B, G]`` (after spectral grouping).
        tile: the per-tile metadata (location, GSD; NaN = unknown).
        groups: which observation fills which slot of which row (spectral patching).
        pixels: ``[B, G·s, H', W']`` input padded to whole patches and grouped, invalid pixels zeroed.
        valid: ``[B, G·s, H', W']`` bool, False on invalid, padded and empty-slot pixels.
        token_valid: ``[B, G, N]`` bool, True where the token holds at least one valid pixel.
        grid_hw: ``(h, w)`` patch grid, ``N = h·w``.
        image_hw: ``(H, W)`` before padding.
        num_obs: observations ``C`` of the input before spectral grouping.
    """

    x: torch.Tensor
    coords: torch.Tensor
    pitch: torch.Tensor
    desc: Descriptors
    tile: TileMeta
    groups: SpectralGroups
    pixels: torch.Tensor
    valid: torch.Tensor
    token_valid: torch.Tensor
    grid_hw: tuple[int, int]
    image_hw: tuple[int, int]
    num_obs: int


class LESSViT(nn.Module):
    """LESS ViT encoder (or its dense joint-attention counterpart, ``attention="dense"``).

    Args:
        embed_dim: token width ``D`` (multiple of 4 and of ``num_heads·spectral_head_dim``).
        depth: number of blocks.
        num_heads: ``h`` (LESS and dense); head width ``D/h = d_c·d_s``.
        rank: LESS rank ``r``: Kronecker terms per head (1 = one spectral ⊗ spatial product per head).
        spectral_head_dim: ``d_c``; spatial head width ``d_s = D / (h·d_c)``.
        mlp_ratio: MLP hidden width / ``D``.
        patch_size: ``p``.
        spectral_patch: ``s``: up to ``s`` consecutive observations of one sensor, date and kind per
            token (1 = one token per band).
        patch_embed: ``"linear"`` (one linear map of the ``s·p²`` slot values, :class:`PatchEmbed`) or
            ``"spectral"`` (per-band weights made from wavelength and bandwidth,
            :class:`~gfm.model.embed.SpectralPatchEmbed`: a band counts by what it measures, not by its slot).
        attention: ``"less"`` or ``"dense"``.
        perception_radius_m: spatial attention radius in metres (0 = global attention).
        finest_gsd_m: the finest GSD the model is meant for; the shortest position period is two patch
            pitches at it (``2·p·finest_gsd_m``), so no position code aliases.
        nominal_gsd_m: the GSD used for positions and the perception field when a tile's GSD is
            unknown (the GSD embedding then says "unknown", so this is never silent).
        qkv_bias, qk_norm: attention options.
        drop_path: stochastic depth at the last block (linear ramp from 0).
        attn_drop: dropout on attention weights.
        proj_drop: dropout after attention projections and in MLPs.
        init_values: LayerScale initial value (None = off).
        num_classes: classes of the CLS head (0 = no head, ``forward_head`` returns features).
        norm_layer, act_layer: normalisation and activation types.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        rank: int = 1,
        spectral_head_dim: int = 4,
        mlp_ratio: float = 4.0,
        patch_size: int = 8,
        spectral_patch: int = 1,
        patch_embed: str = "linear",
        attention: str = "less",
        perception_radius_m: float = 640.0,
        finest_gsd_m: float = 10.0,
        nominal_gsd_m: float = 10.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        init_values: float | None = None,
        num_classes: int = 0,
        norm_layer: type[nn.Module] = DEFAULT_NORM,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if not (finest_gsd_m > 0 and nominal_gsd_m > 0):
            raise ValueError(f"finest_gsd_m and nominal_gsd_m must be positive, got {finest_gsd_m}, {nominal_gsd_m}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.spectral_patch = spectral_patch
        self.attention = attention
        self.perception_radius_m = perception_radius_m
        self.finest_gsd_m = finest_gsd_m
        self.nominal_gsd_m = nominal_gsd_m
        self.num_classes = num_classes
        self.grad_checkpointing = False
        #: block settings a decoder built around this encoder reuses (the authors share them)
        self.block_options = dict(
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop, proj_drop=proj_drop,
            init_values=init_values, norm_layer=norm_layer, act_layer=act_layer,
        )
        self.drop_path = drop_path
        self.norm_layer = norm_layer
        self.act_layer = act_layer

        if patch_embed not in ("linear", "spectral"):
            raise ValueError(f"patch_embed must be 'linear' or 'spectral', got {patch_embed!r}")
        self.patch_embed_kind = patch_embed
        self.patch_embed: PatchEmbed | SpectralPatchEmbed = (
            SpectralPatchEmbed(patch_size, embed_dim, spectral_patch) if patch_embed == "spectral"
            else PatchEmbed(patch_size, embed_dim, spectral_patch)
        )
        self.pos_chan_embed = PosChanEmbed(embed_dim, self.shortest_period_m, act_layer=act_layer)
        self.cls_token = nn.Parameter(torch.zeros(embed_dim))
        self.row_token = nn.Parameter(torch.zeros(embed_dim))  # summary row: one per position
        self.col_token = nn.Parameter(torch.zeros(embed_dim))  # summary column: one per token row
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                attention,
                num_heads,
                rank,
                spectral_head_dim,
                drop_path=drop_path * i / max(depth - 1, 1),
                **self.block_options,  # type: ignore[arg-type]
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def shortest_period_m(self) -> float:
        """Shortest position period: two patch pitches at the finest GSD."""
        return 2.0 * self.patch_size * self.finest_gsd_m

    def init_weights(self) -> None:
        """The one place weights are initialised: :func:`init_module_weights`, N(0, 0.02) tokens."""
        init_module_weights(self)
        for token in (self.cls_token, self.row_token, self.col_token):
            nn.init.normal_(token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (activation checkpointing)."""
        self.grad_checkpointing = enable

    # --------------------------------------------------------------------------------------------
    # Embedding

    def embed(self, inputs: Inputs) -> Tokens:
        """Embed a batch into the token grid ``[B, G+1, N+1, D]`` (see :class:`Tokens`)."""
        batch = as_batch(inputs)
        p, s = self.patch_size, self.spectral_patch
        valid = batch.valid & torch.isfinite(batch.pixels)
        pixels = torch.where(valid, batch.pixels, torch.zeros_like(batch.pixels))  # fill never reaches a token
        image_hw = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        pixels, valid = pad_to_multiple(pixels, valid, p)
        groups = spectral_groups(batch.kind, batch.time, batch.sensor, s)
        pixels, valid = groups.group(pixels, 0.0), groups.group(valid, False)
        grid_hw = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        desc = group_descriptors(batch.wavelength, batch.bandwidth, batch.kind, batch.time, groups)
        gsd = batch.gsd.float()
        pitch = p * torch.where(known(gsd), gsd, torch.full_like(gsd, self.nominal_gsd_m))
        lonlat = batch.lonlat if batch.lonlat is not None else gsd.new_full((gsd.shape[0], 2), math.nan)
        tile = TileMeta(lonlat.float(), gsd)
        coords = grid_coords(grid_hw, pitch)
        token_valid = patchify(valid, p, s).any(dim=-1)  # [B, G, N]
        if isinstance(self.patch_embed, SpectralPatchEmbed):
            patches = self.patch_embed(pixels, groups.group(batch.wavelength, math.nan),
                                       groups.group(batch.bandwidth, math.nan), groups.filled)
        else:
            patches = self.patch_embed(pixels)
        x = add_summary_tokens(patches, self.cls_token, self.row_token, self.col_token)
        # the residual stream in the weights' dtype: fp32 under autocast over fp32 weights (as timm's ViTs
        # keep it; blocks add their bf16 outputs to it), bf16 with bf16 weights
        dtype = self.cls_token.dtype
        x = x.to(dtype) + self.pos_chan_embed(coords, pitch, desc, tile).to(dtype)
        return Tokens(x, coords, pitch, desc, tile, groups, pixels, valid, token_valid, grid_hw, image_hw,
                      int(batch.pixels.shape[1]))

    def num_rows(self, inputs: Inputs) -> int:
        """``G``, the token rows this encoder makes of a batch's observations (after spectral grouping)."""
        batch = as_batch(inputs)
        return spectral_groups(batch.kind, batch.time, batch.sensor, self.spectral_patch).num_groups

    def grid_mask(
        self, token_valid: torch.Tensor, pitch: torch.Tensor, grid_hw: tuple[int, int],
        positions: torch.Tensor | None = None,
    ) -> GridMask:
        """The encoder's :class:`~gfm.model.attention.GridMask` (perception field, invalid tokens)."""
        return make_grid_mask(token_valid, pitch, grid_hw, self.perception_radius_m, positions)

    # --------------------------------------------------------------------------------------------
    # Blocks

    def forward_tokens(
        self,
        x: torch.Tensor,
        mask: GridMask | None = None,
        indices: Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks on a token grid.

        Args:
            x: ``[B, G+1, N+1, D]`` embedded tokens (any subset of rows and positions).
            mask: what may attend what (:meth:`grid_mask`); None = everything.
            indices: blocks whose outputs to keep (0-based).

        Returns:
            The final-norm tokens ``[B, G+1, N+1, D]`` and the kept block outputs (un-normed).
        """
        kept = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
            if i in indices:
                kept.append(x)
        return self.norm(x), kept

    def forward_features(self, inputs: Inputs) -> torch.Tensor:
        """Batch → normalised token grid ``[B, G+1, N+1, D]`` (``[:, 0, 0]`` is CLS)."""
        tokens = self.embed(inputs)
        mask = self.grid_mask(tokens.token_valid, tokens.pitch, tokens.grid_hw)
        return self.forward_tokens(tokens.x, mask)[0]

    def forward_intermediates(
        self,
        inputs: Inputs,
        indices: int | Sequence[int] = 4,
        norm: bool = False,
        reduce: str = "summary",
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-position feature maps from chosen blocks, for segmentation necks (timm convention).

        Args:
            inputs: the batch.
            indices: an int ``n`` for the last ``n`` blocks, or block indices (negative from the end).
            norm: apply the final norm to each intermediate.
            reduce: how to fold the observation axis: ``"summary"`` (the summary-row token of each
                position) or ``"mean"`` (the mean over observation tokens).
            output_fmt: ``"NCHW"`` → ``[B, D, h, w]`` each, ``"NLC"`` → ``[B, N, D]`` each.
            intermediates_only: return only the list.

        Returns:
            The intermediates, or ``(final token grid [B, C+1, N+1, D], intermediates)``.
        """
        depth = len(self.blocks)
        chosen = list(range(depth - indices, depth)) if isinstance(indices, int) else [i % depth for i in indices]
        tokens = self.embed(inputs)
        mask = self.grid_mask(tokens.token_valid, tokens.pitch, tokens.grid_hw)
        final, kept = self.forward_tokens(tokens.x, mask, chosen)
        h, w = tokens.grid_hw
        maps = []
        for x in kept:
            x = self.norm(x) if norm else x
            x = x[:, 0, 1:] if reduce == "summary" else x[:, 1:, 1:].mean(dim=1)  # [B, N, D]
            maps.append(rearrange(x, "b (h w) d -> b d h w", h=h, w=w) if output_fmt == "NCHW" else x)
        return maps if intermediates_only else (final, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token grid ``[B, C+1, N+1, D]`` → logits ``[B, num_classes]`` from CLS (or CLS ``[B, D]``)."""
        cls = x[:, 0, 0]
        return cls if pre_logits else self.head(cls)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Batch → logits ``[B, num_classes]`` (CLS features ``[B, D]`` when ``num_classes == 0``)."""
        return self.forward_head(self.forward_features(inputs))

    # --------------------------------------------------------------------------------------------
    # Accounting

    def grid_size(self, num_obs: int, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """Token rows ``G`` and positions ``N`` for ``num_obs`` observations of ``img_size`` pixels.

        ``G = ⌈C/s⌉``: exact when the observations form one run of one sensor, date and kind, a lower
        bound otherwise (each run starts a new group).
        """
        H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
        p, s = self.patch_size, self.spectral_patch
        return -(-num_obs // s), -(-H // p) * -(-W // p)

    def flops_tokens(self, rows: int, positions: int, with_embed: bool = True) -> int:
        """Forward matmul FLOPs of one sample with ``rows`` token rows and ``positions`` positions.

        The embedding's share excludes the spectral patch weights' generator, which runs once per batch
        (:meth:`generator_flops`).
        """
        flops = sum(block.flops(rows + 1, positions + 1) for block in self.blocks)  # type: ignore[operator]
        if with_embed:
            flops += self.embed_flops(rows, positions)
        return flops

    def embed_flops(self, rows: int, positions: int) -> int:
        """Forward matmul FLOPs of the patch and positional-channel embeddings of one sample (generator aside)."""
        return self.patch_embed.flops(rows * positions) + self.pos_chan_embed.flops(rows)

    def generator_flops(self, num_obs: int) -> int:
        """Forward FLOPs of making the spectral patch weights of a batch whose samples share their bands.

        :meth:`SpectralPatchEmbed.slot_weights` runs the generator once per distinct band: ``num_obs`` of
        them, plus one for the empty slots that pad the last group. 0 for a linear patch embedding.
        """
        if not isinstance(self.patch_embed, SpectralPatchEmbed):
            return 0
        rows = self.grid_size(num_obs, 1)[0]
        distinct = num_obs + (rows * self.spectral_patch > num_obs)
        return self.patch_embed.flops(0, distinct)

    def flops(self, batch_size: int, num_obs: int, img_size: int | tuple[int, int]) -> int:
        """Analytic forward FLOPs (matmuls and attention, 2 per multiply-add) of a batch.

        Elementwise work (norms, activations, softmax) is left out, as in MFU accounting; a
        training step costs about 3× this. The samples are taken to share their bands (as a batch of
        one sensor does: the spectral patch weights are made once, :meth:`generator_flops`).
        """
        rows, positions = self.grid_size(num_obs, img_size)
        flops = self.flops_tokens(rows, positions)
        if isinstance(self.head, nn.Linear):
            flops += 2 * self.head.in_features * self.head.out_features
        return batch_size * flops + self.generator_flops(num_obs)

    def num_params(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())


def init_module_weights(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for linears, unit/zero norms, N(0, 0.02) embeddings."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, KindEmbedding):
            m.reset_parameters(std=0.02)  # the reserved rows stay zero
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

