"""Inference over whole scenes and tile embeddings.

- :func:`~gfm.infer.predict.predict_scene`: a task model over a whole scene, read window by window, tiles
  blended, classes (and probabilities) streamed into a Cloud-Optimized GeoTIFF (``gfm predict``).
- :func:`~gfm.infer.embed.embed_shards`, :func:`~gfm.infer.embed.embed_scene`: one embedding per tile
  into GeoParquet (``gfm embed``), optionally a dense per-patch embedding COG of a scene.

Modules: ``scenes`` (files → scene, aligned window reads), ``tiling`` (tile grid, blend weights, output
blocks), ``cog`` (block-by-block COG writing that appears whole or not at all), ``predictors`` (task
models → per-pixel probabilities; loading a model with its adapter), ``predict``, ``embed``,
``geoparquet``. Names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gfm.infer.embed import EmbedOptions, EmbedReport, embed_scene, embed_shards
    from gfm.infer.predict import PredictOptions, PredictReport, predict_scene
    from gfm.infer.predictors import load_task_model, make_predictor
    from gfm.infer.scenes import SceneFiles, scene_spec

_EXPORTS = {
    "EmbedOptions": "gfm.infer.embed",
    "EmbedReport": "gfm.infer.embed",
    "embed_scene": "gfm.infer.embed",
    "embed_shards": "gfm.infer.embed",
    "PredictOptions": "gfm.infer.predict",
    "PredictReport": "gfm.infer.predict",
    "predict_scene": "gfm.infer.predict",
    "load_task_model": "gfm.infer.predictors",
    "make_predictor": "gfm.infer.predictors",
    "SceneFiles": "gfm.infer.scenes",
    "scene_spec": "gfm.infer.scenes",
}

__all__ = [
    "EmbedOptions",
    "EmbedReport",
    "PredictOptions",
    "PredictReport",
    "SceneFiles",
    "embed_scene",
    "embed_shards",
    "load_task_model",
    "make_predictor",
    "predict_scene",
    "scene_spec",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gfm.infer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
