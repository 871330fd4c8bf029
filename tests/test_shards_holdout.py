"""The hold-out rule of the shard writer (BuildOptions.holdout / split) on tiny rasters made by code.

Scenes: ``a`` (UTM, 96 x 96 px at 10 m), ``b`` overlapping ``a`` with its tile lattice shifted by a
non-multiple of the tile, ``merc`` in Web Mercator around ``a``'s top-left corner, ``cube`` without a CRS,
and ``one`` that holds a single tile. Footprints are checked from the tiles' own metadata
(``tests/helpers_holdout.py``), not from the writer's code.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import Affine, from_bounds
from rasterio.warp import transform_bounds

from gfm.shards import BuildOptions, DatasetError, FileSpec, OptionError, SceneSpec, build
from gfm.shards.holdout import heldout_origins
from shards.cli import _flag
from tests.helpers_holdout import ground_overlaps, read_tiles, scene_counts, windows
from tests.helpers_rasters import write_raster

TILE = 16
FRACTION = 0.2
UTM = "EPSG:32633"
X0, Y0, RES = 500_000.0, 5_000_960.0, 10.0


def _band(path: Path, h: int, w: int, transform: Affine, crs: str | None, seed: int) -> FileSpec:
    a = np.random.default_rng(seed).integers(1, 5000, size=(h, w), dtype=np.uint16)
    return FileSpec(str(write_raster(path, a, transform, crs, nodata=0)), sensor="landsat8", bands=["B4"])


def scenes(root: Path) -> list[SceneSpec]:
    root.mkdir(parents=True, exist_ok=True)
    grid = Affine(RES, 0, X0, 0, -RES, Y0)
    shifted = Affine(RES, 0, X0 + 40 * RES, 0, -RES, Y0 - 24 * RES)  # 2.5 and 1.5 tiles off a's lattice
    west, south, east, north = transform_bounds(UTM, "EPSG:3857", X0 - 320, Y0 - 320, X0 + 320, Y0 + 320)
    cube = np.random.default_rng(3).integers(1, 5000, size=(48, 48, 2), dtype=np.uint16)
    np.save(root / "cube.npy", cube)
    return [
        SceneSpec("a", [_date(_band(root / "a.tif", 96, 96, grid, UTM, 0))]),
        SceneSpec("b", [_date(_band(root / "b.tif", 96, 96, shifted, UTM, 1))]),
        SceneSpec("merc", [_date(_band(root / "merc.tif", 64, 64, from_bounds(west, south, east, north, 64, 64),
                                       "EPSG:3857", 2))]),
        SceneSpec("cube", [_date(FileSpec(str(root / "cube.npy"), sensor="landsat8", bands=["B3", "B4"]))], gsd=10),
        SceneSpec("one", [_date(_band(root / "one.tif", 16, 16, Affine(RES, 0, 0, 0, -RES, 4_000_000), UTM, 4))]),
    ]


def _date(f: FileSpec):
    from gfm.shards import DateSpec

    return DateSpec("2020-01-01", [f])


def opts(out: Path, **kw) -> BuildOptions:
    return BuildOptions(out=str(out), tile=TILE, progress=False, min_valid=0.0, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    specs = scenes(root / "in")
    notices: list[str] = []
    build(specs, opts(root / "all"))
    build(specs, opts(root / "train", holdout=FRACTION), log=notices.append)
    build(specs, opts(root / "heldout", holdout=FRACTION, split="heldout", name="heldout"), log=notices.append)
    return root, specs, notices


def test_held_out_share_per_scene_and_disjoint_keys(built):
    root, _, notices = built
    every, train, held = (read_tiles(root / d) for d in ("all", "train", "heldout"))
    assert not set(train) & set(held) and set(train) | set(held) <= set(every)
    n = scene_counts(every)
    assert n == {"a": 36, "b": 36, "merc": 16, "cube": 9, "one": 1}
    expect = {s: max(1, round(FRACTION * c)) for s, c in n.items() if c > 1}
    assert scene_counts(held) == expect  # every scene of two or more tiles is represented; 'one' is not
    assert scene_counts(train) == {s: c - expect.get(s, 0) for s, c in n.items()}  # nothing else is lost
    k = sum(expect.values())
    assert any(f"{k} of 98 candidate tiles held out" in m and f"split 'heldout' writes {k}" in m for m in notices)
    assert (root / "heldout" / "heldout-000000.tar").exists() and (root / "train" / "gfm-000000.tar").exists()


def test_no_held_out_tile_shares_ground_with_a_training_tile(built):
    root, _, _ = built
    train, held = read_tiles(root / "train"), read_tiles(root / "heldout")
    assert ground_overlaps(train, held) == []
    # the checker does see ground shared between scenes: a and b overlap, and so do a and merc (other CRS)
    every = read_tiles(root / "all")
    pairs = ground_overlaps({k: t for k, t in every.items() if k.startswith("a_")},
                            {k: t for k, t in every.items() if not k.startswith("a_")})
    assert {p[1].split("_")[0] for p in pairs} == {"b", "merc"}


def test_held_out_tiles_come_from_ground_no_other_scene_covers(built):
    root, specs, _ = built
    held = read_tiles(root / "heldout")
    # a's tiles reaching below row 24 and right of col 40 (pixels) lie under b, those above row 32 and left
    # of col 32 under merc
    for row, col in windows(held, "a"):
        assert not (row + TILE > 24 and col + TILE > 40) and not (row < 32 and col < 32)


def test_same_split_is_byte_identical_and_rule_is_a_pure_function(built, tmp_path):
    root, specs, _ = built
    build(specs, opts(tmp_path / "again", holdout=FRACTION, split="heldout", name="heldout"))
    for name in ("heldout-000000.tar", "index.json"):
        assert (tmp_path / "again" / name).read_bytes() == (root / "heldout" / name).read_bytes()
    origins = [(r, c) for r in range(0, 96, 16) for c in range(0, 96, 16)]
    first = heldout_origins("a", origins, FRACTION)
    assert first == heldout_origins("a", list(reversed(origins)), FRACTION)  # order-free
    assert first != heldout_origins("b", origins, FRACTION)  # the scene id is part of the hash
    assert heldout_origins("a", origins[:1], 0.5) == set() and len(heldout_origins("a", origins[:2], 0.9)) == 1


def test_training_tiles_overlapping_held_out_ones_are_left_out(tmp_path):
    """Same grid twice (every tile shared) and a stride below the tile: neighbours of held-out tiles go."""
    grid = Affine(RES, 0, X0, 0, -RES, Y0)
    specs = [SceneSpec(s, [_date(_band(tmp_path / f"{s}.tif", 64, 64, grid, UTM, i))]) for i, s in enumerate("xy")]
    notices: list[str] = []
    build(specs, opts(tmp_path / "t", holdout=0.1, stride=8), log=notices.append)
    build(specs, opts(tmp_path / "h", holdout=0.1, stride=8, split="heldout"))
    train, held = read_tiles(tmp_path / "t"), read_tiles(tmp_path / "h")
    assert scene_counts(held) == {"x": 5, "y": 5}  # 7 x 7 = 49 candidates each
    assert ground_overlaps(train, held) == []
    assert 0 < len(train) < 2 * 49 - 10
    assert any(f"{2 * 49 - 10 - len(train)} more kept out of training" in m for m in notices)
    for scene in "xy":  # within a scene: no training tile closer than a tile to a held-out one
        d = np.abs(windows(train, scene)[:, None, :] - windows(held, scene)[None, :, :])
        assert ((d >= TILE).any(axis=2)).all()


def test_options_and_build_json(built, tmp_path):
    root, specs, _ = built
    with pytest.raises(OptionError, match=r"BuildOptions.holdout=1.0: expected a fraction in \[0, 1\)"):
        opts(tmp_path, holdout=1.0)
    with pytest.raises(OptionError, match="BuildOptions.split='test': expected one of train, heldout"):
        opts(tmp_path, split="test")
    with pytest.raises(OptionError, match="nothing is held out; set BuildOptions.holdout to a fraction > 0"):
        opts(tmp_path, split="heldout")
    assert _flag("holdout", 0.1) == "--holdout 0.1" and _flag("split", "heldout") == "--split heldout"
    # another split or fraction is another build: refused in the same directory
    with pytest.raises(DatasetError, match="holds shards of a different build"):
        build(specs, opts(root / "train", holdout=FRACTION, split="heldout"))
    with pytest.raises(DatasetError, match="holds shards of a different build"):
        build(specs, opts(root / "train", holdout=0.3))
    plan = json.loads((root / "train" / "build.json").read_text())
    assert (plan["holdout"], plan["split"]) == (FRACTION, "train")


def test_build_json_from_before_the_hold_out_resumes(tmp_path):
    specs = scenes(tmp_path / "in")[:1]
    build(specs, opts(tmp_path / "o"))
    plan_file = tmp_path / "o" / "build.json"
    doc = json.loads(plan_file.read_text())
    del doc["holdout"], doc["split"]
    plan_file.write_text(json.dumps(doc))
    report = build(specs, opts(tmp_path / "o"))
    assert report.skipped_complete == 1 and report.written == 0
