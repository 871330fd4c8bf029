"""The scene grid is chosen in metres, stated in a notice, and the file that does not overlap is blamed.

Also ``--edge pad``: the 61 x 61 px scene at tile 32 keeps every pixel.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import Affine, from_bounds
from rasterio.warp import transform_bounds

from gfm.schema import decode
from gfm.shards import BuildOptions, DatasetError, DateSpec, FileSpec, InputError, SceneSpec, build, iter_samples
from shards.cli import main as shards_main
from tests.helpers_ingest import CRS, GRID, SIZE, X0, Y0
from tests.helpers_rasters import write_raster


def utm_b3(tmp_path: Path, name: str = "u_B3.tif", x0: float = X0) -> Path:
    a = np.full((SIZE, SIZE), 100, np.uint16)
    return write_raster(tmp_path / name, a, Affine(30, 0, x0, 0, -30, Y0), CRS, nodata=0)


def lonlat_b4(tmp_path: Path) -> Path:
    """~300 m pixels in EPSG:4326 covering the UTM scene with a margin."""
    w, s, e, n = transform_bounds(CRS, "EPSG:4326", X0 - 600, Y0 - SIZE * 30 - 600, X0 + SIZE * 30 + 600, Y0 + 600)
    width = max(2, round((e - w) / 0.0035))
    height = max(2, round((n - s) / 0.0027))
    return write_raster(tmp_path / "g_B4.tif", np.full((height, width), 200, np.uint16),
                        from_bounds(w, s, e, n, width, height), "EPSG:4326", nodata=0)


def build_one(tmp_path: Path, files: list[Path], **kw) -> tuple[list[str], dict]:
    notices: list[str] = []
    spec = SceneSpec("m", [DateSpec("2008-04-27", [FileSpec(str(f), "landsat7") for f in files])],
                     **{k: v for k, v in kw.items() if k in ("crs", "gsd")})
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    build([spec], BuildOptions(out=str(out), tile=10, min_valid=0.0, progress=False), log=notices.append)
    first = json.loads((out / "index.json").read_text())["shards"][0]["name"]
    meta = decode(next(iter(iter_samples(out / first)))).meta
    return notices, meta


@pytest.mark.parametrize("utm_first", [True, False])
def test_mixed_crs_grid_is_the_finest_in_metres(tmp_path: Path, utm_first: bool) -> None:
    u, g = utm_b3(tmp_path), lonlat_b4(tmp_path)
    notices, meta = build_one(tmp_path, [u, g] if utm_first else [g, u])
    assert meta["crs"] == CRS and meta["gsd_m"] == pytest.approx(30.0)
    assert meta["transform"][:3] == [30.0, 0.0, X0]
    assert f"notice: scene 'm': grid {CRS} at 30 m, 40x40 px (the grid of {u})" in notices
    assert [b["name"] for b in meta["bands"]] == (["B3", "B4"] if utm_first else ["B4", "B3"])  # file order


def test_crs_and_gsd_options_pick_the_grid(tmp_path: Path) -> None:
    u, g = utm_b3(tmp_path), lonlat_b4(tmp_path)
    notices, meta = build_one(tmp_path, [u, g], gsd=60.0)
    assert meta["crs"] == CRS and meta["gsd_m"] == pytest.approx(60.0)
    assert f"notice: scene 'm': grid {CRS} at 60 m, 20x20 px (the extent of {u}, resampled)" in notices
    notices, meta = build_one(tmp_path, [u, g], crs="EPSG:4326")
    assert meta["crs"] == "EPSG:4326" and meta["gsd_m"] == pytest.approx(30.0, rel=0.01)
    assert any(m.startswith("notice: scene 'm': grid EPSG:4326 at 30 m,") and f"(the extent of {u}, resampled)" in m
               for m in notices)
    with pytest.raises(InputError, match=r"scene 'm': SceneSpec.crs 'EPSG:nope' is not a CRS"):
        build_one(tmp_path, [u, g], crs="EPSG:nope")


def test_the_file_that_does_not_overlap_is_blamed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    far = write_raster(tmp_path / "far_B2.tif", np.ones((SIZE, SIZE), np.uint16),  # finest, and first
                       Affine(15, 0, X0 + 90_000, 0, -15, Y0), CRS, nodata=0)
    u, g = utm_b3(tmp_path), lonlat_b4(tmp_path)
    with pytest.raises(InputError) as e:
        build_one(tmp_path, [far, u, g])
    assert str(e.value).startswith(f"{far}: does not overlap the other files of scene 'm' ({u} and 1 more)")
    capsys.readouterr()
    assert shards_main(["build", str(u), str(far), "--sensor", "landsat7", "--out", str(tmp_path / "c"),
                        "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"gfm shards build: error: {far}: does not overlap the other files of scene")


def test_edge_pad_keeps_every_pixel_of_a_61px_scene(tmp_path: Path) -> None:
    a = np.arange(1, 61 * 61 + 1, dtype=np.uint16).reshape(61, 61)
    f = write_raster(tmp_path / "small_B3.tif", a, GRID, CRS, nodata=0)
    spec = SceneSpec("small", [DateSpec("2008-04-27", [FileSpec(str(f), "landsat7")])])
    notices: list[str] = []
    full = build([spec], BuildOptions(out=str(tmp_path / "full"), tile=32, progress=False), log=notices.append)
    assert full.samples == 1
    assert "notice: scene 'small': 72% of its 61x61 pixels lie past the last whole tile and are not written " \
           "(edge 'pad' writes them as partial tiles)" in notices
    out = tmp_path / "pad"
    pad = build([spec], BuildOptions(out=str(out), tile=32, edge="pad", progress=False))
    assert pad.samples == 4 and pad.index is not None
    mosaic = np.zeros((64, 64), np.int64)
    valid = np.zeros((64, 64), bool)
    for e in pad.index.shards:
        for t in map(decode, iter_samples(out / e.name)):
            r, c, h, w = t.meta["source"]["window"]
            assert (h, w) == (32, 32) and t.pixels.shape == (1, 32, 32)
            mosaic[r : r + h, c : c + w] = t.pixels[0]
            valid[r : r + h, c : c + w] = True if t.valid is None else t.valid.reshape(32, 32).astype(bool)
    np.testing.assert_array_equal(mosaic[:61, :61], a)  # every pixel kept, once
    assert valid[:61, :61].all() and not valid[61:, :].any() and not valid[:, 61:].any()
    assert pad.index.stats["landsat7/B3"].count == 61 * 61  # padding never counts as data
    with pytest.raises(DatasetError, match="different build"):  # edge is part of the build
        build([spec], BuildOptions(out=str(out), tile=32, progress=False))
