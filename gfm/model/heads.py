"""Task heads on top of a :class:`~gfm.model.encoder.LESSViT`.

- :class:`ClassificationHead`: scene classes from the token grid (CLS or mean of tokens).
- :class:`SegmentationHead`: progressive upsampling of fused per-position maps.
- :class:`UPerHead`: UPerNet-style decoder (feature pyramid from ViT intermediates + pyramid pooling).
- :class:`PixelClassificationHead`: per-pixel classes straight from each position's token, for
  hyperspectral scenes labelled pixel by pixel.
- :class:`DensePixelHead`: logits for every pixel from its position's tokens (upsampled when ``p > 1``)
  plus the pixel's own band values (a full-resolution skip), for per-pixel classification and
  segmentation; :func:`smooth_probabilities` averages its class probabilities over a neighbourhood.

Segmentation heads take the per-position maps ``[B, D, h, w]`` that
:meth:`LESSViT.forward_intermediates` returns and give logits ``[B, K, h·p, w·p]`` (crop to the
input size when it was padded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationHead(nn.Module):
    """Token grid ``[B, C+1, N+1, D]`` → logits ``[B, K]``.

    Args:
        dim: token width ``D``.
        num_classes: ``K``.
        pool: ``"cls"`` (global CLS token) or ``"mean"`` (mean of observation tokens).
        dropout: dropout before the linear layer.
        norm_layer: normalisation applied to the pooled feature.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        pool: str = "cls",
        dropout: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.norm = norm_layer(dim) if pool == "mean" else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]`` → ``[B, K]``."""
        feat = x[:, 0, 0] if self.pool == "cls" else self.norm(x[:, 1:, 1:].mean(dim=(1, 2)))
        return self.fc(self.drop(feat))


class ConvNormAct(nn.Sequential):
    """``k × k`` convolution (same padding), normalisation, activation."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
            norm_layer(out_ch),
            act_layer(),
        )


class PixelClassificationHead(nn.Module):
    """Per-position token → ``p × p`` pixels of ``K`` logits: ``[B, D, h, w]`` → ``[B, K, h·p, w·p]``."""

    def __init__(self, dim: int, num_classes: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, num_classes * patch_size**2, kernel_size=1)
        self.shuffle = nn.PixelShuffle(patch_size)

    def forward(self, features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """A map ``[B, D, h, w]`` (or a list whose last map is used) → ``[B, K, h·p, w·p]``."""
        x = features if isinstance(features, torch.Tensor) else features[-1]
        return self.shuffle(self.proj(x))


class SegmentationHead(nn.Module):
    """Progressive upsampling: fuse intermediates, then ×2 transposed-conv stages up to ``p``.

    Args:
        dim: token width ``D``.
        num_classes: ``K``.
        patch_size: ``p`` (the total upsampling factor).
        num_inputs: number of intermediate maps fused (concatenated, 1×1 conv).
        channels: width of the upsampling path (halved at each stage, at least 32).
        norm_layer, act_layer: normalisation and activation types.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        patch_size: int,
        num_inputs: int = 4,
        channels: int = 256,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.fuse = ConvNormAct(dim * num_inputs, channels, 1, norm_layer, act_layer)
        stages: list[nn.Module] = []
        ch = channels
        for _ in range(int(math.log2(patch_size))):
            out = max(ch // 2, 32)
            stages += [nn.ConvTranspose2d(ch, out, 2, stride=2), ConvNormAct(out, out, 3, norm_layer, act_layer)]
            ch = out
        self.up = nn.Sequential(*stages)
        self.cls = nn.Conv2d(ch, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``num_inputs`` maps ``[B, D, h, w]`` → ``[B, K, h·p, w·p]``."""
        x = self.up(self.fuse(torch.cat(list(features), dim=1)))
        h, w = features[0].shape[-2:]
        size = (h * self.patch_size, w * self.patch_size)
        if x.shape[-2:] != size:  # p not a power of two
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.cls(x)


class UPerHead(nn.Module):
    """UPerNet-style decoder for plain ViTs: a simple feature pyramid, FPN and pyramid pooling.

    The four intermediates become strides ``p/4, p/2, p, 2p`` (two ×2 deconvolutions, one, none,
    a max-pool), as in ViTDet; the coarsest gets a pyramid-pooling module, FPN adds top-down, and
    all levels are fused at the finest stride, classified, and upsampled to ``h·p × w·p``.

    Args:
        dim: token width ``D``.
        num_classes: ``K``.
        patch_size: ``p``.
        channels: FPN width.
        pool_scales: pyramid-pooling output sizes.
        norm_layer, act_layer: normalisation and activation types.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        patch_size: int,
        channels: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.rescale = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), norm_layer(dim), act_layer(),
                          nn.ConvTranspose2d(dim, dim, 2, stride=2)),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, ceil_mode=True),
        ])
        self.lateral = nn.ModuleList(ConvNormAct(dim, channels, 1, norm_layer, act_layer) for _ in range(3))
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(dim, channels, 1, norm_layer, act_layer))
            for s in pool_scales
        )
        self.ppm_out = ConvNormAct(dim + len(pool_scales) * channels, channels, 3, norm_layer, act_layer)
        self.fpn_out = nn.ModuleList(ConvNormAct(channels, channels, 3, norm_layer, act_layer) for _ in range(3))
        self.fuse = ConvNormAct(4 * channels, channels, 3, norm_layer, act_layer)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four maps ``[B, D, h, w]`` (shallow → deep) → ``[B, K, h·p, w·p]``."""
        if len(features) != 4:
            raise ValueError(f"UPerHead takes 4 intermediate maps, got {len(features)}")
        h, w = features[0].shape[-2:]
        levels = [op(f) for op, f in zip(self.rescale, features)]
        top = levels[3]
        pooled = [F.interpolate(m(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for m in self.ppm]
        outs = [self.ppm_out(torch.cat([top, *pooled], dim=1))]
        for i in (2, 1, 0):  # top-down
            lat = self.lateral[i](levels[i])
            outs.insert(0, lat + F.interpolate(outs[0], size=lat.shape[-2:], mode="bilinear", align_corners=False))
        finest = outs[0].shape[-2:]
        outs = [self.fpn_out[i](o) for i, o in enumerate(outs[:3])] + [outs[3]]
        x = torch.cat([F.interpolate(o, size=finest, mode="bilinear", align_corners=False) for o in outs], dim=1)
        logits = self.cls(self.fuse(x))
        return F.interpolate(logits, size=(h * self.patch_size, w * self.patch_size), mode="bilinear",
                             align_corners=False)


class DensePixelHead(nn.Module):
    """Logits for every pixel: its position's tokens and its own bands, ``[B, K, H, W]``.

    Two paths are summed in a hidden width ``E`` and classified by one more layer:

    - *context*: per position, the whole token column (summary token and every token row), each token
      normalised and projected to ``R`` dims, concatenated (``[B, N, (G+1)·R]``) and projected to
      ``[B, E, h, w]``, repeated over the ``p × p`` pixels of its patch. Concatenated, not averaged: the
      rows of one position are different bands (or groups of bands, or dates), and a mean over them
      throws away which is which (measured: a linear probe on the mean of a pretrained encoder's rows
      scored 12 OA points below one on their concatenation, docs/finetune.md). The shared ``D → R``
      projection keeps the head small next to LoRA's adapters whatever ``G``;
    - *pixel*: each pixel's ``C`` normalised band values through a two-layer MLP (``[B, C, H, W] →
      [B, E, H, W]``), so a pixel's own spectrum reaches the classifier at full resolution whatever
      the patch size (the skip of a U-Net decoder; tokens mix ``p²`` pixels and, with spectral
      patching, ``s`` bands).

    Row and band counts are the task's: a fine-tuned head serves one band set.

    Args:
        dim: token width ``D``.
        num_rows: ``G``, token rows per position (observations after spectral grouping).
        num_bands: ``C``, input bands (0 = no pixel path).
        num_classes: ``K``.
        patch_size: ``p``.
        hidden: ``E``.
        row_dim: ``R``, the width each token is projected to before the rows are concatenated.
        dropout: dropout before the classifier.
    """

    def __init__(
        self, dim: int, num_rows: int, num_bands: int, num_classes: int, patch_size: int, hidden: int = 64,
        row_dim: int = 32, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_rows = num_rows
        self.num_bands = num_bands
        self.rows = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, row_dim))
        self.context = nn.Linear((num_rows + 1) * row_dim, hidden)
        self.pixel = (
            nn.Sequential(nn.Linear(num_bands, hidden), nn.GELU(), nn.Linear(hidden, hidden)) if num_bands else None
        )
        self.classifier = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, pixels: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """``x: [B, G+1, N+1, D]``, ``pixels: [B, C, H, W]`` (normalised, invalid zeroed) → ``[B, K, H, W]``."""
        B, C, H, W = pixels.shape
        h, w = grid_hw
        if x.shape[1] != self.num_rows + 1:
            raise ValueError(f"this head was trained on {self.num_rows} token rows; the input has {x.shape[1] - 1} "
                             "(another band set or spectral grouping)")
        rows = self.rows(x[:, :, 1:])  # [B, G+1, N, R], summary row first
        columns = rows.permute(0, 2, 1, 3).reshape(B, h * w, -1)  # [B, N, (G+1)·R]
        z = self.context(columns).transpose(1, 2).reshape(B, -1, h, w)  # [B, E, h, w]
        if self.patch_size > 1:
            z = z.repeat_interleave(self.patch_size, dim=2).repeat_interleave(self.patch_size, dim=3)
        z = z[:, :, :H, :W]  # padding to whole patches cropped off
        if self.pixel is not None:
            if C != self.num_bands:
                raise ValueError(f"this head was trained on {self.num_bands} bands; the input has {C}")
            first = self.pixel[0]
            assert isinstance(first, nn.Linear)
            bands = pixels.permute(0, 2, 3, 1).to(first.weight.dtype)  # fp32 pixels into bf16 weights (DeepSpeed)
            z = z + self.pixel(bands).permute(0, 3, 1, 2)
        logits: torch.Tensor = self.classifier(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return logits


def smooth_probabilities(logits: torch.Tensor, size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Class probabilities averaged over the ``size × size`` neighbourhood of each pixel.

    ``logits: [B, K, H, W]``, ``valid: [B, H, W]`` bool (pixels that may vote; None = all) →
    ``[B, K, H, W]`` probabilities (all zero where no neighbour is valid). A fixed spatial prior (the
    majority-filter of classic spectral-spatial classification, in probabilities): neighbouring pixels
    mostly share a class, and averaging their independent per-pixel estimates cancels much of their
    noise. ``size`` 1 returns the plain softmax.
    """
    prob = logits.float().softmax(dim=1)
    if size <= 1:
        return prob if valid is None else prob * valid[:, None]
    if size % 2 == 0:
        raise ValueError(f"smoothing size must be odd, got {size}")
    weight = torch.ones_like(prob[:, :1]) if valid is None else valid[:, None].to(prob.dtype)
    pad = size // 2
    total = F.avg_pool2d(prob * weight, size, stride=1, padding=pad, count_include_pad=True)
    count = F.avg_pool2d(weight, size, stride=1, padding=pad, count_include_pad=True)
    return total / count.clamp(min=1e-12) * (count > 0)
