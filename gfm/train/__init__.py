"""Pretraining engine: typed run config, DeepSpeed train module, loop, callbacks, checkpoints.

``gfm.train.run(cfg)`` is what ``gfm pretrain`` and ``torchrun -m pretrain`` call. Import submodules
directly (``gfm.train.config``, ``gfm.train.trainer``); this package imports nothing heavy on its own.
"""
