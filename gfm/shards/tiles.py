"""Cutting tiles: one strip read per tile row, validity from nodata and quality layers, schema tiles.

A tile that reaches past the scene's right or bottom edge (``BuildOptions.edge == "pad"``) is read for
the part inside the grid and padded to full size: pixels with the reader's nodata (0 without one), the
validity mask with 0, labels with the scene's ignore value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from gfm.schema import SCHEMA_VERSION, Tile, make_key
from gfm.shards.scene import Scene


def quality_valid(data: np.ndarray, rule: dict[str, Any]) -> np.ndarray:
    """Valid mask from a quality layer.

    Pixels whose value is listed in ``rule["values"]``, or that have any bit of ``rule["bits"]`` set, are
    invalid.
    """
    q = data.astype(np.int64)
    bad = np.zeros(q.shape, dtype=bool)
    if "values" in rule:
        bad |= np.isin(q, rule["values"])
    for bit in rule.get("bits", []):
        bad |= (q >> int(bit)) & 1 == 1
    return ~bad


def read_row(scene: Scene, row: int, cols: list[int], tile: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, Any]]:
    """Yield ``(col, pixels [C,t,t], valid [C,t,t], label)`` for tiles of one row, from one strip read.

    ``label`` is an ``[t, t]`` integer array (label raster or array), an ``int`` (the scene's class), or None.
    Parts of tiles outside the scene grid are padded and invalid (see the module docstring).
    """
    c0, c1 = min(cols), max(cols) + tile
    h = min(tile, scene.grid.height - row)  # the strip's part inside the grid
    w = min(c1 - c0, scene.grid.width - c0)
    pad = ((0, 0), (0, tile - h), (0, c1 - c0 - w))
    window = Window(c0, row, w, h)
    dtype = scene.dtype()
    datas, valids = [], []
    for reader, _ in scene.readers:
        data, ok_px = reader.read(window)
        data = data.astype(dtype, copy=False)
        if h < tile or w < c1 - c0:
            fill = reader.nodata if reader.nodata is not None else 0
            data = np.pad(data, pad, constant_values=np.asarray(fill).astype(dtype))
            ok_px = np.pad(ok_px, pad, constant_values=False)
        datas.append(data)
        valids.append(ok_px)
    pixels = np.concatenate(datas, axis=0)  # [C, t, strip width]
    valid = np.concatenate(valids, axis=0)
    dates = [d for _, d in scene.observations]
    for q in scene.quality:
        qd, qv = q.reader.read(window)
        ok = quality_valid(qd[0], q.rule) & qv[0]
        for i, d in enumerate(dates):
            if q.date is None or d == q.date:
                valid[i, :h, :w] &= ok
    ignore = scene.spec.label_ignore
    label_strip: np.ndarray | None = None
    if scene.label is not None:
        ld, lv = scene.label.read(window)
        # an int64 strip: the ignore value (-1 by default) does not fit a uint8 label raster, where
        # NumPy would wrap it to 255 and unlabelled pixels would become a class
        label_strip = np.full(ld[0].shape, ignore, dtype=np.int64)
        label_strip[lv[0]] = ld[0][lv[0]]  # valid values only: a float raster's NaN nodata is never cast
    elif scene.label_array is not None:
        label_strip = scene.label_array[row : row + h, c0 : c0 + w]
    if label_strip is not None and (h < tile or w < c1 - c0):
        label_strip = np.pad(label_strip, pad[1:], constant_values=ignore)
    for col in cols:
        s = slice(col - c0, col - c0 + tile)
        label: Any = None
        if label_strip is not None:
            lab = label_strip[:, s]
            label = lab.astype(np.int16 if lab.min() >= -(2**15) and lab.max() < 2**15 else np.int32)
        elif scene.spec.label_class is not None:
            label = int(scene.spec.label_class)
        yield col, pixels[:, :, s], valid[:, :, s], label


def _days(d: str | None) -> int:
    """A date as the integer ``YYYYMMDD`` of sample keys (0 when unknown)."""
    return 0 if d is None else int(d.replace("-", ""))


def _lonlat(scene: Scene, row: int, col: int, tile: int) -> list[float] | None:
    """WGS84 ``[lon, lat]`` of the tile centre, or None without a georeference."""
    if scene.grid.crs is None:
        return None
    x, y = scene.grid.transform @ (col + tile / 2, row + tile / 2)
    try:
        lon, lat = warp_transform(scene.grid.crs, "EPSG:4326", [x], [y])
    except Exception:
        return None
    return [round(float(lon[0]), 7), round(float(lat[0]), 7)]


def make_tile(scene: Scene, row: int, col: int, tile: int, pixels: np.ndarray, valid: np.ndarray, label: Any) -> Tile:
    """A schema :class:`~gfm.schema.Tile` for the tile at (row, col) of ``scene``.

    ``valid`` is stored only where some pixel is invalid: as ``[H, W]`` when every observation shares
    one mask, else as ``[C, H, W]``.
    """
    const = scene.tile_constants
    t = scene.grid.window_transform(row, col)
    left, top = t.c, t.f
    right, bottom = t @ (tile, tile)
    meta: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "bands": const.bands,
        "gsd_m": const.gsd_m,
        "crs": const.crs,
        "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "bounds": [min(left, right), min(top, bottom), max(left, right), max(top, bottom)],
        "lonlat": _lonlat(scene, row, col, tile),
        "nodata": const.nodata,
        "scale": const.scale,
        "offset": const.offset,
        "source": {"scene": scene.spec.id, "window": [row, col, tile, tile], "files": const.files},
    }
    if isinstance(label, np.ndarray):
        meta["label_ignore"] = scene.spec.label_ignore
    v: np.ndarray | None
    if valid.all():
        v = None
    elif all(np.array_equal(valid[0], valid[i]) for i in range(1, valid.shape[0])):
        v = valid[0].astype(np.uint8)
    else:
        v = valid.astype(np.uint8)
    key = make_key(scene.spec.id, _days(const.t0), row, col)
    return Tile(key=key, pixels=np.ascontiguousarray(pixels), meta=meta, valid=v, label=label)
