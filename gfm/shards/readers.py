"""Readers: each returns the data and a validity mask of any window of a scene grid, already aligned.

A raster on the grid is read directly (pixel-identical to a rasterio window read); one on another grid
or CRS goes through a GDAL warped VRT; a ``.npy``/``.mat`` cube defines its own grid and is sliced.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError
from rasterio.enums import Resampling
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from gfm.sensors import Band
from gfm.shards.errors import InputError
from gfm.shards.grid import Grid, crs_string, grid_of, has_gcps, offset_on
from gfm.shards.remote import gdal_path, is_remote, redact, remote_env


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
        """How this reader got its pixels, for ``meta.json`` ``source`` (a URL redacted)."""
        return {"file": redact(self.path), "resampling": self.resampling}

    @property
    def native_gsd_m(self) -> float:
        """Pixel size of the source in metres (0 for a cube: it is the grid)."""
        return 0.0


def open_raster(path: str) -> rasterio.io.DatasetReader:
    """Open a raster with rasterio; raise :class:`InputError` naming the file when it can't be read.

    ``path`` is a local file or a URL GDAL reads in place (:mod:`gfm.shards.remote`: ``https://``,
    ``s3://``, ``gs://``, ``/vsi...``), opened with GDAL's HTTP settings; URLs are named redacted.
    """
    if is_remote(path):
        try:
            with warnings.catch_warnings(), remote_env():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                return rasterio.open(gdal_path(path))
        except (RasterioError, CPLE_BaseError) as e:
            raise InputError(f"{redact(path)}: cannot open the remote raster ({_first_line(e)})") from None
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as e:
        msg = str(e).splitlines()[0] if str(e) else "unknown GDAL error"
        raise InputError(f"{path}: not a readable raster ({msg})") from None


def _first_line(e: BaseException) -> str:
    """The first line of the innermost error behind ``e``, redacted (GDAL's messages repeat the URL).

    rasterio's own message only says "see previous exception"; GDAL's innermost one says what failed.
    """
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return redact(text)


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
        self._remote = is_remote(path)
        ds = open_raster(path)
        self._ds = ds
        self.dtype = np.dtype(ds.dtypes[self.indexes[0] - 1])
        self.nodata = ds.nodata if nodata is None else nodata
        self._offset = offset_on(ds, grid)
        self._vrt: WarpedVRT | None = None
        self._inner: WarpedVRT | None = None
        if self._offset is None:
            if (ds.crs is None and not has_gcps(ds)) or grid.crs is None:
                if (ds.width, ds.height) != (grid.width, grid.height):
                    raise InputError(
                        f"{path}: no georeference and size {ds.width}x{ds.height} differs from the scene grid "
                        f"{grid.width}x{grid.height}; cannot align it"
                    )
                self._offset = (0, 0)
            else:
                if check_overlap:
                    self._check_overlap(ds)
                self.resampling = resampling
                source: Any = ds
                if has_gcps(ds):
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

    @property
    def native_gsd_m(self) -> float:
        """Pixel size of the file in metres (its own CRS units converted)."""
        return grid_of(self._ds).gsd_m()

    @property
    def file_dtype(self) -> np.dtype:
        """The dtype of the file's first band read."""
        return np.dtype(self._ds.dtypes[self.indexes[0] - 1])

    def _check_overlap(self, ds: Any) -> None:
        assert self.grid.crs is not None
        try:
            own = grid_of(ds)
            left, bottom, right, top = transform_bounds(own.crs, self.grid.crs, *own.bounds)
        except Exception as e:
            raise InputError(f"{self.path}: cannot transform its bounds to the scene CRS ({e})") from None
        gl, gb, gr, gt = self.grid.bounds
        if right <= gl or left >= gr or top <= gb or bottom >= gt:
            raise InputError(
                f"{self.path}: does not overlap the scene grid (its bounds {left:.6g},{bottom:.6g},"
                f"{right:.6g},{top:.6g} vs scene {gl:.6g},{gb:.6g},{gr:.6g},{gt:.6g} in {crs_string(self.grid.crs)})"
            )

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Aligned ``(data, valid)`` for a window of the scene grid.

        Raises:
            InputError: the file cannot be read there (truncated or corrupt), naming it.
        """
        try:
            if self._remote:  # GDAL's HTTP settings (retries, timeouts) for the range requests of this read too
                with remote_env():
                    return self._read(window)
            return self._read(window)
        except (RasterioError, CPLE_BaseError, OSError) as e:
            if self._remote:
                raise InputError(f"{redact(self.path)}: cannot read its pixels over the network (server unreachable "
                                 f"or the file changed? {_first_line(e)})") from None
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{self.path}: cannot read its pixels (truncated or corrupt file? {msg})") from None

    def _read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
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


def load_cube(
    path: str, key: str | None = None, index: int | None = None, *, key_option: str = "cube_key"
) -> np.ndarray:
    """Load a ``.npy`` or ``.mat`` array (memory-mapped for .npy); ``index`` selects along axis 0.

    ``key_option`` is the option that names the ``.mat`` variable (``cube_key``, or ``label_key`` for a
    label file), named in the error when the key is missing or ambiguous.

    Raises:
        InputError: missing file, unknown key (listing the keys), pickled .npy, or unsupported format.
    """
    if is_remote(path):
        raise InputError(f"{redact(path)}: .npy/.mat cubes are read from local files only; download it first")
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: file not found")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise InputError(f"{path}: not a plain numeric .npy array ({e})") from None
    elif suffix == ".mat":
        import scipy.io

        try:
            mat = scipy.io.loadmat(path)
        except NotImplementedError:
            raise InputError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; save with -v7 or as .npy") from None
        except Exception as e:
            raise InputError(f"{path}: not a readable .mat file ({e})") from None
        arrays = {k: v for k, v in mat.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
        if key is None:
            if len(arrays) != 1:
                raise InputError(f"{path}: holds arrays {sorted(arrays)}; choose one with {{{key_option}}}",
                                 **{key_option: None})
            key = next(iter(arrays))
        if key not in arrays:
            raise InputError(f"{path}: no array named {key!r} ({{{key_option}}}); it holds {sorted(arrays)}",
                             **{key_option: None})
        arr = arrays[key]
    else:
        raise InputError(f"{path}: cube files must be .npy or .mat, got {suffix or 'no extension'}")
    if index is not None:
        if arr.ndim != 4:
            raise InputError(f"{path}: an index into a time stack needs a 4-D array, got shape {arr.shape}")
        if not 0 <= index < arr.shape[0]:
            raise InputError(f"{path}: index {index} is outside the {arr.shape[0]} frames of the stack")
        arr = arr[index]
    if arr.dtype.kind not in "uif":
        raise InputError(f"{path}: array dtype {arr.dtype} is not numeric")
    return arr


def cube_to_hwc(path: str, arr: np.ndarray, n_bands: int) -> np.ndarray:
    """Put the band axis last, finding it by its length ``n_bands`` (the last axis wins ties).

    Raises:
        InputError: no axis of that length (e.g. a wavelength list of the wrong length).
    """
    if arr.ndim == 2 and n_bands == 1:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise InputError(f"{path}: expected a 3-D cube [H, W, C] or [C, H, W], got shape {arr.shape}")
    if arr.shape[2] == n_bands:
        return arr
    if arr.shape[0] == n_bands:
        return np.moveaxis(arr, 0, -1)
    raise InputError(f"{path}: cube shape {arr.shape} has no axis of length {n_bands} (the number of bands given)")
