"""Pixel grids: the grid a scene is aligned to, and how it is chosen from the scene's files.

Default: the grid of the finest band of the first date. With a target GSD, a band already at that
GSD lends its exact grid; otherwise the finest band's extent is resampled to it. Cubes without
georeference get an image grid (no CRS) of their own size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rasterio.crs import CRS
from rasterio.transform import Affine, array_bounds
from rasterio.vrt import WarpedVRT

from gfm.shards.errors import InputError
from gfm.shards.spec import SceneSpec


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


def has_gcps(ds: Any) -> bool:
    """Georeferenced by ground control points only (e.g. raw Sentinel-1 GRD measurement TIFFs)."""
    return ds.crs is None and bool(ds.gcps[0]) and ds.gcps[1] is not None


def grid_of(ds: Any) -> Grid:
    """The dataset's own pixel grid; for GCP-only rasters, GDAL's default warp grid in the GCPs' CRS."""
    if has_gcps(ds):
        with WarpedVRT(ds, crs=ds.gcps[1]) as vrt:
            return Grid(vrt.crs, vrt.transform, vrt.width, vrt.height)
    return Grid(ds.crs, ds.transform, ds.width, ds.height)


def offset_on(ds: Any, grid: Grid) -> tuple[int, int] | None:
    """(row, col) offset of ``grid`` inside ``ds`` when ``ds`` lies on the same grid, else None."""
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


def cube_grid(spec: SceneSpec, height: int, width: int) -> Grid:
    """The grid of a cube: from the scene's ``crs`` and ``bounds``, else image coordinates at ``gsd``."""
    if spec.bounds is not None:
        if spec.crs is None:
            raise InputError(f"scene {spec.id!r}: bounds given without crs")
        left, bottom, right, top = spec.bounds
        transform = Affine((right - left) / width, 0, left, 0, -(top - bottom) / height, top)
        return Grid(CRS.from_user_input(spec.crs), transform, width, height)
    gsd = spec.gsd or 1.0
    return Grid(None, Affine(gsd, 0, 0, 0, -gsd, height * gsd), width, height)


def target_grid(spec: SceneSpec, datasets: Sequence[Any]) -> Grid:
    """The scene grid from the first date's rasters: the finest, or the one at ``spec.gsd``."""
    grids = [grid_of(d) for d in datasets]
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
