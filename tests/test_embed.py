"""Tile embeddings to GeoParquet (gfm.infer.embed, gfm embed), read back with pyarrow, geopandas and DuckDB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from rasterio.warp import transform as warp_transform

from gfm import hub
from gfm.infer.embed import EmbedOptions, embed_scene
from tests.test_hub import gfm_cli
from tests.test_hub_helpers import make_run_dir
from tests.test_infer import TRANSFORM, open_l8, write_scene


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embed")
    run = make_run_dir(root / "run")
    hub.export(run, root / "export")
    return root / "export"


def test_shards_to_geoparquet(model_dir: Path, tmp_path: Path) -> None:
    shards = model_dir.parent / "run" / "data"
    out = tmp_path / "tiles.parquet"
    proc = gfm_cli("embed", str(shards), "--model", str(model_dir), "--out", str(out), "--no-progress")
    assert "8 tiles x 192 (mean pooling)" in proc.stdout
    table = pq.read_table(out)
    assert table.num_rows == 8
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 192)
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["crs"]["id"] == {"authority": "OGC", "code": "CRS84"}
    meta = json.loads(table.schema.metadata[b"gfm"])
    assert meta["pooling"] == "mean" and meta["embedding_dim"] == 192 and meta["model"] == "hypermae_less_tiny"
    rows = table.to_pylist()
    assert rows[0]["source_crs"] == "EPSG:32616" and rows[0]["sensor"] == "landsat8"
    assert rows[0]["bands"] == ["landsat8/B2", "landsat8/B3", "landsat8/B4"]
    assert rows[0]["dates"] == ["2015-08-04"] and rows[0]["datetime"].isoformat().startswith("2015-08-04")
    # geopandas: geometry decoded in WGS84 lon/lat; the tile (0..480 m east of x=0 in UTM 16N) lies near the equator
    import geopandas as gpd

    gdf = gpd.read_parquet(out)
    assert gdf.crs.to_string() == "OGC:CRS84" and (gdf.geometry.geom_type == "Polygon").all()
    x0, y0 = warp_transform("EPSG:32616", "EPSG:4326", [240.0], [-240.0])
    centroid = gdf.geometry.iloc[0].centroid
    assert centroid.x == pytest.approx(x0[0], abs=1e-5) and centroid.y == pytest.approx(y0[0], abs=1e-5)
    # DuckDB reads it too (no spatial extension needed for the columns)
    import duckdb

    n, dim = duckdb.connect().execute(f"select count(*), min(len(embedding)) from read_parquet('{out}')").fetchone()
    assert (n, dim) == (8, 192)
    # the embedding is the model's own: prepare + embed on the same tile
    from gfm.infer.embed import iter_tiles

    tile = next(iter_tiles(shards))
    model = hub.from_pretrained(model_dir)
    batch = model.prepare(tile.pixels, tile.meta["bands"], nodata=tile.meta["nodata"], gsd=tile.meta["gsd_m"],
                          lonlat=tile.meta["lonlat"])
    with torch.no_grad():
        want = model.embed(batch)[0].numpy()
    assert np.allclose(np.asarray(rows[0]["embedding"]), want, atol=1e-5)


def test_scene_to_geoparquet_and_dense_cog(model_dir: Path, tmp_path: Path) -> None:
    scene_path = tmp_path / "scene.tif"
    write_scene(scene_path, 40, 56)
    out, dense = tmp_path / "scene.parquet", tmp_path / "dense.tif"
    proc = gfm_cli("embed", str(scene_path), "--model", str(model_dir), "--out", str(out), "--sensor", "landsat8",
                   "--bands", "B2,B3,B4", "--date", "2015-08-04", "--tile", "16", "--dense", str(dense),
                   "--pooling", "cls", "--no-progress")
    assert "wrote" in proc.stdout
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"gfm"])
    assert meta["pooling"] == "cls" and meta["tile"] == 16
    keys = table.column("key").to_pylist()
    # 3 x 4 tiles of 16 px; the top-left tile lies inside the all-nodata block and is skipped
    assert len(keys) == 11 and "scene_0_0" not in keys and "skipped" in proc.stdout
    import geopandas as gpd

    gdf = gpd.read_parquet(out).set_index("key")
    left, top = TRANSFORM.c + 16 * 30.0, TRANSFORM.f - 16 * 30.0  # tile (16, 16)
    bounds = gdf.loc["scene_16_16", "source_bounds"]
    assert list(bounds) == [left, top - 480.0, left + 480.0, top]
    lon, lat = warp_transform("EPSG:32616", "EPSG:4326", [left + 240.0], [top - 240.0])
    c = gdf.loc["scene_16_16"].geometry.centroid
    assert c.x == pytest.approx(lon[0], abs=1e-5) and c.y == pytest.approx(lat[0], abs=1e-5)
    with rasterio.open(dense) as ds:
        assert ds.count == 192 and (ds.width, ds.height) == (14, 10)  # 56/4, 40/4 patches
        assert ds.transform == TRANSFORM @ rasterio.Affine.scale(4) and ds.crs.to_epsg() == 32616
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        band = ds.read(1)
    assert np.isnan(band[:5, :7]).all()  # 20 x 30 px nodata block = 5 x 7 patches (partly) without valid pixels
    assert np.isfinite(band[6:, 8:]).all()


def test_embed_refuses_existing_output_and_leaves_nothing_when_interrupted(model_dir: Path, tmp_path: Path) -> None:
    scene_path = tmp_path / "scene.tif"
    write_scene(scene_path, 40, 40)
    out = tmp_path / "e.parquet"
    out.write_text("keep")
    model = hub.from_pretrained(model_dir)
    scene = open_l8(scene_path)
    with pytest.raises(hub.OutputExistsError):
        embed_scene(model, scene, out, EmbedOptions(tile=16, progress=False))
    assert out.read_text() == "keep"
    out.unlink()

    def interrupt(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_scene(model, scene, out, EmbedOptions(tile=16, batch_size=2, progress=False,
                                                    dense=tmp_path / "d.tif"), on_tiles=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_rows_are_written_in_whole_row_groups(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from gfm.infer.geoparquet import EmbeddingWriter, TileRow

    def row(i: int) -> TileRow:
        left = 500000.0 + 300 * i
        return TileRow(key=f"t{i}", scene="s", crs="EPSG:32616", bounds=[left, 4000000.0, left + 300, 4000300.0],
                       dates=["2015-08-04"], sensors=["landsat8"], bands=["landsat8/B4"], gsd_m=30.0,
                       valid_fraction=1.0, embedding=np.full(4, i, dtype=np.float32))

    out = tmp_path / "rows.parquet"
    with EmbeddingWriter(out, 4, {"pooling": "mean"}, row_group_rows=10) as writer:
        for start in range(0, 25, 3):  # the program writes small batches
            writer.write([row(i) for i in range(start, min(start + 3, 25))])
        writer.commit()
    meta = pq.ParquetFile(out).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [10, 10, 5]
    table = pq.read_table(out)
    assert table.column("key").to_pylist() == [f"t{i}" for i in range(25)]
    assert table.column("embedding").to_pylist()[24] == [24.0] * 4
