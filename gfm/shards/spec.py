"""Scene specifications: what the user asks for, before any file is opened.

A :class:`SceneSpec` is one place: one or more dates (:class:`DateSpec`), each a list of files
(:class:`FileSpec`), plus an optional label and, for cubes without georeference, a CRS and bounds.
Specs are plain picklable data: worker processes receive them and open the files themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date as Date
from typing import Any

from gfm.sensors import guess_date
from gfm.shards.errors import InputError
from gfm.shards.remote import name_of


@dataclass
class FileSpec:
    """One input raster (or cube) and how its bands map to sensor bands.

    Attributes:
        path: a raster GDAL reads (GeoTIFF, JP2, ...), local or a URL read in place (``https://``, ``s3://``,
            ``gs://``, ``/vsi...``: :mod:`gfm.shards.remote`), or a local ``.npy``/``.mat`` cube.
        sensor: sensor preset name; None: guessed from the product file name.
        bands: band names in file band order; None: recognised from the file name or band descriptions.
        nodata: nodata value overriding the file's own.
        cube_key: variable name in a ``.mat`` cube.
        cube_index: frame of a 4-D time stack ``[T, H, W, C]``.
        wavelengths: wavelength list file (nm) for a hyperspectral cube.
        fwhm: band width list file (nm) for a hyperspectral cube (default: band spacing).
    """

    path: str
    sensor: str | None = None
    bands: list[str] | None = None
    nodata: float | None = None
    cube_key: str | None = None
    cube_index: int | None = None
    wavelengths: str | None = None
    fwhm: str | None = None


@dataclass
class DateSpec:
    """All files of one acquisition date (``YYYY-MM-DD``, or None when unknown)."""

    date: str | None
    files: list[FileSpec]


@dataclass
class SceneSpec:
    """One place: one or more dates, optional label, optional georeference for cubes.

    Attributes:
        id: scene id, the first part of every sample key (unique within a build).
        dates: the acquisitions; the first date's rasters define the scene grid.
        label: label raster (reprojected with nearest; integer, or float holding integers), ``.npy``/``.mat``
            array on the scene grid, or vector file (``.gpkg``, ``.geojson``, ``.shp``...) rasterised onto it.
        label_key: variable name in a ``.mat`` label file.
        label_class: one integer class for every tile of the scene (instead of a label raster).
        crs: the scene grid's CRS (default: the CRS of the finest file); for cubes, their georeference.
        bounds: georeference for cubes (``[left, bottom, right, top]`` in ``crs``).
        gsd: target ground sampling distance in metres (cubes without georeference: in pixels' units);
            None: the finest file's.
        label_ignore: label value for unlabelled pixels (outside the label raster, its nodata, no feature).
        label_field: the attribute of a vector label file that holds the class (integer or class name).
    """

    id: str
    dates: list[DateSpec]
    label: str | None = None
    label_key: str | None = None
    label_class: int | None = None
    crs: str | None = None
    bounds: list[float] | None = None
    gsd: float | None = None
    label_ignore: int = -1
    extra: dict[str, Any] = field(default_factory=dict)
    label_field: str | None = None


def check_specs(specs: Sequence[SceneSpec]) -> None:
    """Raise :class:`InputError` for repeated scene ids or dates that are not ``YYYY-MM-DD``."""
    ids = [s.id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputError(f"scene ids must be unique; repeated: {', '.join(dupes)}")
    for spec in specs:
        for d in spec.dates:
            if d.date is not None:
                try:
                    Date.fromisoformat(d.date)
                except ValueError:
                    raise InputError(f"scene {spec.id!r}: date {d.date!r} is not YYYY-MM-DD") from None


def dates_from_names(files: Sequence[FileSpec], date: str | None = None) -> list[DateSpec]:
    """Group files by acquisition date: ``date`` for all, else the dates in the product file names.

    One date (or none) in the names gives one :class:`DateSpec`; several give a time series, one
    :class:`DateSpec` per date in date order (the first date's rasters then define the grid).

    Raises:
        InputError: some names carry a date and others, among several dates, carry none.
    """
    if date is not None:
        return [DateSpec(date, list(files))]
    guessed = [guess_date(name_of(f.path)) for f in files]
    distinct = sorted({d for d in guessed if d is not None})
    if len(distinct) <= 1:
        return [DateSpec(distinct[0] if distinct else None, list(files))]
    undated = [f.path for f, d in zip(files, guessed) if d is None]
    if undated:
        raise InputError(f"{undated[0]}: no date in its name while other files have several; give {{date}} "
                         "or a manifest", date=None)
    return [DateSpec(d, [f for f, g in zip(files, guessed) if g == d]) for d in distinct]
