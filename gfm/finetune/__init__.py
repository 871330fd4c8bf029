"""Fine-tuning: LoRA (peft), linear probe, full fine-tuning, scratch and classic baselines, with honest splits.

``gfm.finetune.run(cfg)`` is what ``gfm finetune`` and ``torchrun -m finetune`` call::

    from gfm.config import load
    from gfm.finetune import FinetuneConfig, run

    run(load(FinetuneConfig, "finetune/configs/indian_pines_lora.yaml", ["steps=50"]))

Modules: :mod:`~gfm.finetune.config` (the run config), :mod:`~gfm.finetune.data` (task samples from
shards), :mod:`~gfm.finetune.splits` (spatially disjoint splits), :mod:`~gfm.finetune.weights` (the
encoder from a run, checkpoint or safetensors), :mod:`~gfm.finetune.methods` (the method registry: lora /
linear_probe / full / scratch, layer-wise lr decay, and the classic baselines random_forest / svm / knn of
:mod:`~gfm.finetune.classic`), :mod:`~gfm.finetune.model` (heads and losses), :mod:`~gfm.finetune.run`
(the composition root), :mod:`~gfm.finetune.evaluate` and :mod:`~gfm.finetune.metrics`,
:mod:`~gfm.finetune.artifacts` (adapters, heads, merged models: save and reload),
:mod:`~gfm.finetune.pictures`. Names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gfm.finetune.artifacts import load_finetuned
    from gfm.finetune.config import FinetuneConfig
    from gfm.finetune.run import FinetuneResult, run

_EXPORTS = {
    "FinetuneConfig": "gfm.finetune.config",
    "FinetuneResult": "gfm.finetune.run",
    "load_finetuned": "gfm.finetune.artifacts",
    "run": "gfm.finetune.run",
}

__all__ = ["FinetuneConfig", "FinetuneResult", "load_finetuned", "run"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gfm.finetune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
