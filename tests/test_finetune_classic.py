"""Classic baselines (random forest, SVM, kNN) as methods of ``gfm finetune``, on shards generated in code.

They must write what a network run writes, on the same split, scored by the same code; refuse what they
cannot do in one line; never save a model; and keep scikit-learn out of pretraining's imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gfm import distributed as gdist
from gfm.config import ConfigError, load
from gfm.finetune.artifacts import AdapterError, load_finetuned
from gfm.finetune.config import FinetuneConfig
from gfm.finetune.methods import METHODS, ClassicMethod, MethodConfig, get_method
from gfm.finetune.run import run, run_one
from gfm.finetune.splits import load_split
from tests.test_finetune_fixtures import BANDS, finetune_overrides, pixel_dataset, scene_dataset

REPO = Path(__file__).resolve().parents[1]
CLASSIC = ("random_forest", "svm", "knn")
FAST = ("method.classic.trees=40",)  # a forest of 500 trees is the default; 40 is plenty on 3 classes


@pytest.fixture(scope="module", autouse=True)
def world_of_one() -> None:
    gdist.init_distributed()


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pixel_dataset(tmp_path_factory.mktemp("ft_classic"))


@pytest.fixture(scope="module")
def probe(pixel_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A network run (linear probe, 2 steps) whose outputs the baselines must match."""
    run_dir = tmp_path_factory.mktemp("ft_classic_probe") / "probe"
    run(_cfg(pixel_shards, run_dir, "pixel", "linear_probe", steps=2))
    return run_dir


def _cfg(shards: Path, run_dir: Path, task: str, method: str, *extra: str, steps: int = 6) -> FinetuneConfig:
    return load(FinetuneConfig, None, [*finetune_overrides(shards, run_dir, task, method, steps), *FAST, *extra])


def _json(path: Path) -> dict[str, typing.Any]:
    out: dict[str, typing.Any] = json.loads(path.read_text())
    return out


def test_registry_names_are_distinct_and_the_config_lists_exactly_them() -> None:
    names = [m.name for m in METHODS.values()]
    assert names == list(METHODS) and len(set(names)) == len(names)
    literal = typing.get_type_hints(MethodConfig)["name"]
    assert set(typing.get_args(literal)) == set(METHODS)
    assert {n for n, m in METHODS.items() if m.classic} == set(CLASSIC)
    assert all(isinstance(METHODS[n], ClassicMethod) and METHODS[n].saves == "nothing" for n in CLASSIC)
    assert [n for n, m in METHODS.items() if m.frozen_base] == ["lora", "linear_probe"]
    assert [n for n, m in METHODS.items() if m.random_init] == ["scratch"]
    with pytest.raises(ConfigError, match="method.name: expected one of .*'random_forest', 'svm', 'knn'.*got 'xgb'"):
        load(FinetuneConfig, None, ["data.shards=x", "method.name=xgb"])
    with pytest.raises(ConfigError, match="unknown method 'xgb' \\(known: lora, linear_probe, full, scratch, random_"):
        get_method("xgb")
    with pytest.raises(ConfigError, match="method.classic.svm_gamma: 'scale', 'auto' or a number"):
        load(FinetuneConfig, None, ["data.shards=x", "method.name=svm", "method.classic.svm_gamma=wide"])
    with pytest.raises(ConfigError, match="method.classic.features: 'window' is not defined for task segmentation"):
        load(FinetuneConfig, None, ["data.shards=x", "data.task=segmentation", "method.name=knn",
                                    "method.classic.features=window"])


@pytest.mark.parametrize("method", CLASSIC)
def test_baseline_writes_a_network_runs_outputs_on_the_same_split(pixel_shards: Path, probe: Path, tmp_path: Path,
                                                                  method: str) -> None:
    run_dir = tmp_path / method
    res = run(_cfg(pixel_shards, run_dir, "pixel", method))
    for name in ("config.yaml", "split.json", "metrics.json", "finetune.json", "confusion_matrix.png",
                 "prediction_map_toy.png"):
        assert (run_dir / name).is_file(), name
    assert not [p.name for p in run_dir.iterdir() if p.suffix in (".safetensors", ".pkl", ".pickle", ".joblib")]

    ours, theirs = _json(run_dir / "metrics.json"), _json(probe / "metrics.json")
    assert set(ours) == set(theirs) and set(ours["test"]) == set(theirs["test"])
    assert ours["method"] == method and ours["parameters"]["trainable"] == 0 and ours["split"] == theirs["split"]
    split, probe_split = _json(run_dir / "split.json"), _json(probe / "split.json")
    assert all(split[k] == probe_split[k] for k in ("train", "val", "test")) and split["test"]
    # a separable task (three distinct spectra plus noise): far above the third that chance gives
    assert ours["test"]["oa"] > 0.9 and ours["test"]["samples"] == len(split["test"])
    assert res.metrics["test"]["oa"] == ours["test"]["oa"]

    manifest = _json(run_dir / "finetune.json")
    assert manifest["method"] == method and manifest["model_saved"] is False and manifest["files"] == {}
    assert "not saved" in manifest["note"] and manifest["fitted"]["features"] == BANDS

    # split.load of the probe's split gives the same ids
    again = run(_cfg(pixel_shards, tmp_path / "again", "pixel", method, f"split.load={probe / 'split.json'}",
                     "seed=5"))
    reference = load_split(probe / "split.json", again.data.windows)  # type: ignore[union-attr]
    assert all(np.array_equal(getattr(again.split, k), getattr(reference, k)) for k in ("train", "val", "test"))


def test_a_forest_on_shuffled_labels_scores_near_chance(pixel_shards: Path, tmp_path: Path) -> None:
    """The control for the test above: the figures come from the features, not from the split or the scoring."""
    cfg = _cfg(pixel_shards, tmp_path / "shuffled", "pixel", "random_forest", "split.mode=random",
               "split.fractions=[0.5,0.0,0.5]")
    data = cfg.data.build()
    real = run_one(replace(cfg, run_dir=str(tmp_path / "real")), data)
    shuffled = np.random.default_rng(0).permutation(data.targets)
    noise = run_one(cfg, replace(data, targets=shuffled))
    assert real.metrics["test"]["oa"] > 0.9 and noise.metrics["test"]["oa"] < 0.55


def test_window_features_and_the_scene_tasks(pixel_shards: Path, tmp_path: Path) -> None:
    run(_cfg(pixel_shards, tmp_path / "window", "pixel", "knn", "method.classic.features=window", "data.window=5"))
    assert _json(tmp_path / "window" / "finetune.json")["fitted"]["features"] == BANDS * 5 * 5

    scenes = scene_dataset(tmp_path / "data")
    res = run(_cfg(scenes, tmp_path / "scene", "scene", "knn", "split.block=8", "data.labels.names=[]",
                   "method.classic.knn_k=1"))
    assert res.metrics["test"]["samples"] > 0  # (these scenes' classes are drawn apart from their pixels)
    assert _json(tmp_path / "scene" / "finetune.json")["fitted"]["features"] == BANDS  # per-band means

    # multi-label: one SVM per class column that varies in training, the constant ones predicted as such
    multi = run(_cfg(pixel_shards, tmp_path / "multi", "multilabel", "svm", "split.block=16"))
    assert {"micro_f1", "exact_match"} <= set(multi.metrics["test"]) and (tmp_path / "multi" / "metrics.json").is_file()


def test_segmentation_forest_scores_miou_over_seeds(pixel_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "seg"
    res = run(_cfg(pixel_shards, run_dir, "segmentation", "random_forest", "seeds=[0,1]",
                   "method.classic.max_train_pixels=300"))
    summary = _json(run_dir / "summary.json")
    assert summary["method"] == "random_forest" and summary["test"]["miou"]["n"] == 2
    one = _json(run_dir / "seed_1" / "metrics.json")
    assert one["test"]["miou"] > 0.9 and set(one["test"]["per_class_iou"]) == {"water", "forest", "crop"}
    assert _json(run_dir / "seed_1" / "finetune.json")["fitted"]["samples"] == 300  # subsampled
    assert (run_dir / "seed_0" / "prediction_map_toy.png").is_file() and len(res.seeds) == 2


def test_svm_on_a_large_segmentation_is_refused_in_one_line(pixel_shards: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.__main__ import main

    # the real limit is 50,000 pixels; the tiny scene has ~1,000 labelled training pixels
    assert METHODS["svm"].max_segmentation_pixels == 50_000  # type: ignore[attr-defined]
    monkeypatch.setitem(METHODS, "svm", replace(METHODS["svm"], max_segmentation_pixels=500))
    args = [*finetune_overrides(pixel_shards, tmp_path / "svm", "segmentation", "svm"), "logging.progress=false"]
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gfm finetune:")]
    assert len(err) == 1, err
    assert "method svm on task segmentation:" in err[0] and "exceed its limit of 500" in err[0]
    assert "use method.name=random_forest, or lower method.classic.max_train_pixels to 500" in err[0]
    assert main([*args, "method.classic.max_train_pixels=400"]) == 0  # under the limit: it runs


def test_a_classic_run_cannot_be_loaded_or_exported(pixel_shards: Path, tmp_path: Path) -> None:
    from gfm.hub import HubError, read_finetune

    run_dir = tmp_path / "rf"
    run(_cfg(pixel_shards, run_dir, "pixel", "random_forest"))
    with pytest.raises(AdapterError, match=f"{run_dir}: a random_forest run has no model to load; classic "
                                           "baselines are for comparison only"):
        load_finetuned(run_dir)
    with pytest.raises(HubError, match="classic baselines are for comparison only"):
        read_finetune(run_dir)  # what `gfm export --adapter` and `gfm predict` read first


def test_missing_sklearn_gives_the_install_hint(pixel_shards: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.__main__ import main

    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    assert main(finetune_overrides(pixel_shards, tmp_path / "knn", "pixel", "knn")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gfm finetune:")]
    assert err == ["gfm finetune: method knn needs scikit-learn, which is not installed: pip install 'gfm[baselines]'"]


def test_pretraining_and_the_finetune_config_never_import_sklearn() -> None:
    code = ("import sys, pretrain.__main__, gfm.train.runner, gfm.data, gfm.shards, gfm.model, gfm.finetune.run, "
            "gfm.hub; print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
