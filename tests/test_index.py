"""The index.json contract (gfm.index): round trip, merge, and errors that name the file and the key."""

import json
from pathlib import Path

import pytest

from gfm import index as index_file
from gfm.data.sources import LoaderError, load_index
from gfm.index import (
    BandInfo,
    BandSummary,
    IndexFileError,
    IndexNotFoundError,
    SceneCounts,
    ShardEntry,
    ShardPart,
    merge,
    split_stats_key,
    stats_key,
)
from gfm.shards import BuildOptions, DateSpec, FileSpec, SceneSpec, build
from tests.helpers_rasters import DATES, make_scene
from tests.helpers_shards import write_dataset

B1 = BandInfo("B1", "s", 443.0, 16.0, "reflectance")
B2 = BandInfo("B2", "s", 482.0, 60.0, "reflectance")


def part(name: str, samples: int, scene: str = "a", bands=(B1,), dropped: int = 0, dates=("2020-01-01",)):
    return ShardPart(
        shard=ShardEntry(name, samples, 100 * samples, f"sha-{name}"),
        tile_size=16,
        bands={b.key: b for b in bands},
        dates=list(dates),
        sensors=sorted({b.sensor for b in bands}),
        scenes={scene: SceneCounts(samples, dropped)},
        dropped_low_valid=dropped,
    )


def test_stats_key_format():
    assert stats_key("landsat8", "B4") == "landsat8/B4" and split_stats_key("landsat8/B4") == ("landsat8", "B4")
    for bad in ("landsat8B4", "/B4", "landsat8/", "a/b/c"):
        with pytest.raises(IndexFileError, match="is not '<sensor>/<band>'"):
            split_stats_key(bad)


def test_round_trip_of_a_written_index(tmp_path):
    scene = make_scene(tmp_path / "scene")
    spec = SceneSpec("s", [DateSpec(DATES[0], [FileSpec(str(p)) for p in scene.files[DATES[0]][:3]])])
    report = build([spec], BuildOptions(out=str(tmp_path / "o"), tile=16, shard_size=20_000, progress=False))
    path = tmp_path / "o" / index_file.INDEX_FILE
    idx = index_file.read(tmp_path / "o")
    assert idx == report.index and idx == index_file.read(path)  # a root or the file itself
    assert idx.to_dict() == json.loads(path.read_text())
    assert list(idx.to_dict()) == list(json.loads(path.read_text()))  # fields in file order
    index_file.write(tmp_path / "copy", idx)
    assert (tmp_path / "copy" / "index.json").read_bytes() == path.read_bytes()
    assert idx.counts == {s.name: s.samples for s in idx.shards} and sum(idx.counts.values()) == idx.samples == 16


def test_a_minimal_index_gets_defaults():
    idx = index_file.from_dict({"schema": 1, "shards": [{"name": "a.tar", "samples": 3}]}, "mem")
    assert idx.samples == 3 and idx.planned_shards == 1 and idx.bytes is None and idx.stats == {}
    assert idx.shards == [ShardEntry("a.tar", 3)] and idx.missing_shards == [] and idx.tile_size is None


def test_merge_sums_parts_and_lists_missing_shards():
    parts = [part("g-0.tar", 3, "a", dropped=1), part("g-1.tar", 0, "a", dropped=2),
             part("g-2.tar", 2, "b", bands=(B2, B1), dates=("2020-02-01",))]
    stats = {"s/B2": BandSummary(4, 2.0, 1.0), "s/B1": BandSummary(5, 1.0, 0.5)}
    idx = merge(parts, stats, schema=1, created_by="gfm test", planned=["g-0.tar", "g-1.tar", "g-2.tar", "g-3.tar"])
    assert [s.name for s in idx.shards] == ["g-0.tar", "g-2.tar"]  # a shard without samples has no tar
    assert idx.samples == 5 and idx.bytes == 500 and idx.dropped_low_valid == 3 and idx.tile_size == 16
    assert idx.scenes == {"a": SceneCounts(3, 3), "b": SceneCounts(2, 0)}
    assert list(idx.bands) == list(idx.stats) == ["s/B1", "s/B2"]  # sorted by key
    assert idx.dates == ["2020-01-01", "2020-02-01"] and idx.sensors == ["s"]
    assert idx.planned_shards == 4 and idx.missing_shards == ["g-3.tar"]
    assert merge(parts[:1], {}, schema=1, created_by="x").planned_shards == 1


def test_merge_refuses_inconsistent_parts():
    with pytest.raises(IndexFileError, match="shard 'g-0.tar' is given twice"):
        merge([part("g-0.tar", 1), part("g-0.tar", 1)], {}, schema=1, created_by="x")
    other = BandInfo("B1", "s", 450.0, 16.0, "reflectance")
    with pytest.raises(IndexFileError, match=r"band 's/B1': shard 'g-1.tar' describes it as .*450.0.*'g-0.tar'"):
        merge([part("g-0.tar", 1), part("g-1.tar", 1, bands=(other,))], {}, schema=1, created_by="x")
    with pytest.raises(IndexFileError, match=r"stats\['s/B9'\]: no shard has a band of that key"):
        merge([part("g-0.tar", 1)], {"s/B9": BandSummary(1, 0.0, 0.0)}, schema=1, created_by="x")
    bad = ShardPart(ShardEntry("g-0.tar", 1), 16, {"s/B2": B1}, [], ["s"], {}, 0)
    with pytest.raises(IndexFileError, match=r"shard 'g-0.tar': bands\['s/B2'\] describes 's/B1'"):
        merge([bad], {}, schema=1, created_by="x")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["shards"][1].update(samples="x"), "shards[1].samples: expected a non-negative integer, got 'x'"),
        (lambda d: d.update(colour="blue"), "unknown field 'colour'"),
        (lambda d: d.pop("schema"), "not a gfm index.json (no 'schema' version)"),
        (lambda d: d.pop("shards"), "not a gfm index.json (no 'shards' list)"),
        (lambda d: d["bands"]["landsat8/B4"].update(kind="optical"), "bands['landsat8/B4'].kind: expected one of"),
        (lambda d: d["stats"].update(landsat8B4=d["stats"]["landsat8/B4"]),
         "stats['landsat8B4']: key is not '<sensor>/<band>'"),
        (lambda d: d["stats"]["landsat8/B4"].pop("std"), "stats['landsat8/B4'] lacks std"),
        (lambda d: d["bands"].update({"landsat8/B9": d["bands"]["landsat8/B4"]}),
         "bands['landsat8/B9'] describes 'landsat8/B4'"),
        (lambda d: d["shards"].append(dict(d["shards"][0])), "shards: 'gfm-000000.tar' is listed more than once"),
    ],
)
def test_a_bad_index_is_named_with_its_key(tmp_path, edit, message):
    write_dataset(str(tmp_path), [2, 2])
    path = tmp_path / "index.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(IndexFileError) as e:
        index_file.read(tmp_path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    with pytest.raises(LoaderError) as le:  # the loader reads through the same contract
        load_index(str(path))
    assert str(le.value) == str(e.value)


def test_missing_or_unparsable_index(tmp_path: Path):
    with pytest.raises(IndexNotFoundError) as e:
        index_file.read(tmp_path)
    assert e.value.path == tmp_path / "index.json"
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(IndexFileError, match=r"index.json: not valid JSON"):
        index_file.read(tmp_path)
