"""The typed config of a pretraining run: one dataclass per component, loaded from YAML + overrides.

Each section builds its component: ``data.build(rank, world_size)`` the batch stream, ``model.build()``
the model, ``logging.build(run_dir)`` and ``checkpoint.build(run_dir)`` the loop's callbacks. Loading
checks everything that can be checked without starting processes: types and ranges, the model name
against the registry, and that a local shard path exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gfm.config import ConfigError
from gfm.data.config import LoaderConfig, missing_local_shards
from gfm.data.synthetic import SyntheticDataConfig
from gfm.model.registry import ModelConfig, list_models
from gfm.train.engine_config import EngineConfig
from gfm.train.optim import OptimConfig, ScheduleConfig

if TYPE_CHECKING:
    from gfm.train.callbacks import CheckpointCallback
    from gfm.train.trainer import Callback


@dataclass
class DataConfig:
    """Where batches come from.

    Attributes:
        source: ``shards`` (the streaming loader over WebDataset shards) or ``synthetic``.
        loader: the shard loader (:class:`gfm.data.LoaderConfig`), used when source is shards.
        synthetic: the synthetic stream (:class:`gfm.data.SyntheticDataConfig`), used when source is synthetic.
    """

    source: Literal["shards", "synthetic"] = "synthetic"
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def validate(self) -> None:
        """Check that a shard source names shards that exist; raises :class:`ConfigError` naming the key."""
        if self.source != "shards":
            return
        spec = self.loader.shards
        if not spec:
            raise ConfigError("loader.shards: empty, but source is 'shards': give a dataset directory, brace "
                              "pattern, list file or URL")
        missing = missing_local_shards(spec)
        if missing is not None:
            where = "" if missing == spec else f" (from {spec!r})"
            raise ConfigError(f"loader.shards: {missing!r} does not exist{where}")
        norm = self.loader.norm_index
        if norm and missing_local_shards(norm) is not None:
            raise ConfigError(f"loader.norm_index: {norm!r} does not exist")

    @property
    def batch_size(self) -> int:
        """Samples per rank per micro-step."""
        return self.synthetic.batch_size if self.source == "synthetic" else self.loader.batch_size

    def build(self, rank: int, world_size: int) -> Any:
        """The iterable of batches of ``rank`` (with ``state_dict``/``load_state_dict``/``set_epoch``)."""
        if self.source == "synthetic":
            return self.synthetic.build(rank, world_size)
        return self.loader.build(rank, world_size)


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

    def build(self, run_dir: Path) -> CheckpointCallback:
        """The checkpoint callback of a run in ``run_dir``; its ``manager`` also finds and loads resumes."""
        from gfm.train.callbacks import CheckpointCallback
        from gfm.train.checkpoint import CheckpointManager

        return CheckpointCallback(CheckpointManager(run_dir, self.keep))


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

    def build(self, run_dir: Path) -> list[Callback]:
        """The callbacks that report a run in ``run_dir``: metrics, and pictures when ``images_every`` > 0."""
        from gfm.train.callbacks import MetricsCallback, PicturesCallback

        callbacks: list[Callback] = [MetricsCallback(run_dir)]
        if self.images_every:
            callbacks.append(PicturesCallback())
        return callbacks


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
        init_weights: continued pretraining: start the model from these weights instead of random ones
            (a shipped model's short name, a pretraining run, checkpoint, ``model.safetensors``, export or
            Hub id, as ``encoder.weights`` of fine-tuning takes them). The architecture must be the same
            (a strict load; masking and loss settings may differ); the optimizer, schedule and step
            counter start fresh. A resumed run takes its weights from its checkpoint instead.
        data: the batches (:class:`DataConfig`).
        model: the model and its masking (``gfm.model.registry.ModelConfig``: ``mask_ratio``,
            ``obs_mask_ratio``; ``grad_checkpointing`` is activation checkpointing); ``name`` must be a
            registered model.
        optim, schedule: AdamW and its warmup + cosine schedule (:mod:`gfm.train.optim`).
        engine: DeepSpeed: ZeRO stage, precision, accumulation, clipping, timeouts.
        checkpoint, logging: when to save and resume, what to report; each builds its callbacks.
        guard: when non-finite steps stop the run.
    """

    run_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    init_weights: str = ""
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
        known = list_models()
        if self.model.name not in known:
            raise ConfigError(f"model.name: unknown model {self.model.name!r} (known: {', '.join(known)})")
        if self.init_weights:
            from gfm.hub.base import HubError
            from gfm.pretrained import resolve

            try:
                resolve(self.init_weights)
            except HubError as e:
                raise ConfigError(f"init_weights: {e}") from None
        if self.model.context == "pixel" and self.logging.images_every:
            raise ConfigError("logging.images_every: reconstruction pictures show tiles, but model.context=pixel "
                              "makes every pixel its own sample; set logging.images_every=0")
        if self.schedule.warmup_steps > self.steps:
            raise ConfigError(f"schedule.warmup_steps: {self.schedule.warmup_steps} exceeds steps={self.steps}")
