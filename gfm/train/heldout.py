"""Reconstruction on held-out tiles, against the per-band tile mean.

A masked autoencoder whose loss falls may still only have learned each band's level. The check that it
learned structure: on tiles it never trained on, with the same masks, its reconstruction loss next to
that of predicting every hidden pixel as its band's mean over the tile
(:meth:`gfm.model.mae.HyperMAE.tile_mean_loss`). :func:`heldout_reconstruction` runs both over a fixed
number of batches with masks drawn from a fixed seed, so two checkpoints are compared on the same
pixels and the same masks; :func:`write_table` prints the figures per sensor and overall.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfm.batch import Batch


@dataclass
class Reconstruction:
    """Loss sums of one group of batches (a sensor set, or everything).

    Attributes:
        batches: batches seen.
        samples: tiles seen.
        loss: mean over batches of the model's ``loss_pos + loss_obs``.
        baseline: mean over batches of the tile-mean predictor's ``loss_pos + loss_obs``.
        loss_pos, loss_obs, baseline_pos, baseline_obs: the two terms of each.
    """

    batches: int = 0
    samples: int = 0
    loss: float = 0.0
    baseline: float = 0.0
    loss_pos: float = 0.0
    loss_obs: float = 0.0
    baseline_pos: float = 0.0
    baseline_obs: float = 0.0

    @property
    def ratio(self) -> float:
        """``loss / baseline`` (below 1: better than the tile mean; the recipe's goal is ≤ 0.5)."""
        return self.loss / self.baseline if self.baseline > 0 else float("nan")

    def add(self, size: int, terms: dict[str, float]) -> None:
        """Fold one batch's terms into running means."""
        self.batches += 1
        self.samples += size
        for key, value in terms.items():
            old = getattr(self, key)
            setattr(self, key, old + (value - old) / self.batches)


@dataclass
class HeldoutReport:
    """:func:`heldout_reconstruction`'s result: ``total`` and one :class:`Reconstruction` per sensor set."""

    total: Reconstruction = field(default_factory=Reconstruction)
    by_sensor: dict[str, Reconstruction] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON), ratios included."""

        def one(r: Reconstruction) -> dict[str, Any]:
            return {**asdict(r), "ratio": r.ratio}

        return {"total": one(self.total), "by_sensor": {k: one(v) for k, v in self.by_sensor.items()}}


def _sensors(batch: Batch, names: dict[int, str]) -> str:
    if batch.sensor is None:
        return "unknown"
    codes = sorted({int(c) for c in batch.sensor[0].tolist()})
    return "+".join(names.get(c, str(c)) for c in codes)


@torch.no_grad()
def heldout_reconstruction(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    max_batches: int,
    seed: int = 0,
    sensor_names: dict[int, str] | None = None,
    device: torch.device | str = "cpu",
) -> HeldoutReport:
    """The model's and the tile mean's reconstruction loss over up to ``max_batches`` batches.

    Args:
        model: a :class:`~gfm.model.mae.HyperMAE` (put in eval mode: no metadata dropout).
        batches: normalised batches of held-out tiles (normalised with the *training* statistics).
        max_batches: how many batches to score (0 = every batch the loader gives).
        seed: seed of the masks (the same seed gives the same masks for the same batches).
        sensor_names: sensor id (:func:`gfm.batch.sensor_code`) → name, for the per-sensor rows.
        device: where the model runs.
    """
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    report = HeldoutReport()
    names = sensor_names or {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device)
        out = model(batch, generator)
        base = model.tile_mean_loss(out)  # type: ignore[operator]
        terms = {"loss": float(out.loss), "baseline": float(base["loss_pos"] + base["loss_obs"]),
                 "loss_pos": float(out.loss_pos), "loss_obs": float(out.loss_obs),
                 "baseline_pos": float(base["loss_pos"]), "baseline_obs": float(base["loss_obs"])}
        report.total.add(batch.size, terms)
        report.by_sensor.setdefault(_sensors(batch, names), Reconstruction()).add(batch.size, terms)
    return report


def table(report: HeldoutReport, title: str = "") -> str:
    """The report as the text table the programs print."""
    lines = [title] if title else []
    lines.append(f"{'sensors':<28}{'batches':>8}{'tiles':>7}{'model':>9}{'tile mean':>11}{'ratio':>8}")
    lines.append("-" * 71)
    rows: Sequence[tuple[str, Reconstruction]] = [*sorted(report.by_sensor.items()), ("all", report.total)]
    for name, r in rows:
        lines.append(f"{name:<28}{r.batches:>8}{r.samples:>7}{r.loss:>9.4f}{r.baseline:>11.4f}{r.ratio:>8.3f}")
    return "\n".join(lines)


def write_table(report: HeldoutReport, path: Path, extra: dict[str, Any] | None = None) -> None:
    """``report`` as JSON at ``path`` (with ``extra`` fields beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**(extra or {}), **report.as_dict()}, indent=1) + "\n")
