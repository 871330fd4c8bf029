"""Shard writer end to end on tiny rasters made by code (runs on a clean clone, no ../shared needed).

Bands at 10 and 20 m, nodata, a label raster that covers part of the scene, a band in a second CRS,
two dates, a JP2, a hyperspectral cube, and a user sensor with a quality band; through the Python API
(``gfm.shards.build``) and through the ``gfm shards`` command line, with exact expected outcomes.
"""

import filecmp
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from gfm import index as index_file
from gfm.schema import decode
from gfm.shards import (
    BuildOptions,
    DatasetError,
    DateSpec,
    FileSpec,
    InputError,
    OptionError,
    SceneSpec,
    build,
    dates_from_names,
    info,
    iter_samples,
    verify,
)
from shards.cli import _flag
from shards.cli import main as shards_main
from tests.helpers_rasters import (
    B06_VALUE,
    CRS_UTM,
    DATES,
    GRID,
    LABEL_COLS,
    NODATA_BLOCK,
    RES,
    SIZE,
    X0,
    Y0,
    jp2_available,
    make_scene,
    write_raster,
)

TILE = 16
FIRST = ["B02", "B03", "B04", "B05", "B8A", "B06"]  # file (= observation) order of the first date


def run(*argv: object) -> int:
    args = [str(a) for a in argv]
    return shards_main(args + (["--no-progress"] if args[0] == "build" else []))


def tiles(root: Path) -> dict:
    idx = index_file.read(root)
    return {t.key: t for e in idx.shards for t in map(decode, iter_samples(root / e.name))}


def window_of(tile) -> tuple[int, int]:
    row, col, _, _ = tile.meta["source"]["window"]
    return row, col


def same_tree(a: Path, b: Path) -> None:
    """Every file of two output directories is byte-identical."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def valid_of(tile) -> np.ndarray:
    """The tile's ``[C, H, W]`` valid mask (all ones when the sample stores none)."""
    c, h, w = tile.pixels.shape
    if tile.valid is None:
        return np.ones((c, h, w), bool)
    return np.broadcast_to(tile.valid.astype(bool), (c, h, w))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("scene"), second_date=True)


def first_date_spec(scene, **kw) -> SceneSpec:
    files = [FileSpec(str(p)) for p in scene.files[DATES[0]]]
    return SceneSpec("synth", [DateSpec(DATES[0], files)], label=str(scene.label), **kw)


@pytest.fixture(scope="module")
def built(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    notices: list[str] = []
    opts = BuildOptions(out=str(out), tile=TILE, resampling="nearest", progress=False)
    report = build([first_date_spec(scene)], opts, log=notices.append)
    return out, report, notices


def test_api_build_pixels_grid_labels_and_validity(scene, built):
    out, report, notices = built
    got = tiles(out)
    assert len(got) == (SIZE // TILE) ** 2 == report.samples and report.written == 1
    assert report.planned_shards == 1 and report.dropped_low_valid == 0 and report.part == (0, 1)
    label_full = np.full((SIZE, SIZE), -1, np.int16)
    label_full[:, :LABEL_COLS] = scene.label_array
    for t in got.values():
        row, col = window_of(t)
        win = (slice(row, row + TILE), slice(col, col + TILE))
        assert [b["name"] for b in t.meta["bands"]] == FIRST
        assert {b["sensor"] for b in t.meta["bands"]} == {"sentinel2_l1c"}  # told by the file names
        assert {b["time"] for b in t.meta["bands"]} == {DATES[0]}
        assert t.pixels.dtype == np.uint16 and t.pixels.shape == (6, TILE, TILE)
        for i, name in enumerate(FIRST):  # 10 m exact, 20 m replicated (nearest), B06 reprojected
            np.testing.assert_array_equal(t.pixels[i], scene.on_grid(DATES[0], name)[win], err_msg=f"{t.key} {name}")
        expect_valid = np.ones((6, TILE, TILE), bool)
        expect_valid[0] = scene.arrays[(DATES[0], "B02")][win] != 0  # B02's nodata
        np.testing.assert_array_equal(valid_of(t), expect_valid)
        assert (t.valid is None) == bool(expect_valid.all())
        np.testing.assert_array_equal(t.label, label_full[win])
        assert t.label.dtype == np.int16 and t.meta["label_ignore"] == -1
        assert t.meta["crs"] == CRS_UTM and t.meta["gsd_m"] == pytest.approx(RES)
        assert t.meta["transform"] == [RES, 0.0, X0 + col * RES, 0.0, -RES, Y0 - row * RES]
        assert t.meta["bounds"] == [X0 + col * RES, Y0 - (row + TILE) * RES, X0 + (col + TILE) * RES, Y0 - row * RES]
        lon, lat = t.meta["lonlat"]
        assert 14.9 < lon < 15.1 and 45.1 < lat < 45.2  # UTM 33N, x ~500 km, y ~5000 km
        assert t.meta["nodata"] == [0.0] * 6 and t.meta["scale"] == [1e-4] * 6
        resampling = [f["resampling"] for f in t.meta["source"]["files"]]
        assert resampling == ["none", "none", "none", "nearest", "nearest", "nearest"]
        assert t.key == f"synth_20200101_{row}_{col}"
    warped = sorted(n.split("_")[-1].split(".")[0] for n in notices if "resampled/reprojected" in n)
    assert warped == ["B05", "B06", "B8A"]


def test_api_build_index_statistics_match_numpy(scene, built):
    out, report, _ = built
    idx = index_file.read(out)
    assert report.index == idx
    assert idx.samples == 16 and idx.tile_size == TILE and idx.sensors == ["sentinel2_l1c"]
    assert idx.dates == [DATES[0]] and idx.scenes == {"synth": index_file.SceneCounts(16, 0)}
    assert list(idx.bands) == sorted(f"sentinel2_l1c/{b}" for b in FIRST)
    assert idx.bands["sentinel2_l1c/B8A"] == index_file.BandInfo("B8A", "sentinel2_l1c", 864.7, 21.0, "reflectance")
    for name in FIRST:  # the tiles cover the grid exactly once, so the stats are over the whole band
        band = scene.on_grid(DATES[0], name)
        vals = band[band != 0] if name == "B02" else band.ravel()
        s = idx.stats[f"sentinel2_l1c/{name}"]
        assert s.count == vals.size
        assert s.mean == pytest.approx(vals.mean(), rel=1e-12) and s.std == pytest.approx(vals.std(), rel=1e-9)
        assert (s.min, s.max) == (vals.min(), vals.max())
        assert s.p01 == np.percentile(vals, 1, method="lower") and s.p99 == np.percentile(vals, 99, method="lower")
    assert idx.stats["sentinel2_l1c/B06"].std == 0.0 and idx.stats["sentinel2_l1c/B06"].mean == B06_VALUE
    assert verify(out).ok
    summary = info(out)
    assert [r.key for r in summary.bands] == [f"sentinel2_l1c/{b}" for b in ("B02", "B03", "B04", "B05", "B06", "B8A")]
    assert "sentinel2_l1c/B06" in summary.text() and "samples  16" in summary.text()


def test_min_valid_drops_and_counts_tiles(scene, tmp_path):
    # tile (0, 0): B02 is nodata on 16 x 12 of its 256 pixels, so 1 - 192 / (6 * 256) = 0.875 of it is valid
    report = build([first_date_spec(scene)], BuildOptions(out=str(tmp_path), tile=TILE, min_valid=0.9,
                                                          resampling="nearest", progress=False))
    assert report.samples == 15 and report.dropped_low_valid == 1
    idx = report.index
    assert idx is not None and idx.dropped_low_valid == 1 and idx.scenes["synth"] == index_file.SceneCounts(15, 1)
    assert "synth_20200101_0_0" not in tiles(tmp_path)
    b03 = scene.arrays[(DATES[0], "B03")].copy().astype(float)
    b03[:TILE, :TILE] = np.nan  # the dropped tile's pixels count in no statistic
    vals = b03[~np.isnan(b03)]
    s = idx.stats["sentinel2_l1c/B03"]
    assert s.count == vals.size == SIZE * SIZE - TILE * TILE and s.mean == pytest.approx(vals.mean(), rel=1e-12)


def test_target_gsd_keeps_the_20m_grid(scene, tmp_path):
    spec = first_date_spec(scene, gsd=20.0)
    report = build([spec], BuildOptions(out=str(tmp_path), tile=8, progress=False))
    got = tiles(tmp_path)
    assert report.samples == len(got) == (SIZE // 2 // 8) ** 2
    for t in got.values():
        row, col = window_of(t)
        assert t.meta["gsd_m"] == pytest.approx(20.0) and t.pixels.shape == (6, 8, 8)
        for name in ("B05", "B8A"):  # native on the 20 m grid: exact pixels, not resampled
            i = FIRST.index(name)
            np.testing.assert_array_equal(t.pixels[i], scene.arrays[(DATES[0], name)][row : row + 8, col : col + 8])
        files = {Path(f["file"]).name.split("_")[-1]: f["resampling"] for f in t.meta["source"]["files"]}
        assert files["B05.tif"] == "none" and files["B02.tif"] == "bilinear"


def test_two_dates_from_file_names_cli_equals_api(scene, tmp_path, capsys):
    files = [*scene.files[DATES[1]], *scene.files[DATES[0]][:3]]  # second date first: order by date anyway
    capsys.readouterr()
    assert run("build", *files, "--out", tmp_path / "cli", "--tile", TILE) == 0
    captured = capsys.readouterr()
    assert "2 dates in the file names (2020-01-01 .. 2020-01-11): one time series" in captured.err
    assert captured.out.startswith("part 0/1: 1 shards written, 0 already complete, 16 samples, 0 tiles dropped")
    assert captured.out.rstrip().endswith(f"wrote {tmp_path / 'cli' / 'index.json'}")
    # the same scene through the Python API gives byte-identical shards, sidecars, plan and index
    scene_id = Path(files[0]).stem
    by_date = {d: [FileSpec(str(p)) for p in files if d.replace("-", "") in p.name] for d in DATES}
    spec = SceneSpec(scene_id, [DateSpec(d, by_date[d]) for d in DATES])
    build([spec], BuildOptions(out=str(tmp_path / "api"), tile=TILE, progress=False))
    same_tree(tmp_path / "cli", tmp_path / "api")
    got = tiles(tmp_path / "cli")
    t = got[sorted(got)[0]]
    assert [b["time"] for b in t.meta["bands"]] == [DATES[0]] * 3 + [DATES[1]] * 3
    assert [b["name"] for b in t.meta["bands"]] == ["B02", "B03", "B04"] * 2
    assert all(k.split("_")[1] == "20200101" for k in got)  # keys carry the first date
    row, col = window_of(t)
    for i, (d, name) in enumerate([(d, b) for d in DATES for b in ("B02", "B03", "B04")]):
        np.testing.assert_array_equal(t.pixels[i], scene.arrays[(d, name)][row : row + TILE, col : col + TILE])
    # nodata of date 1's B02 invalidates only that observation: valid.npy is per observation
    t00 = got[[k for k in got if k.endswith("_0_0")][0]]
    v = valid_of(t00)
    assert t00.valid is not None and t00.valid.ndim == 3
    assert (~v[0]).sum() == 16 * 12 and v[1:].all()
    assert index_file.read(tmp_path / "cli").dates == list(DATES)


@pytest.mark.skipif(not jp2_available(), reason="this GDAL has no JP2OpenJPEG driver, so no JP2 can be written")
def test_jp2_band(tmp_path):
    scene = make_scene(tmp_path / "scene", seed=3, jp2=True)
    jp2 = [p for p in scene.files[DATES[0]] if p.suffix == ".jp2"]
    assert [p.name for p in jp2] == ["T33UUU_20200101T101010_B03.jp2"]
    assert run("build", *scene.files[DATES[0]][:3], "--out", tmp_path / "o", "--tile", TILE) == 0
    for t in tiles(tmp_path / "o").values():
        row, col = window_of(t)
        assert t.meta["source"]["files"][1]["file"].endswith(".jp2")
        np.testing.assert_array_equal(t.pixels[1], scene.arrays[(DATES[0], "B03")][row : row + TILE, col : col + TILE])


def test_user_sensor_quality_band_and_file_patterns(tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / "s.yaml").write_text(
        "sensors:\n"
        "  uav_cam:\n"
        "    description: two-band drone camera with a cloud layer\n"
        "    file_patterns: ['_(?P<band>blue|nir)$']\n"
        "    bands:\n"
        "      - {name: blue, center: 475, fwhm: 32, gsd_m: 0.5}\n"
        "      - {name: nir, center: 842, fwhm: 57, gsd_m: 0.5}\n"
        "    quality_band: {name: CLOUD, gsd_m: 0.5}\n"
        "    invalid_quality: {CLOUD: {values: [2], bits: [7]}}\n"
    )
    grid = GRID @ Affine.scale(0.05)  # 0.5 m pixels
    arrays = {b: rng.integers(1, 1000, size=(32, 32), dtype=np.uint16) for b in ("blue", "nir")}
    cloud = rng.choice(np.array([0, 1, 2, 128, 129], np.uint8), size=(32, 32))
    files = [write_raster(tmp_path / f"flight7_{b}.tif", a, grid, CRS_UTM) for b, a in arrays.items()]
    files.append(write_raster(tmp_path / "flight7_CLOUD.tif", cloud, grid, CRS_UTM))
    rc = run("build", *files, "--sensors-yaml", tmp_path / "s.yaml", "--sensor", "uav_cam", "--date", "2021-05-05",
             "--tile", TILE, "--min-valid", "0", "--out", tmp_path / "o")
    assert rc == 0
    ok = ~((cloud == 2) | (cloud & 128 > 0))
    got = tiles(tmp_path / "o")
    assert len(got) == 4
    for t in got.values():
        row, col = window_of(t)
        win = (slice(row, row + TILE), slice(col, col + TILE))
        assert [b["name"] for b in t.meta["bands"]] == ["blue", "nir"]  # told by the file patterns
        assert t.pixels.shape[0] == 2  # the cloud layer decides validity, it is not an observation
        assert t.valid is not None and t.valid.shape == (TILE, TILE)  # one mask shared by both bands
        np.testing.assert_array_equal(t.valid.astype(bool), ok[win])
    idx = index_file.read(tmp_path / "o")
    for b, a in arrays.items():
        assert idx.stats[f"uav_cam/{b}"].count == ok.sum()
        assert idx.stats[f"uav_cam/{b}"].mean == pytest.approx(a[ok].mean(), rel=1e-12)


def test_hyperspectral_cube_with_nan_and_labels(tmp_path):
    rng = np.random.default_rng(11)
    cube = rng.normal(0.3, 0.1, size=(24, 24, 4)).astype(np.float32)
    cube[:6, :6, 2] = np.nan
    labels = rng.integers(0, 9, size=(24, 24)).astype(np.int32)
    np.save(tmp_path / "cube.npy", cube)
    np.save(tmp_path / "gt.npy", labels)
    (tmp_path / "wl.txt").write_text("450 550 650 850\n")
    assert run("build", tmp_path / "cube.npy", "--wavelengths", tmp_path / "wl.txt", "--label", tmp_path / "gt.npy",
               "--gsd", "5", "--tile", "12", "--out", tmp_path / "o") == 0
    got = tiles(tmp_path / "o")
    assert len(got) == 4
    for t in got.values():
        row, col = window_of(t)
        ref = np.moveaxis(cube[row : row + 12, col : col + 12], -1, 0)
        np.testing.assert_array_equal(t.pixels, ref)  # NaN compare equal here
        np.testing.assert_array_equal(valid_of(t), ~np.isnan(ref))
        np.testing.assert_array_equal(t.label, labels[row : row + 12, col : col + 12])
        assert t.meta["crs"] is None and t.meta["lonlat"] is None and t.meta["gsd_m"] == 5.0
        assert [(b["name"], b["center_nm"]) for b in t.meta["bands"]] == [
            ("B001", 450.0), ("B002", 550.0), ("B003", 650.0), ("B004", 850.0)]
    s = index_file.read(tmp_path / "o").stats["hyperspectral/B003"]
    finite = cube[..., 2][~np.isnan(cube[..., 2])]
    assert s.count == finite.size and s.mean == pytest.approx(float(finite.astype(np.float64).mean()), rel=1e-6)


def test_parts_workers_resume_and_verify(scene, tmp_path, capsys):
    files = scene.files[DATES[0]][:5]
    common = ["--tile", TILE, "--shard-size", "20KB", "--date", DATES[0]]  # 2 tiles per shard: 8 shards
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("build", *files, "--out", a, *common) == 0
    ia = index_file.read(a)
    assert len(ia.shards) == 8 and [s.samples for s in ia.shards] == [2] * 8
    assert run("build", *files, "--out", b, *common, "--part", "0/2", "--workers", "2") == 0
    assert not (b / "index.json").exists()
    assert run("build", *files, "--out", b, *common, "--part", "1/2") == 0
    assert run("index", b) == 0
    same_tree(a, b)  # two parts on "two machines" + index == one build, byte for byte
    victim = ia.shards[3].name
    (a / victim).unlink()
    (a / victim.replace(".tar", ".stats.json")).unlink()
    mtimes = {s.name: (a / s.name).stat().st_mtime_ns for s in ia.shards if s.name != victim}
    capsys.readouterr()
    assert run("build", *files, "--out", a, *common) == 0
    assert "resuming: 7 of 8 shards already complete" in capsys.readouterr().err
    same_tree(a, b)
    assert all((a / n).stat().st_mtime_ns == m for n, m in mtimes.items())
    # verify: a flipped byte in pixel data (still decodes), a truncated shard, a stray tar
    assert verify(a).ok and run("verify", a) == 0
    first, second = a / ia.shards[0].name, a / ia.shards[1].name
    raw = bytearray(first.read_bytes())
    with tarfile.open(first) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith("pixels.npy"))
    raw[m.offset_data + 200] ^= 0xFF
    first.write_bytes(bytes(raw))
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])
    (a / "extra.tar").write_bytes(b"")
    report = verify(a)
    kinds = sorted((p.shard, p.kind) for p in report.problems)
    assert kinds == [("extra.tar", "stray"), (first.name, "checksum"), (second.name, "checksum"),
                     (second.name, "count"), (second.name, "unreadable")]
    assert report.samples == 15 and report.shards == 8 and not report.ok
    capsys.readouterr()
    assert run("verify", a) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT {second.name}: unreadable tar after 1 samples" in err
    assert f"CORRUPT {first.name}: checksum differs from index.json" in err


def test_api_errors_name_the_value_and_cli_names_the_flag(scene, tmp_path, capsys):
    with pytest.raises(OptionError) as e:
        BuildOptions(out=str(tmp_path), tile=0)
    assert str(e.value) == "BuildOptions.tile=0: expected a positive number of pixels"
    assert e.value.render(_flag) == "--tile 0: expected a positive number of pixels"
    with pytest.raises(OptionError, match=r"no tile fits in scene\(s\) synth \(64x64\) at BuildOptions.tile=100"):
        build([first_date_spec(scene)], BuildOptions(out=str(tmp_path / "big"), tile=100, progress=False))
    assert not (tmp_path / "big").exists()  # input and option errors come before anything is written
    missing = SceneSpec("m", [DateSpec(None, [FileSpec(str(tmp_path / "nope_B04.tif"), "sentinel2_l1c")])])
    with pytest.raises(InputError, match=r"nope_B04.tif: file not found"):
        build([missing], BuildOptions(out=str(tmp_path / "m"), progress=False))
    two = write_raster(tmp_path / "two.tif", np.ones((2, 8, 8), np.uint16), GRID, CRS_UTM)
    with pytest.raises(InputError) as e:
        build([SceneSpec("two", [DateSpec(None, [FileSpec(str(two), "landsat8")])])],
              BuildOptions(out=str(tmp_path / "t"), tile=8, progress=False))
    assert str(e.value).endswith("name them in file order (e.g. FileSpec.bands=['B1', 'B2'])")
    assert e.value.render(_flag).endswith("name them in file order (e.g. --bands B1,B2)")
    # a directory that holds another build is refused
    out = tmp_path / "same"
    build([first_date_spec(scene)], BuildOptions(out=str(out), tile=TILE, progress=False))
    with pytest.raises(DatasetError, match="holds shards of a different build"):
        build([first_date_spec(scene)], BuildOptions(out=str(out), tile=8, progress=False))
    # errors keep their options across process boundaries (worker -> parent)
    err = pickle.loads(pickle.dumps(OptionError("at {tile}", tile=100)))
    assert isinstance(err, OptionError) and err.render(_flag) == "at --tile 100"
    assert str(err) == "at BuildOptions.tile=100"
    # the command line: the same errors as one line, flags instead of fields, exit code 2
    capsys.readouterr()
    assert run("build", *scene.files[DATES[0]], "--out", tmp_path / "c", "--tile", "100") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the notices of the opened files
    assert last == ("gfm shards build: error: no tile fits in scene(s) T33UUU_20200101T101010_B02 (64x64) at "
                    "--tile 100; --edge pad writes partial tiles")
    assert run("build", two, "--sensor", "landsat8", "--out", tmp_path / "c2", "--tile", "8") == 2
    assert capsys.readouterr().err.strip().endswith("name them in file order (e.g. --bands B1,B2)")


def test_info_and_verify_on_missing_or_bad_index(tmp_path, capsys):
    capsys.readouterr()
    assert run("info", tmp_path) == 2
    assert capsys.readouterr().err.strip() == (
        f"gfm shards info: error: {tmp_path / 'index.json'}: no index.json "
        f"(run 'gfm shards build' or 'gfm shards index {tmp_path}')")
    (tmp_path / "index.json").write_text(json.dumps({"schema": 1, "shards": [{"name": "a.tar", "samples": "x"}]}))
    assert run("verify", tmp_path) == 2
    assert capsys.readouterr().err.strip() == (
        f"gfm shards verify: error: {tmp_path / 'index.json'}: shards[0].samples: expected a non-negative integer, "
        "got 'x'")


def test_label_raster_must_hold_integers(scene, tmp_path):
    values = np.zeros((SIZE, SIZE), np.float32)
    values[5, 7] = 2.5
    bad = write_raster(tmp_path / "float_labels.tif", values, GRID, CRS_UTM)
    spec = SceneSpec("s", [DateSpec(DATES[0], [FileSpec(str(scene.files[DATES[0]][0]))])], label=str(bad))
    with pytest.raises(InputError, match=r"float_labels.tif: label values must be integer classes; found 2.5"):
        build([spec], BuildOptions(out=str(tmp_path / "o"), tile=TILE, progress=False))
    with rasterio.open(scene.files[DATES[0]][0]) as ds:  # the fixture itself is what the docstring says
        assert ds.crs.to_string() == CRS_UTM and ds.res == (RES, RES) and ds.nodata == 0
        assert (ds.read(1)[NODATA_BLOCK] == 0).all()


def test_dates_from_product_names(scene):
    files = [FileSpec(str(p)) for p in [*scene.files[DATES[1]], *scene.files[DATES[0]][:2]]]
    dates = dates_from_names(files)
    assert [d.date for d in dates] == list(DATES)  # date order, whatever the file order
    assert [Path(f.path).name[:15] for f in dates[0].files] == ["T33UUU_20200101"] * 2
    assert [d.date for d in dates_from_names(files, "2019-01-01")] == ["2019-01-01"]
    with pytest.raises(InputError) as e:
        dates_from_names([*files, FileSpec("plain_B02.tif")])
    assert str(e.value) == ("plain_B02.tif: no date in its name while other files have several; give DateSpec.date "
                            "or a manifest")
