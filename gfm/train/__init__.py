"""Pretraining engine: typed run config, DeepSpeed train module, loop, callbacks, checkpoints.

``gfm.train.run(cfg)`` is what ``gfm pretrain`` and ``torchrun -m pretrain`` call (through
``gfm.train.run_guarded``, which turns the run into an exit code)::

    from gfm.config import load
    from gfm.train import TrainConfig, run

    run(load(TrainConfig, "pretrain/configs/cpu_smoke.yaml", ["steps=20"]))

Modules: :mod:`~gfm.train.config` (the run config), :mod:`~gfm.train.runner` (``run``: the composition
root), :mod:`~gfm.train.trainer` (the loop and the callback interface), :mod:`~gfm.train.module` (one
optimizer step on the DeepSpeed engine), :mod:`~gfm.train.callbacks`, :mod:`~gfm.train.checkpoint`.
The names below are imported on first use, so ``import gfm.train`` itself loads nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gfm.train.config import TrainConfig
    from gfm.train.runner import run, run_guarded
    from gfm.train.trainer import NonFiniteError

# public name -> module that defines it
_EXPORTS = {
    "NonFiniteError": "gfm.train.trainer",
    "TrainConfig": "gfm.train.config",
    "run": "gfm.train.runner",
    "run_guarded": "gfm.train.runner",
}

__all__ = ["NonFiniteError", "TrainConfig", "run", "run_guarded"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gfm.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
