"""Per-sample geometry (crop, flips, rot90) and per-batch work (normalise, observation dropout, collate).

Geometry is applied to the raw ``[C, H, W]`` source-dtype arrays *before* normalisation, so only the
cropped pixels are ever converted to float. Normalisation, the valid mask and the band descriptor
tensors are built once per batch with vectorised numpy, which is where the pipeline's time goes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gfm.batch import Batch, sensor_code
from gfm.data.sources import DatasetIndex
from gfm.schema import SchemaError, Tile
from gfm.sensors import KIND_CODE

_EPOCH_DAY = np.datetime64("1970-01-01", "D")


@dataclass(frozen=True)
class Geometry:
    """Where and how one sample is cut: window ``[top:top+h, left:left+w]``, then flips, then rot90 ``k``."""

    top: int
    left: int
    h: int
    w: int
    hflip: bool
    vflip: bool
    k: int


@dataclass(frozen=True)
class Augment:
    """Random geometry settings. ``crop_size`` None or 0 keeps the full tile."""

    crop_size: int | None = None
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False

    def draw(self, rng: np.random.Generator, h: int, w: int) -> Geometry:
        """Draw one sample's geometry for a tile of ``h × w`` pixels (always the same number of draws)."""
        size = self.crop_size or 0
        ch, cw = (min(size, h), min(size, w)) if size else (h, w)
        u = rng.random(5)  # fixed draw count keeps the stream aligned whatever the settings
        top = int(u[0] * (h - ch + 1))
        left = int(u[1] * (w - cw + 1))
        k = int(u[4] * 4) if self.rot90 else 0
        if ch != cw:
            k = 2 * (k // 2)  # a quarter turn would change the shape of a non-square window
        hflip, vflip = bool(self.hflip and u[2] < 0.5), bool(self.vflip and u[3] < 0.5)
        return Geometry(top, left, ch, cw, hflip, vflip, k)


def apply_geometry(a: np.ndarray, g: Geometry) -> np.ndarray:
    """Cut and turn an array ``[..., H, W]`` → ``[..., h, w]`` (a view where possible)."""
    out = a[..., g.top : g.top + g.h, g.left : g.left + g.w]
    if g.hflip:
        out = out[..., :, ::-1]
    if g.vflip:
        out = out[..., ::-1, :]
    if g.k:
        out = np.rot90(out, g.k, axes=(-2, -1))
    return out


def days_since_epoch(date: str | None) -> float:
    """``"YYYY-MM-DD"`` → days since 1970-01-01 (float); None → NaN."""
    if date is None:
        return math.nan
    return float((np.datetime64(date, "D") - _EPOCH_DAY).astype(np.int64))


@dataclass
class BandTable:
    """Descriptor vectors and normalisation constants for one band-set signature.

    Attributes:
        wavelength, bandwidth: ``[C]`` float32 nm.
        kind: ``[C]`` int64 kind codes.
        mean, std: ``[C]`` float32 statistics from ``index.json`` (std ≤ 0 replaced by 1).
    """

    wavelength: np.ndarray
    bandwidth: np.ndarray
    kind: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_bands(cls, bands: Sequence[dict[str, Any]], index: DatasetIndex) -> BandTable:
        """Build from a tile's ``meta["bands"]``; a band without statistics is an error naming it."""
        norms = [index.norm(b["sensor"], b["name"]) for b in bands]
        std = np.array([s for _, s in norms], dtype=np.float32)
        return cls(
            wavelength=np.array([b["center_nm"] for b in bands], dtype=np.float32),
            bandwidth=np.array([b["fwhm_nm"] for b in bands], dtype=np.float32),
            kind=np.array([KIND_CODE[b["kind"]] for b in bands], dtype=np.int64),
            mean=np.array([m for m, _ in norms], dtype=np.float32),
            std=np.where(std > 0, std, np.float32(1.0)).astype(np.float32),
        )


def _nodata(value: Any, c: int) -> np.ndarray | None:
    """The ``nodata`` of meta.json (one value, or one per observation with None for "none") as ``[C, 1, 1]``."""
    if value is None:
        return None
    vals = value if isinstance(value, list) else [value] * c
    if len(vals) != c:
        raise SchemaError(f"meta.json nodata lists {len(vals)} values for {c} observations")
    arr = np.array([math.nan if v is None else float(v) for v in vals], dtype=np.float64)
    if np.isnan(arr).all():
        return None
    return arr[:, None, None]


def tile_lonlat(tile: Tile) -> tuple[float, float]:
    """meta.json's ``lonlat`` (tile centre, WGS84 degrees) as floats; NaN when absent or null.

    Raises:
        SchemaError: a value that is not ``[lon, lat]`` with lon in [-180, 180] and lat in [-90, 90].
    """
    value = tile.meta.get("lonlat")
    if value is None:
        return math.nan, math.nan
    ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if not ok or not (-180.0 <= value[0] <= 180.0 and -90.0 <= value[1] <= 90.0):
        raise SchemaError(f"sample {tile.key!r}: meta.json lonlat {value!r} is not [lon, lat] in degrees")
    return float(value[0]), float(value[1])


def check_tile(tile: Tile, crop_size: int | None) -> None:
    """Reader-side checks beyond the schema: big enough to crop, usable nodata and lonlat. Raises SchemaError.

    Leaves the parsed nodata (``[C, 1, 1]`` or None) in ``tile.extra["nodata"]`` for :func:`collate`.
    """
    c, h, w = tile.pixels.shape
    if crop_size and (h < crop_size or w < crop_size):
        raise SchemaError(f"sample {tile.key!r}: tile {h}x{w} is smaller than crop_size {crop_size}")
    tile.extra["nodata"] = _nodata(tile.meta.get("nodata"), c)
    tile_lonlat(tile)


def valid_masks(tiles: Sequence[Tile], geoms: Sequence[Geometry], px: np.ndarray) -> np.ndarray:
    """``[B, C, h, w]`` bool for the stacked pixels ``px``: ``valid.npy`` (if any) and not nodata/NaN."""
    b, c = px.shape[:2]
    mask = np.ones(px.shape, dtype=bool)
    nodata = [t.extra["nodata"] if "nodata" in t.extra else _nodata(t.meta.get("nodata"), c) for t in tiles]
    if any(n is not None for n in nodata):
        none = np.full((c, 1, 1), np.nan)
        nd = np.stack([none if n is None else n for n in nodata])  # [B, C, 1, 1] float64, NaN = none
        if np.array_equal(nd, np.broadcast_to(nd[:1], nd.shape), equal_nan=True):
            nd = nd[0]  # usually one value for the whole batch: compare once per channel
        has = ~np.isnan(nd)
        if px.dtype.kind in "iu" and has.any():
            info = np.iinfo(px.dtype)
            vals = np.where(has, nd, 0)
            if ((vals == np.round(vals)) & (vals >= info.min) & (vals <= info.max)).all():
                # compare in the source dtype: 5x cheaper than promoting the pixels to float64
                mask &= (px != vals.astype(px.dtype)) | ~has
            else:
                mask &= px != nd
        else:
            mask &= px != nd  # NaN entries never match
    if px.dtype.kind == "f":
        mask &= np.isfinite(px)
    for i, (t, g) in enumerate(zip(tiles, geoms)):
        if t.valid is not None:
            mask[i] &= apply_geometry(t.valid, g).astype(bool)  # [h, w] broadcasts over C
    return mask


def collate(
    tiles: Sequence[Tile], geoms: Sequence[Geometry], table: BandTable, keep: np.ndarray | None = None
) -> Batch:
    """Normalise, mask and stack tiles of one signature into a :class:`Batch`.

    Args:
        tiles: B tiles with the same band set and the same geometry size.
        geoms: one :class:`Geometry` per tile.
        table: the signature's descriptors and statistics.
        keep: optional ``[C']`` observation indices kept (spectral/temporal dropout), same for the batch.

    Returns:
        a Batch with ``pixels [B, C', h, w]`` float32 where invalid pixels are 0 (the band mean), the
        tile centres ``lonlat [B, 2]`` (NaN when unknown) and the sensor id of each observation.
    """
    px = np.stack([apply_geometry(t.pixels, g) for t, g in zip(tiles, geoms)])  # [B, C, h, w] source dtype
    valid = valid_masks(tiles, geoms, px)  # [B, C, h, w] bool
    times = np.array(
        [[days_since_epoch(b["time"]) for b in t.meta["bands"]] for t in tiles], dtype=np.float32
    )  # [B, C]
    wl, bw, kind, mean, std = table.wavelength, table.bandwidth, table.kind, table.mean, table.std
    sensor = np.array([sensor_code(b["sensor"]) for b in tiles[0].meta["bands"]], dtype=np.int64)  # one signature
    if keep is not None:
        px, valid, times = px[:, keep], valid[:, keep], times[:, keep]
        wl, bw, kind, mean, std, sensor = wl[keep], bw[keep], kind[keep], mean[keep], std[keep], sensor[keep]
    x = px.astype(np.float32)
    x -= mean[None, :, None, None]
    x *= (1.0 / std)[None, :, None, None]
    x[~valid] = 0.0
    b = len(tiles)
    label: torch.Tensor | None = None
    labels = [t.label for t in tiles]
    if all(isinstance(lb, np.ndarray) for lb in labels):
        seg = np.stack([apply_geometry(lb, g) for lb, g in zip(labels, geoms)])  # type: ignore[arg-type]
        label = torch.from_numpy(seg.astype(np.int64))  # [B, h, w]
    elif all(isinstance(lb, int) for lb in labels):
        label = torch.tensor(labels, dtype=torch.int64)  # [B]
    return Batch(
        pixels=torch.from_numpy(x),
        wavelength=torch.from_numpy(np.broadcast_to(wl, (b, wl.shape[0])).copy()),
        bandwidth=torch.from_numpy(np.broadcast_to(bw, (b, bw.shape[0])).copy()),
        kind=torch.from_numpy(np.broadcast_to(kind, (b, kind.shape[0])).copy()),
        time=torch.from_numpy(times),
        valid=torch.from_numpy(valid),
        gsd=torch.tensor([float(t.meta["gsd_m"]) for t in tiles], dtype=torch.float32),
        lonlat=torch.tensor([tile_lonlat(t) for t in tiles], dtype=torch.float32),
        sensor=torch.from_numpy(np.broadcast_to(sensor, (b, sensor.shape[0])).copy()),
        label=label,
        keys=[t.key for t in tiles],
    )


def draw_keep(
    rng: np.random.Generator,
    times: Sequence[str | None],
    obs_dropout: float,
    time_dropout: float,
    min_obs: int,
) -> np.ndarray | None:
    """Observation indices one batch keeps (None = all), drawn for the batch's first tile's dates.

    Whole dates are dropped with probability ``time_dropout`` (when there are several), single
    observations with ``obs_dropout``; at least ``min_obs`` survive.
    Always draws the same number of random values for a given C, so streams stay aligned.
    """
    c = len(times)
    u_obs = rng.random(c)
    dates = sorted({str(t) for t in times})
    u_time = dict(zip(dates, rng.random(len(dates))))
    order = rng.permutation(c)
    if len(dates) < 2:
        time_dropout = 0.0  # one date: dropping it would drop everything
    if obs_dropout <= 0 and time_dropout <= 0:
        return None
    keep = np.array([u_time[str(t)] >= time_dropout and u_obs[i] >= obs_dropout for i, t in enumerate(times)])
    if keep.sum() < min(min_obs, c):
        keep[order[: min(min_obs, c)]] = True
    if keep.all():
        return None
    return np.flatnonzero(keep)
