"""Scenes for inference: files → the scene ``gfm shards build`` would make of them, and aligned window reads.

:func:`scene_spec` groups files the way the shard builder's command line does (one date, or a time
series when file names carry several dates; ``bands`` named across files in order), and
:func:`gfm.shards.scene.open_scene` then applies the same sensor and band recognition, grid choice and
alignment (direct reads on the grid, warped reads otherwise). :func:`read_window` reads any window of the
scene grid, clipped to the grid and padded with invalid pixels outside it, with the quality layers'
rules applied as the shard builder applies them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from gfm.sensors import guess_date
from gfm.shards import DateSpec, FileSpec, InputError, SceneSpec
from gfm.shards.remote import is_remote, name_of
from gfm.shards.scene import Scene
from gfm.shards.tiles import quality_valid


@dataclass
class SceneFiles:
    """How to read a list of files as one scene (the options of ``gfm shards build`` for one scene).

    Attributes:
        files: rasters (GeoTIFF, JP2, anything GDAL reads; local or URLs read in place, ``https://``, ``s3://``,
            ``gs://``, ``/vsi...``) or one local ``.npy``/``.mat`` cube.
        sensor: sensor preset; None: guessed from the product file names.
        bands: band names across the files in file/band order; None: recognised.
        date: acquisition date ``YYYY-MM-DD``; None: read from the file names.
        nodata: nodata value overriding the files' own.
        wavelengths, fwhm: wavelength (and band width) list files for a hyperspectral cube.
        cube_key: variable name in a ``.mat`` cube.
        gsd: target ground sampling distance; None: the finest band.
        scene_id: the scene's id; None: from the first file name.
        crs, bounds: georeference for a cube (``[left, bottom, right, top]`` in ``crs``).
    """

    files: Sequence[str]
    sensor: str | None = None
    bands: Sequence[str] | None = None
    date: str | None = None
    nodata: float | None = None
    wavelengths: str | None = None
    fwhm: str | None = None
    cube_key: str | None = None
    gsd: float | None = None
    scene_id: str | None = None
    crs: str | None = None
    bounds: Sequence[float] | None = None


def _band_counts(files: Sequence[str]) -> list[int]:
    import rasterio

    counts = []
    for f in files:
        try:
            with rasterio.open(f) as ds:
                counts.append(int(ds.count))
        except Exception:  # cubes and unreadable files: the opener reports them properly
            counts.append(1)
    return counts


def scene_spec(sf: SceneFiles) -> SceneSpec:
    """The :class:`SceneSpec` of ``sf``: one date, or one time series when the file names carry several."""
    if not sf.files:
        raise InputError("no input files")
    for f in sf.files:
        if not is_remote(f) and Path(f).is_dir():  # a folder, not a raster: say so, not "not a readable raster"
            raise InputError(f"no scenes found in {f}: a directory (give the scene's raster files; gfm embed reads a "
                             "directory as shards only when it holds index.json)")
    names: list[list[str] | None] = [None] * len(sf.files)
    if sf.bands is not None:
        bands = list(sf.bands)
        if len(sf.files) == 1:
            names = [bands]
        else:
            offset = 0
            for i, n in enumerate(_band_counts(sf.files)):
                names[i] = bands[offset: offset + n]
                offset += n
            if offset != len(bands):
                raise InputError(f"bands: {len(bands)} names given but the files hold {offset} bands")
    files = [FileSpec(f, sf.sensor, names[i], sf.nodata, sf.cube_key, None, sf.wavelengths, sf.fwhm)
             for i, f in enumerate(sf.files)]
    if sf.date is not None:
        dates = [DateSpec(sf.date, files)]
    else:
        guessed = [guess_date(name_of(f.path)) for f in files]
        distinct = sorted({d for d in guessed if d is not None})
        if len(distinct) <= 1:
            dates = [DateSpec(distinct[0] if distinct else None, files)]
        else:
            undated = [f.path for f, d in zip(files, guessed) if d is None]
            if undated:
                raise InputError(f"{undated[0]}: no date in its name while other files have several; give the date")
            dates = [DateSpec(d, [f for f, g in zip(files, guessed) if g == d]) for d in distinct]
    scene_id = sf.scene_id or name_of(sf.files[0]).split(".")[0]
    return SceneSpec(id=scene_id, dates=dates, gsd=sf.gsd, crs=sf.crs,
                     bounds=list(sf.bounds) if sf.bounds is not None else None)


def scene_paths(spec: SceneSpec) -> list[str]:
    """Every local file ``spec`` reads: rasters or cube, wavelength lists, label (outputs must differ from them)."""
    files = [f for d in spec.dates for f in d.files]
    paths = [p for f in files for p in (f.path, f.wavelengths, f.fwhm) if p]
    return [p for p in paths + ([spec.label] if spec.label else []) if not is_remote(p)]


def observation_bands(scene: Scene) -> list[dict[str, Any]]:
    """Per observation (pixel order): ``{name, sensor, center_nm, fwhm_nm, kind, time}``."""
    return [{**band.to_dict(), "time": date} for band, date in scene.observations]


def read_window(scene: Scene, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels [C, h, w], valid [C, h, w] bool)`` of a window of the scene grid (may reach outside it).

    The part inside the grid is read through the scene's aligned readers; quality layers make pixels
    invalid as in ``gfm shards build``; pixels outside the grid are invalid (and 0).
    """
    g = scene.grid
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + height, g.height), min(col + width, g.width)
    dtype = scene.dtype()
    c = len(scene.observations)
    pixels = np.zeros((c, height, width), dtype=dtype)
    valid = np.zeros((c, height, width), dtype=bool)
    if r1 <= r0 or c1 <= c0:
        return pixels, valid
    window = Window(c0, r0, c1 - c0, r1 - r0)
    inner = (slice(None), slice(r0 - row, r1 - row), slice(c0 - col, c1 - col))
    i = 0
    for reader, _ in scene.readers:
        data, ok = reader.read(window)
        n = data.shape[0]
        pixels[i: i + n][inner] = data
        valid[i: i + n][inner] = ok
        i += n
    dates = [d for _, d in scene.observations]
    for q in scene.quality:
        qd, qv = q.reader.read(window)
        good = quality_valid(qd[0], q.rule) & qv[0]
        for k, d in enumerate(dates):
            if q.date is None or d == q.date:
                valid[k][inner[1:]] &= good
    return pixels, valid


def tile_lonlat(scene: Scene, origins: Sequence[tuple[int, int]], height: int, width: int) -> np.ndarray | None:
    """``[n, 2]`` WGS84 (lon, lat) of the centres of tiles at ``origins``; None without a georeference."""
    g = scene.grid
    if g.crs is None or not origins:
        return None
    xs, ys = [], []
    for r, c in origins:
        x, y = g.transform @ (c + width / 2, r + height / 2)
        xs.append(x)
        ys.append(y)
    try:
        lon, lat = warp_transform(g.crs, "EPSG:4326", xs, ys)
    except Exception:  # a CRS PROJ cannot take to WGS84: the location stays unknown
        return np.full((len(origins), 2), math.nan, dtype=np.float32)
    return np.stack([np.asarray(lon), np.asarray(lat)], axis=1).astype(np.float32)
