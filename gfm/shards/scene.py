"""Scenes: the files of one place (and its dates) opened onto one grid, as aligned readers.

A :class:`Scene` is an ordered list of observations (band, date) with, for each, a reader that
returns any window of the scene grid already aligned, plus optional quality sources and a label.
Opening a scene recognises each file's sensor and bands (file names, band descriptions, the sensor's
band order), skips ancillary product layers, and turns quality layers into validity rules. A band given
twice for one date keeps the file that is finer in metres (with a notice); at the same resolution
nothing says which to keep, so that is an error naming both files. Where the tiles lie is decided
elsewhere (:mod:`gfm.shards.plan`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gfm.schema import band_entry
from gfm.sensors import Band, Sensor, SensorError, get_sensor, guess_sensor, hyperspectral, read_wavelengths
from gfm.shards.errors import InputError
from gfm.shards.grid import Grid, crs_string, cube_grid, target_grid
from gfm.shards.labels import VectorLabelReader, check_label_raster, is_vector, label_array
from gfm.shards.readers import CubeReader, RasterReader, Reader, cube_to_hwc, load_cube, open_raster
from gfm.shards.remote import name_of
from gfm.shards.spec import FileSpec, SceneSpec

_CUBE_SUFFIXES = (".npy", ".mat")

# Layers of standard products that are not spectral bands (skipped with a notice when passed by glob).
_ANCILLARY = re.compile(
    r"(?:^|[_\-.])(TCI|AOT|WVP|PVI|preview|QA_RADSAT|SR_QA_AEROSOL|ST_QA|ST_TRAD|ST_URAD|ST_DRAD|ST_ATRAN|ST_EMIS|"
    r"ST_EMSD|ST_CDIST|SAA|SZA|VAA|VZA|ANG|MSK_\w+)(?:[_\-.]|$)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TileConstants:
    """The ``meta.json`` fields every tile of a scene shares (computed once per scene, not per tile)."""

    bands: list[dict[str, Any]]
    gsd_m: float
    crs: str | None
    nodata: list[float | None]
    scale: list[float]
    offset: list[float]
    files: list[dict[str, Any]]
    t0: str | None  # the first date, part of every sample key


@dataclass
class QualitySource:
    """A quality layer read for validity: pixels its ``rule`` marks are invalid on ``date`` (None: every date)."""

    reader: Reader
    rule: dict[str, Any]
    date: str | None


@dataclass
class Scene:
    """An opened scene: grid, readers in observation order, quality sources, label reader or array."""

    spec: SceneSpec
    grid: Grid
    readers: list[tuple[Reader, str | None]]  # (reader, date) in observation order
    quality: list[QualitySource]
    label: Reader | None
    label_array: np.ndarray | None
    notices: list[str]
    grid_notice: str = ""  # the grid chosen: CRS, GSD, size and where it came from (build states it)

    @property
    def observations(self) -> list[tuple[Band, str | None]]:
        """(band, date) per observation, in pixel order."""
        return [(b, d) for r, d in self.readers for b in r.bands]

    def dtype(self) -> np.dtype:
        """One dtype that holds every observation (numpy promotion)."""
        return np.result_type(*[r.dtype for r, _ in self.readers])

    @functools.cached_property
    def tile_constants(self) -> TileConstants:
        """The ``meta.json`` fields every tile of this scene shares."""
        nodata: list[float | None] = []
        scale: list[float] = []
        offset: list[float] = []
        for reader, _ in self.readers:
            nd = reader.nodata
            for b in reader.bands:
                nodata.append(None if nd is None or (isinstance(nd, float) and math.isnan(nd)) else float(nd))
                try:
                    sensor = get_sensor(b.sensor)
                    scale.append(sensor.scale)
                    offset.append(sensor.offset)
                except SensorError:  # generic hyperspectral sensors are not registered
                    scale.append(1.0)
                    offset.append(0.0)
        return TileConstants(
            bands=[band_entry(b.to_dict(), d) for b, d in self.observations],
            gsd_m=self.grid.gsd_m(),
            crs=crs_string(self.grid.crs),
            nodata=nodata,
            scale=scale,
            offset=offset,
            files=[r.source() for r, _ in self.readers],
            t0=next((d for _, d in self.observations if d is not None), None),
        )

    def close(self) -> None:
        """Close every reader."""
        for r, _ in self.readers:
            r.close()
        for q in self.quality:
            q.reader.close()
        if self.label is not None:
            self.label.close()


def open_scene(spec: SceneSpec, *, resampling: str = "bilinear", classes: Mapping[str, int] | None = None) -> Scene:
    """Open every file of a scene, choose its grid and build aligned readers.

    ``classes`` numbers the class names of a text-valued vector label (:func:`gfm.shards.labels.class_table`
    over every scene of the build).

    Raises:
        InputError: any problem with a file, band name, sensor, wavelength list, label, or overlap.
    """
    if not spec.dates or not any(d.files for d in spec.dates):
        raise InputError(f"scene {spec.id!r}: no input files")
    notices: list[str] = []
    first = spec.dates[0]
    grid: Grid | None = None  # a cube scene takes its grid from the first cube, below
    grid_notice = ""
    if not any(_is_cube(f.path) for f in first.files):
        opened = []
        try:
            for f in first.files:
                opened.append(open_raster(f.path))
            grid, grid_notice = target_grid(spec, opened, [f.path for f in first.files])
        finally:
            for d in opened:
                d.close()

    readers: list[tuple[Reader, str | None]] = []
    quality: list[QualitySource] = []
    for date in spec.dates:
        date_readers: list[Reader] = []
        for fs in date.files:
            if _is_cube(fs.path):
                cube, own_grid = _cube_reader(spec, fs)
                if grid is None:
                    grid = own_grid
                elif (grid.width, grid.height) != (own_grid.width, own_grid.height):
                    raise InputError(
                        f"{fs.path}: cube is {own_grid.width}x{own_grid.height}, the scene grid is "
                        f"{grid.width}x{grid.height}"
                    )
                date_readers.append(cube)
                continue
            if grid is None:
                raise InputError(f"{fs.path}: list cubes before rasters in a scene that has both")
            sensor = _sensor_from(fs.sensor, fs.path)
            ds = open_raster(fs.path)
            try:
                descriptions = list(ds.descriptions)
                count = ds.count
            finally:
                ds.close()
            name = name_of(fs.path)  # a URL's file name, without its query string
            if count == 1 and fs.bands is None:
                rule = sensor.quality_rule(name)
                if rule is not None:
                    q = RasterReader(fs.path, [1], [], grid, resampling="nearest", nodata=None)
                    quality.append(QualitySource(q, rule, date.date))
                    continue
                if _ANCILLARY.search(name) and sensor.band_from_filename(name) is None:
                    notices.append(f"notice: {fs.path} is an ancillary product layer, not a band; skipped")
                    continue
            bands = _file_bands(fs, count, descriptions, sensor)
            raster = RasterReader(fs.path, list(range(1, count + 1)), bands, grid, resampling=resampling,
                                  nodata=fs.nodata)
            if raster.nodata is None and sensor.nodata is not None:
                raster.nodata = sensor.nodata
            if raster.warped:
                notices.append(f"notice: {fs.path} resampled/reprojected onto the scene grid ({resampling})")
            date_readers.append(raster)
        for kept in _drop_duplicate_bands(date_readers, date.date, notices):
            readers.append((kept, date.date))
    assert grid is not None

    label_reader: Reader | None = None
    label_arr: np.ndarray | None = None
    if spec.label is not None:
        if _is_cube(spec.label):
            label_arr = _label_array(spec, spec.label, grid)
        elif is_vector(spec.label):
            vr = VectorLabelReader(spec.label, spec.label_field, grid, classes, spec.label_ignore)
            notices.extend(vr.notices)
            label_reader = vr
        else:
            open_raster(spec.label).close()  # a missing or unreadable file: one line naming it
            check_label_raster(spec.label)
            lr = RasterReader(spec.label, [1], [], grid, resampling="nearest", nodata=None)
            if lr.warped:
                notices.append(f"notice: label {spec.label} reprojected onto the scene grid (nearest)")
            label_reader = lr
    return Scene(spec, grid, readers, quality, label_reader, label_arr, notices, grid_notice)


def _is_cube(path: str) -> bool:
    return path.lower().endswith(_CUBE_SUFFIXES)


def _label_array(spec: SceneSpec, path: str, grid: Grid) -> np.ndarray:
    arr = load_cube(path, spec.label_key, key_option="label_key")
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = np.squeeze(arr)
    if arr.shape != (grid.height, grid.width):
        raise InputError(
            f"{path}: label array shape {arr.shape} does not match the scene grid {(grid.height, grid.width)}"
        )
    return label_array(path, arr, spec.label_ignore)


def _sensor_from(name: str | None, path: str) -> Sensor:
    if name == "hls" and "HLS.L30." in name_of(path):
        name = "hls_l30"  # same product family, Landsat band names (B05 is NIR in L30, red edge in S30)
    if name is None:
        name = guess_sensor([name_of(path)])
        if name is None:
            raise InputError(f"{path}: cannot tell the sensor from the file name; give {{sensor}}", sensor=None)
    try:
        return get_sensor(name)
    except SensorError as e:
        raise InputError(str(e)) from None


def _file_bands(fs: FileSpec, count: int, descriptions: Sequence[str | None], sensor: Sensor) -> list[Band]:
    """Sensor bands of a raster's ``count`` layers: given names, else descriptions, file name, sensor order."""
    try:
        if fs.bands:
            if len(fs.bands) != count:
                raise InputError(
                    f"{fs.path}: {len(fs.bands)} band names given ({','.join(fs.bands)}) for {count} bands in the file"
                )
            return [sensor.band(n) for n in fs.bands]
        if count == 1:
            b = sensor.band_from_filename(name_of(fs.path))
            if b is not None:
                return [b]
        if descriptions and all(d and sensor.has_band(d) for d in descriptions):
            return [sensor.band(str(d)) for d in descriptions]
        if count == len(sensor.bands):
            return list(sensor.bands)
    except SensorError as e:
        raise InputError(f"{fs.path}: {e}") from None
    raise InputError(
        f"{fs.path}: cannot recognise its {count} band(s) as {sensor.name} bands from the file name or band "
        "descriptions; name them in file order (e.g. {bands})",
        bands=sensor.band_names[:count],
    )


def _drop_duplicate_bands(readers: list[Reader], date: str | None, notices: list[str]) -> list[Reader]:
    """Within one date, keep the finer (in metres) single-band file of a band given several times.

    Raises:
        InputError: the band is in a multi-band file too, or both files have the same resolution: then
            nothing says which to keep (they are likely two dates), so both are named with how to date them.
    """
    seen: dict[tuple[str, str], Reader] = {}
    when = f"date {date}" if date is not None else "one undated observation"
    for r in readers:
        for b in r.bands:
            key = (b.sensor, b.name)
            if key not in seen:
                seen[key] = r
                continue
            other = seen[key]
            if len(r.bands) > 1 or len(other.bands) > 1:
                raise InputError(f"{r.path}: band {b.name} of {b.sensor} is also in {other.path} ({when})")
            gsd_other, gsd_r = other.native_gsd_m, r.native_gsd_m
            if math.isclose(gsd_other, gsd_r, rel_tol=1e-3):
                raise InputError(
                    f"{other.path} and {r.path} both give band {b.name} of {b.sensor} for {when}, at the same "
                    f"resolution ({gsd_r:.4g} m), so nothing says which to keep: if they are two acquisitions, "
                    "give each file its date ({date} per file, in file order) or list them in a manifest's "
                    "'observations'; otherwise drop one",
                    date=None,
                )
            keep, drop = (other, r) if gsd_other < gsd_r else (r, other)
            notices.append(
                f"notice: band {b.name} of {b.sensor} given twice for {when}: kept {keep.path} "
                f"({min(gsd_other, gsd_r):.4g} m), skipped {drop.path} (coarser: {max(gsd_other, gsd_r):.4g} m)"
            )
            seen[key] = keep
    kept = []
    for r in readers:
        if all(seen[(b.sensor, b.name)] is r for b in r.bands):
            kept.append(r)
        else:
            r.close()
    return kept


def _cube_reader(spec: SceneSpec, fs: FileSpec) -> tuple[CubeReader, Grid]:
    arr = load_cube(fs.path, fs.cube_key, fs.cube_index)
    if fs.wavelengths is not None:
        try:
            wl = read_wavelengths(fs.wavelengths)
            fw = read_wavelengths(fs.fwhm, expected=len(wl)) if fs.fwhm else None
            if arr.ndim != 3 or len(wl) not in (arr.shape[0], arr.shape[-1]):
                raise InputError(
                    f"{fs.wavelengths}: {len(wl)} wavelengths listed, but the cube {fs.path} has shape {arr.shape}"
                )
            sensor = hyperspectral(fs.sensor or "hyperspectral", wl, fw, gsd_m=spec.gsd or 0.0)
        except SensorError as e:
            raise InputError(str(e)) from None
        bands = list(sensor.bands)
    else:
        if fs.sensor is None:
            raise InputError(f"{fs.path}: a cube needs {{wavelengths}}, or {{sensor}} with {{bands}}",
                             wavelengths=None, sensor=None, bands=None)
        sensor = _sensor_from(fs.sensor, fs.path)
        try:
            names = fs.bands or sensor.band_names
            bands = [sensor.band(n) for n in names]
        except SensorError as e:
            raise InputError(f"{fs.path}: {e}") from None
    hwc = cube_to_hwc(fs.path, arr, len(bands))
    grid = cube_grid(spec, hwc.shape[0], hwc.shape[1])
    return CubeReader(fs.path, hwc, bands, nodata=fs.nodata), grid
