"""The training loop: :class:`Trainer` runs optimizer steps and calls :class:`Callback` hooks around them.

The loop knows the step (:class:`~gfm.train.module.TrainModule`), the data stream and the hook interface,
nothing else: metrics, checkpoints and pictures are callbacks built from their config sections
(:mod:`gfm.train.callbacks`), and :func:`gfm.train.run` composes a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gfm import distributed as gdist
from gfm.batch import Batch
from gfm.train.checkpoint import Resumed, set_rng_state
from gfm.train.config import TrainConfig
from gfm.train.module import StepResult, TrainModule


class Callback:
    """Hooks the trainer calls on every rank; a callback decides itself whether rank 0 alone acts."""

    def on_start(self, trainer: Trainer) -> None:
        """Before the first step (after any resume)."""

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        """After every optimizer step; ``trainer.step`` already counts it."""

    def on_end(self, trainer: Trainer) -> None:
        """After the last step (not called when the run stops with an error)."""


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
