"""The task model: a LESS ViT encoder plus a task head, with the task's loss.

=================  ===================================================================================
task               head (module ``task_head``)
=================  ===================================================================================
scene, multilabel  pooled token grid (mean of observation tokens, or CLS) → linear
pixel              the token of the patch holding the window's centre pixel: its summary token and the
                   mean of its observation tokens, normalised → linear
segmentation       per-position maps of the last blocks (``forward_intermediates``) → ``linear`` (1×1
                   conv, bilinear upsampling), ``progressive`` or ``uper`` decoder → logits per pixel
=================  ===================================================================================

The encoder is used only through its public API (``forward_features``, ``forward_intermediates``,
``patch_size``, ``embed_dim``), so peft can wrap the whole task model and the head stays a separate,
fully trained module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gfm.batch import Batch
from gfm.config import ConfigError
from gfm.model.heads import ClassificationHead, SegmentationHead, UPerHead

IGNORE_INDEX = -1


@dataclass
class HeadConfig:
    """The task head.

    Attributes:
        kind: segmentation decoder: ``linear`` (1×1 conv on the last block's map, bilinear upsampling),
            ``progressive`` (transposed-conv upsampling of fused maps) or ``uper`` (UPerNet-style).
        pool: scene tasks: ``mean`` (of the observation tokens) or ``cls``.
        dropout: dropout before the classifier (scene and pixel tasks).
        channels: width of the segmentation decoders.
    """

    kind: Literal["linear", "progressive", "uper"] = "linear"
    pool: Literal["mean", "cls"] = "mean"
    dropout: float = 0.0
    channels: int = 128

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.channels < 1:
            raise ConfigError(f"channels: must be >= 1, got {self.channels}")


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
        window: pixel task: the window side (locates the centre patch).
    """

    def __init__(self, encoder: nn.Module, task: str, num_classes: int, head: HeadConfig, window: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.task = task
        self.num_classes = num_classes
        enc: Any = encoder
        dim, p = int(enc.embed_dim), int(enc.patch_size)
        self.indices = 1
        self.task_head: nn.Module
        if task in ("scene", "multilabel"):
            self.task_head = ClassificationHead(dim, num_classes, pool=head.pool, dropout=head.dropout)
        elif task == "pixel":
            centre = window // 2
            grid_w = -(-window // p)
            self.task_head = CentreHead(dim, num_classes, (centre // p) * grid_w + centre // p, head.dropout)
        elif task == "segmentation":
            if head.kind == "linear":
                self.task_head = LinearSegHead(dim, num_classes, p)
            elif head.kind == "progressive":
                self.indices = 4
                self.task_head = SegmentationHead(dim, num_classes, p, num_inputs=4, channels=head.channels)
            else:
                self.indices = 4
                self.task_head = UPerHead(dim, num_classes, p, channels=head.channels)
        else:
            raise ValueError(f"unknown task {task!r}")

    def logits(self, batch: Batch) -> torch.Tensor:
        """``[B, K]`` (scene, multilabel, pixel) or ``[B, K, H, W]`` (segmentation)."""
        encoder: Any = self.encoder
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
