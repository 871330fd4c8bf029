"""The composition root of a pretraining run: config → process group, model, data, engine, callbacks → loop.

:func:`run` is ``gfm.train.run``; :func:`run_guarded` is the same run as a program's exit code, with the
process group always left behind (what ``gfm pretrain``, ``bench.train`` and the test worker call).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gfm import distributed as gdist
from gfm.config import ConfigError, save_yaml
from gfm.train.checkpoint import resolve_resume
from gfm.train.config import TrainConfig
from gfm.train.module import TrainModule
from gfm.train.trainer import Callback, NonFiniteError, Trainer

#: exit code of a run stopped by the non-finite guard (``guard.max_nonfinite``)
EXIT_NONFINITE = 3


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (parameters are initialised identically on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_init_weights(model: nn.Module, weights: str) -> str:
    """Load ``weights`` (any source :func:`gfm.hub.sources.resolve_source` knows) into ``model``, strictly.

    Continued pretraining: the model must have the architecture the weights were saved from. Returns one
    line saying what was loaded.

    Raises:
        ConfigError: the weights cannot be read, or do not fit ``model`` (missing, unexpected and
            mis-shaped keys are listed), naming ``init_weights``.
    """
    from gfm.hub.base import HubError  # the submodules, not the package face: gfm.hub's adapters reach finetune
    from gfm.hub.sources import load_state_dict, resolve_source

    try:
        source = resolve_source(weights)
        state = load_state_dict(source)
    except HubError as e:
        raise ConfigError(f"init_weights: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if v]
        raise ConfigError(f"init_weights: {weights} does not fit model {model.__class__.__name__} "
                          f"({'; '.join(parts)}); the model section must describe the weights' architecture")
    model.load_state_dict(state, strict=True)
    step = f", step {source.step}" if source.step is not None else ""
    return f"init: {len(state)} tensors from {source.describe()} ({source.kind}{step})"


def run(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    data: Any = None,
    extra_callbacks: Sequence[Callback] = (),
) -> Trainer:
    """Pretrain as ``cfg`` says, on however many ranks this process group has; returns the trainer.

    ``model`` and ``data`` replace ``cfg.model.build()`` and ``cfg.data.build()`` (tests, notebooks);
    ``extra_callbacks`` run after the configured ones. Joins (or creates) the process group and leaves it
    joined: call :func:`gfm.distributed.destroy` afterwards, or use :func:`run_guarded`.

    Raises:
        NonFiniteError: ``guard.max_nonfinite`` steps in a row had a non-finite loss or gradient.
    """
    info = gdist.init_distributed(cfg.engine.timeout_s)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    gdist.barrier("run directory")

    # Resolve the checkpoint first: the DeepSpeed config depends on whether it must be re-partitioned.
    checkpoints = cfg.checkpoint.build(run_dir)
    manager = checkpoints.manager
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
    if cfg.init_weights and resume_path is None:
        gdist.print0(load_init_weights(model, cfg.init_weights))
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    module = TrainModule(model, cfg, load_universal=universal)
    module.write_deepspeed_config(run_dir)
    if data is None:
        data = cfg.data.build(info.rank, info.world_size)
    callbacks = [*cfg.logging.build(run_dir), checkpoints, *extra_callbacks]
    trainer = Trainer(cfg, module, data, callbacks, run_dir)
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
    trainer.fit()
    return trainer


def run_guarded(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    data: Any = None,
    extra_callbacks: Sequence[Callback] = (),
    prog: str = "gfm pretrain",
) -> int:
    """:func:`run` as a program's exit code: 0 when done, 3 (one line on stderr) when the guard stopped it.

    The process group is destroyed however the run ends; any other exception propagates after that.
    ``prog`` starts the guard's message (``gfm pretrain: stopping at step 6: ...``).
    """
    try:
        run(cfg, model=model, data=data, extra_callbacks=extra_callbacks)
    except NonFiniteError as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    finally:
        gdist.destroy()
    return 0
