"""Labels as they come: integer or float rasters, arrays, and vector files rasterised onto the scene grid.

* A label raster (or ``.npy``/``.mat`` array) may be of any integer type, or of a float type whose valid
  values are all integers (a common export: float32 classes with nodata -99999); its nodata and NaN become
  the ignore value. A non-integral value is an error naming one.
* A vector label file (GeoPackage, GeoJSON, Shapefile, FlatGeobuf...) is read with pyogrio, reprojected
  to the scene CRS and rasterised window by window onto the scene grid with
  :func:`rasterio.features.rasterize` (polygons: pixels whose centre is inside; points and lines: the
  pixels they touch). ``SceneSpec.label_field`` names the attribute holding the class: integer values are
  the labels; text values are class names, numbered in sorted order over every scene of a build
  (:func:`class_table`), and the table is recorded in ``index.json`` (``classes``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.crs import CRS
from rasterio.windows import Window

from gfm.shards.errors import InputError
from gfm.shards.grid import Grid
from gfm.shards.readers import Reader, open_raster
from gfm.shards.spec import SceneSpec

#: File suffixes read as vector label files.
VECTOR_SUFFIXES: tuple[str, ...] = (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".gml", ".kml", ".sqlite")

_INT32 = (-(2**31), 2**31 - 1)


def is_vector(path: str) -> bool:
    """Whether ``path`` is read as a vector label file (by its suffix)."""
    return path.lower().endswith(VECTOR_SUFFIXES)


def check_label_values(path: str, values: np.ndarray, valid: np.ndarray) -> None:
    """Raise :class:`InputError` when a valid label value is not an integer that fits int32."""
    v = values[valid]
    if v.dtype.kind == "f":
        bad = v[v != np.round(v)]
        if bad.size:
            raise InputError(
                f"{path}: label values must be integer classes; found {float(bad.flat[0]):g} (pixels that are "
                "not labelled should hold the file's nodata value or NaN)"
            )
    if v.size and (v.min() < _INT32[0] or v.max() > _INT32[1]):
        raise InputError(f"{path}: label value {v.min() if v.min() < _INT32[0] else v.max():g} does not fit int32")


def check_label_raster(path: str) -> None:
    """Check a label raster before use: integer dtype, or float holding only integers where valid.

    Reads a float raster once, block by block.

    Raises:
        InputError: a dtype that is not numeric, or a non-integral valid value (naming one).
    """
    with open_raster(path) as ds:
        dtype = np.dtype(ds.dtypes[0])
        if dtype.kind in "iu":
            return
        if dtype.kind != "f":
            raise InputError(f"{path}: label raster dtype {dtype} is not numeric")
        nodata = ds.nodata
        for _, window in ds.block_windows(1):
            a = ds.read(1, window=window)
            valid = np.isfinite(a)
            if nodata is not None and not math.isnan(nodata):
                valid &= a != nodata
            check_label_values(path, a, valid)


def label_array(path: str, arr: np.ndarray, ignore: int) -> np.ndarray:
    """An integer label array from a ``.npy``/``.mat`` one; a float array's NaN become ``ignore``.

    Raises:
        InputError: not numeric, or a finite value that is not an integer (naming one).
    """
    if arr.dtype.kind in "iu":
        return np.asarray(arr)
    if arr.dtype.kind != "f":
        raise InputError(f"{path}: label array dtype {arr.dtype} is not numeric")
    a = np.asarray(arr)
    finite = np.isfinite(a)
    check_label_values(path, a, finite)
    return np.where(finite, a, ignore).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Vector labels


def _read_vector(path: str, field: str | None, *, geometry: bool) -> tuple[dict[str, Any], Any, np.ndarray]:
    """``(meta, WKB geometries or None, field values)`` of the first layer; errors name the file and field."""
    import pyogrio
    import pyogrio.raw

    if not Path(path).exists():
        raise InputError(f"{path}: file not found")
    try:
        info = pyogrio.read_info(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable vector file ({str(e).splitlines()[0]})") from None
    fields = [str(f) for f in info["fields"]]
    if field is None or field not in fields:
        what = "give the attribute that holds the class with {label_field}" if field is None else \
            f"no attribute {field!r} ({{label_field}})"
        raise InputError(f"{path}: {what}; its attributes: {', '.join(fields) or 'none'}", label_field=None)
    try:
        meta, _, geoms, values = pyogrio.raw.read(path, columns=[field], read_geometry=geometry)
    except Exception as e:
        raise InputError(f"{path}: not a readable vector file ({str(e).splitlines()[0]})") from None
    return meta, geoms, np.asarray(values[0])


def _is_text(values: np.ndarray) -> bool:
    return values.dtype.kind in "OUS"


def class_table(specs: Sequence[SceneSpec]) -> dict[str, int] | None:
    """Class name → label value over the text-valued vector labels of ``specs`` (names sorted), or None.

    Raises:
        InputError: a vector label file without ``label_field`` or that field, or one build mixing text
            and numeric class fields.
    """
    names: set[str] = set()
    text: list[str] = []
    numeric: list[str] = []
    for spec in specs:
        if spec.label is None or not is_vector(spec.label):
            continue
        _, _, values = _read_vector(spec.label, spec.label_field, geometry=False)
        if _is_text(values):
            text.append(spec.label)
            names.update(str(v) for v in values if v is not None)
        else:
            numeric.append(spec.label)
    if text and numeric:
        raise InputError(f"{numeric[0]}: its class field is numeric while {text[0]}'s holds class names; "
                         "use one kind of class field for every scene of a build")
    return {name: i for i, name in enumerate(sorted(names))} if text else None


class VectorLabelReader(Reader):
    """A vector label file rasterised onto windows of the scene grid (see the module docstring)."""

    def __init__(self, path: str, field: str | None, grid: Grid, classes: Mapping[str, int] | None,
                 ignore: int) -> None:
        import shapely

        self.path = path
        self.bands = []
        self.dtype = np.dtype(np.int32)
        self.nodata = None
        self.resampling = "rasterize"
        self.grid = grid
        self.ignore = ignore
        self.notices: list[str] = []
        meta, wkb, values = _read_vector(path, field, geometry=True)
        geoms = shapely.from_wkb(wkb)
        if _is_text(values):
            if classes is None:
                raise InputError(f"{path}: class names in attribute {field!r} but no class table")
            labels = np.array([classes[str(v)] if v is not None else ignore for v in values], dtype=np.int64)
        else:
            f = values.astype(np.float64)
            keep = np.isfinite(f)
            check_label_values(path, f, keep)
            labels = np.where(keep, f, ignore).astype(np.int64)
        # features without geometry or without a class (None, NaN) burn nothing
        keep = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms)) & (labels != ignore)
        geoms, labels = geoms[keep], labels[keep]
        src = meta.get("crs")
        if grid.crs is None:
            raise InputError(f"{path}: a vector label needs a georeferenced scene grid")
        if src is None:
            self.notices.append(f"notice: {path} has no CRS; taken to be the scene's")
        elif CRS.from_user_input(src) != grid.crs:
            geoms = _reproject(geoms, CRS.from_user_input(src), grid.crs)
            self.notices.append(f"notice: label {path} reprojected onto the scene CRS and rasterised")
        gl, gb, gr, gt = grid.bounds
        inside = shapely.intersects(geoms, shapely.box(gl, gb, gr, gt))
        if not inside.any():
            raise InputError(f"{path}: no feature of attribute {field!r} overlaps the scene grid "
                             f"({gl:.6g},{gb:.6g},{gr:.6g},{gt:.6g})")
        self._geoms, self._labels = geoms[inside], labels[inside]
        self._tree = shapely.STRtree(self._geoms)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """``(labels [1, h, w] int32, valid [1, h, w])``: features burnt in file order (later ones win)."""
        import shapely
        from rasterio.features import rasterize

        h, w = int(window.height), int(window.width)
        t = self.grid.window_transform(int(window.row_off), int(window.col_off))
        left, top = t.c, t.f
        right, bottom = t @ (w, h)
        box = shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
        hits = np.sort(self._tree.query(box))
        if hits.size:
            out = rasterize(zip(self._geoms[hits], self._labels[hits].tolist()), out_shape=(h, w), transform=t,
                            fill=self.ignore, dtype="int32")
        else:
            out = np.full((h, w), self.ignore, dtype=np.int32)
        return out[None], (out != self.ignore)[None]

    def source(self) -> dict[str, Any]:
        """The vector file, rasterised."""
        return {"file": self.path, "resampling": "rasterize"}


def _reproject(geoms: np.ndarray, src: CRS, dst: CRS) -> np.ndarray:
    import shapely
    from rasterio.warp import transform

    def move(xy: np.ndarray) -> np.ndarray:
        xs, ys = transform(src, dst, xy[:, 0].tolist(), xy[:, 1].tolist())
        return np.column_stack([xs, ys])

    return shapely.transform(geoms, move)  # type: ignore[no-any-return]
