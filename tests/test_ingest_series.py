"""Time series as they come: Landsat pre-collection scene ids, lower-case band suffixes, Fmask, L5 + L7 mixed.

No input file is dropped silently: a band given twice for one date at the same resolution is an error
naming both files and how to date them; a coarser duplicate is skipped with a notice that is true.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from gfm.schema import decode
from gfm.sensors import guess_date, guess_sensor, landsat_id
from gfm.shards import BuildOptions, DateSpec, FileSpec, InputError, SceneSpec, build, iter_samples
from shards.cli import main as shards_main
from tests.helpers_ingest import CRS, GRID, SERIES, SIZE, expected_valid, landsat_series
from tests.helpers_rasters import write_raster

TILE = 20


def run(*argv: object) -> int:
    return shards_main([str(a) for a in argv] + (["--no-progress"] if argv[0] == "build" else []))


def samples(root: Path) -> dict:
    index = json.loads((root / "index.json").read_text())
    return {t.key: t for e in index["shards"] for t in map(decode, iter_samples(root / e["name"]))}


@pytest.mark.parametrize(
    "name, sensor, date",
    [
        ("LE70350322008118EDC00_b3.tif", "landsat7", "2008-04-27"),
        ("LT50350322008110PAC01_B4.TIF", "landsat5", "2008-04-19"),
        ("LT40350321989001XXX02_b1.tif", "landsat5", "1989-01-01"),  # TM on Landsat 4: the TM preset
        ("LC80420342020001LGN00_B4.TIF", "landsat8", "2020-01-01"),
        ("LO90420342022032LGN01_B4.TIF", "landsat9", "2022-02-01"),
        ("LE07_L1TP_035032_20080427_20160926_01_T1_B3.TIF", "landsat7", "2008-04-27"),
        ("LT05_L2SP_035032_20080419_20200829_02_T1_SR_B3.TIF", "landsat5", "2008-04-19"),
        ("LC09_L2SP_042034_20220201_20220203_02_T1_QA_PIXEL.TIF", "landsat9", "2022-02-01"),
    ],
)
def test_landsat_ids_give_sensor_and_date(name: str, sensor: str, date: str) -> None:
    assert landsat_id(name) is not None and landsat_id(name).sensor == sensor  # type: ignore[union-attr]
    assert guess_sensor([name]) == sensor and guess_date(name) == date


def test_landsat_mss_and_non_ids() -> None:
    assert landsat_id("LM50350322008110PAC01_B1.TIF").sensor is None  # type: ignore[union-attr]  # MSS: no preset
    assert guess_sensor(["LM50350322008110PAC01_B1.TIF"]) is None
    assert guess_date("LM50350322008110PAC01_B1.TIF") == "2008-04-19"
    assert landsat_id("LE70350322008400EDC00_b3.tif") is None  # day 400 is no date
    assert landsat_id("random_b3.tif") is None
    assert guess_sensor(["LE70350322008118EDC00_b3.tif", "LT50350322008110PAC01_b3.tif"]) is None  # two sensors


def test_mixed_landsat5_7_series_keeps_dates_sensors_and_fmask(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = landsat_series(tmp_path / "in")
    files = sorted(s.bands + s.fmask)  # 9 files, as a shell glob gives them
    out = tmp_path / "out"
    assert run("build", *files, "--out", out, "--tile", TILE, "--min-valid", "0") == 0
    err = capsys.readouterr().err
    assert "3 dates in the file names (2008-04-19 .. 2008-05-05): one time series" in err
    assert "skipped" not in err and "given twice" not in err
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == (SIZE // TILE) ** 2 == 4
    assert index["dates"] == ["2008-04-19", "2008-04-27", "2008-05-05"]
    assert index["sensors"] == ["landsat5", "landsat7"]
    assert sorted(index["bands"]) == ["landsat5/B3", "landsat5/B4", "landsat7/B3", "landsat7/B4"]
    tiles = samples(out)
    assert len(tiles) == 4
    for t in tiles.values():
        # six observations in date order, each with its own sensor: no file dropped, no fmask as a band
        assert [(b["sensor"], b["name"], b["time"]) for b in t.meta["bands"]] == [
            (sensor, band, date) for _, sensor, date in SERIES for band in ("B3", "B4")
        ]
        row, col, _, _ = t.meta["source"]["window"]
        win = (slice(row, row + TILE), slice(col, col + TILE))
        for i, (sid, _, _) in enumerate(SERIES):
            for j, band in enumerate(("B3", "B4")):
                np.testing.assert_array_equal(t.pixels[2 * i + j], s.arrays[(sid, band)][win])
                valid = np.ones((TILE, TILE), bool) if t.valid is None else \
                    (t.valid if t.valid.ndim == 2 else t.valid[2 * i + j]).astype(bool)
                np.testing.assert_array_equal(valid, expected_valid(i)[win])  # cloud, shadow, fill only
        assert t.meta["crs"] == CRS and t.meta["gsd_m"] == pytest.approx(30.0)


def test_same_band_twice_for_one_date_names_both_files_and_how_to_date_them(tmp_path: Path) -> None:
    a = np.ones((SIZE, SIZE), np.uint16)
    first = write_raster(tmp_path / "site_a_B4.tif", a, GRID, CRS, nodata=0)
    second = write_raster(tmp_path / "site_b_B4.tif", a * 2, GRID, CRS, nodata=0)
    spec = SceneSpec("site", [DateSpec(None, [FileSpec(str(first), "landsat7"), FileSpec(str(second), "landsat7")])])
    with pytest.raises(InputError) as e:
        build([spec], BuildOptions(out=str(tmp_path / "o"), tile=TILE, progress=False))
    msg = str(e.value)
    assert f"{first} and {second} both give band B4 of landsat7 for one undated observation" in msg
    assert "at the same resolution (30 m)" in msg and "DateSpec.date per file" in msg and "manifest" in msg
    assert not (tmp_path / "o").exists()  # nothing written
    # the command line names its flag, and a --date per file makes the two a time series
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    with redirect_stderr(buf):
        assert run("build", first, second, "--sensor", "landsat7", "--out", tmp_path / "c", "--tile", TILE) == 2
    assert "(--date per file, in file order)" in buf.getvalue().splitlines()[-1]
    assert run("build", first, second, "--sensor", "landsat7", "--out", tmp_path / "c", "--tile", TILE,
               "--date", "2008-04-27", "--date", "2008-04-19") == 0
    t = next(iter(samples(tmp_path / "c").values()))
    assert [(b["name"], b["time"]) for b in t.meta["bands"]] == [("B4", "2008-04-19"), ("B4", "2008-04-27")]
    assert t.pixels[0].max() == 2 and t.pixels[1].max() == 1  # second file first: it has the earlier date
    assert run("build", first, second, "--sensor", "landsat7", "--out", tmp_path / "d",
               "--date", "2008-04-27", "--date", "2008-04-19", "--date", "2008-04-20") == 2


def test_coarser_duplicate_notice_is_true_in_metres(tmp_path: Path) -> None:
    """A 30 m band in UTM and the same band at ~0.0027 degrees (~250 m): the degree file is the coarser one."""
    from rasterio.transform import from_bounds
    from rasterio.warp import transform_bounds

    fine = write_raster(tmp_path / "x_B4.tif", np.full((SIZE, SIZE), 5, np.uint16), GRID, CRS, nodata=0)
    left, top = GRID.c, GRID.f
    w, s_, e, n = transform_bounds(CRS, "EPSG:4326", left, top - SIZE * 30, left + SIZE * 30, top)
    coarse = write_raster(tmp_path / "y_B4.tif", np.full((5, 5), 9, np.uint16), from_bounds(w, s_, e, n, 5, 5),
                          "EPSG:4326", nodata=0)
    notices: list[str] = []
    spec = SceneSpec("dup", [DateSpec("2008-04-27", [FileSpec(str(coarse), "landsat7"),
                                                      FileSpec(str(fine), "landsat7")])])
    report = build([spec], BuildOptions(out=str(tmp_path / "o"), tile=TILE, progress=False), log=notices.append)
    dup = [m for m in notices if "given twice" in m]
    assert len(dup) == 1 and f"kept {fine} (30 m)" in dup[0] and f"skipped {coarse} (coarser: " in dup[0]
    assert report.index is not None and list(report.index.bands) == ["landsat7/B4"]
    assert report.index.stats["landsat7/B4"].mean == 5  # the 30 m file's values
