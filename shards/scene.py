"""Scenes: which files make up one place (and its dates), the grid they are aligned to, and readers.

A :class:`Scene` is an ordered list of observations (band, date) with, for each, a reader that
returns any window of the scene grid already aligned (direct window read when the source sits on
the grid, a GDAL warped VRT otherwise), plus optional quality sources and a label. Where a tile
lies is decided elsewhere (:mod:`shards.plan`); this module only reads.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine, array_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from gfm.schema import band_entry
from gfm.sensors import Band, Sensor, SensorError, get_sensor, hyperspectral, read_wavelengths


class ShardError(Exception):
    """A user-facing problem with the input: one line naming the file and what is wrong."""


@dataclass(frozen=True)
class Grid:
    """The pixel grid a scene is aligned to. ``crs`` None means image coordinates (no georeference)."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        return tuple(array_bounds(self.height, self.width, self.transform))  # type: ignore[return-value]

    def window_transform(self, row: int, col: int) -> Affine:
        """Affine transform of a window whose top-left pixel is (row, col)."""
        return self.transform @ Affine.translation(col, row)

    def gsd_m(self) -> float:
        """Ground sampling distance in metres (degrees converted at the grid's centre latitude)."""
        rx, ry = self.res
        if self.crs is None:
            return float(rx)
        if self.crs.is_geographic:
            left, bottom, right, top = self.bounds
            lat = math.radians((bottom + top) / 2)
            return float((rx * 111_320.0 * math.cos(lat) + ry * 110_574.0) / 2)
        try:
            factor = float(self.crs.linear_units_factor[1])
        except Exception:  # CRS without linear units: treat as metres
            factor = 1.0
        return float((rx + ry) / 2 * factor)


def crs_string(crs: CRS | None) -> str | None:
    """``EPSG:n`` when the CRS has a code, WKT otherwise, None for image coordinates."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


# ----------------------------------------------------------------------------------------------
# Readers: each returns data and a validity mask for a window of the scene grid.


class Reader:
    """Reads some observations of a scene for a window of the scene grid."""

    bands: list[Band]
    dtype: np.dtype
    nodata: float | None
    resampling: str = "none"
    path: str = ""

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """``(data [c, h, w], valid [c, h, w] bool)`` for ``window`` on the scene grid."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def source(self) -> dict[str, Any]:
        """How this reader got its pixels, for ``meta.json`` ``source``."""
        return {"file": self.path, "resampling": self.resampling}


def _open(path: str) -> rasterio.io.DatasetReader:
    p = Path(path)
    if not p.exists():
        raise ShardError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as e:
        msg = str(e).splitlines()[0] if str(e) else "unknown GDAL error"
        raise ShardError(f"{path}: not a readable raster ({msg})") from None


def _same_grid(ds: Any, grid: Grid) -> tuple[int, int] | None:
    """(row, col) offset of the scene grid inside ``ds`` when ``ds`` is on the same grid, else None."""
    if grid.crs is None or ds.crs is None or ds.crs != grid.crs:
        return None
    t, g = ds.transform, grid.transform
    if not (math.isclose(t.a, g.a, rel_tol=1e-9) and math.isclose(t.e, g.e, rel_tol=1e-9)):
        return None
    if abs(t.b) > 1e-12 or abs(t.d) > 1e-12:
        return None
    col = (g.c - t.c) / t.a
    row = (g.f - t.f) / t.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return int(round(row)), int(round(col))


class RasterReader(Reader):
    """Bands of one raster file, read directly when on the grid and through a warped VRT otherwise."""

    def __init__(
        self,
        path: str,
        indexes: Sequence[int],
        bands: Sequence[Band],
        grid: Grid,
        *,
        resampling: str = "bilinear",
        nodata: float | None = None,
        check_overlap: bool = True,
    ) -> None:
        self.path = path
        self.indexes = list(indexes)
        self.bands = list(bands)
        self.grid = grid
        ds = _open(path)
        self._ds = ds
        self.dtype = np.dtype(ds.dtypes[self.indexes[0] - 1])
        self.nodata = ds.nodata if nodata is None else nodata
        self._offset = _same_grid(ds, grid)
        self._vrt: WarpedVRT | None = None
        self._inner: WarpedVRT | None = None
        if self._offset is None:
            if (ds.crs is None and not _has_gcps(ds)) or grid.crs is None:
                if (ds.width, ds.height) != (grid.width, grid.height):
                    raise ShardError(
                        f"{path}: no georeference and size {ds.width}x{ds.height} differs from the scene grid "
                        f"{grid.width}x{grid.height}; cannot align it"
                    )
                self._offset = (0, 0)
            else:
                if check_overlap:
                    self._check_overlap(ds)
                self.resampling = resampling
                source: Any = ds
                if _has_gcps(ds):
                    # GDAL applies GCPs only when it picks the output grid itself: warp to that grid first
                    # (pixels outside the footprint become nodata: NaN for floats, 0 = GRD border fill),
                    # then onto the scene grid.
                    if self.nodata is None:
                        self.nodata = float("nan") if self.dtype.kind == "f" else 0
                    self._inner = source = WarpedVRT(
                        ds, crs=ds.gcps[1], resampling=Resampling[resampling],
                        src_nodata=self.nodata, nodata=self.nodata,
                    )
                self._vrt = WarpedVRT(
                    source,
                    crs=grid.crs,
                    transform=grid.transform,
                    width=grid.width,
                    height=grid.height,
                    resampling=Resampling[resampling],
                    add_alpha=True,
                    **({"src_nodata": self.nodata, "nodata": self.nodata} if self.nodata is not None else {}),
                )

    @property
    def warped(self) -> bool:
        """True when the source is resampled or reprojected onto the grid."""
        return self._vrt is not None

    def _check_overlap(self, ds: Any) -> None:
        assert self.grid.crs is not None
        try:
            own = _grid_of(ds)
            left, bottom, right, top = transform_bounds(own.crs, self.grid.crs, *own.bounds)
        except Exception as e:
            raise ShardError(f"{self.path}: cannot transform its bounds to the scene CRS ({e})") from None
        gl, gb, gr, gt = self.grid.bounds
        if right <= gl or left >= gr or top <= gb or bottom >= gt:
            raise ShardError(
                f"{self.path}: does not overlap the scene grid (its bounds {left:.6g},{bottom:.6g},"
                f"{right:.6g},{top:.6g} vs scene {gl:.6g},{gb:.6g},{gr:.6g},{gt:.6g} in {crs_string(self.grid.crs)})"
            )

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Aligned ``(data, valid)`` for a window of the scene grid."""
        h, w = int(window.height), int(window.width)
        if self._vrt is not None:
            data = self._vrt.read(self.indexes, window=window)
            alpha = self._vrt.read(self._vrt.count, window=window) > 0
            valid = np.broadcast_to(alpha, data.shape).copy()
        else:
            assert self._offset is not None
            r0, c0 = self._offset
            src = Window(window.col_off + c0, window.row_off + r0, w, h)
            fill = self.nodata if self.nodata is not None else 0
            inside = (src.row_off >= 0 and src.col_off >= 0 and src.row_off + h <= self._ds.height
                      and src.col_off + w <= self._ds.width)
            if inside:  # a boundless read goes through a VRT: only pay for it at the edges
                data = self._ds.read(self.indexes, window=src)
            else:
                data = self._ds.read(self.indexes, window=src, boundless=True, fill_value=fill)
            valid = np.zeros(data.shape, dtype=bool)
            rs0, cs0 = max(0, -int(src.row_off)), max(0, -int(src.col_off))
            rs1 = min(h, self._ds.height - int(src.row_off))
            cs1 = min(w, self._ds.width - int(src.col_off))
            if rs1 > rs0 and cs1 > cs0:
                valid[:, rs0:rs1, cs0:cs1] = True
        if self.nodata is not None:
            if isinstance(self.nodata, float) and math.isnan(self.nodata):
                pass  # NaN handled below for every float source
            else:
                valid &= data != np.asarray(self.nodata).astype(data.dtype)
        if data.dtype.kind == "f":
            valid &= np.isfinite(data)
        return data, valid

    def close(self) -> None:
        """Close the VRT and the dataset."""
        for vrt in (self._vrt, self._inner):
            if vrt is not None:
                vrt.close()
        self._ds.close()


class CubeReader(Reader):
    """Bands of an in-memory (or memory-mapped) ``[H, W, C]`` cube that defines its own grid."""

    def __init__(self, path: str, cube: np.ndarray, bands: Sequence[Band], nodata: float | None = None) -> None:
        self.path = path
        self.cube = cube  # [H, W, C]
        self.bands = list(bands)
        self.dtype = cube.dtype
        self.nodata = nodata
        self.resampling = "none"

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """``(data [c, h, w], valid)`` sliced from the cube (the cube is the grid)."""
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        data = np.ascontiguousarray(np.moveaxis(np.asarray(self.cube[r : r + h, c : c + w, :]), -1, 0))
        valid = np.ones(data.shape, dtype=bool)
        if self.nodata is not None:
            valid &= data != np.asarray(self.nodata).astype(data.dtype)
        if data.dtype.kind == "f":
            valid &= np.isfinite(data)
        return data, valid

    def source(self) -> dict[str, Any]:
        """The cube file, never resampled."""
        return {"file": self.path, "resampling": "none"}


def load_cube(path: str, key: str | None = None, index: int | None = None) -> np.ndarray:
    """Load a ``.npy`` or ``.mat`` array (memory-mapped for .npy); ``index`` selects along axis 0.

    Raises:
        ShardError: missing file, unknown key (listing the keys), pickled .npy, or unsupported format.
    """
    p = Path(path)
    if not p.exists():
        raise ShardError(f"{path}: file not found")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ShardError(f"{path}: not a plain numeric .npy array ({e})") from None
    elif suffix == ".mat":
        import scipy.io

        try:
            mat = scipy.io.loadmat(path)
        except NotImplementedError:
            raise ShardError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; save with -v7 or as .npy") from None
        except Exception as e:
            raise ShardError(f"{path}: not a readable .mat file ({e})") from None
        arrays = {k: v for k, v in mat.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
        if key is None:
            if len(arrays) != 1:
                raise ShardError(f"{path}: holds arrays {sorted(arrays)}; choose one with --key")
            key = next(iter(arrays))
        if key not in arrays:
            raise ShardError(f"{path}: no array named {key!r} (--key); it holds {sorted(arrays)}")
        arr = arrays[key]
    else:
        raise ShardError(f"{path}: cube files must be .npy or .mat, got {suffix or 'no extension'}")
    if index is not None:
        if arr.ndim != 4:
            raise ShardError(f"{path}: an index into a time stack needs a 4-D array, got shape {arr.shape}")
        if not 0 <= index < arr.shape[0]:
            raise ShardError(f"{path}: index {index} is outside the {arr.shape[0]} frames of the stack")
        arr = arr[index]
    if arr.dtype.kind not in "uif":
        raise ShardError(f"{path}: array dtype {arr.dtype} is not numeric")
    return arr


def cube_to_hwc(path: str, arr: np.ndarray, n_bands: int) -> np.ndarray:
    """Put the band axis last, finding it by its length ``n_bands`` (the last axis wins ties).

    Raises:
        ShardError: no axis of that length (e.g. a wavelength list of the wrong length).
    """
    if arr.ndim == 2 and n_bands == 1:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise ShardError(f"{path}: expected a 3-D cube [H, W, C] or [C, H, W], got shape {arr.shape}")
    if arr.shape[2] == n_bands:
        return arr
    if arr.shape[0] == n_bands:
        return np.moveaxis(arr, 0, -1)
    raise ShardError(f"{path}: cube shape {arr.shape} has no axis of length {n_bands} (the number of bands given)")


# ----------------------------------------------------------------------------------------------
# Scene specifications: what the user asked for, before files are opened.


@dataclass
class FileSpec:
    """One input raster (or cube) and how its bands map to sensor bands."""

    path: str
    sensor: str | None = None
    bands: list[str] | None = None  # names in file band order
    nodata: float | None = None
    cube_key: str | None = None  # .mat variable
    cube_index: int | None = None  # frame of a 4-D time stack
    wavelengths: str | None = None  # wavelength list file for hyperspectral cubes
    fwhm: str | None = None


@dataclass
class DateSpec:
    """All files of one acquisition date."""

    date: str | None
    files: list[FileSpec]


@dataclass
class SceneSpec:
    """One place: one or more dates, optional label, optional georeference for cubes."""

    id: str
    dates: list[DateSpec]
    label: str | None = None
    label_key: str | None = None
    label_class: int | None = None
    crs: str | None = None  # georeference for cubes: CRS and bounds
    bounds: list[float] | None = None
    gsd: float | None = None  # target GSD (metres or CRS units)
    label_ignore: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scene:
    """An opened scene: grid, readers in observation order, quality readers, label reader."""

    spec: SceneSpec
    grid: Grid
    readers: list[tuple[Reader, str | None]]  # (reader, date) in observation order
    quality: list[tuple[Reader, dict[str, Any], str | None]]  # (reader, invalid rule, date)
    label: Reader | None
    label_array: np.ndarray | None
    notices: list[str]

    @property
    def observations(self) -> list[tuple[Band, str | None]]:
        """(band, date) per observation, in pixel order."""
        return [(b, d) for r, d in self.readers for b in r.bands]

    def dtype(self) -> np.dtype:
        """One dtype that holds every observation (numpy promotion)."""
        return np.result_type(*[r.dtype for r, _ in self.readers])

    @functools.cached_property
    def tile_constants(self) -> dict[str, Any]:
        """The ``meta.json`` fields every tile of this scene shares (computed once, not per tile)."""
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
        return {
            "bands": [band_entry(b.to_dict(), d) for b, d in self.observations],
            "gsd_m": self.grid.gsd_m(),
            "crs": crs_string(self.grid.crs),
            "nodata": nodata,
            "scale": scale,
            "offset": offset,
            "files": [r.source() for r, _ in self.readers],
            "t0": next((d for _, d in self.observations if d is not None), None),
        }

    def close(self) -> None:
        """Close every reader."""
        for r, _ in self.readers:
            r.close()
        for q, _, _ in self.quality:
            q.close()
        if self.label is not None:
            self.label.close()


# ----------------------------------------------------------------------------------------------
# Opening a scene: band recognition, grid choice, readers.

_CUBE_SUFFIXES = (".npy", ".mat")


def _sensor_from(name: str | None, path: str) -> Sensor:
    from gfm.sensors import get_sensor, guess_sensor

    if name == "hls" and "HLS.L30." in Path(path).name:
        name = "hls_l30"  # same product family, Landsat band names (B05 is NIR in L30, red edge in S30)
    if name is None:
        name = guess_sensor([path])
        if name is None:
            raise ShardError(f"{path}: cannot tell the sensor from the file name; give --sensor")
    try:
        return get_sensor(name)
    except SensorError as e:
        raise ShardError(str(e)) from None


def _file_bands(fs: FileSpec, count: int, descriptions: Sequence[str | None], sensor: Sensor) -> list[Band]:
    """Sensor bands of a raster's ``count`` layers: --bands, else descriptions, file name, sensor order."""
    try:
        if fs.bands:
            if len(fs.bands) != count:
                raise ShardError(
                    f"{fs.path}: {len(fs.bands)} band names given ({','.join(fs.bands)}) for {count} bands in the file"
                )
            return [sensor.band(n) for n in fs.bands]
        if count == 1:
            b = sensor.band_from_filename(fs.path)
            if b is not None:
                return [b]
        if descriptions and all(d and sensor.has_band(d) for d in descriptions):
            return [sensor.band(str(d)) for d in descriptions]
        if count == len(sensor.bands):
            return list(sensor.bands)
    except SensorError as e:
        raise ShardError(f"{fs.path}: {e}") from None
    raise ShardError(
        f"{fs.path}: cannot recognise its {count} band(s) as {sensor.name} bands from the file name or band "
        f"descriptions; name them in file order with --bands (e.g. --bands {','.join(sensor.band_names[:count])})"
    )


def _has_gcps(ds: Any) -> bool:
    """Georeferenced by ground control points only (e.g. raw Sentinel-1 GRD measurement TIFFs)."""
    return ds.crs is None and bool(ds.gcps[0]) and ds.gcps[1] is not None


def _grid_of(ds: Any) -> Grid:
    """The dataset's own pixel grid; for GCP-only rasters, GDAL's default warp grid in the GCPs' CRS."""
    if _has_gcps(ds):
        with WarpedVRT(ds, crs=ds.gcps[1]) as vrt:
            return Grid(vrt.crs, vrt.transform, vrt.width, vrt.height)
    return Grid(ds.crs, ds.transform, ds.width, ds.height)


def _cube_grid(spec: SceneSpec, height: int, width: int) -> Grid:
    if spec.bounds is not None:
        if spec.crs is None:
            raise ShardError(f"scene {spec.id!r}: bounds given without crs")
        left, bottom, right, top = spec.bounds
        transform = Affine((right - left) / width, 0, left, 0, -(top - bottom) / height, top)
        return Grid(CRS.from_user_input(spec.crs), transform, width, height)
    gsd = spec.gsd or 1.0
    return Grid(None, Affine(gsd, 0, 0, 0, -gsd, height * gsd), width, height)


def _target_grid(spec: SceneSpec, datasets: list[Any]) -> Grid:
    """The scene grid from the first date's rasters: the finest, or the one at ``spec.gsd``."""
    grids = [_grid_of(d) for d in datasets]
    pool = [g for g in grids if g.crs is not None] or grids
    finest = min(pool, key=lambda g: abs(g.transform.a))
    if spec.gsd is None:
        return finest
    for g in pool:  # a band already at the requested GSD keeps its native grid (exact pixels)
        if math.isclose(g.gsd_m(), spec.gsd, rel_tol=1e-6) or math.isclose(abs(g.transform.a), spec.gsd):
            return g
    g = finest
    scale = spec.gsd / g.gsd_m()
    step = abs(g.transform.a) * scale
    left, bottom, right, top = g.bounds
    width = max(1, int(round((right - left) / step)))
    height = max(1, int(round((top - bottom) / (abs(g.transform.e) * scale))))
    transform = Affine(step, 0, left, 0, -abs(g.transform.e) * scale, top)
    return Grid(g.crs, transform, width, height)


def open_scene(spec: SceneSpec, *, resampling: str = "bilinear") -> Scene:
    """Open every file of a scene, choose its grid and build aligned readers.

    Raises:
        ShardError: any problem with a file, band name, sensor, wavelength list, or overlap.
    """
    if not spec.dates or not any(d.files for d in spec.dates):
        raise ShardError(f"scene {spec.id!r}: no input files")
    notices: list[str] = []
    first = spec.dates[0]
    is_cube = [f.path.lower().endswith(_CUBE_SUFFIXES) for f in first.files]
    grid: Grid | None = None  # a cube scene takes its grid from the first cube, below
    if not any(is_cube):
        opened = [_open(f.path) for f in first.files]
        try:
            grid = _target_grid(spec, opened)
        finally:
            for d in opened:
                d.close()

    readers: list[tuple[Reader, str | None]] = []
    quality: list[tuple[Reader, dict[str, Any], str | None]] = []
    for date in spec.dates:
        date_readers: list[Reader] = []
        for fs in date.files:
            if fs.path.lower().endswith(_CUBE_SUFFIXES):
                reader, cube_grid = _cube_reader(spec, fs)
                if grid is None:
                    grid = cube_grid
                elif (grid.width, grid.height) != (cube_grid.width, cube_grid.height):
                    raise ShardError(
                        f"{fs.path}: cube is {cube_grid.width}x{cube_grid.height}, the scene grid is "
                        f"{grid.width}x{grid.height}"
                    )
                date_readers.append(reader)
                continue
            if grid is None:
                raise ShardError(f"{fs.path}: list cubes before rasters in a scene that has both")
            sensor = _sensor_from(fs.sensor, fs.path)
            ds = _open(fs.path)
            try:
                descriptions = list(ds.descriptions)
                count = ds.count
            finally:
                ds.close()
            if count == 1 and fs.bands is None:
                rule = sensor.quality_rule(fs.path)
                if rule is not None:
                    q = RasterReader(fs.path, [1], [], grid, resampling="nearest", nodata=None)
                    quality.append((q, rule, date.date))
                    continue
                if _ANCILLARY.search(Path(fs.path).name) and sensor.band_from_filename(fs.path) is None:
                    notices.append(f"notice: {fs.path} is an ancillary product layer, not a band; skipped")
                    continue
            bands = _file_bands(fs, count, descriptions, sensor)
            r = RasterReader(fs.path, list(range(1, count + 1)), bands, grid, resampling=resampling, nodata=fs.nodata)
            if r.nodata is None and sensor.nodata is not None:
                r.nodata = sensor.nodata
            if r.warped:
                notices.append(f"notice: {fs.path} resampled/reprojected onto the scene grid ({resampling})")
            date_readers.append(r)
        for r in _drop_duplicate_bands(date_readers, notices):
            readers.append((r, date.date))
    assert grid is not None

    label_reader: Reader | None = None
    label_array: np.ndarray | None = None
    if spec.label is not None:
        if spec.label.lower().endswith(_CUBE_SUFFIXES):
            arr = load_cube(spec.label, spec.label_key)
            if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
                arr = np.squeeze(arr)
            if arr.shape != (grid.height, grid.width):
                raise ShardError(
                    f"{spec.label}: label array shape {arr.shape} does not match the scene grid "
                    f"{(grid.height, grid.width)}"
                )
            if arr.dtype.kind not in "iu":
                raise ShardError(f"{spec.label}: label array dtype {arr.dtype} is not an integer type")
            label_array = np.asarray(arr)
        else:
            lr = RasterReader(spec.label, [1], [], grid, resampling="nearest", nodata=None)
            if lr._ds.dtypes[0][0] not in "iu":
                lr.close()
                raise ShardError(f"{spec.label}: label raster dtype {lr._ds.dtypes[0]} is not an integer type")
            if lr.warped:
                notices.append(f"notice: label {spec.label} reprojected onto the scene grid (nearest)")
            label_reader = lr
    return Scene(spec, grid, readers, quality, label_reader, label_array, notices)


# Layers of standard products that are not spectral bands (skipped with a notice when passed by glob).
_ANCILLARY = re.compile(
    r"(?:^|[_\-.])(TCI|AOT|WVP|PVI|preview|QA_RADSAT|SR_QA_AEROSOL|ST_QA|ST_TRAD|ST_URAD|ST_DRAD|ST_ATRAN|ST_EMIS|"
    r"ST_EMSD|ST_CDIST|SAA|SZA|VAA|VZA|ANG|MSK_\w+)(?:[_\-.]|$)",
    re.IGNORECASE,
)


def _native_res(r: Reader) -> float:
    return abs(r._ds.transform.a) if isinstance(r, RasterReader) else 0.0


def _drop_duplicate_bands(readers: list[Reader], notices: list[str]) -> list[Reader]:
    """Within one date, keep only the finest single-band file of a band given several times."""
    seen: dict[tuple[str, str], Reader] = {}
    for r in readers:
        for b in r.bands:
            key = (b.sensor, b.name)
            if key not in seen:
                seen[key] = r
                continue
            other = seen[key]
            if len(r.bands) > 1 or len(other.bands) > 1:
                raise ShardError(f"{r.path}: band {b.name} of {b.sensor} is also in {other.path} (same date)")
            keep, drop = (other, r) if _native_res(other) <= _native_res(r) else (r, other)
            notices.append(f"notice: band {b.name} given twice; kept {keep.path}, skipped coarser {drop.path}")
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
                raise ShardError(
                    f"{fs.wavelengths}: {len(wl)} wavelengths listed, but the cube {fs.path} has shape {arr.shape}"
                )
            sensor = hyperspectral(fs.sensor or "hyperspectral", wl, fw, gsd_m=spec.gsd or 0.0)
        except SensorError as e:
            raise ShardError(str(e)) from None
        bands = list(sensor.bands)
    else:
        if fs.sensor is None:
            raise ShardError(f"{fs.path}: a cube needs --wavelengths FILE, or --sensor with --bands")
        sensor = _sensor_from(fs.sensor, fs.path)
        try:
            names = fs.bands or sensor.band_names
            bands = [sensor.band(n) for n in names]
        except SensorError as e:
            raise ShardError(f"{fs.path}: {e}") from None
    hwc = cube_to_hwc(fs.path, arr, len(bands))
    grid = _cube_grid(spec, hwc.shape[0], hwc.shape[1])
    return CubeReader(fs.path, hwc, bands, nodata=fs.nodata), grid
