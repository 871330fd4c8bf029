"""The task model: a LESS ViT encoder plus a task head, with the task's loss.

=================  ===================================================================================
task               head (module ``task_head``)
=================  ===================================================================================
scene, multilabel  pooled token grid (mean of observation tokens, or CLS) → linear
pixel              ``dense`` (default): :class:`~gfm.model.heads.DensePixelHead` gives logits for every
                   pixel of the window (its position's tokens plus its own bands); the window's centre
                   pixel is the sample. With ``context: pixel`` (default) the encoder sees each pixel
                   alone (its spectrum as token rows); with ``window``, the whole window. Trained on the
                   centre pixel's logits; evaluated on its class probabilities averaged over the
                   ``smooth × smooth`` valid pixels around it.
                   ``centre``: the token of the patch holding the centre pixel (summary token and mean
                   of observation tokens) → linear (runs made before the dense head read as this)
segmentation       ``dense`` (default): :class:`~gfm.model.heads.DensePixelHead` on the final token grid;
                   or the per-position maps of the last blocks (``forward_intermediates``) →
                   ``linear`` (1×1 conv, bilinear upsampling), ``progressive`` or ``uper`` decoder
=================  ===================================================================================

:meth:`TaskModel.dense_probabilities` gives class probabilities for every pixel of a tile in one forward
(``dense`` heads), which is how whole scenes are predicted.

The encoder is used only through its public API (``forward_features``, ``forward_intermediates``,
``patch_size``, ``embed_dim``), so peft can wrap the whole task model and the head stays a separate,
fully trained module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gfm.batch import Batch, pixels_as_samples
from gfm.config import ConfigError
from gfm.model.heads import ClassificationHead, DensePixelHead, SegmentationHead, UPerHead, smooth_probabilities

IGNORE_INDEX = -1


@dataclass
class HeadConfig:
    """The task head.

    Attributes:
        kind: per-pixel and segmentation heads: ``dense`` (every pixel from its position's tokens and its
            own bands, :class:`~gfm.model.heads.DensePixelHead`); segmentation also ``linear`` (1×1 conv on
            the last block's map, bilinear upsampling), ``progressive`` (transposed-conv upsampling of fused
            maps) or ``uper`` (UPerNet-style); pixel also ``centre`` (the centre patch's tokens → linear;
            ``linear`` reads as ``centre`` for pixel runs made before the dense head).
        pool: scene tasks: ``mean`` (of the observation tokens) or ``cls``.
        dropout: dropout before the classifier.
        channels: width of the segmentation decoders and the hidden width of the dense head.
        smooth: ``dense`` heads: evaluate and predict with class probabilities averaged over the
            ``smooth × smooth`` valid pixels around each pixel (odd; 1 = off; 0 = the task's default: 5 for
            pixel, 1 for segmentation).
        context: ``dense`` heads: what the encoder sees for each pixel: ``pixel`` (that pixel alone: its
            bands as token rows, no spatial attention) or ``window`` (the whole window or tile); ``auto`` =
            ``pixel`` for the pixel task, ``window`` for segmentation.
    """

    kind: Literal["dense", "linear", "progressive", "uper", "centre"] = "dense"
    pool: Literal["mean", "cls"] = "mean"
    dropout: float = 0.0
    channels: int = 64
    smooth: int = 0
    context: Literal["auto", "pixel", "window"] = "auto"

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.channels < 1:
            raise ConfigError(f"channels: must be >= 1, got {self.channels}")
        if self.smooth < 0 or (self.smooth and self.smooth % 2 == 0):
            raise ConfigError(f"smooth: must be 0 (the task's default) or an odd size >= 1, got {self.smooth}")

    def smoothing(self, task: str) -> int:
        """The neighbourhood size used for ``task`` (``smooth``, or the task's default when 0)."""
        return self.smooth or (5 if task == "pixel" else 1)

    def per_pixel(self, task: str) -> bool:
        """Whether the encoder sees each pixel alone for ``task``."""
        return self.context == "pixel" or (self.context == "auto" and task == "pixel")


class CentreHead(nn.Module):
    """Token grid ``[B, C+1, N+1, D]`` → logits ``[B, K]`` from the position holding the centre pixel.

    Args:
        dim: token width ``D``.
        num_classes: ``K``.
        position: index ``n`` (0-based, over the ``N`` patch positions) of the centre patch.
        dropout: dropout before the linear layer.
    """

    def __init__(self, dim: int, num_classes: int, position: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.position = position
        self.norm = nn.LayerNorm(2 * dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C+1, N+1, D]`` → ``[B, K]``."""
        column = x[:, :, 1 + self.position]  # [B, C+1, D]: summary token, then one per observation
        feat = torch.cat([column[:, 0], column[:, 1:].mean(dim=1)], dim=-1)  # [B, 2D]
        return self.fc(self.drop(self.norm(feat)))


class LinearSegHead(nn.Module):
    """A 1×1 convolution per position, bilinear upsampling by ``p``: ``[B, D, h, w]`` → ``[B, K, h·p, w·p]``."""

    def __init__(self, dim: int, num_classes: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.BatchNorm2d(dim)
        self.cls = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The last map of ``features`` → logits."""
        x = self.cls(self.norm(features[-1]))
        return F.interpolate(x, scale_factor=self.patch_size, mode="bilinear", align_corners=False)


def _crop(batch: Batch, rows: slice, cols: slice) -> Batch:
    """The batch's pixels and valid mask cut to ``rows × cols`` (every other field kept)."""
    return replace(batch, pixels=batch.pixels[..., rows, cols], valid=batch.valid[..., rows, cols], label=None)


@dataclass
class TaskOutput:
    """What the task model returns: ``logits`` and, when the batch has labels, the scalar ``loss``."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class TaskModel(nn.Module):
    """Encoder + head + loss for one task.

    Args:
        encoder: a LESS ViT (``forward_features``, ``forward_intermediates``).
        task: ``scene``, ``multilabel``, ``segmentation`` or ``pixel``.
        num_classes: ``K``.
        head: head settings.
        window: pixel task: the window side (locates the centre pixel).
        num_bands: input bands of the task (the ``dense`` head's pixel path; 0 = tokens only).
        num_rows: token rows the encoder makes of the task's bands (the ``dense`` head's readout).
    """

    def __init__(
        self, encoder: nn.Module, task: str, num_classes: int, head: HeadConfig, window: int = 0, num_bands: int = 0,
        num_rows: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.task = task
        self.num_classes = num_classes
        self.window = window
        enc: Any = encoder
        dim, p = int(enc.embed_dim), int(enc.patch_size)
        self.indices = 1
        self.dense = head.kind == "dense" and task in ("pixel", "segmentation")
        self.smooth = head.smoothing(task)
        self.per_pixel = self.dense and head.per_pixel(task)
        if self.dense and num_rows < 1:
            raise ValueError("a dense head needs num_rows, the token rows the encoder makes of the task's bands")
        self.task_head: nn.Module
        if task in ("scene", "multilabel"):
            self.task_head = ClassificationHead(dim, num_classes, pool=head.pool, dropout=head.dropout)
        elif self.dense:
            self.task_head = DensePixelHead(dim, num_rows, num_bands, num_classes, 1 if self.per_pixel else p,
                                            hidden=head.channels, dropout=head.dropout)
        elif task == "pixel":
            centre = window // 2
            grid_w = -(-window // p)
            self.task_head = CentreHead(dim, num_classes, (centre // p) * grid_w + centre // p, head.dropout)
        elif task == "segmentation":
            if head.kind in ("linear", "centre"):
                self.task_head = LinearSegHead(dim, num_classes, p)
            elif head.kind == "progressive":
                self.indices = 4
                self.task_head = SegmentationHead(dim, num_classes, p, num_inputs=4, channels=head.channels)
            else:
                self.indices = 4
                self.task_head = UPerHead(dim, num_classes, p, channels=head.channels)
        else:
            raise ValueError(f"unknown task {task!r}")

    def dense_logits(self, batch: Batch) -> torch.Tensor:
        """``dense`` heads: logits for every pixel of the batch's tiles or windows, ``[B, K, H, W]``."""
        B, _, H, W = batch.pixels.shape
        if self.per_pixel:  # every pixel a sample of its own: [B·H·W, C, 1, 1]
            logits = self._dense(pixels_as_samples(batch))
            return logits.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        return self._dense(batch)

    def dense_logits_where(self, batch: Batch, where: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Per-pixel heads: logits ``[B, K, H, W]`` of the pixels where ``where`` (``[B, H, W]``) is set.

        ``batch_size`` pixels per forward; the other pixels' logits are 0. The values are those
        :meth:`dense_logits` gives there, for the cost of those pixels only.
        """
        if not self.per_pixel:
            raise ValueError("dense_logits_where needs a per-pixel dense head (head.context: pixel)")
        B, _, H, W = batch.pixels.shape
        todo = torch.nonzero(where.reshape(-1)).flatten()
        logits = torch.zeros(B * H * W, self.num_classes, device=batch.pixels.device)
        for start in range(0, len(todo), batch_size):
            idx = todo[start: start + batch_size]
            logits[idx] = self._dense(pixels_as_samples(batch, idx))[:, :, 0, 0].float()
        return logits.reshape(B, H, W, -1).permute(0, 3, 1, 2)

    def _dense(self, batch: Batch) -> torch.Tensor:
        encoder: Any = self.encoder
        x = encoder.forward_features(batch)
        p = int(encoder.patch_size)
        H, W = batch.pixels.shape[-2:]
        pixels = torch.where(batch.valid & torch.isfinite(batch.pixels), batch.pixels, torch.zeros_like(batch.pixels))
        logits: torch.Tensor = self.task_head(x, pixels, (-(-H // p), -(-W // p)))
        return logits

    def centre_logits(self, batch: Batch) -> torch.Tensor:
        """Pixel task, ``dense`` head: logits ``[B, K]`` of each window's centre pixel (what training reads)."""
        H, W = batch.pixels.shape[-2:]
        if self.per_pixel:  # only the centre pixel is computed
            r, c = H // 2, W // 2
            centre = _crop(batch, slice(r, r + 1), slice(c, c + 1))
            return self._dense(centre)[:, :, 0, 0]
        return self._dense(batch)[:, :, H // 2, W // 2]

    def dense_probabilities(self, batch: Batch, batch_size: int | None = None) -> torch.Tensor:
        """``dense`` heads: class probabilities ``[B, K, H, W]`` of every pixel, smoothed as the head says.

        Pixels with no valid band neither vote nor get a class (probabilities 0). ``batch_size``
        (per-pixel heads only): compute the logits of the pixels with a valid band, that many per forward
        (:meth:`dense_logits_where`), instead of one pass over the whole grid.
        """
        valid = batch.valid.any(dim=1)
        if batch_size is not None and self.per_pixel:
            logits = self.dense_logits_where(batch, valid, batch_size)
        else:
            logits = self.dense_logits(batch)
        return smooth_probabilities(logits, self.smooth, valid) * valid[:, None]

    def logits(self, batch: Batch) -> torch.Tensor:
        """``[B, K]`` (scene, multilabel, pixel) or ``[B, K, H, W]`` (segmentation).

        ``dense`` heads in eval mode with smoothing return log class probabilities (smoothed); in
        training, the plain logits (pixel task: of the window's centre pixel).
        """
        encoder: Any = self.encoder
        if self.dense:
            H, W = batch.pixels.shape[-2:]
            if self.task == "pixel" and (self.training or self.smooth <= 1):
                return self.centre_logits(batch)
            if self.training or self.smooth <= 1:
                return self.dense_logits(batch)
            logits = self.dense_probabilities(batch).clamp(min=1e-12).log()
            return logits[:, :, H // 2, W // 2] if self.task == "pixel" else logits
        if self.task != "segmentation":
            out: torch.Tensor = self.task_head(encoder.forward_features(batch))
            return out
        depth = len(encoder.blocks)
        indices = list(range(max(0, depth - self.indices), depth))
        maps = encoder.forward_intermediates(batch, indices=indices, norm=True, intermediates_only=True)
        if len(maps) < self.indices:  # shallow encoders: repeat the first map
            maps = [maps[0]] * (self.indices - len(maps)) + list(maps)
        h, w = batch.pixels.shape[-2:]
        seg: torch.Tensor = self.task_head(maps)
        return seg[..., :h, :w]

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (ignoring ``-1``), or binary cross-entropy for multi-label."""
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), label.float())
        if bool((label == IGNORE_INDEX).all()):  # nothing labelled in this batch: a zero that keeps the graph
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX)

    def forward(self, batch: Batch) -> TaskOutput:
        """Logits, and the loss when ``batch.label`` is set."""
        logits = self.logits(batch)
        loss = self.loss(logits, batch.label) if batch.label is not None else None
        return TaskOutput(logits=logits, loss=loss)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class indices (argmax over classes), or a multi-hot ``[B, K]`` for multi-label (sigmoid > 0.5)."""
        if self.task == "multilabel":
            return (logits > 0).long()
        return logits.argmax(dim=1)
