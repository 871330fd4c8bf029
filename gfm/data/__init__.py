"""Data sources: shards → normalised, augmented, bucketed :class:`Batch` objects, or a synthetic stream.

Two sources, each a typed config whose ``build(rank, world_size)`` gives an iterable of batches with
``state_dict``/``load_state_dict``/``set_epoch``:

- :class:`LoaderConfig` (:mod:`gfm.data.config`) → :class:`ShardLoader`, the streaming WebDataset loader;
- :class:`SyntheticDataConfig` (:mod:`gfm.data.synthetic`) → a synthetic stream for smoke runs and
  benchmarks without shards.

Names are imported on first use, so ``gfm.data.synthetic`` and ``gfm.data.config`` load without
webdataset, and importing this package costs nothing until the pipeline is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gfm.batch import Batch
    from gfm.data.config import LoaderConfig
    from gfm.data.pipeline import ShardLoader
    from gfm.data.sources import DatasetIndex, LoaderError, load_index, resolve_shards
    from gfm.data.synthetic import SyntheticDataConfig, SyntheticStream

# public name -> module that defines it
_EXPORTS = {
    "Batch": "gfm.batch",
    "DatasetIndex": "gfm.data.sources",
    "LoaderConfig": "gfm.data.config",
    "LoaderError": "gfm.data.sources",
    "ShardLoader": "gfm.data.pipeline",
    "SyntheticDataConfig": "gfm.data.synthetic",
    "SyntheticStream": "gfm.data.synthetic",
    "load_index": "gfm.data.sources",
    "resolve_shards": "gfm.data.sources",
}

__all__ = [
    "Batch",
    "DatasetIndex",
    "LoaderConfig",
    "LoaderError",
    "ShardLoader",
    "SyntheticDataConfig",
    "SyntheticStream",
    "load_index",
    "resolve_shards",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gfm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
