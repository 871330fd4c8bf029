"""Untrusted inputs to the adaptation and inference side: right numbers or one clear line (issue 20).

One test per case: bands matched by physics (a reordered, subset or mislabelled hyperspectral cube), the
fine-tuning data's statistics travelling with an export, label nodata that must not become a class, and
``config.json`` files that do not hold what an export holds. Everything runs on tiny data made here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from gfm import hub
from gfm.finetune.data import LabelConfig, TaskDataConfig, load_task_data
from gfm.infer.predictors import load_task_model
from gfm.infer.scenes import SceneFiles, observation_bands, read_window, scene_spec
from gfm.shards import BuildOptions, DateSpec, FileSpec, SceneSpec, build
from gfm.shards.scene import open_scene
from tests.test_hub_helpers import make_finetune_run, make_run_dir

WAVELENGTHS = [400.0 + 10 * i for i in range(12)]  # a hyperspectral grid: 10 nm apart
TRANSFORM = from_origin(500000.0, 4000000.0, 30.0, 30.0)


def cube_config() -> dict:
    """An export's band table for the 12-band cube: band i has mean 1000 (i + 1) and std 10 (i + 1)."""
    return {"bands": {f"cube/B{i + 1:03d}": {
        "name": f"B{i + 1:03d}", "sensor": "cube", "center_nm": w, "fwhm_nm": 10.0, "kind": "reflectance",
        "stats": {"mean": 1000.0 * (i + 1), "std": 10.0 * (i + 1)}} for i, w in enumerate(WAVELENGTHS)}}


def open_cube(root: Path, name: str, cube: np.ndarray, wavelengths: list[float]):  # type: ignore[no-untyped-def]
    """``cube [H, W, C]`` with its wavelength list, opened as ``gfm predict`` opens it (sensor ``cube``)."""
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{name}.npy", cube)
    (root / f"{name}_wl.txt").write_text("\n".join(f"{w:g}" for w in wavelengths))
    return open_scene(scene_spec(SceneFiles([str(root / f"{name}.npy")], sensor="cube",
                                            wavelengths=str(root / f"{name}_wl.txt"))))


def test_reordered_and_subset_cubes_get_each_bands_own_statistics(tmp_path: Path) -> None:
    cube = np.random.default_rng(0).integers(100, 9000, (8, 9, 12)).astype(np.uint16)
    config = cube_config()
    full = hub.input_bands(observation_bands(open_cube(tmp_path, "full", cube, WAVELENGTHS)), config)
    np.testing.assert_array_equal(full.mean, 1000.0 * np.arange(1, 13))
    # reversed: the file's first band (named B001 by position) is the 510 nm band, B012's statistics
    rev = hub.input_bands(observation_bands(open_cube(tmp_path, "rev", cube[..., ::-1], WAVELENGTHS[::-1])), config)
    np.testing.assert_array_equal(rev.mean, full.mean[::-1])
    np.testing.assert_array_equal(rev.std, full.std[::-1])
    # every third band: B001..B004 of the subset are the full cube's B002, B005, B008, B011
    pick = [1, 4, 7, 10]
    sub = hub.input_bands(observation_bands(open_cube(tmp_path, "sub", cube[..., pick],
                                                      [WAVELENGTHS[i] for i in pick])), config)
    np.testing.assert_array_equal(sub.mean, full.mean[pick])
    # the model's input is the same per band, whatever the order
    px = np.moveaxis(cube, -1, 0)[None].astype(np.float32)
    a = full.batch(px, np.ones_like(px, dtype=bool)).pixels
    b = rev.batch(px[:, ::-1].copy(), np.ones_like(px, dtype=bool)).pixels
    np.testing.assert_array_equal(a.numpy(), b.numpy()[:, ::-1])


def test_band_at_a_wavelength_the_model_has_no_statistics_for_is_refused(tmp_path: Path) -> None:
    cube = np.ones((4, 4, 12), dtype=np.uint16)
    shifted = [w + 33.0 for w in WAVELENGTHS]  # 433..543 nm: the last two lie more than a FWHM past 510 nm
    bands = observation_bands(open_cube(tmp_path, "shifted", cube, shifted))
    with pytest.raises(hub.HubError) as e:
        hub.input_bands(bands, cube_config(), where="scene x: ")
    msg = str(e.value)
    assert "\n" not in msg and "'cube/B010' is at 523 nm" in msg and "for 490 nm" in msg
    # the bands that do lie on the model's grid take the statistics of the band at their wavelength
    ok = hub.input_bands(bands[:9], cube_config())
    np.testing.assert_array_equal(ok.mean, 1000.0 * np.arange(4, 13))
    # a registered sensor is matched by name, and its wavelength checked
    l8 = {"bands": {"landsat8/B4": {"name": "B4", "sensor": "landsat8", "center_nm": 654.6, "fwhm_nm": 37.5,
                                    "kind": "reflectance", "stats": {"mean": 1.0, "std": 2.0}}}}
    with pytest.raises(hub.HubError, match=r"'landsat8/B4' is at 865 nm.*for 654.6 nm"):
        hub.input_bands([{"sensor": "landsat8", "name": "B4", "center_nm": 865.0, "fwhm_nm": 28.0}], l8)
    assert hub.input_bands(["landsat8/B4"], l8).mean.tolist() == [1.0]


def write_l8(path: Path, data: np.ndarray) -> Path:
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=str(data.dtype), crs="EPSG:32616", transform=TRANSFORM, nodata=0)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def write_labels(path: Path, labels: np.ndarray, nodata: float) -> Path:
    profile = dict(driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1, dtype=str(labels.dtype),
                   crs="EPSG:32616", transform=TRANSFORM, nodata=nodata)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(labels[None])
    return path


@pytest.fixture(scope="module")
def rescaled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Landsat 8 scene stored as 2 DN + 3000 (statistics unlike the base model's) with uint8 labels whose
    nodata is 255, its shards, and the scene and label files."""
    root = tmp_path_factory.mktemp("rescaled")
    rng = np.random.default_rng(3)
    dn = rng.integers(500, 4000, (3, 64, 64))
    scene = write_l8(root / "LC08_scene.tif", (2 * dn + 3000).astype(np.uint16))
    labels = rng.integers(1, 4, (64, 64)).astype(np.uint8)
    labels[:, :20] = 255  # unlabelled
    label_file = write_labels(root / "labels.tif", labels, nodata=255)
    spec = SceneSpec("s", [DateSpec("2015-08-04", [FileSpec(str(scene), "landsat8", ["B2", "B3", "B4"])])],
                     label=str(label_file))
    build([spec], BuildOptions(out=str(root / "shards"), tile=32, min_valid=0.0, progress=False))
    return {"root": root, "scene": scene, "shards": root / "shards"}


def test_label_nodata_is_never_a_class(rescaled: dict[str, Path]) -> None:
    data = load_task_data(TaskDataConfig(shards=str(rescaled["shards"]), task="segmentation"))
    assert data.label_values == [1, 2, 3] and "class_255" not in data.class_names
    # labels.ignore takes a value out too
    data = load_task_data(TaskDataConfig(shards=str(rescaled["shards"]), task="segmentation",
                                         labels=LabelConfig(ignore=[3])))
    assert data.label_values == [1, 2]


def test_fine_tuning_statistics_travel_with_the_export(rescaled: dict[str, Path], tmp_path: Path) -> None:
    data = load_task_data(TaskDataConfig(shards=str(rescaled["shards"]), task="segmentation"))
    run = make_run_dir(tmp_path / "run", depth=1)
    hub.export(run, tmp_path / "base")
    base_stats = hub.stats_of(json.loads((tmp_path / "base" / "config.json").read_text()))
    assert base_stats["landsat8/B2"]["mean"] < 0.8 * data.bands["landsat8/B2"]["stats"]["mean"]
    ft, _ = make_finetune_run(tmp_path / "base", tmp_path / "ft", bands=data.bands)
    assert json.loads((ft / "finetune.json").read_text())["bands"] == json.loads(json.dumps(data.bands))
    hub.export(run, tmp_path / "pines", adapter=ft)
    config = json.loads((tmp_path / "pines" / "config.json").read_text())
    for key, entry in data.bands.items():
        assert config["bands"][key]["stats"] == pytest.approx(entry["stats"])
    assert config["normalization"]["task_bands"] == sorted(data.bands)
    # nothing exported names a directory of this machine (it may be pushed to the Hub)
    for f in (tmp_path / "pines").rglob("*.json"):
        assert str(tmp_path) not in f.read_text(), f
    # predict's input for a tile of the scene, with no --stats, is the fine-tuning run's own input for it
    loaded = load_task_model(tmp_path / "pines")
    scene = open_scene(scene_spec(SceneFiles([str(rescaled["scene"])], sensor="landsat8", bands=["B2", "B3", "B4"],
                                             date="2015-08-04")))
    spec = hub.input_bands(observation_bands(scene), loaded.config)
    for i, tile in enumerate(data.tiles):
        w = data.windows
        r, c, h, wd = int(w.top[i]), int(w.left[i]), int(w.height[i]), int(w.width[i])
        px, valid = read_window(scene, r, c, h, wd)
        got = spec.batch(px[None], valid[None]).pixels
        np.testing.assert_allclose(got.numpy(), tile.pixels.numpy(), rtol=0, atol=1e-5)
    # the same, given the adapter apart from a plain base export
    beside = load_task_model(tmp_path / "base", ft)
    assert hub.stats_of(beside.config) == hub.stats_of(config)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    hub.export(make_run_dir(root / "run", depth=1), root / "export")
    return root / "export"


def _copy_with(export_dir: Path, dest: Path, **changes: object) -> Path:
    import shutil

    shutil.copytree(export_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        if key == "std":
            first = sorted(config["bands"])[0]
            config["bands"][first]["stats"]["std"] = value
        else:
            config[key] = value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(("change", "expected"), [
    ({"format_version": 99}, "format_version 99; this gfm"),
    ({"surprise": 1}, "unknown key(s) 'surprise'"),
    ({"std": float("nan")}, "stats.std is nan, expected a finite number"),
    ({"std": 0.0}, "stats.std is 0.0, expected a positive number"),
    ({"weights_dtype": "int8"}, "weights dtype 'int8'"),
])
def test_config_json_is_validated(export_dir: Path, tmp_path: Path, change: dict, expected: str) -> None:
    bad = _copy_with(export_dir, tmp_path / "bad", **change)
    with pytest.raises(hub.HubError) as e:
        hub.from_pretrained(bad)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_integer_tensor_where_the_model_holds_floats_is_refused(export_dir: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "ints"
    shutil.copytree(export_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[key] = state[key].round().to(torch.int32)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hub.HubError, match=rf"tensor '{key}' is torch.int32, the model holds torch.float32"):
        hub.from_pretrained(bad)


def test_moved_run_export_asks_for_the_index_instead_of_writing_no_statistics(tmp_path: Path) -> None:
    import shutil

    from export.__main__ import main as export_main

    run = make_run_dir(tmp_path / "run", depth=1)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(run / "data")  # the shards the run config names are gone
    with pytest.raises(hub.HubError, match="index.json of the shards it trained on cannot be found"):
        hub.export(moved, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert export_main([str(moved), str(tmp_path / "y"), "--index", str(moved / "data" / "index.json")]) == 0
    assert len(json.loads((tmp_path / "y" / "config.json").read_text())["bands"]) == 3


def test_index_without_its_shards_is_one_line(export_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from export.embed import main as embed_main
    from gfm.finetune.data import TaskDataError, read_tiles
    from tests.helpers_shards import write_dataset

    write_dataset(str(tmp_path / "data"), [4, 4], size=16)
    (tmp_path / "data" / "gfm-000001.tar").unlink()
    with pytest.raises(TaskDataError, match=r"gfm-000001.tar: listed in .*index.json but not there \(1 of 2"):
        read_tiles(str(tmp_path / "data"))
    assert embed_main([str(tmp_path / "data"), "--model", str(export_dir), "--out", str(tmp_path / "e.parquet"),
                       "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gfm-000001.tar: listed in" in err
    assert not (tmp_path / "e.parquet").exists()
