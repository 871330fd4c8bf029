"""gfm.config (YAML → typed dataclasses, dotted overrides) and the pretraining config built on it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import pytest
import yaml

from gfm.config import ConfigError, apply_overrides, dump_yaml, from_dict, load, save_yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    names: list[str] = field(default_factory=list)
    mode: Literal["a", "b"] = "a"
    limit: int | None = None

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, float] = field(default_factory=dict)


def test_defaults_and_nested_values() -> None:
    cfg = from_dict(Outer, {"steps": 5, "inner": {"lr": "3e-4", "betas": [0.8, 0.9], "limit": 2}})
    assert cfg.steps == 5 and cfg.inner.lr == pytest.approx(3e-4) and cfg.inner.betas == (0.8, 0.9)
    assert cfg.inner.limit == 2 and cfg.flag is False


@dataclass
class WithSectionDefaults:
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5, mode="b"))


def test_a_partial_section_keeps_its_factory_defaults() -> None:
    """Overriding one key of a section built by a factory keeps that factory's other values, not the class's."""
    cfg = from_dict(WithSectionDefaults, {"inner": {"limit": 3}})
    assert (cfg.inner.lr, cfg.inner.mode, cfg.inner.limit) == (0.5, "b", 3)
    cfg = load(WithSectionDefaults, None, ["inner.names=[x]"])
    assert (cfg.inner.lr, cfg.inner.mode, cfg.inner.names) == (0.5, "b", ["x"])
    with pytest.raises(ConfigError, match="inner.typo: unknown key"):
        from_dict(WithSectionDefaults, {"inner": {"typo": 1}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stepz": 1}, "stepz: unknown key"),
        ({"inner": {"lr": "fast"}}, "inner.lr: expected float"),
        ({"inner": {"lr": -1.0}}, "inner.lr: must be > 0"),
        ({"inner": {"mode": "c"}}, "inner.mode: expected one of"),
        ({"inner": {"betas": [0.9]}}, "inner.betas: expected 2 items"),
        ({"inner": {"names": ["x", 3]}}, "inner.names[1]: expected str"),
        ({"flag": "yes"}, "flag: expected true/false"),
        ({"steps": 1.5}, "steps: expected int"),
        ({"extra": {"a": "b"}}, "extra.a: expected float"),
        ({"inner": 3}, "inner: expected a mapping"),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Outer, data)


def test_dotted_overrides() -> None:
    data = apply_overrides({"inner": {"lr": 1.0}}, ["inner.lr=2e-3", "steps=7", "extra.w=0.5", "inner.names=[a, b]"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.lr == pytest.approx(2e-3) and cfg.steps == 7 and cfg.extra == {"w": 0.5}
    assert cfg.inner.names == ["a", "b"]
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="steps: is a value, not a mapping"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\ninner:\n  lr: 0.5\n")
    cfg = load(Outer, path, ["flag=true"])
    saved = save_yaml(cfg, tmp_path / "out" / "resolved.yaml")
    again = load(Outer, saved)
    assert again == cfg and yaml.safe_load(dump_yaml(cfg))["inner"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "pretrain" / "configs").glob("*.yaml")))
def test_shipped_pretrain_configs_load(name: str, tmp_path: Path) -> None:
    from gfm.train.config import TrainConfig

    path = REPO / "pretrain" / "configs" / name
    # shard paths must exist when a config loads: point the shard configs at an existing directory
    uses_shards = yaml.safe_load(path.read_text())["data"].get("source") == "shards"
    cfg = load(TrainConfig, path, [f"data.loader.shards={tmp_path}"] if uses_shards else [])
    ds = cfg.engine.deepspeed_config(micro_batch=4, world_size=8)
    assert ds["train_batch_size"] == 4 * 8 * cfg.engine.grad_accum
    assert ds["zero_optimization"]["stage"] == cfg.engine.zero_stage


def test_train_config_errors() -> None:
    from gfm.train.config import TrainConfig

    with pytest.raises(ConfigError, match="engine.zero_stage: must be 0, 1, 2 or 3"):
        load(TrainConfig, None, ["engine.zero_stage=4"])
    with pytest.raises(ConfigError, match="schedule.warmup_steps: 500 exceeds steps=100"):
        load(TrainConfig, None, ["steps=100", "schedule.warmup_steps=500"])
    with pytest.raises(ConfigError, match="data.synthetic.sensor"):
        load(TrainConfig, None, ["data.synthetic.sensor=nope"])


def test_schedule_and_lr_scaling() -> None:
    from gfm.train.optim import OptimConfig, ScheduleConfig

    s = ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert s.factor(0, 100) == pytest.approx(0.1) and s.factor(9, 100) == pytest.approx(1.0)
    assert s.factor(55, 100) == pytest.approx(0.55) and s.factor(100, 100) == pytest.approx(0.1)
    o = OptimConfig(lr=1e-4, ref_batch=256)
    assert o.peak_lr(512) == pytest.approx(2e-4)
    assert OptimConfig(lr=1e-4, ref_batch=256, lr_scaling="sqrt").peak_lr(1024) == pytest.approx(2e-4)


def test_no_weight_decay_on_norms_biases_embeddings_tokens() -> None:
    import torch
    from torch import nn

    from gfm.train.optim import OptimConfig

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Linear(4, 8)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

    m = M()
    groups = OptimConfig(weight_decay=0.1).param_groups(m)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(m.fc.weight)}


def test_synthetic_stream_is_rank_count_independent() -> None:
    import torch

    from gfm.data.synthetic import SyntheticDataConfig

    cfg1 = SyntheticDataConfig(batch_size=4, tile=8, num_bands=3, samples_per_epoch=64)
    cfg2 = SyntheticDataConfig(batch_size=2, tile=8, num_bands=3, samples_per_epoch=64)
    one = next(iter(cfg1.build(0, 1)))
    halves = [next(iter(cfg2.build(r, 2))) for r in range(2)]
    assert torch.equal(one.pixels, torch.cat([h.pixels for h in halves]))
    stream = cfg1.build(0, 1)
    it = iter(stream)
    next(it), next(it)
    state = stream.state_dict()
    third = next(it)
    resumed = cfg2.build(1, 2)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed)).pixels, third.pixels[2:])


def test_resolved_config_holds_every_loader_default(tmp_path: Path) -> None:
    from gfm.data import LoaderConfig
    from gfm.train.config import TrainConfig

    cfg = load(TrainConfig, None, ["data.source=shards", f"data.loader.shards={tmp_path}", "data.loader.batch_size=4"])
    assert isinstance(cfg.data.loader, LoaderConfig) and cfg.data.batch_size == 4
    saved = yaml.safe_load(dump_yaml(cfg))["data"]["loader"]
    assert set(saved) == {f.name for f in fields(LoaderConfig)}
    assert saved["replay_on_resume"] is False and saved["prefetch_factor"] == 2 and saved["batch_size"] == 4
    assert load(TrainConfig, save_yaml(cfg, tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.loader.mode=x"], "data.loader.mode: expected one of ['resampled', 'epoch'], got 'x'"),
        (["data.loader.batch_size=0"], "data.loader.batch_size: must be >= 1, got 0"),
        (["data.loader.obs_dropout=1.0"], "data.loader.obs_dropout: must be in [0, 1), got 1.0"),
        (["data.loader.shufle_buffer=3"], "data.loader.shufle_buffer: unknown key (known: allow_pipe, batch_size,"),
        (["model.name=nope"], "model.name: unknown model 'nope' (known: dense_vit_base,"),
        (["data.source=shards"], "data.loader.shards: empty, but source is 'shards'"),
        (["data.source=shards", "data.loader.shards=/no/such/dir"],
         "data.loader.shards: '/no/such/dir' does not exist"),
        (["data.source=shards", "data.loader.shards=/no/d/s-{0..3}.tar"],
         "data.loader.shards: '/no/d/s-0.tar' does not exist (from '/no/d/s-{0..3}.tar')"),
        (["data.source=shards", "data.loader.shards=s3://bucket/held/", "data.loader.norm_index=/no/train/index.json"],
         "data.loader.norm_index: '/no/train/index.json' does not exist"),
    ],
)
def test_run_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    from gfm.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        load(TrainConfig, None, overrides)
    assert str(err.value).startswith(message), str(err.value)


def test_remote_and_synthetic_shard_specs_are_not_checked() -> None:
    from gfm.train.config import TrainConfig

    cfg = load(TrainConfig, None, ["data.source=shards", "data.loader.shards=s3://bucket/s2-{000..009}.tar"])
    assert cfg.data.loader.shards.startswith("s3://")
    assert load(TrainConfig, None, ["data.loader.shards=/no/such/dir"]).data.source == "synthetic"


def test_loader_config_errors_outside_a_run_config_name_loader() -> None:
    from gfm.data import LoaderConfig

    with pytest.raises(ConfigError, match=r"^loader\.min_obs: must be >= 1, got 0$"):
        LoaderConfig(shards="x", min_obs=0).build(0, 1)


def test_callbacks_are_built_from_config(tmp_path: Path) -> None:
    from gfm.train.callbacks import CheckpointCallback, MetricsCallback, PicturesCallback
    from gfm.train.config import CheckpointConfig, LoggingConfig

    assert [type(c) for c in LoggingConfig().build(tmp_path)] == [MetricsCallback]
    assert [type(c) for c in LoggingConfig(images_every=5).build(tmp_path)] == [MetricsCallback, PicturesCallback]
    ckpt = CheckpointConfig(keep=2).build(tmp_path)
    assert isinstance(ckpt, CheckpointCallback) and ckpt.manager.keep == 2


def test_the_loop_names_no_concrete_callback() -> None:
    import ast

    tree = ast.parse((REPO / "gfm" / "train" / "trainer.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "gfm.train.callbacks" not in modules
    assert not imported & {"MetricsCallback", "CheckpointCallback", "PicturesCallback"}


def test_configs_and_the_run_entry_import_light() -> None:
    # the run config (with its nested LoaderConfig), the synthetic source and `from gfm.train import run`
    # load without webdataset or DeepSpeed: those are imported when a loader or an engine is built
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        from gfm.data.synthetic import SyntheticDataConfig
        from gfm.train import TrainConfig, run, run_guarded
        from gfm.config import load
        load(TrainConfig, None, ["data.loader.batch_size=4"])
        assert run.__module__ == "gfm.train.runner" and callable(run_guarded)
        print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in {"webdataset", "deepspeed"}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_data_package_exports_resolve() -> None:
    import gfm.data

    for name in gfm.data.__all__:
        assert getattr(gfm.data, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gfm.data.nope  # noqa: B018
