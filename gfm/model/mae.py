"""HyperMAE: masked autoencoding over positions *and* observations on the LESS token grid.

Per sample, positional masking hides a fraction of the ``N`` patch positions and observation
masking a fraction of the ``C`` token rows (keeping at least ``min_obs_keep``); the encoder sees the
visible product grid only (kept rows × kept positions, plus their summary tokens and CLS). A light
LESS decoder puts mask tokens back in every hidden cell, re-embeds the full grid with its own
positional-channel embedding, and predicts the ``s·p²`` pixels of every token. The loss has two
terms, both mean squared errors over **valid pixels only** (nodata, cloud and padding never teach
the model to predict fill):

- ``loss_pos``: kept observations at masked positions;
- ``loss_obs``: masked observations at all positions.

``forward`` reads ``forward_encoder → forward_decoder → forward_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from gfm.model.attention import Block
from gfm.model.embed import Descriptors, PosChanEmbed, patchify, unpatchify
from gfm.model.encoder import Inputs, LESSViT, Tokens, init_module_weights

#: Added to per-patch variance before normalising targets (as in MAE).
NORM_PIX_EPS = 1e-6


@dataclass
class MAEOutput:
    """What one HyperMAE forward returns.

    ``C`` = token rows (observations / s), ``N`` = positions, ``P = s·p²`` pixels per token.

    Attributes:
        loss: scalar, ``loss_pos + loss_obs``.
        loss_pos: scalar, error of kept observations at masked positions (valid pixels only).
        loss_obs: scalar, error of masked observations at all positions (valid pixels only).
        pred: ``[B, C, N, P]`` prediction for every token (in normalised-target units when
            ``norm_pix_loss``).
        target: ``[B, C, N, P]`` the (normalised) target.
        weight: ``[B, C, N, P]`` float, 1 on valid pixels, 0 on invalid or padded ones.
        pos_mask: ``[B, N]`` bool, True = position hidden from the encoder.
        obs_mask: ``[B, C]`` bool, True = observation row hidden from the encoder.
        patch_mean, patch_std: ``[B, C, N, 1]`` per-token statistics that undo the target
            normalisation (0 and 1 without ``norm_pix_loss``).
        patch_size, spectral_patch, grid_hw, image_hw, num_obs: to turn tokens back into images.
    """

    loss: torch.Tensor
    loss_pos: torch.Tensor
    loss_obs: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    pos_mask: torch.Tensor
    obs_mask: torch.Tensor
    patch_mean: torch.Tensor
    patch_std: torch.Tensor
    patch_size: int
    spectral_patch: int
    grid_hw: tuple[int, int]
    image_hw: tuple[int, int]
    num_obs: int

    @property
    def token_mask(self) -> torch.Tensor:
        """``[B, C, N]`` bool, True where the token was reconstructed (masked position or row)."""
        return self.pos_mask[:, None, :] | self.obs_mask[:, :, None]

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token values ``[B, C, N, P]`` → image ``[B, C_in, H, W]`` (padding cropped off)."""
        image = unpatchify(tokens, self.patch_size, self.grid_hw, self.spectral_patch)
        H, W = self.image_hw
        return image[:, : self.num_obs, :H, :W]

    def reconstruction(self, paste_visible: bool = True) -> torch.Tensor:
        """Predicted pixels ``[B, C_in, H, W]`` in input units; visible tokens pasted from the input."""
        pred = self.pred.detach() * self.patch_std + self.patch_mean
        if paste_visible:
            original = self.target * self.patch_std + self.patch_mean
            pred = torch.where(self.token_mask[..., None], pred, original)
        return self.unpatchify(pred)

    def masked_pixels(self) -> torch.Tensor:
        """``[B, C_in, H, W]`` bool, True where the pixel was hidden from the encoder."""
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

    ``x: [B, C+1, N+1, D]``, kept ``rows: [B, Lc]`` and ``cols: [B, Lp]`` (0-based, summaries
    excluded) → ``[B, Lc+1, Lp+1, D]``.
    """
    rows, cols = _with_summary(rows), _with_summary(cols)
    x = x.gather(1, repeat(rows, "b r -> b r n d", n=x.shape[2], d=x.shape[3]))
    return x.gather(2, repeat(cols, "b c -> b r c d", r=x.shape[1], d=x.shape[3]))


def fill_grid(
    visible: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, fill: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`take_grid`: the full grid with ``fill`` in the hidden cells.

    ``visible: [B, Lc+1, Lp+1, D]`` scattered into a ``shape = (C+1, N+1)`` grid whose other cells
    hold ``fill: [D]`` → ``[B, C+1, N+1, D]``.
    """
    B, kept_rows, _, D = visible.shape
    rows, cols = _with_summary(rows), _with_summary(cols)
    part = fill.expand(B, kept_rows, shape[1], D).scatter(2, repeat(cols, "b c -> b r c d", r=kept_rows, d=D), visible)
    return fill.expand(B, shape[0], shape[1], D).scatter(1, repeat(rows, "b r -> b r n d", n=shape[1], d=D), part)


class HyperMAE(nn.Module):
    """Masked autoencoder around a :class:`~gfm.model.encoder.LESSViT`.

    Args:
        encoder: the encoder (its ``num_classes`` should be 0).
        decoder_dim: decoder width ``D_dec``.
        decoder_depth: decoder LESS blocks.
        decoder_rank: decoder LESS rank.
        decoder_spectral_head_dim: decoder ``d_c``.
        mlp_ratio: decoder MLP ratio.
        mask_ratio: fraction of positions hidden per sample.
        obs_mask_ratio: fraction of observation rows hidden per sample.
        min_obs_keep: observation rows always kept (fewer when the input has fewer).
        norm_pix_loss: targets normalised per token over its valid pixels.
        norm_layer, act_layer: decoder normalisation and activation types.
    """

    def __init__(
        self,
        encoder: LESSViT,
        *,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_rank: int = 2,
        decoder_spectral_head_dim: int = 4,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        obs_mask_ratio: float = 0.5,
        min_obs_keep: int = 2,
        norm_pix_loss: bool = True,
        norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if not (0.0 <= mask_ratio < 1.0 and 0.0 <= obs_mask_ratio < 1.0):
            raise ValueError(f"mask ratios must lie in [0, 1), got {mask_ratio} and {obs_mask_ratio}")
        norm_layer = norm_layer or type(encoder.norm)
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.obs_mask_ratio = obs_mask_ratio
        self.min_obs_keep = min_obs_keep
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False

        pixels_per_token = encoder.spectral_patch * encoder.patch_size**2
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_pos_chan_embed = PosChanEmbed(decoder_dim, act_layer=act_layer)
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_dim,
                "less",
                decoder_rank,
                decoder_spectral_head_dim,
                mlp_ratio,
                norm_layer=norm_layer,
                act_layer=act_layer,
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_dim)
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
        """Observation rows and positions the encoder sees, out of ``rows`` and ``positions``."""
        keep_pos = max(1, round(positions * (1 - self.mask_ratio)))
        keep_rows = min(rows, max(self.min_obs_keep, round(rows * (1 - self.obs_mask_ratio))))
        return keep_rows, keep_pos

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
        coords = tokens.coords.gather(1, repeat(pos_keep, "b l -> b l two", two=2))
        latent, _ = self.encoder.forward_tokens(visible, coords)
        return latent, obs_keep, pos_keep

    def forward_decoder(
        self,
        latent: torch.Tensor,
        obs_keep: torch.Tensor,
        pos_keep: torch.Tensor,
        coords: torch.Tensor,
        desc: Descriptors,
    ) -> torch.Tensor:
        """Fill the grid with mask tokens, re-embed, decode: → prediction ``[B, C, N, s·p²]``."""
        shape = (desc.wavelength.shape[1] + 1, coords.shape[1] + 1)
        x = fill_grid(self.decoder_embed(latent), obs_keep, pos_keep, self.mask_token.to(latent.dtype), shape)
        x = x + self.decoder_pos_chan_embed(coords, desc).to(x.dtype)
        for block in self.decoder_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, use_reentrant=False)
            else:
                x = block(x)
        return self.decoder_pred(self.decoder_norm(x)[:, 1:, 1:])

    def targets(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets ``(target, weight, mean, std)``.

        Per-token pixels ``[B, C, N, P]`` (normalised with ``norm_pix_loss``), valid weights
        ``[B, C, N, P]``, and the per-token statistics ``[B, C, N, 1]`` over valid pixels.
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

    def forward_loss(
        self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, obs_mask: torch.Tensor,
        pos_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_pos, loss_obs)``: squared error over the valid pixels of each term's tokens.

        A term with no valid pixel is 0 (finite, zero gradient).
        """
        err = (pred.float() - target).square() * weight
        hidden_obs = obs_mask[:, :, None, None].float()
        hidden_pos = pos_mask[:, None, :, None].float() * (1 - hidden_obs)

        def mean_over(select: torch.Tensor) -> torch.Tensor:
            return (err * select).sum() / (weight * select).sum().clamp_min(1.0)

        return mean_over(hidden_pos), mean_over(hidden_obs)

    def forward(self, batch: Inputs, generator: torch.Generator | None = None) -> MAEOutput:
        """Mask, encode the visible grid, decode every token, score hidden tokens on valid pixels."""
        tokens = self.encoder.embed(batch)
        latent, obs_keep, pos_keep = self.forward_encoder(tokens, generator)
        pred = self.forward_decoder(latent, obs_keep, pos_keep, tokens.coords, tokens.desc)
        B, rows, positions = pred.shape[:3]
        obs_mask = torch.ones(B, rows, dtype=torch.bool, device=pred.device).scatter(1, obs_keep, False)
        pos_mask = torch.ones(B, positions, dtype=torch.bool, device=pred.device).scatter(1, pos_keep, False)
        target, weight, mean, std = self.targets(tokens)
        loss_pos, loss_obs = self.forward_loss(pred, target, weight, obs_mask, pos_mask)
        return MAEOutput(
            loss=loss_pos + loss_obs,
            loss_pos=loss_pos,
            loss_obs=loss_obs,
            pred=pred,
            target=target,
            weight=weight,
            pos_mask=pos_mask,
            obs_mask=obs_mask,
            patch_mean=mean,
            patch_std=std,
            patch_size=self.encoder.patch_size,
            spectral_patch=self.encoder.spectral_patch,
            grid_hw=tokens.grid_hw,
            image_hw=tokens.image_hw,
            num_obs=tokens.num_obs,
        )

    # --------------------------------------------------------------------------------------------

    def flops(self, batch_size: int, num_obs: int, img_size: int | tuple[int, int]) -> int:
        """Analytic forward FLOPs (matmuls and attention) of one masked forward of a batch.

        The encoder embeds the full grid but runs its blocks on the visible grid only; the decoder
        runs on the full grid. A training step costs about 3× this.
        """
        enc = self.encoder
        rows, positions = enc.grid_size(num_obs, img_size)
        keep_rows, keep_pos = self.keep_counts(rows, positions)
        flops = enc.patch_embed.flops(rows * positions) + enc.pos_chan_embed.chan.flops(rows)
        flops += enc.flops_tokens(keep_rows, keep_pos, with_embed=False)
        dim_in, dim_dec = self.decoder_embed.in_features, self.decoder_embed.out_features
        flops += 2 * (keep_rows + 1) * (keep_pos + 1) * dim_in * dim_dec
        flops += self.decoder_pos_chan_embed.chan.flops(rows)
        flops += sum(block.flops(rows + 1, positions + 1) for block in self.decoder_blocks)  # type: ignore[operator]
        flops += 2 * rows * positions * dim_dec * self.decoder_pred.out_features
        return batch_size * flops
