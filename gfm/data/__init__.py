"""Streaming data pipeline: shards → normalised, augmented, bucketed :class:`Batch` objects."""

from gfm.data.batch import Batch

__all__ = ["Batch"]
