"""A synthetic, resumable stream of :class:`Batch` objects: smoke runs and benchmarks without shards.

The second data source beside the shard loader (:mod:`gfm.data.config`), with the same interface
(``build(rank, world_size)`` → an iterable with ``state_dict``/``load_state_dict``/``set_epoch``); it
needs neither webdataset nor any file.

Sample ``i`` of the stream is a pure function of ``(seed, i)``: a few smooth spatial patterns mixed with
band-dependent weights (so neighbouring wavelengths correlate, as in real spectra). The global stream is
cut into batches of ``batch_size × world_size`` and rank ``r`` takes the ``r``-th slice, so the samples of
one optimizer step do not depend on how many ranks share it, and the state is one integer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gfm.batch import Batch
from gfm.config import ConfigError
from gfm.sensors import get_sensor


@dataclass
class SyntheticDataConfig:
    """Synthetic tiles of a registered sensor.

    Attributes:
        sensor: sensor preset whose observation bands are used.
        num_bands: keep the first N bands (0 = all).
        tile: tile side in pixels.
        batch_size: samples per rank per micro-step.
        samples_per_epoch: size of one epoch of the global stream.
        patterns: smooth patterns mixed per sample.
        seed: stream seed.
    """

    sensor: str = "sentinel2_l2a"
    num_bands: int = 0
    tile: int = 32
    batch_size: int = 8
    samples_per_epoch: int = 4096
    patterns: int = 4
    seed: int = 0

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        try:
            bands = get_sensor(self.sensor).bands
        except (KeyError, ValueError) as e:
            raise ConfigError(f"sensor: {e}") from e
        if not 0 <= self.num_bands <= len(bands):
            raise ConfigError(f"num_bands: must be in [0, {len(bands)}], got {self.num_bands}")
        if self.tile < 1 or self.batch_size < 1 or self.samples_per_epoch < 1:
            raise ConfigError("tile, batch_size, samples_per_epoch: must be >= 1")

    def build(self, rank: int, world_size: int) -> SyntheticStream:
        """The stream as seen by ``rank`` of ``world_size``."""
        return SyntheticStream(self, rank, world_size)


class SyntheticStream:
    """Iterable of :class:`Batch` for one rank; ``state_dict`` is the global batch cursor."""

    def __init__(self, cfg: SyntheticDataConfig, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        bands = get_sensor(cfg.sensor).bands
        self.bands = bands[: cfg.num_bands] if cfg.num_bands else bands
        self.epoch = 0
        self.cursor = 0  # global batches consumed in this epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch."""
        return max(1, self.cfg.samples_per_epoch // (self.cfg.batch_size * self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch = epoch
        self.cursor = 0

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream; independent of the rank count."""
        return {"epoch": self.epoch, "cursor": self.cursor, "global_batch": self.cfg.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off (rescaled when the global batch size changed)."""
        self.epoch = int(state["epoch"])
        samples = int(state["cursor"]) * int(state.get("global_batch", self.cfg.batch_size * self.world_size))
        self.cursor = samples // (self.cfg.batch_size * self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        while self.cursor < self.batches_per_epoch:
            first = (self.epoch * self.batches_per_epoch + self.cursor) * self.cfg.batch_size * self.world_size
            first += self.rank * self.cfg.batch_size
            self.cursor += 1
            yield self.make_batch(range(first, first + self.cfg.batch_size))

    def make_batch(self, indices: range) -> Batch:
        """The batch of global sample ``indices``."""
        c, s = len(self.bands), self.cfg.tile
        wl = torch.tensor([b.center_nm for b in self.bands], dtype=torch.float32)
        pixels = torch.stack([self._sample(i, wl) for i in indices])  # [B, C, H, W]
        b = len(indices)
        return Batch(
            pixels=pixels,
            wavelength=wl.expand(b, c).clone(),
            bandwidth=torch.tensor([x.fwhm_nm for x in self.bands], dtype=torch.float32).expand(b, c).clone(),
            kind=torch.tensor([x.kind_code for x in self.bands], dtype=torch.int64).expand(b, c).clone(),
            time=torch.full((b, c), 19_000.0),
            valid=torch.ones(b, c, s, s, dtype=torch.bool),
            gsd=torch.full((b,), 10.0),
            keys=[f"synthetic-{i}" for i in indices],
        )

    def _sample(self, index: int, wavelength: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index)
        k, s = self.cfg.patterns, self.cfg.tile
        freq = torch.rand(k, 2, generator=g) * 3.0 + 0.5  # cycles per tile
        phase = torch.rand(k, generator=g) * 2 * math.pi
        yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        fields = torch.sin(2 * math.pi * (freq[:, :1, None] * yy + freq[:, 1:, None] * xx) + phase[:, None, None])
        # spectral weights vary smoothly with log-wavelength: [C, K]
        centre = torch.rand(k, generator=g) * 2.0 + 5.8  # log(nm) in ~[5.8, 7.8]
        logw = torch.log(wavelength)[:, None]
        weights = torch.exp(-((logw - centre) ** 2) / 0.3) + 0.1 * torch.randn(len(wavelength), k, generator=g)
        return torch.einsum("ck,khw->chw", weights, fields)  # [C, H, W]
