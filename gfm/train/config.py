"""The typed config of a pretraining run: one dataclass per component, loaded from YAML + overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gfm.config import ConfigError
from gfm.model.registry import ModelConfig
from gfm.train.engine_config import EngineConfig
from gfm.train.optim import OptimConfig, ScheduleConfig
from gfm.train.synthetic import SyntheticDataConfig


@dataclass
class DataConfig:
    """Where batches come from.

    Attributes:
        source: ``shards`` (the streaming loader over WebDataset shards) or ``synthetic``.
        loader: the loader's own config (``gfm.data.LoaderConfig`` fields), used when source is shards.
        synthetic: the synthetic stream, used when source is synthetic.
    """

    source: Literal["shards", "synthetic"] = "synthetic"
    loader: dict[str, Any] = field(default_factory=dict)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.source == "shards":
            self.loader_config()

    def loader_config(self) -> Any:
        """``loader`` as a typed ``gfm.data.LoaderConfig`` (errors name ``data.loader.<key>``)."""
        from gfm.config import from_dict

        try:
            from gfm.data.config import LoaderConfig
        except ImportError as e:
            raise ConfigError(f"source: the shard loader is not available ({e})") from e
        return from_dict(LoaderConfig, self.loader, prefix="loader")

    @property
    def batch_size(self) -> int:
        """Samples per rank per micro-step."""
        if self.source == "synthetic":
            return self.synthetic.batch_size
        return int(self.loader_config().batch_size)

    def build(self, rank: int, world_size: int) -> Any:
        """The iterable of batches of ``rank`` (with ``state_dict``/``load_state_dict``/``set_epoch``)."""
        if self.source == "synthetic":
            return self.synthetic.build(rank, world_size)
        return self.loader_config().build(rank, world_size)


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written and resumed.

    Attributes:
        every: write a checkpoint every N optimizer steps (0 = only at the end).
        keep: keep the last k complete checkpoints (0 = all).
        resume: ``""`` (start fresh), ``auto`` (the latest complete checkpoint in the run directory, or
            fresh when there is none) or a path to a checkpoint directory.
        export: write the consolidated fp32 ``model.safetensors`` at the end.
    """

    every: int = 1000
    keep: int = 3
    resume: str = ""
    export: bool = True

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.every < 0:
            raise ConfigError(f"every: must be >= 0, got {self.every}")
        if self.keep < 0:
            raise ConfigError(f"keep: must be >= 0, got {self.keep}")


@dataclass
class LoggingConfig:
    """Metrics, progress and pictures (rank 0 only).

    Attributes:
        every: log metrics every N optimizer steps.
        tensorboard: write TensorBoard events under ``<run_dir>/tb``.
        progress: show a tqdm bar.
        images_every: write a reconstruction PNG every N steps (0 = never).
        image_nm: wavelengths (nm) of the bands to show: three for a composite, one for a single band;
            empty = true colour when the bands allow, else the first band.
        peak_flops: peak FLOP/s of one rank's device for utilisation; 0 = measure with a matmul probe.
    """

    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    images_every: int = 0
    image_nm: list[float] = field(default_factory=list)
    peak_flops: float = 0.0

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.every < 1:
            raise ConfigError(f"every: must be >= 1, got {self.every}")
        if self.images_every < 0:
            raise ConfigError(f"images_every: must be >= 0, got {self.images_every}")
        if len(self.image_nm) not in (0, 1, 3):
            raise ConfigError(f"image_nm: give 1 or 3 wavelengths, got {len(self.image_nm)}")


@dataclass
class GuardConfig:
    """Guard rails.

    Attributes:
        max_nonfinite: stop after this many optimizer steps in a row with a non-finite loss or gradient
            (each such step is skipped and counted).
    """

    max_nonfinite: int = 5

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.max_nonfinite < 1:
            raise ConfigError(f"max_nonfinite: must be >= 1, got {self.max_nonfinite}")


@dataclass
class TrainConfig:
    """A whole pretraining run.

    Attributes:
        run_dir: where the resolved config, DeepSpeed JSON, metrics, pictures and checkpoints go.
        steps: optimizer steps to train for.
        seed: seeds parameters, masking and the synthetic stream.
        data: the batches (:class:`DataConfig`).
        model: the model and its masking (``gfm.model.registry.ModelConfig``: ``mask_ratio``,
            ``obs_mask_ratio``; ``grad_checkpointing`` is activation checkpointing).
    """

    run_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        if self.schedule.warmup_steps > self.steps:
            raise ConfigError(f"schedule.warmup_steps: {self.schedule.warmup_steps} exceeds steps={self.steps}")
