"""Inference over whole scenes and tile embeddings.

- :func:`~gfm.infer.api.predict` (``gfm.predict``): a model name or directory and a scene (files, URLs or a
  numpy array with its band descriptions) → a class map as arrays, or written as a COG; ``gfm predict``
  is a thin shell over it.
- :func:`~gfm.infer.predict.predict_scene`: a task model over a whole scene, read window by window, tiles
  blended, classes (and probabilities) streamed into a Cloud-Optimized GeoTIFF (``gfm predict``).
- :func:`~gfm.infer.embed.embed_shards`, :func:`~gfm.infer.embed.embed_scene`: one embedding per tile
  into GeoParquet (``gfm embed``), optionally a dense per-patch embedding COG of a scene.

Modules: ``scenes`` (files → scene, aligned window reads), ``tiling`` (tile grid, blend weights, output
blocks), ``cog`` (block-by-block COG writing that appears whole or not at all), ``predictors`` (task
models → per-pixel probabilities; loading a model with its adapter), ``predict`` (the engine: blocks
into a COG, or into arrays), ``api`` (``predict``: model and scene in, prediction out), ``embed``,
``geoparquet``. Names below are imported on first use. The function ``predict`` is ``gfm.predict`` (or
``gfm.infer.api.predict``): here the name is the engine module's, ``gfm.infer.predict``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gfm.infer.api import array_scene
    from gfm.infer.embed import EmbedOptions, EmbedReport, embed_scene, embed_shards
    from gfm.infer.predict import Prediction, PredictOptions, PredictReport, predict_array, predict_scene
    from gfm.infer.predictors import load_task_model, make_predictor
    from gfm.infer.scenes import SceneFiles, scene_spec

_EXPORTS = {
    "array_scene": "gfm.infer.api",
    "EmbedOptions": "gfm.infer.embed",
    "EmbedReport": "gfm.infer.embed",
    "embed_scene": "gfm.infer.embed",
    "embed_shards": "gfm.infer.embed",
    "PredictOptions": "gfm.infer.predict",
    "PredictReport": "gfm.infer.predict",
    "Prediction": "gfm.infer.predict",
    "predict_array": "gfm.infer.predict",
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
    "Prediction",
    "SceneFiles",
    "array_scene",
    "embed_scene",
    "embed_shards",
    "load_task_model",
    "make_predictor",
    "predict_array",
    "predict_scene",
    "scene_spec",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gfm.infer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
