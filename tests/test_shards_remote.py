"""Remote rasters and STAC items, offline: ``gfm shards build`` over URLs served by a local HTTP server.

The server (:mod:`tests.helpers_remote`) honours ``Range:`` requests and counts the bytes it sends; it
serves three Sentinel-2-named single-band COGs (512 x 512 uint16, 64 px blocks, made here) and a static
STAC ItemCollection pointing at them. Builds run as ``gfm shards`` processes (a fresh GDAL cache each,
as a user's would be). Checked:

* URLs, ``/vsicurl/`` paths and ``--stac`` items give the same tiles (pixels, validity, band
  descriptions, dates) as the local files;
* a build of one tile of 64 fetches a small fraction of the files' bytes (only the headers and
  the blocks under that tile); a whole build fetches each byte about once;
* a server that dies mid-build gives one error line naming the URL, no traceback; a rerun once it is
  back resumes (finished shards kept) and ends with the uninterrupted build's tiles;
* ``user:pass@`` and ``?token=`` never reach ``build.json``, ``index.json``, tiles, stdout or stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from gfm.schema import decode
from gfm.shards import InputError, load_stac
from gfm.shards.remote import gdal_path, is_remote, name_of, redact
from gfm.shards.verify import iter_samples
from tests.helpers_remote import RangeServer

GFM = str(Path(sys.executable).parent / "gfm")
SIDE, BLOCK, TILE = 512, 64, 64
N_TILES = (SIDE // TILE) ** 2  # one shard each (--shard-size 1KB)
BANDS = ("B02", "B03", "B04")
NAMES = [f"T33UUU_20200101T101010_{b}.tif" for b in BANDS]  # Sentinel-2 L1C tile names: sensor, band, date
CENTRES_UM = {"B02": 0.4924, "B03": 0.5598, "B04": 0.6646}
# fast failure when the test server is down (the defaults retry for seconds)
FAST_FAIL = {"GDAL_HTTP_MAX_RETRY": "1", "GDAL_HTTP_RETRY_DELAY": "0.1", "GDAL_HTTP_TIMEOUT": "10"}


@pytest.fixture(scope="module")
def cogs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three COGs (one band each, random 1..4999, a 0 = nodata block top-left in B02)."""
    root = tmp_path_factory.mktemp("cogs")
    rng = np.random.default_rng(0)
    for band, name in zip(BANDS, NAMES):
        a = rng.integers(1, 5000, size=(SIDE, SIDE), dtype=np.uint16)
        if band == "B02":
            a[:40, :40] = 0
        with rasterio.open(root / name, "w", driver="COG", width=SIDE, height=SIDE, count=1, dtype="uint16",
                           crs="EPSG:32633", transform=Affine(10, 0, 500_000, 0, -10, 5_000_640), nodata=0,
                           blocksize=BLOCK, compress="deflate") as ds:
            ds.write(a, 1)
    return root


def total_bytes(root: Path) -> int:
    return sum((root / n).stat().st_size for n in NAMES)


def gfm_shards(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GFM, "shards", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **FAST_FAIL, **(env or {})})


def build(inputs: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return gfm_shards("build", *inputs, "--out", str(out), "--tile", str(TILE), "--no-progress", *extra)


def tiles(out: Path) -> list[tuple[str, np.ndarray, np.ndarray | None, Any]]:
    """Every tile of a dataset: (``<t0>_<row>_<col>`` of its key, pixels, valid, band descriptions), in key order."""
    found = []
    for tar in sorted(out.glob("*.tar")):
        for sample in iter_samples(tar):
            t = decode(sample)
            found.append(("_".join(t.key.rsplit("_", 3)[1:]), t.pixels, t.valid, t.meta["bands"]))
    return sorted(found, key=lambda t: t[0])


def assert_same_tiles(a: Path, b: Path) -> None:
    ta, tb = tiles(a), tiles(b)
    assert len(ta) == len(tb) > 0
    for (ka, pa, va, ba), (kb, pb, vb, bb) in zip(ta, tb):
        assert ka == kb and ba == bb
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(va, vb)


@pytest.fixture(scope="module")
def local(cogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same files built from the local disk."""
    out = tmp_path_factory.mktemp("local") / "ds"
    r = build([str(cogs / n) for n in NAMES], out, "--shard-size", "1KB")
    assert r.returncode == 0, r.stderr
    return out


def test_paths_and_redaction() -> None:
    assert gdal_path("s3://bucket/k/x.tif") == "/vsis3/bucket/k/x.tif"
    assert gdal_path("gs://bucket/x.tif") == "/vsigs/bucket/x.tif"
    assert gdal_path("https://h/x.tif?a=1") == "/vsicurl/https://h/x.tif?a=1"
    assert gdal_path("/vsicurl/https://h/x.tif") == "/vsicurl/https://h/x.tif"
    assert gdal_path("/data/x.tif") == "/data/x.tif" and not is_remote("/data/x.tif") and not is_remote("x.tif")
    assert all(is_remote(p) for p in ("HTTPS://h/x", "s3://b/k", "gs://b/k", "/vsis3/b/k", "/vsizip/a.zip/b"))
    assert name_of("https://h/a/T33UUU_B02.tif?sig=x/y") == "T33UUU_B02.tif"
    assert name_of("/vsicurl/https://h/a/B02.tif?x=1") == "B02.tif" and name_of("/vsis3/b/k/B03.tif") == "B03.tif"
    text = ("https://me:pa55@h/x.tif?X-Amz-Signature=abc&X-Amz-Credential=AK%2F1&x=1 "
            "s3://b/k.tif?sig=zz&sv=2020 and /vsicurl/https://u:p@h/y.tif?token=t0k")
    clean = redact(text)
    for secret in ("pa55", "abc", "AK%2F1", "zz", "t0k", "u:p@"):
        assert secret not in clean
    assert "x=1" in clean and "https://***@h/x.tif" in clean


def test_urls_build_the_same_tiles_as_local_files(cogs: Path, local: Path, tmp_path: Path) -> None:
    with RangeServer(cogs) as server:
        r = build([server.url(n) for n in NAMES], tmp_path / "url", "--shard-size", "1KB")
        assert r.returncode == 0, r.stderr
        whole = server.bytes_sent
        r = build(["/vsicurl/" + server.url(n) for n in NAMES], tmp_path / "vsi", "--shard-size", "1KB")
        assert r.returncode == 0, r.stderr
    assert_same_tiles(local, tmp_path / "url")
    assert_same_tiles(local, tmp_path / "vsi")
    # a whole build fetches each byte about once (GDAL's range cache), not once per tile
    assert whole < 1.5 * total_bytes(cogs), (whole, total_bytes(cogs))
    meta = json.loads(next(iter(iter_samples(next((tmp_path / "url").glob("*.tar")))))["meta.json"])
    assert meta["source"]["files"][0]["file"].startswith("http://127.0.0.1:")  # the URL is recorded


def test_one_tile_fetches_a_small_fraction_of_the_files(cogs: Path, tmp_path: Path) -> None:
    # one tile per shard: part 0 of N_TILES is the top-left tile only
    with RangeServer(cogs) as server:
        r = build([server.url(n) for n in NAMES], tmp_path / "one", "--shard-size", "1KB", "--part", f"0/{N_TILES}")
        assert r.returncode == 0, r.stderr
        sent = server.bytes_sent
    size = total_bytes(cogs)
    print(f"one tile of {N_TILES}: {sent} of {size} bytes fetched ({sent / size:.0%})")
    # headers (GDAL reads 16 KiB at open) + the blocks under one tile; far from the whole files
    assert sent < size / 10, (sent, size)
    assert len(tiles(tmp_path / "one")) == 1


def items(server: RangeServer, cogs: Path, *, platform: str = "sentinel-2a",
          collection: str = "sentinel-2-l1c", centre_b02: float = CENTRES_UM["B02"]) -> dict[str, Any]:
    """A static ItemCollection of one item whose assets are the three COGs (relative hrefs, self link)."""
    assets: dict[str, Any] = {
        b: {"href": n, "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"],
            "eo:bands": [{"name": b, "center_wavelength": centre_b02 if b == "B02" else CENTRES_UM[b],
                          "full_width_half_max": 0.03}],
            "raster:bands": [{"nodata": 0, "scale": 0.0001, "offset": 0}], "gsd": 10}
        for b, n in zip(BANDS, NAMES)
    }
    assets["thumbnail"] = {"href": "thumb.png", "type": "image/png", "roles": ["thumbnail"]}
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": "S2A_33UUU_20200101_0_L1C", "collection": collection,
        "stac_extensions": [], "bbox": [14.99, 45.14, 15.03, 45.17],
        "geometry": {"type": "Polygon", "coordinates": [[[14.99, 45.14], [15.03, 45.14], [15.03, 45.17],
                                                          [14.99, 45.17], [14.99, 45.14]]]},
        "properties": {"datetime": "2020-01-01T10:10:10Z", "platform": platform},
        "links": [{"rel": "self", "href": server.url("items/S2A_33UUU_20200101_0_L1C.json")}],
        "assets": assets,
    }
    # hrefs relative to the self link, one folder up
    for a in assets.values():
        a["href"] = "../" + a["href"]
    return {"type": "FeatureCollection", "features": [item]}


def test_stac_items_build_the_same_tiles(cogs: Path, local: Path, tmp_path: Path) -> None:
    with RangeServer(cogs) as server:
        path = tmp_path / "items.json"
        path.write_text(json.dumps(items(server, cogs)))
        r = gfm_shards("build", "--stac", str(path), "--out", str(tmp_path / "stac"), "--tile", str(TILE),
                       "--shard-size", "1KB", "--no-progress")
        assert r.returncode == 0, r.stderr
        found = load_stac(path)
        assert [f.path for f in found.scenes[0].dates[0].files] == [server.url(n) for n in NAMES]
        assert found.scenes[0].dates[0].date == "2020-01-01" and found.scenes[0].id == "S2A_33UUU_20200101_0_L1C"
        assert all(f.sensor == "sentinel2_l1c" for f in found.scenes[0].dates[0].files)
    assert_same_tiles(local, tmp_path / "stac")
    assert all(t[0].startswith("20200101_") for t in tiles(tmp_path / "stac"))  # the item's date in every key


def test_stac_unregistered_platform_describes_its_own_sensor(cogs: Path, tmp_path: Path) -> None:
    with RangeServer(cogs) as server:
        path = tmp_path / "items.json"
        path.write_text(json.dumps(items(server, cogs, platform="mysat-1", collection="my-sat L2")))
        found = load_stac(path, ["B03", "B04"])
        sensor = found.sensors["stac_my_sat_l2"]
        assert [(b.name, b.center_nm, b.fwhm_nm, b.gsd_m) for b in sensor.bands] == [
            ("B03", pytest.approx(559.8), pytest.approx(30.0), 10.0),
            ("B04", pytest.approx(664.6), pytest.approx(30.0), 10.0)]
        assert sensor.scale == 0.0001 and found.scenes[0].dates[0].files[0].nodata == 0
        r = gfm_shards("build", "--stac", str(path), "--assets", "B03,B04", "--out", str(tmp_path / "own"),
                       "--tile", str(TILE), "--no-progress")
        assert r.returncode == 0, r.stderr
        index = json.loads((tmp_path / "own" / "index.json").read_text())
        assert "stac_my_sat_l2" in json.dumps(index)


def test_stac_bad_items_are_one_line(cogs: Path, tmp_path: Path) -> None:
    with RangeServer(cogs) as server:
        path = tmp_path / "items.json"
        path.write_text(json.dumps(items(server, cogs)))
        r = gfm_shards("build", "--stac", str(path), "--assets", "B02,B08", "--out", str(tmp_path / "x"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "'S2A_33UUU_20200101_0_L1C': no asset 'B08'" in r.stderr
        path.write_text(json.dumps(items(server, cogs, centre_b02=0.560)))
        with pytest.raises(InputError, match=r"centre wavelength 560 nm disagrees with band B02 .* \(492.4 nm\)"):
            load_stac(path)


def test_server_dying_mid_build_is_one_line_and_a_rerun_resumes(cogs: Path, local: Path, tmp_path: Path) -> None:
    with RangeServer(cogs) as server:  # count the ranged requests of a whole build
        assert build([server.url(n) for n in NAMES], tmp_path / "count", "--shard-size", "1KB").returncode == 0
        ranged = sum(1 for q in server.requests if q.startswith("GET") and "bytes=" in q)
    server = RangeServer(cogs, die_after=ranged // 2).__enter__()
    port, urls, out = server.port, [server.url(n) for n in NAMES], tmp_path / "ds"
    try:
        r = build(urls, out, "--shard-size", "1KB")
    finally:
        server.stop()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("gfm shards build: error: http://127.0.0.1:"), r.stderr
    assert "cannot read its pixels over the network" in errors[0] and any(u in errors[0] for u in urls)
    done = len(list(out.glob("*.tar")))
    assert 0 < done < N_TILES
    with RangeServer(cogs, port=port):  # back at the same address
        r = build(urls, out, "--shard-size", "1KB")
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} of {N_TILES} shards already complete" in r.stderr
    assert_same_tiles(local, out)


def test_a_busy_server_is_retried_on_tile_reads(cogs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rasterio.windows import Window

    from gfm.shards.readers import open_raster

    for key in FAST_FAIL:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.1")  # the environment wins over gfm's default (1 s)
    # what is shown: a transient 503 on a tile read is asked again and the pixels come back right (not
    # which setting did it: GDAL re-asks a failed range once even with GDAL_HTTP_MAX_RETRY=0)
    with RangeServer(cogs, busy=frozenset({2})) as server:  # 1: the header at open; 2: the first block read
        with open_raster(server.url(NAMES[1])) as ds:
            a = ds.read(1, window=Window(128, 128, 64, 64))
        statuses = list(server.requests)
    with rasterio.open(cogs / NAMES[1]) as ds:
        np.testing.assert_array_equal(a, ds.read(1, window=Window(128, 128, 64, 64)))
    ranged = [q for q in statuses if "bytes=" in q]
    assert len(ranged) >= 3 and ranged[1] == ranged[2], statuses  # the 503'd range asked again


def test_credentials_never_leave_the_process(cogs: Path, tmp_path: Path) -> None:
    user, secret, token = "alice", "pa55w0rd", "t0ken-s3cret"
    with RangeServer(cogs) as server:
        urls = [server.url(n).replace("http://", f"http://{user}:{secret}@") + f"?token={token}&v=1" for n in NAMES]
        out = tmp_path / "ds"
        ok = build(urls, out, "--shard-size", "1KB")
        missing = build([urls[0].replace(NAMES[0], "nothing.tif")], tmp_path / "bad")
        assert any(token in q for q in server.requests)  # the token was sent to the server
    assert ok.returncode == 0, ok.stderr
    assert missing.returncode == 2 and "nothing.tif" in missing.stderr, missing.stderr
    written = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    assert any(b"127.0.0.1" in w for w in written)  # the URLs are recorded, redacted
    for text in [ok.stdout, ok.stderr, missing.stdout, missing.stderr]:
        assert secret not in text and token not in text
    for data in written:
        assert secret.encode() not in data and token.encode() not in data
