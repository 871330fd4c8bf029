"""The lean read path: member tables written with the shards, one pread per sample, reused hand-off buffers.

Shards are built by ``gfm.shards.build`` from tiny rasters made by code (10/20 m bands, a band in another
CRS, nodata, a partial label raster, two dates), so the offsets under test are the writer's own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import gfm.data.pipeline as pipeline
from gfm.data import Batch, LoaderConfig, LoaderError
from gfm.data.decode import TileDecoder
from gfm.data.reader import SampleRef, TableCache, sample_refs
from gfm.index import IndexFileError, MemberTable, parse_members, read, write_members
from gfm.schema import SchemaError, decode
from gfm.shards import BuildOptions, DateSpec, FileSpec, SceneSpec, build

sys.path.insert(0, os.path.dirname(__file__))
from helpers_rasters import DATES, make_scene  # noqa: E402
from helpers_shards import write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """49 tiles of 16 px (9 observations over two dates, labels, nodata) in 13 shards with member tables."""
    root = tmp_path_factory.mktemp("fast")
    scene = make_scene(root / "scene", second_date=True)
    spec = SceneSpec("synth", [DateSpec(d, [FileSpec(str(p)) for p in scene.files[d]]) for d in DATES],
                     label=str(scene.label))
    build([spec], BuildOptions(out=str(root / "ds"), tile=16, stride=8, min_valid=0.0, shard_size=48 * 1024,
                               resampling="nearest", progress=False))
    return root / "ds"


@pytest.fixture()
def ds(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built dataset, free to damage."""
    return Path(shutil.copytree(built, tmp_path / "ds"))


def cfg(root: Path | str, **kw: object) -> LoaderConfig:
    base: dict[str, object] = dict(shards=str(root), mode="epoch", batch_size=4, num_workers=0, crop_size=12,
                                   shuffle_buffer=8, seed=3, pin_memory=False)
    base.update(kw)
    return LoaderConfig(**base)  # type: ignore[arg-type]


def snapshot(batch: Batch) -> tuple[list[str], dict[str, bytes]]:
    """A batch as keys plus the raw bytes of every tensor (bit-level comparison; NaN == NaN)."""
    return batch.keys, {k: v.contiguous().numpy().tobytes() for k, v in batch.tensors().items()}


def run(config: LoaderConfig, epochs: int = 1) -> list[tuple[list[str], dict[str, bytes]]]:
    loader = config.build(0, 1)
    out = [snapshot(b) for _ in range(epochs) for b in loader]
    loader.close()
    return out


def forbid(monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """Make the tar stream (``what="tar"``) or the member-table read (``"table"``) fail if it is used."""

    def boom(*a: object, **k: object) -> None:
        raise AssertionError(f"the {what} path was used")

    if what == "tar":
        monkeypatch.setattr(pipeline, "tar_file_expander", boom)
    else:
        monkeypatch.setattr(SampleRef, "load", boom)


# --- what the writer records --------------------------------------------------------------------


def test_writer_records_offsets_that_match_the_tar(built: Path) -> None:
    idx = read(built)
    assert all(e.members for e in idx.shards)
    for entry in idx.shards:
        table = parse_members((built / str(entry.members)).read_bytes(), str(entry.members))
        tar = built / entry.name
        assert table.shard == entry.name and table.bytes == tar.stat().st_size == entry.bytes
        with tarfile.open(tar) as tf:  # an independent reading of the same file
            members = [(m.name, m.offset_data, m.size) for m in tf.getmembers()]
        assert [(f"{k}.{s}", o, n) for k, ms in table.samples for s, o, n in ms] == members
        assert len(table.samples) == entry.samples


def test_member_table_contract_names_the_bad_value(tmp_path: Path) -> None:
    good = MemberTable("a.tar", 4096, [("k", [("meta.json", 512, 10), ("pixels.npy", 1536, 100)])])
    path = write_members(tmp_path / "a.members.json", good)
    assert parse_members(path.read_bytes(), "a") == good
    doc = good.to_dict()
    cases = [
        ({**doc, "format": "other/1"}, "format"),
        ({**doc, "bytes": -1}, "bytes"),
        ({**doc, "extra": 1}, "unknown field 'extra'"),
        ({**doc, "samples": [["k", []]]}, r"samples\[0\]"),
        ({**doc, "samples": [["k", [["meta.json", 100, 10]]]]}, r"samples\[0\]\[0\]"),  # not block aligned
        ({**doc, "samples": [["k", [["meta.json", 512, 10], ["pixels.npy", 512, 100]]]]}, r"samples\[0\]\[1\]"),
        ({**doc, "samples": [["k", [["meta.json", 4096, 10]]]]}, "inside the 4096-byte tar"),
        ({**doc, "samples": [["k", [["meta.json", 512, True]]]]}, r"samples\[0\]\[0\]"),
    ]
    for bad, message in cases:
        with pytest.raises(IndexFileError, match=message):
            parse_members(json.dumps(bad), "a")
    with pytest.raises(IndexFileError, match="not valid JSON"):
        parse_members(b"{", "a")


# --- the same batches ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "workers"), [("epoch", 0), ("epoch", 2), ("resampled", 2)])
def test_fast_path_gives_the_tar_path_batches_bit_for_bit(
    built: Path, monkeypatch: pytest.MonkeyPatch, mode: str, workers: int
) -> None:
    kw = dict(mode=mode, num_workers=workers, obs_dropout=0.3, time_dropout=0.2, samples_per_epoch=40)
    slow = run(cfg(built, member_tables=False, **kw), epochs=2)
    forbid(monkeypatch, "tar")  # inherited by forked workers: every sample must come through the tables
    fast = run(cfg(built, **kw), epochs=2)
    assert [k for k, _ in fast] == [k for k, _ in slow] and len(fast) >= 20
    assert fast == slow
    assert all(len(d["label"]) == 4 * 12 * 12 * 8 for _, d in fast)  # segmentation labels came along
    if mode == "epoch":  # every tile is read: B02's nodata block shows, so masks were compared too
        assert any(0 in d["valid"] for _, d in fast)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_through_member_tables_is_exact(built: Path, workers: int) -> None:
    full = run(cfg(built, num_workers=workers, batch_size=2), epochs=2)
    loader = cfg(built, num_workers=workers, batch_size=2).build(0, 1)
    head = []
    for batch in loader:
        head.append(snapshot(batch))
        if len(head) == 7:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    resumed = cfg(built, num_workers=workers, batch_size=2).build(0, 1)
    resumed.load_state_dict(state)
    tail = [snapshot(b) for _ in range(2) for b in resumed]
    resumed.close()
    assert head + tail == full


def test_without_tables_the_tar_path_reads_everything(built: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reference = run(cfg(built))
    old = Path(shutil.copytree(built, tmp_path / "old"))
    for p in old.glob("*.members.json"):
        p.unlink()
    index = json.loads((old / "index.json").read_text())
    for entry in index["shards"]:
        del entry["members"]  # an index written before member tables existed
    (old / "index.json").write_text(json.dumps(index))
    forbid(monkeypatch, "table")
    assert run(cfg(old)) == reference
    assert run(cfg(built, member_tables=False)) == reference
    keys = write_dataset(str(tmp_path / "wds"), [6, 6])  # shards written by webdataset's TarWriter
    assert sorted(k for b, _ in run(cfg(tmp_path / "wds", crop_size=8)) for k in b) == sorted(keys)


def test_pipe_dataset_is_streamed_when_asked_for(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = run(cfg(built, num_workers=2))
    forbid(monkeypatch, "table")
    names = [e.name for e in read(built).shards]
    spec = f"pipe:cat {built}/gfm-{{000000..{len(names) - 1:06d}}}.tar"
    assert run(cfg(spec, num_workers=2, index=str(built / "index.json"), allow_pipe=True)) == reference


# --- tables that do not describe the file ---------------------------------------------------------


def _table(root: Path, shard: str) -> tuple[Path, dict]:
    path = root / shard.replace(".tar", ".members.json")
    return path, json.loads(path.read_text())


def _reference_pixels(root: Path) -> dict[str, bytes]:
    """Key → normalised pixels, read through the tar path without any augmentation."""
    plain = dict(crop_size=None, hflip=False, vflip=False, rot90=False, shuffle_buffer=0, batch_size=1)
    loader = cfg(root, member_tables=False, **plain).build(0, 1)
    return {b.keys[0]: b.pixels.numpy().tobytes() for b in loader}


def test_swapped_offsets_are_faults_never_wrong_samples(ds: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = _reference_pixels(ds)
    path, doc = _table(ds, "gfm-000003.tar")
    doc["samples"][0][0], doc["samples"][1][0] = doc["samples"][1][0], doc["samples"][0][0]  # keys swapped
    path.write_text(json.dumps(doc))
    plain = dict(crop_size=None, hflip=False, vflip=False, rot90=False, shuffle_buffer=0, batch_size=1)
    loader = cfg(ds, **plain).build(0, 1)
    with caplog.at_level(logging.WARNING, logger="gfm.data"):
        got = {b.keys[0]: b.pixels.numpy().tobytes() for b in loader}
    assert loader.faults == {"samples": 2, "shards": 0}
    assert "gfm-000003.members.json does not match the tar" in caplog.text
    swapped = {doc["samples"][0][0], doc["samples"][1][0]}
    assert not swapped & set(got)
    assert all(got[k] == reference[k] for k in got), "a sample read through a bad table differs"


def test_wrong_sizes_are_faults_and_too_many_trip_the_budget(ds: Path) -> None:
    path, doc = _table(ds, "gfm-000005.tar")
    for _, members in doc["samples"]:
        members[-1][2] -= 2  # every sample's last member two bytes short (still well formed)
    path.write_text(json.dumps(doc))
    loader = cfg(ds, shuffle_buffer=0).build(0, 1)
    assert len(list(loader)) == loader.batches_per_epoch and loader.faults["samples"] == 4
    with pytest.raises(LoaderError, match="error_budget=2.*members.json does not match the tar"):
        list(cfg(ds, shuffle_buffer=0, error_budget=2).build(0, 1))


def test_truncated_shard_falls_back_to_the_tar_stream(ds: Path, caplog: pytest.LogCaptureFixture) -> None:
    tar = ds / "gfm-000002.tar"
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2 + 100)
    slow = cfg(ds, member_tables=False, shuffle_buffer=0).build(0, 1)
    expected = [snapshot(b) for b in slow]
    fast = cfg(ds, shuffle_buffer=0).build(0, 1)
    with caplog.at_level(logging.WARNING, logger="gfm.data"):
        got = [snapshot(b) for b in fast]
    assert got == expected and fast.faults == slow.faults and fast.faults["shards"] >= 1
    assert "reading" in caplog.text and "gfm-000002.tar as a tar stream" in caplog.text


@pytest.mark.parametrize("damage", ["count", "json", "missing", "other shard"])
def test_unusable_table_falls_back_to_the_tar_stream(ds: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    expected = run(cfg(ds, member_tables=False))
    path, doc = _table(ds, "gfm-000001.tar")
    if damage == "count":
        doc["samples"].pop()
        path.write_text(json.dumps(doc))
    elif damage == "json":
        path.write_text("{not json")
    elif damage == "missing":
        path.unlink()
    else:
        shutil.copy(ds / "gfm-000002.members.json", path)
    with caplog.at_level(logging.WARNING, logger="gfm.data"):
        assert run(cfg(ds)) == expected
    assert "gfm-000001.tar as a tar stream" in caplog.text


def test_a_file_that_shrinks_after_opening_is_a_fault(ds: Path) -> None:
    idx = read(ds)
    entry = idx.shards[0]
    shard = TableCache().open(str(ds / entry.name), str(ds / str(entry.members)), entry.samples)
    assert shard is not None
    refs = list(sample_refs(shard, 0, entry.samples))
    assert refs[0].load()["__key__"] == refs[0].key
    with open(ds / entry.name, "r+b") as f:
        f.truncate(1024)
    with pytest.raises(SchemaError, match="points past the end of the file"):
        refs[-1].load()


# --- hand-off buffers ------------------------------------------------------------------------------


def test_kept_batches_are_never_overwritten_and_dropped_ones_are_reused(built: Path) -> None:
    kw = dict(num_workers=2, mode="resampled", samples_per_epoch=96)
    expected = run(cfg(built, **kw), epochs=2)  # snapshots taken as batches come, then dropped
    loader = cfg(built, **kw).build(0, 1)
    kept = [b for _ in range(2) for b in loader]  # every batch held at once: no buffer may be reused
    assert [snapshot(b) for b in kept] == expected
    ledger = loader._ledger
    assert ledger.one_offs > 0, "holding every batch must exhaust the pools"
    del kept
    for _ in range(2):
        for batch in loader:
            del batch  # dropped at once: each worker cycles through its few buffers
    before = ledger.one_offs
    n = sum(1 for _ in loader)
    assert ledger.one_offs == before and n == loader.batches_per_epoch
    assert 0 < len(ledger.maps) <= 2 * loader.plan.pool < n
    loader.close()


def test_iterations_abandoned_mid_epoch_free_their_buffers(built: Path) -> None:
    loader = cfg(built, num_workers=2, mode="resampled", samples_per_epoch=96).build(0, 1)
    for _ in range(4):
        for i, _batch in enumerate(loader):
            if i == 2:
                break  # the batches in flight are dropped by the DataLoader, unseen
    rest = [snapshot(b) for b in loader]
    assert len(rest) == loader.batches_per_epoch - 12
    assert loader._ledger.one_offs == 0, "buffers of dropped batches must be reclaimed, not leaked"
    loader.close()


# --- meta.json with a reused band list --------------------------------------------------------------


def test_band_list_reuse_never_changes_what_a_sample_decodes_to(built: Path) -> None:
    with tarfile.open(built / "gfm-000000.tar") as tf:
        raw: dict[str, object] = {"__key__": "synth_20200101_0_0"}
        for m in tf.getmembers():
            key, _, suffix = m.name.partition(".")
            if key == raw["__key__"]:
                raw[suffix] = tf.extractfile(m).read()  # type: ignore[union-attr]
    meta = bytes(raw["meta.json"])  # type: ignore[arg-type]
    assert meta.startswith(b'{"bands":[')
    decoder = TileDecoder()
    first = decoder(raw)
    assert decoder.band_lists  # gfm's own layout: remembered once validated
    assert decoder(dict(raw)).meta == first.meta == decode(raw).meta
    bands = json.loads(meta)["bands"]
    tail = b',"bands":' + json.dumps([{**bands[0], "kind": "bogus"}]).encode() + b"}"
    variants = [
        meta[:-1] + tail,  # a second "bands" key: the last one wins in JSON
        meta[:-1] + b',"b\\u0061nds":null}',  # the same key spelt with an escape
        meta[:-1] + b',"bands" :null}',  # ... with a space before the colon
        meta[:-1] + b',"extra":{"bands":1}}',  # nested
        meta.replace(b'"B02"', b'"B0\\u0032"', 1),  # an escape anywhere
    ]
    for text in variants:
        sample = dict(raw, **{"meta.json": text})
        try:
            expected: object = decode(sample).meta
        except SchemaError as e:
            expected = type(e)
        try:
            got: object = decoder(sample).meta
        except SchemaError as e:
            got = type(e)
        assert got == expected, text


# --- benchmark ---------------------------------------------------------------------------------------


def test_bench_loader_runs_on_any_shards_with_their_sources(built: Path, capsys: pytest.CaptureFixture) -> None:
    from bench.loader import main

    assert main([str(built), "--seconds", "0.05", "--rounds", "1", "--batch-size", "4", "--crop", "12"]) == 0
    out = capsys.readouterr().out
    assert "(c) on the fly, torchgeo-style merge" in out  # 10/20 m bands and one in another CRS
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][0]
    values = dict(kv.split("=") for kv in line.split()[1:])
    assert set(values) == {"vs_raw", "cpu_ratio", "vs_onthefly"}
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in values.values())


def test_torch_sees_one_storage_per_batch(built: Path) -> None:
    loader = cfg(built, num_workers=1).build(0, 1)
    batch = next(iter(loader))
    storages = {t.untyped_storage().data_ptr() for t in batch.tensors().values()}
    assert len(storages) == 1 and batch.pixels.dtype == torch.float32
    loader.close()


def test_a_stream_too_short_for_one_batch_names_samples_per_epoch(built: Path) -> None:
    # 49 tiles over 2 ranks cannot fill batches of 32; the message names the default and what it ignores
    with pytest.raises(LoaderError, match=r"no full batch: samples_per_epoch=49 over 2 ranks.*a larger "
                                          r"samples_per_epoch \(default: the index's 49 samples, not counting "
                                          r"oversample\)"):
        cfg(built, mode="resampled", batch_size=32, oversample={"synth": 4}).build(0, 2)
    assert cfg(built, mode="resampled", batch_size=32, samples_per_epoch=128).build(0, 2).batches_per_epoch == 2
