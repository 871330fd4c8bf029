"""Tokens: per-observation patch embedding and the continuous positional-channel embedding.

Every observation (a (band, time) pair) is cut into ``p × p`` patches by one shared linear map, so a
model takes any number of bands in any order. Optional *spectral patching* folds ``s`` adjacent
observations into one token (hyperspectral cubes with C ≈ 200); the group is then described by the
wavelength span it covers.

Where a token sits is told by physics, not by an index into a fixed band list:

- position: the patch's offset inside the tile in metres (grid index × p × GSD), 2D sin-cos;
- channel: log wavelength and log bandwidth (one scale from 400 nm light to 5.5 cm C-band radar),
  the observation kind (reflectance, thermal, SAR polarisation, index), and the acquisition date
  (day of year, year; NaN = unknown). Fixed sin-cos features go through a small learned MLP, so an
  unseen sensor or wavelength still lands near its physical neighbours.

Shapes: ``B`` batch, ``C`` observations (token rows after spectral grouping), ``N = h·w`` patch
positions, ``D`` embedding width. The token grid is ``[B, C+1, N+1, D]``: row 0 is the summary row
(one token per position), column 0 the summary column (one token per observation), ``[0, 0]`` the
global CLS token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from gfm.sensors import KINDS

#: Day length of the mean Gregorian year, for day-of-year and year features.
DAYS_PER_YEAR = 365.2425
#: Years are embedded relative to this one (Landsat-era to decades ahead stay well inside one period).
REFERENCE_YEAR = 2000.0


def geometric_periods(num: int, shortest: float, longest: float) -> torch.Tensor:
    """``num`` periods spaced geometrically from ``shortest`` to ``longest``: ``[num]``."""
    if num == 1:
        return torch.tensor([shortest], dtype=torch.float64)
    return torch.logspace(math.log10(shortest), math.log10(longest), num, dtype=torch.float64)


def sincos(x: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """Sin-cos features of ``x: [...]`` at the given ``periods: [K]`` → ``[..., 2K]``.

    Computed in float64: metre offsets and log wavelengths need the precision at short periods.
    """
    angle = x.double()[..., None] * (2 * math.pi / periods.to(x.device))
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(torch.float32)


# ------------------------------------------------------------------------------------------------
# Patches


def pad_to_multiple(pixels: torch.Tensor, valid: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``pixels, valid: [B, C, H, W]`` right/bottom to multiples of ``patch_size``.

    Padding is zero and invalid, so it never reaches a loss and never carries fill values.
    """
    H, W = pixels.shape[-2:]
    ph, pw = (-H) % patch_size, (-W) % patch_size
    if ph or pw:
        pixels = F.pad(pixels, (0, pw, 0, ph))
        valid = F.pad(valid, (0, pw, 0, ph), value=False)
    return pixels, valid


def group_observations(x: torch.Tensor, spectral_patch: int, fill: float | bool = 0.0) -> torch.Tensor:
    """Pad the observation axis of ``x: [B, C, ...]`` to a multiple of ``spectral_patch`` with ``fill``."""
    C = x.shape[1]
    pad = (-C) % spectral_patch
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[1] = pad
    return torch.cat([x, x.new_full(shape, fill)], dim=1)


def patchify(pixels: torch.Tensor, patch_size: int, spectral_patch: int = 1) -> torch.Tensor:
    """Cut ``pixels: [B, C, H, W]`` into patch vectors ``[B, C/s, N, s·p·p]``.

    ``H``, ``W`` must be multiples of ``p`` and ``C`` of ``s`` (see :func:`pad_to_multiple`,
    :func:`group_observations`). Positions run row-major over the ``h × w`` grid.
    """
    return rearrange(
        pixels, "b (g s) (h p1) (w p2) -> b g (h w) (s p1 p2)", s=spectral_patch, p1=patch_size, p2=patch_size
    )


def unpatchify(
    tokens: torch.Tensor, patch_size: int, grid_hw: tuple[int, int], spectral_patch: int = 1
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, C/s, N, s·p·p]`` → ``[B, C, h·p, w·p]``."""
    h, w = grid_hw
    return rearrange(
        tokens, "b g (h w) (s p1 p2) -> b (g s) (h p1) (w p2)", h=h, w=w, s=spectral_patch, p1=patch_size, p2=patch_size
    )


class PatchEmbed(nn.Module):
    """One linear map shared by every observation: ``s·p·p`` pixels → ``D``.

    Args:
        patch_size: ``p``, pixels per patch side.
        embed_dim: ``D``.
        spectral_patch: ``s``, adjacent observations folded into one token (1 = one token per band).
    """

    def __init__(self, patch_size: int, embed_dim: int, spectral_patch: int = 1) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.spectral_patch = spectral_patch
        self.proj = nn.Linear(spectral_patch * patch_size * patch_size, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels: [B, C, H, W]`` (already padded, invalid pixels zeroed) → ``[B, C/s, N, D]``."""
        return self.proj(patchify(pixels, self.patch_size, self.spectral_patch))

    def flops(self, num_tokens: int) -> int:
        """Forward matmul FLOPs for ``num_tokens`` (observation, position) tokens of one sample."""
        return 2 * num_tokens * self.proj.in_features * self.proj.out_features


@dataclass
class Descriptors:
    """The physical description of each token row, ``[B, C]`` each (after spectral grouping).

    ``wavelength``/``bandwidth`` in nm, ``kind`` int64 codes, ``time`` days since 1970 (NaN unknown).
    """

    wavelength: torch.Tensor
    bandwidth: torch.Tensor
    kind: torch.Tensor
    time: torch.Tensor

    def take(self, index: torch.Tensor) -> Descriptors:
        """Rows picked per sample by ``index: [B, L]``."""
        return Descriptors(*(t.gather(1, index) for t in (self.wavelength, self.bandwidth, self.kind, self.time)))


def group_descriptors(
    wavelength: torch.Tensor, bandwidth: torch.Tensor, kind: torch.Tensor, time: torch.Tensor, spectral_patch: int
) -> Descriptors:
    """Describe each group of ``s`` adjacent observations (inputs ``[B, C]``, output ``[B, C/s]``).

    A group is embedded as the wavelength interval it spans: centre = middle of
    ``[min(λ - Δλ/2), max(λ + Δλ/2)]``, bandwidth = its width; kind and date are the first member's.
    The padded tail repeats the last observation, which leaves the span unchanged.
    """
    if spectral_patch == 1:
        return Descriptors(wavelength, bandwidth, kind, time)
    C = wavelength.shape[1]
    pad = (-C) % spectral_patch

    def grouped(x: torch.Tensor) -> torch.Tensor:
        if pad:
            x = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1)
        return rearrange(x, "b (g s) -> b g s", s=spectral_patch)

    lo = grouped(wavelength - bandwidth / 2).amin(-1)
    hi = grouped(wavelength + bandwidth / 2).amax(-1)
    return Descriptors((lo + hi) / 2, hi - lo, grouped(kind)[..., 0], grouped(time)[..., 0])


# ------------------------------------------------------------------------------------------------
# Positional and channel embeddings


class PositionEmbed(nn.Module):
    """Fixed 2D sin-cos embedding of patch offsets in metres: ``[B, N, 2] → [B, N, D]``.

    Half the width encodes the row offset, half the column offset, each at ``D/4`` geometric periods
    between ``shortest_m`` and ``longest_m``. Metres (not grid indices) make a 10 m Sentinel-2 tile
    and a 30 m Landsat tile of the same ground agree.
    """

    def __init__(self, embed_dim: int, shortest_m: float = 1.0, longest_m: float = 1e5) -> None:
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of 4 for the 2D sin-cos embedding")
        self.register_buffer("periods", geometric_periods(embed_dim // 4, shortest_m, longest_m), persistent=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords: [B, N, 2]`` (row, col offset in metres) → ``[B, N, D]``."""
        periods: torch.Tensor = self.periods  # type: ignore[assignment]
        return torch.cat([sincos(coords[..., 0], periods), sincos(coords[..., 1], periods)], dim=-1)


def grid_coords(grid_hw: tuple[int, int], patch_size: int, gsd: torch.Tensor) -> torch.Tensor:
    """Offsets of the patch grid in metres, row-major: ``gsd: [B]`` → ``[B, N, 2]`` (row, col)."""
    h, w = grid_hw
    rows, cols = torch.meshgrid(
        torch.arange(h, device=gsd.device), torch.arange(w, device=gsd.device), indexing="ij"
    )
    index = torch.stack([rows.flatten(), cols.flatten()], dim=-1).to(torch.float32)  # [N, 2]
    return index[None] * (patch_size * gsd.float())[:, None, None]


class ChannelEmbed(nn.Module):
    """Embed an observation's physical description: ``[B, C]`` descriptors → ``[B, C, D]``.

    Fixed features: sin-cos of ln(wavelength / nm) and ln(bandwidth / nm) at geometric periods (the
    shortest resolves 10 nm hyperspectral steps at 2.5 µm, the longest spans light to radar); day of
    year as its first ``time_harmonics`` annual harmonics; the year at periods of 2..200 years; a
    flag for a known date. Unknown dates (NaN) give zero time features and a zero flag, so NaN never
    propagates. ``kind`` enters through a learned embedding. A two-layer MLP maps all to ``D``.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int | None = None,
        num_spectral: int = 16,
        time_harmonics: int = 3,
        num_year: int = 4,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or embed_dim
        # ln λ spans ~6.0 (400 nm) .. ~17.8 (5.5 cm); neighbouring hyperspectral bands differ by ~0.004.
        self.register_buffer("log_periods", geometric_periods(num_spectral, 0.01, 50.0), persistent=False)
        self.register_buffer(
            "year_periods", geometric_periods(num_year, 2.0, 200.0), persistent=False
        )
        self.register_buffer(
            "doy_periods", DAYS_PER_YEAR / torch.arange(1, time_harmonics + 1, dtype=torch.float64), persistent=False
        )
        num_features = 2 * 2 * num_spectral + 2 * time_harmonics + 2 * num_year + 1
        self.fc1 = nn.Linear(num_features, hidden_dim)
        self.kind_embed = nn.Embedding(len(KINDS), hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def features(self, d: Descriptors) -> torch.Tensor:
        """The fixed features ``[B, C, F]``."""
        log_periods: torch.Tensor = self.log_periods  # type: ignore[assignment]
        year_periods: torch.Tensor = self.year_periods  # type: ignore[assignment]
        doy_periods: torch.Tensor = self.doy_periods  # type: ignore[assignment]
        wl = sincos(d.wavelength.clamp_min(1e-3).log(), log_periods)
        bw = sincos(d.bandwidth.clamp_min(1e-3).log(), log_periods)
        known = torch.isfinite(d.time)
        days = torch.where(known, d.time, torch.zeros_like(d.time))  # NaN never enters sin/cos
        doy = sincos(days, doy_periods)
        year = sincos(days / DAYS_PER_YEAR + 1970.0 - REFERENCE_YEAR, year_periods)
        time = torch.cat([doy, year], dim=-1) * known[..., None]
        return torch.cat([wl, bw, time, known[..., None].float()], dim=-1)

    def forward(self, d: Descriptors) -> torch.Tensor:
        """Descriptors ``[B, C]`` → ``[B, C, D]``."""
        h = self.fc1(self.features(d)) + self.kind_embed(d.kind)
        return self.fc2(self.act(h))

    def flops(self, num_obs: int) -> int:
        """Forward matmul FLOPs for ``num_obs`` observations of one sample."""
        fc1, fc2 = self.fc1, self.fc2
        return 2 * num_obs * (fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features)


class PosChanEmbed(nn.Module):
    """Positional-channel embedding of the whole token grid: ``[B, C+1, N+1, D]``.

    Observation tokens get position + channel; the summary row gets the position of its column, the
    summary column the channel of its row (so every summary token knows what it summarises); CLS
    gets zero.
    """

    def __init__(self, embed_dim: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.pos = PositionEmbed(embed_dim)
        self.chan = ChannelEmbed(embed_dim, act_layer=act_layer)

    def forward(self, coords: torch.Tensor, d: Descriptors) -> torch.Tensor:
        """``coords: [B, N, 2]`` metres, descriptors ``[B, C]`` → ``[B, C+1, N+1, D]``."""
        pos = self.pos(coords)  # [B, N, D]
        chan = self.chan(d)  # [B, C, D]
        pos = F.pad(pos, (0, 0, 1, 0))  # [B, N+1, D], zero for the summary column
        chan = F.pad(chan, (0, 0, 1, 0))  # [B, C+1, D], zero for the summary row
        return rearrange(pos, "b n d -> b 1 n d") + rearrange(chan, "b c d -> b c 1 d")


def add_summary_tokens(
    x: torch.Tensor, cls_token: torch.Tensor, row_token: torch.Tensor, col_token: torch.Tensor
) -> torch.Tensor:
    """Frame ``x: [B, C, N, D]`` with the summary row, summary column and CLS → ``[B, C+1, N+1, D]``.

    The tokens are ``[D]`` parameters.
    """
    B, C, N, _ = x.shape
    col = repeat(col_token, "d -> b c 1 d", b=B, c=C)
    x = torch.cat([col, x], dim=2)  # [B, C, N+1, D]
    row = torch.cat([repeat(cls_token, "d -> b 1 1 d", b=B), repeat(row_token, "d -> b 1 n d", b=B, n=N)], dim=2)
    return torch.cat([row, x], dim=1)
