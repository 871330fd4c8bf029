"""Rasters made by code for the ingest tests: a Landsat 5 + 7 series named by pre-collection scene ids.

Grid: EPSG:32613 (UTM 13N), 30 m pixels, 40 x 40, top-left (500000, 4400000). Three acquisitions of WRS
path 35 row 32, each with band files ``_b3``/``_b4`` (lower-case, uint16, nodata 0) and an ``_fmask``
layer (CFmask classes):

======================= ======== ========== ==============================================
scene id                sensor   date       Fmask
======================= ======== ========== ==============================================
LT50350322008110PAC01   TM (L5)  2008-04-19 cloud (4) in rows 0-9, cols 0-9
LE70350322008118EDC00   ETM+(L7) 2008-04-27 shadow (2) in rows 0-9, cols 30-39; water (1) rows 20-29
LT50350322008126PAC01   TM (L5)  2008-05-05 fill (255) in rows 30-39, cols 0-9; snow (3) rows 10-19
======================= ======== ========== ==============================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rasterio.transform import Affine

from tests.helpers_rasters import write_raster

CRS = "EPSG:32613"
X0, Y0, SIZE, RES = 500_000.0, 4_400_000.0, 40, 30.0
GRID = Affine(RES, 0, X0, 0, -RES, Y0)
SERIES = (
    ("LT50350322008110PAC01", "landsat5", "2008-04-19"),
    ("LE70350322008118EDC00", "landsat7", "2008-04-27"),
    ("LT50350322008126PAC01", "landsat5", "2008-05-05"),
)
CLOUD, SHADOW, FILL = (slice(0, 10), slice(0, 10)), (slice(0, 10), slice(30, 40)), (slice(30, 40), slice(0, 10))


@dataclass
class Series:
    """The files of :func:`landsat_series` and the band arrays they hold."""

    root: Path
    bands: list[Path] = field(default_factory=list)
    fmask: list[Path] = field(default_factory=list)
    arrays: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (scene id, band) -> [40, 40]


def landsat_series(root: Path, *, seed: int = 0) -> Series:
    """Write the series of the module docstring into ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = Series(root)
    for k, (sid, _, _) in enumerate(SERIES):
        for band in ("b3", "b4"):
            a = rng.integers(1, 10_000, size=(SIZE, SIZE), dtype=np.uint16)
            out.bands.append(write_raster(root / f"{sid}_{band}.tif", a, GRID, CRS, nodata=0))
            out.arrays[(sid, band.upper())] = a
        fm = np.zeros((SIZE, SIZE), np.uint8)
        if k == 0:
            fm[CLOUD] = 4
        elif k == 1:
            fm[SHADOW] = 2
            fm[20:30] = 1
        else:
            fm[FILL] = 255
            fm[10:20] = 3
        out.fmask.append(write_raster(root / f"{sid}_fmask.tif", fm, GRID, CRS))
    return out


def expected_valid(k: int) -> np.ndarray:
    """The validity the writer must give date ``k`` of the series (Fmask shadow, cloud and fill invalid)."""
    v = np.ones((SIZE, SIZE), bool)
    v[(CLOUD, SHADOW, FILL)[k]] = False
    return v
