"""Fine-tuning end to end: every task and method on generated shards, reload/merge invariants, real data, 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gfm import distributed as gdist
from gfm.config import load
from gfm.finetune.artifacts import AdapterError, load_finetuned
from gfm.finetune.config import FinetuneConfig
from gfm.finetune.evaluate import predict
from gfm.finetune.run import run
from gfm.finetune.splits import overlapping
from tests.shared_data import data as shared
from tests.shared_data import needs_shared_data
from tests.test_finetune_fixtures import finetune_overrides, pixel_dataset, scene_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pixel_dataset(tmp_path_factory.mktemp("ft_run_pixel"))


@pytest.fixture(scope="module", autouse=True)
def world_of_one() -> None:
    gdist.init_distributed()  # one process group for every run of this module


def _cfg(shards: Path, run_dir: Path, task: str, method: str, *extra: str, steps: int = 6) -> FinetuneConfig:
    return load(FinetuneConfig, None, [*finetune_overrides(shards, run_dir, task, method, steps), *extra])


def _logits(model: torch.nn.Module, data: object, idx: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(data.batch(idx)).logits  # type: ignore[attr-defined]


def test_pixel_lora_end_to_end_frozen_base_reload_and_merge(pixel_shards: Path, tmp_path: Path) -> None:
    cfg = _cfg(pixel_shards, tmp_path / "lora", "pixel", "lora", "merge=true", "data.window=9", steps=8)
    res = run(cfg)
    data, split, model = res.data, res.split, res.model
    assert data is not None and model is not None
    run_dir = tmp_path / "lora"
    for name in ("config.yaml", "split.json", "metrics.json", "finetune.json", "confusion_matrix.png",
                 "prediction_map_toy.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "merged/model.safetensors", "base_encoder.safetensors"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split"]["overlap_train_test"] == 0 and len(overlapping(data.windows, split.train, split.test)) == 0
    assert 0 < metrics["trainable_fraction"] < 0.05
    assert metrics["parameters"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set(metrics["test"]["per_class_f1"]) == {"water", "forest", "crop"}  # class names travel to outputs
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["target_modules"].startswith("encoder\\.") and adapter_cfg["modules_to_save"] == ["task_head"]

    # the frozen base is bit-identical to the weights it started from (base_encoder.safetensors: the init)
    from safetensors.torch import load_file, save_file

    start = load_file(str(run_dir / "base_encoder.safetensors"))
    prefix = "base_model.model.encoder."
    trained_base = {n.removeprefix(prefix).replace(".base_layer", ""): p
                    for n, p in model.named_parameters() if n.startswith(prefix) and "lora_" not in n}
    n_params = len(list(load_finetuned(run_dir, merged=True).encoder.parameters()))  # type: ignore[union-attr]
    assert set(trained_base) <= set(start) and len(trained_base) == n_params
    assert trained_base and all(not p.requires_grad for p in trained_base.values())
    for name, p in trained_base.items():
        assert torch.equal(p.detach().cpu(), start[name]), name
    # LoRA actually trained (B starts at 0)
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)

    # the saved adapter reloads to identical predictions; merged weights give the same outputs
    idx = split.test[:64]
    trained = _logits(model.cpu(), data, idx)
    reloaded = _logits(load_finetuned(run_dir), data, idx)
    assert torch.equal(trained, reloaded)
    merged = _logits(load_finetuned(run_dir, merged=True), data, idx)
    assert torch.allclose(merged, reloaded, atol=1e-5, rtol=1e-5)
    # the figures in metrics.json are those of the reloaded files
    _, preds = predict(load_finetuned(run_dir), data, split.test, 256)
    oa = float((preds[0] == data.targets[split.test]).mean())
    assert oa == pytest.approx(metrics["test"]["oa"])

    # an adapter made for another base model is refused, naming both fingerprints
    other = tmp_path / "other.safetensors"

    save_file({k: v + 0.01 for k, v in start.items()}, str(other))
    with pytest.raises(AdapterError, match="made for another base model: base .* has fingerprint [0-9a-f]{16}"):
        load_finetuned(run_dir, base_weights=str(other))


def test_split_is_reused_from_json(pixel_shards: Path, tmp_path: Path) -> None:
    first = run(_cfg(pixel_shards, tmp_path / "a", "pixel", "linear_probe", "split.per_class=5", steps=2))
    reuse = f"split.load={tmp_path / 'a' / 'split.json'}"
    again = run(_cfg(pixel_shards, tmp_path / "b", "pixel", "linear_probe", reuse, "seed=7", steps=2))
    assert np.array_equal(first.split.test, again.split.test) and np.array_equal(first.split.train, again.split.train)
    assert (tmp_path / "a" / "head.safetensors").is_file()


def test_resume_continues_from_the_last_checkpoint(pixel_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "resume"
    run(_cfg(pixel_shards, run_dir, "pixel", "lora", "checkpoint.every=2", steps=4))
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    run(_cfg(pixel_shards, run_dir, "pixel", "lora", "checkpoint.every=2", "checkpoint.resume=auto", steps=6))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 6]  # the second run trained steps 5 and 6 only
    assert (run_dir / "checkpoints" / "step_00000006" / "COMPLETE").is_file()


def test_segmentation_full_with_layer_decay_and_seeds(pixel_shards: Path, tmp_path: Path) -> None:
    cfg = _cfg(pixel_shards, tmp_path / "seg", "segmentation", "full", "seeds=[0,1]", "optim.layer_decay=0.7",
               "split.block=16", "split.fractions=[0.5,0.0,0.5]", "data.batch_size=2", steps=3)
    res = run(cfg)
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert summary["test"]["oa"]["n"] == 2 and "miou" in summary["test"]
    one = json.loads((tmp_path / "seg" / "seed_1" / "metrics.json").read_text())
    assert "per_class_iou" in one["test"] and one["split"]["overlap_train_test"] == 0
    assert (tmp_path / "seg" / "seed_0" / "model.safetensors").is_file()
    assert len(res.seeds) == 2
    # interrupted during seed 1: the rerun keeps seed 0 and redoes seed 1 only
    kept = (tmp_path / "seg" / "seed_0" / "metrics.json").stat().st_mtime_ns
    (tmp_path / "seg" / "summary.json").unlink()
    (tmp_path / "seg" / "seed_1" / "metrics.json").unlink()
    again = run(cfg)
    assert (tmp_path / "seg" / "seed_0" / "metrics.json").stat().st_mtime_ns == kept
    assert (tmp_path / "seg" / "seed_1" / "metrics.json").is_file() and (tmp_path / "seg" / "summary.json").is_file()
    assert again.metrics["test"]["oa"]["n"] == 2


def test_scene_classification_and_multilabel(pixel_shards: Path, tmp_path: Path) -> None:
    scenes = scene_dataset(tmp_path / "data")
    res = run(_cfg(scenes, tmp_path / "scene", "scene", "scratch", "split.block=8", "data.labels.names=[]",
                   "split.fractions=[0.5,0.0,0.5]", steps=3))
    assert res.metrics["test"]["samples"] > 0
    assert json.loads((tmp_path / "scene" / "finetune.json").read_text())["encoder"]["source"] == ""
    multi = run(_cfg(pixel_shards, tmp_path / "multi", "multilabel", "lora", "split.block=16", "data.batch_size=4",
                     "split.fractions=[0.5,0.0,0.5]", steps=3))
    assert {"micro_f1", "exact_match"} <= set(multi.metrics["test"])


# ------------------------------------------------------------------------------------------------
# Real data


def _build(out: Path, *args: str) -> Path:
    from shards.cli import main as shards_main

    assert shards_main(["build", *args, "--out", str(out), "--no-progress"]) == 0
    return out


@needs_shared_data
def test_indian_pines_pixel_classification(tmp_path: Path) -> None:
    d = shared("hsi_indian_pines")
    shards = _build(tmp_path / "ip", str(d / "Indian_pines_corrected.npy"), "--wavelengths",
                    str(d / "wavelengths_nm.txt"), "--label", str(d / "Indian_pines_gt.npy"), "--sensor", "aviris",
                    "--scene-id", "indian_pines", "--date", "1992-06-12", "--gsd", "20", "--tile", "29")
    cfg = load(FinetuneConfig, REPO / "finetune" / "configs" / "indian_pines_lora.yaml", [
        f"data.shards={shards}", f"run_dir={tmp_path / 'run'}", "steps=4", "schedule.warmup_steps=1",
        "logging.progress=false",
        "logging.peak_flops=1e9", "encoder.weights=", "encoder.name=less_vit_tiny", "data.eval_batch_size=512",
        "encoder.kwargs={depth: 1, patch_size: 4, spectral_patch: 25}",
    ])
    res = run(cfg)
    m = res.metrics
    assert m["split"]["overlap_train_test"] == 0
    assert len(m["class_names"]) == 16 and m["class_names"][0] == "Alfalfa"
    assert m["test"]["samples"] > 2000 and 0 <= m["test"]["oa"] <= 1


@needs_shared_data
def test_sen1floods11_water_segmentation(tmp_path: Path) -> None:
    d = shared("s2_sen1floods11")
    shards = _build(tmp_path / "flood", str(d / "Spain_7370579_S2Hand.tif"), "--sensor", "sentinel2_l1c",
                    "--label", str(d / "Spain_7370579_LabelHand.tif"), "--date", "2019-09-17", "--tile", "64")
    cfg = load(FinetuneConfig, REPO / "finetune" / "configs" / "sen1floods11_water.yaml", [
        f"data.shards={shards}", f"run_dir={tmp_path / 'run'}", "steps=3", "schedule.warmup_steps=1",
        "logging.progress=false",
        "logging.peak_flops=1e9", "encoder.weights=", "encoder.name=less_vit_tiny", "encoder.kwargs={depth: 1}",
        "data.batch_size=2",
    ])
    res = run(cfg)
    assert res.metrics["class_names"] == ["dry", "water"]
    assert res.metrics["split"]["overlap_train_test"] == 0 and "miou" in res.metrics["test"]


@needs_shared_data
def test_eolearn_land_cover_segmentation(tmp_path: Path) -> None:
    d = shared("ts_eolearn_slovenia")
    lulc = np.load(d / "TestEOPatch" / "mask_timeless" / "LULC.npy")
    np.save(tmp_path / "lulc.npy", lulc.reshape(lulc.shape[:2]).astype(np.int16))
    manifest = tmp_path / "slovenia.yaml"
    manifest.write_text(
        "scenes:\n  - id: slovenia\n    sensor: sentinel2_l1c\n    crs: EPSG:32633\n"
        "    bounds: [465181.05, 5079244.89, 466180.53, 5080254.63]\n"
        f"    label: {tmp_path / 'lulc.npy'}\n"
        f"    observations:\n      - {{date: 2015-08-20, files: [{{path: {d / 'REFERENCE_SCENES.npy'}, index: 0}}]}}\n"
    )
    shards = _build(tmp_path / "slo", "--manifest", str(manifest), "--tile", "24", "--min-valid", "0")
    cfg = load(FinetuneConfig, REPO / "finetune" / "configs" / "eolearn_landcover.yaml", [
        f"data.shards={shards}", f"run_dir={tmp_path / 'run'}", "steps=3", "schedule.warmup_steps=1",
        "logging.progress=false",
        "logging.peak_flops=1e9", "encoder.weights=", "encoder.name=less_vit_tiny", "encoder.kwargs={depth: 1}",
        "data.batch_size=2",
    ])
    res = run(cfg)
    assert res.metrics["class_names"] == ["cultivated", "forest", "grassland", "shrubland", "artificial"]
    assert res.metrics["split"]["overlap_train_test"] == 0


# ------------------------------------------------------------------------------------------------
# Several ranks


@pytest.mark.slow
def test_two_ranks_zero2_lora_adapters_saved_and_reloaded(pixel_shards: Path, tmp_path: Path) -> None:
    """ZeRO-2 on 2 gloo ranks: the adapter written from the fp32 partitions reloads to the metrics the run reported."""
    run_dir = tmp_path / "z2"
    args = finetune_overrides(pixel_shards, run_dir, "pixel", "lora", steps=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "finetune",
           *args, "engine.zero_stage=2", "data.window=9"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 2
    data = load(FinetuneConfig, run_dir / "config.yaml").data.build()  # the resolved config is saved with the run
    split = json.loads((run_dir / "split.json").read_text())
    where = {sid: i for i, sid in enumerate(data.windows.ids)}
    test = np.array(sorted(where[s] for s in split["test"]))
    _, preds = predict(load_finetuned(run_dir), data, test, 256)
    assert float((preds[0] == data.targets[test]).mean()) == pytest.approx(metrics["test"]["oa"])
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)
