"""Labels as they come: float rasters holding integer classes, and vector files rasterised onto the grid."""

import json
from pathlib import Path

import numpy as np
import pytest

from gfm.schema import decode
from gfm.shards import BuildOptions, DateSpec, FileSpec, InputError, SceneSpec, build, iter_samples, load_manifest
from shards.cli import main as shards_main
from tests.helpers_ingest import CRS, GRID, SIZE, X0, Y0
from tests.helpers_rasters import write_raster

TILE = 20
RES = 30.0


def band(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(1).integers(1, 5000, size=(SIZE, SIZE), dtype=np.uint16)
    return write_raster(tmp_path / "LE70350322008118EDC00_b3.tif", a, GRID, CRS, nodata=0)


def labels_on_grid(out: Path) -> np.ndarray:
    """The scene's label mosaic from the written tiles (-2 where no tile is)."""
    mosaic = np.full((SIZE, SIZE), -2, np.int64)
    index = json.loads((out / "index.json").read_text())
    for e in index["shards"]:
        for t in map(decode, iter_samples(out / e["name"])):
            r, c, h, w = t.meta["source"]["window"]
            mosaic[r : r + h, c : c + w] = t.label
    return mosaic


def build_with_label(tmp_path: Path, label: Path, **spec_kw) -> Path:
    out = tmp_path / "out"
    spec = SceneSpec("s", [DateSpec(None, [FileSpec(str(band(tmp_path)))])], label=str(label), **spec_kw)
    build([spec], BuildOptions(out=str(out), tile=TILE, min_valid=0.0, progress=False))
    return out


def test_float_label_raster_with_integer_classes_and_nodata(tmp_path: Path) -> None:
    values = np.full((SIZE, SIZE), -99999.0, np.float32)  # sparse labelled pixels, as exported by GIS tools
    rng = np.random.default_rng(2)
    rows, cols = rng.integers(0, SIZE, 60), rng.integers(0, SIZE, 60)
    values[rows, cols] = rng.choice([0.0, 3.0, 7.0], 60)
    values[0, 0] = np.nan
    label = write_raster(tmp_path / "labels.tif", values, GRID, CRS, nodata=-99999.0)
    got = labels_on_grid(build_with_label(tmp_path, label))
    expected = np.where(values == -99999.0, -1, np.nan_to_num(values, nan=-1)).astype(np.int64)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) <= {-1, 0, 3, 7}


def test_non_integral_float_labels_name_a_value(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    values = np.zeros((SIZE, SIZE), np.float32)
    values[7, 9] = 0.25
    label = write_raster(tmp_path / "prob.tif", values, GRID, CRS)
    with pytest.raises(InputError, match=r"prob.tif: label values must be integer classes; found 0.25"):
        build_with_label(tmp_path, label)
    capsys.readouterr()
    assert shards_main(["build", str(band(tmp_path)), "--label", str(label), "--out", str(tmp_path / "c"),
                        "--tile", str(TILE), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"gfm shards build: error: {label}: label values must be integer classes; found 0.25")
    arr = np.zeros((SIZE, SIZE), np.float64)
    arr[3, 3] = np.nan  # a float .npy label: NaN is unlabelled
    arr[4, 4] = 5
    np.save(tmp_path / "lab.npy", arr)
    got = labels_on_grid(build_with_label(tmp_path / "npy", tmp_path / "lab.npy"))
    assert got[3, 3] == -1 and got[4, 4] == 5 and (got == 0).sum() == SIZE * SIZE - 2


def px_box(r0: int, r1: int, c0: int, c1: int):
    """A polygon covering pixel rows r0..r1-1 and cols c0..c1-1 of the grid, in the grid's CRS."""
    from shapely.geometry import box

    return box(X0 + c0 * RES, Y0 - r1 * RES, X0 + c1 * RES, Y0 - r0 * RES)


def px_centre_lonlat(r: int, c: int) -> tuple[float, float]:
    from rasterio.warp import transform

    xs, ys = transform(CRS, "EPSG:4326", [X0 + (c + 0.5) * RES], [Y0 - (r + 0.5) * RES])
    return xs[0], ys[0]


def test_vector_labels_polygons_and_points_rasterised_with_class_names(tmp_path: Path) -> None:
    gpd = pytest.importorskip("geopandas")
    from shapely.geometry import Point

    polygons = gpd.GeoDataFrame({"crop": ["forest", "water", "wheat"]},
                                geometry=[px_box(2, 10, 3, 13), px_box(20, 30, 20, 35), px_box(5, 8, 10, 16)],
                                crs=CRS)
    polygons.to_file(tmp_path / "fields.gpkg", engine="pyogrio")
    points = gpd.GeoDataFrame({"crop": ["wheat", "barley"]},  # in lon/lat: reprojected onto the UTM grid
                              geometry=[Point(px_centre_lonlat(30, 5)), Point(px_centre_lonlat(35, 38))],
                              crs="EPSG:4326")
    points.to_file(tmp_path / "samples.geojson", engine="pyogrio")
    s = band(tmp_path)
    specs = [SceneSpec("a", [DateSpec(None, [FileSpec(str(s))])], label=str(tmp_path / "fields.gpkg"),
                       label_field="crop"),
             SceneSpec("b", [DateSpec(None, [FileSpec(str(s))])], label=str(tmp_path / "samples.geojson"),
                       label_field="crop")]
    out = tmp_path / "out"
    notices: list[str] = []
    report = build(specs, BuildOptions(out=str(out), tile=TILE, min_valid=0.0, progress=False), log=notices.append)
    # class names numbered in sorted order over both files, recorded in index.json
    names = {0: "barley", 1: "forest", 2: "water", 3: "wheat"}
    assert report.index is not None and report.index.classes == names
    doc = json.loads((out / "index.json").read_text())
    assert doc["classes"] == {"0": "barley", "1": "forest", "2": "water", "3": "wheat"}
    assert any("label " + str(tmp_path / "samples.geojson") + " reprojected" in m for m in notices)
    expected_a = np.full((SIZE, SIZE), -1)
    expected_a[2:10, 3:13] = 1
    expected_a[20:30, 20:35] = 2
    expected_a[5:8, 10:16] = 3  # later features win
    expected_b = np.full((SIZE, SIZE), -1)
    expected_b[30, 5], expected_b[35, 38] = 3, 0
    mosaics: dict[str, np.ndarray] = {sid: np.full((SIZE, SIZE), -2) for sid in "ab"}
    for e in doc["shards"]:
        for t in map(decode, iter_samples(out / e["name"])):
            r, c, h, w = t.meta["source"]["window"]
            mosaics[t.meta["source"]["scene"]][r : r + h, c : c + w] = t.label
    np.testing.assert_array_equal(mosaics["a"], expected_a)
    np.testing.assert_array_equal(mosaics["b"], expected_b)
    # the fine-tuning code reads the class names from index.json
    from gfm.finetune.data import _metadata_names

    assert _metadata_names(doc, []) == names
    # a manifest says the same with label_field
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"scenes:\n  - id: a\n    files: [{s}]\n    label: fields.gpkg\n    label_field: crop\n")
    assert load_manifest(manifest)[0].label_field == "crop"


def test_vector_label_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gpd = pytest.importorskip("geopandas")

    codes = gpd.GeoDataFrame({"code": [4, 9], "name": ["a", "b"]},
                             geometry=[px_box(0, 5, 0, 5), px_box(10, 15, 10, 15)], crs=CRS)
    codes.to_file(tmp_path / "codes.shp", engine="pyogrio")
    out = build_with_label(tmp_path, tmp_path / "codes.shp", label_field="code")
    got = labels_on_grid(out)
    assert (got[0:5, 0:5] == 4).all() and (got[10:15, 10:15] == 9).all() and (got == -1).sum() == SIZE**2 - 50
    assert "classes" not in json.loads((out / "index.json").read_text())  # integer codes: no names
    with pytest.raises(InputError, match=r"codes.shp: no attribute 'kind' \(SceneSpec.label_field\); its attributes: "
                                         r"code, name"):
        build_with_label(tmp_path / "x", tmp_path / "codes.shp", label_field="kind")
    capsys.readouterr()
    assert shards_main(["build", str(band(tmp_path)), "--label", str(tmp_path / "codes.shp"), "--out",
                        str(tmp_path / "c"), "--tile", str(TILE), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gfm shards build: error: {tmp_path / 'codes.shp'}: give the attribute that holds the class with "
        "--label-field; its attributes: code, name")
    far = gpd.GeoDataFrame({"code": [1]}, geometry=[px_box(1000, 1010, 1000, 1010)], crs=CRS)
    far.to_file(tmp_path / "far.geojson", engine="pyogrio")
    with pytest.raises(InputError, match=r"far.geojson: no feature of attribute 'code' overlaps the scene grid"):
        build_with_label(tmp_path / "y", tmp_path / "far.geojson", label_field="code")
