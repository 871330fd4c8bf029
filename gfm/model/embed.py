"""Tokens: per-observation patch embedding, spectral grouping, and the continuous embeddings.

Every observation (a (band, time) pair) is cut into ``p × p`` patches by one shared linear map, so a
model takes any number of bands in any order. Optional *spectral patching* (gfm extension) folds up
to ``s`` consecutive observations of one sensor, date and kind into one token (hyperspectral cubes
with C ≈ 200); a group never spans two sensors, dates or kinds, and is described by the wavelength
span it covers.

Where a token sits is told by physics, not by an index into a fixed band list:

- position: the patch's offset inside the tile in metres (grid index × p × GSD), 2D sin-cos at
  periods no shorter than two patch pitches at the finest GSD the model is meant for;
- channel: log wavelength and log bandwidth (one scale from 400 nm light to 5.5 cm C-band radar) and
  the observation kind (reflectance, thermal, SAR polarisation, index), through a small learned MLP,
  so an unseen sensor or wavelength still lands near its physical neighbours;
- metadata (gfm extension): the acquisition date (day of year, year) per observation, and per tile
  its location on the sphere (spherical harmonics of lon/lat) and its GSD, each through its own small
  MLP and added with a learned scale. Any unknown value (NaN) is replaced by a learned "unknown" embedding of its
  kind, so nothing is silently defaulted and NaN never reaches a feature.

Shapes: ``B`` batch, ``C`` observations, ``G`` token rows after spectral grouping (``G = C`` when
``s = 1``), ``N = h·w`` patch positions, ``D`` embedding width. The token grid is ``[B, G+1, N+1, D]``:
row 0 is the summary row (one token per position), column 0 the summary column (one token per row),
``[0, 0]`` the global CLS token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from gfm.sensors import KIND_SLOTS, KINDS

#: Day length of the mean Gregorian year, for day-of-year and year features.
DAYS_PER_YEAR = 365.2425
#: Years are embedded relative to this one (Landsat-era to decades ahead stay well inside one period).
REFERENCE_YEAR = 2000.0


def geometric_periods(num: int, shortest: float, longest: float) -> torch.Tensor:
    """``num`` periods spaced geometrically from ``shortest`` to ``longest``: ``[num]``."""
    if num == 1:
        return torch.tensor([shortest], dtype=torch.float64)
    return torch.logspace(math.log10(shortest), math.log10(longest), num, dtype=torch.float64)


class Float64Buffers(nn.Module):
    """A module whose float64 buffers (fixed periods) follow it across devices but never change dtype.

    ``model.to(torch.bfloat16)`` and DeepSpeed's bf16 mode (``module.bfloat16()``) cast every floating
    buffer: rounded to bf16 (0.4 % at most), the shortest spectral period turns the sin-cos features of
    ln λ by more than a whole turn, and the tiny model's channel and date embeddings then differed from
    fp32 by 60-80 %. The periods are constants computed in float64 (:func:`sincos`), so they keep it.
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Float64Buffers:
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float64}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float64 and not before.is_meta:
                self._buffers[name] = before.to(after.device)
        return self


def sincos(x: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """Sin-cos features of ``x: [...]`` at the given ``periods: [K]`` → ``[..., 2K]``.

    Computed in float64: metre offsets and log wavelengths need the precision at short periods.
    """
    angle = x.double()[..., None] * (2 * math.pi / periods.to(x.device))
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(torch.float32)


def known(x: torch.Tensor) -> torch.Tensor:
    """True where a metadata value is known (finite and, for physical sizes, positive)."""
    return torch.isfinite(x) & (x > 0)


# ------------------------------------------------------------------------------------------------
# Patches and spectral groups


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


@dataclass
class SpectralGroups:
    """Which observation fills which slot of which token row (spectral patching).

    Attributes:
        size: ``s``, slots per group.
        member: ``[B, G·s]`` int64, the observation in each slot (``C`` = empty slot).
        slot: ``[B, C]`` int64, the slot of each observation (inverse of ``member``).
        num_obs: ``C``.
    """

    size: int
    member: torch.Tensor
    slot: torch.Tensor
    num_obs: int

    @property
    def num_groups(self) -> int:
        """``G``, token rows."""
        return self.member.shape[1] // self.size

    @property
    def filled(self) -> torch.Tensor:
        """``[B, G·s]`` bool, True where a slot holds an observation."""
        return self.member < self.num_obs

    def group(self, x: torch.Tensor, fill: float | bool = 0.0) -> torch.Tensor:
        """Observations ``[B, C, ...]`` → slots ``[B, G·s, ...]`` (empty slots hold ``fill``)."""
        pad = x.new_full((x.shape[0], 1, *x.shape[2:]), fill)
        index = self.member.view(*self.member.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return torch.cat([x, pad], dim=1).gather(1, index)

    def ungroup(self, x: torch.Tensor) -> torch.Tensor:
        """Slots ``[B, G·s, ...]`` → observations ``[B, C, ...]`` (inverse of :meth:`group`)."""
        index = self.slot.view(*self.slot.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)


def spectral_groups(
    kind: torch.Tensor, time: torch.Tensor, sensor: torch.Tensor | None, spectral_patch: int
) -> SpectralGroups:
    """Fold runs of consecutive observations that share sensor, date and kind into groups of ≤ ``s``.

    ``kind, time, sensor: [B, C]`` (``sensor`` None = one sensor; two unknown dates count as the
    same date). Each run is cut into groups of ``s`` from its start; a run's last group may be
    short, and samples with fewer groups than the batch's most get empty trailing rows (all their
    pixels invalid). With ``s = 1`` every observation is its own row.
    """
    B, C = kind.shape
    device = kind.device
    obs = torch.arange(C, device=device)
    if spectral_patch == 1:
        index = obs.expand(B, C)
        return SpectralGroups(1, index, index, C)
    same = kind[:, 1:] == kind[:, :-1]
    same &= (time[:, 1:] == time[:, :-1]) | (time[:, 1:].isnan() & time[:, :-1].isnan())
    if sensor is not None:
        same &= sensor[:, 1:] == sensor[:, :-1]
    run_start = F.pad(~same, (1, 0), value=True)  # [B, C]
    first = torch.where(run_start, obs, torch.zeros_like(obs)).cummax(dim=1).values  # run's first observation
    in_run = obs - first
    group_start = run_start | (in_run % spectral_patch == 0)
    group_id = group_start.long().cumsum(dim=1) - 1
    num_groups = int(group_id[:, -1].max()) + 1  # host sync: the row count is data-dependent
    slot = group_id * spectral_patch + in_run % spectral_patch  # [B, C]
    member = torch.full((B, num_groups * spectral_patch), C, dtype=torch.long, device=device)
    member.scatter_(1, slot, obs.expand(B, C))
    return SpectralGroups(spectral_patch, member, slot, C)


def patchify(pixels: torch.Tensor, patch_size: int, spectral_patch: int = 1) -> torch.Tensor:
    """Cut ``pixels: [B, G·s, H, W]`` (slots) into patch vectors ``[B, G, N, s·p·p]``.

    ``H``, ``W`` must be multiples of ``p`` (see :func:`pad_to_multiple`). Positions run row-major
    over the ``h × w`` grid.
    """
    return rearrange(
        pixels, "b (g s) (h p1) (w p2) -> b g (h w) (s p1 p2)", s=spectral_patch, p1=patch_size, p2=patch_size
    )


def unpatchify(
    tokens: torch.Tensor, patch_size: int, grid_hw: tuple[int, int], spectral_patch: int = 1
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, G, N, s·p·p]`` → ``[B, G·s, h·p, w·p]``."""
    h, w = grid_hw
    return rearrange(
        tokens, "b g (h w) (s p1 p2) -> b (g s) (h p1) (w p2)", h=h, w=w, s=spectral_patch, p1=patch_size, p2=patch_size
    )


class PatchEmbed(nn.Module):
    """One linear map shared by every observation: ``s·p·p`` pixels → ``D``.

    Args:
        patch_size: ``p``, pixels per patch side.
        embed_dim: ``D``.
        spectral_patch: ``s``, observations folded into one token (1 = one token per band).
    """

    def __init__(self, patch_size: int, embed_dim: int, spectral_patch: int = 1) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.spectral_patch = spectral_patch
        self.proj = nn.Linear(spectral_patch * patch_size * patch_size, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels: [B, G·s, H, W]`` (padded, grouped, invalid pixels zeroed) → ``[B, G, N, D]``."""
        patches = patchify(pixels, self.patch_size, self.spectral_patch)
        return self.proj(patches.to(self.proj.weight.dtype))  # fp32 pixels into bf16 weights (DeepSpeed bf16)

    def flops(self, num_tokens: int) -> int:
        """Forward matmul FLOPs for ``num_tokens`` (row, position) tokens of one sample."""
        return 2 * num_tokens * self.proj.in_features * self.proj.out_features


class SpectralPatchEmbed(Float64Buffers):
    """Patches → tokens with per-band weights made from each band's wavelength and bandwidth (gfm).

    A token of a group of up to ``s`` observations at one position is

        t = b + (1 / n) · Σ_k  W(λ_k, Δλ_k) · x_k,    W(λ, Δλ) ∈ R^{D × p²}

    where ``x_k`` is observation ``k``'s ``p × p`` patch, ``n`` the group's filled slots and ``W`` comes
    from a small MLP of the same sin-cos features of ln λ and ln Δλ that :class:`ChannelEmbed` uses (an
    unknown bandwidth has a learned feature vector; an unknown wavelength a learned weight). So a band
    is weighted by what it measures, not by the slot it happens to fill: 25 neighbouring AVIRIS bands
    fold into one token without losing their spectral shape, and a Sentinel-2 band lands near the
    Landsat band of the same wavelength even in a model that never saw Sentinel-2. A linear patch
    embedding (:class:`PatchEmbed`) instead gives slot ``k`` the same weights whatever band fills it.
    Related: DOFA's wavelength-conditioned dynamic patch embedding (Xiong et al., 2024).

    Args:
        patch_size: ``p``.
        embed_dim: ``D``.
        spectral_patch: ``s``, observations folded into one token.
        hidden_dim: width of the weight generator.
        num_spectral: sin-cos periods per spectral feature (as :class:`ChannelEmbed`).
    """

    def __init__(
        self, patch_size: int, embed_dim: int, spectral_patch: int = 1, hidden_dim: int = 128, num_spectral: int = 16
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.spectral_patch = spectral_patch
        self.embed_dim = embed_dim
        self.register_buffer("log_periods", geometric_periods(num_spectral, 0.01, 50.0), persistent=False)
        self.generator = nn.Sequential(
            nn.Linear(4 * num_spectral, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, patch_size * patch_size * embed_dim),
        )
        self.unknown_bandwidth = nn.Parameter(torch.zeros(2 * num_spectral))
        self.unknown_weight = nn.Parameter(torch.zeros(patch_size * patch_size * embed_dim))
        self.bias = nn.Parameter(torch.zeros(embed_dim))

    def weights(self, wavelength: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        """Per-slot weights ``[..., p²·D]`` from ``wavelength, bandwidth: [...]`` nm (NaN or ≤ 0 = unknown)."""
        periods: torch.Tensor = self.log_periods  # type: ignore[assignment]
        wl_ok, bw_ok = known(wavelength), known(bandwidth)
        f_wl = sincos(torch.where(wl_ok, wavelength, torch.ones_like(wavelength)).log(), periods)
        f_bw = sincos(torch.where(bw_ok, bandwidth, torch.ones_like(bandwidth)).log(), periods)
        f_bw = torch.where(bw_ok[..., None], f_bw, self.unknown_bandwidth.to(f_bw.dtype))
        w = self.generator(torch.cat([f_wl, f_bw], dim=-1).to(self.bias.dtype))
        return torch.where(wl_ok[..., None], w, self.unknown_weight.to(w.dtype))

    def slot_weights(self, wavelength: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        """:meth:`weights` of ``[B, S]`` slots, generated once per distinct ``(wavelength, bandwidth)``.

        The samples of a batch mostly share their bands (a tile's pixels as one-pixel samples all do), so
        the generator runs on the distinct pairs only and the result is gathered back: the same numbers,
        for a generator cost that no longer grows with the batch.
        """
        unknown = torch.full_like(wavelength, -1.0)  # every unknown value alike (NaN never equals itself)
        pairs = torch.stack([torch.where(known(wavelength), wavelength, unknown),
                             torch.where(known(bandwidth), bandwidth, unknown)], dim=-1).reshape(-1, 2)
        distinct, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        w = self.weights(distinct[:, 0], distinct[:, 1])
        return w[inverse].reshape(*wavelength.shape, w.shape[-1])

    def forward(
        self, pixels: torch.Tensor, wavelength: torch.Tensor, bandwidth: torch.Tensor, filled: torch.Tensor
    ) -> torch.Tensor:
        """Slots ``pixels: [B, G·s, H, W]`` (padded, grouped, invalid zeroed) → tokens ``[B, G, N, D]``.

        ``wavelength``, ``bandwidth``, ``filled: [B, G·s]`` describe each slot (empty slots: ``filled`` False).
        """
        s, q = self.spectral_patch, self.patch_size * self.patch_size
        w = self.slot_weights(wavelength, bandwidth) * filled[..., None]  # empty slots weigh nothing
        w = rearrange(w, "b (g s) (q d) -> b g (s q) d", s=s, q=q)
        x = patchify(pixels, self.patch_size, s)  # [B, G, N, s·p²]
        count = rearrange(filled, "b (g s) -> b g s", s=s).sum(-1).clamp(min=1)  # [B, G]
        tokens = torch.einsum("bgnk,bgkd->bgnd", x.to(w.dtype), w) / count[..., None, None].to(w.dtype)
        return tokens + self.bias

    def flops(self, num_tokens: int, num_slots: int = 0) -> int:
        """Forward matmul FLOPs: ``num_tokens`` tokens of one sample, ``num_slots`` generated weight rows."""
        gen = sum(2 * m.in_features * m.out_features for m in self.generator if isinstance(m, nn.Linear))
        return 2 * num_tokens * self.spectral_patch * self.patch_size**2 * self.embed_dim + num_slots * gen


@dataclass
class Descriptors:
    """The physical description of each token row, ``[B, G]`` each (after spectral grouping).

    ``wavelength``/``bandwidth`` in nm (NaN or ≤ 0 = unknown), ``kind`` int64 codes, ``time`` days
    since 1970 (NaN = unknown).
    """

    wavelength: torch.Tensor
    bandwidth: torch.Tensor
    kind: torch.Tensor
    time: torch.Tensor

    def take(self, index: torch.Tensor) -> Descriptors:
        """Rows picked per sample by ``index: [B, L]``."""
        return Descriptors(*(t.gather(1, index) for t in (self.wavelength, self.bandwidth, self.kind, self.time)))


def group_descriptors(
    wavelength: torch.Tensor, bandwidth: torch.Tensor, kind: torch.Tensor, time: torch.Tensor, groups: SpectralGroups
) -> Descriptors:
    """Describe each token row (inputs ``[B, C]``, output ``[B, G]``).

    A group is embedded as the wavelength interval it spans: centre = middle of
    ``[min(λ - Δλ/2), max(λ + Δλ/2)]``, bandwidth = its width (unknown when any member's bandwidth
    is; the centre then spans the members' centres). Kind and date are the first member's (all
    members share them). Empty rows copy observation 0's description; their tokens are invalid.
    """
    if groups.size == 1:
        return Descriptors(wavelength, bandwidth, kind, time)
    s = groups.size
    filled = rearrange(groups.filled, "b (g s) -> b g s", s=s)
    member = torch.where(groups.filled, groups.member, torch.zeros_like(groups.member))

    def slots(x: torch.Tensor) -> torch.Tensor:
        return rearrange(x.gather(1, member), "b (g s) -> b g s", s=s)

    bw_known = known(bandwidth)
    half = torch.where(bw_known, bandwidth, torch.zeros_like(bandwidth)) / 2
    inf = torch.full_like(filled, math.inf, dtype=wavelength.dtype)
    lo = torch.where(filled, slots(wavelength - half), inf).amin(-1)
    hi = torch.where(filled, slots(wavelength + half), -inf).amax(-1)
    all_known = (slots(bw_known) | ~filled).all(-1)
    width = torch.where(all_known, hi - lo, torch.full_like(hi, math.nan))
    return Descriptors((lo + hi) / 2, width, slots(kind)[..., 0], slots(time)[..., 0])


# ------------------------------------------------------------------------------------------------
# Position


def grid_coords(grid_hw: tuple[int, int], pitch: torch.Tensor) -> torch.Tensor:
    """Offsets of the patch grid in metres, row-major: ``pitch: [B]`` (p × GSD) → ``[B, N, 2]`` (row, col)."""
    h, w = grid_hw
    rows, cols = torch.meshgrid(
        torch.arange(h, device=pitch.device), torch.arange(w, device=pitch.device), indexing="ij"
    )
    index = torch.stack([rows.flatten(), cols.flatten()], dim=-1).to(torch.float32)  # [N, 2]
    return index[None] * pitch.float()[:, None, None]


class PositionEmbed(Float64Buffers):
    """Fixed 2D sin-cos embedding of patch offsets in metres: ``[B, N, 2] → [B, N, D]``.

    Half the width encodes the row offset, half the column offset, each at ``D/4`` geometric periods
    from ``shortest_m`` to ``longest_m``. Metres (not grid indices) make a 10 m Sentinel-2 tile and a
    30 m Landsat tile of the same ground agree. Positions are sampled once per patch pitch, so a
    period under two pitches aliases (at one pitch the sampled code is constant): ``shortest_m``
    should be ``2 · p · finest GSD`` (:class:`~gfm.model.encoder.LESSViT` sets it so). For a coarser
    sample, periods under two of its pitches fade linearly to zero at one pitch (gfm extension), so
    the aliased codes are attenuated and the embedding still changes continuously with GSD.
    """

    def __init__(self, embed_dim: int, shortest_m: float, longest_m: float = 1e5) -> None:
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of 4 for the 2D sin-cos embedding")
        self.register_buffer("periods", geometric_periods(embed_dim // 4, shortest_m, longest_m), persistent=False)

    def forward(self, coords: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
        """``coords: [B, N, 2]`` (row, col offset in metres), ``pitch: [B]`` metres → ``[B, N, D]``."""
        periods: torch.Tensor = self.periods  # type: ignore[assignment]
        fade = (periods.to(pitch.device)[None] / pitch.double()[:, None] - 1).clamp(0, 1)  # [B, K]
        fade = repeat(fade.float(), "b k -> b 1 (two k)", two=2)  # sin and cos of each period
        return torch.cat([sincos(coords[..., 0], periods) * fade, sincos(coords[..., 1], periods) * fade], dim=-1)


# ------------------------------------------------------------------------------------------------
# Channel and metadata


#: the key suffix of the kind table in a state dict (:func:`with_kind_room`)
KIND_TABLE = "kind_embed.weight"


class KindEmbedding(nn.Embedding):
    """The observation-kind table: :data:`~gfm.sensors.KIND_SLOTS` rows, one per kind code.

    The rows of the kinds gfm knows (:data:`~gfm.sensors.KINDS`) are initialised as an ``nn.Embedding`` of
    that many rows would be (the same random draws); the rest are zero, reserved for kinds added later: a
    model trained before a kind existed keeps its shape, its exports keep loading strictly, and the new
    kind adds nothing from the table until a model is trained with it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(KIND_SLOTS, dim, _weight=torch.zeros(KIND_SLOTS, dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 1.0) -> None:
        """N(0, ``std``) for the known kinds' rows, zero for the reserved ones."""
        with torch.no_grad():
            self.weight.zero_()
            nn.init.normal_(self.weight[: len(KINDS)], std=std)


def with_kind_room(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every kind table saved before it had room padded with zero rows to ``KIND_SLOTS``.

    Models exported before the table was sized :data:`~gfm.sensors.KIND_SLOTS` hold one row per kind
    then known (8); a zero row is what the reserved rows hold anyway. Other tensors are untouched; the
    dict is updated in place and returned.
    """
    for key, table in state.items():
        if key.endswith(KIND_TABLE) and table.ndim == 2 and table.shape[0] < KIND_SLOTS:
            state[key] = torch.cat([table, table.new_zeros(KIND_SLOTS - table.shape[0], table.shape[1])])
    return state


class ChannelEmbed(Float64Buffers):
    """Embed an observation's spectral description: wavelength, bandwidth, kind → ``[B, G, D]``.

    The paper embeds the centre wavelength alone with fixed sin-cos; the log scale, bandwidth, kind
    and learned MLP are gfm's (one scale from light to radar, VV ≠ VH, unseen sensors embed sensibly).

    Fixed features: sin-cos of ln(wavelength / nm) and ln(bandwidth / nm) at geometric periods (the
    shortest resolves 10 nm hyperspectral steps at 2.5 µm, the longest spans light to radar).
    ``kind`` enters through a learned embedding; an unknown wavelength or bandwidth contributes its
    learned "unknown" vector instead of its features. A two-layer MLP maps all to ``D``.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int | None = None,
        num_spectral: int = 16,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or embed_dim
        # ln λ spans ~6.0 (400 nm) .. ~17.8 (5.5 cm); neighbouring hyperspectral bands differ by ~0.004.
        self.register_buffer("log_periods", geometric_periods(num_spectral, 0.01, 50.0), persistent=False)
        self.fc_wavelength = nn.Linear(2 * num_spectral, hidden_dim)
        self.fc_bandwidth = nn.Linear(2 * num_spectral, hidden_dim, bias=False)
        self.unknown_wavelength = nn.Parameter(torch.zeros(hidden_dim))
        self.unknown_bandwidth = nn.Parameter(torch.zeros(hidden_dim))
        self.kind_embed = KindEmbedding(hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def _spectral(self, x: torch.Tensor, fc: nn.Linear, unknown: torch.Tensor) -> torch.Tensor:
        log_periods: torch.Tensor = self.log_periods  # type: ignore[assignment]
        ok = known(x)
        feats = sincos(torch.where(ok, x, torch.ones_like(x)).log(), log_periods)  # NaN never enters sin/cos
        y = fc(feats.to(fc.weight.dtype))
        return torch.where(ok[..., None], y, unknown.to(y.dtype))

    def forward(self, d: Descriptors) -> torch.Tensor:
        """Descriptors ``[B, G]`` → ``[B, G, D]``."""
        h = self._spectral(d.wavelength, self.fc_wavelength, self.unknown_wavelength)
        h = h + self._spectral(d.bandwidth, self.fc_bandwidth, self.unknown_bandwidth) + self.kind_embed(d.kind)
        return self.fc2(self.act(h))

    def flops(self, num_rows: int) -> int:
        """Forward matmul FLOPs for ``num_rows`` token rows of one sample."""
        fw, fb, f2 = self.fc_wavelength, self.fc_bandwidth, self.fc2
        return 2 * num_rows * (fw.in_features * fw.out_features + fb.in_features * fb.out_features
                               + f2.in_features * f2.out_features)


class MetaMLP(nn.Module):
    """Fixed features → ``D`` through a two-layer MLP; rows whose value is unknown get a learned vector.

    Args:
        in_features: feature width.
        embed_dim: ``D``.
        act_layer: activation type.
    """

    def __init__(self, in_features: int, embed_dim: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, embed_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(embed_dim, embed_dim)
        self.unknown = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, features: torch.Tensor, is_known: torch.Tensor) -> torch.Tensor:
        """``features: [..., F]`` (finite everywhere), ``is_known: [...]`` bool → ``[..., D]``."""
        y = self.fc2(self.act(self.fc1(features.to(self.fc1.weight.dtype))))
        return torch.where(is_known[..., None], y, self.unknown.to(y.dtype))

    def flops(self, rows: int) -> int:
        """Forward matmul FLOPs for ``rows`` inputs."""
        return 2 * rows * (self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features)


def time_features(time: torch.Tensor, doy_periods: torch.Tensor, year_periods: torch.Tensor) -> torch.Tensor:
    """Day-of-year harmonics and year sin-cos of ``time: [...]`` days since 1970 (NaN → zeros)."""
    ok = torch.isfinite(time)
    days = torch.where(ok, time, torch.zeros_like(time))  # NaN never enters sin/cos
    return torch.cat([sincos(days, doy_periods), sincos(days / DAYS_PER_YEAR + 1970.0 - REFERENCE_YEAR, year_periods)],
                     dim=-1)


def spherical_harmonics(lonlat: torch.Tensor, degree: int) -> torch.Tensor:
    """Real, orthonormal spherical harmonics ``Y_l^m`` for ``l < degree`` of ``lonlat: [..., 2]`` degrees.

    Returns ``[..., degree²]`` ordered ``(l, m)`` with ``m = -l..l``; ``m > 0`` uses ``cos(mφ)``,
    ``m < 0`` ``sin(|m|φ)``, no Condon-Shortley phase. The associated Legendre functions come from
    the standard stable recurrences on fully normalised functions, in float64.
    """
    lon, lat = torch.deg2rad(lonlat.double()).unbind(-1)
    x, y = torch.sin(lat), torch.cos(lat)  # cos and sin of the colatitude
    p: dict[tuple[int, int], torch.Tensor] = {(0, 0): torch.full_like(x, math.sqrt(1 / (4 * math.pi)))}
    for m in range(1, degree):
        p[m, m] = math.sqrt((2 * m + 1) / (2 * m)) * y * p[m - 1, m - 1]
    for m in range(degree - 1):
        p[m + 1, m] = math.sqrt(2 * m + 3) * x * p[m, m]
        for ell in range(m + 2, degree):
            a = math.sqrt((4 * ell * ell - 1) / (ell * ell - m * m))
            b = math.sqrt(((ell - 1) ** 2 - m * m) / (4 * (ell - 1) ** 2 - 1))
            p[ell, m] = a * (x * p[ell - 1, m] - b * p[ell - 2, m])
    out = []
    for ell in range(degree):
        for m in range(-ell, ell + 1):
            if m == 0:
                out.append(p[ell, 0])
            elif m > 0:
                out.append(math.sqrt(2) * p[ell, m] * torch.cos(m * lon))
            else:
                out.append(math.sqrt(2) * p[ell, -m] * torch.sin(-m * lon))
    return torch.stack(out, dim=-1).float()


class MetadataEmbed(Float64Buffers):
    """Date (per observation), location and GSD (per tile), each with a learned scale (gfm extension).

    - date: day of year as ``time_harmonics`` annual harmonics and the year at periods of 2..200
      years, read together with the location (day 180 is summer in one hemisphere, winter in the
      other);
    - location: real spherical harmonics of (lon, lat) up to ``sh_degree - 1`` (as SatCLIP's
      location encoder; smooth on the sphere, no seam at the antimeridian or pole);
    - GSD: sin-cos of ln(GSD / m).

    Each goes through its own :class:`MetaMLP`; an unknown value (NaN date, NaN location, NaN or
    non-positive GSD) gives that kind's learned "unknown" embedding. The scales start at 0.1 so
    metadata starts as a gentle hint next to the pixels.
    """

    def __init__(
        self,
        embed_dim: int,
        time_harmonics: int = 3,
        num_year: int = 4,
        sh_degree: int = 10,
        num_gsd: int = 6,
        init_scale: float = 0.1,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.sh_degree = sh_degree
        self.register_buffer(
            "doy_periods", DAYS_PER_YEAR / torch.arange(1, time_harmonics + 1, dtype=torch.float64), persistent=False
        )
        self.register_buffer("year_periods", geometric_periods(num_year, 2.0, 200.0), persistent=False)
        # ln GSD from ~0.1 m (-2.3) to ~1 km (6.9)
        self.register_buffer("gsd_periods", geometric_periods(num_gsd, 1.0, 40.0), persistent=False)
        self.time = MetaMLP(2 * time_harmonics + 2 * num_year, embed_dim, act_layer)
        self.location = MetaMLP(sh_degree**2, embed_dim, act_layer)
        self.gsd = MetaMLP(2 * num_gsd, embed_dim, act_layer)
        self.time_scale = nn.Parameter(torch.full((1,), init_scale))  # [1]: DeepSpeed cannot broadcast 0-dim
        self.location_scale = nn.Parameter(torch.full((1,), init_scale))
        self.gsd_scale = nn.Parameter(torch.full((1,), init_scale))

    def per_observation(self, time: torch.Tensor) -> torch.Tensor:
        """Date embedding ``time: [B, G]`` → ``[B, G, D]`` (scaled)."""
        doy: torch.Tensor = self.doy_periods  # type: ignore[assignment]
        year: torch.Tensor = self.year_periods  # type: ignore[assignment]
        return self.time_scale * self.time(time_features(time, doy, year), torch.isfinite(time))

    def per_tile(self, lonlat: torch.Tensor, gsd: torch.Tensor) -> torch.Tensor:
        """Location ``[B, 2]`` and GSD ``[B]`` embedding → ``[B, D]`` (scaled, summed)."""
        loc_known = torch.isfinite(lonlat).all(-1)
        where = torch.where(loc_known[:, None], lonlat, torch.zeros_like(lonlat))
        loc = self.location(spherical_harmonics(where, self.sh_degree), loc_known)
        gsd_known = known(gsd)
        gsd_periods: torch.Tensor = self.gsd_periods  # type: ignore[assignment]
        feats = sincos(torch.where(gsd_known, gsd, torch.ones_like(gsd)).log(), gsd_periods)
        return self.location_scale * loc + self.gsd_scale * self.gsd(feats, gsd_known)

    def flops(self, num_rows: int) -> int:
        """Forward matmul FLOPs for one sample with ``num_rows`` token rows."""
        return self.time.flops(num_rows) + self.location.flops(1) + self.gsd.flops(1)


@dataclass
class TileMeta:
    """Per-tile metadata the embedding reads: ``lonlat [B, 2]`` degrees, ``gsd [B]`` metres (NaN = unknown)."""

    lonlat: torch.Tensor
    gsd: torch.Tensor


class PosChanEmbed(nn.Module):
    """Positional-channel-metadata embedding of the whole token grid: ``[B, G+1, N+1, D]``.

    Observation tokens get position + channel + date; the summary row gets the position of its
    column, the summary column the channel and date of its row (so every summary token knows what it
    summarises). Every token, CLS included, gets the tile's location and GSD embedding. The paper
    adds position and wavelength only (its ``(pos + chan) / 2``); the metadata terms are a gfm
    extension.

    Args:
        embed_dim: ``D``.
        shortest_m: shortest position period in metres (``2 · p · finest GSD``).
        act_layer: activation type of the MLPs.
    """

    def __init__(self, embed_dim: int, shortest_m: float, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.pos = PositionEmbed(embed_dim, shortest_m)
        self.chan = ChannelEmbed(embed_dim, act_layer=act_layer)
        self.meta = MetadataEmbed(embed_dim, act_layer=act_layer)

    def forward(self, coords: torch.Tensor, pitch: torch.Tensor, d: Descriptors, tile: TileMeta) -> torch.Tensor:
        """``coords: [B, N, 2]`` metres, ``pitch: [B]`` m, descriptors ``[B, G]`` → ``[B, G+1, N+1, D]``."""
        pos = F.pad(self.pos(coords, pitch), (0, 0, 1, 0))  # [B, N+1, D], zero for the summary column
        chan = F.pad(self.chan(d) + self.meta.per_observation(d.time), (0, 0, 1, 0))  # [B, G+1, D]
        per_tile = self.meta.per_tile(tile.lonlat, tile.gsd)  # [B, D]
        return (rearrange(pos, "b n d -> b 1 n d") + rearrange(chan, "b c d -> b c 1 d")
                + rearrange(per_tile, "b d -> b 1 1 d"))

    def flops(self, num_rows: int) -> int:
        """Forward matmul FLOPs for one sample with ``num_rows`` token rows."""
        return self.chan.flops(num_rows) + self.meta.flops(num_rows)


def add_summary_tokens(
    x: torch.Tensor, cls_token: torch.Tensor, row_token: torch.Tensor, col_token: torch.Tensor
) -> torch.Tensor:
    """Frame ``x: [B, G, N, D]`` with the summary row, summary column and CLS → ``[B, G+1, N+1, D]``.

    The tokens are ``[D]`` parameters.
    """
    B, G, N, _ = x.shape
    col = repeat(col_token, "d -> b c 1 d", b=B, c=G)
    x = torch.cat([col, x], dim=2)  # [B, G, N+1, D]
    row = torch.cat([repeat(cls_token, "d -> b 1 1 d", b=B), repeat(row_token, "d -> b 1 n d", b=B, n=N)], dim=2)
    return torch.cat([row, x], dim=1)
