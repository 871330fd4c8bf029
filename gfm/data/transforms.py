"""Per-sample geometry (crop, flips, rot90) and per-batch work (normalise, observation dropout, collate).

Geometry is applied to the raw ``[C, H, W]`` source-dtype arrays *before* normalisation, so only the
cropped pixels are ever converted to float. Normalisation, the valid mask and the band descriptor
tensors are built once per batch with vectorised numpy, written straight into the batch's tensors,
which are carved out of one buffer (:func:`collate`'s ``buffer``: the loader's workers pass shared
memory that they reuse, so each byte of a batch is written once and handed over as one segment).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    """Cut and turn an array ``[..., H, W]`` → ``[..., h, w]`` (a view where possible).

    The crop, the flips, then ``np.rot90(..., g.k, axes=(-2, -1))`` spelt as slices and an axis swap.
    """
    out = a[..., g.top : g.top + g.h, g.left : g.left + g.w]
    if g.hflip:
        out = out[..., :, ::-1]
    if g.vflip:
        out = out[..., ::-1, :]
    if g.k == 1:
        out = out[..., :, ::-1].swapaxes(-2, -1)
    elif g.k == 2:
        out = out[..., ::-1, ::-1]
    elif g.k == 3:
        out = out.swapaxes(-2, -1)[..., :, ::-1]
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


_NODATA_CACHE: dict[tuple[Any, ...], np.ndarray | None] = {}


def _nodata(value: Any, c: int) -> np.ndarray | None:
    """The ``nodata`` of meta.json (one value, or one per observation with None for "none") as ``[C, 1, 1]``.

    Equal values give the same (read-only) array object, so a batch compares them by identity.
    """
    if value is None:
        return None
    vals = value if isinstance(value, list) else [value] * c
    try:
        key: tuple[Any, ...] | None = (c, *vals)
        hash(key)
    except TypeError:  # an unhashable entry: parsed (and refused) below
        key = None
    if key is not None and key in _NODATA_CACHE:
        return _NODATA_CACHE[key]
    if len(vals) != c:
        raise SchemaError(f"meta.json nodata lists {len(vals)} values for {c} observations")
    arr: np.ndarray | None = np.array([math.nan if v is None else float(v) for v in vals], dtype=np.float64)
    if arr is not None and np.isnan(arr).all():
        arr = None
    if arr is not None:
        arr = arr[:, None, None]
        arr.flags.writeable = False
    if key is not None and len(_NODATA_CACHE) < 1024:
        _NODATA_CACHE[key] = arr
    return arr


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

    Leaves the parsed nodata (``[C, 1, 1]`` or None) and lonlat in ``tile.extra`` for :func:`collate`.
    """
    c, h, w = tile.pixels.shape
    if crop_size and (h < crop_size or w < crop_size):
        raise SchemaError(f"sample {tile.key!r}: tile {h}x{w} is smaller than crop_size {crop_size}")
    tile.extra["nodata"] = _nodata(tile.meta.get("nodata"), c)
    tile.extra["lonlat"] = tile_lonlat(tile)


def valid_masks(
    tiles: Sequence[Tile], geoms: Sequence[Geometry], px: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``[B, C, h, w]`` bool for the stacked pixels ``px``: ``valid.npy`` (if any) and not nodata/NaN.

    Written into ``out`` when given (same shape, bool).
    """
    b, c = px.shape[:2]
    mask = np.empty(px.shape, dtype=bool) if out is None else out
    nodata = [t.extra["nodata"] if "nodata" in t.extra else _nodata(t.meta.get("nodata"), c) for t in tiles]
    if all(n is None for n in nodata):
        mask.fill(True)
    else:
        if all(n is nodata[0] for n in nodata):
            nd = nodata[0]  # usually one value for the whole batch: compare once per channel
        else:
            none = np.full((c, 1, 1), np.nan)
            nd = np.stack([none if n is None else n for n in nodata])  # [B, C, 1, 1] float64, NaN = none
            if np.array_equal(nd, np.broadcast_to(nd[:1], nd.shape), equal_nan=True):
                nd = nd[0]
        assert nd is not None
        has = ~np.isnan(nd)
        vals = np.where(has, nd, 0)
        integral = px.dtype.kind in "iu" and bool(has.any())
        if integral:
            info = np.iinfo(px.dtype)
            integral = bool(((vals == np.round(vals)) & (vals >= info.min) & (vals <= info.max)).all())
        if integral and has.all():
            np.not_equal(px, vals.astype(px.dtype), out=mask)  # 5x cheaper than promoting to float64
        elif integral:
            np.logical_or(px != vals.astype(px.dtype), ~has, out=mask)
        else:
            np.not_equal(px, nd, out=mask)  # NaN entries never match
    if px.dtype.kind == "f":
        mask &= np.isfinite(px)
    for i, (t, g) in enumerate(zip(tiles, geoms)):
        if t.valid is not None:
            np.logical_and(mask[i], apply_geometry(t.valid, g), out=mask[i])  # [h, w] broadcasts over C
    return mask


Layout = list[tuple[str, int, str, tuple[int, ...]]]  # (field, byte offset, dtype, shape)
_ALIGN = 64


def carve(
    fields: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], buffer: Callable[[int], torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], Layout]:
    """Tensors of the given (name, dtype, shape) as views into one uint8 buffer, 64-byte aligned.

    ``buffer(nbytes)`` supplies the buffer (at least ``nbytes``, uint8); default: a fresh one.
    """
    layout: Layout = []
    offset = 0
    for name, dtype, shape in fields:
        layout.append((name, offset, str(dtype).removeprefix("torch."), shape))
        offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    buf = torch.empty(offset, dtype=torch.uint8) if buffer is None else buffer(offset)
    return views(buf, layout), layout


def views(buf: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of ``layout`` as views into ``buf`` (inverse of :func:`carve`)."""
    out: dict[str, torch.Tensor] = {}
    for name, off, dtype_name, shape in layout:
        dtype = getattr(torch, dtype_name)
        out[name] = buf[off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
    return out


def _times(tiles: Sequence[Tile]) -> np.ndarray:
    """``[B, C]`` float32 days since 1970 of each observation; once per distinct band list object."""
    rows: dict[int, list[float]] = {}
    out = []
    for t in tiles:
        bands = t.meta["bands"]
        row = rows.get(id(bands))
        if row is None:
            row = rows[id(bands)] = [days_since_epoch(b["time"]) for b in bands]
        out.append(row)
    return np.array(out, dtype=np.float32)


def collate(
    tiles: Sequence[Tile],
    geoms: Sequence[Geometry],
    table: BandTable,
    keep: np.ndarray | None = None,
    buffer: Callable[[int], torch.Tensor] | None = None,
) -> Batch:
    """Normalise, mask and stack tiles of one signature into a :class:`Batch`.

    Args:
        tiles: B tiles with the same band set and the same geometry size.
        geoms: one :class:`Geometry` per tile.
        table: the signature's descriptors and statistics.
        keep: optional ``[C']`` observation indices kept (spectral/temporal dropout), same for the batch.
        buffer: ``buffer(nbytes)`` gives the uint8 tensor the batch's tensors are carved from (see
            :func:`carve`); default: a fresh one.

    Returns:
        a Batch with ``pixels [B, C', h, w]`` float32 where invalid pixels are 0 (the band mean), the
        tile centres ``lonlat [B, 2]`` (NaN when unknown) and the sensor id of each observation; all
        its tensors are views into one buffer.
    """
    b = len(tiles)
    views0 = [apply_geometry(t.pixels, g) for t, g in zip(tiles, geoms)]
    px = np.empty((b, *views0[0].shape), dtype=np.result_type(*views0))  # [B, C, h, w] source dtype
    for i, v in enumerate(views0):
        np.copyto(px[i], v)  # 3x cheaper than np.stack on flipped and turned views
    c, h, w = px.shape[1:]
    wl, bw, kind, mean, std = table.wavelength, table.bandwidth, table.kind, table.mean, table.std
    sensor = np.array([sensor_code(b["sensor"]) for b in tiles[0].meta["bands"]], dtype=np.int64)  # one signature
    times = _times(tiles)  # [B, C]
    if keep is not None:
        wl, bw, kind, mean, std, sensor = wl[keep], bw[keep], kind[keep], mean[keep], std[keep], sensor[keep]
        times = times[:, keep]
    ck = len(wl)
    labels = [t.label for t in tiles]
    seg = all(isinstance(lb, np.ndarray) for lb in labels)
    cls = not seg and all(isinstance(lb, int) for lb in labels)
    fields: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
        ("pixels", torch.float32, (b, ck, h, w)),
        ("wavelength", torch.float32, (b, ck)),
        ("bandwidth", torch.float32, (b, ck)),
        ("kind", torch.int64, (b, ck)),
        ("time", torch.float32, (b, ck)),
        ("valid", torch.bool, (b, ck, h, w)),
        ("gsd", torch.float32, (b,)),
        ("lonlat", torch.float32, (b, 2)),
        ("sensor", torch.int64, (b, ck)),
    ]
    if seg or cls:
        fields.append(("label", torch.int64, (b, h, w) if seg else (b,)))
    tensors, _ = carve(fields, buffer)
    a = {k: v.numpy() for k, v in tensors.items()}
    if keep is None:
        valid = valid_masks(tiles, geoms, px, out=a["valid"])  # [B, C, h, w] bool
    else:
        a["valid"][...] = valid_masks(tiles, geoms, px)[:, keep]
        valid, px = a["valid"], px[:, keep]
    # (float32(px) - mean) * (1 / std) straight into the batch; [B, C, h*w] so inner loops run long
    x = a["pixels"].reshape(b, ck, h * w)
    np.copyto(x, px.reshape(b, ck, h * w), casting="unsafe")
    x -= mean[None, :, None]
    x *= (1.0 / std)[None, :, None]
    for i in np.flatnonzero(~valid.reshape(b, -1).all(axis=1)).tolist():  # tiles with invalid pixels (rare)
        np.copyto(a["pixels"][i], np.float32(0.0), where=~valid[i])
    a["wavelength"][...] = wl
    a["bandwidth"][...] = bw
    a["kind"][...] = kind
    a["time"][...] = times
    a["sensor"][...] = sensor
    a["gsd"][...] = [float(t.meta["gsd_m"]) for t in tiles]
    a["lonlat"][...] = [t.extra["lonlat"] if "lonlat" in t.extra else tile_lonlat(t) for t in tiles]
    if seg:
        for i, (lb, g) in enumerate(zip(labels, geoms)):
            a["label"][i] = apply_geometry(lb, g)  # type: ignore[arg-type]
    elif cls:
        a["label"][...] = labels
    return Batch(keys=[t.key for t in tiles], **tensors)


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
