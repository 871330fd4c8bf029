"""The typed config of a fine-tuning run, loaded from YAML + ``key=value`` overrides like pretraining's.

The engine sections (``optim``, ``schedule``, ``engine``, ``checkpoint``, ``logging``, ``guard``) are the
pretraining engine's own dataclasses, so a fine-tuning run is trained by the same ``TrainModule`` and
``Trainer`` (DeepSpeed, ZeRO, bf16, accumulation, the non-finite guard, metrics, checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gfm.config import ConfigError
from gfm.finetune.data import TaskDataConfig
from gfm.finetune.methods import FinetuneOptimConfig, MethodConfig, get_method
from gfm.finetune.model import HeadConfig
from gfm.finetune.splits import SplitConfig
from gfm.finetune.weights import EncoderConfig
from gfm.train.config import CheckpointConfig, GuardConfig, LoggingConfig
from gfm.train.engine_config import EngineConfig
from gfm.train.optim import ScheduleConfig


@dataclass
class EvalConfig:
    """Evaluation.

    Attributes:
        every: evaluate on the validation split every N steps (0 = never during training).
        maps: write a prediction map PNG per scene.
        batch_size: samples per forward pass (0 = ``data.eval_batch_size``).
    """

    every: int = 0
    maps: bool = True
    batch_size: int = 0

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.every < 0 or self.batch_size < 0:
            raise ConfigError(f"every/batch_size: must be >= 0, got {self.every}/{self.batch_size}")


@dataclass
class FinetuneConfig:
    """A whole fine-tuning run (or one per seed, with ``seeds``).

    Attributes:
        run_dir: where the config, split, metrics, pictures and model files go: a new or empty directory, or
            one of ``gfm finetune``'s own (marker ``.gfm-output``, :mod:`gfm.outputs`). Any other non-empty
            directory is refused, as is one that is or holds ``data.shards`` or ``encoder.weights``; a
            finished run there (``metrics.json``) is refused unless ``overwrite``.
        overwrite: replace the fine-tuning run in ``run_dir`` (deleted first), finished or not.
        steps: optimizer steps.
        seed: seeds the head, LoRA init, data order, augmentation and (unless ``split.seed``) the split.
        seeds: several seeds: one run each in ``run_dir/seed_<s>``, then ``summary.json`` with mean ± std.
        merge: LoRA: also write the adapters folded into the encoder (``merged/model.safetensors``).
        data: the labelled data and the task (:class:`~gfm.finetune.data.TaskDataConfig`).
        encoder: architecture and initial weights (:class:`~gfm.finetune.weights.EncoderConfig`).
        method: lora / linear_probe / full / scratch, or a classic baseline random_forest / svm / knn, which
            ignores ``encoder``, ``head``, ``optim``, ``schedule``, ``engine``, ``checkpoint`` and ``guard``
            (:class:`~gfm.finetune.methods.MethodConfig`).
        head: the task head (:class:`~gfm.finetune.model.HeadConfig`).
        split: train/val/test split (:class:`~gfm.finetune.splits.SplitConfig`).
        optim: AdamW with layer-wise lr decay (:class:`~gfm.finetune.methods.FinetuneOptimConfig`).
        checkpoint: as in pretraining; ``every: 0`` (the default) writes no checkpoint: a fine-tuning run
            leaves its adapters/head/model instead. ``export`` must stay false (the run writes its own files).
    """

    run_dir: str = "runs/finetune"
    overwrite: bool = False
    steps: int = 200
    seed: int = 0
    seeds: list[int] = field(default_factory=list)
    merge: bool = False
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10, min_lr_ratio=0.01))
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(zero_stage=0, precision="fp32"))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=0, keep=1, export=False))
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(every=10, tensorboard=False))
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Cross-section checks; raises :class:`ConfigError` naming the key."""
        if self.steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        if self.schedule.warmup_steps > self.steps:
            raise ConfigError(f"schedule.warmup_steps: {self.schedule.warmup_steps} exceeds steps={self.steps}")
        if self.checkpoint.export:
            raise ConfigError("checkpoint.export: must be false: a fine-tuning run writes its own adapters/head/model")
        method = get_method(self.method.name)
        if self.engine.zero_stage == 3 and method.frozen_base:
            raise ConfigError(
                f"engine.zero_stage: 3 with method {self.method.name} (a frozen, partitioned base) is unsupported; "
                "use ZeRO 0-2 (the frozen encoder is not partitioned there) or method full"
            )
        if self.overwrite and self.checkpoint.resume:
            raise ConfigError("overwrite: true deletes the run in run_dir, checkpoint.resume continues it: choose one")
        if self.checkpoint.resume and self.checkpoint.every == 0:
            raise ConfigError("checkpoint.resume: needs checkpoint.every > 0 (without it a run writes no checkpoint)")
        if self.merge and not method.mergeable:
            raise ConfigError(f"merge: only LoRA adapters can be merged (method is {self.method.name})")
        if method.classic and self.data.task == "segmentation" and self.method.classic.features == "window":
            raise ConfigError("method.classic.features: 'window' is not defined for task segmentation (each "
                              "labelled pixel is a sample: its values); use centre")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: repeated seeds in {self.seeds}")
