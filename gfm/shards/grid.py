"""Pixel grids: the grid a scene is aligned to, and how it is chosen from the scene's files.

Pixel sizes are compared in metres (each file's pixel size in its own CRS units, converted), never in
raw CRS units, so degrees never beat metres. Default: the native grid of the finest file of the first
date (the first such file among equals), in its CRS. ``SceneSpec.crs`` picks the CRS and
``SceneSpec.gsd`` the pixel size in metres instead: a file already on that CRS at that GSD lends its exact
grid; otherwise the finest file's extent is laid out in that CRS at that GSD. Cubes without
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
from rasterio.warp import transform_bounds

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


def _metres_to_units(crs: CRS, metres: float, lat: float) -> tuple[float, float]:
    """A pixel size in metres as (x, y) steps in ``crs`` units (degrees at latitude ``lat`` when geographic)."""
    if crs.is_geographic:
        return metres / (111_320.0 * max(math.cos(math.radians(lat)), 1e-6)), metres / 110_574.0
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # CRS without linear units: treat as metres
        factor = 1.0
    return metres / factor, metres / factor


def _bounds_in(grid: Grid, crs: CRS) -> tuple[float, float, float, float] | None:
    """``grid``'s bounds in ``crs`` (None when they cannot be transformed)."""
    if grid.crs is None:
        return None
    if grid.crs == crs:
        return grid.bounds
    try:
        return tuple(transform_bounds(grid.crs, crs, *grid.bounds))  # type: ignore[return-value]
    except Exception:
        return None


def _intersects(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def check_overlap(spec: SceneSpec, grids: Sequence[Grid], paths: Sequence[str]) -> None:
    """Raise :class:`InputError` naming the file that overlaps the fewest of the others (the outlier).

    Among files that overlap equally few, the later one is blamed (the first file states the user's intent).
    Bounds that cannot be transformed between two CRSs count as overlapping.
    """
    n = len(grids)
    if n < 2:
        return
    misses: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        crs = grids[i].crs
        if crs is None:
            continue
        for j in range(n):
            if i == j:
                continue
            other = _bounds_in(grids[j], crs)
            if other is not None and not _intersects(grids[i].bounds, other):
                misses[i].append(j)
    worst = max(range(n), key=lambda i: (len(misses[i]), i))
    if not misses[worst]:
        return
    j = misses[worst][0]
    g, crs = grids[worst], grids[worst].crs
    other = _bounds_in(grids[j], crs) if crs is not None else None
    fmt = ",".join
    more = f" and {len(misses[worst]) - 1} more" if len(misses[worst]) > 1 else ""
    raise InputError(
        f"{paths[worst]}: does not overlap the other files of scene {spec.id!r} ({paths[j]}{more}): its bounds "
        f"{fmt(f'{v:.6g}' for v in g.bounds)} vs {fmt(f'{v:.6g}' for v in other or ())} in {crs_string(crs)}"
    )


def target_grid(spec: SceneSpec, datasets: Sequence[Any], paths: Sequence[str] | None = None) -> tuple[Grid, str]:
    """The scene grid from the first date's rasters, and a notice stating its CRS, GSD and origin.

    See the module docstring for the rule. ``paths`` name the datasets in errors and the notice.

    Raises:
        InputError: a file that does not overlap the others; a ``spec.crs`` that is not a CRS.
    """
    names = list(paths) if paths is not None else [str(getattr(d, "name", f"file {i}")) for i, d in
                                                     enumerate(datasets)]
    grids = [grid_of(d) for d in datasets]
    georef = [(g, p) for g, p in zip(grids, names) if g.crs is not None]
    if not georef:  # image coordinates only: the finest pixel grid
        g, p = min(zip(grids, names), key=lambda gp: abs(gp[0].transform.a))
        return g, f"notice: scene {spec.id!r}: image grid (no CRS), {g.width}x{g.height} px from {p}"
    check_overlap(spec, [g for g, _ in georef], [p for _, p in georef])
    finest, finest_path = min(georef, key=lambda gp: round(gp[0].gsd_m(), 3))
    if spec.crs is not None:
        try:
            crs = CRS.from_user_input(spec.crs)
        except Exception as e:
            raise InputError(f"scene {spec.id!r}: {{crs}} {spec.crs!r} is not a CRS ({e})", crs=None) from None
    else:
        crs = finest.crs
    assert crs is not None
    gsd = spec.gsd if spec.gsd is not None else finest.gsd_m()
    # a file already on that CRS at that GSD keeps its native grid (exact pixels); the finest such first
    for g, p in georef:
        if g.crs == crs and math.isclose(g.gsd_m(), gsd, rel_tol=1e-6):
            return g, _notice(spec, g, f"the grid of {p}")
    bounds = _bounds_in(finest, crs)
    if bounds is None:
        raise InputError(f"{finest_path}: cannot transform its bounds to {crs_string(crs)}")
    left, bottom, right, top = bounds
    step_x, step_y = _metres_to_units(crs, gsd, (bottom + top) / 2)
    width = max(1, int(round((right - left) / step_x)))
    height = max(1, int(round((top - bottom) / step_y)))
    g = Grid(crs, Affine(step_x, 0, left, 0, -step_y, top), width, height)
    return g, _notice(spec, g, f"the extent of {finest_path}, resampled")


def _notice(spec: SceneSpec, g: Grid, origin: str) -> str:
    crs = str(crs_string(g.crs))
    crs_text = crs if len(crs) <= 60 else crs[:57] + "..."  # a WKT without EPSG code: its start names it
    return (f"notice: scene {spec.id!r}: grid {crs_text} at {g.gsd_m():.4g} m, {g.width}x{g.height} px "
            f"({origin})")
