"""The pretraining corpus (pretrain/corpus/shared_data.yaml, python -m pretrain.build_corpus).

Without ../shared/data: the manifest's contents, the refusal, and the whole program (held-out rule,
resume, summary) on a small corpus made by code. With it: the real corpus built into a temporary
folder (about 10 s on two cores), checked for what it must and must not hold.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import Affine

from gfm import index as index_file
from gfm.data import LoaderConfig
from gfm.shards import load_manifest
from pretrain.build_corpus import HOLDOUT, MANIFEST, MANIFEST_DATA, main, reroot, scene_sensors
from tests.helpers_holdout import ground_overlaps, read_tiles, scene_counts
from tests.helpers_rasters import write_raster
from tests.shared_data import SHARED_DATA, needs_shared_data

SENSORS = {"aviris", "landsat8", "modis", "sentinel1_grd"}


def test_manifest_lists_no_sentinel2_and_no_labels_and_only_shared_paths():
    specs = load_manifest(MANIFEST)
    assert {s for spec in specs for s in scene_sensors(spec)} == SENSORS
    paths = [p for spec in specs for d in spec.dates for f in d.files for p in (f.path, f.wavelengths) if p]
    assert all(Path(os.path.normpath(p)).is_relative_to(MANIFEST_DATA) for p in paths)
    assert not any("S2" in Path(p).name or "sentinel2" in p.lower() for p in paths)
    assert all(spec.label is None and spec.label_class is None for spec in specs)
    assert len(specs) == 12 and sum(len(spec.dates) for spec in specs) == 23  # MODIS: 12 dates
    moved = reroot(specs, Path("/elsewhere/data"))
    assert moved[0].dates[0].files[0].path == "/elsewhere/data/hsi_indian_pines/Indian_pines_corrected.npy"
    assert moved[0].dates[0].files[0].wavelengths == "/elsewhere/data/hsi_indian_pines/wavelengths_nm.txt"


def test_refuses_in_one_line_without_shared_data(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), "--shared", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "absent") in err[0] and "pass --shared DIR" in err[0]
    assert not (tmp_path / "out").exists()


def _generated_corpus(root: Path) -> Path:
    """Two overlapping Landsat-8-like scenes (lattices 20 and 12 px apart), a Sentinel-1 pair in another UTM
    zone with a NaN corner, and a 5-band cube with wavelengths; returns the manifest."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    utm = Affine(30.0, 0, 400_000.0, 0, -30.0, 5_000_000.0)
    for band in ("B2", "B3"):
        write_raster(root / f"a_{band}.tif", rng.integers(1, 9000, (64, 64), dtype=np.uint16), utm, "EPSG:32633")
    shifted = Affine(30.0, 0, 400_000.0 + 20 * 30, 0, -30.0, 5_000_000.0 - 12 * 30)
    write_raster(root / "b.tif", rng.integers(1, 9000, (3, 64, 64), dtype=np.uint16), shifted, "EPSG:32633")
    s1 = Affine(10.0, 0, 600_000.0, 0, -10.0, 4_000_000.0)
    for pol in ("VV", "VH"):
        a = rng.normal(-15, 4, (48, 48)).astype(np.float32)
        a[:8, :8] = np.nan
        write_raster(root / f"s1_{pol}.tif", a, s1, "EPSG:32629", nodata=float("nan"))
    np.save(root / "cube.npy", rng.integers(100, 4000, (32, 32, 5), dtype=np.uint16))
    (root / "wl.txt").write_text("450\n550\n650\n750\n850\n")
    manifest = root / "corpus.yaml"
    manifest.write_text(
        "scenes:\n"
        "  - {id: a, sensor: landsat8, date: 2020-05-18, files: [a_B2.tif, a_B3.tif]}\n"
        "  - {id: b, sensor: landsat8, date: 2020-05-18, files: [{path: b.tif, bands: [B2, B3, B4]}]}\n"
        "  - {id: s1, sensor: sentinel1_grd, date: 2019-09-17, files: [s1_VV.tif, s1_VH.tif]}\n"
        "  - {id: cube, date: 1992-06-12, gsd: 20, files: [{path: cube.npy, sensor: hsi, wavelengths: wl.txt}]}\n"
    )
    return manifest


def test_program_on_a_generated_corpus(tmp_path, capsys):
    manifest = _generated_corpus(tmp_path / "shared")
    out = tmp_path / "corpus"
    argv = ["--out", str(out), "--shared", str(tmp_path / "shared"), "--manifest", str(manifest), "--tile", "16",
            "--workers", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    train, held = read_tiles(out / "train"), read_tiles(out / "heldout")
    assert not set(train) & set(held) and ground_overlaps(train, held) == []
    assert scene_counts(held) == {"a": 2, "b": 2, "s1": 1, "cube": 1}  # max(1, round(0.1 * n)) of 16, 16, 9, 4
    assert scene_counts(train) == {"a": 14, "b": 14, "s1": 8, "cube": 3}  # a's and b's held-out tiles avoid b, a
    for root in ("train", "heldout"):
        assert index_file.read(out / root).sensors == ["hsi", "landsat8", "sentinel1_grd"]
    assert (out / "heldout" / "heldout-000000.tar").exists()
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()}
    assert rows["landsat8"][1:4] == ["2", "28", "4"] and rows["sentinel1_grd"][1:4] == ["1", "8", "1"]
    assert rows["hsi"][1:] == ["1", "3", "1", "25.0%", "B001", "B002", "B003", "B004", "B005"]
    assert rows["total"][1:4] == ["4", "39", "6"]
    assert f"data.loader.norm_index: {out / 'train' / 'index.json'}" in printed
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    assert main(argv) == 0  # a re-run resumes: nothing rewritten
    assert "resuming: 1 of 1 shards already complete" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before
    assert main([*argv, "--only", "sentinel2_l1c"]) == 2
    assert "--only sentinel2_l1c: no scene of sensor(s) sentinel2_l1c" in capsys.readouterr().err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    assert main(["--out", str(out), "--shared", str(SHARED_DATA)]) == 0
    return out


@needs_shared_data
def test_corpus_holds_every_sensor_in_both_parts_and_no_sentinel2(corpus):
    specs = load_manifest(MANIFEST)
    train, held = index_file.read(corpus / "train"), index_file.read(corpus / "heldout")
    for idx in (train, held):
        assert set(idx.sensors) == SENSORS and not any(s.startswith("sentinel2") for s in idx.sensors)
        assert not any(key.startswith("sentinel2") for key in idx.bands) and idx.tile_size == 32
        assert {spec.id for spec in specs} == set(idx.scenes) and all(c.samples > 0 for c in idx.scenes.values())
        assert idx.classes is None
    assert 0.08 < held.samples / (train.samples + held.samples) < 0.12
    assert train.stats["landsat8/B10"].count > 0 and len([k for k in train.bands if k.startswith("aviris/")]) == 200


@needs_shared_data
def test_corpus_held_out_tiles_share_no_ground_with_training_tiles(corpus):
    train, held = read_tiles(corpus / "train"), read_tiles(corpus / "heldout")
    assert len(train) > 0 and len(held) > 0 and not set(train) & set(held)
    assert ground_overlaps(train, held) == []
    assert all(t.label is None for t in held.values())
    # each scene's held-out candidates (written + dropped below min_valid) are max(1, round(10 %)) of all of
    # its candidates: none of the corpus's training tiles had to go for overlapping a held-out one
    counts = [index_file.read(corpus / d).scenes for d in ("train", "heldout")]
    for scene, h in counts[1].items():
        t = counts[0][scene]
        k, n = h.samples + h.dropped, h.samples + h.dropped + t.samples + t.dropped
        assert k == max(1, round(HOLDOUT * n)), scene


@needs_shared_data
def test_held_out_loads_with_training_statistics(corpus):
    held = index_file.read(corpus / "heldout")
    loader = LoaderConfig(shards=str(corpus / "heldout"), norm_index=str(corpus / "train" / "index.json"),
                          mode="epoch", batch_size=8, num_workers=0, shuffle_buffer=0).build(0, 1)
    seen = [k for batch in loader for k in batch.keys]
    # an exact epoch with five band sets in one slot: the batch count stays exact, so a few tiles of the
    # partly filled buckets wait for the next epoch
    assert len(seen) == len(set(seen)) and set(seen) <= set(read_tiles(corpus / "heldout"))
    assert len(seen) >= held.samples - 5 * 8
