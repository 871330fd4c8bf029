"""Cloud-Optimized GeoTIFFs written window by window, that appear whole or not at all.

GDAL's COG driver only copies a finished raster (it must lay out overviews and tiles in a fixed order),
so :class:`CogWriter` writes blocks into a temporary tiled, compressed GeoTIFF beside the target, then
:meth:`CogWriter.commit` has the COG driver copy it (block by block, through GDAL's block cache, which
``GDAL_CACHEMAX`` bounds) into a second temporary file and renames that onto the target. Memory stays
that of one block plus the cache, whatever the raster's size; disk holds the raster twice while the
copy runs. Temporary names start with ``.<name>.`` and end with ``.tmp``; an interrupted run leaves no
file at the target path and removes its temporaries (a killed one leaves them, recognisably named, and the
next writer of the same path removes them).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

from gfm.fileio import remove_stale_temporaries

#: internal tile size of the temporary and final files; output blocks are multiples of it
BLOCK = 256
#: GDAL block cache while writing and converting (MB): bounds memory however large the raster is
CACHE_MB = 64
#: the infixes of the temporary files: ``.<name>.part.XXXXXXXX.tmp`` (blocks), ``.<name>.cog.XXXXXXXX.tmp`` (copy)
TEMP_KINDS = ("part", "cog")


def gdal_env() -> rasterio.Env:
    """The GDAL settings writers run under: a bounded block cache (``CACHE_MB``)."""
    return rasterio.Env(GDAL_CACHEMAX=CACHE_MB)


class CogWriter:
    """Write a georeferenced raster block by block; :meth:`commit` turns it into ``path`` as a COG.

    Args:
        path: the final file.
        width, height, count, dtype: raster shape and type.
        crs, transform: georeference (``crs`` None: image coordinates).
        nodata: the nodata value.
        colormap: band 1 colour table ``{value: (r, g, b, a)}``.
        descriptions: one per band.
        tags: dataset metadata (``{"CLASS_NAMES": json...}``).
        scales: per-band scale factors stored as GDAL metadata (physical = stored × scale).
        overview_resampling: ``nearest`` for classes, ``average`` for continuous values.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        width: int,
        height: int,
        count: int,
        dtype: str,
        crs: CRS | None,
        transform: Affine,
        nodata: float | None,
        colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
        descriptions: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        scales: Sequence[float] | None = None,
        overview_resampling: str = "nearest",
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path, TEMP_KINDS)  # a killed writer's leftovers for this same path
        self.overview_resampling = overview_resampling
        self._tmp = self._temp(".part")
        self._cog_tmp: Path | None = None
        profile: dict[str, Any] = dict(
            driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs=crs, transform=transform,
            nodata=nodata, tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
            BIGTIFF="IF_SAFER", interleave="band" if count > 1 else "pixel",
        )
        self._ds = rasterio.open(self._tmp, "w", **profile)
        if colormap:
            self._ds.write_colormap(1, dict(colormap))
        for i, d in enumerate(descriptions or [], start=1):
            self._ds.set_band_description(i, d)
        if tags:
            self._ds.update_tags(**dict(tags))
        if scales:
            self._ds.scales = tuple(float(s) for s in scales)

    def _temp(self, kind: str) -> Path:
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}{kind}.", suffix=".tmp")
        os.close(fd)
        return Path(name)

    def write(self, data: np.ndarray, row: int, col: int) -> None:
        """Write ``data [count, h, w]`` with its top-left pixel at ``(row, col)``."""
        self._ds.write(data, window=Window(col, row, data.shape[-1], data.shape[-2]))

    def commit(self) -> Path:
        """Convert to a COG at ``path`` (atomic rename) and remove the temporary files."""
        self._ds.close()
        self._cog_tmp = self._temp(".cog")
        rasterio.shutil.copy(
            self._tmp, self._cog_tmp, driver="COG", compress="DEFLATE", blocksize=BLOCK,
            overview_resampling=self.overview_resampling, BIGTIFF="IF_SAFER",
        )
        os.replace(self._cog_tmp, self.path)
        self._cog_tmp = None
        self._cleanup()
        return self.path

    def abort(self) -> None:
        """Drop everything written (the target path is never touched)."""
        if not self._ds.closed:
            self._ds.close()
        self._cleanup()

    def _cleanup(self) -> None:
        for p in (self._tmp, self._cog_tmp):
            if p is not None:
                p.unlink(missing_ok=True)

    def __enter__(self) -> CogWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
