"""Optimizer and learning-rate schedule: AdamW parameter groups, batch-scaled lr, warmup + cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gfm.config import ConfigError


@dataclass
class OptimConfig:
    """AdamW settings.

    Attributes:
        lr: peak learning rate at ``ref_batch`` samples per optimizer step.
        ref_batch: the batch size ``lr`` was tuned for.
        lr_scaling: how the peak lr follows the effective batch B: ``linear`` lr·B/ref, ``sqrt``
            lr·sqrt(B/ref), ``none`` lr.
        weight_decay: decoupled weight decay for weight matrices.
        betas: Adam betas.
        eps: Adam epsilon.
        no_decay: substrings of parameter names that get no weight decay (besides every 1-D parameter:
            norms and biases). Embeddings and learned tokens are matched by name.
    """

    lr: float = 1.5e-4
    ref_batch: int = 256
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    no_decay: list[str] = field(default_factory=lambda: ["embed", "token", "pos_", "norm", "bias"])

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.ref_batch <= 0:
            raise ConfigError(f"ref_batch: must be > 0, got {self.ref_batch}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: each must be in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")

    def peak_lr(self, effective_batch: int) -> float:
        """The peak lr for ``effective_batch`` samples per optimizer step."""
        ratio = effective_batch / self.ref_batch
        if self.lr_scaling == "linear":
            return self.lr * ratio
        if self.lr_scaling == "sqrt":
            return self.lr * math.sqrt(ratio)
        return self.lr

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Two AdamW groups: decayed weight matrices, and undecayed norms/biases/embeddings/tokens."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or any(s in name for s in self.no_decay):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def build(self, model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
        """A torch AdamW over :meth:`param_groups` (DeepSpeed wraps it; fused kernels are not required)."""
        return NonFiniteSkippingAdamW(
            self.param_groups(model), lr=peak_lr, betas=self.betas, eps=self.eps, foreach=False
        )


class NonFiniteSkippingAdamW(torch.optim.AdamW):
    """AdamW that refuses a step whose gradients are not all finite, and says so in ``overflow``.

    With ZeRO or bf16, DeepSpeed checks gradients before calling the optimizer; without them (stage 0,
    fp32) DeepSpeed calls this optimizer directly, so the check lives here too. DeepSpeed's engine reads
    ``optimizer.overflow`` to count the step as skipped.
    """

    overflow: bool = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not all(torch.isfinite(g).all() for g in grads)
        if self.overflow:
            return None
        return super().step(closure)


@dataclass
class ScheduleConfig:
    """Linear warmup then cosine decay, as a pure function of the optimizer step.

    Attributes:
        warmup_steps: steps of linear warmup from 0 to the peak lr.
        min_lr_ratio: the final lr as a fraction of the peak.
    """

    warmup_steps: int = 100
    min_lr_ratio: float = 0.01

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")

    def factor(self, step: int, total_steps: int) -> float:
        """Lr / peak lr at 0-based optimizer ``step`` of ``total_steps``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine
