"""``gfm.predict``: the Python call behind ``gfm predict``, on files and on arrays.

The tiny exported models (a LoRA segmentation fine-tune merged into a ``hypermae_less_tiny`` export) and
the generated Landsat-8-like GeoTIFFs are tests/test_infer.py's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio

import gfm
from export.predict import main as predict_cli
from gfm.hub import HubError
from gfm.infer import array_scene, load_task_model
from gfm.infer.predictors import LoadedTask, TaskInfo
from gfm.infer.scenes import SceneFiles, observation_bands, read_window, scene_spec
from gfm.shards import InputError
from gfm.shards.scene import open_scene
from tests.test_infer import L8, STATS, TRANSFORM, Pointwise, models, write_scene  # noqa: F401  (models: the fixture)

DATE = "2015-08-04"
#: the array's description: the GeoTIFF's bands, date, nodata and georeference
AS_FILE = dict(sensor="landsat8", bands=L8, date=DATE, nodata=0, transform=TRANSFORM, crs="EPSG:32616")


@pytest.fixture(scope="module")
def merged(models: dict[str, Path]) -> LoadedTask:  # noqa: F811
    """The merged fine-tune, loaded once for the tests that only need a model."""
    return load_task_model(models["merged"])


def test_array_equals_the_cli_cog_and_the_out_path(models: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    scene = tmp_path / "LC08_scene.tif"
    data = write_scene(scene, 48, 64)
    cli_out = tmp_path / "cli.tif"
    assert predict_cli([str(scene), "--model", str(models["merged"]), "--out", str(cli_out), "--sensor", "landsat8",
                        "--bands", ",".join(L8), "--date", DATE, "--tile", "32", "--no-progress",
                        "--probabilities", str(tmp_path / "cli_probs.tif")]) == 0
    assert "wrote" in capsys.readouterr().out
    with rasterio.open(cli_out) as ds:
        cog = ds.read(1)
    with rasterio.open(tmp_path / "cli_probs.tif") as ds:
        cog_probs = ds.read()

    pred = gfm.predict(str(models["merged"]), data, probabilities=True, tile=32, progress=False, **AS_FILE)
    assert pred.classes is not None and pred.probabilities is not None and pred.report.out is None
    assert pred.classes.dtype == np.uint8 and pred.classes.shape == (48, 64)
    nodata = (data == 0).all(0)
    assert nodata.any() and (pred.classes[nodata] == 255).all()
    assert np.array_equal(pred.classes, cog)  # pixel for pixel
    p = pred.probabilities
    assert p.dtype == np.float32 and p.shape == (3, 48, 64) and np.isnan(p[:, nodata]).all()
    assert np.allclose(p[:, ~nodata].sum(0), 1, atol=1e-5)
    assert np.array_equal(p[:, ~nodata].argmax(0), pred.classes[~nodata])
    assert np.array_equal(np.round(p[:, ~nodata] * 254), cog_probs[:, ~nodata])  # the COG's are p x 254, rounded

    # out=: the COG, georeferenced as the array was described; the same classes as the array path
    api_out = tmp_path / "api.tif"
    written = gfm.predict(models["merged"], data, out=api_out, tile=32, progress=False, **AS_FILE)
    assert written.classes is None and written.report.out == api_out
    assert written.report.counts == pred.report.counts and sum(written.report.counts.values()) == (~nodata).sum()
    with rasterio.open(api_out) as ds:
        assert (ds.crs.to_epsg(), ds.transform) == (32616, TRANSFORM)
        assert np.array_equal(ds.read(1), pred.classes)


def test_array_and_file_agree_where_classes_vary(tmp_path: Path) -> None:
    """A per-pixel model whose map varies (the tiny export's is one class): array in, arrays out == file in, COG out."""
    scene = tmp_path / "LC08_scene.tif"
    data = write_scene(scene, 48, 64)
    info = TaskInfo("segmentation", 4, ["water", "crop", "tree", "urban"], source="test")
    model = LoadedTask(Pointwise().eval(), info, STATS)
    opts = dict(tile=32, overlap=8, progress=False)
    pred = gfm.predict(model, data, probabilities=True, **opts, **AS_FILE)
    gfm.predict(model, scene, out=tmp_path / "pred.tif", probabilities=tmp_path / "probs.tif", sensor="landsat8",
                bands=L8, date=DATE, **opts)
    assert pred.classes is not None and pred.probabilities is not None
    assert len(np.unique(pred.classes[pred.classes != 255])) > 1
    assert pred.report.classes == info.classes
    with rasterio.open(tmp_path / "pred.tif") as ds, rasterio.open(tmp_path / "probs.tif") as dp:
        assert np.array_equal(ds.read(1), pred.classes)
        ok = pred.classes != 255
        assert np.array_equal(np.round(pred.probabilities[:, ok] * 254), dp.read()[:, ok])


def test_array_scene_is_the_npy_cube_scene(tmp_path: Path) -> None:
    """An array with its wavelengths opens as the same cube saved as .npy with a wavelength list (gfm predict's)."""
    rng = np.random.default_rng(0)
    cube = rng.uniform(0, 1, (4, 20, 24)).astype(np.float32)
    cube[:, 3, 5] = np.nan
    wl = [450.0, 550.0, 650.0, 850.0]
    np.save(tmp_path / "cube.npy", cube)
    (tmp_path / "wl.txt").write_text("\n".join(map(str, wl)))
    files = SceneFiles([str(tmp_path / "cube.npy")], sensor="spectro", wavelengths=str(tmp_path / "wl.txt"), gsd=20)
    from_file = open_scene(scene_spec(files))
    from_array = array_scene(cube, wavelengths=wl, sensor="spectro", gsd=20)
    assert from_array.grid == from_file.grid
    assert observation_bands(from_array) == observation_bands(from_file)
    for got, want in zip(read_window(from_array, -2, 3, 10, 30), read_window(from_file, -2, 3, 10, 30)):
        assert np.array_equal(got, want, equal_nan=True)
    assert not read_window(from_array, 0, 0, 20, 24)[1][:, 3, 5].any()  # NaN is invalid


def test_errors_name_the_value(merged: LoadedTask, models: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    data = np.full((3, 40, 40), 2500, dtype=np.uint16)
    with pytest.raises(InputError, match=r"shape \(40, 40, 3\).*looks like \[H, W, bands\].*moveaxis") as e:
        gfm.predict(merged, data.transpose(1, 2, 0), progress=False, **AS_FILE)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"array of shape \(40, 40\): expected \[bands, H, W\]"):
        gfm.predict(merged, data[0], progress=False, **AS_FILE)
    with pytest.raises(InputError, match=r"wavelengths: 2 values, but the array of shape \(3, 40, 40\) has 3 bands"):
        gfm.predict(merged, data, wavelengths=[480.0, 560.0], progress=False)
    missing = tmp_path / "no_such_export"
    with pytest.raises(HubError, match=re.escape(f"{missing}: no such file or directory")):
        gfm.predict(missing, data, progress=False, **AS_FILE)
    # a pretraining-only export predicts no classes: said in Python's terms (the CLI says --adapter DIR)
    with pytest.raises(HubError, match=r"no task head.*adapter=DIR"):
        gfm.predict(models["base"], data, progress=False, **AS_FILE)
    with pytest.raises(ValueError, match="probabilities=True with out="):
        gfm.predict(merged, data, out=tmp_path / "x.tif", probabilities=True, **AS_FILE)
    assert not (tmp_path / "x.tif").exists()
