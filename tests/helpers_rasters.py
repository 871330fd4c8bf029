"""Tiny rasters made by code for the shard-writer tests (no ../shared needed): a Sentinel-2-like scene.

Scene grid: EPSG:32633, 10 m pixels, 64 x 64, top-left (500000, 5000640). Files are named like
Sentinel-2 L1C tile products (``T33UUU_<date>T101010_<band>.tif``) so the writer can tell sensor, band
and date from the names alone.

* 10 m bands B02, B03, B04 (uint16); B02 has nodata (0) in rows 0-15, cols 0-11;
* 20 m bands B05, B8A (uint16, 32 x 32 on the same extent);
* B06 in a second CRS (EPSG:3857, ~30 m), one constant value, covering the scene with a margin;
* a label raster (int16, 10 m) covering only columns 0-47 of the scene;
* a second date with its own B02, B03, B04.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine, from_bounds
from rasterio.warp import transform_bounds

CRS_UTM = "EPSG:32633"
CRS_OTHER = "EPSG:3857"
X0, Y0, SIZE, RES = 500_000.0, 5_000_640.0, 64, 10.0
GRID = Affine(RES, 0, X0, 0, -RES, Y0)
NODATA_BLOCK = (slice(0, 16), slice(0, 12))  # rows, cols of B02 set to its nodata (0)
LABEL_COLS = 48  # the label raster covers columns 0..47
B06_VALUE = 777
DATES = ("2020-01-01", "2020-01-11")


def write_raster(path: Path, array: np.ndarray, transform: Affine, crs: str | None, *, nodata: float | None = None,
                 driver: str = "GTiff", **options: object) -> Path:
    """Write a ``[H, W]`` or ``[C, H, W]`` array as a raster; returns the path."""
    data = array[None] if array.ndim == 2 else array
    profile = dict(driver=driver, width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                   transform=transform, crs=crs, nodata=nodata, **options)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def product_name(date: str, band: str, ext: str = "tif") -> str:
    """A Sentinel-2 L1C tile file name for ``date`` and ``band``."""
    return f"T33UUU_{date.replace('-', '')}T101010_{band}.{ext}"


@dataclass
class SyntheticScene:
    """The files written by :func:`make_scene` and the arrays they hold."""

    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)  # date -> band files
    arrays: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (date, band) -> array on its own grid
    label: Path | None = None
    label_array: np.ndarray | None = None  # [64, LABEL_COLS]

    def on_grid(self, date: str, band: str) -> np.ndarray:
        """The band as the writer should put it on the 10 m scene grid (nearest for 20 m, constant for B06)."""
        a = self.arrays[(date, band)]
        if band == "B06":
            return np.full((SIZE, SIZE), B06_VALUE, dtype=np.uint16)
        if a.shape[0] == SIZE // 2:
            return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)
        return a


def make_scene(root: Path, *, seed: int = 0, second_date: bool = False, jp2: bool = False) -> SyntheticScene:
    """Write the synthetic scene into ``root`` (first date; with ``second_date`` also the second one)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    scene = SyntheticScene(root)
    first = DATES[0]
    files = []
    for band in ("B02", "B03", "B04"):
        a = rng.integers(1, 5000, size=(SIZE, SIZE), dtype=np.uint16)
        if band == "B02":
            a[NODATA_BLOCK] = 0
        if jp2 and band == "B03":
            path = write_raster(root / product_name(first, band, "jp2"), a, GRID, CRS_UTM, driver="JP2OpenJPEG",
                                QUALITY="100", REVERSIBLE="YES")
        else:
            path = write_raster(root / product_name(first, band), a, GRID, CRS_UTM, nodata=0)
        files.append(path)
        scene.arrays[(first, band)] = a
    grid20 = Affine(2 * RES, 0, X0, 0, -2 * RES, Y0)
    for band in ("B05", "B8A"):
        a = rng.integers(1, 5000, size=(SIZE // 2, SIZE // 2), dtype=np.uint16)
        files.append(write_raster(root / product_name(first, band), a, grid20, CRS_UTM, nodata=0))
        scene.arrays[(first, band)] = a
    # B06 in Web Mercator at ~30 m (coarser than the 10 m bands, so it never lends the grid), covering the
    # scene with a margin
    west, south, east, north = transform_bounds(CRS_UTM, CRS_OTHER, X0, Y0 - SIZE * RES, X0 + SIZE * RES, Y0)
    pad = 300.0
    b06 = np.full((40, 40), B06_VALUE, dtype=np.uint16)
    files.append(write_raster(root / product_name(first, "B06"), b06,
                              from_bounds(west - pad, south - pad, east + pad, north + pad, 40, 40), CRS_OTHER))
    scene.arrays[(first, "B06")] = b06
    scene.files[first] = files
    label = rng.integers(0, 6, size=(SIZE, LABEL_COLS), dtype=np.int16)
    scene.label = write_raster(root / "labels.tif", label, GRID, CRS_UTM)
    scene.label_array = label
    if second_date:
        second = DATES[1]
        scene.files[second] = []
        for band in ("B02", "B03", "B04"):
            a = rng.integers(1, 5000, size=(SIZE, SIZE), dtype=np.uint16)
            scene.files[second].append(write_raster(root / product_name(second, band), a, GRID, CRS_UTM, nodata=0))
            scene.arrays[(second, band)] = a
    return scene


def jp2_available() -> bool:
    """Whether this GDAL build can write and read JPEG 2000 (the JP2OpenJPEG driver)."""
    with rasterio.Env() as env:
        return "JP2OpenJPEG" in env.drivers()
