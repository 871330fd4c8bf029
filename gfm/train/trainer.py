"""The training loop and the run entry point: config → model, data, engine, callbacks → steps."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gfm import distributed as gdist
from gfm.batch import Batch
from gfm.config import save_yaml
from gfm.train.callbacks import (
    Callback,
    CheckpointCallback,
    MetricsCallback,
    PicturesCallback,
)
from gfm.train.checkpoint import CheckpointManager, Resumed, resolve_resume, set_rng_state
from gfm.train.config import TrainConfig
from gfm.train.module import StepResult, TrainModule


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Trainer:
    """Runs optimizer steps until ``cfg.steps``; everything else happens in callbacks.

    Attributes:
        step: optimizer steps done (the next step's 0-based index).
        epoch: the data epoch being read.
        nonfinite_total: steps skipped for non-finite values so far.
        nonfinite_run: such steps in a row up to now.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        module: TrainModule,
        data: Any,
        callbacks: Sequence[Callback],
        run_dir: Path,
    ) -> None:
        self.cfg = cfg
        self.module = module
        self.data = data
        self.callbacks = list(callbacks)
        self.run_dir = run_dir
        self.step = 0
        self.epoch = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0

    def data_state(self) -> dict[str, Any]:
        """The data stream's position (its own ``state_dict``)."""
        state: dict[str, Any] = self.data.state_dict()
        return state

    def restore(self, resumed: Resumed) -> None:
        """Continue from a loaded checkpoint: counters, data position, RNG."""
        self.step = resumed.step
        self.nonfinite_total = int(resumed.client.get("nonfinite_total", 0))
        own = resumed.rank_state
        data_state = own["data_state"] if own is not None else resumed.data_state
        if data_state is not None:
            self.data.load_state_dict(data_state)
        self.epoch = int(own["epoch"] if own is not None else resumed.client.get("epoch", 0))
        if own is not None:
            set_rng_state(own["rng"])

    def batches(self) -> Iterator[Batch]:
        """Batches forever, moving to the next epoch when one ends."""
        while True:
            produced = False
            for batch in self.data:
                produced = True
                yield batch
            if not produced and self.epoch > 0:
                raise RuntimeError("the data stream yields no batches")
            self.epoch += 1
            self.data.set_epoch(self.epoch)

    def fit(self) -> None:
        """Train to ``cfg.steps``; raises :class:`NonFiniteError` when the guard trips."""
        for cb in self.callbacks:
            cb.on_start(self)
        stream = self.batches()
        accum = self.cfg.engine.grad_accum
        while self.step < self.cfg.steps:
            micro = [next(stream) for _ in range(accum)]
            result = self.module.train_step(micro, self.step)
            self.step += 1
            self._guard(result)
            for cb in self.callbacks:
                cb.on_step(self, result)
            if self.nonfinite_run >= self.cfg.guard.max_nonfinite:
                raise NonFiniteError(
                    f"stopping at step {self.step}: {self.nonfinite_run} steps in a row had a non-finite "
                    f"loss or gradient (guard.max_nonfinite={self.cfg.guard.max_nonfinite}); last loss "
                    f"{result.loss}, lr {result.lr:.3g}. Lower optim.lr, check the data for NaN/Inf, or "
                    f"resume from the last checkpoint."
                )
        for cb in self.callbacks:
            cb.on_end(self)

    def _guard(self, result: StepResult) -> None:
        bad = result.skipped or not math.isfinite(result.loss)
        if bad:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            gdist.print0(f"step {self.step}: non-finite loss/gradient, update skipped "
                         f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)")
        else:
            self.nonfinite_run = 0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (parameters are initialised identically on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    data: Any = None,
    extra_callbacks: Sequence[Callback] = (),
) -> Trainer:
    """Pretrain as ``cfg`` says, on however many ranks this process group has; returns the trainer.

    ``model`` and ``data`` replace ``cfg.model.build()`` and ``cfg.data.build()`` (tests, notebooks).
    """
    info = gdist.init_distributed(cfg.engine.timeout_s)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    gdist.barrier("run directory")

    # Resolve the checkpoint first: the DeepSpeed config depends on whether it must be re-partitioned.
    manager = CheckpointManager(run_dir, cfg.checkpoint.keep)
    resume_path = gdist.broadcast_object(
        resolve_resume(cfg.checkpoint.resume, run_dir) if info.is_main else None
    )
    universal = False
    if resume_path is not None:
        meta = manager.read_meta(resume_path)
        universal = manager.needs_universal(meta, info.world_size, cfg.engine.zero_stage, cfg.engine.precision)
        if universal:
            gdist.print0(f"resume: {resume_path} was written by {meta['world_size']} rank(s) at ZeRO "
                         f"{meta['zero_stage']}; converting to a universal checkpoint")
            manager.make_universal(resume_path)

    seed_everything(cfg.seed)
    if model is None:
        model = cfg.model.build()
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    module = TrainModule(model, cfg, load_universal=universal)
    module.write_deepspeed_config(run_dir)
    if data is None:
        data = cfg.data.build(info.rank, info.world_size)
    trainer = Trainer(cfg, module, data, [], run_dir)
    if resume_path is not None:
        trainer.restore(manager.load(module.engine, resume_path, universal))
        gdist.print0(f"resumed from {resume_path} at step {trainer.step}")
    else:
        data.set_epoch(0)
    gdist.print0(
        f"pretrain: {info.world_size} rank(s) on {info.device.type}/{info.backend}, ZeRO "
        f"{cfg.engine.zero_stage}, {cfg.engine.precision}, {n_params / 1e6:.2f} M parameters, effective "
        f"batch {module.effective_batch}, peak lr {module.peak_lr:.3g}, run dir {run_dir}"
    )
    trainer.callbacks = [
        MetricsCallback(run_dir),
        PicturesCallback(),
        CheckpointCallback(manager),
        *extra_callbacks,
    ]
    trainer.fit()
    return trainer
