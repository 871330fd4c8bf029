"""An index.json is untrusted input: it can never run a command or point a reader outside the dataset.

Also: ``info`` counts a deleted shard as missing, a wrong-shaped index.json or build.json is one line,
invalid YAML in a config is one line, and checkpoint rank files load with ``weights_only=True``.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gfm import index as index_file
from gfm.index import IndexFileError, check_shard_name, is_shard_name
from gfm.shards import BuildOptions, DateSpec, FileSpec, SceneSpec, build, info, verify
from shards.cli import main as shards_main
from tests.helpers_ingest import CRS, GRID, SIZE
from tests.helpers_rasters import write_raster
from tests.helpers_shards import write_dataset


def evil_dataset(root: Path, marker: Path, *, where: str = "name") -> Path:
    """A valid dataset whose index.json names a shard (or member table) ``pipe:touch <marker>``."""
    write_dataset(str(root), [4, 4])
    doc = json.loads((root / "index.json").read_text())
    command = f"pipe:touch {marker}"
    if where == "name":
        doc["shards"][1]["name"] = command
    elif where == "members":
        doc["shards"][1]["members"] = command
    else:
        doc["missing_shards"] = [command]
    (root / "index.json").write_text(json.dumps(doc))
    return root


@pytest.mark.parametrize("where, key", [("name", "shards[1].name"), ("members", "shards[1].members"),
                                        ("missing", "missing_shards[0]")])
def test_a_pipe_entry_in_index_json_never_starts_a_process(
    tmp_path: Path, capsys: pytest.CaptureFixture, where: str, key: str
) -> None:
    marker = tmp_path / "pwned"
    root = evil_dataset(tmp_path / "ds", marker, where=where)
    expected = (f"{root / 'index.json'}: {key}: 'pipe:touch {marker}' is not a plain relative file name inside "
                "the dataset")
    with pytest.raises(IndexFileError) as e:
        index_file.read(root)
    assert str(e.value).startswith(expected)
    # every reader of the dataset refuses it the same way, before opening any shard
    from gfm.data import LoaderConfig
    from gfm.data.sources import LoaderError, load_index, resolve_shards

    with pytest.raises(LoaderError, match="is not a plain relative file name"):
        load_index(str(root / "index.json"))
    with pytest.raises(LoaderError, match="is not a plain relative file name"):
        resolve_shards(str(root))
    with pytest.raises(LoaderError, match="is not a plain relative file name"):
        next(iter(LoaderConfig(shards=str(root), num_workers=0, batch_size=2).build(0, 1)))
    with pytest.raises(LoaderError, match="is not a plain relative file name"):  # even when the user allows pipe:
        next(iter(LoaderConfig(shards=str(root), num_workers=0, batch_size=2, allow_pipe=True).build(0, 1)))
    from gfm.finetune.data import read_tiles

    with pytest.raises(LoaderError, match="is not a plain relative file name"):
        read_tiles(str(root))
    for command in ("verify", "info", "index"):
        capsys.readouterr()
        assert shards_main([command, str(root)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        if command != "index":  # index merges sidecars: there are none here
            assert err == f"gfm shards {command}: error: {str(e.value)}"
    assert not marker.exists()


def test_shard_names_are_plain_relative_names() -> None:
    for good in ("gfm-000000.tar", "part_1/gfm-000001.tar", "a+b.tar", "x.members.json"):
        assert is_shard_name(good) and check_shard_name(good, "i", "k") == good
    for bad in ("pipe:cat x", "s3://bucket/a.tar", "http://h/a.tar", "/etc/passwd", "../a.tar", "a/../../b.tar",
                ".hidden.tar", "a//b.tar", "", "a.tar::b.tar", "gfm-{000000..000009}.tar", "a b.tar", "C:\\a.tar",
                "a\nb.tar", "-rf.tar"):
        assert not is_shard_name(bad), bad
        with pytest.raises(IndexFileError, match=r"^i: k: .* is not a plain relative file name"):
            check_shard_name(bad, "i", "k")
    with pytest.raises(IndexFileError, match=r"^i: k: expected a string, got 5"):
        check_shard_name(5, "i", "k")


def test_url_and_absolute_names_are_refused_by_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    secret = tmp_path / "outside.tar"
    secret.write_bytes(b"x")
    for name in (str(secret), "../outside.tar", "file:///etc/passwd"):
        root = tmp_path / "ds"
        write_dataset(str(root), [2])
        doc = json.loads((root / "index.json").read_text())
        doc["shards"][0]["name"] = name
        (root / "index.json").write_text(json.dumps(doc))
        capsys.readouterr()
        assert shards_main(["verify", str(root)]) == 2
        assert f"shards[0].name: {name!r} is not a plain relative file name" in capsys.readouterr().err


def test_wrong_shaped_index_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = {
        "[]": "not a gfm index.json (no 'shards' list)",
        '{"schema": 1, "shards": [5]}': "shards[0]: expected an object, got 5",
        '{"schema": 1, "shards": [{"name": "a.tar"}]}': "shards[0] lacks samples",
        '{"schema": 1, "shards": [], "bands": []}': "bands: expected an object, got []",
        '{"schema": 1, "shards": [], "classes": {"x": "a"}}': "classes: expected integer label values as keys, got 'x'",
        '{"schema": 1, "shards": [], "stats": {"a/b": {"count": 1, "mean": "x", "std": 1}}}':
            "stats['a/b'].mean: expected a number, got 'x'",
        "{not json": "not valid JSON",
    }
    root = tmp_path / "ds"
    root.mkdir()
    for text, problem in cases.items():
        (root / "index.json").write_text(text)
        for command in ("info", "verify"):
            capsys.readouterr()
            assert shards_main([command, str(root)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"gfm shards {command}: error: {root / 'index.json'}: {problem}"), err
            assert len(err.splitlines()) == 1
    # a build.json of the wrong shape, too
    (root / "index.json").unlink()
    (root / "gfm-000000.stats.json").write_text("{}")
    for text in ('{"gfm": "0", "shards": [5]}', '{"gfm": "0", "shards": [{"name": "pipe:touch x"}]}'):
        (root / "build.json").write_text(text)
        capsys.readouterr()
        assert shards_main(["index", str(root)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"gfm shards index: error: {root / 'build.json'}: unreadable build plan") and \
            len(err.splitlines()) == 1, err


def test_info_counts_a_deleted_shard_as_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = write_raster(tmp_path / "a_B4.tif", np.full((SIZE, SIZE), 3, np.uint16), GRID, CRS, nodata=0)
    out = tmp_path / "out"
    build([SceneSpec("a", [DateSpec(None, [FileSpec(str(f), "landsat8")])])],
          BuildOptions(out=str(out), tile=20, shard_size=2 * (20 * 20 * 7 + 2048), progress=False))
    assert info(out).missing == []
    (out / "gfm-000001.tar").unlink()
    summary = info(out)
    assert summary.absent == ["gfm-000001.tar"] and summary.missing == ["gfm-000001.tar"]
    text = summary.text()
    assert "shards   2 (2 planned, 1 missing)" in text
    assert "absent   gfm-000001.tar: listed in index.json, no such file (deleted or not copied)" in text
    capsys.readouterr()
    assert shards_main(["info", str(out)]) == 0
    assert "(2 planned, 1 missing)" in capsys.readouterr().out
    assert [p.kind for p in verify(out).problems] == ["missing"]


def test_invalid_yaml_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gfm.cli import main as gfm_main

    bad = tmp_path / "run.yaml"
    bad.write_text("model:\n  name: less_vit_tiny\n  depth: [1, 2\noptim: {lr: 1}\n")
    assert gfm_main(["pretrain", "--config", str(bad), "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == (f"gfm pretrain: config error: {bad}: not valid YAML (line 4, column 6: expected ',' or "
                           "']', but got ':')"), err


def test_checkpoint_rank_files_load_with_weights_only(tmp_path: Path) -> None:
    import random

    import torch

    from gfm.train.checkpoint import load_rank_state, rng_state, set_rng_state

    state = {"data_state": {"epoch": 2, "batches": 5, "layout": {"mode": "epoch"}}, "rng": rng_state(), "epoch": 2}
    torch.save(state, tmp_path / "rank_00000.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = load_rank_state(tmp_path / "rank_00000.pt")
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected  # RNG resumes exactly
    assert loaded["data_state"] == state["data_state"]
    # a rank file written before the RNG state was plain lists (np.random.get_state() holds an ndarray)
    old = {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(old, tmp_path / "old.pt")
    set_rng_state(load_rank_state(tmp_path / "old.pt")["rng"])
    # anything else is refused, and nothing runs
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"rng": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match=r"evil.pt: refused to load: it holds more than tensors and plain data "
                                           r"\(.*GLOBAL posix.system"):
        load_rank_state(tmp_path / "evil.pt")
    assert not marker.exists()


def test_user_given_pipe_runs_only_when_allowed(tmp_path: Path) -> None:
    from gfm.data import LoaderConfig
    from gfm.data.sources import LoaderError, open_url, resolve_shards

    root = tmp_path / "ds"
    write_dataset(str(root), [3, 3])
    marker = tmp_path / "ran"
    listing = tmp_path / "shards.txt"
    listing.write_text(f"pipe:touch {marker}\n")
    for kwargs in ({"spec": f"pipe:touch {marker}"}, {"spec": f"{root}/gfm-000000.tar::pipe:touch {marker}"},
                   {"spec": str(listing)}, {"spec": str(root), "index": f"pipe:touch {marker}"}):
        with pytest.raises(LoaderError, match=r"is a 'pipe:' command, which runs a shell"):
            resolve_shards(kwargs["spec"], kwargs.get("index"))
    with pytest.raises(LoaderError, match=r"shard 'pipe:touch .*' is a 'pipe:' command"):
        open_url(f"pipe:touch {marker}")
    assert not marker.exists()
    # asked for explicitly, a command the user wrote runs
    ld = LoaderConfig(shards=f"pipe:cat {root}/gfm-{{000000..000001}}.tar", index=str(root / "index.json"),
                      num_workers=0, batch_size=2, mode="epoch", allow_pipe=True).build(0, 1)
    assert sum(b.pixels.shape[0] for b in ld) == 6
