"""Fine-tuning units: metrics, splits, LoRA targets, layer-wise lr decay, task data, encoder loading, errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gfm.config import ConfigError, from_dict, load
from gfm.finetune.config import FinetuneConfig
from gfm.finetune.data import LabelConfig, TaskDataConfig, TaskDataError, TaskLoader
from gfm.finetune.methods import (
    FinetuneOptimConfig,
    LayerScaledAdamW,
    LoraConfig,
    MethodConfig,
    apply_method,
    layer_id,
    lora_modules,
    parameter_counts,
)
from gfm.finetune.metrics import classification_metrics, confusion_matrix, multilabel_counts, summarize
from gfm.finetune.model import HeadConfig, TaskModel
from gfm.finetune.splits import SplitConfig, SplitError, Windows, load_split, make_split, overlapping
from gfm.finetune.weights import EncoderConfig, EncoderLoadError, encoder_state, load_encoder
from gfm.index import read as read_index
from gfm.model import create_model
from tests.test_finetune_fixtures import CLASS_NAMES, build_labelled, pixel_dataset, scene_dataset

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_from_a_confusion_matrix_match_hand_computed_values() -> None:
    true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1])
    pred = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 2, 0])
    cm = confusion_matrix(true, pred, 3)
    assert cm.tolist() == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]  # the -1 entry is ignored
    m = classification_metrics(cm, ["a", "b", "c"], segmentation=True)
    assert m["oa"] == pytest.approx(7 / 10)
    assert m["aa"] == pytest.approx((2 / 4 + 2 / 3 + 1) / 3)
    pe = (4 * 3 + 3 * 3 + 3 * 4) / 100  # row sums x column sums / n^2
    assert m["kappa"] == pytest.approx((0.7 - pe) / (1 - pe))
    f1 = [2 * 2 / (4 + 3), 2 * 2 / (3 + 3), 2 * 3 / (3 + 4)]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["per_class_f1"]["c"] == pytest.approx(f1[2])
    assert m["per_class_iou"]["a"] == pytest.approx(2 / (4 + 3 - 2))
    assert m["miou"] == pytest.approx(np.mean([2 / 5, 2 / 4, 3 / 4]))


def test_a_class_without_samples_is_null_and_left_out_of_the_averages() -> None:
    cm = np.array([[5, 0, 0], [0, 0, 0], [1, 0, 4]])
    m = classification_metrics(cm, ["a", "b", "c"])
    assert m["per_class_accuracy"]["b"] is None and m["per_class_f1"]["b"] is None
    assert m["aa"] == pytest.approx((1 + 0.8) / 2)


def test_multilabel_counts_and_summary_over_seeds() -> None:
    t = np.array([[1, 0], [1, 1], [0, 1]])
    p = np.array([[1, 0], [0, 1], [1, 1]])
    assert multilabel_counts(t, p).tolist() == [[1, 1, 1, 0], [2, 0, 0, 1]]
    s = summarize([{"oa": 0.8, "x": "a"}, {"oa": 0.9, "x": "b"}, {"oa": 1.0, "x": "c"}])
    assert s["oa"]["mean"] == pytest.approx(0.9) and s["oa"]["std"] == pytest.approx(0.1) and s["oa"]["n"] == 3
    assert "x" not in s


# ------------------------------------------------------------------------------------------------
# Splits


def _pixel_windows(labels: np.ndarray, window: int) -> Windows:
    r, c = np.nonzero(labels >= 0)
    k = int(labels.max()) + 1
    n = len(r)
    return Windows([f"s:{a}:{b}" for a, b in zip(r, c)], np.zeros(n, np.int64), r - window // 2, c - window // 2,
                   np.full(n, window), np.full(n, window), np.eye(k)[labels[r, c]], [f"c{i}" for i in range(k)])


def _brute_overlap(w: Windows, a: np.ndarray, b: np.ndarray) -> int:
    """Training windows that overlap a test window, pair by pair (the independent count)."""
    hits = 0
    for i in a:
        rows = (w.top[b] < w.top[i] + w.height[i]) & (w.top[i] < w.top[b] + w.height[b])
        cols = (w.left[b] < w.left[i] + w.width[i]) & (w.left[i] < w.left[b] + w.width[b])
        hits += bool((rows & cols & (w.scene[b] == w.scene[i])).any())
    return hits


@pytest.fixture(scope="module")
def fields() -> np.ndarray:
    rng = np.random.default_rng(3)
    labels = np.full((96, 96), -1)
    for r0 in range(0, 96, 12):  # 12 px fields of 4 classes, 60 % of pixels labelled
        for c0 in range(0, 96, 12):
            labels[r0 : r0 + 12, c0 : c0 + 12] = rng.integers(0, 4)
    labels[rng.random(labels.shape) < 0.4] = -1
    return labels


def test_spatial_split_has_no_train_test_window_overlap(fields: np.ndarray) -> None:
    w = _pixel_windows(fields, 7)
    split = make_split(w, SplitConfig(block=24, fractions=(0.5, 0.1, 0.4), guard=2, per_class=15), seed=0)
    assert split.report["overlap_train_test"] == 0
    assert _brute_overlap(w, split.train, split.test) == 0
    assert _brute_overlap(w, split.train, split.val) == 0
    assert len(overlapping(w, split.train, split.test, grow=2)) == 0  # the guard band holds too
    assert np.bincount(w.dominant[split.train], minlength=4).tolist() == [15, 15, 15, 15]
    assert not set(split.train) & set(split.test) and not set(split.val) & set(split.test)
    # every class is in training and test; blocks, not pixels, were dealt
    assert all(v["train"] > 0 and v["test"] > 0 for v in split.report["per_class_samples"].values())
    again = make_split(w, SplitConfig(block=24, fractions=(0.5, 0.1, 0.4), guard=2, per_class=15), seed=0)
    assert np.array_equal(split.test, again.test) and np.array_equal(split.train, again.train)
    other = make_split(w, SplitConfig(block=24, fractions=(0.5, 0.1, 0.4), guard=2, per_class=15), seed=1)
    assert not np.array_equal(split.test, other.test)


def test_fraction_budget_and_random_split_overlap_is_reported(fields: np.ndarray) -> None:
    w = _pixel_windows(fields, 7)
    totals = np.bincount(w.dominant, minlength=4)
    split = make_split(w, SplitConfig(block=24, fractions=(0.5, 0.0, 0.5), fraction=0.05), seed=0)
    got = np.bincount(w.dominant[split.train], minlength=4)
    assert got.tolist() == [max(1, round(0.05 * t)) for t in totals]
    rnd = make_split(w, SplitConfig(mode="random", fractions=(0.5, 0.0, 0.5), fraction=0.05), seed=0)
    assert rnd.report["overlap_train_test"] == _brute_overlap(w, rnd.train, rnd.test) > 0


def test_split_with_an_empty_class_is_an_error_naming_it_or_dropped(fields: np.ndarray) -> None:
    labels = fields.copy()
    labels[labels == 3] = 0
    labels[40:43, 40:43] = 3  # a tiny field: cannot be both trained on and tested with 7 px windows
    w = _pixel_windows(labels, 7)
    with pytest.raises(SplitError, match=r"class 3 'c3' has no (training|test) samples"):
        make_split(w, SplitConfig(block=24), seed=0)
    dropped = make_split(w, SplitConfig(block=24, empty_class="drop"), seed=0)
    assert dropped.dropped_classes == [3] and dropped.report["dropped_classes"] == ["c3"]
    assert not (w.dominant[np.concatenate([dropped.train, dropped.test])] == 3).any()


def test_split_json_round_trip_and_refusal_for_other_data(fields: np.ndarray, tmp_path: Path) -> None:
    w = _pixel_windows(fields, 7)
    split = make_split(w, SplitConfig(block=24, per_class=5), seed=0)
    path = split.save(tmp_path / "split.json", w)
    back = load_split(path, w)
    assert all(np.array_equal(split.indices(n), back.indices(n)) for n in ("train", "val", "test"))
    other = _pixel_windows(fields[:48], 7)
    with pytest.raises(SplitError, match="split.load: .* sample\\(s\\) this data does not have"):
        load_split(path, other)


# ------------------------------------------------------------------------------------------------
# LoRA targets, parameter counts, layer-wise decay


def _task_model(depth: int = 2, **kw: object) -> TaskModel:
    torch.manual_seed(0)
    enc = create_model("less_vit_tiny", depth=depth, patch_size=4, **kw)
    return TaskModel(enc, "pixel", 3, HeadConfig(), window=9, num_bands=5, num_rows=5)


def _expected(model: TaskModel, groups: list[str]) -> set[str]:
    """The modules LoRA should wrap, named from the encoder's structure (not from the regex)."""
    names = set()
    for i, block in enumerate(model.encoder.blocks):
        attn = dict(block.attn.named_modules())
        if "attention" in groups:
            names |= {f"encoder.blocks.{i}.attn.{sub}" for sub in ("spectral.qkv", "spatial.qkv", "attn.qkv", "proj")
                      if isinstance(attn.get(sub), torch.nn.Linear)}
        if "pools" in groups:
            names |= {f"encoder.blocks.{i}.attn.{n}" for n, m in attn.items()
                      if n.startswith("pool.") and isinstance(m, torch.nn.Linear)}
        if "mlp" in groups:
            names |= {f"encoder.blocks.{i}.mlp.fc1", f"encoder.blocks.{i}.mlp.fc2"}
    if "patch_embed" in groups:
        names.add("encoder.patch_embed.proj")
    embeds = dict(model.encoder.pos_chan_embed.named_modules())
    if "channel_embed" in groups:
        names |= {f"encoder.pos_chan_embed.{n}" for n, m in embeds.items()
                  if n.startswith("chan.") and isinstance(m, torch.nn.Linear)}
    return names


@pytest.mark.parametrize(
    "groups", [["attention", "pools", "mlp"], ["attention"], ["mlp", "patch_embed", "channel_embed"]]
)
def test_lora_wraps_exactly_the_intended_modules_and_never_the_head(groups: list[str]) -> None:
    model = _task_model()
    expected = _expected(model, groups)
    wrapped = apply_method(model, MethodConfig("lora", LoraConfig(targets=groups)))
    got = set(lora_modules(wrapped))
    assert got == expected
    assert not any(n.startswith("task_head") for n in got)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or (".task_head.modules_to_save." in n) for n in trainable)
    assert any("task_head.modules_to_save" in n for n in trainable)  # the head trains in full


def test_peft_all_linear_would_also_wrap_the_head() -> None:
    """Why targets are explicit regexes: peft's "all-linear" on a custom model catches the task head too."""
    import peft

    model = _task_model()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    assert any(n.startswith("task_head") for n in lora_modules(wrapped))


def test_lora_trains_under_five_percent_of_the_tiny_model() -> None:
    # Indian Pines as configured: 200 bands in 8 spectral groups of 25, 16 classes
    encoder = create_model("less_vit_tiny", spectral_patch=25)
    model = TaskModel(encoder, "pixel", 16, HeadConfig(), window=9, num_bands=200, num_rows=8)
    total_before = sum(p.numel() for p in model.parameters())
    wrapped = apply_method(model, MethodConfig("lora"))
    counts = parameter_counts(wrapped)
    assert counts["trainable"] / counts["total"] < 0.05
    assert counts["total"] > total_before  # LoRA weights are counted in the total
    probe = parameter_counts(apply_method(_task_model(), MethodConfig("linear_probe")))
    assert probe["trainable"] == sum(p.numel() for p in _task_model().task_head.parameters())


def test_layer_wise_lr_decay_groups_and_scaled_steps() -> None:
    model = _task_model(depth=3)
    cfg = FinetuneOptimConfig(layer_decay=0.5, head_lr_scale=2.0)
    assert layer_id("encoder.patch_embed.proj.weight", 3) == 0
    assert layer_id("encoder.blocks.2.mlp.fc1.weight", 3) == 3
    assert layer_id("encoder.norm.weight", 3) == 4
    groups = cfg.param_groups(model)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.blocks.0.mlp.fc1.weight"])] == 0.5**3
    assert scale[id(named["encoder.blocks.2.mlp.fc1.weight"])] == 0.5
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == 0.5**4
    assert scale[id(named["encoder.norm.weight"])] == 1.0
    assert scale[id(named["task_head.classifier.2.weight"])] == 2.0
    # the optimizer steps each group at lr x lr_scale (SGD-like check on the first Adam step: |dw| = lr)
    w1, w2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = LayerScaledAdamW([{"params": [w1], "lr_scale": 1.0}, {"params": [w2], "lr_scale": 0.25}], lr=0.1,
                           weight_decay=0.0, foreach=False)
    (w1.sum() + w2.sum()).backward()
    opt.step()
    assert torch.allclose(w1, torch.full((3,), -0.1)) and torch.allclose(w2, torch.full((3,), -0.025))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]  # the schedule's lr is left as it was


# ------------------------------------------------------------------------------------------------
# Task data


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pixel_dataset(tmp_path_factory.mktemp("ft_pixel"))


def test_pixel_windows_are_centred_on_labelled_pixels_across_tiles(pixel_shards: Path) -> None:
    data = TaskDataConfig(shards=str(pixel_shards), task="pixel", window=9,
                          labels=LabelConfig(ignore=[0], names=CLASS_NAMES)).build()
    gt = np.load(pixel_shards.parent / "raw" / "toy_gt.npy")
    assert data.class_names == CLASS_NAMES and data.label_values == [1, 2, 3]
    assert len(data) == int((gt > 0).sum())  # every labelled pixel of the 48 x 48 scene, from 9 tiles
    raw = np.load(pixel_shards.parent / "raw" / "toy.npy")  # [h, w, C]
    mosaic = data.mosaics[0][0]
    stats = read_index(pixel_shards).stats
    keys = sorted(stats)  # toy_hsi/B001 .. B006, in band order
    mean = np.array([stats[k].mean for k in keys])
    std = np.array([stats[k].std for k in keys])
    for i in (0, len(data) // 2, len(data) - 1):
        r, c = int(data.windows.top[i]) + 4, int(data.windows.left[i]) + 4
        b = data.batch([i])
        assert b.pixels.shape == (1, 6, 9, 9)
        assert int(b.label[0]) == gt[r, c] - 1
        assert torch.equal(b.pixels[0, :, 4, 4], mosaic[:, r + 4, c + 4])
        # normalised with the shards' statistics, as the pretraining loader does
        assert np.allclose(b.pixels[0, :, 4, 4].numpy(), (raw[r, c] - mean) / std, atol=1e-4)
    loader = TaskLoader(data, np.arange(len(data)), 8, 0, 1, seed=0, augment=(True, True, True))
    first = next(iter(loader))
    assert first.pixels.shape == (8, 6, 9, 9) and first.label.shape == (8,)
    state = loader.state_dict()
    assert state == {"epoch": 0, "position": 1}


def test_class_names_travel_from_index_json(tmp_path: Path) -> None:
    import dataclasses

    from gfm.index import write as write_index

    shards = pixel_dataset(tmp_path)
    index = read_index(shards)
    write_index(shards, dataclasses.replace(index, classes={1: "water", 2: "forest", 3: "crop"}))
    data = TaskDataConfig(shards=str(shards), task="pixel", labels=LabelConfig(ignore=[0])).build()
    assert data.class_names == ["water", "forest", "crop"]


def test_task_data_errors_name_the_culprit(pixel_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="task 'scene' needs label.cls .* lack it .* labels found: label.npy"):
        TaskDataConfig(shards=str(pixel_shards), task="scene").build()
    with pytest.raises(TaskDataError, match=r"labels.num_classes=5 but the labels hold 3 class value\(s\) \[1, 2, 3\]"):
        TaskDataConfig(shards=str(pixel_shards), task="pixel", labels=LabelConfig(ignore=[0], num_classes=5)).build()
    with pytest.raises(TaskDataError, match=r"label value\(s\) \[3\] are neither in labels.values"):
        TaskDataConfig(shards=str(pixel_shards), task="pixel", labels=LabelConfig(ignore=[0], values=[1, 2])).build()
    unlabelled = build_labelled(tmp_path / "nolabel", [{"name": "u", "h": 16, "w": 16, "label": False}], tile=16)
    with pytest.raises(TaskDataError, match="task 'segmentation' needs label.npy .* labels found: none"):
        TaskDataConfig(shards=str(unlabelled), task="segmentation").build()


def test_scene_and_segmentation_samples(pixel_shards: Path, tmp_path: Path) -> None:
    scenes = TaskDataConfig(shards=str(scene_dataset(tmp_path)), task="scene").build()
    assert len(scenes) == 12 and scenes.class_names == ["class_1", "class_2", "class_3"]
    assert sorted(np.bincount(scenes.targets).tolist()) == [4, 4, 4]
    seg = TaskDataConfig(shards=str(pixel_shards), task="segmentation", labels=LabelConfig(ignore=[0])).build()
    b = seg.batch([0, 1])
    assert b.label.shape == (2, 16, 16) and int(b.label.min()) == -1 and int(b.label.max()) <= 2
    multi = TaskDataConfig(shards=str(pixel_shards), task="multilabel", labels=LabelConfig(ignore=[0])).build()
    assert multi.targets.shape == (9, 3) and multi.targets.sum() >= 9


# ------------------------------------------------------------------------------------------------
# Encoder weights and config


def test_encoder_loads_a_hypermae_strictly_and_names_mismatched_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    mae = create_model("hypermae_less_tiny", depth=2, patch_size=4)
    state = {k: v.contiguous() for k, v in mae.state_dict().items()}
    cfg_yaml = "model:\n  name: hypermae_less_tiny\n  patch_size: 4\n"
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"config": cfg_yaml})
    loaded = load_encoder(from_dict(EncoderConfig, {"weights": str(tmp_path / "model.safetensors"),
                                                    "name": "less_vit_tiny", "kwargs": {"depth": 2, "patch_size": 4}}))
    key = "blocks.1.mlp.fc2.weight"
    assert torch.equal(loaded.model.state_dict()[key], mae.encoder.state_dict()[key])
    assert "tensors loaded" in loaded.description and "set aside" in loaded.description
    with pytest.raises(EncoderLoadError, match=r"missing: blocks\.2\..* unexpected|missing: blocks\.2\."):
        encoder_state(state, create_model("less_vit_tiny", depth=3, patch_size=4), "m.safetensors")
    bad = dict(state, **{"encoder.extra.weight": torch.zeros(2)})
    with pytest.raises(EncoderLoadError, match=r"1 unexpected: extra\.weight"):
        encoder_state(bad, mae.encoder, "m.safetensors")


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"method\.lora\.targets: unknown group\(s\) \['attn'\]"):
        load(FinetuneConfig, None, ["data.shards=x", "method.lora.targets=[attn]"])
    with pytest.raises(ConfigError, match="engine.zero_stage: 3 with method lora"):
        load(FinetuneConfig, None, ["data.shards=x", "engine.zero_stage=3"])
    with pytest.raises(ConfigError, match="data.window: the pixel task needs an odd window"):
        load(FinetuneConfig, None, ["data.shards=x", "data.task=pixel", "data.window=8"])
    for path in sorted((REPO / "finetune" / "configs").glob("*.yaml")):
        load(FinetuneConfig, path)  # every shipped config loads


def test_program_prints_one_line_for_bad_input(pixel_shards: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.__main__ import main

    assert main([f"data.shards={pixel_shards}", "data.task=scene", f"run_dir={tmp_path}/r"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gfm finetune:")]
    assert len(err) == 1 and "task 'scene' needs label.cls" in err[0]
    assert main(["steps=zero"]) == 2
    assert capsys.readouterr().err.strip() == "gfm finetune: config error: steps: expected int, got 'zero'"


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients() -> None:
    """``encoder.grad_checkpointing`` turns activation checkpointing on, with LoRA too, and changes no gradient."""
    from gfm.batch import Batch

    B, C, S = 2, 5, 8
    g = torch.Generator().manual_seed(1)
    batch = Batch(pixels=torch.randn(B, C, S, S, generator=g), wavelength=torch.linspace(450.0, 2200.0, C).repeat(B, 1),
                  bandwidth=torch.full((B, C), 30.0), kind=torch.zeros(B, C, dtype=torch.long),
                  time=torch.full((B, C), 19000.0), valid=torch.ones(B, C, S, S, dtype=torch.bool),
                  gsd=torch.full((B,), 10.0), label=torch.tensor([0, 2]))
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        loaded = load_encoder(from_dict(EncoderConfig, {"name": "less_vit_tiny", "grad_checkpointing": on,
                                                        "kwargs": {"depth": 2, "patch_size": 4}}))
        assert loaded.model.grad_checkpointing is on
        model = apply_method(TaskModel(loaded.model, "scene", 3, HeadConfig()), MethodConfig("lora"))
        loss = model(batch).loss
        assert loss is not None
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_B" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_dense_per_pixel_evaluation_equals_window_by_window(pixel_shards: Path) -> None:
    """The scene-at-once path of a per-pixel dense head gives what the windows give, smoothing included."""
    from gfm.finetune.evaluate import predict

    data = TaskDataConfig(shards=str(pixel_shards), task="pixel", window=7,
                          labels=LabelConfig(ignore=[0], names=CLASS_NAMES)).build()
    torch.manual_seed(0)
    encoder = create_model("less_vit_tiny", depth=1, patch_size=1, spectral_patch=3, patch_embed="spectral")
    model = TaskModel(encoder, "pixel", 3, HeadConfig(smooth=5), window=7, num_bands=data.num_bands,
                      num_rows=encoder.num_rows(data.tiles[0])).eval()
    assert model.per_pixel and model.smooth == 5
    idx = np.random.default_rng(0).choice(len(data), 60, replace=False)
    idx = np.concatenate([idx, [0, len(data) - 1]])  # windows at the scene's edges, padded with invalid pixels
    targets, (dense,) = predict(model, data, idx, batch_size=64)
    with torch.no_grad():
        windowed = torch.cat([model(data.batch(idx[i:i + 16])).logits for i in range(0, len(idx), 16)]).argmax(1)
    assert np.array_equal(targets, data.targets[idx])
    assert np.array_equal(dense, windowed.numpy())
    # and training reads the centre pixel alone: its logits do not change when the neighbours do
    model.train()
    batch = data.batch(idx[:4])
    noisy = replace(batch, pixels=batch.pixels + torch.randn_like(batch.pixels) * (torch.arange(7) != 3)[:, None])
    assert torch.equal(model(batch).logits, model(noisy).logits)
