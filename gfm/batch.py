"""The :class:`Batch`: what the loader yields and what models and trainers consume.

This is the contract between ``gfm.data`` and ``gfm.model``/``gfm.train``; it lives outside both so that
the model never imports the data pipeline. Every observation (a (band, time) pair) carries its physical
description as tensors, so a model needs no band list.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


def sensor_code(name: str) -> int:
    """A stable int64 id for a sensor name (CRC-32), for :attr:`Batch.sensor`: equal names, equal ids."""
    return zlib.crc32(name.encode())


@dataclass
class Batch:
    """A batch of tiles that share one band-set signature (same C, same band order).

    Attributes:
        pixels: ``[B, C, H, W]`` float32, normalised per band.
        wavelength: ``[B, C]`` float32 centre wavelength in nm (radar wavelength for SAR).
        bandwidth: ``[B, C]`` float32 FWHM in nm.
        kind: ``[B, C]`` int64 codes from :data:`gfm.sensors.KIND_CODE`.
        time: ``[B, C]`` float32 acquisition date as days since 1970-01-01; NaN when unknown.
        valid: ``[B, C, H, W]`` bool, True = usable pixel (nodata, clouds, fill are False).
        gsd: ``[B]`` float32 ground sampling distance in metres; NaN when unknown.
        lonlat: optional ``[B, 2]`` float32 tile centre (longitude, latitude) in WGS84 degrees; NaN
            (or None for the whole batch) when unknown.
        sensor: optional ``[B, C]`` int64 sensor ids (:func:`sensor_code` of the sensor name; equal
            ids = same sensor); None when unknown. Spectral patching never groups across sensors.
        label: optional ``[B, H, W]`` int64 segmentation labels or ``[B]`` int64 classes.
        keys: the sample keys, for logging and fault reports.
    """

    pixels: torch.Tensor
    wavelength: torch.Tensor
    bandwidth: torch.Tensor
    kind: torch.Tensor
    time: torch.Tensor
    valid: torch.Tensor
    gsd: torch.Tensor
    lonlat: torch.Tensor | None = None
    sensor: torch.Tensor | None = None
    label: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of samples B."""
        return int(self.pixels.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (optional fields omitted when absent)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v
        return out

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """A copy with every tensor moved to ``device``."""
        moved: dict[str, Any] = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()}
        return replace(self, **moved)

    def pin_memory(self) -> Batch:
        """A copy with every tensor in pinned memory (called by DataLoader with ``pin_memory=True``)."""
        pinned: dict[str, Any] = {k: v.pin_memory() for k, v in self.tensors().items()}
        return replace(self, **pinned)


def pixels_as_samples(batch: Batch, where: torch.Tensor | None = None) -> Batch:
    """Every pixel of ``batch`` as a one-pixel sample: ``[B, C, H, W]`` → ``[B·H·W, C, 1, 1]``.

    Per-observation and per-tile fields are repeated for each pixel of their tile (row-major order).
    ``where`` (flat indices into the ``B·H·W`` pixels) keeps only those pixels, in that order.
    """
    B, C, H, W = batch.pixels.shape
    tile = torch.arange(B, device=batch.pixels.device).repeat_interleave(H * W)
    if where is not None:
        tile = tile[where]

    def each(t: torch.Tensor) -> torch.Tensor:
        return t[tile]

    def flat(t: torch.Tensor) -> torch.Tensor:
        out = t.permute(0, 2, 3, 1).reshape(B * H * W, C, 1, 1)
        return out if where is None else out[where]

    return Batch(pixels=flat(batch.pixels), wavelength=each(batch.wavelength), bandwidth=each(batch.bandwidth),
                 kind=each(batch.kind), time=each(batch.time), valid=flat(batch.valid), gsd=each(batch.gsd),
                 lonlat=None if batch.lonlat is None else each(batch.lonlat),
                 sensor=None if batch.sensor is None else each(batch.sensor))
