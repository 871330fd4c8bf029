"""Streaming data pipeline: shards → normalised, augmented, bucketed :class:`Batch` objects.

The trainer's entry point is :class:`LoaderConfig`: ``LoaderConfig(shards=DIR, ...).build(rank,
world_size)`` gives a :class:`ShardLoader` whose iteration yields one epoch of :class:`Batch` objects.
"""

from gfm.batch import Batch
from gfm.data.config import LoaderConfig
from gfm.data.pipeline import ShardLoader
from gfm.data.sources import DatasetIndex, LoaderError, load_index, resolve_shards

__all__ = [
    "Batch",
    "DatasetIndex",
    "LoaderConfig",
    "LoaderError",
    "ShardLoader",
    "load_index",
    "resolve_shards",
]
