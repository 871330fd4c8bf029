"""GeoParquet 1.1 tables of tile embeddings, written row group by row group.

One row per tile:

=================  ==================================  =============================================
column             type                                content
=================  ==================================  =============================================
key                string                              the tile's sample key
scene              string                              the scene id (or shard) it came from
geometry           binary (WKB)                        the tile footprint in WGS84 lon/lat (OGC:CRS84),
                                                       null when the source has no georeference
bbox               struct<xmin, ymin, xmax, ymax>      the footprint's bounds (GeoParquet 1.1 covering)
source_crs         string                              the source CRS (``EPSG:n`` or WKT), null if none
source_bounds      fixed_size_list<double>[4]          ``[left, bottom, right, top]`` in ``source_crs``
datetime           timestamp[ms, UTC]                  the first acquisition date, null when unknown
dates              list<string>                        every distinct date (``YYYY-MM-DD``)
sensor             string                              the sensors, ``+``-joined
bands              list<string>                        ``sensor/band`` per observation used
gsd_m              double                              ground sampling distance
valid_fraction     double                              fraction of usable pixels
embedding          fixed_size_list<float>[D]           the pooled embedding
=================  ==================================  =============================================

File metadata (in the Arrow schema, so every reader sees it): ``geo`` (the GeoParquet metadata:
version, primary column, encoding WKB, geometry types, CRS as PROJJSON, the ``bbox`` covering column)
and ``gfm`` (model, pooling, embedding size, gfm version). The file is written under a temporary name
and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gfm.fileio import remove_stale_temporaries

GEOPARQUET_VERSION = "1.1.0"
#: vertices per footprint edge when reprojecting (curved edges in lon/lat stay close to the true footprint)
EDGE_POINTS = 4


def schema(dim: int) -> pa.Schema:
    """The Arrow schema of an embedding table with ``dim``-dimensional embeddings."""
    return pa.schema([
        ("key", pa.string()),
        ("scene", pa.string()),
        ("geometry", pa.binary()),
        ("bbox", pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()),
                            ("ymax", pa.float64())])),
        ("source_crs", pa.string()),
        ("source_bounds", pa.list_(pa.float64(), 4)),
        ("datetime", pa.timestamp("ms", tz="UTC")),
        ("dates", pa.list_(pa.string())),
        ("sensor", pa.string()),
        ("bands", pa.list_(pa.string())),
        ("gsd_m", pa.float64()),
        ("valid_fraction", pa.float64()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


def crs84_projjson() -> dict[str, Any]:
    """PROJJSON of OGC:CRS84 (WGS84 longitude, latitude), the CRS of the ``geometry`` column."""
    from rasterio.crs import CRS

    out: dict[str, Any] = CRS.from_string("OGC:CRS84").to_dict(projjson=True)
    return out


def footprint(crs: Any, bounds: Sequence[float]) -> tuple[bytes, tuple[float, float, float, float]] | None:
    """WKB of the WGS84 polygon of ``bounds`` (``[left, bottom, right, top]`` in ``crs``), and its bbox.

    Edges are densified before reprojection. None when ``crs`` is None or PROJ cannot transform it.
    """
    if crs is None:
        return None
    import shapely
    from rasterio.warp import transform_geom

    left, bottom, right, top = (float(v) for v in bounds)
    t = np.linspace(0.0, 1.0, EDGE_POINTS + 1)[:-1]
    ring = ([(left + (right - left) * s, top) for s in t] + [(right, top + (bottom - top) * s) for s in t]
            + [(right + (left - right) * s, bottom) for s in t] + [(left, bottom + (top - bottom) * s) for s in t])
    ring.append(ring[0])
    try:
        geom = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    except Exception:  # a CRS PROJ cannot take to WGS84: no footprint rather than a wrong one
        return None
    shape = shapely.geometry.shape(geom)
    if not shape.is_valid or not all(math.isfinite(v) for v in shape.bounds):
        return None
    return shapely.to_wkb(shape), tuple(float(v) for v in shape.bounds)  # type: ignore[return-value]


def geo_metadata() -> dict[str, Any]:
    """The ``geo`` file metadata (GeoParquet 1.1): WKB polygons (or null) in OGC:CRS84, ``bbox`` covering."""
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": crs84_projjson(),
        "covering": {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"], "xmax": ["bbox", "xmax"],
                              "ymax": ["bbox", "ymax"]}},
    }
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


@dataclass
class TileRow:
    """One row of the table (see the module docstring)."""

    key: str
    scene: str
    crs: str | None
    bounds: Sequence[float] | None
    dates: Sequence[str]
    sensors: Sequence[str]
    bands: Sequence[str]
    gsd_m: float | None
    valid_fraction: float
    embedding: np.ndarray


#: rows per Parquet row group: large enough that a million tiles make ~100 groups, small enough that a
#: reader filtering on ``bbox`` statistics skips most of a big file
ROW_GROUP_ROWS = 10_000


class EmbeddingWriter:
    """Streams :class:`TileRow` batches into a GeoParquet file; :meth:`commit` renames it into place.

    Args:
        path: the file to write.
        dim: embedding size.
        metadata: the ``gfm`` file metadata (pooling, model...).
        row_group_rows: rows per row group (:data:`ROW_GROUP_ROWS`).
    """

    def __init__(self, path: str | Path, dim: int, metadata: Mapping[str, Any],
                 row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.path = Path(path)
        self.row_group_rows = row_group_rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)  # a killed writer's leftovers for this same path
        self.dim = dim
        self.metadata = dict(metadata)
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self._tmp = Path(name)
        meta = {b"geo": json.dumps(geo_metadata()).encode(), b"gfm": json.dumps(self.metadata).encode()}
        self._schema = schema(dim).with_metadata(meta)
        self._writer = pq.ParquetWriter(str(self._tmp), self._schema, compression="zstd")
        self.rows = 0

    def write(self, rows: Sequence[TileRow]) -> None:
        """Append rows; they are written in row groups of ``row_group_rows`` (the last one may be shorter)."""
        if not rows:
            return
        cols: dict[str, list[Any]] = {name: [] for name in schema(self.dim).names}
        for r in rows:
            fp = footprint(r.crs, r.bounds) if r.bounds is not None else None
            dates = sorted({d for d in r.dates if d})
            cols["key"].append(r.key)
            cols["scene"].append(r.scene)
            cols["geometry"].append(fp[0] if fp else None)
            cols["bbox"].append(dict(zip(("xmin", "ymin", "xmax", "ymax"), fp[1])) if fp else None)
            cols["source_crs"].append(r.crs)
            cols["source_bounds"].append([float(v) for v in r.bounds] if r.bounds is not None else None)
            cols["datetime"].append(datetime.fromisoformat(dates[0]).replace(tzinfo=timezone.utc) if dates else None)
            cols["dates"].append(dates)
            cols["sensor"].append("+".join(sorted(set(r.sensors))))
            cols["bands"].append(list(r.bands))
            cols["gsd_m"].append(r.gsd_m)
            cols["valid_fraction"].append(float(r.valid_fraction))
            cols["embedding"].append(np.asarray(r.embedding, dtype=np.float32))
        table = pa.table({k: v for k, v in cols.items() if k != "embedding"} | {
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate(cols["embedding"]).astype(np.float32)), self.dim)
        }, schema=self._schema)
        self._pending.append(table)
        self._pending_rows += len(rows)
        self.rows += len(rows)
        if self._pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write the buffered rows as whole row groups (and, when ``final``, the rest)."""
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        whole = len(table) if final else len(table) - len(table) % self.row_group_rows
        if whole:
            self._writer.write_table(table.slice(0, whole), row_group_size=self.row_group_rows)
        rest = table.slice(whole)
        self._pending, self._pending_rows = ([rest], len(rest)) if len(rest) else ([], 0)

    def commit(self) -> Path:
        """Finish the file and rename it onto ``path``."""
        self._flush(final=True)
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
