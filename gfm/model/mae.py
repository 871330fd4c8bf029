"""HyperMAE: masked autoencoding over positions *and* observations on the LESS token grid.

Per sample, positional masking hides a fraction of the ``N`` patch positions and observation
masking a fraction of the ``G`` token rows (keeping at least ``min_obs_keep``); the encoder sees the
visible product grid only (kept rows × kept positions, plus their summary tokens and CLS). A light
LESS decoder puts mask tokens back in every hidden cell, re-embeds the full grid with its own
positional-channel embedding, and predicts the ``s·p²`` pixels of every token. The loss has the
paper's two terms, each a mean squared error over **valid pixels only** (nodata, cloud and padding
never teach the model to predict fill):

- ``loss_pos``: every row (kept or hidden) at hidden positions;
- ``loss_obs``: hidden rows at every position;

so a hidden row at a hidden position counts in both, as in the authors' ``calculate_modal_loss``.
Each term is computed per modality group (optical, thermal, SAR, index: :data:`KIND_GROUP`) and the
groups present are averaged with their weights, so in a Sentinel-1 + Sentinel-2 batch the two radar
bands weigh as much as the ten optical ones (``loss_balance="pixel"`` pools all pixels instead). The
authors average over "optical" and "radar" told apart by channel position; grouping by observation
kind, valid-pixel weighting and the group weights are gfm's.

During pretraining each kind of metadata (location, date, GSD, bandwidth) is hidden per sample with
its own probability (:data:`METADATA_DROPOUT`, gfm extension), so the model's learned "unknown"
embeddings are trained on purpose rather than by accident.

``forward`` reads ``drop_metadata → embed → forward_encoder → forward_decoder → forward_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from gfm.batch import Batch, pixels_as_samples
from gfm.model.attention import Block, make_grid_mask
from gfm.model.embed import PosChanEmbed, SpectralGroups, patchify, unpatchify
from gfm.model.encoder import Inputs, LESSViT, Tokens, as_batch, init_module_weights
from gfm.sensors import KINDS

#: Added to per-patch variance before normalising targets (as in MAE).
NORM_PIX_EPS = 1e-6

#: Modality groups the loss is balanced over, and the group of each observation kind.
LOSS_GROUPS: tuple[str, ...] = ("optical", "thermal", "sar", "index", "quality")
KIND_GROUP: dict[str, str] = {
    "reflectance": "optical", "thermal": "thermal", "sar_vv": "sar", "sar_vh": "sar", "sar_hh": "sar",
    "sar_hv": "sar", "index": "index", "quality": "quality",
}
#: Probability that pretraining hides each kind of metadata of a sample (Clay hides 20 % of dates and
#: locations); GSD and bandwidth less often, since hiding the GSD also hides the metric scale.
METADATA_DROPOUT: dict[str, float] = {"location": 0.2, "time": 0.2, "gsd": 0.1, "bandwidth": 0.1}


def keep_count(length: int, mask_ratio: float, minimum: int = 1) -> int:
    """Items kept of ``length`` when ``mask_ratio`` are hidden: ``⌊length·(1 - ratio)⌋``, at least ``minimum``.

    Floor, as the authors' ``int(L * (1 - ratio))`` (a tolerance keeps ``16 · 0.25`` from flooring to 3).
    Never more than ``length``.
    """
    return min(length, max(minimum, math.floor(length * (1 - mask_ratio) + 1e-9)))


def drop_metadata(batch: Batch, probs: Mapping[str, float], generator: torch.Generator | None = None) -> Batch:
    """Hide each kind of metadata of each sample with its probability in ``probs``.

    Kinds: ``location`` (lonlat → NaN), ``time`` (every observation's date → NaN), ``gsd`` (→ NaN) and
    ``bandwidth`` (every observation's → NaN). Pixels are untouched. Draws ``[B, 4]`` uniforms from
    ``generator`` (on its device) for reproducibility.
    """
    B = batch.size
    device = batch.pixels.device
    noise_device = generator.device if generator is not None else device
    u = torch.rand(B, 4, generator=generator, device=noise_device).to(device)
    hide = u < torch.tensor([probs.get(k, 0.0) for k in ("location", "time", "gsd", "bandwidth")], device=device)
    nan = torch.tensor(math.nan, device=device)
    lonlat = batch.lonlat if batch.lonlat is not None else torch.full((B, 2), math.nan, device=device)
    return replace(
        batch,
        lonlat=torch.where(hide[:, 0:1], nan, lonlat.float()),
        time=torch.where(hide[:, 1:2], nan, batch.time),
        gsd=torch.where(hide[:, 2], nan, batch.gsd.float()),
        bandwidth=torch.where(hide[:, 3:4], nan, batch.bandwidth),
    )


@dataclass
class MAEOutput:
    """What one HyperMAE forward returns.

    ``G`` = token rows (observations grouped by ``s``), ``N`` = positions, ``P = s·p²`` pixels per
    token, ``K`` = :data:`LOSS_GROUPS`.

    Attributes:
        loss: scalar, ``loss_pos + loss_obs``.
        loss_pos: scalar, every row at hidden positions (valid pixels only, balanced over groups).
        loss_obs: scalar, hidden rows at every position (valid pixels only, balanced over groups).
        group_loss_pos, group_loss_obs: ``[K]`` each term per modality group (0 where it has no pixel).
        group_pixels_pos, group_pixels_obs: ``[K]`` valid pixels behind each group's term.
        pred: ``[B, G, N, P]`` prediction for every token (in normalised-target units when
            ``norm_pix_loss``).
        target: ``[B, G, N, P]`` the (normalised) target.
        weight: ``[B, G, N, P]`` float, 1 on valid pixels, 0 on invalid, padded or empty-slot ones.
        pos_mask: ``[B, N]`` bool, True = position hidden from the encoder.
        obs_mask: ``[B, G]`` bool, True = token row hidden from the encoder.
        patch_mean, patch_std: ``[B, G, N, 1]`` per-token statistics that undo the target
            normalisation (0 and 1 without ``norm_pix_loss``).
        row_group: ``[B, G]`` loss group index of each token row.
        groups: which observation fills which slot of which row.
        patch_size, spectral_patch, grid_hw, image_hw, num_obs: to turn tokens back into images.
    """

    loss: torch.Tensor
    loss_pos: torch.Tensor
    loss_obs: torch.Tensor
    group_loss_pos: torch.Tensor
    group_loss_obs: torch.Tensor
    group_pixels_pos: torch.Tensor
    group_pixels_obs: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    pos_mask: torch.Tensor
    obs_mask: torch.Tensor
    patch_mean: torch.Tensor
    patch_std: torch.Tensor
    row_group: torch.Tensor
    groups: SpectralGroups
    patch_size: int
    spectral_patch: int
    grid_hw: tuple[int, int]
    image_hw: tuple[int, int]
    num_obs: int

    @property
    def token_mask(self) -> torch.Tensor:
        """``[B, G, N]`` bool, True where the token was reconstructed (masked position or row)."""
        return self.pos_mask[:, None, :] | self.obs_mask[:, :, None]

    def group_losses(self) -> dict[str, float]:
        """``loss_pos + loss_obs`` of each modality group present in the batch (a host sync; for logs)."""
        present = (self.group_pixels_pos + self.group_pixels_obs) > 0
        total = self.group_loss_pos + self.group_loss_obs
        return {name: float(total[k]) for k, name in enumerate(LOSS_GROUPS) if bool(present[k])}

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token values ``[B, G, N, P]`` → image ``[B, C, H, W]`` (groups undone, padding cropped off)."""
        image = self.groups.ungroup(unpatchify(tokens, self.patch_size, self.grid_hw, self.spectral_patch))
        H, W = self.image_hw
        return image[:, :, :H, :W]

    def reconstruction(self, paste_visible: bool = True) -> torch.Tensor:
        """Predicted pixels ``[B, C, H, W]`` in input units; visible tokens pasted from the input."""
        pred = self.pred.detach() * self.patch_std + self.patch_mean
        if paste_visible:
            original = self.target * self.patch_std + self.patch_mean
            pred = torch.where(self.token_mask[..., None], pred, original)
        return self.unpatchify(pred)

    def masked_pixels(self) -> torch.Tensor:
        """``[B, C, H, W]`` bool, True where the pixel was hidden from the encoder."""
        P = self.pred.shape[-1]
        return self.unpatchify(self.token_mask[..., None].expand(-1, -1, -1, P).float()) > 0.5


def random_keep(
    batch_size: int, length: int, keep: int, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``keep`` of ``length`` indices per sample: ``(ids_keep [B, keep] sorted, mask [B, L] bool)``.

    ``mask`` is True on dropped indices. Noise is drawn on the generator's device for reproducibility.
    """
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, length, generator=generator, device=noise_device).to(device)
    ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(batch_size, length, dtype=torch.bool, device=device).scatter(1, ids_keep, False)
    return ids_keep, mask


def _with_summary(ids: torch.Tensor) -> torch.Tensor:
    """Grid indices of kept rows/positions ``[B, L]`` plus the summary index 0 → ``[B, L+1]``."""
    return F.pad(ids + 1, (1, 0))


def take_grid(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The visible sub-grid, summaries and CLS kept.

    ``x: [B, G+1, N+1, D]``, kept ``rows: [B, Lc]`` and ``cols: [B, Lp]`` (0-based, summaries
    excluded) → ``[B, Lc+1, Lp+1, D]``.
    """
    rows, cols = _with_summary(rows), _with_summary(cols)
    x = x.gather(1, repeat(rows, "b r -> b r n d", n=x.shape[2], d=x.shape[3]))
    return x.gather(2, repeat(cols, "b c -> b r c d", r=x.shape[1], d=x.shape[3]))


def fill_grid(
    visible: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, fill: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`take_grid`: the full grid with ``fill`` in the hidden cells.

    ``visible: [B, Lc+1, Lp+1, D]`` scattered into a ``shape = (G+1, N+1)`` grid whose other cells
    hold ``fill: [D]`` → ``[B, G+1, N+1, D]``.
    """
    B, kept_rows, _, D = visible.shape
    rows, cols = _with_summary(rows), _with_summary(cols)
    part = fill.expand(B, kept_rows, shape[1], D).scatter(2, repeat(cols, "b c -> b r c d", r=kept_rows, d=D), visible)
    return fill.expand(B, shape[0], shape[1], D).scatter(1, repeat(rows, "b r -> b r n d", n=shape[1], d=D), part)


class HyperMAE(nn.Module):
    """Masked autoencoder around a :class:`~gfm.model.encoder.LESSViT`.

    The decoder's blocks take the encoder's block settings (MLP ratio, dropouts, LayerScale, norm
    and activation types, drop-path ramp), as the authors' decoder does.

    Args:
        encoder: the encoder (its ``num_classes`` should be 0).
        decoder_dim: decoder width ``D_dec``.
        decoder_depth: decoder LESS blocks.
        decoder_num_heads: decoder heads ``h``.
        decoder_rank: decoder LESS rank ``r``.
        decoder_spectral_head_dim: decoder ``d_c``.
        decoder_perception_radius_m: decoder perception field (None = the encoder's).
        mask_ratio: fraction of positions hidden per sample.
        obs_mask_ratio: fraction of token rows hidden per sample.
        min_obs_keep: token rows always kept (fewer when the input has fewer).
        norm_pix_loss: targets normalised per token over its valid pixels.
        loss_balance: ``"group"`` (each term averaged over the modality groups present, with
            ``loss_group_weights``) or ``"pixel"`` (all valid pixels pooled).
        loss_group_weights: weight per :data:`LOSS_GROUPS` name (missing names weigh 1).
        metadata_dropout: probability of hiding each kind of metadata during training
            (:data:`METADATA_DROPOUT` keys; missing keys take its defaults).
        context: ``"tile"`` (each tile a sample: hidden positions and rows) or ``"pixel"`` (each valid pixel
            of a tile its own one-position sample, :func:`gfm.batch.pixels_as_samples`: only rows are
            hidden, and the model learns to infer a pixel's hidden bands from the bands it shows). Pixel
            context is the regime of per-pixel fine-tuning (``head.context: pixel``), whose encoder sees
            each pixel alone.
    """

    def __init__(
        self,
        encoder: LESSViT,
        *,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 2,
        decoder_rank: int = 1,
        decoder_spectral_head_dim: int = 4,
        decoder_perception_radius_m: float | None = None,
        mask_ratio: float = 0.75,
        obs_mask_ratio: float = 0.5,
        min_obs_keep: int = 2,
        norm_pix_loss: bool = True,
        loss_balance: str = "group",
        loss_group_weights: Mapping[str, float] | None = None,
        metadata_dropout: Mapping[str, float] | None = None,
        context: str = "tile",
    ) -> None:
        super().__init__()
        if context not in ("tile", "pixel"):
            raise ValueError(f"context must be 'tile' or 'pixel', got {context!r}")
        self.context = context
        if not (0.0 <= mask_ratio < 1.0 and 0.0 <= obs_mask_ratio < 1.0):
            raise ValueError(f"mask ratios must lie in [0, 1), got {mask_ratio} and {obs_mask_ratio}")
        if loss_balance not in ("group", "pixel"):
            raise ValueError(f"loss_balance must be 'group' or 'pixel', got {loss_balance!r}")
        weights = dict(loss_group_weights or {})
        unknown = sorted(set(weights) - set(LOSS_GROUPS))
        if unknown or any(w < 0 for w in weights.values()):
            raise ValueError(f"loss_group_weights: names must be among {LOSS_GROUPS} with weights >= 0, got {weights}")
        dropout = {**METADATA_DROPOUT, **(metadata_dropout or {})}
        if set(dropout) != set(METADATA_DROPOUT) or not all(0.0 <= p <= 1.0 for p in dropout.values()):
            raise ValueError(f"metadata_dropout: keys must be among {sorted(METADATA_DROPOUT)} with values in [0, 1],"
                             f" got {dict(metadata_dropout or {})}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.obs_mask_ratio = obs_mask_ratio
        self.min_obs_keep = min_obs_keep
        self.norm_pix_loss = norm_pix_loss
        self.loss_balance = loss_balance
        self.metadata_dropout = dropout
        self.decoder_perception_radius_m = (
            encoder.perception_radius_m if decoder_perception_radius_m is None else decoder_perception_radius_m
        )
        self.grad_checkpointing = False
        self.register_buffer(
            "group_weights", torch.tensor([float(weights.get(g, 1.0)) for g in LOSS_GROUPS]), persistent=False
        )
        self.register_buffer(
            "kind_group", torch.tensor([LOSS_GROUPS.index(KIND_GROUP[k]) for k in KINDS]), persistent=False
        )

        pixels_per_token = encoder.spectral_patch * encoder.patch_size**2
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_pos_chan_embed = PosChanEmbed(decoder_dim, encoder.shortest_period_m, encoder.act_layer)
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_dim,
                "less",
                decoder_num_heads,
                decoder_rank,
                decoder_spectral_head_dim,
                drop_path=encoder.drop_path * i / max(decoder_depth - 1, 1),
                **encoder.block_options,  # type: ignore[arg-type]
            )
            for i in range(decoder_depth)
        )
        self.decoder_norm = encoder.norm_layer(decoder_dim)  # the encoder's norm, eps included
        self.decoder_pred = nn.Linear(decoder_dim, pixels_per_token)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise the decoder as the encoder does (which initialises itself); N(0, 0.02) mask token."""
        for part in (self.decoder_embed, self.decoder_pos_chan_embed, self.decoder_blocks, self.decoder_norm,
                     self.decoder_pred):
            init_module_weights(part)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block, encoder and decoder."""
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    def keep_counts(self, rows: int, positions: int) -> tuple[int, int]:
        """Token rows and positions the encoder sees, out of ``rows`` and ``positions`` (:func:`keep_count`)."""
        return keep_count(rows, self.obs_mask_ratio, self.min_obs_keep), keep_count(positions, self.mask_ratio)

    # --------------------------------------------------------------------------------------------

    def forward_encoder(
        self, tokens: Tokens, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask and encode.

        Returns:
            latent ``[B, Lc+1, Lp+1, D]``, kept rows ``[B, Lc]``, kept positions ``[B, Lp]``.
        """
        x = tokens.x
        B, rows, positions = x.shape[0], x.shape[1] - 1, x.shape[2] - 1
        keep_rows, keep_pos = self.keep_counts(rows, positions)
        obs_keep, _ = random_keep(B, rows, keep_rows, x.device, generator)
        pos_keep, _ = random_keep(B, positions, keep_pos, x.device, generator)
        visible = take_grid(x, obs_keep, pos_keep)
        valid = tokens.token_valid.gather(1, repeat(obs_keep, "b r -> b r n", n=positions))
        valid = valid.gather(2, repeat(pos_keep, "b n -> b r n", r=keep_rows))  # [B, Lc, Lp]
        mask = self.encoder.grid_mask(valid, tokens.pitch, tokens.grid_hw, pos_keep)
        latent, _ = self.encoder.forward_tokens(visible, mask)
        return latent, obs_keep, pos_keep

    def forward_decoder(
        self, latent: torch.Tensor, obs_keep: torch.Tensor, pos_keep: torch.Tensor, tokens: Tokens
    ) -> torch.Tensor:
        """Fill the grid with mask tokens, re-embed, decode: → prediction ``[B, G, N, s·p²]``.

        Spatial attention is limited by the decoder's perception field, and tokens with no valid
        pixel are never attended, as in the encoder.
        """
        shape = (tokens.x.shape[1], tokens.x.shape[2])
        # the residual stream in the weights' dtype, as the encoder's: under autocast decoder_embed gives bf16
        dtype = self.mask_token.dtype
        x = fill_grid(self.decoder_embed(latent).to(dtype), obs_keep, pos_keep, self.mask_token, shape)
        x = x + self.decoder_pos_chan_embed(tokens.coords, tokens.pitch, tokens.desc, tokens.tile).to(dtype)
        mask = make_grid_mask(tokens.token_valid, tokens.pitch, tokens.grid_hw, self.decoder_perception_radius_m)
        for block in self.decoder_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.decoder_pred(self.decoder_norm(x)[:, 1:, 1:])

    def targets(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets ``(target, weight, mean, std)``.

        Per-token pixels ``[B, G, N, P]`` (normalised with ``norm_pix_loss``), valid weights
        ``[B, G, N, P]``, and the per-token statistics ``[B, G, N, 1]`` over valid pixels (population
        variance; the authors use the unbiased variance over all pixels, fill included).
        """
        p, s = self.encoder.patch_size, self.encoder.spectral_patch
        target = patchify(tokens.pixels, p, s).float()
        weight = patchify(tokens.valid, p, s).float()
        if not self.norm_pix_loss:
            return target, weight, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        count = weight.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (target * weight).sum(-1, keepdim=True) / count
        var = ((target - mean).square() * weight).sum(-1, keepdim=True) / count
        std = (var + NORM_PIX_EPS).sqrt()
        return (target - mean) / std, weight, mean, std

    def row_groups(self, kind: torch.Tensor) -> torch.Tensor:
        """Loss group index ``[B, G]`` of each token row from its kind (all 0 with ``loss_balance="pixel"``)."""
        if self.loss_balance == "pixel":
            return torch.zeros_like(kind)
        kind_group: torch.Tensor = self.kind_group  # type: ignore[assignment]
        return kind_group[kind]

    def forward_loss(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor,
        obs_mask: torch.Tensor,
        pos_mask: torch.Tensor,
        row_group: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The paper's two terms per modality group, balanced over the groups present.

        Args:
            pred: ``[B, G, N, P]`` predictions.
            target: ``[B, G, N, P]`` targets.
            weight: ``[B, G, N, P]`` 1 on valid pixels.
            obs_mask: ``[B, G]`` True = hidden row.
            pos_mask: ``[B, N]`` True = hidden position.
            row_group: ``[B, G]`` loss group index of each row.

        Returns:
            ``loss_pos``, ``loss_obs`` (scalars) and ``group_loss_pos``, ``group_loss_obs``,
            ``group_pixels_pos``, ``group_pixels_obs`` (``[K]``). A term or group with no valid pixel
            is 0 (finite, zero gradient). Computed in fp32 whatever autocast says: its einsums would
            otherwise sum errors and pixel counts in bf16 (exact integers only up to 256).
        """
        with torch.autocast(pred.device.type, enabled=False):
            pred, target, weight = pred.float(), target.float(), weight.float()
            err = ((pred - target).square() * weight).sum(-1)  # [B, G, N]
            count = weight.sum(-1)
            onehot = F.one_hot(row_group, len(LOSS_GROUPS)).float()  # [B, G, K]
            group_weights: torch.Tensor = self.group_weights  # type: ignore[assignment]

            def term(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                num = torch.einsum("bgn,bgk->k", err * select, onehot)
                pixels = torch.einsum("bgn,bgk->k", count * select, onehot)
                per_group = num / pixels.clamp_min(1.0)
                w = group_weights * (pixels > 0)
                return (w * per_group).sum() / w.sum().clamp_min(1e-12), per_group, pixels

            loss_pos, group_pos, pixels_pos = term(pos_mask[:, None, :].float())  # every row at hidden positions
            loss_obs, group_obs, pixels_obs = term(obs_mask[:, :, None].float())  # hidden rows everywhere
            return {"loss_pos": loss_pos, "loss_obs": loss_obs, "group_loss_pos": group_pos,
                    "group_loss_obs": group_obs, "group_pixels_pos": pixels_pos, "group_pixels_obs": pixels_obs}

    def forward(self, batch: Inputs, generator: torch.Generator | None = None) -> MAEOutput:
        """Hide metadata (training), mask, encode the visible grid, decode every token, score hidden tokens."""
        batch = as_batch(batch)
        if self.training and any(p > 0 for p in self.metadata_dropout.values()):
            batch = drop_metadata(batch, self.metadata_dropout, generator)
        if self.context == "pixel":
            batch = pixels_as_samples(batch, torch.nonzero(batch.valid.any(1).flatten()).squeeze(1))
        tokens = self.encoder.embed(batch)
        latent, obs_keep, pos_keep = self.forward_encoder(tokens, generator)
        pred = self.forward_decoder(latent, obs_keep, pos_keep, tokens)
        B, rows, positions = pred.shape[:3]
        obs_mask = torch.ones(B, rows, dtype=torch.bool, device=pred.device).scatter(1, obs_keep, False)
        pos_mask = torch.ones(B, positions, dtype=torch.bool, device=pred.device).scatter(1, pos_keep, False)
        target, weight, mean, std = self.targets(tokens)
        terms = self.forward_loss(pred, target, weight, obs_mask, pos_mask, self.row_groups(tokens.desc.kind))
        return MAEOutput(
            loss=terms["loss_pos"] + terms["loss_obs"],
            **terms,
            pred=pred,
            target=target,
            weight=weight,
            pos_mask=pos_mask,
            obs_mask=obs_mask,
            patch_mean=mean,
            patch_std=std,
            row_group=self.row_groups(tokens.desc.kind),
            groups=tokens.groups,
            patch_size=self.encoder.patch_size,
            spectral_patch=self.encoder.spectral_patch,
            grid_hw=tokens.grid_hw,
            image_hw=tokens.image_hw,
            num_obs=tokens.num_obs,
        )

    def tile_mean_loss(self, out: MAEOutput) -> dict[str, torch.Tensor]:
        """The loss terms of predicting every hidden pixel as its band's mean over the tile, same masks.

        The reference a reconstruction has to beat: each band's mean over the tile's valid pixels, hidden
        and visible alike (so it knows more than the encoder is shown), scored exactly as ``out``'s
        prediction was (:meth:`forward_loss`). Returns the same keys as :meth:`forward_loss`.
        """
        p2 = self.encoder.patch_size**2
        s = self.encoder.spectral_patch
        B, G, N, _ = out.target.shape
        target = out.target * out.patch_std + out.patch_mean  # in input units, whatever norm_pix_loss
        value = target.reshape(B, G, N, s, p2)
        w = out.weight.reshape(B, G, N, s, p2)
        band_mean = (value * w).sum((2, 4), keepdim=True) / w.sum((2, 4), keepdim=True).clamp_min(1.0)
        pred = band_mean.expand_as(value).reshape(out.target.shape)
        pred = (pred - out.patch_mean) / out.patch_std  # back in target units
        return self.forward_loss(pred, out.target, out.weight, out.obs_mask, out.pos_mask, out.row_group)

    # --------------------------------------------------------------------------------------------

    def flops(self, batch_size: int, num_obs: int, img_size: int | tuple[int, int]) -> int:
        """Analytic forward FLOPs (matmuls and attention) of one masked forward of a batch.

        The encoder embeds the full grid but runs its blocks on the visible grid only; the decoder
        runs on the full grid. A training step costs about 3× this. The samples are taken to share their
        bands (``LESSViT.generator_flops``).
        """
        enc = self.encoder
        if self.context == "pixel":  # every pixel its own sample (an upper bound: invalid pixels are left out)
            H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
            batch_size, img_size = batch_size * H * W, 1
        rows, positions = enc.grid_size(num_obs, img_size)
        keep_rows, keep_pos = self.keep_counts(rows, positions)
        flops = enc.embed_flops(rows, positions)
        flops += enc.flops_tokens(keep_rows, keep_pos, with_embed=False)
        dim_in, dim_dec = self.decoder_embed.in_features, self.decoder_embed.out_features
        flops += 2 * (keep_rows + 1) * (keep_pos + 1) * dim_in * dim_dec
        flops += self.decoder_pos_chan_embed.flops(rows)
        flops += sum(block.flops(rows + 1, positions + 1) for block in self.decoder_blocks)  # type: ignore[operator]
        flops += 2 * rows * positions * dim_dec * self.decoder_pred.out_features
        return batch_size * flops + enc.generator_flops(num_obs)
