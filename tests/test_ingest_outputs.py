"""The output directory: stale inputs invalidate exactly their shards, foreign files are never overwritten.

Also one-line errors for a read-only ``--out``, a truncated GeoTIFF, and stale temporary files.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gfm.shards import BuildOptions, DatasetError, DateSpec, FileSpec, InputError, OptionError, SceneSpec, build
from gfm.shards.fingerprint import FULL_HASH_BYTES, fingerprint
from shards.cli import main as shards_main
from tests.helpers_ingest import CRS, GRID, SIZE
from tests.helpers_rasters import write_raster

TILE = 20  # 4 tiles per 40 x 40 scene; shard_size below puts 2 tiles in a shard
SHARD = 2 * (TILE * TILE * (1 * 2 + 1 + 4) + 2048)


def scene_file(path: Path, value: int, *, nodata_all: bool = False) -> Path:
    a = np.full((SIZE, SIZE), 0 if nodata_all else value, np.uint16)
    return write_raster(path, a, GRID, CRS, nodata=0)


def spec(sid: str, path: Path) -> SceneSpec:
    return SceneSpec(sid, [DateSpec("2020-01-01", [FileSpec(str(path), "landsat8", ["B4"])])])


def opts(out: Path, **kw) -> BuildOptions:
    return BuildOptions(out=str(out), tile=TILE, shard_size=SHARD, progress=False, **kw)


def state(out: Path) -> dict[str, int]:
    """Shard tar name -> mtime_ns."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))}


def test_changed_input_rebuilds_exactly_the_shards_it_fed(tmp_path: Path) -> None:
    a, b = scene_file(tmp_path / "a_B4.tif", 10), scene_file(tmp_path / "b_B4.tif", 20)
    out = tmp_path / "out"
    first = build([spec("a", a), spec("b", b)], opts(out))
    assert first.planned_shards == 4 and first.index is not None and first.index.stats["landsat8/B4"].mean == 15
    before = state(out)
    again: list[str] = []
    resumed = build([spec("a", a), spec("b", b)], opts(out), log=again.append)
    assert resumed.written == 0 and resumed.skipped_complete == 4 and state(out) == before
    assert not [m for m in again if "changed since" in m or "deleted" in m]
    # replace b at the same path, same size: only b's two shards are rebuilt, with a notice naming the file
    scene_file(b, 30)
    notices: list[str] = []
    third = build([spec("a", a), spec("b", b)], opts(out), log=notices.append)
    assert any(m.startswith(f"notice: input {b} changed since the last build (content differs)") for m in notices)
    assert any("2 finished shard(s) of changed inputs deleted, to be rebuilt: gfm-000002.tar, gfm-000003.tar" in m
               for m in notices)
    assert third.written == 2 and third.skipped_complete == 2
    after = state(out)
    assert [n for n in after if after[n] == before[n]] == ["gfm-000000.tar", "gfm-000001.tar"]
    assert third.index is not None and third.index.stats["landsat8/B4"].mean == 20  # (10 + 30) / 2
    # a build with other options into the same directory is still refused
    with pytest.raises(DatasetError, match="holds shards of a different build"):
        build([spec("a", a), spec("b", b)], opts(out, min_valid=0.9))


def test_fixed_all_nodata_input_rebuilds(tmp_path: Path) -> None:
    f = scene_file(tmp_path / "c_B4.tif", 0, nodata_all=True)
    out = tmp_path / "out"
    with pytest.raises(OptionError, match="no tile of scene.s. c has a valid fraction"):
        build([spec("c", f)], opts(out))
    with pytest.raises(OptionError, match="no tile of scene.s. c has a valid fraction"):  # same input, same answer
        build([spec("c", f)], opts(out))
    scene_file(f, 7)
    report = build([spec("c", f)], opts(out))
    assert report.samples == 4 and report.index is not None and report.index.stats["landsat8/B4"].mean == 7


def test_fingerprints(tmp_path: Path) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    fp = fingerprint(small)
    assert fp.full and fp.size == 1000
    os.utime(small, ns=(fp.mtime_ns + 10**9, fp.mtime_ns + 10**9))  # touched, same content: hashed whole
    assert fingerprint(small).change_from(fp) is None
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(FULL_HASH_BYTES + 10 * 1024**2)
    fb = fingerprint(big)
    assert not fb.full
    with open(big, "r+b") as f:  # one byte in the header changes the sampled hash
        f.write(b"\x01")
    assert fingerprint(big).change_from(fb) == "content differs"
    fb2 = fingerprint(big)
    os.utime(big, ns=(fb2.mtime_ns + 10**9, fb2.mtime_ns + 10**9))  # too big to prove identical: changed
    assert fingerprint(big).change_from(fb2) == "modified since (same size; too large to compare whole)"
    assert fingerprint(big).change_from(None) == "not fingerprinted before"


def test_out_refuses_a_foreign_directory_and_never_overwrites(tmp_path: Path) -> None:
    a = scene_file(tmp_path / "a_B4.tif", 10)
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "index.json").write_text('{"theirs": true}')
    (foreign / "gfm-000000.tar").write_bytes(b"not ours")
    with pytest.raises(DatasetError) as e:
        build([spec("a", a)], opts(foreign))
    assert str(e.value) == (f"{foreign}: not empty (gfm-000000.tar, index.json) and not a gfm dataset (no build.json); "
                            "use a new or empty directory, or BuildOptions.force=True to write beside those files "
                            "(they are never overwritten)")
    with pytest.raises(DatasetError, match=r"theirs/index.json: exists and was not written by this build"):
        build([spec("a", a)], opts(foreign, force=True))
    assert (foreign / "index.json").read_text() == '{"theirs": true}'
    (foreign / "index.json").rename(foreign / "their_index.json")
    with pytest.raises(DatasetError, match=r"theirs/gfm-000000.tar: exists and was not written by this build"):
        build([spec("a", a)], opts(foreign, force=True))
    assert (foreign / "gfm-000000.tar").read_bytes() == b"not ours"
    assert build([spec("a", a)], opts(foreign, force=True, name="mine")).samples == 4  # no name in common
    assert (foreign / "gfm-000000.tar").read_bytes() == b"not ours"
    # beside unrelated files, --force writes its dataset and leaves them alone
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    report = build([spec("a", a)], opts(other, force=True))
    assert report.samples == 4 and (other / "notes.txt").read_text() == "keep me"
    assert build([spec("a", a)], opts(other)).skipped_complete == 2  # now a gfm dataset: resumes
    # a build.json that is not ours is never taken for a plan
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "build.json").write_text('{"steps": []}')
    with pytest.raises(DatasetError, match=r"odd/build.json: unreadable build plan .* not written by gfm shards build"):
        build([spec("a", a)], opts(odd, force=True))
    assert (odd / "build.json").read_text() == '{"steps": []}'


def test_cli_out_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = scene_file(tmp_path / "LC08_L1TP_035032_20200101_B4.tif", 10)
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "index.json").write_text("{}")
    capsys.readouterr()
    assert shards_main(["build", str(a), "--out", str(foreign), "--tile", "20", "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"gfm shards build: error: {foreign}: not empty (index.json)") and "--force" in last
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert shards_main(["build", str(a), "--out", str(ro / "ds"), "--tile", "20", "--no-progress"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == f"gfm shards build: error: {ro / 'ds'}: cannot write there (Permission denied)"
    finally:
        ro.chmod(0o755)


def test_read_only_out_is_one_line(tmp_path: Path) -> None:
    """Whoever runs the tests: a path below a regular file can never be created."""
    a = scene_file(tmp_path / "a_B4.tif", 10)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match=r"file/ds: cannot write there \(Not a directory\)"):
        build([spec("a", a)], opts(blocker / "ds"))
    with pytest.raises(DatasetError, match=r"file: exists and is not a directory"):
        build([spec("a", a)], opts(blocker))


def test_truncated_geotiff_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    big = np.random.default_rng(0).integers(1, 60000, size=(256, 256), dtype=np.uint16)
    path = write_raster(tmp_path / "LC08_L1TP_035032_20200101_B4.tif", big, GRID, CRS, nodata=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header and strip offsets intact, half the pixels gone
    with pytest.raises(InputError, match=r"_B4.tif: cannot read its pixels \(truncated or corrupt file\?"):
        build([spec("t", path)], opts(tmp_path / "o", workers=1))
    capsys.readouterr()
    assert shards_main(["build", str(path), "--out", str(tmp_path / "c"), "--tile", "64", "--workers", "2",
                        "--shard-size", "100KB", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith(f"gfm shards build: error: {path}: cannot read its pixels")
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]


def test_stale_temporaries_are_removed_by_the_next_build(tmp_path: Path) -> None:
    a = scene_file(tmp_path / "a_B4.tif", 10)
    out = tmp_path / "out"
    build([spec("a", a)], opts(out))
    # what killed builds leave: a half-written shard and sidecar, and a half-written index
    for name in (".gfm-000001.tar.4242.tmp", ".gfm-000001.stats.json.abc123.tmp", ".gfm-000000.tar.tmp-77",
                 ".index.json.xyz.tmp"):
        (out / name).write_bytes(b"half")
    (out / "gfm-000001.stats.json").unlink()  # shard 1 unfinished
    notices: list[str] = []
    report = build([spec("a", a)], opts(out), log=notices.append)
    assert report.written == 1 and report.skipped_complete == 1
    assert [m for m in notices if m.startswith("notice: removed 4 temporary file(s) left by an interrupted build")]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # one part of a split build removes only the temporaries of its own shards
    (out / ".gfm-000000.tar.1.tmp").write_bytes(b"half")
    (out / ".gfm-000001.tar.1.tmp").write_bytes(b"half")
    build([spec("a", a)], opts(out, part=(1, 2)))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".gfm-000000.tar.1.tmp"]
    assert json.loads((out / "index.json").read_text())["samples"] == 4
