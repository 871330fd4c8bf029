"""Untrusted use of the programs' outputs: nothing gfm did not write is overwritten or deleted.

One test per case of issue 20 (items 4-6 and some of its one-line errors), each on tiny generated data
and through the programs' own ``main([...])``: a refusal is exit code 2 and one line on stderr naming
the path, and the files it protects are byte for byte what they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from export.__main__ import main as export_main
from export.embed import main as embed_main
from export.predict import main as predict_main
from finetune.__main__ import main as finetune_main
from gfm import distributed as gdist
from gfm import hub
from gfm.infer.scenes import observation_bands
from gfm.outputs import MARKER, read_marker
from tests.test_finetune_fixtures import finetune_overrides, pixel_dataset
from tests.test_hub_helpers import make_finetune_run, make_run_dir
from tests.test_infer import L8, STATS, Pointwise, open_l8, run_predict, write_scene


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys: pytest.CaptureFixture[str], rc: int, *words: str) -> str:
    """Assert a one-line refusal (exit 2) holding ``words``; returns the line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]
    return err[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pretraining run (made by hand), its export, a LoRA fine-tune of it, and the export with the adapter."""
    root = tmp_path_factory.mktemp("untrusted")
    run = make_run_dir(root / "run", depth=2)
    hub.export(run, root / "base")
    ft, _ = make_finetune_run(root / "base", root / "ft")
    hub.export(run, root / "with_adapter", adapter=ft)
    return {"run": run, "base": root / "base", "ft": ft, "with_adapter": root / "with_adapter"}


@pytest.fixture(scope="module", autouse=True)
def world_of_one() -> None:
    gdist.init_distributed()  # one process group for every in-process gfm finetune of this module


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pixel_dataset(tmp_path_factory.mktemp("untrusted_pixel"))


# ------------------------------------------------------------------------------------------------
# gfm finetune run directories


def test_finetune_into_a_foreign_directory_with_a_config_yaml_leaves_it_untouched(
        pixel_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my own settings\nlearning: fast\n")
    before = snapshot(mine)
    rc = finetune_main(finetune_overrides(pixel_shards, mine, "pixel", "linear_probe", steps=1))
    refused(capsys, rc, str(mine), "not written by gfm finetune", "config.yaml")
    assert snapshot(mine) == before and not (mine / MARKER).exists()


def test_finetune_rerun_into_a_finished_run_is_refused(pixel_shards: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "ft"
    args = [*finetune_overrides(pixel_shards, run_dir, "pixel", "linear_probe", steps=1), "data.window=3",
            "eval.maps=false"]
    assert finetune_main(args) == 0
    assert read_marker(run_dir)["program"] == "finetune"  # type: ignore[index]
    capsys.readouterr()
    before = snapshot(run_dir)
    refused(capsys, finetune_main(args), str(run_dir), "finished fine-tuning run (metrics.json)", "new run_dir",
            "overwrite=true")
    assert snapshot(run_dir) == before
    # an interrupted run (no metrics.json) is gfm's own: it is restarted in place, as the demo and the
    # experiment do; overwrite=true replaces a finished one
    (run_dir / "metrics.json").unlink()
    assert finetune_main(args) == 0 and (run_dir / "metrics.json").is_file()
    assert finetune_main([*args, "overwrite=true"]) == 0


def test_window_larger_than_the_split_block_is_named(pixel_shards: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # tiles of 16 px, spatial blocks of 16 px: 17 x 17 windows overlap every neighbouring block, and the
    # guard band then drops every class (was: "the training split is empty")
    args = [*finetune_overrides(pixel_shards, tmp_path / "ft", "pixel", "linear_probe", steps=1), "data.window=17",
            "split.empty_class=drop"]
    refused(capsys, finetune_main(args), "task window (17 x 17 px) is larger than split.block (16 px)",
            "a larger split.block")


# ------------------------------------------------------------------------------------------------
# gfm export


def test_export_onto_its_own_source_is_refused_even_with_overwrite(runs: dict[str, Path],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(runs["run"])
    rc = export_main([str(runs["run"]), str(runs["run"]), "--overwrite"])
    refused(capsys, rc, str(runs["run"]), "is also an input of this command")
    assert snapshot(runs["run"]) == before


def test_export_of_a_run_into_its_parent_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "x"
    make_run_dir(project / "pretrain", depth=2)
    (project / "notes.md").write_text("a sibling of the run\n")
    before = snapshot(project)
    rc = export_main([str(project / "pretrain"), str(project), "--overwrite"])
    refused(capsys, rc, str(project), "contains an input of this command")
    assert snapshot(project) == before


def test_export_of_an_export_in_place_is_refused_and_keeps_its_adapter(
        runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    export_dir = runs["with_adapter"]
    assert (export_dir / "adapter").is_dir() and read_marker(export_dir)["program"] == "export"  # type: ignore[index]
    before = snapshot(export_dir)
    refused(capsys, export_main([str(export_dir), str(export_dir), "--overwrite"]), "is also an input")
    assert snapshot(export_dir) == before


def test_overwrite_never_replaces_a_directory_gfm_did_not_write(runs: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "thesis.tex").write_text("years of work\n")
    (theirs / "sub" / "data.csv").write_text("1,2\n")
    before = snapshot(theirs)
    rc = export_main([str(runs["run"]), str(theirs), "--overwrite"])
    refused(capsys, rc, str(theirs), "not written by gfm export", "even with overwrite")
    assert snapshot(theirs) == before
    # an export (marker) is replaced with --overwrite; so is one of a gfm before markers (config.json
    # "format": "gfm" beside model.safetensors), which gets the marker
    old = tmp_path / "old_export"
    hub.export(runs["run"], old)
    (old / MARKER).unlink()
    assert export_main([str(runs["run"]), str(old), "--overwrite"]) == 0
    assert read_marker(old)["program"] == "export"  # type: ignore[index]
    # a run directory (another program's output) is not an export to replace
    rc = export_main([str(runs["base"]), str(runs["ft"]), "--overwrite"])
    refused(capsys, rc, str(runs["ft"]))


# ------------------------------------------------------------------------------------------------
# gfm predict and gfm embed


def test_predict_out_and_probabilities_on_one_path_is_refused_before_anything_runs(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scene = tmp_path / "LC08_scene.tif"
    write_scene(scene, 40, 40)
    common = ["--model", str(runs["base"]), "--adapter", str(runs["ft"]), "--sensor", "landsat8", "--bands",
              "B2,B3,B4", "--date", "2015-08-04", "--tile", "32", "--no-progress"]
    same = tmp_path / "sub" / ".." / "pred.tif"  # the same path once resolved
    rc = predict_main([str(scene), *common, "--out", str(tmp_path / "pred.tif"), "--probabilities", str(same)])
    refused(capsys, rc, "given as both --out and --probabilities")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LC08_scene.tif"]
    # the scene itself as the output, even with --overwrite
    before = scene.read_bytes()
    rc = predict_main([str(scene), *common, "--out", str(scene), "--overwrite"])
    refused(capsys, rc, str(scene), "is also an input of this command")
    assert scene.read_bytes() == before


def test_stale_temporaries_of_a_killed_run_are_removed_by_the_next_run_of_that_output(tmp_path: Path) -> None:
    scene_path = tmp_path / "scene.tif"
    write_scene(scene_path, 64, 64)
    out = tmp_path / "pred.tif"
    stale = [".pred.tif.part.k1ll3d_x.tmp", ".pred.tif.cog.k1ll3d_y.tmp"]  # mkstemp: 8 random characters
    others = [".other.tif.part.k1ll3d_x.tmp", ".pred.tif.probs.tif.k1ll3d_z.tmp", ".pred.tif.part.short.tmp",
              "pred.tif.notes"]  # another output's temporaries, not a temporary name, not a temporary
    for name in stale + others:
        (tmp_path / name).write_bytes(b"left by a kill -9")
    scene = open_l8(scene_path)
    run_predict(scene, Pointwise().eval(), hub.input_bands(observation_bands(scene), STATS), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["scene.tif", "pred.tif", *others])
    # the GeoParquet writer too
    from gfm.infer.geoparquet import EmbeddingWriter

    (tmp_path / ".emb.parquet.k1ll3d_q.tmp").write_bytes(b"left by a kill -9")
    EmbeddingWriter(tmp_path / "emb.parquet", 4, {}).abort()
    assert not list(tmp_path.glob(".emb.parquet.*"))


def test_embed_of_an_empty_directory_says_no_scenes(runs: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = embed_main([str(empty), "--model", str(runs["base"]), "--out", str(tmp_path / "e.parquet"), "--no-progress"])
    refused(capsys, rc, f"no scenes found in {empty}")
    assert not (tmp_path / "e.parquet").exists()


def test_embed_out_and_dense_on_one_path_or_inside_the_shards_is_refused(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scene = tmp_path / "LC08_scene.tif"
    write_scene(scene, 40, 40)
    args = [str(scene), "--model", str(runs["base"]), "--sensor", "landsat8", "--bands", ",".join(L8), "--date",
            "2015-08-04", "--no-progress"]
    refused(capsys, embed_main([*args, "--out", str(tmp_path / "a"), "--dense", str(tmp_path / "a")]),
            "given as both --out and --dense")
    shards = runs["run"] / "data"
    index = (shards / "index.json").read_bytes()
    rc = embed_main([str(shards), "--model", str(runs["base"]), "--out", str(shards / "index.json"), "--overwrite",
                     "--no-progress"])
    refused(capsys, rc, "lies inside an input of this command")
    assert (shards / "index.json").read_bytes() == index
